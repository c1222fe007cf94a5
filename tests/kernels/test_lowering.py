"""Lowering (not running) for TPU and CUDA from this CPU host, with ``jax.export``.

What each platform's export must hold: the Pallas ternary kernel's custom call
(tpu: ``tpu_custom_call``, Mosaic; cuda: ``__gpu$xla.gpu.triton``, Triton) in a
packed model's small-batch forward, none in the CPU export; and both training
steps (sequential and joint) must lower for either accelerator.

What lowering checks here: Pallas's own rules (Mosaic's block tiling, Triton's
power-of-two blocks, every op of the kernel having a lowering) and the choice of
kernel per platform. Not checked: Mosaic's vector-layout passes and Triton's
compilation to PTX, which run only in libtpu / on a GPU.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax.core.policy import QuantPolicy
from tgq_jax.frontends.linen import ternarize_model
from tgq_jax.core import packing
from tgq_jax.kernels import ternary_matmul as tm
from tgq_jax.models import create_model
from tgq_jax.training import parallel

from trainer_helpers import QUICK, build, synthetic_batches

ACCELERATORS = tuple(tm.CUSTOM_CALL_TARGETS)  # ("tpu", "cuda")


def _export(fn, platforms, *args):
  return jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=tm.export_disabled_checks(platforms))(*args)


def _pallas_calls(text: str) -> dict:
  return {platform: text.count(target) for platform, target in tm.CUSTOM_CALL_TARGETS.items()}


def _codes(k, n, seed=0):
  codes = np.random.default_rng(seed).integers(-1, 2, size=(k, n)).astype(np.int8)
  return jnp.asarray(packing.pack_planar(codes))


@pytest.mark.parametrize("platform", ACCELERATORS)
@pytest.mark.parametrize("m,k,n,dtype,symmetric", [
  (1, 8192, 8192, jnp.bfloat16, True),   # the benchmark's GEMV: many blocks, aligned
  (1, 1000, 300, jnp.bfloat16, True),    # N > 64 and not a multiple of 128 (the old TPU block_n = 64 failed here)
  (5, 37, 20, jnp.float32, False),       # tiny, unaligned, TTQ's two scales
  (64, 256, 512, jnp.float32, True)])
def test_the_kernel_lowers_for_its_platform(platform, m, k, n, dtype, symmetric):
  x = jax.ShapeDtypeStruct((m, k), dtype)
  scale = jax.ShapeDtypeStruct((n,), jnp.float32)
  packed = jax.ShapeDtypeStruct((-(-k // 4), n), jnp.uint8)
  fn = (lambda x, p, s: tm.ternary_matmul(x, p, s)) if symmetric else (lambda x, p, s: tm.ternary_matmul(x, p, s, s))
  exported = _export(fn, [platform], x, packed, scale)
  assert _pallas_calls(exported.mlir_module()) == {p: int(p == platform) for p in ACCELERATORS}
  assert exported.out_avals[0].shape == (m, n) and exported.out_avals[0].dtype == dtype


def test_the_kernel_alone_refuses_to_lower_for_cpu():
  x, packed, scale = jnp.ones((2, 8)), _codes(8, 4), jnp.ones(())
  with pytest.raises(ValueError, match="no Pallas kernel for the platform.*cpu.*interpret=True"):
    _export(tm.ternary_matmul, ["cpu"], x, packed, scale)


def test_one_multi_platform_export_carries_each_platforms_kernel():
  """platforms=(cpu, cuda, tpu): the kernel of each accelerator once, the plain-JAX product for cpu, and the
  exported function still runs here (its cpu branch) and gives the plain-JAX values."""
  rng = np.random.default_rng(1)
  x, packed, scale = jnp.asarray(rng.normal(size=(3, 40)), jnp.float32), _codes(40, 200, 1), jnp.float32(0.5)
  exported = _export(tm.ternary_dense, ["cpu", "cuda", "tpu"], x, packed, scale)
  assert _pallas_calls(exported.mlir_module()) == {"tpu": 1, "cuda": 1}
  with tm.use_pallas("off"):
    want = tm.ternary_dense(x, packed, scale)
  np.testing.assert_array_equal(np.asarray(exported.call(x, packed, scale)), np.asarray(want))


# --- the packed model's forward ----------------------------------------------


def _packed_forward(batch: int):
  model = create_model("resnet20", 10, quant=QuantPolicy("packed:tga", per_channel=True))
  x = jax.ShapeDtypeStruct((batch, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  assert variables["params"]["fc"]["codes"].dtype == jnp.uint8  # the classifier holds 2-bit codes
  return (lambda v, x: model.apply(v, x, train=False)), variables, x


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_packed_forward_lowers_with_the_kernel_for_accelerators(platform):
  forward, variables, x = _packed_forward(batch=2)
  exported = _export(forward, [platform], variables, x)
  assert _pallas_calls(exported.mlir_module()) == {p: int(p == platform) for p in ACCELERATORS}  # the classifier
  assert exported.out_avals[0].shape == (2, 10)


def test_packed_forward_for_cpu_has_no_kernel_and_large_batches_skip_it():
  forward, variables, x = _packed_forward(batch=2)
  assert _pallas_calls(_export(forward, ["cpu"], variables, x).mlir_module()) == {"tpu": 0, "cuda": 0}
  forward, variables, x = _packed_forward(batch=tm.AUTO_MAX_ROWS + 1)  # "auto": cuBLAS / XLA's dot is faster there
  assert _pallas_calls(_export(forward, ["tpu", "cuda"], variables, x).mlir_module()) == {"tpu": 0, "cuda": 0}
  with tm.use_pallas("on"):
    assert _pallas_calls(_export(forward, ["tpu", "cuda"], variables, x).mlir_module()) == {"tpu": 1, "cuda": 1}
  with tm.use_pallas("off"):
    forward, variables, x = _packed_forward(batch=2)
    assert _pallas_calls(_export(forward, ["tpu", "cuda"], variables, x).mlir_module()) == {"tpu": 0, "cuda": 0}


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(300)(x)))


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_ternarize_model_packed_dense_lowers_with_the_kernel(dtype):
  """The interception front end (any Linen model): each packed nn.Dense gets the platform's kernel."""
  model = ternarize_model(_MLP(), QuantPolicy("packed:tga", dtype=dtype))
  x = jax.ShapeDtypeStruct((4, 96), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  exported = _export(model.apply, ["cpu", "tpu", "cuda"], variables, x)
  assert _pallas_calls(exported.mlir_module()) == {"tpu": 2, "cuda": 2}
  assert exported.out_avals[0].dtype == (dtype or jnp.float32)  # the policy's compute dtype, as without the kernel
  with tm.use_pallas("off"):
    assert jax.eval_shape(model.apply, variables, x).dtype == (dtype or jnp.float32)


# --- the training steps ------------------------------------------------------


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_training_steps_lower_for_accelerators(platform):
  convolutions = {}
  for update in ("sequential", "joint"):
    *_, state, train_fn, _ = build(dataclasses.replace(QUICK, update=update))
    # As the harness runs it: mapped over the data axis (shard_map), here over one abstract device.
    step = parallel.map_step(train_fn, jax.sharding.AbstractMesh((1,), (parallel.AXIS,)), "shard_map")
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), synthetic_batches(1, batch_size=8)[0])
    exported = _export(step, [platform], state, batch)
    assert exported.platforms == (platform,)
    want = jax.eval_shape(step, state, batch)  # the step as traced here: the same state and metrics
    assert [(a.shape, a.dtype) for a in exported.out_avals] == [(a.shape, a.dtype) for a in jax.tree.leaves(want)]
    text = exported.mlir_module()
    assert _pallas_calls(text) == {"tpu": 0, "cuda": 0}  # training computes with float kernels: no Pallas here
    convolutions[update] = text.count("stablehlo.convolution")
  # The sequential step differentiates the model twice (threshold pass, then weight pass), the joint one once.
  assert convolutions["sequential"] > convolutions["joint"] > 0, convolutions
