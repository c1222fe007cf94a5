"""BitNet b1.58's activation quantization (tgq_jax.core.activations) against its published closed form in numpy;
the straight-through gradient; the axes each layer contracts; QuantPolicy.activation_bits / embeddings as data."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax.core.activations import (einsum_input_axes, general_input_axes, quantize_activations,
                                      quantize_layer_input)
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.models.spec import ModelSpec, policy_from_dict
from tgq_jax.training.configs import Config


def numpy_absmax(x: np.ndarray, bits: int, axes) -> np.ndarray:
  """BitNet b1.58's activation_quant, written from the paper's code in numpy (float64)."""
  x = np.asarray(x, np.float64)
  top = 2 ** (bits - 1)
  scale = (top - 1) / np.clip(np.max(np.abs(x), axis=axes, keepdims=True), 1e-5, None)
  return np.clip(np.round(x * scale), -top, top - 1) / scale


@pytest.mark.parametrize("shape, axes", [
  ((4, 5, 16), (-1,)),  # Dense: per token
  ((3, 6, 2, 8), (-2, -1)),  # DenseGeneral(axis=(-2, -1)): one scale per token over both contracted axes
  ((2, 5, 5, 3), (-1,)),  # Conv NHWC: per pixel, over the channels
])
@pytest.mark.parametrize("bits", [8, 4])
def test_closed_form_per_token(shape, axes, bits):
  x = np.random.default_rng(bits).normal(size=shape).astype(np.float32) * np.linspace(0.1, 10, shape[0]).reshape(
    (-1,) + (1,) * (len(shape) - 1))
  y = np.asarray(quantize_activations(jnp.asarray(x), bits, axes))
  want = numpy_absmax(x, bits, axes)
  np.testing.assert_allclose(y, want, rtol=2e-6, atol=1e-7)
  # Independent facts: each token's largest magnitude is kept exactly up to rounding (code 2**(bits-1) - 1),
  # and the values are integers times one scale per token, at most 2**bits levels.
  top = 2 ** (bits - 1) - 1
  absmax = np.max(np.abs(x), axis=axes, keepdims=True)
  codes = y * top / absmax
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
  assert np.abs(np.round(codes)).max() == top
  np.testing.assert_allclose(np.max(np.abs(y), axis=axes, keepdims=True), absmax, rtol=1e-6)
  assert np.abs(y - x).max() <= absmax.max() / top / 2 * (1 + 1e-5)  # round to nearest
  assert not np.allclose(y, x)


def test_straight_through_gradient_is_the_identity():
  x = jax.random.normal(jax.random.key(0), (3, 7, 5))
  c = jax.random.normal(jax.random.key(1), x.shape)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(quantize_activations(x, 8, -1)))(x), np.ones(x.shape))
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(c * quantize_activations(x, 8, (-2, -1))))(x), c)


def test_zero_tokens_non_finite_tokens_and_dtypes():
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  x[0] = 0.0
  x[1, 2] = np.nan
  x[2, 3] = np.inf
  y = np.asarray(quantize_activations(jnp.asarray(x), 8))
  np.testing.assert_array_equal(y[0], 0.0)  # an all-zero token stays zero (the 1e-5 floor), not NaN
  assert np.isnan(y[1]).all() and np.isnan(y[2]).all()  # non-finite tokens are not hidden
  np.testing.assert_allclose(y[3], numpy_absmax(x[3], 8, -1), rtol=2e-6)  # other tokens are untouched by them
  bf = jnp.asarray(x[3:], jnp.bfloat16)
  y_bf = quantize_activations(bf, 8)
  assert y_bf.dtype == jnp.bfloat16
  # bf16 input: the arithmetic in float32 on the bf16 values, then the result rounded to bf16 once.
  np.testing.assert_array_equal(np.asarray(y_bf, np.float32),
                                np.asarray(jnp.asarray(numpy_absmax(np.asarray(bf, np.float32), 8, -1), jnp.bfloat16),
                                           np.float32))
  with jax.enable_x64(True):
    x64 = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9)))
    y64 = quantize_activations(x64, 8)
    assert y64.dtype == jnp.float64
    np.testing.assert_allclose(y64, numpy_absmax(np.asarray(x64), 8, -1), rtol=1e-14)


def test_layer_input_and_axes_helpers():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 4)), jnp.float32)
  args, kwargs = quantize_layer_input((x, "s"), {}, 8, (-1,))
  np.testing.assert_array_equal(args[0], quantize_activations(x, 8, -1))
  assert args[1] == "s"
  args, kwargs = quantize_layer_input((), {"inputs": x}, 8, (-1,))
  np.testing.assert_array_equal(kwargs["inputs"], quantize_activations(x, 8, -1))
  assert quantize_layer_input((x,), {}, None, (-1,))[0][0] is x
  assert general_input_axes(-1) == (-1,) and general_input_axes((1, 2)) == (1, 2)
  assert einsum_input_axes("btd,dh->bth") == (2,)
  assert einsum_input_axes("bdt,dh->bth") == (1,)  # the contracted axis need not be the last
  assert einsum_input_axes("btnh,nhd->btd") == (2, 3)
  assert einsum_input_axes("...nh,nhd->...d") == (-2, -1)  # after '...': counted from the end
  assert einsum_input_axes("d...,dh->...h") == (0,)
  for unclear in ("btd,dh", "btd->bt", "a,b,c->abc", "bii,ih->bh", "bt,hk->bthk", None):
    assert einsum_input_axes(unclear) == (-1,), unclear  # the string does not say: the last axis


@pytest.mark.parametrize("bits", [1, 17, 0, -8, 8.0, True, "8"])
def test_invalid_bits_are_one_line_errors(bits):
  for make in (lambda: QuantPolicy(activation_bits=bits), lambda: quantize_activations(jnp.ones(3), bits)):
    with pytest.raises(ValueError) as err:
      make()
    assert "\n" not in str(err.value) and "integer in [2, 16]" in str(err.value)
  with pytest.raises(ValueError, match="QuantPolicy.embeddings must be True or False"):
    QuantPolicy(embeddings="yes")


def test_policy_json_round_trip_and_strict_parsing():
  policy = QuantPolicy("absmean", activation_bits=8, embeddings=True, ternary_last=False)
  d = json.loads(json.dumps(policy.to_dict()))
  assert d["activation_bits"] == 8 and d["embeddings"] is True
  assert policy_from_dict(d) == policy == QuantPolicy.from_dict(d)
  spec = ModelSpec("small_cnn", 10, policy)
  assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  old = {k: v for k, v in QuantPolicy().to_dict().items() if k not in ("activation_bits", "embeddings")}
  assert policy_from_dict(old) == QuantPolicy()  # files written before these fields: full precision, no embeddings
  for key, bad in (("activation_bits", "8"), ("activation_bits", 8.0), ("embeddings", 1), ("embeddings", None)):
    with pytest.raises(ValueError, match=f"policy.{key}"):
      policy_from_dict({**d, key: bad})
  with pytest.raises(ValueError, match="activation_bits must be None .* or an integer in \\[2, 16\\], got 99"):
    policy_from_dict({**d, "activation_bits": 99})


def test_config_passes_the_options_into_the_policy():
  policy = Config(activation_bits=8, ternary_embeddings=True, quantizer="absmean").policy()
  assert policy.activation_bits == 8 and policy.embeddings and policy.quantizer == "absmean"
  assert Config().policy().activation_bits is None and not Config().policy().embeddings
  with pytest.raises(ValueError, match=r"--activation-bits must be an integer in \[2, 16\] \(got 1\)"):
    Config(activation_bits=1).validate()
