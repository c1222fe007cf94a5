"""The model zoo: ResNet structure and parameter counts, quantization of every layer, switches, dtypes.

Big models are only traced (jax.eval_shape); behaviour is checked on resnet20
and on tiny ResNets of the ImageNet layout (width 4, one block per stage).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tgq_jax
from tgq_jax import QuantPolicy
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models import archs, create_model
from tgq_jax.models.resnet import BasicBlock, Bottleneck, CifarResNet, ResNet

QUANTIZER_LEAVES = ("delta", "pos_scale", "neg_scale")
KEY = jax.random.key(0)


def _leaves(tree):
  return [("/".join(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _num_weights(params) -> int:
  return sum(int(np.prod(x.shape)) for name, x in _leaves(params) if name.split("/")[-1] not in QUANTIZER_LEAVES)


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: model.init(KEY, jnp.zeros(shape)))


def _tiny_imagenet(block_cls, **kw):
  """A tiny torchvision-layout ResNet; QuantPolicy fields in ``kw`` make its policy, the rest its options."""
  fields = {f.name for f in dataclasses.fields(QuantPolicy)}
  plain = ResNet(num_classes=5, stage_sizes=(1, 1, 1, 1), block_cls=block_cls, width=4,
                 **{k: v for k, v in kw.items() if k not in fields})
  return tgq_jax.ternarize_model(plain, QuantPolicy(**{k: v for k, v in kw.items() if k in fields}))


@pytest.mark.parametrize("arch, num_classes, expected", [
  # torchvision's counts (sum of p.numel() over model.parameters()).
  ("resnet18", 1000, 11_689_512),
  ("resnet34", 1000, 21_797_672),
  ("resnet50", 1000, 25_557_032),
  # resnet20 by hand: conv1 3*3*3*16 + bn 2*16 = 464;
  # stage 1: 3 blocks x (2 * 9*16*16 + 2 * 2*16) = 3 * 4672 = 14016;
  # stage 2: (9*16*32 + 9*32*32 + 2 * 2*32) + 2 * (2 * 9*32*32 + 2 * 2*32) = 13952 + 37120 = 51072;
  # stage 3: (9*32*64 + 9*64*64 + 2 * 2*64) + 2 * (2 * 9*64*64 + 2 * 2*64) = 55552 + 147968 = 203520;
  # fc 64*10 + 10 = 650; option-A shortcuts add nothing. Total 269,722 (the paper's 0.27M).
  ("resnet20", 10, 269_722),
  # Each extra block per stage adds 4672 + 18560 + 73984 = 97216.
  ("resnet32", 10, 269_722 + 2 * 97_216),
  ("resnet56", 10, 269_722 + 6 * 97_216),
])
def test_parameter_counts(arch, num_classes, expected):
  variables = _abstract_init(create_model(arch, num_classes), (1, 32, 32, 3))
  assert _num_weights(variables["params"]) == expected
  assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("arch", [a for a in archs() if a.startswith("resnet")])
def test_output_shapes(arch):
  model = create_model(arch, 7)
  variables = _abstract_init(model, (2, 32, 32, 3))
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, 3)))
  assert (out.shape, out.dtype) == ((2, 7), jnp.float32)


def test_imagenet_resnet_structure_matches_torchvision_names():
  params = _abstract_init(create_model("resnet50", 1000), (1, 32, 32, 3))["params"]
  top = set(params)
  assert top == {"conv1", "bn1", "fc"} | {f"layer{i}_{j}" for i, n in enumerate((3, 4, 6, 3), 1)
                                         for j in range(n)}
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
  # v1.5: the stride is on the 3x3 conv; the 1x1 projection sits beside it.
  assert set(params["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                     "downsample_conv", "downsample_bn"}
  assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)
  assert "downsample_conv" not in params["layer2_1"]
  assert params["fc"]["kernel"].shape == (2048, 1000) and params["fc"]["bias"].shape == (1000,)


def test_imagenet_resnet_spatial_sizes_at_224():
  model = create_model("resnet18", 10)
  variables = _abstract_init(model, (1, 224, 224, 3))
  _, state = jax.eval_shape(functools.partial(model.apply, capture_intermediates=True,
                                              mutable=["intermediates"]), variables, jnp.zeros((1, 224, 224, 3)))
  inter = state["intermediates"]
  assert inter["conv1"]["__call__"][0].shape == (1, 112, 112, 64)
  assert inter["layer1_0"]["__call__"][0].shape == (1, 56, 56, 64)
  assert inter["layer4_1"]["__call__"][0].shape == (1, 7, 7, 512)


def test_first_conv_pads_like_pytorch():
  # A direct cross-correlation with zero padding 3 and stride 2 (PyTorch's Conv2d(3, 64, 7, 2, 3)).
  model = _tiny_imagenet(BasicBlock, quantizer="fp")
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))
  variables = jax.jit(model.init)(KEY, x)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  got = np.asarray(state["intermediates"]["conv1"]["__call__"][0])
  w = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
  expected = np.zeros((1, 4, 4, 4))
  for i in range(4):
    for j in range(4):
      expected[0, i, j] = np.einsum("hwc,hwco->o", xp[0, 2 * i:2 * i + 7, 2 * j:2 * j + 7], w)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_unknown_arch_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown arch 'resnet19'.*resnet18.*resnet20"):
    create_model("resnet19", 10)


def test_cifar_depth_must_be_6n_plus_2():
  with pytest.raises(ValueError, match="6n \\+ 2"):
    _abstract_init(CifarResNet(10, depth=21), (1, 8, 8, 3))


def _ternarized_twin_params(params, layers):
  """``params`` with every ternary layer's kernel replaced by its quantizer's output, quantizer leaves dropped."""
  out = jax.tree.map(lambda x: x, dict(params))
  for path, quantizer in layers.items():
    node = out
    for key in path[:-1]:
      node[key] = dict(node[key])
      node = node[key]
    layer = dict(node[path[-1]])
    qparams = {k: layer.pop(k) for k in quantizer.param_names}
    if quantizer.ternary:
      layer["kernel"] = quantizer(layer["kernel"], qparams)
      assert len(np.unique(np.asarray(layer["kernel"]))) <= 3, path
    node[path[-1]] = layer
  return out


TWIN_CASES = [
  ("resnet20", lambda **kw: create_model("resnet20", 10, quant=QuantPolicy(**kw)), (2, 28, 28, 1), 20),  # 19 convs + fc
  # conv1 + 4 blocks x (3 convs + projection) + fc.
  ("bottleneck", lambda **kw: _tiny_imagenet(Bottleneck, **kw), (2, 16, 16, 3), 18),
]


@pytest.mark.parametrize("name, make, shape, num_layers", TWIN_CASES, ids=[c[0] for c in TWIN_CASES])
@pytest.mark.parametrize("first_last", [True, False])
def test_every_kernel_is_ternarized(name, make, shape, num_layers, first_last):
  model = make(quantizer="tga", ternary_first=first_last, ternary_last=first_last)
  twin = make(quantizer="fp")
  x = jax.random.normal(jax.random.key(1), shape)
  variables = jax.jit(model.init)(KEY, x)
  layers = quantized_layers(model, x)

  kernels = {tuple(n.split("/")[:-1]) for n, _ in _leaves(variables["params"]) if n.endswith("kernel")}
  assert set(layers) == kernels and len(layers) == num_layers
  first, last = next(iter(layers)), list(layers)[-1]
  assert (first, last) == (("conv1",), ("fc",))
  for path, q in layers.items():
    expect = "tga" if first_last or path not in (first, last) else "fp"
    assert q.name == expect, path
  deltas = {tuple(n.split("/")[:-1]) for n, _ in _leaves(variables["params"]) if n.endswith("delta")}
  assert deltas == {p for p, q in layers.items() if q.name == "tga"}

  # Strongest check: the ternary model is its FP twin run on the ternarized kernels.
  twin_vars = {**variables, "params": _ternarized_twin_params(variables["params"], layers)}
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), jax.jit(twin.apply)(twin_vars, x),
                             rtol=1e-5, atol=1e-5)


def test_fp_twin_has_the_same_tree_without_quantizer_leaves():
  shape = (1, 32, 32, 3)
  tga = _abstract_init(create_model("resnet18", 10, quant=QuantPolicy(quantizer="tga")), shape)
  ttq = _abstract_init(create_model("resnet18", 10, quant=QuantPolicy(quantizer="ttq")), shape)
  fp = _abstract_init(create_model("resnet18", 10, quant=QuantPolicy(quantizer="fp")), shape)
  strip = lambda v: {n: (x.shape, x.dtype) for n, x in _leaves(v) if n.split("/")[-1] not in QUANTIZER_LEAVES}
  assert strip(tga) == strip(fp) == strip(ttq)
  assert not any(n.split("/")[-1] in QUANTIZER_LEAVES for n, _ in _leaves(fp))
  assert sum(n.endswith("/pos_scale") for n, _ in _leaves(ttq)) == 21  # 20 convs + fc


def test_per_channel_thresholds():
  params = _abstract_init(create_model("resnet20", 10, quant=QuantPolicy(per_channel=True)), (1, 8, 8, 3))["params"]
  assert params["conv1"]["delta"].shape == (16,)
  assert params["layer3_2"]["conv2"]["delta"].shape == (64,)
  assert params["fc"]["delta"].shape == (10,)


def test_resnet20_on_28x28_grayscale_in_bfloat16_is_close_to_float32():
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  model32 = create_model("resnet20", 10)
  model16 = create_model("resnet20", 10, dtype=jnp.bfloat16)
  variables = jax.jit(model32.init)(KEY, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  out32 = jax.jit(model32.apply)(variables, x)
  out16 = jax.jit(model16.apply)(variables, x)
  assert out32.shape == out16.shape == (2, 10)
  assert out16.dtype == jnp.float32
  assert np.all(np.isfinite(out32))
  # ~20 layers of bf16 rounding (2^-8 relative each) on the same float32-derived ternary kernels.
  err = np.max(np.abs(out16 - out32)) / np.max(np.abs(out32))
  assert err < 3e-2  # observed ~3e-3


def test_train_updates_every_batch_norm():
  model = _tiny_imagenet(BasicBlock)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = jax.jit(model.init)(KEY, x)
  apply = jax.jit(functools.partial(model.apply, train=True, capture_intermediates=True,
                                    mutable=["batch_stats", "intermediates"]))
  out, state = apply(variables, x)
  assert out.shape == (2, 5)
  old, new = dict(_leaves(variables["batch_stats"])), dict(_leaves(state["batch_stats"]))
  assert old.keys() == new.keys() and len(old) == 2 * (1 + 4 * 2 + 3)  # stem, 2 per block, 3 projections
  for name in old:
    assert not np.allclose(old[name], new[name]), name
  # momentum 0.9: the running mean moved 10% of the way from 0 to the batch mean.
  conv1 = state["intermediates"]["conv1"]["__call__"][0]
  np.testing.assert_allclose(new["bn1/mean"], 0.1 * np.mean(conv1, axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_zero_init_residual_zeroes_the_last_norm_of_each_block():
  x = jnp.zeros((1, 16, 16, 3))
  for block_cls, last in ((BasicBlock, "bn2"), (Bottleneck, "bn3")):
    params = jax.jit(_tiny_imagenet(block_cls, zero_init_residual=True).init)(KEY, x)["params"]
    for i in range(1, 5):
      np.testing.assert_array_equal(params[f"layer{i}_0"][last]["scale"], 0)
      np.testing.assert_array_equal(params[f"layer{i}_0"]["bn1"]["scale"], 1)
