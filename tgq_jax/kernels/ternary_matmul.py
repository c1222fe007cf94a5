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

Dispatch (:func:`ternary_dense`): the kernel is chosen for the platform the
computation is LOWERED for, not the host's backend (:mod:`tgq_jax.kernels.per_platform`):
Mosaic on ``tpu`` (:mod:`tgq_jax.kernels.ternary_matmul_tpu`), Triton on ``cuda``
(:mod:`tgq_jax.kernels.ternary_matmul_gpu`), the plain-JAX fallback (unpack, then
``x @ W``) everywhere else, so a model exported from a CPU host for GPU or TPU
carries the kernel. The mode (:func:`set_pallas_mode`, :func:`use_pallas`,
``TGQ_PALLAS``; part of ``jax.jit``'s cache key) forces the fallback ("off"), the
kernels at any size ("on") or the Pallas interpreter ("interpret", any backend:
how the tests check the kernels on CPU).

This module depends on jax and numpy only.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["pack_planar", "unpack_planar", "planar_shape", "dequantize_planar", "ternary_matmul",
           "ternary_matmul_reference", "ternary_dense", "pallas_mode", "set_pallas_mode", "use_pallas",
           "export_disabled_checks", "KERNELS", "CUSTOM_CALL_TARGETS"]

_MODES = ("auto", "on", "off", "interpret")
#: "auto" uses a kernel up to this many activation rows: there the product is bound by reading
#: the weights, and 2-bit codes win (H200, K = N = 4096: 0.78x the bf16 dot's time at 1 row);
#: from 64 rows on it computes, and cuBLAS's bf16 dot is faster (1.46x at 64, 1.70x at 4096).
#: (Measured on a GPU only; TPUs use the same bound.)
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


# --- the Pallas kernels ------------------------------------------------------

#: The kernels by name: Mosaic on TPUs, Triton on NVIDIA GPUs.
KERNELS = ("mosaic_tpu", "triton")
#: Custom calls the Pallas kernels lower to; ``jax.export`` must be told to accept the Triton one
#: (``jax.export.DisabledSafetyCheck.custom_call``): Triton IR carries no stability guarantee.
CUSTOM_CALL_TARGETS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def export_disabled_checks(platforms) -> list:
  """The ``jax.export.export(..., disabled_checks=...)`` an export with the kernel needs for ``platforms``."""
  return [jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALL_TARGETS["cuda"])] if "cuda" in platforms else []


def ternary_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array, neg_scale: jax.Array | None = None, *,
                   kernel: str | None = None, block_m: int | None = None, block_n: int | None = None,
                   block_k: int | None = None, interpret: bool = False, precision=None,
                   num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
  """``x @ (scale * T)`` by a Pallas kernel, ``T`` given by its planar packed codes.

  Args:
    x: ``(M, K)`` activations (float32 or bfloat16).
    packed: ``uint8 (ceil(K / 4), N)`` codes, :func:`pack_planar`'s layout.
    scale: value of a +1 code, a scalar or one per output column ``(N,)``.
    neg_scale: magnitude of a -1 code (TTQ); None when it equals ``scale``.
    kernel: "mosaic_tpu" or "triton"; None: the one for the platform the
      computation is lowered for (:mod:`tgq_jax.kernels.per_platform`: Mosaic for
      ``tpu``, Triton for ``cuda``; lowering for any other platform fails with
      an error), or "triton" with ``interpret``.
    block_m, block_n, block_k: the output block and the packed rows per step
      (each covering ``4 * block_k`` rows of ``W``); None: the kernel's defaults
      (:func:`tgq_jax.kernels.ternary_matmul_tpu.tpu_blocks`,
      :func:`tgq_jax.kernels.ternary_matmul_gpu.gpu_blocks`, which say what
      each kernel accepts).
    interpret: run the kernel in the Pallas interpreter (any backend; slow; for tests).
    precision: of the on-chip products; default HIGHEST for float32 inputs (Triton
      would otherwise use TF32), the backend default for bfloat16.
    num_warps, num_stages: Triton compiler parameters (the Triton kernel only).

  Returns:
    ``(M, N)`` in ``x.dtype``, accumulated in float32.
  """
  from tgq_jax.kernels.per_platform import ternary_matmul_per_platform
  from tgq_jax.kernels.ternary_matmul_gpu import ternary_matmul_gpu
  from tgq_jax.kernels.ternary_matmul_tpu import ternary_matmul_tpu

  if x.ndim != 2 or packed.ndim != 2:
    raise ValueError(f"ternary_matmul: x (M, K) and packed (K4, N), got {x.shape} and {packed.shape}.")
  m, k = x.shape
  k4, n = packed.shape
  if k4 != -(-k // 4):
    raise ValueError(f"ternary_matmul: packed has {k4} rows; x's K={k} needs ceil(K/4) = {-(-k // 4)}.")
  if packed.dtype != jnp.uint8:
    raise ValueError(f"ternary_matmul: packed codes are uint8, got {packed.dtype}.")
  if kernel is not None and kernel not in KERNELS:
    raise ValueError(f"ternary_matmul: kernel must be one of {', '.join(KERNELS)} or None, got {kernel!r}.")
  if precision is None and x.dtype == jnp.float32:
    precision = lax.Precision.HIGHEST
  blocks = dict(block_m=block_m, block_n=block_n, block_k=block_k, precision=precision)
  if kernel is None and interpret:
    kernel = "triton"
  if kernel == "mosaic_tpu":
    return ternary_matmul_tpu(x, packed, scale, neg_scale, interpret=interpret, **blocks)
  if kernel == "triton":
    return ternary_matmul_gpu(x, packed, scale, neg_scale, num_warps=num_warps, num_stages=num_stages,
                              interpret=interpret, **blocks)
  return ternary_matmul_per_platform(x, packed, scale, neg_scale, fallback=False, num_warps=num_warps,
                                     num_stages=num_stages, **blocks)


# --- dispatch ----------------------------------------------------------------

# The mode is a jax user context (jax.make_user_context): part of jit's cache key, so a function
# traced under one mode is traced again under another instead of silently keeping the first.
_MODE = jax.make_user_context(default_value=os.environ.get("TGQ_PALLAS", "auto"))


def _checked(mode: str) -> str:
  if mode not in _MODES:
    raise ValueError(f"pallas mode must be one of {', '.join(_MODES)}, got {mode!r} (TGQ_PALLAS or set_pallas_mode).")
  return mode


def set_pallas_mode(mode: str) -> None:
  """Sets the process-wide mode: "auto" (Pallas where it runs natively, for few rows), "on", "off" or "interpret".

  The mode is part of ``jax.jit``'s cache key (a :func:`jax.make_user_context`):
  a jitted function is traced anew when it changes.
  """
  _MODE.set_global(_checked(mode))


def pallas_mode() -> str:
  """The current mode (:func:`use_pallas`'s inside its block, else :func:`set_pallas_mode`'s or ``TGQ_PALLAS``)."""
  return _checked(_MODE.value)


def use_pallas(mode: str):
  """A context manager that sets the mode inside a ``with`` block (this thread; part of jit's cache key)."""
  return _MODE(_checked(mode))


def ternary_dense(x: jax.Array, packed: jax.Array, scale: jax.Array, neg_scale: jax.Array | None = None, *,
                  mode: str | None = None) -> jax.Array:
  """``x @ W`` over the last axis of ``x`` (any leading axes): a Pallas kernel or the plain-JAX product.

  ``mode`` (None: :func:`pallas_mode`):

  * "auto": where the computation is lowered for ``tpu`` or ``cuda`` (chosen at
    lowering, :mod:`tgq_jax.kernels.per_platform`, so one export carries each
    platform's kernel) that platform's kernel for products of at most
    :data:`AUTO_MAX_ROWS` rows, the plain-JAX product otherwise and elsewhere;
  * "on": the kernels on ``tpu``/``cuda`` at any number of rows, plain JAX elsewhere;
  * "off": the plain-JAX product (:func:`ternary_matmul_reference`) everywhere;
  * "interpret": the Triton kernel in the Pallas interpreter, on any backend.

  The plain-JAX product rebuilds ``W`` and multiplies (bit-identical to a dense
  layer holding ``W``); the kernels apply the scale after accumulation, so the
  two agree to float rounding.
  """
  mode = _checked(pallas_mode() if mode is None else mode)
  rows = math.prod(x.shape[:-1])
  if mode == "off" or (mode == "auto" and rows > AUTO_MAX_ROWS):
    return ternary_matmul_reference(x, packed, scale, neg_scale)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if mode == "interpret":
    y = ternary_matmul(x2, packed, scale, neg_scale, interpret=True)
  else:
    from tgq_jax.kernels.per_platform import ternary_matmul_per_platform

    y = ternary_matmul_per_platform(x2, packed, scale, neg_scale, fallback=True,
                                    precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
  return y.reshape(*lead, y.shape[-1])
