"""tgq_jax.ternarize_model on Linen models written here, against hand-ternarized kernels.

The expectations are computed independently of the interception: the plain
network is run on kernels passed through ``tgq_jax.core.ternarize`` by hand, with
the per-channel axes spelled out here for each layer type.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import tgq_jax
from tgq_jax import QuantPolicy, ternarize
from tgq_jax.training import algorithm
from tgq_jax.core.kernel import THRESHOLD_PASS
from tgq_jax.frontends.linen import ternarize_model as linen_ternarize_model, with_mode
from tgq_jax.frontends.linen_layers import quantized_layers

KEY = jax.random.key(0)
ModuleDef = Any


class Block(nn.Module):
  """A basic block in the style of flax's examples ResNet: conv and norm injected."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3))(x)))
    y = self.norm()(self.conv(self.filters, (3, 3))(y))
    return nn.relu(x + y)


class ExampleResNet(nn.Module):
  num_classes: int = 5
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(self.conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    x = nn.relu(norm(name="bn_init")(conv(8, (3, 3), name="conv_init")(x)))
    x = Block(8, conv, norm, name="block")(x)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class AttentionMLP(nn.Module):
  """A transformer block: MultiHeadDotProductAttention (DenseGeneral q/k/v/out) + an MLP, on patches."""

  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (2, 2), strides=(2, 2), name="patches")(x)
    x = x.reshape(x.shape[0], -1, 16)
    x = x + nn.MultiHeadDotProductAttention(4, name="attn")(nn.LayerNorm()(x))
    h = nn.gelu(nn.Dense(32, name="mlp_in")(nn.LayerNorm()(x)))
    x = x + nn.Dense(16, name="mlp_out")(h)
    x = nn.Einsum((16, 8), "btd,dk->btk", name="proj")(x)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


# The output-feature axes of each kernel, by hand: Conv/Dense the last; q/k/v kernels (in, heads,
# head_dim) the last two; out (heads, head_dim, out) the last; Einsum "btd,dk" -> k.
def _channel_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
  if path[-1] in ("query", "key", "value"):
    return (1, 2)
  return (ndim - 1,)


def _hand_ternarized(params, per_channel: bool, quantized: set) -> dict:
  """The plain network's params: matched kernels replaced by tgq_jax.core.ternarize of themselves."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for key, value in flat.items():
    if key[-1] == "delta":
      continue
    if key[-1] == "kernel" and key[:-1] in quantized:
      axes = _channel_axes(key[:-1], value.ndim) if per_channel else False
      value = ternarize(value, {"delta": flat[(*key[:-1], "delta")]}, per_channel=axes)
    out[key] = value
  return traverse_util.unflatten_dict(out)


CASES = [
  ("resnet", ExampleResNet, (2, 8, 8, 3)),
  ("attention", AttentionMLP, (2, 8, 8, 3)),
]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("name, cls, shape", CASES, ids=[c[0] for c in CASES])
def test_output_equals_hand_ternarized_network(name, cls, shape, per_channel):
  x = jax.random.normal(jax.random.key(1), shape)
  policy = QuantPolicy("tga", per_channel=per_channel, ternary_first=False, exclude=(".*proj",))
  model = tgq_jax.ternarize_model(cls(), policy)
  variables = model.init(KEY, x)
  flat = traverse_util.flatten_dict(variables["params"])
  kernels = [k[:-1] for k in flat if k[-1] == "kernel"]
  first = "conv_init" if name == "resnet" else "patches"
  expected = {k for k in kernels if k != (first,) and k != ("proj",)}
  # Every matched kernel has its delta (shaped per output feature), no other one does.
  assert {k[:-1] for k in flat if k[-1] == "delta"} == expected
  for k in expected:
    kernel = flat[(*k, "kernel")]
    want = tuple(kernel.shape[a] for a in _channel_axes(k, kernel.ndim)) if per_channel else ()
    assert flat[(*k, "delta")].shape == want, k
  layers = quantized_layers(model, x)
  assert {p for p, q in layers.items() if q.ternary} == expected and set(layers) == set(kernels)
  # The same numbers as the plain network on hand-ternarized kernels.
  plain = cls().apply({**variables, "params": _hand_ternarized(variables["params"], per_channel, expected)}, x)
  np.testing.assert_array_equal(model.apply(variables, x), plain)


@pytest.mark.parametrize("name, cls, shape", CASES, ids=[c[0] for c in CASES])
def test_deltas_get_the_custom_vjp_gradient(name, cls, shape):
  """d(loss)/d(delta) through the intercepted model equals it through the hand-ternarized
  network (tgq_jax.core.ternarize's custom VJP), also in the threshold pass of the sequential update."""
  x = jax.random.normal(jax.random.key(2), shape)
  policy = QuantPolicy("tga", per_channel=True)
  model = tgq_jax.ternarize_model(cls(), policy)
  variables = model.init(KEY, x)
  params = variables["params"]
  quantized = {p for p, q in quantized_layers(model, x).items() if q.ternary}
  target = jax.random.normal(jax.random.key(3), model.apply(variables, x).shape)

  def model_loss(params, model=model):
    return jnp.sum(target * model.apply({**variables, "params": params}, x))

  def hand_loss(params):
    plain = _hand_ternarized(params, True, quantized)
    return jnp.sum(target * cls().apply({**variables, "params": plain}, x))

  got = traverse_util.flatten_dict(jax.jit(jax.grad(model_loss))(params))
  want = traverse_util.flatten_dict(jax.jit(jax.grad(hand_loss))(params))
  split_model = with_mode(model, THRESHOLD_PASS)  # the threshold pass of the sequential update
  split = traverse_util.flatten_dict(jax.jit(jax.grad(lambda p: model_loss(p, split_model)))(params))
  deltas = [k for k in got if k[-1] == "delta"]
  assert len(deltas) == len(quantized)
  for k in deltas:
    assert np.any(want[k] != 0), k
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7, err_msg=str(k))
    np.testing.assert_allclose(split[k], want[k], rtol=2e-4, atol=1e-6, err_msg=str(k))
  for k in got:
    if k[-1] == "kernel":
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=str(k))


def test_one_sequential_step_moves_thresholds_then_weights_as_by_hand():
  """Plain SGD: delta_1 = delta_0 - lr * clip(dL/ddelta at (w_0, delta_0)), then
  w_1 = w_0 - lr * dL/dw at (w_0, delta_1), computed on the hand-ternarized network."""
  x = jax.random.normal(jax.random.key(4), (4, 8, 8, 3))
  y = jnp.array([0, 1, 2, 3])
  model = tgq_jax.ternarize_model(AttentionMLP(), QuantPolicy("tga", per_channel=True))
  layers = quantized_layers(model, x)
  lr, clip = 0.05, 1e-3
  state, tga = algorithm.init(
    model, x, optax.sgd(lr), layers, threshold_tx=optax.chain(optax.clip(clip), optax.sgd(lr)), train=False)
  new, metrics = jax.jit(algorithm.ClassificationStep(model, tga).train)(state, {"image": x, "label": y})
  quantized = {p for p, q in layers.items() if q.ternary}

  def hand_loss(params):
    plain = _hand_ternarized(params, True, quantized)
    logits = AttentionMLP().apply({"params": plain}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  hand_grad = jax.jit(jax.grad(hand_loss))
  p0 = traverse_util.flatten_dict(state.params)
  g0 = traverse_util.flatten_dict(hand_grad(state.params))
  p_half = {k: v - lr * jnp.clip(g0[k], -clip, clip) if k[-1] == "delta" else v for k, v in p0.items()}
  g1 = traverse_util.flatten_dict(hand_grad(traverse_util.unflatten_dict(p_half)))
  p1 = {k: v if k[-1] == "delta" else v - lr * g1[k] for k, v in p_half.items()}
  got = traverse_util.flatten_dict(new.params)
  moved = 0
  for k in p1:
    np.testing.assert_allclose(got[k], p1[k], rtol=1e-5, atol=1e-7, err_msg=str(k))
    moved += k[-1] == "delta" and bool(np.any(got[k] != p0[k]))
  assert moved == len(quantized)  # every threshold moved
  np.testing.assert_allclose(metrics["threshold_pass_loss"], hand_loss(state.params), rtol=1e-5)


def test_ternary_last_by_call_order_and_the_fp_twin():
  """ternary_last=False keeps the last kernel called (the head) full precision, whatever its name;
  QuantPolicy("fp") is the plain network exactly."""
  x = jnp.ones((1, 8, 8, 3))
  model = tgq_jax.ternarize_model(AttentionMLP(), QuantPolicy(ternary_last=False))
  layers = quantized_layers(model, x)
  assert list(layers)[-1] == ("head",) and not layers[("head",)].ternary
  assert sum(q.ternary for q in layers.values()) == len(layers) - 1
  fp = tgq_jax.ternarize_model(AttentionMLP(), QuantPolicy("fp"))
  variables = fp.init(KEY, x)
  np.testing.assert_array_equal(fp.apply(variables, x), AttentionMLP().apply(variables, x))


def test_the_wrapped_module_is_left_unchanged_and_bad_input_is_named():
  model = ExampleResNet()
  tgq_jax.ternarize_model(model).init(KEY, jnp.ones((1, 8, 8, 3)))
  assert "param" not in model.__dict__  # nothing shadowed is left behind
  with pytest.raises(TypeError, match="takes a flax.linen Module, got function"):
    linen_ternarize_model(lambda x: x)
  with pytest.raises(TypeError, match="takes a flax.linen or flax.nnx Module, got function"):
    tgq_jax.ternarize_model(lambda x: x)  # the front door (tests/frontends/test_front_door.py)
  with pytest.raises(ValueError, match="not a regular expression"):
    QuantPolicy(include=("(",))
  with pytest.raises(ValueError, match="unknown quantizer"):
    QuantPolicy("tgaa")


def test_register_quantizer_is_one_call():
  """A new quantizer (sign * mean|w|, straight-through) registered once works in the policy."""
  from tgq_jax.core.quantizers import QuantizerSpec, quantizer_names, register_quantizer, twn_init

  @jax.custom_vjp
  def binary(w):
    return jnp.sign(w) * jnp.mean(jnp.abs(w))

  binary.defvjp(lambda w: (binary(w), None), lambda _, g: (g,))
  spec = QuantizerSpec("binary_test", lambda w, p, per_channel=False: binary(w), twn_init, None,
                       per_channel=False)
  register_quantizer(spec, replace=True)
  assert "binary_test" in quantizer_names()
  model = tgq_jax.ternarize_model(nn.Dense(3), QuantPolicy("binary_test"))
  v = model.init(KEY, jnp.ones((2, 4)))
  w = v["params"]["kernel"]
  np.testing.assert_allclose(model.apply(v, jnp.eye(4)), jnp.sign(w) * jnp.mean(jnp.abs(w)) + v["params"]["bias"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="already registered"):
    register_quantizer(spec)
