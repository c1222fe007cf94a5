"""tgq_jax.core.packing: the planar 2-bit layout, the rebuilt kernel (per-channel scales on any axes) and the
input dependence that schedules the rebuild, against independent numpy expectations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax.core import packing
from tgq_jax.core.ternarize import init_params, ternarize, ternary_parts


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 2), (7, 3), (3, 3, 5, 6), (130, 17)])
def test_planar_round_trip_and_kernel_rebuild(shape):
  rng = np.random.default_rng(sum(shape))
  codes = rng.integers(-1, 2, size=shape).astype(np.int8)
  packed = packing.pack_planar(codes)
  assert packed.dtype == np.uint8 and packed.shape == packing.planar_shape(shape)
  np.testing.assert_array_equal(packing.unpack_planar(packed, shape), codes)
  scale = rng.uniform(0.1, 1, size=(shape[-1],)).astype(np.float32)
  kernel = packing.dequantize_planar(jnp.asarray(packed), scale, jnp.float32(0.3), shape)
  want = np.where(codes > 0, scale, np.where(codes < 0, -np.float32(0.3), 0)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(kernel), want)


def test_planar_bit_layout_is_the_documented_one():
  # K = 5 rows -> K4 = 2; row k in plane k // 2 at packed row k % 2; 01 = +1, 10 = -1.
  codes = np.array([[1], [-1], [0], [1], [-1]], np.int8)
  assert packing.pack_planar(codes)[:, 0].tolist() == [0b00_10_00_01, 0b00_00_01_10]
  with pytest.raises(ValueError, match="codes must be in"):
    packing.pack_planar(np.array([[2]]))



@pytest.mark.parametrize("shape, axes", [((6, 2, 3), (1, 2)), ((2, 4, 3), (0, 2)), ((5, 4), (1,)), ((3, 3, 2, 4), ())])
def test_packed_kernel_is_the_ternarized_kernel_for_any_output_axes(shape, axes):
  """codes + per-channel scale (DenseGeneral heads x head_dim, Einsum h..f) rebuild ternarize(w) exactly."""
  w = jax.random.normal(jax.random.key(sum(shape)), shape)
  params = init_params(w, per_channel=axes)
  parts = ternary_parts(w, params, per_channel=axes)
  codes = packing.pack_planar(np.asarray(parts.codes))
  got = packing.packed_kernel(jnp.asarray(codes), parts.scale, None, shape, axes, jnp.float32)
  # Independent: int8 codes times the scale broadcast over the kept axes, by numpy.
  keep = tuple(shape[i] if i in axes else 1 for i in range(len(shape)))
  want = np.asarray(parts.codes, np.float32) * np.reshape(np.asarray(parts.scale), keep)
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ternarize(w, params, per_channel=axes)), rtol=1e-6)


def test_after_input_keeps_the_codes_for_any_input_value():
  codes = jnp.asarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
  for x in (jnp.ones((2, 3)), jnp.full((2, 3), -0.0), jnp.full((2, 3), jnp.inf), jnp.full((1,), jnp.nan)):
    np.testing.assert_array_equal(np.asarray(jax.jit(packing.after_input)(codes, x)), np.asarray(codes))
  assert packing.after_input(codes, None) is codes
  # The dependence is there: the jitted rebuild reads the input.
  jaxpr = str(jax.make_jaxpr(packing.after_input)(codes, jnp.ones((2, 3))))
  assert "or" in jaxpr and "mul" in jaxpr
