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

Dispatch (:func:`ternary_dense`): the kernel is chosen for the platform the
computation is LOWERED for, not the host's backend (:mod:`tgq_jax.kernels.per_platform`):
Mosaic on ``tpu`` (:mod:`tgq_jax.kernels.ternary_matmul_tpu`), Triton on ``cuda``
(:mod:`tgq_jax.kernels.ternary_matmul_gpu`), the plain-JAX fallback (unpack, then
``x @ W``) everywhere else, so a model exported from a CPU host for GPU or TPU
carries the kernel. The mode (:func:`set_pallas_mode`, :func:`use_pallas`,
``TGQ_PALLAS``; part of ``jax.jit``'s cache key) forces the fallback ("off"), the
kernels at any size ("on") or the Pallas interpreter ("interpret", any backend:
how the tests check the kernels on CPU).

This module depends on jax and :mod:`tgq_jax.core.packing` only.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from tgq_jax.core.packing import dequantize_planar, planar_shape, unpack_planar

__all__ = ["ternary_matmul", "ternary_matmul_reference", "ternary_dense", "pallas_mode", "set_pallas_mode",
           "use_pallas", "export_disabled_checks", "KERNELS", "CUSTOM_CALL_TARGETS"]

_MODES = ("auto", "on", "off", "interpret")
#: "auto" uses a kernel up to this many activation rows: there the product is bound by reading
#: the weights, and 2-bit codes win (H200, K = N = 4096: 0.78x the bf16 dot's time at 1 row);
#: from 64 rows on it computes, and cuBLAS's bf16 dot is faster (1.46x at 64, 1.70x at 4096).
#: (Measured on a GPU only; TPUs use the same bound.)
AUTO_MAX_ROWS = 16


# --- the plain-JAX path ------------------------------------------------------


def ternary_matmul_reference(x: jax.Array, packed: jax.Array, scale: jax.Array,
                             neg_scale: jax.Array | None = None, *, precision=None) -> jax.Array:
  """``x @ W`` with ``W`` rebuilt first (the dense path the model takes without Pallas)."""
  k = x.shape[-1]
  kernel = dequantize_planar(packed, scale, neg_scale, (k, packed.shape[-1]), jnp.float32)
  return jnp.dot(x, kernel.astype(x.dtype), precision=precision)


#: At most this many rows, the CPU product (the fallback of :func:`ternary_dense`'s kernel path) is
#: :func:`ternary_matmul_blocked`: batch-1 decoding is bound by the bytes of the weights, and rebuilding a
#: float32 kernel in memory moves 16x the bytes of its codes.
BLOCKED_MAX_ROWS = 1


#: The rebuilt float32 block of :func:`ternary_matmul_blocked` stays within this many bytes (half of
#: this CPU's 1 MiB L2): written and read back in cache, never in memory.
BLOCK_BYTES = 2**19


def column_block(k: int, n: int, block_bytes: int = BLOCK_BYTES) -> int | None:
  """The widest of 512, 256, 128 columns dividing ``n`` whose float32 ``(k, columns)`` block fits
  ``block_bytes`` (else the narrowest dividing one); None when none divides ``n``."""
  dividing = [c for c in (512, 256, 128) if n % c == 0]
  fitting = [c for c in dividing if k * c * 4 <= block_bytes]
  return (fitting or dividing[-1:] or [None])[0]


def ternary_matmul_blocked(x: jax.Array, packed: jax.Array, scale: jax.Array,
                           neg_scale: jax.Array | None = None) -> jax.Array:
  """``x @ W`` for few rows ``x (M, K)``: the kernel rebuilt one block of columns at a time.

  Batch-1 decoding is bound by the bytes of the weights. :func:`ternary_matmul_reference` writes the
  whole float32 kernel (16x the bytes of its codes) to memory and reads it back for every product;
  here a loop over blocks of :func:`column_block` columns rebuilds each block (``(K, columns)``
  float32, at most :data:`BLOCK_BYTES`) and multiplies it while it is in cache, so memory traffic is
  the 2-bit codes. (XLA:CPU does not fuse the unpacking into a reduction: with YNNPACK's reductions,
  jaxlib 0.10's default, or with its own tree reduction, the unpacked kernel is materialized.) The
  same values as the reference product, summed in another order. Columns in no block size: the reference.
  """
  m, k = x.shape
  k4, n = packed.shape
  columns = column_block(k, n)
  if columns is None:
    return ternary_matmul_reference(x, packed, scale, neg_scale)
  pos = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (n,))
  neg = pos if neg_scale is None else jnp.broadcast_to(jnp.asarray(neg_scale, jnp.float32), (n,))

  def block(i, y):
    first = i * columns
    w = dequantize_planar(jax.lax.dynamic_slice_in_dim(packed, first, columns, axis=1),
                          jax.lax.dynamic_slice_in_dim(pos, first, columns),
                          jax.lax.dynamic_slice_in_dim(neg, first, columns), (k, columns), jnp.float32)
    return jax.lax.dynamic_update_slice_in_dim(y, jnp.dot(x.astype(jnp.float32), w), first, axis=1)

  y = jax.lax.fori_loop(0, n // columns, block, jnp.zeros((m, n), jnp.float32))
  return y.astype(x.dtype)


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
