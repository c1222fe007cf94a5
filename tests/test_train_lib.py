"""Trainer steps and loop: learning, sequential vs joint semantics, resume, NaN guard, --init-from."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import chex
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainer_helpers import build, mesh_of, quick, run_steps, synthetic_batches
from tgq_jax import checkpoints, data, ternarize, train_lib
from tgq_jax.configs import Config
from tgq_jax.layers import TernaryDense, quantized_layers


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
  labels = train_lib.param_labels(params, layers)
  tx_thr, tx_w, _ = train_lib.make_optimizers(cfg, labels, 10)
  state0 = train_lib.TrainState(step=jnp.int32(0), params=params, batch_stats={},
                                threshold_opt_state=tx_thr.init(params), weight_opt_state=tx_w.init(params),
                                rng=jax.random.PRNGKey(0))
  fn, _ = train_lib.make_step_fns(model, tx_thr, tx_w, labels, cfg, 3, True)
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


def test_thresholds_are_not_decayed_and_weights_are():
  cfg = Config(arch="tiny_cnn", optimizer="sgd", momentum=0.0, lr=0.1, weight_decay=0.5)
  _, _, labels, tx_thr, tx_w, state, _, _ = build(cfg)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  u_thr, _ = tx_thr.update(zeros, state.threshold_opt_state, state.params)
  u_w, _ = tx_w.update(zeros, state.weight_opt_state, state.params)
  assert not np.any(u_thr["conv0"]["delta"]) and not np.any(u_w["conv0"]["delta"])
  np.testing.assert_allclose(u_w["conv0"]["kernel"], -0.1 * 0.5 * state.params["conv0"]["kernel"], rtol=1e-6)
  assert labels["conv0"]["delta"] == "threshold" and labels["bn0"]["scale"] == "weight"


def _train_records(workdir):
  with open(f"{workdir}/metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k != "img_per_sec"} for r in rows if r["split"] == "train"]


def test_resume_2_plus_2_equals_4_bitwise(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  train_lib.train_and_evaluate(quick(a, max_steps=2), verbose=False)
  train_lib.train_and_evaluate(quick(a, max_steps=4), verbose=False)
  train_lib.train_and_evaluate(quick(b, max_steps=4), verbose=False)
  assert _train_records(a) == _train_records(b)
  pa, pb = (checkpoints.load_variables(str(d)) for d in (a, b))
  chex.assert_trees_all_equal(pa, pb)
  summary = json.loads((a / "summary.json").read_text())
  assert summary["steps"] == 4 and summary["config"]["max_steps"] == 4


def test_same_seed_same_metrics_and_summary(tmp_path):
  s1 = train_lib.train_and_evaluate(quick(tmp_path / "x", max_steps=3), verbose=False)
  s2 = train_lib.train_and_evaluate(quick(tmp_path / "y", max_steps=3), verbose=False)
  assert _train_records(tmp_path / "x") == _train_records(tmp_path / "y")
  assert s1["test_accuracy"] == s2["test_accuracy"]
  for key in ("test_accuracy", "best_test_accuracy", "steps", "wall_seconds", "config"):
    assert key in json.loads((tmp_path / "x" / "summary.json").read_text())
  test_rows = [json.loads(x) for x in open(tmp_path / "x" / "metrics.jsonl") if '"test"' in x]
  assert {"sparsity", "threshold", "scale"} <= set(test_rows[-1]["layers"][0])


class _PoisonedDataset:
  """The synthetic dataset whose 3rd training batch is NaN."""

  def __init__(self, inner):
    self._inner, self.info = inner, inner.info

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
  monkeypatch.setattr(train_lib.data_lib, "get_dataset", lambda *a, **k: _PoisonedDataset(real(*a, **k)))
  with pytest.raises(train_lib.NonFiniteLossError, match="at step 3.*step 2"):
    train_lib.train_and_evaluate(quick(tmp_path, checkpoint_every=2, log_every=10), verbose=False)
  manager = checkpoints.make_manager(str(tmp_path / "checkpoints"))
  assert manager.latest_step() == 2


def test_init_from_loads_fp_weights_and_reinitializes_thresholds(tmp_path):
  fp_dir = tmp_path / "fp"
  train_lib.train_and_evaluate(quick(fp_dir, quantizer="fp", max_steps=2), verbose=False)
  cfg = quick(tmp_path / "tern", init_from=str(fp_dir))
  model, _, _, tx_thr, tx_w, state, _, _ = build(cfg)
  new = train_lib.init_from_checkpoint(state, str(fp_dir), model, (28, 28, 1), tx_thr, tx_w)
  src = checkpoints.load_variables(str(fp_dir))
  np.testing.assert_array_equal(new.params["conv1"]["kernel"], src["params"]["conv1"]["kernel"])
  np.testing.assert_array_equal(new.batch_stats["bn0"]["mean"], src["batch_stats"]["bn0"]["mean"])
  np.testing.assert_allclose(new.params["conv1"]["delta"], 0.05 * np.abs(src["params"]["conv1"]["kernel"]).max(),
                             rtol=1e-6)
  # The whole flow: fine-tune one step from the FP checkpoint.
  summary = train_lib.train_and_evaluate(dataclasses.replace(cfg, max_steps=1), verbose=False)
  assert summary["steps"] == 1


def test_init_from_errors(tmp_path):
  fp_dir = tmp_path / "fp"
  train_lib.train_and_evaluate(quick(fp_dir, quantizer="fp", max_steps=1), verbose=False)
  with pytest.raises(checkpoints.CheckpointError, match="another architecture"):
    train_lib.train_and_evaluate(quick(tmp_path / "w", arch="tiny_cnn_wide", init_from=str(fp_dir)),
                                 verbose=False)
  with pytest.raises(checkpoints.CheckpointError, match="no such"):
    train_lib.train_and_evaluate(quick(tmp_path / "v", init_from=str(tmp_path / "missing")), verbose=False)


def test_eval_only_reproduces_the_final_test_accuracy(tmp_path):
  trained = train_lib.train_and_evaluate(quick(tmp_path, max_steps=2), verbose=False)
  again = train_lib.train_and_evaluate(quick(tmp_path, max_steps=2, eval_only=True), verbose=False)
  assert again["steps"] == 2 and again["test_accuracy"] == trained["test_accuracy"]


def test_half_precision_runs_with_float32_params(tmp_path):
  summary = train_lib.train_and_evaluate(quick(tmp_path, max_steps=2, half_precision=True), verbose=False)
  assert np.isfinite(summary["test_metrics"]["loss"])
  params = checkpoints.load_variables(str(tmp_path))["params"]
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_top5_is_reported_beyond_ten_classes():
  cfg = Config(arch="tiny_cnn")
  *_, state, train_fn, _ = build(cfg, num_classes=20)
  batch = _batches(1)[0]
  step = train_lib.parallel.map_step(train_fn, mesh_of(1), "shard_map")
  _, metrics = step(state, train_lib.parallel.put_batch(batch, mesh_of(1), "shard_map"))
  assert 0.0 <= float(metrics["top5_accuracy"]) <= 1.0


def test_a_workdir_of_another_configuration_is_a_clear_error(tmp_path):
  train_lib.train_and_evaluate(quick(tmp_path, max_steps=1), verbose=False)
  record = json.loads((tmp_path / train_lib.RUN_CONFIG).read_text())
  assert record["config"]["arch"] == "tiny_cnn" and record["dataset_info"]["image_shape"] == [28, 28, 1]
  with pytest.raises(ValueError, match="--arch 'tiny_cnn' there, 'tiny_cnn_wide' now"):
    train_lib.train_and_evaluate(quick(tmp_path, max_steps=2, arch="tiny_cnn_wide"), verbose=False)


def test_train_rows_log_the_threshold_trajectories(tmp_path):
  train_lib.train_and_evaluate(quick(tmp_path, max_steps=3), verbose=False)
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  final = checkpoints.load_variables(str(tmp_path))["params"]
  assert set(train_rows[-1]["delta"]) == {"conv0", "conv1", "head"}
  for name, value in train_rows[-1]["delta"].items():
    assert value == pytest.approx(float(abs(final[name]["delta"])), rel=1e-6)
  assert train_rows[0]["delta"] != train_rows[-1]["delta"]  # the thresholds do train


# --- divergence: the documented rule; nothing diverged is ever saved (issue 12) ----------------


def _saved_states(workdir) -> dict[int, dict]:
  """Every checkpoint of a workdir as saved (verified against its checksums)."""
  manager = checkpoints.make_manager(str(workdir / "checkpoints"))
  return {step: checkpoints._restore_verified(manager, step, None)[0] for step in manager.all_steps()}


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


def test_sgd_blowing_up_stops_with_only_finite_checkpoints(tmp_path):
  """The issue's `--optimizer sgd --lr 1e3 --checkpoint-every 1` (there BatchNorm's variance went inf and was saved)."""
  with pytest.raises(train_lib.DivergenceError, match=r"^training diverged at step \d+: .*; stopping \(") as err:
    train_lib.train_and_evaluate(quick(tmp_path, optimizer="sgd", lr=1e3, checkpoint_every=1), verbose=False)
  saved = _saved_states(tmp_path)
  assert all(_all_finite(state) for state in saved.values())
  kept = f"the newest checkpoint, step {max(saved)}, is kept" if saved else "no checkpoint was written"
  assert str(err.value).endswith(f"({kept}).")


def test_a_non_finite_batch_statistic_is_never_saved_even_with_a_normal_loss(tmp_path, monkeypatch):
  """BatchNorm's running variance goes inf from step 3 while the loss looks fine (train mode uses batch
  statistics): the state check before each save stops the run and step 2 stays the newest checkpoint."""
  real = train_lib.make_step_fns

  def poisoned(*args, **kwargs):
    train, evaluate = real(*args, **kwargs)

    def step(state, batch):
      state, metrics = train(state, batch)
      stats = flax.core.unfreeze(state.batch_stats)
      stats["bn0"]["var"] = jnp.where(state.step >= 3, jnp.inf, stats["bn0"]["var"])
      return state.replace(batch_stats=stats), metrics
    return step, evaluate
  monkeypatch.setattr(train_lib, "make_step_fns", poisoned)
  with pytest.raises(train_lib.DivergenceError, match=r"^training diverged at step 3: non-finite values in "
                                                      r"batch_stats/bn0/var; stopping \(the newest checkpoint, "
                                                      r"step 2, is kept\)\.$"):
    train_lib.train_and_evaluate(quick(tmp_path, checkpoint_every=1), verbose=False)
  saved = _saved_states(tmp_path)
  assert sorted(saved) == [1, 2] and all(_all_finite(state) for state in saved.values())


def test_a_loss_far_above_its_running_level_is_divergence(tmp_path):
  """Adam at lr 1e6: the loss reaches ~1e13 while staying finite; the run used to exit 0."""
  with pytest.raises(train_lib.DivergenceError, match=r"at step \d+: loss \S+ is more than 10x its running level"):
    train_lib.train_and_evaluate(quick(tmp_path, optimizer="adam", lr=1e6), verbose=False)
  assert all(_all_finite(state) for state in _saved_states(tmp_path).values())


def test_every_weight_of_a_layer_zero_is_divergence(tmp_path):
  """Thresholds run away (the issue's --threshold-lr inf, now refused up front): sparsity 1.0."""
  with pytest.raises(train_lib.DivergenceError, match=r"at step 1: layer \w+ has sparsity 1\.0 .*no checkpoint"):
    train_lib.train_and_evaluate(quick(tmp_path, optimizer="adam", threshold_lr=1e6, threshold_grad_clip=1e6),
                                 verbose=False)


def _guard_and_state():
  cfg = quick("unused")
  _, layers, _, _, _, state, _, _ = build(cfg)
  return train_lib.DivergenceGuard(10, layers, last_saved=7), jax.tree.map(np.asarray, state)


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
  with pytest.raises(train_lib.DivergenceError, match=f"^training diverged at step 3: {message}.*step 7, is kept"):
    guard.check_state(3, bad)


def test_the_state_check_covers_optimizer_states():
  guard, state = _guard_and_state()
  leaves, treedef = jax.tree.flatten(state.weight_opt_state)
  leaves = [np.full_like(x, np.nan) if x.ndim else x for x in leaves]
  with pytest.raises(train_lib.DivergenceError, match="non-finite values in weight_opt_state/"):
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
  with pytest.raises(train_lib.DivergenceError, match=message):
    _feed(guard, losses)


def test_a_non_finite_gradient_norm_trips_and_each_step_counts_once():
  guard, _ = _guard_and_state()
  metrics = {"loss": np.float32(1.0), "grad_norm": np.float32(1.0)}
  for _ in range(3):
    guard.check_step(1, metrics)  # the loop may check the same step more than once
  assert guard._running == pytest.approx(0.99 * np.log(10) + 0.01)
  with pytest.raises(train_lib.DivergenceError, match=r"step 2: non-finite gradient norm \(inf\)"):
    guard.check_step(2, {"loss": np.float32(1.0), "grad_norm": np.float32(np.inf)})


# --- resume after damage, metrics.jsonl rows, workdir checks (issue 12) ------------------------


def _rows(workdir) -> list[tuple[str, int]]:
  return [(r["split"], r["step"]) for r in map(json.loads, open(workdir / "metrics.jsonl"))]


def test_a_resume_rewrites_no_metrics_row_twice(tmp_path):
  """A run killed after logging steps 3-4 but before saving step 4 resumes from step 2."""
  a, b = tmp_path / "a", tmp_path / "b"
  train_lib.train_and_evaluate(quick(a, max_steps=4, checkpoint_every=2), verbose=False)
  shutil.rmtree(a / "checkpoints" / "4")  # the kill: step 4's rows written, its checkpoint not
  train_lib.train_and_evaluate(quick(a, max_steps=4, checkpoint_every=2), verbose=False)
  train_lib.train_and_evaluate(quick(b, max_steps=4, checkpoint_every=2), verbose=False)
  expected = [("train", 1), ("train", 2), ("train", 3), ("train", 4), ("test", 4)]
  assert _rows(a) == _rows(b) == expected
  assert _train_records(a) == _train_records(b)
  # Evaluating the finished run again replaces its test row instead of adding one.
  train_lib.train_and_evaluate(quick(a, max_steps=4, eval_only=True), verbose=False)
  assert _rows(a) == expected


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one_bit_identically(tmp_path, capsys):
  a, b = tmp_path / "a", tmp_path / "b"
  train_lib.train_and_evaluate(quick(a, max_steps=4, checkpoint_every=2), verbose=False)
  # 64 garbled bytes mid-file in every file of state/: OCDBT files can hold bytes nothing reads, so
  # garbling one file may change nothing (tests/test_checkpoints.py covers garbled array bytes alone).
  for path in (os.path.join(d, f) for d, _, fs in os.walk(a / "checkpoints" / "4" / "state") for f in fs):
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      f.write(bytes(range(64)))
  capsys.readouterr()
  train_lib.train_and_evaluate(quick(a, max_steps=6, checkpoint_every=2), verbose=False)
  err = capsys.readouterr().err.strip().splitlines()
  # Garbled array bytes fail the checksums; garbled bytes of orbax's own structures fail the read.
  assert len(err) == 1 and re.match(f"warning: checkpoint {a / 'checkpoints' / '4'} (fails its integrity check|"
                                    "cannot be read) ", err[0]), err
  assert err[0].endswith("using the previous one (step 2)"), err
  train_lib.train_and_evaluate(quick(b, max_steps=6, checkpoint_every=2), verbose=False)
  chex.assert_trees_all_equal(checkpoints.load_variables(str(a)), checkpoints.load_variables(str(b)))
  assert _rows(a) == _rows(b)
  assert any(p.startswith("4.corrupt-") for p in os.listdir(a / "checkpoints"))


def test_a_garbled_config_json_is_one_line_naming_it(tmp_path):
  (tmp_path / train_lib.RUN_CONFIG).write_text("{garbage")
  with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'} is not a run record of this trainer "
                                       r"\(Expecting property name .*\); repair or remove it"):
    train_lib.train_and_evaluate(quick(tmp_path, max_steps=1), verbose=False)


def test_a_workdir_that_is_a_file_or_cannot_be_created_is_one_line(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match=f"^--workdir {tmp_path / 'file'} is a file, not a directory$"):
    train_lib.train_and_evaluate(quick(tmp_path / "file", max_steps=1), verbose=False)
  with pytest.raises(ValueError, match=f"^--workdir {tmp_path / 'file' / 'sub'} cannot be written "):
    train_lib.train_and_evaluate(quick(tmp_path / "file" / "sub", max_steps=1), verbose=False)


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(train_lib.tempfile, "TemporaryFile", refuse)  # as root, chmod would not stop a write
  with pytest.raises(ValueError, match=f"^--workdir {tmp_path} cannot be written \\(Permission denied\\)$"):
    train_lib.train_and_evaluate(quick(tmp_path, max_steps=1), verbose=False)


def test_another_arch_on_a_workdir_without_config_json_is_one_line_and_keeps_the_workdir(tmp_path):
  train_lib.train_and_evaluate(quick(tmp_path, max_steps=1), verbose=False)
  (tmp_path / train_lib.RUN_CONFIG).unlink()
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/1 holds another model \(another --arch .*\): "
                                                        r"10 arrays differ, e\.g\. batch_stats/bn1/mean: \(8,\) float32 "
                                                        r"there, \(6,\) float32 here$") as err:
    train_lib.train_and_evaluate(quick(tmp_path, max_steps=2, arch="tiny_cnn_wide"), verbose=False)
  assert len(str(err.value)) < 300
  assert not (tmp_path / train_lib.RUN_CONFIG).exists()  # not re-written for the model that does not fit
  assert train_lib.train_and_evaluate(quick(tmp_path, max_steps=2), verbose=False)["steps"] == 2
