"""tgq_jax.kernels.ternary_matmul: the Pallas kernel (interpreter) vs the dense path.

The planar layout itself: tests/core/test_packing.py.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax.core.packing import pack_planar
from tgq_jax.kernels import ternary_matmul as tm


def _case(m, k, n, per_channel, symmetric, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  codes = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
  scale = jnp.asarray(rng.uniform(0.1, 1, size=(n,) if per_channel else ()), jnp.float32)
  neg = None if symmetric else jnp.float32(0.37)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  return x, jnp.asarray(pack_planar(codes)), scale, neg


@pytest.mark.parametrize("m,k,n,per_channel,symmetric", [
  (1, 64, 32, False, True), (3, 37, 20, True, True), (17, 130, 40, False, False), (5, 256, 130, True, True)])
def test_pallas_kernel_matches_the_dense_path_in_interpret_mode(m, k, n, per_channel, symmetric):
  x, packed, scale, neg = _case(m, k, n, per_channel, symmetric)
  want = tm.ternary_matmul_reference(x, packed, scale, neg, precision=jax.lax.Precision.HIGHEST)
  got = tm.ternary_matmul(x, packed, scale, neg, interpret=True, block_k=16)
  assert got.shape == (m, n) and got.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_pallas_kernel_bfloat16_accumulates_in_float32():
  x, packed, scale, _ = _case(16, 512, 64, True, True, dtype=jnp.bfloat16, seed=1)
  want = np.asarray(tm.ternary_matmul_reference(x.astype(jnp.float32), packed, scale))
  got = np.asarray(tm.ternary_matmul(x, packed, scale, interpret=True), np.float32)
  assert np.max(np.abs(got - want)) <= 2 ** -7 * np.max(np.abs(want))  # bf16 output rounding only


def test_ternary_dense_dispatch_modes():
  x, packed, scale, neg = _case(2, 3 * 8, 6, False, False)
  x = x.reshape(2, 1, 24)  # leading axes are kept
  with tm.use_pallas("off"):
    dense = tm.ternary_dense(x, packed, scale, neg)
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(tm.ternary_matmul_reference(x, packed, scale, neg)))
  with tm.use_pallas("interpret"):
    kernel = tm.ternary_dense(x, packed, scale, neg)
  assert kernel.shape == (2, 1, 6)
  np.testing.assert_allclose(np.asarray(kernel), np.asarray(dense), atol=1e-5 * float(jnp.max(jnp.abs(dense))))
  assert tm.pallas_mode() == "auto"
  with pytest.raises(ValueError, match="pallas mode"):
    tm.set_pallas_mode("fast")


def test_auto_mode_uses_the_kernel_only_for_few_rows_on_an_accelerator(monkeypatch):
  calls = []
  monkeypatch.setattr(tm.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(tm, "ternary_matmul", lambda x, *a, **k: calls.append(x.shape[0]) or
                      tm.ternary_matmul_reference(x, *a[:3]))
  for rows in (1, tm.AUTO_MAX_ROWS, tm.AUTO_MAX_ROWS + 1, 64):
    x, packed, scale, neg = _case(rows, 16, 4, False, True)
    tm.ternary_dense(x, packed, scale, neg)
  assert calls == [1, tm.AUTO_MAX_ROWS]
