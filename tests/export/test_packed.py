"""Packed inference: create_model(..., packed=True) holds 2-bit codes and scales and gives the trained logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax import export, models
from tgq_jax.core import packing
from tgq_jax.kernels import ternary_matmul as tm
from tgq_jax.frontends.linen_layers import TernaryDense, quantized_layers
from tgq_jax.models import ModelSpec, create_model
from tgq_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.core.quantizers import get_quantizer

# ImageNet ResNets' structure (7x7 stem, max-pool, projection shortcuts, bottlenecks) at test size.
models.register("tiny_resnet18", ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, width=8)
models.register("tiny_resnet50", ResNet, stage_sizes=(1, 1), block_cls=Bottleneck, width=4)


def _variables(model, shape, seed=0):
  x = jax.random.normal(jax.random.key(seed + 1), (4, *shape))
  v = model.init(jax.random.key(seed), x, train=False)
  _, stats = model.apply(v, x, train=True, mutable=["batch_stats"])  # non-trivial statistics
  return {"params": v["params"], **stats}, x


@pytest.mark.parametrize("arch,shape,quantizer,per_channel,first,last", [
  ("resnet20", (8, 8, 3), "tga", False, True, True),
  ("resnet20", (8, 8, 3), "tga", True, False, False),
  ("tiny_resnet18", (32, 32, 3), "twn", True, True, True),
  ("tiny_resnet50", (32, 32, 3), "ttq", False, False, True),
])
def test_packed_model_gives_the_trained_logits(arch, shape, quantizer, per_channel, first, last):
  spec = ModelSpec(arch, 10, QuantPolicy(quantizer, per_channel=per_channel, ternary_first=first,
                                         ternary_last=last))
  model = spec.build()
  variables, x = _variables(model, shape)
  packed_model = spec.build(packed=True)
  packed = export.pack_variables(variables, spec, shape)
  want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  got = jax.jit(lambda v, x: packed_model.apply(v, x, train=False))(packed, x)
  # Compiled, the two graphs may round differently (fusion): equal to float rounding.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  for path, q in quantized_layers(model, x, train=False).items():
    layer, packed_layer = variables["params"], packed["params"]
    for key in path:
      layer, packed_layer = layer[key], packed_layer[key]
    assert ("codes" in packed_layer) == q.ternary and ("kernel" in packed_layer) == (not q.ternary)
    assert ("neg_scale" in packed_layer) == (q.ternary and quantizer == "ttq")
    if q.ternary:  # the kernel rebuilt in the forward pass is exactly the trained layer's ternary kernel
      rebuilt = packing.dequantize_planar(packed_layer["codes"], packed_layer["scale"], packed_layer.get("neg_scale"),
                                     layer["kernel"].shape)
      trained = q(layer["kernel"], {k: layer[k] for k in q.param_names})
      np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(trained))


def test_packed_resident_bytes_are_a_sixteenth():
  model = create_model("resnet20", 10)
  variables, _ = _variables(model, (8, 8, 3))
  packed = export.pack_variables(variables, ModelSpec("resnet20", 10), (8, 8, 3))
  fp_bytes = sum(a.nbytes for a in jax.tree.leaves(variables["params"]))
  packed_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(packed["params"]))
  assert fp_bytes / packed_bytes > 12


def test_packed_dense_uses_the_pallas_kernel_when_asked():
  """On GPU/TPU a packed TernaryDense multiplies with the Pallas kernel; here in the interpreter."""
  spec = ModelSpec("resnet20", 10, QuantPolicy(per_channel=True))
  model = spec.build()
  variables, x = _variables(model, (8, 8, 3))
  packed_model = spec.build(packed=True)
  packed = export.pack_variables(variables, spec, (8, 8, 3))
  want = np.asarray(model.apply(variables, x, train=False))
  calls = []
  original = tm.ternary_matmul
  try:
    tm.ternary_matmul = lambda *a, **k: calls.append(k) or original(*a, **k)
    with tm.use_pallas("interpret"):
      got = np.asarray(packed_model.apply(packed, x, train=False))
  finally:
    tm.ternary_matmul = original
  assert calls == [{"interpret": True}]  # the classifier
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_packed_quantizer_names_and_errors():
  q = get_quantizer("packed:tga", per_channel=True)
  assert q.packed and q.ternary and q.per_channel and q.param_names == () and q.symmetric
  assert not get_quantizer("packed:ttq").symmetric
  assert get_quantizer("packed:fp") == get_quantizer("fp")
  with pytest.raises(ValueError, match="no float kernel"):
    q(jnp.ones(3), {})
  with pytest.raises(ValueError, match="per-channel"):
    get_quantizer("packed:ttq", per_channel=True)
  layer = TernaryDense(3, quantizer="packed:twn")
  v = layer.init(jax.random.key(0), jnp.ones((1, 5)))
  assert jax.tree.map(lambda a: (a.shape, a.dtype.name), v["params"]) == {
    "bias": ((3,), "float32"), "codes": ((2, 3), "uint8"), "scale": ((), "float32")}


def test_compiled_forward_rebuilds_one_kernel_at_a_time():
  """XLA may not hoist every layer's unpacking to the start: temporaries grow by about one float kernel."""
  model = create_model("resnet20", 10)
  variables, x = _variables(model, (8, 8, 3))
  packed_model = create_model("resnet20", 10, packed=True)
  packed = export.pack_variables(variables, ModelSpec("resnet20", 10), (8, 8, 3))

  def temp_bytes(m, v):
    return jax.jit(lambda v, x: m.apply(v, x, train=False)).lower(v, x).compile().memory_analysis().temp_size_in_bytes

  fp_model = create_model("resnet20", 10, quant=QuantPolicy("fp"))
  fp_variables = {**variables, "params": jax.tree.map(lambda a: a, variables["params"])}
  kernels = [a.nbytes for p, a in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
             if "kernel" in jax.tree_util.keystr(p)]
  all_kernels, largest = sum(kernels), max(kernels)
  fp_temp, packed_temp = temp_bytes(fp_model, fp_variables), temp_bytes(packed_model, packed)
  assert packed_temp <= fp_temp + 2 * largest < fp_temp + all_kernels / 2
