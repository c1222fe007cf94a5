"""tgq_jax.kernels.ternary_matmul: the Pallas kernel (interpreter) vs the dense path.

The planar layout itself: tests/core/test_packing.py.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax.core.packing import pack_planar
from tgq_jax.core import packing
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


@pytest.mark.parametrize("m,k,n,per_channel,symmetric,blocks", [
  (1, 64, 32, False, True, {}), (17, 130, 40, False, False, {}),
  # several blocks along every grid axis: M 40 / 16, N 300 -> 384 / 128, K4 275 -> 384 / 128 (3 reduction steps)
  (40, 1100, 300, True, True, dict(block_m=16, block_n=128, block_k=128)),
  (40, 1100, 300, False, False, dict(block_m=16, block_n=128, block_k=128))])
def test_mosaic_tpu_kernel_matches_the_dense_path_in_interpret_mode(m, k, n, per_channel, symmetric, blocks):
  x, packed, scale, neg = _case(m, k, n, per_channel, symmetric)
  want = tm.ternary_matmul_reference(x, packed, scale, neg, precision=jax.lax.Precision.HIGHEST)
  got = tm.ternary_matmul(x, packed, scale, neg, kernel="mosaic_tpu", interpret=True, **blocks)
  assert got.shape == (m, n) and got.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("kernel", ["triton", "mosaic_tpu"])
def test_pallas_kernel_bfloat16_accumulates_in_float32(kernel):
  x, packed, scale, _ = _case(16, 512, 64, True, True, dtype=jnp.bfloat16, seed=1)
  want = np.asarray(tm.ternary_matmul_reference(x.astype(jnp.float32), packed, scale))
  got = np.asarray(tm.ternary_matmul(x, packed, scale, kernel=kernel, interpret=True), np.float32)
  assert np.max(np.abs(got - want)) <= 2 ** -7 * np.max(np.abs(want))  # bf16 output rounding only


def test_kernel_block_shapes_are_checked_per_compiler():
  x, packed, scale, _ = _case(4, 64, 32, False, True)
  with pytest.raises(ValueError, match=r"Mosaic TPU.*block_n=64 must be a positive multiple of 128"):
    tm.ternary_matmul(x, packed, scale, kernel="mosaic_tpu", block_n=64, interpret=True)
  with pytest.raises(ValueError, match=r"Triton.*block_k=48 must be a power of two"):
    tm.ternary_matmul(x, packed, scale, kernel="triton", block_k=48, interpret=True)
  with pytest.raises(ValueError, match="kernel must be one of"):
    tm.ternary_matmul(x, packed, scale, kernel="cuda")
  with pytest.raises(ValueError, match="packed codes are uint8"):
    tm.ternary_matmul(x, packed.astype(jnp.int8), scale)


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


def test_auto_mode_uses_the_kernel_only_for_few_rows_on_an_accelerator():
  """Lowered for cuda and tpu (from this CPU host), "auto" puts the kernel in for at most AUTO_MAX_ROWS rows."""
  for platform, target in tm.CUSTOM_CALL_TARGETS.items():
    has_kernel = []
    for rows in (1, tm.AUTO_MAX_ROWS, tm.AUTO_MAX_ROWS + 1, 64):
      x, packed, scale, neg = _case(rows, 16, 4, False, True)
      exported = jax.export.export(jax.jit(tm.ternary_dense), platforms=[platform],
                                   disabled_checks=tm.export_disabled_checks([platform]))(x, packed, scale, neg)
      has_kernel.append(target in exported.mlir_module())
    assert has_kernel == [True, True, False, False], platform


def test_the_mode_is_part_of_the_jit_cache_key():
  """A jitted function traced under one mode is traced again under another (not silently reused)."""
  x, packed, scale, _ = _case(2, 24, 6, False, True)
  traced = []

  @jax.jit
  def f(x):
    traced.append(tm.pallas_mode())
    return tm.ternary_dense(x, packed, scale)

  assert tm.pallas_mode() == "auto"
  auto = f(x)
  tm.set_pallas_mode("off")  # the process-wide setting is part of the key
  try:
    off = f(x)
  finally:
    tm.set_pallas_mode("auto")
  with tm.use_pallas("interpret"):  # and so is the with-block's
    interpreted = f(x)
  with tm.use_pallas("off"):
    f(x)
  f(x)
  assert traced == ["auto", "off", "interpret"]
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(off))  # on CPU "auto" takes the plain-JAX path
  np.testing.assert_allclose(np.asarray(interpreted), np.asarray(off), atol=1e-5 * float(jnp.max(jnp.abs(off))))


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_kernel_path_differentiates_as_the_plain_jax_product(symmetric):
  """Gradients through ternary_dense's kernel path (here its CPU branch, under "auto") for x and the scales."""
  x, packed, scale, neg = _case(3, 40, 7, True, symmetric, seed=2)
  neg = None if symmetric else jnp.full((7,), 0.37, jnp.float32)
  cotangent = jnp.asarray(np.random.default_rng(3).normal(size=(3, 7)), jnp.float32)

  def loss(fn):
    return lambda x, s, n: jnp.sum(cotangent * fn(x, packed, s, n))

  argnums = (0, 1) if symmetric else (0, 1, 2)
  got = jax.jit(jax.grad(loss(tm.ternary_dense), argnums))(x, scale, neg)
  want = jax.grad(loss(tm.ternary_matmul_reference), argnums)(x, scale, neg)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
  # and the closed form for x: cotangent @ W^T
  w_dense = packing.dequantize_planar(packed, scale, neg, (40, 7))
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(cotangent @ w_dense.T), rtol=1e-5, atol=1e-5)


def test_the_kernel_path_runs_eagerly_and_under_vmap():
  """Outside jit and under vmap (the activations batched) the kernel path gives the plain-JAX values."""
  x, packed, scale, neg = _case(6, 40, 7, True, False, seed=4)
  with tm.use_pallas("off"):
    want = np.asarray(tm.ternary_dense(x, packed, scale, neg))
  np.testing.assert_allclose(np.asarray(tm.ternary_dense(x, packed, scale, neg)), want, rtol=1e-6, atol=1e-6)
  batched = jax.vmap(lambda row: tm.ternary_dense(row[None], packed, scale, neg)[0])(x)
  np.testing.assert_allclose(np.asarray(batched), want, rtol=1e-6, atol=1e-6)
  with pytest.raises(NotImplementedError, match="only the activations may be batched"):
    jax.vmap(lambda s: tm.ternary_dense(x[:1], packed, s, neg))(jnp.stack([scale, scale]))


def test_column_blocks_fit_half_the_l2_cache():
  assert tm.column_block(1024, 2816) == 128 and tm.column_block(256, 768) == 256 and tm.column_block(64, 1024) == 512
  assert tm.column_block(8192, 256) == 128  # none fits: the narrowest
  assert tm.column_block(64, 100) is None


@pytest.mark.parametrize("k,n,per_channel,symmetric", [
  (1024, 640, True, True), (130, 384, False, False), (64, 100, True, True)])
def test_blocked_decode_product_equals_the_rebuilt_kernel_product(k, n, per_channel, symmetric):
  x, packed, scale, neg = _case(1, k, n, per_channel, symmetric)
  want = tm.ternary_matmul_reference(x, packed, scale, neg, precision=jax.lax.Precision.HIGHEST)
  got = jax.jit(tm.ternary_matmul_blocked)(x, packed, scale, neg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  # One row through ternary_dense on CPU ("auto") takes the blocked product; more rows the rebuilt kernel.
  np.testing.assert_allclose(np.asarray(jax.jit(tm.ternary_dense)(x, packed, scale, neg)), np.asarray(got),
                             rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(want))))


def test_one_row_never_materializes_the_float_kernel():
  """The compiled batch-1 product holds at most a (K, block) float32 block, never the (K, N) kernel."""
  k, n = 1024, 2816
  x, packed, scale, _ = _case(1, k, n, True, True)
  one_row = jax.jit(tm.ternary_dense).lower(x, packed, scale).compile().as_text()
  assert f"f32[{k},{n}]" not in one_row and f"f32[{k},128]" in one_row
  rows, _, _, _ = _case(tm.AUTO_MAX_ROWS + 1, k, n, True, True)
  assert f"f32[{k},{n}]" in jax.jit(tm.ternary_dense).lower(rows, packed, scale).compile().as_text()
