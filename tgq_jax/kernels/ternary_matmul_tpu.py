"""The ternary matmul as a Mosaic TPU kernel (Pallas, TPU).

Grid ``(M / bm, N / bn, K4p / bk4)``, the last axis the reduction ("arbitrary":
it runs in order on one core and accumulates in a float32 VMEM scratch; the
first two are "parallel"). Each step reads one ``(bk4, bn)`` block of packed
codes and the four ``(bm, bk4)`` blocks of ``x`` that its four planes multiply,
each an ordinary block of ``x`` (passed four times with four index maps), so
the kernel slices nothing itself and every block obeys Mosaic's tiling rule:
the last two block dimensions multiples of ``(8, 128)`` (``bm``, ``bk4`` and
``bn``) -- and of ``(32, 128)`` for the uint8 codes (``bk4`` is a multiple of
128). Codes are widened to int32 before the bit arithmetic (Mosaic's vector
units work on 32-bit lanes) and to float32 before the cast to ``x.dtype``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tgq_jax.kernels import blocks

#: Mosaic's native tile: block dims must be multiples of (SUBLANES, LANES) (16 sublanes: bf16's packed tile).
SUBLANES, LANES = 16, 128
#: Largest defaults: a (512, 512) code block is 256 KiB (double-buffered 512 KiB), far under VMEM's 16 MiB.
MAX_BLOCK_M, MAX_BLOCK_N, MAX_BLOCK_K = 256, 512, 512


def _kernel(x0_ref, x1_ref, x2_ref, x3_ref, c_ref, pos_ref, neg_ref, o_ref, *acc_refs, symmetric: bool, precision):
  """One (bm, bn) output block; one reduction step of ``bk4`` packed rows per grid step along axis 2."""
  from jax.experimental import pallas as pl

  step = pl.program_id(2)

  @pl.when(step == 0)
  def _init():
    for acc in acc_refs:
      acc[...] = jnp.zeros(acc.shape, jnp.float32)

  dot = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=jnp.float32)
  codes = c_ref[...].astype(jnp.int32)  # (bk4, bn): 4 planes of 2-bit codes
  for s, x_ref in enumerate((x0_ref, x1_ref, x2_ref, x3_ref)):
    xs = x_ref[...]
    two = (codes >> (2 * s)) & 3
    if symmetric:  # 01 -> +1, 10 -> -1
      t = (two & 1).astype(jnp.float32) - (two >> 1).astype(jnp.float32)
      acc_refs[0][...] += dot(xs, t.astype(xs.dtype))
    else:
      acc_refs[0][...] += dot(xs, (two == 1).astype(jnp.float32).astype(xs.dtype))
      acc_refs[1][...] += dot(xs, (two == 2).astype(jnp.float32).astype(xs.dtype))

  @pl.when(step == pl.num_programs(2) - 1)
  def _finish():
    out = acc_refs[0][...] * pos_ref[...]
    if not symmetric:
      out = out - acc_refs[1][...] * neg_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


def tpu_blocks(m: int, k4: int, n: int, block_m: int | None = None, block_n: int | None = None,
               block_k: int | None = None) -> tuple[int, int, int]:
  """``(bm, bn, bk4)`` for Mosaic: multiples of (16, 128, 128); by default the largest that divide the padded dims.

  Raises:
    ValueError: a given block size that Mosaic cannot tile.
  """
  for name, value, unit in (("block_m", block_m, SUBLANES), ("block_n", block_n, LANES), ("block_k", block_k, LANES)):
    if value is not None and (value <= 0 or value % unit):
      raise ValueError(f"ternary_matmul (Mosaic TPU): {name}={value} must be a positive multiple of {unit}.")
  bm = block_m or min(MAX_BLOCK_M, blocks.round_up(m, SUBLANES))
  bn = block_n or blocks.largest_dividing_block(blocks.round_up(n, LANES), LANES, MAX_BLOCK_N)
  bk4 = block_k or blocks.largest_dividing_block(blocks.round_up(k4, LANES), LANES, MAX_BLOCK_K)
  return bm, bn, bk4


def ternary_matmul_tpu(x: jax.Array, packed: jax.Array, scale: jax.Array, neg_scale: jax.Array | None, *,
                       block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                       precision=None, interpret=False) -> jax.Array:
  """``x (M, K) @ (scale * T)`` from planar codes ``uint8 (ceil(K/4), N)`` on a TPU; ``(M, N)`` in ``x.dtype``.

  ``block_k`` counts packed rows (each covers ``4 * block_k`` rows of ``W``).
  ``interpret``: run in the Pallas interpreter instead (any backend; for tests).
  Inputs are validated by :func:`tgq_jax.kernels.ternary_matmul.ternary_matmul`.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import tpu as pltpu

  m, _ = x.shape
  k4, n = packed.shape
  bm, bn, bk4 = tpu_blocks(m, k4, n, block_m, block_n, block_k)
  mp, np_, k4p = blocks.round_up(m, bm), blocks.round_up(n, bn), blocks.round_up(k4, bk4)
  xp = blocks.pad_activations(x, k4, k4p, mp)
  symmetric = neg_scale is None
  pos = blocks.scale_row(scale, n, np_)
  neg = pos if symmetric else blocks.scale_row(neg_scale, n, np_)
  nk = k4p // bk4

  def x_spec(s):
    return pl.BlockSpec((bm, bk4), lambda i, j, kk: (i, s * nk + kk))

  out = pl.pallas_call(
    functools.partial(_kernel, symmetric=symmetric, precision=precision),
    out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
    grid=(mp // bm, np_ // bn, nk),
    in_specs=[*(x_spec(s) for s in range(4)),
              pl.BlockSpec((bk4, bn), lambda i, j, kk: (kk, j)),
              pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
              pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))],
    out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
    scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32) for _ in range(1 if symmetric else 2)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret,
    name="ternary_matmul_tpu",
  )(xp, xp, xp, xp, blocks.pad_codes(packed, k4p, np_), pos, neg)
  return out[:m, :n] if (mp, np_) != (m, n) else out
