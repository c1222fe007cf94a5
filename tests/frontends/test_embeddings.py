"""QuantPolicy(embeddings=True): Embed tables quantized like kernels, in Linen and NNX: lookups and attend read
ternarize(table); never an activation quantization there; the first/last rule counts an Embed; threshold pass
and packed form compute the same."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tgq_jax
import tgq_jax.frontends.nnx as tnnx
from tgq_jax import QuantPolicy, ternarize
from tgq_jax.core.kernel import THRESHOLD_PASS, UnquantizedLayerWarning
from tgq_jax.frontends.linen import with_mode
from tgq_jax.frontends.linen_layers import quantized_layers

IDS = jnp.array([[0, 3, 9, 3], [7, 1, 1, 5]])
QUERY = jax.random.normal(jax.random.key(9), (2, 6))


def hand(table, delta, per_channel):
  return ternarize(table, {"delta": delta}, per_channel=(1,) if per_channel else False)


class LinenLookup(nn.Module):
  @nn.compact
  def __call__(self, ids, query):
    embed = nn.Embed(10, 6, name="embed")
    return embed(ids), embed.attend(query)


class NnxLookup(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 6, rngs=rngs)

  def __call__(self, ids, query):
    return self.embed(ids), self.embed.attend(query)


@pytest.mark.parametrize("per_channel", [False, True])
def test_linen_lookups_and_attend_read_the_ternary_table(per_channel):
  policy = QuantPolicy("tga", embeddings=True, per_channel=per_channel, activation_bits=8)
  model = tgq_jax.ternarize_model(LinenLookup(), policy)
  variables = model.init(jax.random.key(0), IDS, QUERY)
  p = variables["params"]["embed"]
  assert p["delta"].shape == ((6,) if per_channel else ())
  table = hand(p["embedding"], p["delta"], per_channel)
  assert np.mean(np.asarray(table) == 0) > 0.02  # ternary: zeros, and two magnitudes per channel at most
  rows, logits = model.apply(variables, IDS, QUERY)
  np.testing.assert_array_equal(rows, table[IDS])
  np.testing.assert_allclose(logits, QUERY @ table.T, rtol=1e-6, atol=1e-6)  # the query is not quantized
  assert quantized_layers(model, IDS, QUERY)[("embed",)].ternary
  # The threshold pass: the same values and threshold gradient (computed as TRAIN for a table).
  c = jax.random.normal(jax.random.key(1), rows.shape)

  def loss(params, m):
    r, l = m.apply({"params": params}, IDS, QUERY)
    return jnp.sum(c * r) + jnp.sum(l ** 2)

  g = jax.grad(loss)(variables["params"], model)
  g_thr = jax.grad(loss)(variables["params"], with_mode(model, THRESHOLD_PASS))
  assert np.any(g["embed"]["delta"]) and np.any(g["embed"]["embedding"])
  np.testing.assert_allclose(g_thr["embed"]["delta"], g["embed"]["delta"], rtol=1e-5)
  # Not selected: the table as it is, no delta.
  plain = tgq_jax.ternarize_model(LinenLookup(), QuantPolicy("tga", activation_bits=8))
  with pytest.warns(UnquantizedLayerWarning, match="include pattern '.\\*' matches no quantizable layer"):
    v = plain.init(jax.random.key(0), IDS, QUERY)
    rows = plain.apply(v, IDS, QUERY)[0]
  assert "delta" not in v["params"]["embed"]
  np.testing.assert_array_equal(rows, v["params"]["embed"]["embedding"][IDS])


@pytest.mark.parametrize("per_channel", [False, True])
def test_nnx_lookups_and_attend_read_the_ternary_table(per_channel):
  policy = QuantPolicy("tga", embeddings=True, per_channel=per_channel, activation_bits=8)
  model = tnnx.ternarize_model(NnxLookup(nnx.Rngs(0)), policy)
  assert isinstance(model.embed, tnnx.TernaryEmbed) and model.embed.activation_bits is None
  table = hand(model.embed.embedding[...], model.embed.delta[...], per_channel)
  rows, logits = model(IDS, QUERY)
  np.testing.assert_array_equal(rows, table[IDS])
  np.testing.assert_allclose(logits, QUERY @ table.T, rtol=1e-6, atol=1e-6)
  assert isinstance(model.embed.embedding, nnx.Param)  # the stored table stays the float one
  tnnx.set_mode(model, THRESHOLD_PASS)
  np.testing.assert_array_equal(model(IDS, QUERY)[0], table[IDS])
  tnnx.set_mode(model, tnnx.TRAIN)
  tnnx.pack(model)
  assert "embedding" not in vars(model.embed) and model.embed.codes[...].shape == (3, 6)  # planar (ceil(10/4), 6)
  rows_packed, logits_packed = model(IDS, QUERY)
  np.testing.assert_array_equal(rows_packed, rows)
  np.testing.assert_allclose(logits_packed, logits, rtol=1e-6, atol=1e-6)


def test_linen_and_nnx_tables_agree():
  policy = QuantPolicy("twn", embeddings=True)
  linen = tgq_jax.ternarize_model(LinenLookup(), policy)
  variables = linen.init(jax.random.key(0), IDS, QUERY)
  model = NnxLookup(nnx.Rngs(0))
  model.embed.embedding[...] = variables["params"]["embed"]["embedding"]
  tnnx.ternarize_model(model, policy)
  for got, want in zip(model(IDS, QUERY), linen.apply(variables, IDS, QUERY)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


class LinenEmbedNet(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Dense(3, name="head")(nn.Dense(4, name="mid")(nn.Embed(10, 6, name="embed")(ids)))


class NnxEmbedNet(nnx.Module):
  def __init__(self, rngs):
    self.head = nnx.Linear(4, 3, rngs=rngs)  # declared first: call order, not attribute order, decides
    self.embed = nnx.Embed(10, 6, rngs=rngs)
    self.mid = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, ids):
    return self.head(self.mid(self.embed(ids)))


@pytest.mark.parametrize("embeddings,first,last,want", [
  (True, False, True, {"mid", "head"}),  # the Embed is the first layer now
  (False, False, True, {"head"}),  # not a candidate: the first is mid
  (True, True, False, {"embed", "mid"}),
  (True, True, True, {"embed", "mid", "head"}),
])
def test_the_first_last_rule_counts_an_embed(embeddings, first, last, want):
  policy = QuantPolicy("tga", embeddings=embeddings, ternary_first=first, ternary_last=last)
  linen = tgq_jax.ternarize_model(LinenEmbedNet(), policy)
  params = linen.init(jax.random.key(0), IDS)["params"]
  assert {name for name, p in params.items() if "delta" in p} == want
  model = tnnx.ternarize_model(NnxEmbedNet(nnx.Rngs(0)), policy, IDS)
  assert {name for name in ("embed", "mid", "head") if isinstance(getattr(model, name), tnnx.TernaryLayer)} == want
