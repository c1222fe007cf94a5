"""TernaryDense / TernaryConv against plain nn.Dense / nn.Conv, and the params-tree tools."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tgq_jax
from tgq_jax.core.kernel import THRESHOLD_PASS
from tgq_jax.core.trees import layer_stats, reinit_thresholds
from tgq_jax.frontends.linen import with_mode
from tgq_jax.frontends.linen_layers import TernaryConv, TernaryDense, quantized_layers
from tgq_jax.models.common import BatchNorm
from tgq_jax.core.quantizers import get_quantizer

KEY = jax.random.key(0)
X_DENSE = jax.random.normal(jax.random.key(1), (3, 5))
X_CONV = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
# Non-default constructor arguments, to check they reach the base class untouched.
DENSE_KW = dict(features=4, use_bias=True, kernel_init=nn.initializers.normal(0.3),
                bias_init=nn.initializers.normal(0.1))
CONV_KW = dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=True,
               kernel_init=nn.initializers.normal(0.3), bias_init=nn.initializers.normal(0.1))
CASES = [(TernaryDense, nn.Dense, DENSE_KW, X_DENSE), (TernaryConv, nn.Conv, CONV_KW, X_CONV)]


@pytest.mark.parametrize("ternary_cls, base_cls, kw, x", CASES)
def test_fp_layer_is_the_base_layer(ternary_cls, base_cls, kw, x):
  v = ternary_cls(quantizer="fp", **kw).init(KEY, x)
  base_v = base_cls(**kw).init(KEY, x)
  # Same init key, same params (names, shapes, values): a drop-in replacement.
  jax.tree.map(np.testing.assert_array_equal, v, base_v)
  np.testing.assert_array_equal(ternary_cls(quantizer="fp", **kw).apply(v, x), base_cls(**kw).apply(v, x))


@pytest.mark.parametrize("ternary_cls, base_cls, kw, x", CASES)
def test_tga_layer_is_the_base_layer_on_the_ternarized_kernel(ternary_cls, base_cls, kw, x):
  layer = ternary_cls(quantizer="tga", **kw)
  v = layer.init(KEY, x)
  p = v["params"]
  assert set(p) == {"kernel", "bias", "delta"}
  kernel = np.asarray(p["kernel"])
  np.testing.assert_allclose(p["delta"], 0.05 * np.abs(kernel).max(), rtol=1e-6)
  # The kernel is the base layer's initial kernel: the quantizer consumes no randomness before it.
  np.testing.assert_array_equal(kernel, base_cls(**kw).init(KEY, x)["params"]["kernel"])
  w_t = tgq_jax.core.ternarize(p["kernel"], {"delta": p["delta"]})
  assert len(np.unique(np.asarray(w_t))) <= 3
  expected = base_cls(**kw).apply({"params": {"kernel": w_t, "bias": p["bias"]}}, x)
  np.testing.assert_allclose(layer.apply(v, x), expected, rtol=1e-6, atol=1e-6)


def test_per_channel_delta_has_one_threshold_per_output_channel():
  v = TernaryConv(5, (3, 3), per_channel=True).init(KEY, X_CONV)
  kernel = np.asarray(v["params"]["kernel"])
  assert v["params"]["delta"].shape == (5,)
  np.testing.assert_allclose(v["params"]["delta"], 0.05 * np.abs(kernel).max(axis=(0, 1, 2)), rtol=1e-6)


def test_ttq_leaves_are_named_pos_scale_and_neg_scale():
  v = TernaryDense(4, quantizer="ttq", use_bias=False).init(KEY, X_DENSE)
  assert set(v["params"]) == {"kernel", "pos_scale", "neg_scale"}
  assert v["params"]["pos_scale"].shape == () and v["params"]["neg_scale"].shape == ()


def test_bfloat16_computes_on_the_float32_ternarization():
  kw = dict(features=8, kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=False)
  v = TernaryConv(**kw).init(KEY, X_CONV)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))
  out16 = TernaryConv(dtype=jnp.bfloat16, **kw).apply(v, X_CONV)
  out32 = TernaryConv(**kw).apply(v, X_CONV)
  assert out16.dtype == jnp.bfloat16
  # The effective kernel is the float32 ternarization cast to bf16 (statistics in float32).
  w_t32 = tgq_jax.core.ternarize(v["params"]["kernel"], {"delta": v["params"]["delta"]})
  expected = nn.Conv(dtype=jnp.bfloat16, **kw).apply({"params": {"kernel": w_t32}}, X_CONV)
  np.testing.assert_array_equal(np.asarray(out16, np.float32), np.asarray(expected, np.float32))
  # bf16 has an 8-bit mantissa: ~0.4% per rounding, a few roundings per output.
  err = np.max(np.abs(np.asarray(out16, np.float32) - out32)) / np.max(np.abs(out32))
  assert err < 2e-2


def test_gradients_reach_kernel_and_delta():
  layer = TernaryConv(4, (3, 3))
  v = layer.init(KEY, X_CONV)
  g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X_CONV) ** 2))(v["params"])
  for name in ("kernel", "delta"):
    assert np.all(np.isfinite(g[name])) and np.any(g[name] != 0), name


class _Tiny(nn.Module):
  """conv (TGA) -> BN -> dense (TTQ) -> dense (fp), to exercise the params-tree tools."""

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=True)(TernaryConv(4, (3, 3), name="conv")(x))
    x = TernaryDense(3, quantizer="ttq", name="mid")(jnp.mean(x, axis=(1, 2)))
    return TernaryDense(2, quantizer="fp", name="head")(x)


def test_quantized_layers_lists_every_ternary_layer_in_call_order():
  layers = quantized_layers(_Tiny(), X_CONV)
  assert list(layers) == [("conv",), ("mid",), ("head",)]
  assert [q.name for q in layers.values()] == ["tga", "ttq", "fp"]


def test_reinit_thresholds_follows_the_kernels_and_nothing_else():
  model = _Tiny()
  v = model.init(KEY, X_CONV)
  params = v["params"]
  scaled = jax.tree_util.tree_map_with_path(
    lambda path, x: x * 3 if path[-1].key == "kernel" else x, params)
  out = reinit_thresholds(scaled, quantized_layers(model, X_CONV))
  np.testing.assert_allclose(out["conv"]["delta"], 3 * params["conv"]["delta"], rtol=1e-6)
  np.testing.assert_allclose(out["mid"]["pos_scale"], 3 * params["mid"]["pos_scale"], rtol=1e-6)
  np.testing.assert_allclose(out["mid"]["neg_scale"], 3 * params["mid"]["neg_scale"], rtol=1e-6)
  # Every other leaf is the input's, and the input tree still holds the old thresholds.
  for path, leaf in jax.tree_util.tree_leaves_with_path(out):
    if path[-1].key not in ("delta", "pos_scale", "neg_scale"):
      np.testing.assert_array_equal(leaf, _get(scaled, path))
  np.testing.assert_array_equal(scaled["conv"]["delta"], params["conv"]["delta"])
  assert jax.tree.structure(out) == jax.tree.structure(params)


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def _tga_by_hand(w, delta):
  """Independent TGA statistics: sample std, threshold clipped at 3 sigma, truncated-normal mean."""
  w = np.asarray(w, np.float64).ravel()
  mu, sigma = w.mean(), w.std(ddof=1)
  t = min(abs(delta), 3 * sigma)
  a = t / sigma
  mills = math.exp(-a * a / 2) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(a / math.sqrt(2)))
  return mu + sigma * mills, t, float(np.mean(np.abs(w - mu) <= t))


def test_layer_stats_on_a_hand_built_tree():
  rng = np.random.default_rng(0)
  w_conv = rng.normal(0.01, 0.2, (3, 3, 2, 4)).astype(np.float32)
  w_mid = rng.normal(0, 1, (4, 3)).astype(np.float32)
  w_head = rng.normal(0, 1, (3, 2)).astype(np.float32)
  params = {
    "conv": {"kernel": w_conv, "delta": np.float32(0.15)},
    "block": {"mid": {"kernel": w_mid, "pos_scale": np.float32(0.7), "neg_scale": np.float32(0.4)}},
    "head": {"kernel": w_head, "bias": np.zeros(2, np.float32)},
  }
  layers = {("conv",): get_quantizer("tga"), ("block", "mid"): get_quantizer("ttq"),
            ("head",): get_quantizer("fp")}
  conv, mid, head = layer_stats(params, layers)

  alpha, t, zeros = _tga_by_hand(w_conv, 0.15)
  assert (conv.name, conv.shape, conv.num_weights, conv.quantizer) == ("conv", (3, 3, 2, 4), 72, "tga")
  assert conv.sparsity == pytest.approx(zeros)
  assert conv.scale == pytest.approx(alpha, rel=1e-5) and conv.neg_scale == pytest.approx(alpha, rel=1e-5)
  assert conv.threshold == pytest.approx(t, rel=1e-6)

  t_mid = 0.05 * np.abs(w_mid).max()  # TTQ's fixed threshold
  assert (mid.name, mid.num_weights, mid.quantizer) == ("block/mid", 12, "ttq")
  assert mid.sparsity == pytest.approx(np.mean(np.abs(w_mid) <= t_mid))
  assert (mid.scale, mid.neg_scale) == (pytest.approx(0.7), pytest.approx(0.4))
  assert mid.threshold == pytest.approx(t_mid, rel=1e-6)

  assert (head.name, head.num_weights, head.quantizer, head.sparsity) == ("head", 6, "fp", 0.0)
  assert head.scale is None and head.threshold is None and head.neg_scale is None


class _BiasNet(nn.Module):
  """A conv with bias, a per-channel conv and a dense with bias: every threshold-pass case."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(TernaryConv(6, (3, 3), use_bias=True, name="c0")(x))
    x = nn.relu(TernaryConv(5, (3, 3), use_bias=False, per_channel=True, name="c1")(x))
    x = TernaryConv(4, (1, 1), quantizer="twn", name="c2")(x)  # no thresholds: unchanged path
    return TernaryDense(3, use_bias=True, name="d")(jnp.mean(x, axis=(1, 2)))


def test_threshold_pass_same_output_same_threshold_gradients_no_kernel_gradients():
  jax.config.update("jax_enable_x64", True)
  try:
    model = _BiasNet()
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(1), x)["params"])
    params["c0"]["bias"] = jnp.linspace(-0.5, 0.5, 6)  # nonzero biases: added after the scale
    params["d"]["bias"] = jnp.asarray([0.3, -0.2, 0.1])
    target = jax.random.normal(jax.random.key(2), (2, 3), jnp.float64)

    def loss(p, model=model):
      return jnp.sum((model.apply({"params": p}, x) - target) ** 2)

    # with_mode: every Ternary* layer of the model in the threshold pass.
    split_loss_fn = functools.partial(loss, model=with_mode(model, THRESHOLD_PASS))
    plain_loss, plain = jax.value_and_grad(loss)(params)
    split_loss, split = jax.value_and_grad(split_loss_fn)(params)
    split_jaxpr = str(jax.make_jaxpr(jax.grad(split_loss_fn))(params))
    plain_jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    np.testing.assert_allclose(split_loss, plain_loss, rtol=1e-13)
    for layer in ("c0", "c1", "d"):
      np.testing.assert_allclose(split[layer]["delta"], plain[layer]["delta"], rtol=1e-10, atol=1e-14)
      assert np.any(plain[layer]["delta"] != 0)
      assert not np.any(split[layer]["kernel"])  # the kernels get nothing in this pass
    # Convolutions: 3 forward, the input gradients of c1 and c2, and the kernel gradients of
    # all three (8); in the threshold pass only TWN's c2 (no threshold) keeps its kernel gradient.
    assert plain_jaxpr.count("conv_general_dilated") == 8
    assert split_jaxpr.count("conv_general_dilated") == 6
  finally:
    jax.config.update("jax_enable_x64", False)


# --- BatchNorm ---------------------------------------------------------------


def _running_var_after_one_update(x, **kw):
  bn = BatchNorm(use_running_average=False, momentum=0.9, **kw)
  variables = bn.init(KEY, x)
  _, state = bn.apply(variables, x, mutable=["batch_stats"])
  return bn, variables, np.asarray(state["batch_stats"]["var"])


def test_batchnorm_running_variance_biased_or_unbiased():
  x = 1.0 + 2.0 * jax.random.normal(jax.random.key(3), (2, 3, 3, 4))
  flat = np.asarray(x, np.float64).reshape(-1, 4)  # n = 18 values per channel
  _, _, biased = _running_var_after_one_update(x)
  _, _, unbiased = _running_var_after_one_update(x, unbiased_running_var=True)
  np.testing.assert_allclose(biased, 0.9 + 0.1 * flat.var(0), rtol=1e-6)  # flax's rule
  np.testing.assert_allclose(unbiased, 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-6)  # torch's rule
  # Normalization is the same either way (torch normalizes with the biased variance too).
  bn, variables, _ = _running_var_after_one_update(x)
  y_flax = bn.apply(variables, x, mutable=["batch_stats"])[0]
  y_torch = BatchNorm(use_running_average=False, momentum=0.9, unbiased_running_var=True).apply(
    variables, x, mutable=["batch_stats"])[0]
  np.testing.assert_array_equal(y_flax, y_torch)


def test_batchnorm_cross_device_statistics_count_every_device():
  # Four shards of a batch, mapped over 4 devices with axis_name: the global batch's statistics.
  x = 1.0 + 2.0 * jax.random.normal(jax.random.key(4), (8, 3, 3, 2))
  flat = np.asarray(x, np.float64).reshape(-1, 2)
  bn = BatchNorm(use_running_average=False, momentum=0.9, axis_name="d", unbiased_running_var=True)
  variables = bn.init(KEY, x)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("d",))
  P = jax.sharding.PartitionSpec
  fn = jax.shard_map(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]), mesh=mesh,
                     in_specs=(P(), P("d")), out_specs=(P("d"), P()), check_vma=False)
  y, state = jax.jit(fn)(variables, x)
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), expected, rtol=1e-4, atol=1e-5)
  # Outside a mapping, initialization and evaluation mode need no axis.
  assert BatchNorm(use_running_average=True, axis_name="d").apply(variables, x).shape == x.shape
