"""Ternary matmul from 2-bit packed codes: ``y = x @ W`` with ``W = scale * T``, ``T`` in {-1, 0, 1}.

The codes stay packed (4 per byte) in memory; the Pallas kernel unpacks one
block of them at a time on chip, accumulates ``x @ T`` in float32 and applies
the scale once, after accumulation (``scale * (x @ T)``; for TTQ's asymmetric
scales ``pos * (x @ [T = 1]) - neg * (x @ [T = -1])``).

Planar layout (the one :class:`tgq_jax.frontends.linen_layers.TernaryDense` /
``TernaryConv`` hold in packed mode and the ``.safetensors`` export stores).
A kernel of shape ``(..., N)`` is seen as the matrix ``(K, N)``, ``K`` the
product of the leading axes (C order: a conv's HWIO kernel is the ``(H*W*I, O)``
matrix of its im2col product). With ``K4 = ceil(K / 4)``, ``packed`` is
``uint8 (K4, N)`` and the code of row ``k`` sits in the plane ``s = k // K4``::

    packed[r, n] bits 2s, 2s+1  =  code of W[s * K4 + r, n]      (s = 0, 1, 2, 3)

encoded ``00 = 0``, ``01 = +1``, ``10 = -1`` (``11`` is invalid); rows
``k >= K`` of the last plane are ``00``. Each plane is a contiguous quarter of
the rows, so the kernel multiplies plane ``s`` by the contiguous column range
``x[:, s*K4 : (s+1)*K4]`` with no shuffling of bits across lanes.

Dispatch (:func:`ternary_dense`): the Pallas kernel runs where it compiles
natively (GPU through Triton, TPU through Mosaic) and the plain-JAX fallback
(unpack, then ``x @ W``) everywhere else; :func:`pallas_mode` forces either, or
the Pallas interpreter (``"interpret"``, any backend: how the tests check the
kernel on CPU).

This module depends on jax and numpy only.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["pack_planar", "unpack_planar", "planar_shape", "dequantize_planar", "ternary_matmul",
           "ternary_matmul_reference", "ternary_dense", "pallas_mode", "set_pallas_mode", "use_pallas"]

_MODES = ("auto", "on", "off", "interpret")
# "auto": Pallas on GPU/TPU for products of at most AUTO_MAX_ROWS rows, the jnp fallback otherwise.
# Overridden by set_pallas_mode / use_pallas or the TGQ_PALLAS environment variable.
_mode = os.environ.get("TGQ_PALLAS", "auto")
#: "auto" uses the kernel up to this many activation rows: there the product is bound by reading
#: the weights, and 2-bit codes win (H200, K = N = 4096: 0.78x the bf16 dot's time at 1 row);
#: from 64 rows on it computes, and cuBLAS's bf16 dot is faster (1.46x at 64, 1.70x at 4096).
AUTO_MAX_ROWS = 16


# --- layout (host side, numpy) ---------------------------------------------


def planar_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """``(K4, N)``: the packed shape of a kernel of ``shape`` (``N = shape[-1]``, ``K4 = ceil(K / 4)``)."""
  if len(shape) < 1:
    raise ValueError("a kernel has at least one axis.")
  n = int(shape[-1])
  k = int(np.prod(shape[:-1], dtype=np.int64))
  return -(-k // 4), n


def pack_planar(codes: np.ndarray) -> np.ndarray:
  """Packs ternary codes (-1, 0, 1) of a kernel ``(..., N)`` into ``uint8 (K4, N)``; see the module docstring."""
  codes = np.asarray(codes)
  if codes.size and not np.isin(codes, (-1, 0, 1)).all():
    raise ValueError("pack_planar: codes must be in {-1, 0, 1}.")
  k4, n = planar_shape(codes.shape)
  mat = codes.reshape(-1, n)
  two_bits = np.where(mat > 0, 1, np.where(mat < 0, 2, 0)).astype(np.uint8)
  two_bits = np.pad(two_bits, ((0, 4 * k4 - mat.shape[0]), (0, 0))).reshape(4, k4, n)
  return (two_bits[0] | two_bits[1] << 2 | two_bits[2] << 4 | two_bits[3] << 6).astype(np.uint8)


def unpack_planar(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of :func:`pack_planar`: int8 codes of ``shape`` (the pattern ``11`` reads as 0)."""
  packed = np.asarray(packed, np.uint8)
  k4, n = planar_shape(shape)
  if packed.shape != (k4, n):
    raise ValueError(f"packed codes of shape {packed.shape}, expected {(k4, n)} for a kernel {tuple(shape)}.")
  two_bits = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)]).reshape(4 * k4, n)
  k = int(np.prod(shape[:-1], dtype=np.int64))
  codes = np.where(two_bits == 1, 1, np.where(two_bits == 2, -1, 0)).astype(np.int8)
  return codes[:k].reshape(shape)


# --- the plain-JAX path ------------------------------------------------------


def dequantize_planar(packed: jax.Array, scale: jax.Array, neg_scale: jax.Array | None,
                      shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """The kernel ``scale * T`` of ``shape`` rebuilt from its packed codes, inside the traced graph.

  The same values as :func:`tgq_jax.core.ternarize.dequantize`: ``scale`` where the
  code is +1, ``-neg_scale`` where it is -1, 0 elsewhere (``scale`` a scalar or
  one per output channel, the last axis); ``neg_scale=None`` is ``scale``.
  """
  k4, n = planar_shape(shape)
  k = int(np.prod(shape[:-1], dtype=np.int64))
  shifts = jnp.array([0, 2, 4, 6], jnp.uint8).reshape(4, 1, 1)
  two_bits = ((packed[None] >> shifts) & 3).reshape(4 * k4, n)[:k]
  pos = jnp.asarray(scale, dtype)
  neg = pos if neg_scale is None else jnp.asarray(neg_scale, dtype)
  kernel = jnp.where(two_bits == 1, pos, jnp.where(two_bits == 2, -neg, jnp.zeros((), dtype)))
  return kernel.reshape(shape)


def ternary_matmul_reference(x: jax.Array, packed: jax.Array, scale: jax.Array,
                             neg_scale: jax.Array | None = None, *, precision=None) -> jax.Array:
  """``x @ W`` with ``W`` rebuilt first (the dense path the model takes without Pallas)."""
  k = x.shape[-1]
  kernel = dequantize_planar(packed, scale, neg_scale, (k, packed.shape[-1]), jnp.float32)
  return jnp.dot(x, kernel.astype(x.dtype), precision=precision)


# --- the Pallas kernel -------------------------------------------------------


def _kernel(x_ref, c_ref, pos_ref, neg_ref, o_ref, *, k4p: int, bk4: int, symmetric: bool, precision):
  """One (block_m, block_n) output block; loops over the packed rows ``bk4`` at a time."""
  from jax.experimental import pallas as pl

  bm, bn = o_ref.shape
  dot = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=jnp.float32)

  def body(i, accs):
    start = pl.multiple_of(i * bk4, bk4)
    codes = c_ref[pl.ds(start, bk4), :]  # uint8 (bk4, bn): 4 planes of codes
    accs = list(accs)
    for s in range(4):
      xs = x_ref[:, pl.ds(s * k4p + start, bk4)]  # the matching quarter of x's columns
      two = (codes >> (2 * s)) & 3
      if symmetric:
        t = (two & 1).astype(jnp.int32) - (two >> 1).astype(jnp.int32)  # 01 -> +1, 10 -> -1
        accs[0] = accs[0] + dot(xs, t.astype(xs.dtype))
      else:
        accs[0] = accs[0] + dot(xs, (two == 1).astype(xs.dtype))
        accs[1] = accs[1] + dot(xs, (two == 2).astype(xs.dtype))
    return tuple(accs)

  zeros = jnp.zeros((bm, bn), jnp.float32)
  accs = lax.fori_loop(0, k4p // bk4, body, (zeros,) if symmetric else (zeros, zeros))
  out = accs[0] * pos_ref[...] if symmetric else accs[0] * pos_ref[...] - accs[1] * neg_ref[...]
  o_ref[...] = out.astype(o_ref.dtype)


def _round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def ternary_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array, neg_scale: jax.Array | None = None, *,
                   block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                   interpret: bool = False, precision=None, num_warps: int | None = None,
                   num_stages: int | None = None) -> jax.Array:
  """``x @ (scale * T)`` by the Pallas kernel, ``T`` given by its planar packed codes.

  Args:
    x: ``(M, K)`` activations (float32 or bfloat16).
    packed: ``uint8 (ceil(K / 4), N)`` codes, :func:`pack_planar`'s layout.
    scale: value of a +1 code, a scalar or one per output column ``(N,)``.
    neg_scale: magnitude of a -1 code (TTQ); None when it equals ``scale``.
    block_m, block_n: output block (``block_m`` defaults to the smallest power of
      two >= M, between 16 and 128; ``block_n`` to 64 for M <= 64, else 128).
    block_k: packed rows per step (each step covers ``4 * block_k`` rows of ``W``);
      default 64 for M <= 16, else 32. (The defaults were the fastest of five
      configurations on an H200 at K = N = 4096.)
    interpret: run in the Pallas interpreter (any backend; slow; for tests).
    precision: of the on-chip products; default HIGHEST for float32 inputs (Triton
      would otherwise use TF32), the backend default for bfloat16.
    num_warps, num_stages: Triton compiler parameters (GPU only).

  Returns:
    ``(M, N)`` in ``x.dtype``, accumulated in float32.
  """
  from jax.experimental import pallas as pl

  if x.ndim != 2 or packed.ndim != 2:
    raise ValueError(f"ternary_matmul: x (M, K) and packed (K4, N), got {x.shape} and {packed.shape}.")
  m, k = x.shape
  k4, n = packed.shape
  if k4 != -(-k // 4):
    raise ValueError(f"ternary_matmul: packed has {k4} rows; x's K={k} needs ceil(K/4) = {-(-k // 4)}.")
  if precision is None and x.dtype == jnp.float32:
    precision = lax.Precision.HIGHEST
  block_n = block_n or (64 if m <= 64 else 128)
  block_k = block_k or (64 if m <= 16 else 32)
  bm = block_m or min(128, max(16, int(pl.next_power_of_2(m))))
  bn = min(block_n, max(16, int(pl.next_power_of_2(n))))
  bk4 = min(block_k, max(16, int(pl.next_power_of_2(k4))))
  mp, np_, k4p = _round_up(m, bm), _round_up(n, bn), _round_up(k4, bk4)

  # x's columns regrouped as 4 planes of k4p columns (zeros beyond K and between planes).
  xp = x if 4 * k4 == k else jnp.pad(x, ((0, 0), (0, 4 * k4 - k)))
  if k4p != k4:
    xp = jnp.pad(xp.reshape(m, 4, k4), ((0, 0), (0, 0), (0, k4p - k4))).reshape(m, 4 * k4p)
  if mp != m:
    xp = jnp.pad(xp, ((0, mp - m), (0, 0)))
  cp = packed if (k4p, np_) == (k4, n) else jnp.pad(packed, ((0, k4p - k4), (0, np_ - n)))

  def row(v):
    v = jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,))
    return (v if np_ == n else jnp.pad(v, (0, np_ - n))).reshape(1, np_)

  symmetric = neg_scale is None
  pos = row(scale)
  neg = pos if symmetric else row(neg_scale)
  compiler_params = None
  if not interpret and jax.default_backend() == "gpu" and (num_warps or num_stages):
    from jax.experimental.pallas import triton as pltriton
    compiler_params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  kernel = functools.partial(_kernel, k4p=k4p, bk4=bk4, symmetric=symmetric, precision=precision)
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
    grid=(mp // bm, np_ // bn),
    in_specs=[
      pl.BlockSpec((bm, 4 * k4p), lambda i, j: (i, 0)),
      pl.BlockSpec((k4p, bn), lambda i, j: (0, j)),
      pl.BlockSpec((1, bn), lambda i, j: (0, j)),
      pl.BlockSpec((1, bn), lambda i, j: (0, j)),
    ],
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    interpret=interpret,
    compiler_params=compiler_params,
    name="ternary_matmul",
  )(xp, cp, pos, neg)
  return out[:m, :n] if (mp, np_) != (m, n) else out


# --- dispatch ----------------------------------------------------------------


def set_pallas_mode(mode: str) -> None:
  """"auto" (Pallas on GPU/TPU, jnp elsewhere), "on", "off" or "interpret" (the Pallas interpreter)."""
  global _mode
  if mode not in _MODES:
    raise ValueError(f"pallas mode must be one of {', '.join(_MODES)}, got {mode!r}.")
  _mode = mode


def pallas_mode() -> str:
  return _mode


@contextlib.contextmanager
def use_pallas(mode: str):
  """Sets the Pallas mode inside a ``with`` block (read when a function is traced)."""
  previous = _mode
  set_pallas_mode(mode)
  try:
    yield
  finally:
    set_pallas_mode(previous)


def _pallas_choice() -> str | None:
  """None (use the jnp fallback), "native" or "interpret"."""
  if _mode not in _MODES:
    raise ValueError(f"TGQ_PALLAS must be one of {', '.join(_MODES)}, got {_mode!r}.")
  if _mode == "off":
    return None
  if _mode == "interpret":
    return "interpret"
  if _mode == "on" or jax.default_backend() in ("gpu", "tpu"):
    return "native"
  return None


def ternary_dense(x: jax.Array, packed: jax.Array, scale: jax.Array, neg_scale: jax.Array | None = None) -> jax.Array:
  """``x @ W`` over the last axis of ``x`` (any leading axes): the Pallas kernel or the fallback.

  The fallback rebuilds ``W`` and multiplies (bit-identical to a dense layer
  holding ``W``); the kernel applies the scale after accumulation, so the two
  agree to float rounding.
  """
  choice = _pallas_choice()
  rows = math.prod(x.shape[:-1])
  if choice is None or (_mode == "auto" and rows > AUTO_MAX_ROWS):
    return ternary_matmul_reference(x, packed, scale, neg_scale)
  lead = x.shape[:-1]
  y = ternary_matmul(x.reshape(-1, x.shape[-1]), packed, scale, neg_scale, interpret=choice == "interpret")
  return y.reshape(*lead, y.shape[-1])
