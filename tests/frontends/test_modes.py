"""The mode of the quantized layers is part of the model (a Linen field, an NNX static attribute), so one
compiled function cannot mix modes; with_mode works for any Linen model and keeps its variables; layers
and patterns left out are reported by the Linen front end as by the NNX one."""
import contextvars
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import tgq_jax
import tgq_jax.frontends.nnx as tnnx
from tgq_jax.core import kernel as core_kernel
from tgq_jax.core.kernel import THRESHOLD_PASS, TRAIN, UnquantizedLayerWarning
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.frontends import linen, linen_layers
from tgq_jax.frontends.linen import with_mode
from tgq_jax.frontends.linen_layers import TernaryConv, TernaryDense

X = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))


class ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


def _grads(model, params):
  return jax.grad(lambda p: jnp.sum(model.apply({"params": p}, X) ** 2))(params)


def test_linen_one_jitted_function_traces_each_mode_and_never_mixes_them():
  model = tgq_jax.ternarize_model(ConvNet())
  split = with_mode(model, THRESHOLD_PASS)
  params = model.init(jax.random.key(1), X)["params"]
  assert split.mode == THRESHOLD_PASS and model.mode == TRAIN
  assert split != model and hash(split) != hash(model)  # the mode is in the static argument's identity
  step = jax.jit(_grads, static_argnums=0)
  train, thr, train_again = step(model, params), step(split, params), step(model, params)
  assert step._cache_size() == 2  # one trace per mode
  for layer in ("conv", "head"):
    assert np.any(train[layer]["kernel"]) and not np.any(thr[layer]["kernel"])
    np.testing.assert_allclose(thr[layer]["delta"], train[layer]["delta"], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(train_again[layer]["kernel"], train[layer]["kernel"])
  # The old trap (a context manager read at trace time, outside jit's cache key) is gone: nothing
  # ambient is left that could change what a layer computes.
  assert not hasattr(linen_layers, "threshold_pass")
  for module in (core_kernel, linen):
    assert not [v for v in vars(module).values() if isinstance(v, contextvars.ContextVar)], module


def test_nnx_one_jitted_function_traces_each_mode_and_never_mixes_them():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2)))

  model = tnnx.ternarize_model(Net(nnx.Rngs(0)))
  traces = []

  @nnx.jit
  def step(m):
    traces.append(m.conv.mode)
    grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2), argnums=nnx.DiffState(0, nnx.Any(nnx.Param, tnnx.Threshold)))(m)
    return nnx.to_pure_dict(grads)

  train = step(model)
  thr = step(tnnx.set_mode(model, THRESHOLD_PASS))
  train_again = step(tnnx.set_mode(model, TRAIN))
  assert traces == [TRAIN, THRESHOLD_PASS]  # retraced once for the new mode, the TRAIN trace reused after
  for layer in ("conv", "head"):
    assert np.any(train[layer]["kernel"]) and not np.any(thr[layer]["kernel"])
    np.testing.assert_allclose(thr[layer]["delta"], train[layer]["delta"], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(train_again[layer]["kernel"], train[layer]["kernel"])


class Explicit(nn.Module):
  """Explicit Ternary* layers, one of them inside an intercepting wrapper."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(TernaryConv(4, (3, 3), use_bias=True, name="conv")(x))
    x = linen.TernarizedModel(ConvNet(), name="inner")(x)
    return TernaryDense(2, name="head")(x)


def test_with_mode_on_explicit_layers_and_nested_wrappers_keeps_the_variables():
  model = Explicit()
  variables = model.init(jax.random.key(2), X)
  split = with_mode(model, THRESHOLD_PASS)
  assert isinstance(split, linen.TernarizedModel)
  assert jax.tree.structure(split.init(jax.random.key(2), X)) == jax.tree.structure(variables)
  np.testing.assert_allclose(split.apply(variables, X), model.apply(variables, X), rtol=1e-5, atol=1e-6)
  train = _grads(model, variables["params"])
  thr = _grads(split, variables["params"])
  train, thr = traverse_util.flatten_dict(train), traverse_util.flatten_dict(thr)
  assert sum(k[-1] == "delta" for k in train) == 4  # conv, the wrapper's conv and head, head
  for key in train:
    if key[-1] == "kernel":
      assert np.any(train[key]) and not np.any(thr[key]), key
    if key[-1] == "delta":
      np.testing.assert_allclose(thr[key], train[key], rtol=1e-4, atol=1e-7, err_msg=str(key))
  assert with_mode(TernaryDense(3), THRESHOLD_PASS).mode == THRESHOLD_PASS
  with pytest.raises(ValueError, match="unknown quantized-layer mode"):
    with_mode(model, "inference")
  with pytest.raises(TypeError, match="flax.linen Module"):
    with_mode(lambda x: x, TRAIN)


class Embedder(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(10, 4, name="embed")(tokens)
    x = nn.ConvTranspose(4, (2,), name="up")(x)
    return nn.Dense(3, name="head")(x)


def test_linen_layers_and_patterns_left_out_warn_error_or_pass():
  tokens = jnp.zeros((2, 5), jnp.int32)
  with pytest.warns(UnquantizedLayerWarning) as record:
    tgq_jax.ternarize_model(Embedder(), QuantPolicy(exclude=("tail",))).init(jax.random.key(0), tokens)
  message = str(record[0].message)
  assert "'up' (flax.linen" in message and "'tail' matches no" in message
  assert "embed" not in message  # an Embed left full precision is the policy's choice (embeddings=False)
  with pytest.raises(ValueError, match="'up'"):
    tgq_jax.ternarize_model(Embedder(), QuantPolicy(on_unquantized="error")).init(jax.random.key(0), tokens)
  with pytest.warns(UnquantizedLayerWarning) as record:  # quantized now, so not reported; 'up' still is
    variables = tgq_jax.ternarize_model(Embedder(), QuantPolicy(embeddings=True)).init(jax.random.key(0), tokens)
  assert "embed" not in str(record[0].message) and "'up'" in str(record[0].message)
  assert "delta" in variables["params"]["embed"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tgq_jax.ternarize_model(Embedder(), QuantPolicy(on_unquantized="ignore")).init(jax.random.key(0), tokens)
    tgq_jax.ternarize_model(Embedder(), QuantPolicy(include=("head",))).init(jax.random.key(0), tokens)
    with_mode(Explicit(), THRESHOLD_PASS).init(jax.random.key(0), X)  # the mode-only wrapper reports nothing
