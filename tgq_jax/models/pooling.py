"""Max pooling whose gradient is cheap on XLA:CPU.

``flax.linen.max_pool``'s gradient is XLA's ``select-and-scatter``, which XLA:CPU
expands into iotas, window reductions and a scatter. Measured on 2 cores (three
runs, ``jax.vjp`` of the pool alone): ResNet-18's 3x3/2 stem pool (batch 8,
112x112x64) 116-143 ms backward against 7-9 ms forward, 51-55 ms with this module;
the demo CNN's first 2x2 pool (batch 128, 28x28x16) 16-35 ms, 1.3-1.8 ms with it.
Before it, the demo CNN's pools cost more than its convolutions.

:func:`max_pool` has flax's forward (``lax.reduce_window``) and, when JAX's
default backend is the CPU, its own JVP: the output tangent is the input tangent
at each window's *first* maximum (row-major order), gathered by contiguous
slices of the input's stride phases. Its transpose, which reverse mode derives,
is select-and-scatter's rule (the first maximum takes the window's whole
gradient, as in PyTorch) made of pads, adds and one concatenation, which XLA
fuses. Gradients equal XLA's bit for bit where windows do not overlap, and up to
the order of a sum where they do; forward mode works as well. With another
default backend, flax's own JVP is used.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]


def max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: Padding = "VALID") -> jax.Array:
  """``flax.linen.max_pool`` (inputs ``(batch, *spatial, features)``) with a CPU-friendly derivative."""
  window_shape = tuple(window_shape)
  strides = tuple(strides) if strides is not None else (1,) * len(window_shape)
  if x.ndim != len(window_shape) + 2:
    raise ValueError(f"max_pool: input of shape {x.shape} needs {len(window_shape) + 2} dimensions "
                     f"(batch, {len(window_shape)} spatial, features) for window {window_shape}")
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(x.shape[1:-1], window_shape, strides, padding)
  else:
    pads = padding
  return _max_pool(x, window_shape, strides, tuple((int(lo), int(hi)) for lo, hi in pads))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window_shape, strides, pads):
  return nn.max_pool(x, window_shape, strides=strides, padding=pads)


@_max_pool.defjvp
def _max_pool_jvp(window_shape, strides, pads, primals, tangents):
  (x,), (t,) = primals, tangents
  if jax.default_backend() != "cpu":
    return jax.jvp(lambda x: nn.max_pool(x, window_shape, strides=strides, padding=pads), (x,), (t,))
  out = _max_pool(x, window_shape, strides, pads)
  fill = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  padded = lax.pad(x, jnp.asarray(fill, x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
  x_at = []  # strided slices: the tangent's phase split (below) made this primal part slower
  for offset in itertools.product(*(range(w) for w in window_shape)):
    limits = [o + (n - 1) * s + 1 for o, n, s in zip(offset, out.shape[1:-1], strides)]
    x_at.append(lax.slice(padded, (0, *offset, 0), (x.shape[0], *limits, x.shape[-1]), (1, *strides, 1)))
  t_at = _tangent_at_offsets(t, window_shape, strides, pads, out.shape[1:-1])
  # The offset of each window's first maximum (none for an all-NaN window): what select-and-scatter
  # picks with its `>=` select, and what PyTorch picks.
  first = jnp.full(out.shape, len(x_at), jnp.int32)
  for k in reversed(range(len(x_at))):
    first = jnp.where(x_at[k] == out, k, first)
  zero = jnp.zeros((), t.dtype)
  t_out = functools.reduce(lax.add, [jnp.where(first == k, t_k, zero) for k, t_k in enumerate(t_at)])
  return out, t_out


def _tangent_at_offsets(t, window_shape, strides, pads, out_spatial) -> list[jax.Array]:
  """For each window offset (row-major), the output-shaped array of the tangent at that offset
  (zero in the padding).

  The padded tangent is split into stride phases first (position ``q * stride + r``
  goes to phase ``r``, block ``q``), so each offset is a contiguous slice of one
  phase: the transposes reverse mode builds are then plain pads, not interior ones.
  """
  batch, features = t.shape[0], t.shape[-1]
  padded_sizes = [lo + n + hi for (lo, hi), n in zip(pads, t.shape[1:-1])]
  blocks = [-(-p // s) for p, s in zip(padded_sizes, strides)]
  padded = lax.pad(t, jnp.zeros((), t.dtype), [(0, 0, 0), *((lo, hi + q * s - p, 0) for (lo, hi), q, s, p in
                                                            zip(pads, blocks, strides, padded_sizes)), (0, 0, 0)])
  phased = padded.reshape(batch, *itertools.chain.from_iterable(zip(blocks, strides)), features)
  # Phase r: (batch, *blocks, features). lax.split, whose transpose is a concatenation: reverse mode
  # adds the offsets' gradients at phase size and interleaves the phases once.
  phases = {(): phased}
  for dim, s in enumerate(strides):
    axis = 2 + dim  # this dimension's stride axis, the earlier ones squeezed away
    phases = {r + (i,): lax.squeeze(piece, (axis,)) for r, arr in phases.items()
              for i, piece in enumerate(lax.split(arr, (1,) * s, axis))}
  out = []
  for offset in itertools.product(*(range(w) for w in window_shape)):
    phase = phases[tuple(o % s for o, s in zip(offset, strides))]
    start = [o // s for o, s in zip(offset, strides)]
    out.append(lax.slice(phase, (0, *start, 0), (batch, *(b + n for b, n in zip(start, out_spatial)), features)))
  return out
