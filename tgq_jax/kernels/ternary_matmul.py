"""Ternary matmul from 2-bit packed codes: ``y = x @ W`` with ``W = scale * T``, ``T`` in {-1, 0, 1}.

The codes stay packed (4 per byte) in memory; the Pallas kernel unpacks one
block of them at a time on chip, accumulates ``x @ T`` in float32 and applies
the scale once, after accumulation (``scale * (x @ T)``; for TTQ's asymmetric
scales ``pos * (x @ [T = 1]) - neg * (x @ [T = -1])``).

The codes are in the planar layout of :mod:`tgq_jax.core.packing` (where
the pure-jnp packing, unpacking and rebuilt kernel live): a kernel ``(K, N)``
is ``uint8 (ceil(K / 4), N)``, the code of row ``k`` in the 2-bit plane
``k // ceil(K / 4)``, so the kernel multiplies plane ``s`` by the contiguous
column range ``x[:, s*K4 : (s+1)*K4]`` with no shuffling of bits across lanes.

Dispatch (:func:`ternary_dense`): the Pallas kernel runs where it compiles
natively (GPU through Triton, TPU through Mosaic) and the plain-JAX fallback
(unpack, then ``x @ W``) everywhere else; :func:`pallas_mode` forces either, or
the Pallas interpreter (``"interpret"``, any backend: how the tests check the
kernel on CPU).

This module depends on jax and :mod:`tgq_jax.core.packing` only.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from tgq_jax.core.packing import dequantize_planar
# The exporter imports these three from here.
from tgq_jax.core.packing import pack_planar, planar_shape, unpack_planar  # noqa: F401

__all__ = ["ternary_matmul", "ternary_matmul_reference", "ternary_dense", "pallas_mode", "set_pallas_mode",
           "use_pallas", "pallas_choice"]

_MODES = ("auto", "on", "off", "interpret")
# "auto": Pallas on GPU/TPU for products of at most AUTO_MAX_ROWS rows, the jnp fallback otherwise.
# Overridden by set_pallas_mode / use_pallas or the TGQ_PALLAS environment variable.
_mode = os.environ.get("TGQ_PALLAS", "auto")
#: "auto" uses the kernel up to this many activation rows: there the product is bound by reading
#: the weights, and 2-bit codes win (H200, K = N = 4096: 0.78x the bf16 dot's time at 1 row);
#: from 64 rows on it computes, and cuBLAS's bf16 dot is faster (1.46x at 64, 1.70x at 4096).
AUTO_MAX_ROWS = 16


# --- the plain-JAX path ------------------------------------------------------


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


def pallas_choice() -> str | None:
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
  choice = pallas_choice()
  rows = math.prod(x.shape[:-1])
  if choice is None or (_mode == "auto" and rows > AUTO_MAX_ROWS):
    return ternary_matmul_reference(x, packed, scale, neg_scale)
  lead = x.shape[:-1]
  y = ternary_matmul(x.reshape(-1, x.shape[-1]), packed, scale, neg_scale, interpret=choice == "interpret")
  return y.reshape(*lead, y.shape[-1])
