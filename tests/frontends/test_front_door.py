"""tgq_jax.ternarize_model, the one front door: a Linen module goes to the Linen front end, an NNX module to
the NNX one, anything else is a TypeError naming what it got."""
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import tgq_jax
from tgq_jax.frontends import linen as tlinen
from tgq_jax.frontends import nnx as tnnx


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden, self.out = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def test_a_linen_model_gets_the_linen_front_end():
  x = jnp.ones((2, 4))
  model = tgq_jax.ternarize_model(LinenMLP(), tgq_jax.QuantPolicy("tga", ternary_last=False), x)
  assert isinstance(model, tlinen.TernarizedModel)
  params = model.init(jax.random.key(0), x)["params"]
  assert "delta" in params["hidden"] and "delta" not in params["out"]  # last layer left full precision


def test_an_nnx_model_gets_the_nnx_front_end_in_place():
  x = jnp.ones((2, 4))
  plain = NnxMLP(nnx.Rngs(0))
  model = tgq_jax.ternarize_model(plain, tgq_jax.QuantPolicy("tga", ternary_last=False), x)
  assert model is plain
  assert isinstance(model.hidden, tnnx.TernaryLayer) and not isinstance(model.out, tnnx.TernaryLayer)
  assert isinstance(model.hidden.delta, tnnx.Threshold)


def test_anything_else_is_a_type_error():
  with pytest.raises(TypeError, match="flax.linen or flax.nnx Module, got function"):
    tgq_jax.ternarize_model(lambda x: x)
