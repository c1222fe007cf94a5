"""shard_map vs pmap vs one device (4 forced CPU devices), and a real two-process run on localhost."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer_helpers import SYNTH_ARGS, build, mesh_of, run_steps, synthetic_batches
from tgq_jax.training import checkpoints, parallel
from tgq_jax.training.configs import Config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _batches(n=3, batch_size=16):
  return synthetic_batches(n, batch_size)


def _close(a, b, **kw):
  chex.assert_trees_all_close(a, b, **kw)


@pytest.mark.parametrize("update", ["sequential", "joint"])
def test_shard_map_pmap_and_one_device_agree_without_batchnorm(update):
  assert jax.device_count() == 4
  cfg = Config(arch="nobn", optimizer="adam", lr=1e-2, update=update)
  *_, state, train_fn, _ = build(cfg)
  batches = _batches()
  one, l1 = run_steps(train_fn, state, batches, mesh_of(1), "shard_map")
  sm, l2 = run_steps(train_fn, state, batches, mesh_of(4), "shard_map")
  pm, l3 = run_steps(train_fn, state, batches, mesh_of(4), "pmap")
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  np.testing.assert_allclose(l2, l3, rtol=1e-6)
  _close(one.params, sm.params, rtol=1e-4, atol=1e-6)
  _close(sm.params, pm.params, rtol=1e-5, atol=1e-7)
  assert int(sm.step) == 3


@pytest.mark.parametrize("bn_running_stats, kinds", [("once", ("shard_map", "pmap")), ("authors", ("shard_map",))])
def test_one_and_four_devices_agree_with_batchnorm(bn_running_stats, kinds):
  # BatchNorm statistics over the global batch (the default): the device count does not matter.
  # In float64, where a different summation order only moves the last bits: in float32 that is
  # enough to flip the code of a weight at a ternary threshold, or Adam's first steps blow it up
  # in near-zero gradient elements. A ResNet (no max-pooling: see trainer_helpers).
  cfg = Config(arch="tiny_resnet", optimizer="adam", lr=1e-2, bn_running_stats=bn_running_stats)
  shape = (8, 8, 1)
  with jax.enable_x64(True):
    *_, state, train_fn, _ = build(cfg, image_shape=shape, dtype=jnp.float64)
    batches = synthetic_batches(3, 16, image_shape=shape)
    one, l1 = run_steps(train_fn, state, batches, mesh_of(1), "shard_map")
    four = {kind: run_steps(train_fn, state, batches, mesh_of(4), kind) for kind in kinds}
  assert one.params["conv1"]["kernel"].dtype == np.float64
  for kind, (other, losses) in four.items():
    np.testing.assert_allclose(losses, l1, rtol=1e-12, err_msg=kind)
    _close(other.params, one.params, rtol=1e-10, atol=1e-12)
    _close(other.batch_stats, one.batch_stats, rtol=1e-10, atol=1e-12)
  assert not np.allclose(one.batch_stats["bn1"]["var"], state.batch_stats["bn1"]["var"])  # they did move


def test_per_device_batchnorm_is_an_option_and_differs_from_one_device():
  # --no-bn-cross-device: each device normalizes with its own shard's statistics (torch
  # DataParallel); the running statistics are averaged over the devices after each step.
  cfg = Config(arch="tiny_cnn", optimizer="adam", lr=1e-2, bn_cross_device=False)
  *_, state, train_fn, _ = build(cfg)
  batches = _batches()
  one, l1 = run_steps(train_fn, state, batches, mesh_of(1), "shard_map")
  sm, l2 = run_steps(train_fn, state, batches, mesh_of(4), "shard_map")
  pm, _ = run_steps(train_fn, state, batches, mesh_of(4), "pmap")
  _close(sm.params, pm.params, rtol=1e-5, atol=1e-7)
  _close(sm.batch_stats, pm.batch_stats, rtol=1e-5, atol=1e-7)
  assert abs(l1[-1] - l2[-1]) > 1e-4  # 4 shards of 4 images are not one batch of 16


def test_batch_size_not_divisible_is_a_one_line_error():
  with pytest.raises(ValueError, match="not divisible by the device count 4"):
    parallel.check_batch_size(30)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, *extra):
  # A ResNet on small images: BatchNorm statistics go through the cross-process all-reduce,
  # and without max-pooling, whose gradient routing at exactly tied activations (ternary
  # kernels on uint8 images) follows last-bit rounding, which differs with the reduction order.
  return [sys.executable, os.path.join(REPO, "train.py"), *SYNTH_ARGS, "--image-shape", "8", "8", "1",
          "--arch", "resnet20", "--batch-size", "16", "--eval-batch-size", "64", "--max-steps", "3",
          "--log-every", "1", "--workdir", str(workdir), "--optimizer", "sgd", "--lr", "0.01", *extra]


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # compile fast, as conftest does in-process
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _losses(workdir):
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shard_map", "pmap"])
def test_two_processes_agree_with_one_process_on_four_devices(tmp_path, kind):
  """jax.distributed on localhost (gloo CPU collectives), 2 devices each, vs 1 process x 4 devices."""
  port = _free_port()
  procs = [subprocess.Popen(_train_cmd(tmp_path / "multi", "--parallel", kind,
                                       "--coordinator-address", f"localhost:{port}",
                                       "--num-processes", "2", "--process-id", str(i)),
                            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  single = subprocess.run(_train_cmd(tmp_path / "single", "--parallel", kind), env=_env(4),
                          capture_output=True, text=True, timeout=240)
  assert single.returncode == 0, single.stderr[-3000:]
  np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"), rtol=1e-5)
  multi = checkpoints.load_variables(str(tmp_path / "multi"))
  one = checkpoints.load_variables(str(tmp_path / "single"))
  _close(multi, one, rtol=1e-5, atol=1e-6)
