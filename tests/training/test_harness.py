"""Trainer steps and loop: learning, sequential vs joint semantics, resume, NaN guard, --init-from."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys

import chex
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from torchvision_helpers import fake_state_dict
from trainer_helpers import build, mesh_of, quick, run_steps, synthetic_batches
from tgq_jax.training import checkpoints, harness
from tgq_jax.training import workdir as workdir_lib
from tgq_jax import data, ternarize
from tgq_jax.training.configs import Config
from tgq_jax.training import algorithm
from tgq_jax.frontends.linen_layers import TernaryDense, quantized_layers


def _batches(n, batch_size=32, seed=0):
  return synthetic_batches(n, batch_size, seed)


def test_a_few_steps_lower_the_loss():
  cfg = Config(arch="tiny_cnn", optimizer="adam", lr=1e-2)
  *_, state, train_fn, _ = build(cfg)
  batch = _batches(1)[0]
  _, losses = run_steps(train_fn, state, [batch] * 8, mesh_of(1), "shard_map")
  assert losses[-1] < losses[0] - 0.05 and losses[-1] == min(losses), losses


class OneDense(nn.Module):
  """logits = x @ ternarize(W, delta): small enough to compute the update by hand (with jax.grad)."""

  @nn.compact
  def __call__(self, x, train=False):
    return TernaryDense(3, use_bias=False, name="d")(x)


def _hand_case(update, clip):
  cfg = Config(optimizer="sgd", momentum=0.0, lr=0.5, threshold_lr=0.2, lr_schedule="step",
               threshold_grad_clip=clip, update=update)
  model = OneDense()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
  y = jnp.asarray([0, 1, 2, 1], jnp.int32)
  layers = quantized_layers(model, x)
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  params = {"d": {"kernel": params["d"]["kernel"], "delta": jnp.float32(0.3)}}
  tga, _ = harness.make_tga(cfg, algorithm.param_labels(params, layers), 10)
  state0 = algorithm.state_from_variables({"params": params}, tga, jax.random.PRNGKey(0))
  fn, _ = harness.make_step_fns(model, tga, cfg, 3)
  new, _ = run_steps(fn, state0, [{"image": np.asarray(x), "label": np.asarray(y)}], mesh_of(1), "shard_map")

  def loss(w, delta):
    logits = x @ ternarize(w, {"delta": delta})
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return cfg, params["d"]["kernel"], params["d"]["delta"], loss, new.params["d"]


@pytest.mark.parametrize("clip", [10.0, 1e-3])
def test_sequential_uses_the_updated_threshold_for_the_weight_gradient(clip):
  cfg, w0, d0, loss, got = _hand_case("sequential", clip)
  g_d = jax.grad(loss, 1)(w0, d0)
  d1 = d0 - cfg.threshold_lr * jnp.clip(g_d, -clip, clip)
  w1 = w0 - cfg.lr * jax.grad(loss, 0)(w0, d1)  # weight gradient at the *new* threshold
  np.testing.assert_allclose(got["delta"], d1, rtol=1e-6)
  np.testing.assert_allclose(got["kernel"], w1, rtol=1e-5, atol=1e-7)
  if clip == 1e-3:  # the reference's clamp of delta's gradient is active here
    assert abs(float(g_d)) > 1e-3 and abs(float(d0 - d1)) == pytest.approx(cfg.threshold_lr * 1e-3, rel=1e-4)


def test_joint_uses_the_old_threshold_and_differs_from_sequential():
  cfg, w0, d0, loss, got = _hand_case("joint", 10.0)
  d1 = d0 - cfg.threshold_lr * jax.grad(loss, 1)(w0, d0)
  w1 = w0 - cfg.lr * jax.grad(loss, 0)(w0, d0)
  np.testing.assert_allclose(got["delta"], d1, rtol=1e-6)
  np.testing.assert_allclose(got["kernel"], w1, rtol=1e-5, atol=1e-7)
  seq = _hand_case("sequential", 10.0)[-1]
  assert not np.allclose(seq["kernel"], got["kernel"], rtol=1e-5, atol=1e-7)


def _decay_updates(cfg):
  """Both optimizers' first updates for zero gradients: what weight decay alone does."""
  built = build(cfg)
  state = built.state
  tx_thr, tx_w = built.tga.optimizers(state.params)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  u_thr, _ = tx_thr.update(zeros, state.threshold_opt_state, state.params)
  u_w, _ = tx_w.update(zeros, state.weight_opt_state, state.params)
  return built.tga.labels, state.params, u_thr, u_w


def test_sgd_pairing_decays_thresholds_like_weights():
  # The authors' --optimizer SGD: both groups SGD with the same lr and the same weight decay.
  labels, params, u_thr, u_w = _decay_updates(
    Config(arch="tiny_cnn", optimizer="sgd", momentum=0.0, lr=0.1, weight_decay=0.5))
  np.testing.assert_allclose(u_thr["conv0"]["delta"], -0.1 * 0.5 * params["conv0"]["delta"], rtol=1e-6)
  np.testing.assert_allclose(u_w["conv0"]["kernel"], -0.1 * 0.5 * params["conv0"]["kernel"], rtol=1e-6)
  assert not np.any(u_w["conv0"]["delta"]) and not np.any(u_thr["conv0"]["kernel"])
  assert labels["conv0"]["delta"] == "threshold" and labels["bn0"]["scale"] == "weight"


def test_adam_pairing_thresholds_take_nesterov_sgd_without_decay():
  # The authors' --optimizer Adam: thresholds SGD(momentum, nesterov), weight decay 0, same lr.
  cfg = Config(arch="tiny_cnn", optimizer="adam", lr=0.1, momentum=0.9, weight_decay=0.5, lr_schedule="step")
  assert harness.threshold_recipe(cfg) == ("sgd", 0.1, 0.0)
  _, params, u_thr, u_w = _decay_updates(cfg)
  assert not np.any(u_thr["conv0"]["delta"])
  assert np.any(u_w["conv0"]["kernel"])  # Adam's step of the decay term alone
  # Two steps of a constant gradient g: torch's nesterov SGD moves -lr*g*(1+m), then -lr*g*(1+m+m^2).
  built = build(cfg)
  state, (tx_thr, _) = built.state, built.tga.optimizers(built.state.params)
  g = jax.tree.map(lambda x: jnp.full_like(x, 1e-4), state.params)
  u1, s1 = tx_thr.update(g, state.threshold_opt_state, state.params)
  u2, _ = tx_thr.update(g, s1, state.params)
  np.testing.assert_allclose(u1["conv0"]["delta"], -0.1 * 1e-4 * 1.9, rtol=1e-5)
  np.testing.assert_allclose(u2["conv0"]["delta"], -0.1 * 1e-4 * (1 + 0.9 + 0.81), rtol=1e-5)


def test_explicit_threshold_options_override_the_pairing():
  cfg = Config(optimizer="sgd", lr=0.1, weight_decay=1e-4, threshold_optimizer="adam",
               threshold_lr=1e-3, threshold_weight_decay=0.0)
  assert harness.threshold_recipe(cfg) == ("adam", 1e-3, 0.0)


def _train_records(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k != "img_per_sec"} for r in rows if r["split"] == "train"]


def test_resume_2_plus_2_equals_4_bitwise(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  harness.train_and_evaluate(quick(a, max_steps=2), verbose=False)
  harness.train_and_evaluate(quick(a, max_steps=4), verbose=False)
  harness.train_and_evaluate(quick(b, max_steps=4), verbose=False)
  assert _train_records(a) == _train_records(b)
  pa, pb = (checkpoints.load_variables(str(d)) for d in (a, b))
  chex.assert_trees_all_equal(pa, pb)
  summary = json.loads((a / "summary.json").read_text())
  assert summary["steps"] == 4 and summary["config"]["max_steps"] == 4


def test_same_seed_same_metrics_and_summary(tmp_path):
  s1 = harness.train_and_evaluate(quick(tmp_path / "x", max_steps=3), verbose=False)
  s2 = harness.train_and_evaluate(quick(tmp_path / "y", max_steps=3), verbose=False)
  assert _train_records(tmp_path / "x") == _train_records(tmp_path / "y")
  assert s1["test_accuracy"] == s2["test_accuracy"]
  for key in ("test_accuracy", "best_test_accuracy", "steps", "wall_seconds", "config"):
    assert key in json.loads((tmp_path / "x" / "summary.json").read_text())
  test_rows = [json.loads(x) for x in open(tmp_path / "x" / "metrics.jsonl") if '"test"' in x]
  assert {"sparsity", "threshold", "scale"} <= set(test_rows[-1]["layers"][0])


class _PoisonedDataset:
  """The synthetic dataset whose 3rd training batch is NaN."""

  def __init__(self, inner):
    self._inner, self.info, self.wrap_step = inner, inner.info, inner.wrap_step

  def eval_batches(self, **kw):
    return self._inner.eval_batches(**kw)

  def train_iterator(self, **kw):
    return _PoisonedIterator(self._inner.train_iterator(**kw))


class _PoisonedIterator:
  def __init__(self, inner):
    self._inner, self.steps_per_epoch, self._count = inner, inner.steps_per_epoch, 0

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)

  def __iter__(self):
    return self

  def __next__(self):
    batch, self._count = next(self._inner), self._count + 1
    return {**batch, "image": batch["image"] * np.nan} if self._count == 3 else batch


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real = data.get_dataset
  monkeypatch.setattr(harness.data_lib, "get_dataset", lambda *a, **k: _PoisonedDataset(real(*a, **k)))
  with pytest.raises(harness.NonFiniteLossError, match="at step 3.*step 2"):
    harness.train_and_evaluate(quick(tmp_path, checkpoint_every=2, log_every=10), verbose=False)
  manager = checkpoints.make_manager(str(tmp_path / "checkpoints"))
  assert manager.latest_step() == 2


def test_init_from_loads_fp_weights_and_reinitializes_thresholds(tmp_path):
  fp_dir = tmp_path / "fp"
  harness.train_and_evaluate(quick(fp_dir, quantizer="fp", max_steps=2), verbose=False)
  cfg = quick(tmp_path / "tern", init_from=str(fp_dir))
  model, _, tga, state, _, _ = build(cfg)
  new = harness.init_from_checkpoint(state, str(fp_dir), model, (28, 28, 1), tga)
  src = checkpoints.load_variables(str(fp_dir))
  np.testing.assert_array_equal(new.params["conv1"]["kernel"], src["params"]["conv1"]["kernel"])
  np.testing.assert_array_equal(new.batch_stats["bn0"]["mean"], src["batch_stats"]["bn0"]["mean"])
  np.testing.assert_allclose(new.params["conv1"]["delta"], 0.05 * np.abs(src["params"]["conv1"]["kernel"]).max(),
                             rtol=1e-6)
  # The whole flow: fine-tune one step from the FP checkpoint.
  summary = harness.train_and_evaluate(dataclasses.replace(cfg, max_steps=1), verbose=False)
  assert summary["steps"] == 1


def test_init_from_errors(tmp_path):
  fp_dir = tmp_path / "fp"
  harness.train_and_evaluate(quick(fp_dir, quantizer="fp", max_steps=1), verbose=False)
  with pytest.raises(checkpoints.CheckpointError, match="another architecture"):
    harness.train_and_evaluate(quick(tmp_path / "w", arch="tiny_cnn_wide", init_from=str(fp_dir)),
                                 verbose=False)
  with pytest.raises(checkpoints.CheckpointError, match="no such"):
    harness.train_and_evaluate(quick(tmp_path / "v", init_from=str(tmp_path / "missing")), verbose=False)


def test_eval_only_reproduces_the_final_test_accuracy(tmp_path):
  trained = harness.train_and_evaluate(quick(tmp_path, max_steps=2), verbose=False)
  again = harness.train_and_evaluate(quick(tmp_path, max_steps=2, eval_only=True), verbose=False)
  assert again["steps"] == 2 and again["test_accuracy"] == trained["test_accuracy"]


def test_half_precision_computes_in_bfloat16_with_float32_params(tmp_path):
  cfg = quick(tmp_path, max_steps=2, half_precision=True)
  _, model, _, _ = harness.setup(cfg)
  assert model.module.dtype == jnp.bfloat16  # the zoo model inside its ternarize_model wrapper
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)), train=False)
  logits, state = model.apply(variables, jnp.ones((2, 28, 28, 1)), train=False, capture_intermediates=True,
                              mutable=["intermediates"])
  inter = state["intermediates"]
  assert inter["conv0"]["__call__"][0].dtype == jnp.bfloat16  # the convolutions run in bfloat16
  assert inter["bn1"]["__call__"][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32  # logits (and the loss) in float32
  summary = harness.train_and_evaluate(cfg, verbose=False)
  assert np.isfinite(summary["test_metrics"]["loss"])
  params = checkpoints.load_variables(str(tmp_path))["params"]
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_top5_against_an_independent_count():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 20)).astype(np.float32)
  labels = rng.integers(0, 20, 64)
  metrics = algorithm.classification_metrics(jnp.asarray(logits), jnp.asarray(labels), 20)
  beaten_by = (logits > logits[np.arange(64), labels][:, None]).sum(axis=1)  # classes scoring above the label
  np.testing.assert_array_equal(metrics["accuracy"], beaten_by == 0)
  np.testing.assert_array_equal(metrics["top5_accuracy"], beaten_by < 5)
  assert np.mean(beaten_by < 5) > np.mean(beaten_by == 0) > 0  # a case where they differ
  assert "top5_accuracy" not in algorithm.classification_metrics(jnp.asarray(logits[:, :10]), jnp.asarray(labels % 10), 10)


def test_top5_is_reported_by_the_step_beyond_ten_classes():
  cfg = Config(arch="tiny_cnn")
  *_, state, train_fn, _ = build(cfg, num_classes=20)
  batch = _batches(1)[0]
  step = harness.parallel.map_step(train_fn, mesh_of(1), "shard_map")
  _, metrics = step(state, harness.parallel.put_batch(batch, mesh_of(1), "shard_map"))
  assert float(metrics["accuracy"]) <= float(metrics["top5_accuracy"]) <= 1.0


def test_a_workdir_of_another_configuration_is_a_clear_error(tmp_path):
  harness.train_and_evaluate(quick(tmp_path, max_steps=1), verbose=False)
  record = json.loads((tmp_path / workdir_lib.RUN_CONFIG).read_text())
  assert record["config"]["arch"] == "tiny_cnn" and record["dataset_info"]["image_shape"] == [28, 28, 1]
  with pytest.raises(ValueError, match="--arch 'tiny_cnn' there, 'tiny_cnn_wide' now"):
    harness.train_and_evaluate(quick(tmp_path, max_steps=2, arch="tiny_cnn_wide"), verbose=False)


def test_train_rows_log_the_threshold_trajectories(tmp_path):
  harness.train_and_evaluate(quick(tmp_path, max_steps=3), verbose=False)
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  final = checkpoints.load_variables(str(tmp_path))["params"]
  assert set(train_rows[-1]["delta"]) == {"conv0", "conv1", "head"}
  for name, value in train_rows[-1]["delta"].items():
    assert value == pytest.approx(float(abs(final[name]["delta"])), rel=1e-6)
  assert train_rows[0]["delta"] != train_rows[-1]["delta"]  # the thresholds do train


# --- --init-from a torchvision state dict ---------------------------------------


def _torchvision_npz(tmp_path, arch="resnet18", num_classes=10):
  path = tmp_path / f"{arch}.npz"
  sd = fake_state_dict(arch, seed=3, num_classes=num_classes)
  np.savez(path, **sd)  # what docs/torchvision.md's one-liner writes
  return str(path), sd


def _resnet18_cfg(tmp_path, init_from, **kw):
  return Config(arch="resnet18", dataset="synthetic", image_shape=(32, 32, 3), num_classes=10, num_train=8,
                num_test=8, batch_size=4, eval_batch_size=8, workdir=str(tmp_path / "run"), init_from=init_from,
                log_every=1, **kw)


def test_init_from_a_torchvision_npz_loads_it_and_reinitializes_the_thresholds(tmp_path):
  path, sd = _torchvision_npz(tmp_path)
  cfg = _resnet18_cfg(tmp_path, path)
  model, _, tga, state, _, _ = build(cfg, image_shape=(32, 32, 3))
  new = harness.init_from_checkpoint(state, path, model, (32, 32, 3), tga, arch="resnet18")
  p, s = new.params, new.batch_stats
  np.testing.assert_array_equal(p["layer2_0"]["downsample_conv"]["kernel"],
                                sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(s["layer3_1"]["bn2"]["var"], sd["layer3.1.bn2.running_var"])
  for module, key in (("conv1", "conv1.weight"), ("fc", "fc.weight")):  # first and last ternary too
    np.testing.assert_allclose(p[module]["delta"], 0.05 * np.abs(sd[key]).max(), rtol=1e-6)
  np.testing.assert_allclose(p["layer4_1"]["conv2"]["delta"], 0.05 * np.abs(sd["layer4.1.conv2.weight"]).max(),
                             rtol=1e-6)
  # The whole flow, as `train.py --config imagenet_resnet18 --init-from resnet18.npz ...` runs it.
  summary = harness.train_and_evaluate(dataclasses.replace(cfg, max_steps=1), verbose=False)
  assert summary["steps"] == 1 and np.isfinite(summary["test_metrics"]["loss"])


def test_init_from_torchvision_errors(tmp_path):
  path34, _ = _torchvision_npz(tmp_path, "resnet34")
  with pytest.raises(checkpoints.CheckpointError, match=r"does not match torchvision resnet18"):
    harness.load_fp_variables(path34, "resnet18")
  with pytest.raises(checkpoints.CheckpointError, match="no such torchvision state dict file"):
    harness.check_init_from(str(tmp_path / "missing.npz"))
  path, _ = _torchvision_npz(tmp_path, num_classes=1000)
  model, _, tga, state, _, _ = build(_resnet18_cfg(tmp_path, path), image_shape=(32, 32, 3))
  with pytest.raises(checkpoints.CheckpointError, match=r"another architecture.*fc/kernel: got \(512, 1000\)"):
    harness.init_from_checkpoint(state, path, model, (32, 32, 3), tga, arch="resnet18")


def test_init_from_a_pth_needs_torch(tmp_path, monkeypatch):
  pth = tmp_path / "resnet18.pth"
  pth.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, installed or not
  with pytest.raises(checkpoints.CheckpointError, match=r"(?s)needs torch.*np\.savez"):
    harness.load_fp_variables(str(pth), "resnet18")


@pytest.mark.parametrize("preset, expected", [
  ("imagenet_resnet18", ("adam", 1e-4, 5e-6, ("sgd", 1e-4, 0.0))),
  ("imagenet_resnet34", ("adam", 1e-4, 5e-6, ("sgd", 1e-4, 0.0))),
  ("imagenet_resnet50", ("adam", 1e-4, 5e-6, ("sgd", 1e-4, 0.0))),
  ("cifar10_resnet20", ("sgd", 0.1, 1e-4, ("sgd", 0.1, 1e-4))),
  ("cifar10_resnet56", ("sgd", 0.1, 1e-4, ("sgd", 0.1, 1e-4))),
  ("demo", ("adam", 5e-3, 0.0, ("sgd", 5e-3, 0.0))),
])
def test_presets_follow_the_authors_optimizer_pairs(preset, expected):
  """main_dc.py: Adam weights -> Nesterov SGD thresholds without decay; SGD -> the same SGD for both."""
  from tgq_jax.training import configs
  cfg = configs.from_args(["--config", preset])
  assert (cfg.optimizer, cfg.lr, cfg.weight_decay, harness.threshold_recipe(cfg)) == expected
  assert (cfg.momentum, cfg.nesterov, cfg.threshold_grad_clip) == (0.9, True, 0.001)


def test_dropout_draws_a_fresh_key_from_the_state_every_step():
  cfg = Config(arch="dropout_net", optimizer="sgd", lr=0.1)
  model, *_, state, train_fn, _ = build(cfg)
  batch = _batches(1)[0]
  step = harness.parallel.map_step(train_fn, mesh_of(1), "shard_map")
  put = lambda b: harness.parallel.put_batch(b, mesh_of(1), "shard_map")
  new, metrics = step(state, put(batch))
  # The key the step documents: split off TrainState.rng, folded with the device index (0 here).
  next_rng, rngs = algorithm.step_rngs(state.rng)
  dropout_rng = rngs["dropout"]
  np.testing.assert_array_equal(new.rng, next_rng)
  assert not np.array_equal(new.rng, state.rng)

  def loss(key):
    logits = model.apply({"params": state.params}, batch["image"], train=True, rngs={"dropout": key})
    return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])))

  # Pass 1 runs at the step's starting params, so its loss is reproducible from outside.
  assert float(metrics["threshold_pass_loss"]) == pytest.approx(loss(jax.random.fold_in(dropout_rng, 0)), rel=1e-6)
  assert loss(jax.random.fold_in(dropout_rng, 0)) != pytest.approx(loss(jax.random.fold_in(next_rng, 0)), rel=1e-3)
  no_dropout = model.apply({"params": state.params}, batch["image"], train=False)
  assert float(metrics["threshold_pass_loss"]) != pytest.approx(
    float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(no_dropout, batch["label"]))), rel=1e-3)


def test_init_from_a_pth_when_torch_is_installed(tmp_path):
  torch = pytest.importorskip("torch")
  npz, sd = _torchvision_npz(tmp_path)
  pth = tmp_path / "resnet18.pth"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, pth)
  jax.tree.map(np.testing.assert_array_equal, harness.load_fp_variables(str(pth), "resnet18"),
               harness.load_fp_variables(npz, "resnet18"))
# --- divergence: the documented rule; nothing diverged is ever saved (issue 12) ----------------


def _saved_states(workdir) -> dict[int, dict]:
  """Every checkpoint of a workdir as saved (verified against its checksums)."""
  manager = checkpoints.make_manager(str(workdir / "checkpoints"))
  return {step: checkpoints._restore_verified(manager, step, None)[0] for step in manager.all_steps()}


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


def test_sgd_blowing_up_stops_with_only_finite_checkpoints(tmp_path):
  """The issue's `--optimizer sgd --lr 1e3 --checkpoint-every 1` (there BatchNorm's variance went inf and was saved)."""
  with pytest.raises(harness.DivergenceError, match=r"^training diverged at step \d+: .*; stopping \(") as err:
    harness.train_and_evaluate(quick(tmp_path, optimizer="sgd", lr=1e3, checkpoint_every=1), verbose=False)
  saved = _saved_states(tmp_path)
  assert all(_all_finite(state) for state in saved.values())
  kept = f"the newest checkpoint, step {max(saved)}, is kept" if saved else "no checkpoint was written"
  assert str(err.value).endswith(f"({kept}).")


def test_a_non_finite_batch_statistic_is_never_saved_even_with_a_normal_loss(tmp_path, monkeypatch):
  """BatchNorm's running variance goes inf from step 3 while the loss looks fine (train mode uses batch
  statistics): the state check before each save stops the run and step 2 stays the newest checkpoint."""
  real = harness.make_step_fns

  def poisoned(*args, **kwargs):
    train, evaluate = real(*args, **kwargs)

    def step(state, batch):
      state, metrics = train(state, batch)
      stats = flax.core.unfreeze(state.batch_stats)
      stats["bn0"]["var"] = jnp.where(state.step >= 3, jnp.inf, stats["bn0"]["var"])
      return state.replace(batch_stats=stats), metrics
    return step, evaluate
  monkeypatch.setattr(harness, "make_step_fns", poisoned)
  with pytest.raises(harness.DivergenceError, match=r"^training diverged at step 3: non-finite values in "
                                                      r"batch_stats/bn0/var; stopping \(the newest checkpoint, "
                                                      r"step 2, is kept\)\.$"):
    harness.train_and_evaluate(quick(tmp_path, checkpoint_every=1), verbose=False)
  saved = _saved_states(tmp_path)
  assert sorted(saved) == [1, 2] and all(_all_finite(state) for state in saved.values())


def test_a_loss_far_above_its_running_level_is_divergence(tmp_path):
  """Adam at a huge lr: the loss explodes while staying finite (the issue: lr 1e6, loss 4.8e13, exit 0)."""
  with pytest.raises(harness.DivergenceError, match=r"at step \d+: loss \S+ is more than 10x its running level"):
    # Adam thresholds at a sane rate: the weights alone blow the loss up while it stays finite
    # (with other settings the same run can go straight to NaN, which is the other rule).
    harness.train_and_evaluate(quick(tmp_path, optimizer="adam", lr=1e4, threshold_optimizer="adam",
                                       threshold_lr=1e-4), verbose=False)
  assert all(_all_finite(state) for state in _saved_states(tmp_path).values())


def test_every_weight_of_a_layer_zero_is_divergence(tmp_path):
  """Thresholds run away (the issue's --threshold-lr inf, now refused up front): sparsity 1.0."""
  with pytest.raises(harness.DivergenceError, match=r"at step 1: layer \w+ has sparsity 1\.0 .*no checkpoint"):
    harness.train_and_evaluate(quick(tmp_path, optimizer="adam", threshold_lr=1e6, threshold_grad_clip=1e6),
                                 verbose=False)


def _guard_and_state():
  cfg = quick("unused")
  _, layers, _, state, _, _ = build(cfg)
  return harness.DivergenceGuard(10, layers, last_saved=7), jax.tree.map(np.asarray, state)


def _set(state, field, path, fn):
  tree = flax.serialization.to_state_dict(state)
  node = tree[field]
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = fn(node[path[-1]])
  return flax.serialization.from_state_dict(state, tree)


@pytest.mark.parametrize("field, path, value, message", [
  ("params", ("conv0", "delta"), np.inf, r"layer conv0 has a non-finite threshold \(params/conv0/delta\)"),
  ("params", ("conv1", "kernel"), np.nan, "non-finite values in params/conv1/kernel;"),
  ("batch_stats", ("bn0", "var"), np.inf, "non-finite values in batch_stats/bn0/var;"),
  ("params", ("conv1", "kernel"), 0.0, r"layer conv1 has sparsity 1\.0 \(every weight is zero\)"),
])
def test_the_state_check_names_what_diverged(field, path, value, message):
  guard, state = _guard_and_state()
  guard.check_state(3, state)  # a fresh state is healthy
  bad = _set(state, field, path, lambda x: np.full_like(x, value))
  with pytest.raises(harness.DivergenceError, match=f"^training diverged at step 3: {message}.*step 7, is kept"):
    guard.check_state(3, bad)


@pytest.mark.parametrize("damage, message", [
  # One NaN weight among finite ones (ternarize propagates it; the leaf check names it).
  (lambda k: np.where(np.arange(k.size).reshape(k.shape) == 5, np.nan, k), "non-finite values in params/conv1/kernel;"),
  # Finite weights whose mean overflows float32: every leaf is finite, the layer's scale is not.
  (lambda k: np.linspace(-1e37, 1e37, k.size, dtype=k.dtype).reshape(k.shape),
   r"layer conv1 has non-finite scales \(its weights overflow float32\)"),
])
def test_the_state_check_catches_a_nan_weight_and_non_finite_scales(damage, message):
  guard, state = _guard_and_state()
  bad = _set(state, "params", ("conv1", "kernel"), damage)
  with pytest.raises(harness.DivergenceError, match=f"^training diverged at step 3: {message}"):
    guard.check_state(3, bad)


def test_the_scale_check_computes_the_quantizer_s_scales():
  """The kernel's leaves are finite; the scale the quantizer computes from them (a mean) overflows."""
  _, state = _guard_and_state()
  _, layers, *_ = build(quick("unused"))
  params = _set(state, "params", ("conv1", "kernel"),
                lambda k: np.linspace(-1e37, 1e37, k.size, dtype=k.dtype).reshape(k.shape)).params
  assert not checkpoints.nonfinite_leaves(checkpoints.flat_arrays(params))
  parts = layers[("conv1",)].parts(params["conv1"]["kernel"], {"delta": params["conv1"]["delta"]})
  assert not np.all(np.isfinite(parts.scale))
  assert harness.nonfinite_scales(params, layers) == ["conv1"]
  assert harness.nonfinite_scales(state.params, layers) == []


def test_the_state_check_covers_optimizer_states():
  guard, state = _guard_and_state()
  leaves, treedef = jax.tree.flatten(state.weight_opt_state)
  leaves = [np.full_like(x, np.nan) if x.ndim else x for x in leaves]
  with pytest.raises(harness.DivergenceError, match="non-finite values in weight_opt_state/"):
    guard.check_state(1, state.replace(weight_opt_state=jax.tree.unflatten(treedef, leaves)))


def _feed(guard, losses, grad_norm=1.0):
  for step, loss in enumerate(losses, 1):
    guard.check_step(step, {"loss": np.float32(loss), "grad_norm": np.float32(grad_norm)})


def test_the_loss_rule_lets_normal_training_through():
  guard, _ = _guard_and_state()
  rng = np.random.default_rng(0)
  # 2000 steps from chance (ln 10) to 0.05, noisy, with spikes of 5x the current loss and up to 2.5.
  curve = 2.3 * np.exp(-np.arange(2000) / 300) + 0.05
  losses = curve * rng.uniform(0.5, 1.5, curve.size)
  losses[::97] = np.minimum(5 * curve[::97], 2.5)
  _feed(guard, losses)


@pytest.mark.parametrize("losses, message", [
  ([2.3, 1.9, 40.0], r"step 3: loss 40 is more than 10x its running level 2\.303"),
  ([2.3] * 500 + [8.0] * 500 + [90.0], r"step 1001: loss 90 is more than 10x its running level 7\.96"),
  ([2.3, np.nan], r"step 2: non-finite loss \(nan\)"),
])
def test_the_loss_rule_trips(losses, message):
  guard, _ = _guard_and_state()
  with pytest.raises(harness.DivergenceError, match=message):
    _feed(guard, losses)


def test_a_non_finite_gradient_norm_trips_and_each_step_counts_once():
  guard, _ = _guard_and_state()
  metrics = {"loss": np.float32(1.0), "grad_norm": np.float32(1.0)}
  for _ in range(3):
    guard.check_step(1, metrics)  # the loop may check the same step more than once
  assert guard._running == pytest.approx(0.99 * np.log(10) + 0.01)
  with pytest.raises(harness.DivergenceError, match=r"step 2: non-finite gradient norm \(inf\)"):
    guard.check_step(2, {"loss": np.float32(1.0), "grad_norm": np.float32(np.inf)})


# --- resume after damage, metrics.jsonl rows, workdir checks (issue 12) ------------------------


def _rows(workdir) -> list[tuple[str, int]]:
  return [(r["split"], r["step"]) for r in map(json.loads, open(workdir / "metrics.jsonl"))]


def test_a_resume_rewrites_no_metrics_row_twice(tmp_path):
  """A run killed after logging steps 3-4 but before saving step 4 resumes from step 2."""
  a, b = tmp_path / "a", tmp_path / "b"
  harness.train_and_evaluate(quick(a, max_steps=4, checkpoint_every=2), verbose=False)
  shutil.rmtree(a / "checkpoints" / "4")  # the kill: step 4's rows written, its checkpoint not
  harness.train_and_evaluate(quick(a, max_steps=4, checkpoint_every=2), verbose=False)
  harness.train_and_evaluate(quick(b, max_steps=4, checkpoint_every=2), verbose=False)
  expected = [("train", 1), ("train", 2), ("train", 3), ("train", 4), ("test", 4)]
  assert _rows(a) == _rows(b) == expected
  assert _train_records(a) == _train_records(b)
  # Evaluating the finished run again replaces its test row instead of adding one.
  harness.train_and_evaluate(quick(a, max_steps=4, eval_only=True), verbose=False)
  assert _rows(a) == expected


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one_bit_identically(tmp_path, capsys):
  a, b = tmp_path / "a", tmp_path / "b"
  harness.train_and_evaluate(quick(a, max_steps=4, checkpoint_every=2), verbose=False)
  # 64 garbled bytes mid-file in every file of state/: OCDBT files can hold bytes nothing reads, so
  # garbling one file may change nothing (tests/test_checkpoints.py covers garbled array bytes alone).
  for path in (os.path.join(d, f) for d, _, fs in os.walk(a / "checkpoints" / "4" / "state") for f in fs):
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      f.write(bytes(range(64)))
  capsys.readouterr()
  harness.train_and_evaluate(quick(a, max_steps=6, checkpoint_every=2), verbose=False)
  err = capsys.readouterr().err.strip().splitlines()
  # Garbled array bytes fail the checksums; garbled bytes of orbax's own structures fail the read.
  assert len(err) == 1 and re.match(f"warning: checkpoint {a / 'checkpoints' / '4'} (fails its integrity check|"
                                    "cannot be read) ", err[0]), err
  assert err[0].endswith("using the previous one (step 2)"), err
  harness.train_and_evaluate(quick(b, max_steps=6, checkpoint_every=2), verbose=False)
  chex.assert_trees_all_equal(checkpoints.load_variables(str(a)), checkpoints.load_variables(str(b)))
  assert _rows(a) == _rows(b)
  assert any(p.startswith("4.corrupt-") for p in os.listdir(a / "checkpoints"))


def test_a_garbled_config_json_is_one_line_naming_it(tmp_path):
  (tmp_path / workdir_lib.RUN_CONFIG).write_text("{garbage")
  with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'} is not a run record of this trainer "
                                       r"\(Expecting property name .*\); repair or remove it"):
    harness.train_and_evaluate(quick(tmp_path, max_steps=1), verbose=False)


def test_a_workdir_that_is_a_file_or_cannot_be_created_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match=f"^--workdir {tmp_path / 'file'} is a file, not a directory$"):
    harness.train_and_evaluate(quick(tmp_path / "file", max_steps=1), verbose=False)
  with pytest.raises(ValueError, match=f"^--workdir {tmp_path / 'file' / 'sub'} cannot be written "):
    harness.train_and_evaluate(quick(tmp_path / "file" / "sub", max_steps=1), verbose=False)


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(workdir_lib.tempfile, "TemporaryFile", refuse)  # as root, chmod would not stop a write
  with pytest.raises(ValueError, match=f"^--workdir {tmp_path} cannot be written \\(Permission denied\\)$"):
    harness.train_and_evaluate(quick(tmp_path, max_steps=1), verbose=False)


def test_another_arch_on_a_workdir_without_config_json_is_one_line_and_keeps_the_workdir(tmp_path):
  harness.train_and_evaluate(quick(tmp_path, max_steps=1), verbose=False)
  (tmp_path / workdir_lib.RUN_CONFIG).unlink()
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/1 holds another model \(another --arch .*\): "
                                                        r"10 arrays differ, e\.g\. batch_stats/bn1/mean: \(8,\) float32 "
                                                        r"there, \(6,\) float32 here$") as err:
    harness.train_and_evaluate(quick(tmp_path, max_steps=2, arch="tiny_cnn_wide"), verbose=False)
  assert len(str(err.value)) < 300
  assert not (tmp_path / workdir_lib.RUN_CONFIG).exists()  # not re-written for the model that does not fit
  assert harness.train_and_evaluate(quick(tmp_path, max_steps=2), verbose=False)["steps"] == 2
