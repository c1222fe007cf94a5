"""tgq_jax.models.pooling.max_pool: flax's forward, select-and-scatter's gradient (first maximum wins)."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax.models.pooling import max_pool

CASES = [  # shape, window, strides, padding
  ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),
  ((2, 7, 7, 3), (2, 2), (2, 2), "VALID"),  # odd size: the last row and column are dropped
  ((2, 9, 9, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool
  ((2, 6, 5, 2), (3, 2), (1, 2), "SAME"),
  ((3, 10, 4), (3,), (2,), "VALID"),  # 1-D
]


def reference_grad(x, window, strides, pads, g):
  """select-and-scatter by loops: each window's first maximum (row-major) takes that window's gradient."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  padded = np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=-np.inf)
  out = np.zeros_like(padded)
  for n, c in itertools.product(range(x.shape[0]), range(x.shape[-1])):
    for o in itertools.product(*(range(k) for k in g.shape[1:-1])):
      starts = [i * s for i, s in zip(o, strides)]
      cells = list(itertools.product(*(range(st, st + w) for st, w in zip(starts, window))))
      values = [padded[(n, *cell, c)] for cell in cells]
      out[(n, *cells[int(np.argmax(values))], c)] += g[(n, *o, c)]
  crop = tuple(slice(lo, lo + size) for (lo, _), size in zip(pads, x.shape[1:-1]))
  return out[(slice(None), *crop, slice(None))]


def explicit_pads(x, window, strides, padding):
  if isinstance(padding, str):
    return jax.lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
  return padding


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_forward_is_flax_and_gradient_goes_to_the_first_maximum(shape, window, strides, padding):
  rng = np.random.default_rng(0)
  # Rounded to quarters and ReLU'd: many exact ties, inside and across windows, as after a ReLU.
  x = jnp.asarray(np.maximum(np.round(rng.normal(size=shape) * 4) / 4, 0), jnp.float32)
  ours = jax.jit(lambda x: max_pool(x, window, strides, padding))
  np.testing.assert_array_equal(ours(x), nn.max_pool(x, window, strides=strides, padding=padding))
  g = jnp.asarray(rng.normal(size=ours(x).shape), jnp.float32)
  grad = jax.jit(lambda x, g: jax.vjp(ours, x)[1](g)[0])(x, g)
  expected = reference_grad(x, window, strides, explicit_pads(x, window, strides, padding), g)
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)
  # Non-overlapping windows: the same bits as XLA's own select-and-scatter.
  if all(w <= s for w, s in zip(window, strides)):
    native = jax.jit(lambda x, g: jax.vjp(lambda x: nn.max_pool(x, window, strides, padding), x)[1](g)[0])
    np.testing.assert_array_equal(grad, native(x, g))


def test_gradient_in_bfloat16():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 4)), jnp.bfloat16)
  grad = jax.grad(lambda x: jnp.sum(max_pool(x, (2, 2), (2, 2)).astype(jnp.float32) ** 2))(x)
  assert grad.dtype == jnp.bfloat16
  native = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2)).astype(jnp.float32) ** 2))(x)
  np.testing.assert_array_equal(grad, native)


def test_wrong_rank_is_one_clear_error():
  with pytest.raises(ValueError, match=r"needs 4 dimensions \(batch, 2 spatial, features\)"):
    max_pool(jnp.zeros((8, 8, 3)), (2, 2), (2, 2))


def test_forward_mode_picks_the_first_maximum_too():
  x = jnp.asarray([[[[1.0], [3.0], [3.0], [0.0]]]])  # (1, 1, 4, 1): a tie in the first window
  t = jnp.asarray([[[[10.0], [20.0], [30.0], [40.0]]]])
  out, t_out = jax.jvp(lambda x: max_pool(x, (1, 3), (1, 1)), (x,), (t,))
  np.testing.assert_array_equal(out.ravel(), [3.0, 3.0])
  np.testing.assert_array_equal(t_out.ravel(), [20.0, 20.0])  # both windows: the first 3.0 (position 1)
  # Forward over reverse (a Hessian-vector product) runs, and the pool is piecewise linear: zero.
  hvp = jax.jvp(jax.grad(lambda x: jnp.sum(max_pool(x, (1, 3), (1, 1)))), (x,), (t,))[1]
  np.testing.assert_array_equal(hvp, jnp.zeros_like(x))
