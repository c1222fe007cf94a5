"""torchvision checkpoints -> flax variables, and FP -> ternary initialization.

No torch: the state dicts are fakes built with numpy from torchvision's
ResNet structure (tests/torchvision_helpers.py).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tgq_jax
from tgq_jax import QuantPolicy
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models import create_model
from tgq_jax.models.resnet import ResNet
from tgq_jax.frontends.linen_layers import init_ternary_from_fp
from tgq_jax.models.torchvision import convert_state_dict, load_torchvision_weights
from torchvision_helpers import fake_state_dict, torchvision_resnet_shapes


def _init(model, image_shape, seed=0):
  """``model.init`` jitted: eager init dispatches op by op, several times slower on CPU."""
  init = jax.jit(functools.partial(model.init, train=False))
  return init(jax.random.key(seed), jnp.zeros((1, *image_shape)))


def _flat(tree):
  return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def sd18():
  return fake_state_dict("resnet18")


@pytest.fixture(scope="module")
def fp18(sd18):
  return convert_state_dict(sd18, "resnet18")


def test_torchvision_param_counts():
  """The hand-written torchvision structure is right: torchvision's published counts."""
  for arch, expected in (("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)):
    shapes = torchvision_resnet_shapes(arch)
    n = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith(("weight", "bias")))
    assert n == expected, arch


def test_convert_resnet18_fills_every_leaf(sd18, fp18):
  model = create_model("resnet18", 1000, quant=QuantPolicy(quantizer="fp"))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  want = {k: (v.shape, v.dtype) for k, v in _flat(abstract).items()}
  got = {k: (v.shape, v.dtype) for k, v in _flat(fp18).items()}
  assert got == want
  assert sum(int(np.prod(v.shape)) for v in _flat(fp18["params"]).values()) == 11_689_512
  # Spot checks of the name mapping and layouts.
  p, s = fp18["params"], fp18["batch_stats"]
  np.testing.assert_array_equal(p["layer2_0"]["downsample_conv"]["kernel"],
                                sd18["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["layer2_0"]["downsample_bn"]["scale"], sd18["layer2.0.downsample.1.weight"])
  np.testing.assert_array_equal(s["layer4_1"]["bn2"]["var"], sd18["layer4.1.bn2.running_var"])
  np.testing.assert_array_equal(s["bn1"]["mean"], sd18["bn1.running_mean"])
  np.testing.assert_array_equal(p["fc"]["kernel"], sd18["fc.weight"].T)


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_convert_deeper_archs_match(arch):
  """Every torchvision key of resnet34/50 lands somewhere (zeros: only names and shapes matter)."""
  sd = {k: np.zeros(s, np.float32) for k, s in torchvision_resnet_shapes(arch, num_classes=10).items()}
  fp = convert_state_dict(sd, arch)
  n = sum(int(np.prod(s)) for k, s in torchvision_resnet_shapes(arch, 10).items() if k.endswith(("weight", "bias")))
  assert sum(int(np.prod(v.shape)) for v in _flat(fp["params"]).values()) == n


def test_converted_resnet18_computes_as_torch(sd18, fp18):
  """Layouts checked by computing in PyTorch's convention (NCHW, OIHW, (out, in)) on one forward pass."""
  model = create_model("resnet18", 1000, quant=QuantPolicy(quantizer="fp"))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  _, state = model.apply(fp18, x, capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))
  conv = lambda a, w, stride, pad: jax.lax.conv_general_dilated(
    nchw(a), jnp.asarray(w), (stride, stride), [(pad, pad)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW"))

  # conv1 (7x7, asymmetric random kernel, stride 2, padding 3).
  ref = conv(x, sd18["conv1.weight"], 2, 3)
  conv1_out = inter["conv1"]["__call__"][0]
  np.testing.assert_allclose(nchw(conv1_out), ref, rtol=1e-4, atol=1e-4)
  # bn1 in eval mode with the running statistics.
  c = lambda name: sd18[f"bn1.{name}"][None, :, None, None]
  ref_bn = (ref - c("running_mean")) / np.sqrt(c("running_var") + 1e-5) * c("weight") + c("bias")
  np.testing.assert_allclose(nchw(inter["bn1"]["__call__"][0]), ref_bn, rtol=1e-4, atol=1e-4)
  # The stride-2 1x1 projection of layer2.0 on layer1's output.
  ds_ref = conv(inter["layer1_1"]["__call__"][0], sd18["layer2.0.downsample.0.weight"], 2, 0)
  np.testing.assert_allclose(nchw(inter["layer2_0"]["downsample_conv"]["__call__"][0]), ds_ref, rtol=1e-4, atol=1e-4)
  # fc: y = x W^T + b on the pooled features.
  pooled = jnp.mean(inter["layer4_1"]["__call__"][0], axis=(1, 2))
  logits = inter["__call__"][0]
  np.testing.assert_allclose(logits, pooled @ sd18["fc.weight"].T + sd18["fc.bias"], rtol=1e-4, atol=1e-4)


def test_convert_errors(sd18):
  with pytest.raises(ValueError, match="unsupported arch 'resnet20'"):
    convert_state_dict(sd18, "resnet20")
  missing = {k: v for k, v in sd18.items() if k != "layer3.1.bn2.running_var"}
  with pytest.raises(ValueError, match=r"missing keys: layer3\.1\.bn2\.running_var"):
    convert_state_dict(missing, "resnet18")
  extra = {**sd18, "layer5.0.conv1.weight": np.zeros((3, 3, 3, 3), np.float32)}
  with pytest.raises(ValueError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
    convert_state_dict(extra, "resnet18")
  bad = {**sd18, "layer1.0.conv2.weight": np.zeros((64, 64, 1, 3), np.float32)}
  with pytest.raises(ValueError, match=re.escape("layer1.0.conv2.weight: got (64, 64, 1, 3), expected (64, 64, 3, 3)")):
    convert_state_dict(bad, "resnet18")
  # A resnet34 checkpoint read as resnet18: everything reported at once.
  with pytest.raises(ValueError, match=r"unexpected keys: .*layer1\.2\.conv1\.weight.*\(80 in all\)") as err:
    convert_state_dict({k: np.zeros(s, np.float32) for k, s in torchvision_resnet_shapes("resnet34").items()},
                       "resnet18")
  assert "missing" not in str(err.value)
  no_fc = {k: v for k, v in sd18.items() if not k.startswith("fc.weight")}
  with pytest.raises(ValueError, match="'fc.weight'"):
    convert_state_dict(no_fc, "resnet18")


def test_load_npz(tmp_path, sd18, fp18):
  path = tmp_path / "resnet18.npz"
  np.savez(path, **sd18)  # what the documented one-liner writes
  loaded = load_torchvision_weights(path, "resnet18")
  jax.tree.map(np.testing.assert_array_equal, loaded, fp18)
  with pytest.raises(ValueError, match=r"\.npz"):
    load_torchvision_weights(tmp_path / "resnet18.bin", "resnet18")


def test_load_pth_without_torch(tmp_path):
  try:
    import torch  # noqa: F401
    pytest.skip("torch is installed")
  except ImportError:
    pass
  with pytest.raises(ImportError, match=r"np\.savez"):
    load_torchvision_weights(tmp_path / "resnet18.pth", "resnet18")


def _check_ternary_init(model, fp, ternary, image_shape):
  """Non-quantizer leaves identical to fp's; quantizer leaves = the quantizer's init on the loaded kernel."""
  flat_fp, flat_t = _flat(fp), _flat(ternary)
  layers = quantized_layers(model, jnp.zeros((1, *image_shape)), train=False)
  expected_q = set()
  for path, quantizer in layers.items():
    layer = ternary["params"]
    for k in path:
      layer = layer[k]
    for name, value in quantizer.init(layer["kernel"]).items():
      expected_q.add("/".join(("params", *path, name)))
      np.testing.assert_array_equal(layer[name], value)
      if name == "delta":  # the paper's TGA start, spelled out
        kernel = np.abs(np.asarray(layer["kernel"]))
        axes = tuple(range(kernel.ndim - 1)) if quantizer.per_channel else None
        np.testing.assert_allclose(layer[name], 0.05 * np.max(kernel, axis=axes), rtol=1e-6)
  assert set(flat_t) - set(flat_fp) == expected_q
  for key, value in flat_fp.items():
    np.testing.assert_array_equal(flat_t[key], value, err_msg=key)
  return expected_q


def test_init_ternary_from_torchvision_resnet18(fp18):
  model = create_model("resnet18", 1000, quant=QuantPolicy(quantizer="tga"))
  ternary = init_ternary_from_fp(model, fp18, (32, 32, 3))
  q = _check_ternary_init(model, fp18, ternary, (32, 32, 3))
  assert len(q) == 21  # 17 convs + 3 projections + fc, one delta each
  # ternary_first/last False: conv1 and fc stay FP, so get no delta.
  ff_lf = create_model("resnet18", 1000, quant=QuantPolicy(quantizer="tga", ternary_first=False, ternary_last=False))
  ternary = init_ternary_from_fp(ff_lf, fp18, (32, 32, 3))
  assert len(_check_ternary_init(ff_lf, fp18, ternary, (32, 32, 3))) == 19
  assert "delta" not in ternary["params"]["conv1"] and "delta" not in ternary["params"]["fc"]


@pytest.mark.parametrize("arch, image_shape, quantizer, per_channel", [
  ("resnet20", (8, 8, 3), "tga", False),
  ("small_cnn", (8, 8, 1), "tga", True),
  ("small_cnn", (8, 8, 1), "twn", False),
])
def test_init_ternary_generic(arch, image_shape, quantizer, per_channel):
  fp = _init(create_model(arch, 10, quant=QuantPolicy(quantizer="fp")), image_shape, seed=2)
  model = create_model(arch, 10, quant=QuantPolicy(quantizer=quantizer, per_channel=per_channel))
  ternary = init_ternary_from_fp(model, fp, image_shape)
  _check_ternary_init(model, fp, ternary, image_shape)
  # A ternary source (its quantizer leaves recomputed, not copied) into another quantizer.
  other = create_model(arch, 10, quant=QuantPolicy(quantizer="ttq" if quantizer == "tga" else "tga"))
  _check_ternary_init(other, fp, init_ternary_from_fp(other, ternary, image_shape), image_shape)


def test_init_ternary_tiny_imagenet_bottleneck():
  """A tiny torchvision-layout ResNet with bottlenecks and projections (FP twin -> TGA)."""
  from tgq_jax.models.resnet import Bottleneck
  kw = dict(num_classes=5, stage_sizes=(1, 1, 1, 1), block_cls=Bottleneck, width=4)
  fp = _init(tgq_jax.ternarize_model(ResNet(**kw), QuantPolicy("fp")), (32, 32, 3), seed=3)
  model = tgq_jax.ternarize_model(ResNet(**kw), QuantPolicy("tga"))
  ternary = init_ternary_from_fp(model, fp, (32, 32, 3))
  _check_ternary_init(model, fp, ternary, (32, 32, 3))
  logits = jax.jit(functools.partial(model.apply, train=False))(ternary, jnp.ones((2, 32, 32, 3)))  # usable as is
  assert logits.shape == (2, 5) and np.all(np.isfinite(logits))


def test_init_ternary_mismatch():
  fp = _init(create_model("resnet20", 10, quant=QuantPolicy(quantizer="fp")), (8, 8, 3))
  with pytest.raises(ValueError, match=r"missing leaves: .*layer1_3"):
    init_ternary_from_fp(create_model("resnet32", 10), fp, (8, 8, 3))
  with pytest.raises(ValueError, match=r"unexpected leaves: .*layer1_3"):
    fp32 = jax.eval_shape(lambda: create_model("resnet32", 10, quant=QuantPolicy(quantizer="fp")).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    init_ternary_from_fp(create_model("resnet20", 10), fp32, (8, 8, 3))
  with pytest.raises(ValueError, match=re.escape("params/fc/kernel: got (64, 10), expected (64, 7)")):
    init_ternary_from_fp(create_model("resnet20", 7), fp, (8, 8, 3))


def test_float64_stays_float64_under_x64():
  """A float64 state dict converts, initializes and computes in float64 (no float32 rounding)."""
  sd = {k: v.astype(np.float64) for k, v in fake_state_dict("resnet18", seed=5, num_classes=10).items()}
  with jax.enable_x64(True):
    fp = convert_state_dict(sd, "resnet18")
    assert {leaf.dtype for leaf in jax.tree.leaves(fp)} == {np.dtype(np.float64)}
    np.testing.assert_array_equal(fp["params"]["layer1_0"]["conv2"]["kernel"],
                                  sd["layer1.0.conv2.weight"].transpose(2, 3, 1, 0))
    model = create_model("resnet18", 10, dtype=jnp.float64, quant=QuantPolicy(quantizer="tga"))
    ternary = init_ternary_from_fp(model, fp, (32, 32, 3))
    assert {leaf.dtype for leaf in jax.tree.leaves(ternary)} == {np.dtype(np.float64)}
    np.testing.assert_array_equal(ternary["params"]["fc"]["delta"], 0.05 * np.abs(sd["fc.weight"]).max())
    logits = jax.jit(functools.partial(model.apply, train=False))(ternary, jnp.ones((1, 32, 32, 3)))
    assert logits.dtype == np.float64
  # Without x64 the same state dict gives float32, as before.
  assert {leaf.dtype for leaf in jax.tree.leaves(convert_state_dict(sd, "resnet18"))} == {np.dtype(np.float32)}
