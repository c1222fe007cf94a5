"""QuantPolicy.activation_bits (BitNet's W1.58A8) in the Linen and NNX front ends: each quantized layer's input
quantized per token over the axes it contracts, checked against a network that quantizes by hand; Linen = NNX;
the threshold gradient against finite differences; the threshold pass and the packed form compute the same."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import tgq_jax
import tgq_jax.frontends.nnx as tnnx
from tgq_jax import QuantPolicy, ternarize
from tgq_jax.core.kernel import THRESHOLD_PASS
from tgq_jax.frontends.linen import with_mode
from tgq_jax.frontends.linen_layers import TernaryConv, TernaryDense


def by_hand(x, axes, bits: int = 8):
  """The published formula (no straight-through trick: only values are compared here)."""
  top = 2.0 ** (bits - 1)
  s = (top - 1) / jnp.maximum(jnp.max(jnp.abs(x), axis=axes, keepdims=True), 1e-5)
  return jnp.clip(jnp.round(x * s), -top, top - 1) / s


class Net(nn.Module):
  """Conv, DenseGeneral over two axes, an Einsum contracting a middle axis, Dense. ``act(x, axes)``
  runs before each layer (the hand-quantized reference); ``plain_first``: not before the first."""

  act: Any = None
  plain_first: bool = False

  @nn.compact
  def __call__(self, x):  # (B, 6, 6, 2)
    q = self.act or (lambda x, axes: x)
    h = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x if self.plain_first else q(x, (-1,)))  # (B, 4, 4, 4)
    h = nn.relu(h).reshape(h.shape[0], 8, 2, 4)
    h = nn.DenseGeneral(6, axis=(-2, -1), name="general")(q(h, (-2, -1)))  # (B, 8, 6)
    h = jnp.swapaxes(nn.relu(h), 1, 2)  # (B, 6, 8): the einsum contracts axis 1
    h = nn.Einsum((6, 5), "bft,fk->btk", name="einsum")(q(h, (1,)))  # (B, 8, 5)
    return nn.Dense(3, name="head")(q(nn.relu(h), (-1,)))


X = jax.random.normal(jax.random.key(1), (2, 6, 6, 2)) * jnp.array([0.1, 3.0]).reshape(2, 1, 1, 1)


def hand_ternarized(params, skip=()):
  flat = traverse_util.flatten_dict(params)
  out = {}
  for key, value in flat.items():
    if key[-1] == "delta":
      continue
    if key[-1] == "kernel" and key[0] not in skip:
      value = ternarize(value, {"delta": flat[(*key[:-1], "delta")]})
    out[key] = value
  return traverse_util.unflatten_dict(out)


def test_linen_every_quantized_layer_input_is_quantized_over_its_contracted_axes():
  model = tgq_jax.ternarize_model(Net(), QuantPolicy("tga", activation_bits=8))
  variables = model.init(jax.random.key(0), X)
  y = model.apply(variables, X)
  plain = hand_ternarized(variables["params"])
  want = Net(act=by_hand).apply({"params": plain}, X)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  # The test can tell: without A8, or with every scale over the last axis only, the output is another.
  assert not np.allclose(Net().apply({"params": plain}, X), want, rtol=1e-3, atol=1e-4)
  last_axis = Net(act=lambda x, axes: by_hand(x, -1)).apply({"params": plain}, X)
  assert not np.allclose(last_axis, want, rtol=1e-3, atol=1e-4)
  # jit, and 4 bits
  np.testing.assert_allclose(jax.jit(model.apply)(variables, X), want, rtol=1e-5, atol=1e-6)
  y4 = tgq_jax.ternarize_model(Net(), QuantPolicy("tga", activation_bits=4)).apply(variables, X)
  np.testing.assert_allclose(y4, Net(act=lambda x, a: by_hand(x, a, 4)).apply({"params": plain}, X),
                             rtol=1e-5, atol=1e-6)


def test_linen_first_last_rule_and_fp_weights():
  model = tgq_jax.ternarize_model(Net(), QuantPolicy("tga", activation_bits=8, ternary_first=False))
  variables = model.init(jax.random.key(0), X)
  assert "delta" not in variables["params"]["conv"]
  want = Net(act=by_hand, plain_first=True).apply({"params": hand_ternarized(variables["params"], {"conv"})}, X)
  np.testing.assert_allclose(model.apply(variables, X), want, rtol=1e-5, atol=1e-6)
  # "fp" weights with A8 (W32A8): the activations alone are quantized, at every selected layer.
  fp = tgq_jax.ternarize_model(Net(), QuantPolicy("fp", activation_bits=8))
  fp_vars = fp.init(jax.random.key(0), X)
  np.testing.assert_allclose(fp.apply(fp_vars, X), Net(act=by_hand).apply(fp_vars, X), rtol=1e-5, atol=1e-6)


def test_explicit_ternary_layers_take_activation_bits():
  x = jax.random.normal(jax.random.key(2), (3, 5, 5, 4))
  for layer, plain in ((TernaryDense(3, activation_bits=8), nn.Dense(3)),
                       (TernaryConv(2, (3, 3), activation_bits=8), nn.Conv(2, (3, 3)))):
    v = layer.init(jax.random.key(0), x)
    p = v["params"]
    want = plain.apply({"params": {"kernel": ternarize(p["kernel"], {"delta": p["delta"]}), "bias": p["bias"]}},
                       by_hand(x, -1))
    np.testing.assert_allclose(layer.apply(v, x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(with_mode(layer, THRESHOLD_PASS).apply(v, x), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"TernaryDense.activation_bits must be .* \[2, 16\], got 1\.$"):
    TernaryDense(3, activation_bits=1)


# --- Linen and NNX: the same model computes the same ---------------------------------


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):  # (B, T, 4)
    h = nn.relu(nn.Dense(8, name="hidden")(x)).reshape(x.shape[0], x.shape[1], 2, 4)
    return nn.DenseGeneral(3, axis=(-2, -1), name="out")(h)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.out = nnx.LinearGeneral((2, 4), 3, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.hidden(x)).reshape(x.shape[0], x.shape[1], 2, 4)
    return self.out(h)


def nnx_twin(linen_params, policy):
  model = NnxMLP(nnx.Rngs(0))
  for name in ("hidden", "out"):
    getattr(model, name).kernel[...] = linen_params[name]["kernel"]
    getattr(model, name).bias[...] = linen_params[name]["bias"]
  model = tnnx.ternarize_model(model, policy)
  for name in ("hidden", "out"):
    getattr(model, name).delta[...] = linen_params[name]["delta"]
  return model


def nnx_grads(model, c, x):
  grads = nnx.grad(lambda m: jnp.sum(c * m(x)), argnums=nnx.DiffState(0, tnnx.TRAINABLE))(model)
  return traverse_util.flatten_dict(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("per_channel", [False, True])
def test_linen_and_nnx_give_equal_outputs_and_gradients(per_channel):
  policy = QuantPolicy("tga", activation_bits=8, per_channel=per_channel)
  x = jax.random.normal(jax.random.key(3), (2, 5, 4))
  c = jax.random.normal(jax.random.key(4), (2, 5, 3))
  linen_model = tgq_jax.ternarize_model(LinenMLP(), policy)
  params = linen_model.init(jax.random.key(0), x)["params"]
  model = nnx_twin(params, policy)
  y = linen_model.apply({"params": params}, x)
  np.testing.assert_allclose(model(x), y, rtol=1e-6, atol=1e-6)
  linen_grads = traverse_util.flatten_dict(jax.grad(
    lambda p: jnp.sum(c * linen_model.apply({"params": p}, x)))(params))
  grads = nnx_grads(model, c, x)
  assert set(grads) == set(linen_grads)
  for key in linen_grads:
    np.testing.assert_allclose(grads[key], linen_grads[key], rtol=1e-5, atol=1e-6, err_msg=str(key))
    assert np.any(linen_grads[key]), key
  # The threshold pass: the same output and threshold gradients, in both front ends.
  thr = traverse_util.flatten_dict(jax.grad(
    lambda p: jnp.sum(c * with_mode(linen_model, THRESHOLD_PASS).apply({"params": p}, x)))(params))
  thr_nnx = nnx_grads(tnnx.set_mode(model, THRESHOLD_PASS), c, x)
  np.testing.assert_allclose(model(x), y, rtol=1e-5, atol=1e-6)
  for key in linen_grads:
    if key[-1] == "delta":
      np.testing.assert_allclose(thr[key], linen_grads[key], rtol=1e-4, atol=1e-6, err_msg=str(key))
      np.testing.assert_allclose(thr_nnx[key], linen_grads[key], rtol=1e-4, atol=1e-6, err_msg=str(key))
  # Packed (NNX pack; the Linen packed form is the export's, tests/export): the same output as TRAIN.
  tnnx.set_mode(model, tnnx.TRAIN)
  tnnx.pack(model)
  np.testing.assert_allclose(model(x), y, rtol=1e-5, atol=1e-6)
  packed_linen = tgq_jax.ternarize_model(LinenMLP(), policy.as_packed())
  assert packed_linen.policy.activation_bits == 8


def test_nnx_first_last_rule_and_einsum_axes():
  class Stack(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.Linear(4, 6, rngs=rngs)
      self.mix = nnx.Einsum("bft,fk->btk", (6, 5), (5,), rngs=rngs)

    def __call__(self, x):  # (B, T, 4)
      return self.mix(jnp.swapaxes(self.first(x), 1, 2))

  x = jax.random.normal(jax.random.key(5), (2, 3, 4)) * jnp.array([0.1, 5.0]).reshape(2, 1, 1)
  model = tnnx.ternarize_model(Stack(nnx.Rngs(0)), QuantPolicy("tga", activation_bits=8, ternary_first=False), x)
  assert type(model.first) is nnx.Linear and model.mix.activation_bits == 8
  h = jnp.swapaxes(model.first(x), 1, 2)  # the first layer: full precision, its input as it is
  w = ternarize(model.mix.kernel[...], {"delta": model.mix.delta[...]})
  want = jnp.einsum("bft,fk->btk", by_hand(h, (1,)), w) + model.mix.bias[...]
  np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(model(x), jnp.einsum("bft,fk->btk", by_hand(h, -1), w) + model.mix.bias[...], atol=1e-4)


# --- the threshold gradient with A8 against finite differences --------------------------


def test_tga_threshold_gradient_with_a8_matches_finite_differences():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, use_bias=False, name="b")(nn.Dense(16, use_bias=False, name="a")(x))

  with jax.enable_x64(True):
    # 32 inputs: a ternary layer's outputs are sums of few inputs, and with very few an exact rounding tie
    # (x * s = k + 0.5) can occur, which a last-bit difference between the two modes then tips either way.
    x = jax.random.normal(jax.random.key(6), (4, 32), jnp.float64)
    c = jax.random.normal(jax.random.key(7), (4, 3), jnp.float64)
    model = tgq_jax.ternarize_model(Two(), QuantPolicy("tga", activation_bits=8))
    params = jax.tree.map(lambda v: v.astype(jnp.float64), model.init(jax.random.key(0), x)["params"])

    def loss(p):
      return jnp.sum(c * model.apply({"params": p}, x))

    grads = jax.grad(loss)(params)
    h = 1e-7
    for layer, rtol in (("b", 1e-6), ("a", 3e-2)):
      up = {**params, layer: {**params[layer], "delta": params[layer]["delta"] + h}}
      down = {**params, layer: {**params[layer], "delta": params[layer]["delta"] - h}}
      fd = (loss(up) - loss(down)) / (2 * h)
      assert abs(fd) > 1e-3
      # Layer b's input does not depend on its threshold: exact. Layer a's output reaches the loss through
      # b's quantized input, whose gradient is straight-through (d A8(z)/dz := 1): within the 8-bit error.
      np.testing.assert_allclose(grads[layer]["delta"], fd, rtol=rtol, err_msg=layer)
    thr = jax.grad(lambda p: jnp.sum(c * with_mode(model, THRESHOLD_PASS).apply({"params": p}, x)))(params)
    for layer in ("a", "b"):
      np.testing.assert_allclose(thr[layer]["delta"], grads[layer]["delta"], rtol=1e-10)
