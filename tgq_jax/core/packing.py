"""Ternary kernels as 2-bit planar codes: packing (host side) and the rebuilt kernel (traced).

Planar layout (the one packed layers hold, the ``.safetensors`` export stores
and the Pallas kernel of :mod:`tgq_jax.kernels.ternary_matmul` reads). A
kernel of shape ``(..., N)`` is seen as the matrix ``(K, N)``, ``K`` the
product of the leading axes (C order: a conv's HWIO kernel is the
``(H*W*I, O)`` matrix of its im2col product). With ``K4 = ceil(K / 4)``,
``packed`` is ``uint8 (K4, N)`` and the code of row ``k`` sits in the plane
``s = k // K4``::

    packed[r, n] bits 2s, 2s+1  =  code of W[s * K4 + r, n]      (s = 0, 1, 2, 3)

encoded ``00 = 0``, ``01 = +1``, ``10 = -1`` (``11`` is invalid); rows
``k >= K`` of the last plane are ``00``. Each plane is a contiguous quarter of
the rows, so a kernel can multiply plane ``s`` by the contiguous column range
``x[:, s*K4 : (s+1)*K4]`` with no shuffling of bits across lanes.

Depends on jax and numpy only (no framework).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tgq_jax.core.ternarize import PerChannel, channel_axes

__all__ = ["after_input", "dequantize_planar", "pack_planar", "packed_kernel", "planar_shape", "unpack_planar"]


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


def packed_kernel(codes: jax.Array, scale: jax.Array, neg_scale: jax.Array | None, shape: tuple[int, ...],
                  per_channel: PerChannel, dtype) -> jax.Array:
  """The float kernel of ``shape`` a packed layer computes with: the trained layer's ternary kernel.

  ``codes`` are planar over the kernel flattened to ``(prod(shape[:-1]), shape[-1])``;
  ``scale`` (and ``neg_scale``, None when symmetric) have the quantizer's
  statistic shape: a scalar, or the sizes of the ``per_channel`` axes.
  """
  axes = channel_axes(len(shape), per_channel)
  if axes in ((), (len(shape) - 1,)):
    return dequantize_planar(codes, scale, neg_scale, shape, dtype)
  # Output features on other axes (DenseGeneral heads x head_dim, Einsum): codes times the broadcast scale.
  keep = tuple(shape[i] if i in axes else 1 for i in range(len(shape)))
  unit = dequantize_planar(codes, jnp.ones((), dtype), None, shape, dtype)
  return unit * jnp.reshape(scale, keep).astype(dtype)


def after_input(codes: jax.Array, inputs: jax.Array | None) -> jax.Array:
  """``codes``, made to depend on the layer's ``inputs``: the kernel is then rebuilt just in time.

  Without a data dependence XLA schedules every layer's unpacking at the start
  of the forward pass and holds all float kernels at once (``optimization_barrier``
  does not prevent it on CPU). ``x * 0`` is +-0 or NaN, and both convert to the
  integer 0, so the codes are unchanged; XLA cannot fold a float ``x * 0``, so the
  dependence stays. ``inputs=None`` returns ``codes``.
  """
  if inputs is None:
    return codes
  first = jnp.reshape(inputs, (-1,))[0]
  return codes | (first * 0).astype(codes.dtype)
