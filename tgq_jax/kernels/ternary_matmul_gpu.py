"""The ternary matmul as a Triton kernel (Pallas, NVIDIA GPUs).

Lowered by Pallas's Triton backend, named explicitly by its compiler parameters
(``pltriton.CompilerParams``): under jax 0.10 a ``pallas_call`` without them
lowers through Mosaic GPU, whose block copies (TMA, at most 256 elements a
dimension, staged in shared memory) and vector arithmetic (no 8-bit pointwise
operations) cannot take this kernel's whole-K blocks of uint8 codes. Triton
blocks are only pointers plus shapes: each program keeps one ``(bm, bn)``
output block and loops over the packed rows ``bk4`` at a time, loading the
matching code rows and the four column ranges of ``x`` its planes multiply.
Triton needs every block dimension a power of two.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tgq_jax.kernels import blocks


def _kernel(x_ref, c_ref, pos_ref, neg_ref, o_ref, *, k4p: int, bk4: int, symmetric: bool, precision):
  """One (bm, bn) output block; loops over the packed rows ``bk4`` at a time."""
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


def _power_of_two_at_least(a: int) -> int:
  return 1 << max(0, int(a) - 1).bit_length()


def gpu_blocks(m: int, k4: int, n: int, block_m: int | None = None, block_n: int | None = None,
               block_k: int | None = None) -> tuple[int, int, int]:
  """``(bm, bn, bk4)`` for Triton: powers of two, at least 16 (``tl.dot``'s smallest tile).

  Defaults: ``bm`` the power of two >= M (16 to 128); ``bn`` 64 for M <= 64, else
  128; ``bk4`` 64 for M <= 16, else 32 (the fastest of five configurations on an
  H200 at K = N = 4096, jax 0.7 timings); each capped at the padded dimension.

  Raises:
    ValueError: a given block size that is not a power of two >= 16.
  """
  for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    if value is not None and (value < 16 or value & (value - 1)):
      raise ValueError(f"ternary_matmul (Triton): {name}={value} must be a power of two >= 16.")
  bm = block_m or min(128, max(16, _power_of_two_at_least(m)))
  bn = min(block_n or (64 if m <= 64 else 128), max(16, _power_of_two_at_least(n)))
  bk4 = min(block_k or (64 if m <= 16 else 32), max(16, _power_of_two_at_least(k4)))
  return bm, bn, bk4


def ternary_matmul_gpu(x: jax.Array, packed: jax.Array, scale: jax.Array, neg_scale: jax.Array | None, *,
                       block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                       precision=None, num_warps: int | None = None, num_stages: int | None = None,
                       interpret=False) -> jax.Array:
  """``x (M, K) @ (scale * T)`` from planar codes ``uint8 (ceil(K/4), N)`` on an NVIDIA GPU; ``(M, N)`` in ``x.dtype``.

  ``num_warps``, ``num_stages``: Triton's (None: its defaults). ``interpret``: run
  in the Pallas interpreter instead (any backend; for tests). Inputs are validated
  by :func:`tgq_jax.kernels.ternary_matmul.ternary_matmul`.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton

  m, _ = x.shape
  k4, n = packed.shape
  bm, bn, bk4 = gpu_blocks(m, k4, n, block_m, block_n, block_k)
  mp, np_, k4p = blocks.round_up(m, bm), blocks.round_up(n, bn), blocks.round_up(k4, bk4)
  symmetric = neg_scale is None
  pos = blocks.scale_row(scale, n, np_)
  neg = pos if symmetric else blocks.scale_row(neg_scale, n, np_)
  out = pl.pallas_call(
    functools.partial(_kernel, k4p=k4p, bk4=bk4, symmetric=symmetric, precision=precision),
    out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
    grid=(mp // bm, np_ // bn),
    in_specs=[pl.BlockSpec((bm, 4 * k4p), lambda i, j: (i, 0)),
              pl.BlockSpec((k4p, bn), lambda i, j: (0, j)),
              pl.BlockSpec((1, bn), lambda i, j: (0, j)),
              pl.BlockSpec((1, bn), lambda i, j: (0, j))],
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
    name="ternary_matmul_gpu",
  )(blocks.pad_activations(x, k4, k4p, mp), blocks.pad_codes(packed, k4p, np_), pos, neg)
  return out[:m, :n] if (mp, np_) != (m, n) else out
