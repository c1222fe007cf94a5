"""--parallel fsdp on 4 forced CPU devices: the sharding rule, equality with one device, bytes per device,
the compiled collectives, checkpoints across device counts and shardings, train.py and resume."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trainer_helpers import SYNTH_ARGS, build, quick, synthetic_batches
from tgq_jax import models
from tgq_jax.models.vit import ViT
from tgq_jax.training import checkpoints, harness, parallel
from tgq_jax.training.configs import Config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A one-block ViT whose kernels (64 x 2 x 32 attention, 64 x 256 MLP) reach the fsdp size threshold:
# vit_tiny's layers with fewer blocks (its six take minutes to compile on two cores).
models.register("fsdp_vit", ViT, patch_size=7, hidden_size=64, depth=1, num_heads=2, mlp_dim=256)


# --- the sharding rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, size, spec", [
  ((3, 3, 64, 128), 4, P(None, None, None, "fsdp")),  # the largest axis
  ((512, 100), 4, P("fsdp", None)),
  ((100, 512), 4, P(None, "fsdp")),
  ((6, 1000), 4, P(None, "fsdp")),
  ((1002, 64), 4, P(None, "fsdp")),  # the largest axis does not divide: the next one that does
  ((1001, 7), 4, P()),  # no axis divides
  ((64, 64), 4, P("fsdp", None)),  # a tie: the first axis
  ((32, 127), 4, P()),  # fewer than 2**12 elements (4064)
  ((64, 64), 1, P()),  # one device: nothing to split
  ((), 4, P()),  # the step, scalar thresholds
  ((2,), 4, P()),  # the raw RNG key
  ((4096,), 2, P("fsdp")),
])
def test_fsdp_spec_shards_the_largest_divisible_axis_of_big_leaves(shape, size, spec):
  assert parallel.fsdp_spec(shape, size) == spec


def test_optimizer_state_leaves_get_their_parameters_sharding():
  cfg = Config(arch="small_cnn", parallel="fsdp", optimizer="adam")
  state = build(cfg).state
  shardings = parallel.state_shardings(state, parallel.make_mesh("fsdp"), "fsdp")
  kernel = shardings.params["conv3"]["kernel"]
  assert kernel.spec == P(None, None, None, "fsdp")
  mirrors = [s for path, s in jax.tree_util.tree_flatten_with_path(shardings.weight_opt_state)[0]
             if jax.tree_util.keystr(path).endswith("['conv3']['kernel']")]
  assert len(mirrors) == 2 and all(m == kernel for m in mirrors)  # Adam's mu and nu of that kernel
  assert shardings.step.spec == P() and shardings.rng.spec == P()
  assert shardings.params["conv3"]["delta"].spec == P()  # a scalar threshold


def test_mesh_shapes_and_one_line_errors():
  assert parallel.mesh_shape("fsdp") == (1, 4)
  assert parallel.mesh_shape("fsdp", 2) == (2, 2)
  assert parallel.mesh_shape("shard_map") == (4,)
  mesh = parallel.make_mesh("fsdp", 2)
  assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (2, 2)
  with pytest.raises(ValueError, match="--fsdp-devices 3 does not divide the device count 4"):
    parallel.mesh_shape("fsdp", 3)
  with pytest.raises(ValueError, match="--no-bn-cross-device does not apply to --parallel fsdp"):
    Config(parallel="fsdp", bn_cross_device=False).validate()
  with pytest.raises(ValueError, match="--fsdp-devices applies to --parallel fsdp only"):
    Config(fsdp_devices=2).validate()
  with pytest.raises(ValueError, match="--fsdp-devices must be an integer >= 0"):
    Config(parallel="fsdp", fsdp_devices=-1).validate()


# --- the step: the same as one device ----------------------------------------------------------------


def _run_one_device(built, batches):
  """The global-view step under plain jax.jit on one device, no mesh: the reference."""
  step = jax.jit(built.train_fn)
  state, losses = jax.device_put(built.state, jax.devices()[0]), []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return parallel.to_host(state), losses


def _run_fsdp(built, batches, fsdp_devices=0):
  mesh = parallel.make_mesh("fsdp", fsdp_devices)
  train, _ = parallel.map_steps(built.train_fn, built.eval_fn, mesh, "fsdp", built.state)
  state, losses = parallel.put_state(built.state, mesh, "fsdp"), []
  for batch in batches:
    state, metrics = train(state, parallel.put_batch(batch, mesh, "fsdp"))
    losses.append(float(parallel.to_host(metrics["loss"])))
  return state, losses


def _untied_batches(n: int, batch_size: int = 16) -> list[dict]:
  """Synthetic batches with a little noise on the images: ternary kernels on the uint8 pixels give exactly
  tied activations, and max-pooling routes their gradient by last-bit rounding (a subgradient choice that
  differs with the summation order, see trainer_helpers); continuous images have no ties."""
  rng = np.random.default_rng(0)
  return [{**b, "image": b["image"] + rng.normal(0, 0.05, b["image"].shape).astype(b["image"].dtype)}
          for b in synthetic_batches(n, batch_size)]


def _sharded_leaves(state) -> int:
  return sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))


@pytest.mark.parametrize("arch, update, fsdp_devices", [
  ("small_cnn", "sequential", 0),  # BatchNorm: statistics over the global batch
  ("fsdp_vit", "sequential", 0),
  ("fsdp_vit", "joint", 2),  # a 2 x 2 mesh: data and fsdp axes both used
])
def test_fsdp_equals_one_device(arch, update, fsdp_devices):
  # In float64, where another summation order (sharded matmuls, the cross-device reductions) only moves
  # the last bits: in float32 that is enough to flip a weight's code at a ternary threshold, or to move
  # Adam's first steps in near-zero gradient elements (as in test_parallel).
  cfg = Config(arch=arch, parallel="fsdp", optimizer="adam", lr=1e-3, update=update)
  with jax.enable_x64(True):
    built = build(cfg, dtype=jnp.float64)
    batches = _untied_batches(3)
    one, l1 = _run_one_device(built, batches)
    sharded, l4 = _run_fsdp(built, batches, fsdp_devices)
    assert _sharded_leaves(sharded.params) >= 3 and _sharded_leaves(sharded.weight_opt_state) >= 6  # kept sharded
    host = parallel.to_host(sharded)
  assert host.params["head"]["kernel"].dtype == np.float64
  np.testing.assert_allclose(l4, l1, rtol=1e-12)
  # (atol: the attention's key bias has an exactly zero gradient, so its values are rounding noise ~1e-12)
  chex.assert_trees_all_close(host.params, one.params, rtol=1e-10, atol=1e-10)
  chex.assert_trees_all_close(host.weight_opt_state, one.weight_opt_state, rtol=1e-10, atol=1e-10)
  chex.assert_trees_all_close(host.batch_stats, one.batch_stats, rtol=1e-10, atol=1e-12)
  assert int(host.step) == 3
  assert not np.allclose(host.params["head"]["kernel"], built.state.params["head"]["kernel"])  # it trained


def test_params_and_optimizer_bytes_per_device_are_about_a_quarter():
  # small_cnn: its convolution kernels (the bulk of the bytes) have 16..128 output channels.
  built = build(Config(arch="small_cnn", parallel="fsdp", optimizer="adam"))

  def part(state):
    return state.params, state.threshold_opt_state, state.weight_opt_state

  replicated = parallel.put_state(built.state, parallel.make_mesh(), "shard_map")
  sharded = parallel.put_state(built.state, parallel.make_mesh("fsdp"), "fsdp")
  total = sum(x.nbytes for x in jax.tree.leaves(part(built.state)))
  assert parallel.device_bytes(part(replicated)) == total
  per_device = [parallel.device_bytes(part(sharded), d) for d in jax.devices()]
  assert max(per_device) <= 0.3 * total, (per_device, total)
  np.testing.assert_array_equal(parallel.to_host(sharded.params["conv3"]["kernel"]),
                                built.state.params["conv3"]["kernel"])


def test_compiled_step_gathers_each_layer_and_keeps_the_state_sharded():
  """What XLA made of the global-view step: a per-layer all-gather of each sharded kernel where it is used,
  the kernel gradients reduced across the devices (a reduce-scatter; XLA:CPU writes it as an all-reduce
  followed by a dynamic-slice of the device's part), and state arguments and results 1/4 size per device."""
  built = build(Config(arch="small_cnn", parallel="fsdp", optimizer="adam"))
  mesh = parallel.make_mesh("fsdp")
  train, _ = parallel.map_steps(built.train_fn, built.eval_fn, mesh, "fsdp", built.state)
  state = parallel.put_state(built.state, mesh, "fsdp")
  compiled = train.lower(state, parallel.put_batch(synthetic_batches(1, 16)[0], mesh, "fsdp")).compile()
  hlo = compiled.as_text()
  gathered = re.findall(r"= f32\[([\d,]+)\]\S* all-gather\(", hlo)
  sharded = {",".join(map(str, x.shape)) for x in jax.tree.leaves(built.state.params) if x.size >= 2 ** 12}
  assert sharded == {"3,3,16,32", "3,3,32,64", "3,3,64,128"}
  assert set(gathered) == sharded  # each sharded kernel gathered whole, nothing else (no optimizer state)
  reduced = re.findall(r"= \(?([^=]*?)\)? (?:all-reduce|reduce-scatter)\(", hlo)
  for shape in sharded:
    assert any(f"f32[{shape}]" in r for r in reduced), shape  # its gradient, summed over the devices
  in_state, _ = compiled.input_shardings[0]
  out_state, _ = compiled.output_shardings
  expected = parallel.state_shardings(built.state, mesh, "fsdp")
  for got, want in [(in_state, expected), (out_state, expected)]:
    assert all(g.is_equivalent_to(w, 4) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected)))
  total = sum(x.nbytes for x in jax.tree.leaves(built.state))
  assert compiled.memory_analysis().argument_size_in_bytes < 0.35 * total  # no full state up front


# --- checkpoints -----------------------------------------------------------------------------------


def _mesh_of(devices: int) -> Mesh:
  return Mesh(np.asarray(jax.devices()[:devices]).reshape(1, devices), ("data", "fsdp"))


@pytest.fixture(scope="module")
def trained():
  """(Built, a state sharded on 4 devices after one step) of small_cnn."""
  built = build(Config(arch="small_cnn", parallel="fsdp", optimizer="adam", lr=1e-3))
  state, _ = _run_fsdp(built, synthetic_batches(1, 16))
  return built, state


def test_checkpoint_saved_sharded_on_4_devices_restores_on_2_and_replicated(tmp_path, trained):
  built, state = trained
  host = parallel.to_host(state)
  manager = checkpoints.make_manager(str(tmp_path / "ck"))
  checkpoints.save(manager, 1, state, {"iterator": 1}, host_state=host)  # the sharded arrays as they are
  manager.wait_until_finished()

  two = _mesh_of(2)
  shardings = parallel.fsdp_shardings(built.state, two)
  restored, data = checkpoints.restore(manager, host, shardings=shardings)
  kernel = restored.params["conv3"]["kernel"]
  assert kernel.sharding == NamedSharding(two, P(None, None, None, "fsdp"))
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 64, 64)}
  chex.assert_trees_all_equal(parallel.to_host(restored), host)
  assert data == {"iterator": 1}

  as_host, _ = checkpoints.restore(manager, host)  # no shardings: host arrays (a replicated run)
  assert isinstance(as_host.params["conv3"]["kernel"], np.ndarray)
  chex.assert_trees_all_equal(as_host, host)
  chex.assert_trees_all_equal(checkpoints.load_variables(str(tmp_path / "ck"))["params"], host.params)


def test_replicated_checkpoint_restores_under_fsdp(tmp_path, trained):
  _, state = trained
  host = parallel.to_host(state)
  manager = checkpoints.make_manager(str(tmp_path / "ck"))
  checkpoints.save(manager, 1, host, {"iterator": 1})  # host arrays, as shard_map / pmap runs save
  mesh = parallel.make_mesh("fsdp")
  restored, _ = checkpoints.restore(manager, host, shardings=parallel.state_shardings(host, mesh, "fsdp"))
  assert restored.params["conv3"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
  chex.assert_trees_all_equal(parallel.to_host(restored), host)


def test_nothing_non_finite_is_saved_from_sharded_arrays(tmp_path, trained):
  _, state = trained
  kernel = state.params["conv3"]["kernel"]
  poisoned = kernel.at[0, 0, 0, -1].set(jnp.nan)  # in the last device's shard
  assert poisoned.sharding.is_equivalent_to(kernel.sharding, 4)
  bad = state.replace(params={**state.params, "conv3": {**state.params["conv3"], "kernel": poisoned}})
  manager = checkpoints.make_manager(str(tmp_path / "ck"))
  with pytest.raises(checkpoints.NonFiniteStateError, match="params/conv3/kernel"):
    checkpoints.save(manager, 1, bad, {"iterator": 1})  # host copies made from the shards
  assert manager.all_steps() == []


# --- the harness and train.py ----------------------------------------------------------------------


def _train_rows(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if k != "img_per_sec"} for r in rows if r["split"] == "train"]


def test_fsdp_resume_2_plus_2_equals_4_bitwise_and_matches_shard_map_either_way(tmp_path):
  a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  harness.train_and_evaluate(quick(a, parallel="fsdp", max_steps=2), verbose=False)
  harness.train_and_evaluate(quick(a, parallel="fsdp", max_steps=4), verbose=False)
  harness.train_and_evaluate(quick(b, parallel="fsdp", max_steps=4), verbose=False)
  assert _train_rows(a) == _train_rows(b)
  chex.assert_trees_all_equal(*(checkpoints.load_variables(str(d)) for d in (a, b)))
  harness.train_and_evaluate(quick(c, max_steps=4), verbose=False)  # data parallel (shard_map)
  np.testing.assert_allclose([r["loss"] for r in _train_rows(a)], [r["loss"] for r in _train_rows(c)], rtol=1e-5)
  d = tmp_path / "d"  # a replicated run's checkpoint resumed under fsdp
  harness.train_and_evaluate(quick(d, max_steps=2), verbose=False)
  harness.train_and_evaluate(quick(d, parallel="fsdp", fsdp_devices=2, max_steps=4), verbose=False)
  np.testing.assert_allclose([r["loss"] for r in _train_rows(d)], [r["loss"] for r in _train_rows(c)], rtol=1e-5)


@pytest.mark.slow
def test_train_py_parallel_fsdp_runs_and_resumes(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  cmd = [sys.executable, os.path.join(REPO, "train.py"), *SYNTH_ARGS, "--arch", "small_cnn", "--batch-size", "16",
         "--eval-batch-size", "64", "--log-every", "1", "--workdir", str(tmp_path), "--parallel", "fsdp",
         "--fsdp-devices", "2"]
  first = subprocess.run([*cmd, "--max-steps", "2"], env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "test accuracy" in first.stdout
  second = subprocess.run([*cmd, "--max-steps", "3"], env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming from step 2" in second.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 3 and summary["config"]["parallel"] == "fsdp"
  assert [r["step"] for r in _train_rows(tmp_path)] == [1, 2, 3]


def test_fsdp_memory_benchmark_counts_what_placement_holds(capsys):
  import importlib.util

  spec = importlib.util.spec_from_file_location("fsdp_memory", os.path.join(REPO, "benchmarks", "fsdp_memory.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  bench.main(["--arch", "small_cnn", "--input-shape", "28", "28", "1", "--num-classes", "10"])
  row = capsys.readouterr().out.splitlines()[-1].split()
  assert row[0] == "small_cnn" and float(row[-1]) <= 0.3
  # Its abstract count equals the bytes device 0 really holds once the state is placed.
  cfg = Config(arch="small_cnn", parallel="fsdp", optimizer="adam")
  abstract = bench.abstract_state("small_cnn", cfg, 10, (28, 28, 1), "float32")
  mesh = parallel.make_mesh("fsdp")
  placed = parallel.put_state(build(cfg).state, mesh, "fsdp")
  part = (placed.params, placed.threshold_opt_state, placed.weight_opt_state)
  abstract_part = (abstract.params, abstract.threshold_opt_state, abstract.weight_opt_state)
  assert bench.bytes_per_device(abstract_part, parallel.state_shardings(abstract_part, mesh, "fsdp")) == \
    parallel.device_bytes(part, jax.devices()[0])
