"""Operands of the ternary matmul padded to whole blocks (shared by the per-platform kernels).

Both kernels see ``x`` as 4 planes of ``k4p`` columns (plane ``s`` multiplies the
bits ``2s, 2s+1`` of the packed codes, see :mod:`tgq_jax.kernels.ternary_matmul`),
the codes as ``uint8 (k4p, np_)`` and the scales as float32 rows ``(1, np_)``;
padding is zeros (code ``00`` = 0), so it adds nothing to the product.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(a: int, b: int) -> int:
  """The least multiple of ``b`` that is ``>= a``."""
  return -(-a // b) * b


def largest_dividing_block(size: int, unit: int, limit: int) -> int:
  """The largest multiple of ``unit`` that divides ``size`` (itself a multiple of ``unit``) and is ``<= limit``."""
  best = unit
  for block in range(unit, min(size, limit) + 1, unit):
    if size % block == 0:
      best = block
  return best


def pad_activations(x: jax.Array, k4: int, k4p: int, mp: int) -> jax.Array:
  """``x (M, K)`` as ``(mp, 4 * k4p)``: 4 planes of ``k4p`` columns, zeros beyond ``K`` and between planes."""
  m, k = x.shape
  xp = x if 4 * k4 == k else jnp.pad(x, ((0, 0), (0, 4 * k4 - k)))
  if k4p != k4:
    xp = jnp.pad(xp.reshape(m, 4, k4), ((0, 0), (0, 0), (0, k4p - k4))).reshape(m, 4 * k4p)
  return xp if mp == m else jnp.pad(xp, ((0, mp - m), (0, 0)))


def pad_codes(packed: jax.Array, k4p: int, np_: int) -> jax.Array:
  """The codes ``uint8 (K4, N)`` padded with ``00`` (code 0) to ``(k4p, np_)``."""
  k4, n = packed.shape
  return packed if (k4p, np_) == (k4, n) else jnp.pad(packed, ((0, k4p - k4), (0, np_ - n)))


def scale_row(scale: jax.Array, n: int, np_: int) -> jax.Array:
  """A scalar or per-column ``(N,)`` scale as the float32 row ``(1, np_)`` (zeros in the padding)."""
  row = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (n,))
  return (row if np_ == n else jnp.pad(row, (0, np_ - n))).reshape(1, np_)
