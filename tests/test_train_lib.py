"""Trainer steps and loop: learning, sequential vs joint semantics, resume, NaN guard, --init-from."""
from __future__ import annotations

import dataclasses
import json
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from torchvision_helpers import fake_state_dict
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


def _decay_updates(cfg):
  """Both optimizers' first updates for zero gradients: what weight decay alone does."""
  _, _, labels, tx_thr, tx_w, state, _, _ = build(cfg)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  u_thr, _ = tx_thr.update(zeros, state.threshold_opt_state, state.params)
  u_w, _ = tx_w.update(zeros, state.weight_opt_state, state.params)
  return labels, state.params, u_thr, u_w


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
  assert train_lib.threshold_recipe(cfg) == ("sgd", 0.1, 0.0)
  _, params, u_thr, u_w = _decay_updates(cfg)
  assert not np.any(u_thr["conv0"]["delta"])
  assert np.any(u_w["conv0"]["kernel"])  # Adam's step of the decay term alone
  # Two steps of a constant gradient g: torch's nesterov SGD moves -lr*g*(1+m), then -lr*g*(1+m+m^2).
  _, _, labels, tx_thr, _, state, _, _ = build(cfg)
  g = jax.tree.map(lambda x: jnp.full_like(x, 1e-4), state.params)
  u1, s1 = tx_thr.update(g, state.threshold_opt_state, state.params)
  u2, _ = tx_thr.update(g, s1, state.params)
  np.testing.assert_allclose(u1["conv0"]["delta"], -0.1 * 1e-4 * 1.9, rtol=1e-5)
  np.testing.assert_allclose(u2["conv0"]["delta"], -0.1 * 1e-4 * (1 + 0.9 + 0.81), rtol=1e-5)


def test_explicit_threshold_options_override_the_pairing():
  cfg = Config(optimizer="sgd", lr=0.1, weight_decay=1e-4, threshold_optimizer="adam",
               threshold_lr=1e-3, threshold_weight_decay=0.0)
  assert train_lib.threshold_recipe(cfg) == ("adam", 1e-3, 0.0)


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


def test_half_precision_computes_in_bfloat16_with_float32_params(tmp_path):
  cfg = quick(tmp_path, max_steps=2, half_precision=True)
  _, model, _, _ = train_lib.setup(cfg)
  assert model.dtype == jnp.bfloat16
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1)), train=False)
  logits, state = model.apply(variables, jnp.ones((2, 28, 28, 1)), train=False, capture_intermediates=True,
                              mutable=["intermediates"])
  inter = state["intermediates"]
  assert inter["conv0"]["__call__"][0].dtype == jnp.bfloat16  # the convolutions run in bfloat16
  assert inter["bn1"]["__call__"][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32  # logits (and the loss) in float32
  summary = train_lib.train_and_evaluate(cfg, verbose=False)
  assert np.isfinite(summary["test_metrics"]["loss"])
  params = checkpoints.load_variables(str(tmp_path))["params"]
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_top5_against_an_independent_count():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 20)).astype(np.float32)
  labels = rng.integers(0, 20, 64)
  metrics = train_lib._metrics(jnp.asarray(logits), jnp.asarray(labels), 20)
  beaten_by = (logits > logits[np.arange(64), labels][:, None]).sum(axis=1)  # classes scoring above the label
  np.testing.assert_array_equal(metrics["accuracy"], beaten_by == 0)
  np.testing.assert_array_equal(metrics["top5_accuracy"], beaten_by < 5)
  assert np.mean(beaten_by < 5) > np.mean(beaten_by == 0) > 0  # a case where they differ
  assert "top5_accuracy" not in train_lib._metrics(jnp.asarray(logits[:, :10]), jnp.asarray(labels % 10), 10)


def test_top5_is_reported_by_the_step_beyond_ten_classes():
  cfg = Config(arch="tiny_cnn")
  *_, state, train_fn, _ = build(cfg, num_classes=20)
  batch = _batches(1)[0]
  step = train_lib.parallel.map_step(train_fn, mesh_of(1), "shard_map")
  _, metrics = step(state, train_lib.parallel.put_batch(batch, mesh_of(1), "shard_map"))
  assert float(metrics["accuracy"]) <= float(metrics["top5_accuracy"]) <= 1.0


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
  model, _, _, tx_thr, tx_w, state, _, _ = build(cfg, image_shape=(32, 32, 3))
  new = train_lib.init_from_checkpoint(state, path, model, (32, 32, 3), tx_thr, tx_w, arch="resnet18")
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
  summary = train_lib.train_and_evaluate(dataclasses.replace(cfg, max_steps=1), verbose=False)
  assert summary["steps"] == 1 and np.isfinite(summary["test_metrics"]["loss"])


def test_init_from_torchvision_errors(tmp_path):
  path34, _ = _torchvision_npz(tmp_path, "resnet34")
  with pytest.raises(checkpoints.CheckpointError, match=r"--init-from: .*does not match torchvision resnet18"):
    train_lib.load_fp_variables(path34, "resnet18")
  with pytest.raises(checkpoints.CheckpointError, match="no such torchvision state dict file"):
    train_lib.check_init_from(str(tmp_path / "missing.npz"))
  path, _ = _torchvision_npz(tmp_path, num_classes=1000)
  model, _, _, tx_thr, tx_w, state, _, _ = build(_resnet18_cfg(tmp_path, path), image_shape=(32, 32, 3))
  with pytest.raises(checkpoints.CheckpointError, match=r"another architecture.*fc/kernel: got \(512, 1000\)"):
    train_lib.init_from_checkpoint(state, path, model, (32, 32, 3), tx_thr, tx_w, arch="resnet18")


def test_init_from_a_pth_needs_torch(tmp_path, monkeypatch):
  pth = tmp_path / "resnet18.pth"
  pth.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, installed or not
  with pytest.raises(checkpoints.CheckpointError, match=r"(?s)needs torch.*np\.savez"):
    train_lib.load_fp_variables(str(pth), "resnet18")


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
  from tgq_jax import configs
  cfg = configs.from_args(["--config", preset])
  assert (cfg.optimizer, cfg.lr, cfg.weight_decay, train_lib.threshold_recipe(cfg)) == expected
  assert (cfg.momentum, cfg.nesterov, cfg.threshold_grad_clip) == (0.9, True, 0.001)


def test_dropout_draws_a_fresh_key_from_the_state_every_step():
  cfg = Config(arch="dropout_net", optimizer="sgd", lr=0.1)
  model, *_, state, train_fn, _ = build(cfg)
  batch = _batches(1)[0]
  step = train_lib.parallel.map_step(train_fn, mesh_of(1), "shard_map")
  put = lambda b: train_lib.parallel.put_batch(b, mesh_of(1), "shard_map")
  new, metrics = step(state, put(batch))
  # The key the step documents: split off TrainState.rng, folded with the device index (0 here).
  next_rng, dropout_rng = train_lib.step_rngs(state.rng)
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
  jax.tree.map(np.testing.assert_array_equal, train_lib.load_fp_variables(str(pth), "resnet18"),
               train_lib.load_fp_variables(npz, "resnet18"))
