"""Language-model training: the LM step (loss, update rules, no wasted pass), the recipe's optimizer pieces, the
harness's LM task (rows, summary, best checkpoint), and train.py end to end with a resume after kill -9."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tgq_jax import QuantPolicy, models
from tgq_jax.data.text import Vocabulary, default_text_file
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models.llama import Llama
from tgq_jax.training import algorithm, checkpoints, harness
from tgq_jax.training.configs import PRESETS, Config
from tgq_jax.generate import generate_text, language_model
from tgq_jax.training.lm import model_context

from trainer_helpers import popen_until_logged  # noqa: E402  (tests/ is on sys.path: conftest)

TINY = dict(width=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32, context=16)
models.register("tiny_llama", Llama, **TINY)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
           PYTHONPATH=REPO, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
VOCAB = 12


def _tokens(batch=4, length=TINY["context"] + 1, seed=0):
  """Token windows of a predictable sequence (i -> i + 1 mod VOCAB), from random starts."""
  starts = np.random.default_rng(seed).integers(0, VOCAB, (batch, 1))
  return jnp.asarray((starts + np.arange(length)) % VOCAB, jnp.int32)


def _setup(quantizer="tga", sequential=True, lr=1e-2):
  model = models.create_model("tiny_llama", VOCAB, quant=QuantPolicy(quantizer, ternary_last=False))
  x = _tokens()[:, :-1]
  layers = quantized_layers(model, x, train=False)
  state, tga = algorithm.init(model, x, optax.adam(lr), layers, threshold_tx=algorithm.threshold_optimizer(lr),
                              sequential=sequential, train=False)
  return model, state, algorithm.LanguageModelStep(model, tga)


def _cross_entropy(logits, tokens):
  """Independent next-token cross-entropy in float64 numpy."""
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.asarray(tokens)[:, 1:]
  return -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]


def test_the_step_s_loss_is_the_next_token_cross_entropy_and_evaluate_sums_it():
  model, state, step = _setup(sequential=False)
  tokens = _tokens()
  logits = jax.jit(model.apply)({"params": state.params}, tokens[:, :-1])
  expected = _cross_entropy(logits, tokens)  # (4, 16)
  _, metrics = jax.jit(step.train)(state, {"tokens": tokens})
  assert float(metrics["loss"]) == pytest.approx(expected.mean(), rel=1e-5)  # joint: the loss before the step
  sums = jax.jit(step.evaluate)(state, {"tokens": tokens, "mask": jnp.array([1.0, 0.0, 1.0, 1.0])})
  assert float(sums["count"]) == 3 * 16
  assert float(sums["loss"]) == pytest.approx(expected[[0, 2, 3]].sum(), rel=1e-5)


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_and_joint_both_train(sequential):
  _, state, step = _setup(sequential=sequential)
  train = jax.jit(step.train)
  losses = []
  for i in range(30):
    state, metrics = train(state, {"tokens": _tokens(8, seed=i)})
    losses.append(float(metrics["loss"]))
  assert ("threshold_pass_loss" in metrics) == sequential
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.7 * losses[0], losses


TRACES: list = []


class _CountingLM(Llama):
  """The tiny LM, counting how often its forward pass is traced."""

  def __call__(self, *args, **kwargs):
    TRACES.append(1)
    return super().__call__(*args, **kwargs)


models.register("counting_llama", _CountingLM, **TINY)


@pytest.mark.parametrize("quantizer, sequential, passes", [("fp", True, 1), ("absmean", True, 1), ("tga", True, 2),
                                                           ("tga", False, 1)])
def test_a_step_without_thresholds_runs_one_forward_and_backward_pass(quantizer, sequential, passes):
  model = models.create_model("counting_llama", VOCAB, quant=QuantPolicy(quantizer))
  x = _tokens()[:, :-1]
  layers = quantized_layers(model, x, train=False)
  state, tga = algorithm.init(model, x, optax.adam(1e-3), layers, sequential=sequential, train=False)
  TRACES.clear()
  jax.make_jaxpr(algorithm.LanguageModelStep(model, tga).train)(state, {"tokens": _tokens()})
  assert len(TRACES) == passes


def test_the_recipe_schedule_is_nanogpt_s_and_decay_skips_norms():
  cfg = Config(**PRESETS["shakespeare_char_baby"])
  lr = harness.lr_schedule(cfg, cfg.lr, steps_per_epoch=1307)
  assert float(lr(0)) == 0.0 and float(lr(50)) == pytest.approx(5e-4)  # linear warm-up over 100 steps
  assert float(lr(100)) == pytest.approx(1e-3)
  mid = 100 + (2000 - 100) / 2  # cosine from 1e-3 to 1e-4: the mean at the middle
  assert float(lr(mid)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-4)
  assert float(lr(2000)) == pytest.approx(1e-4)
  # AdamW's decay (zero gradient: the update is the decay alone) on kernels and embeddings, not on norms.
  params = {"kernel": jnp.ones((2, 3)), "embedding": jnp.ones((4, 2)), "scale": jnp.ones((3,))}
  tga, _ = harness.make_tga(dataclasses.replace(cfg, warmup_steps=0), jax.tree.map(lambda _: algorithm.WEIGHT, params),
                            steps_per_epoch=1307)
  tx = tga.weight_tx
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  decay = -1e-3 * 0.1  # -lr * wd * w at step 0
  assert float(updates["kernel"][0, 0]) == pytest.approx(decay) and float(updates["embedding"][0, 0]) == pytest.approx(decay)
  assert float(jnp.abs(updates["scale"]).max()) == 0.0


def test_the_presets_are_the_recipe():
  baby, big = (Config(**PRESETS[n]) for n in ("shakespeare_char_baby", "shakespeare_char"))
  assert (baby.arch, baby.batch_size, baby.train_steps, baby.context) == ("llama_baby", 12, 2000, None)
  assert (baby.optimizer, baby.lr, baby.lr_end, baby.warmup_steps, baby.adam_b2) == ("adamw", 1e-3, 0.1, 100, 0.99)
  assert (baby.weight_decay, baby.weight_decay_on, baby.grad_clip, baby.ternary_last) == (0.1, "matrices", 1.0, False)
  assert (baby.eval_every, baby.eval_windows, baby.update, baby.threshold_optimizer) == (250, 240, "sequential", "auto")
  assert (big.arch, big.batch_size) == ("llama_256", 32)
  assert (model_context("llama_baby"), model_context("llama_256")) == (64, 128)  # context None: the model's


def test_the_run_sample_is_the_greedy_cropped_forward_pass():
  """The end-of-run sample (tgq_jax.generate, the key/value cache) = argmax of full passes over the last
  ``context`` tokens (nanoGPT's generate), also past the context; the same seed gives the same text."""
  model, state, _ = _setup("fp")
  vocab = Vocabulary("chars", "abcdefghijkl")
  variables = {"params": state.params}
  context = model_context_of(model)
  greedy = "abc" + generate_text(model, variables, vocab, "abc", context + 3, temperature=0)
  ids = list(vocab.encode("abc"))
  forward = jax.jit(lambda x: model.apply(variables, x))
  for _ in range(context + 3):
    ids.append(int(jnp.argmax(forward(jnp.asarray([ids[-context:]], jnp.int32))[0, -1])))
  assert greedy == vocab.decode(ids)
  a = generate_text(model, variables, vocab, "a", 10, seed=1)
  assert a == generate_text(model, variables, vocab, "a", 10, seed=1) and len(a) == 10



def model_context_of(model) -> int:
  return int(language_model(model).context)


# --- the harness's LM task -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "small.txt"
  path.write_text(open(default_text_file(), encoding="utf-8").read()[:6000], encoding="utf-8")
  return str(path)


def _lm_config(workdir, data_file, **kw) -> Config:
  base = dict(PRESETS["shakespeare_char_baby"], arch="tiny_llama", data_file=data_file, batch_size=8,
              train_steps=40, warmup_steps=2, eval_every=3, eval_windows=8, eval_batch_size=8, log_every=2,
              sample_tokens=12, workdir=str(workdir))
  return Config(**{**base, **kw})


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, small_text):
  """A 6-step LM run of the tiny model on its own copy of the small text: (workdir, text file, summary)."""
  root = tmp_path_factory.mktemp("lm_run")
  text = root / "text.txt"
  text.write_text(open(small_text, encoding="utf-8").read(), encoding="utf-8")
  summary = harness.train_and_evaluate(_lm_config(root / "run", str(text), max_steps=6), verbose=False)
  return root / "run", text, summary


def test_an_lm_run_logs_train_and_val_rows_keeps_the_lowest_loss_and_records_the_vocabulary(lm_run, small_text):
  tmp_path, _, summary = lm_run
  rows = _rows(tmp_path)
  assert [(r["split"], r["step"]) for r in rows] == [("train", 2), ("val", 3), ("train", 4), ("train", 6),
                                                      ("val", 6)]
  train, val = rows[0], rows[1]
  assert {"loss", "grad_norm", "lr", "tokens_per_sec", "delta"} <= set(train)
  assert set(val) >= {"loss", "bpc", "layers"} and val["bpc"] == pytest.approx(val["loss"] / math.log(2))
  assert summary["val_loss"] == rows[-1]["loss"] and summary["val_bpc"] == rows[-1]["bpc"]
  assert summary["best_val_loss"] == min(r["loss"] for r in rows if r["split"] == "val")
  assert summary["steps"] == 6 and summary["wall_seconds"] > 0 and summary["config"]["arch"] == "tiny_llama"
  assert isinstance(summary["sample"], str) and len(summary["sample"]) == 13
  assert summary["report"].startswith("validation loss: ") and "layers_0/attn/q" in summary["report"]
  record = json.load(open(tmp_path / "config.json"))
  text = open(small_text, encoding="utf-8").read()
  assert record["vocabulary"] == {"kind": "chars", "chars": "".join(sorted(set(text)))}
  assert record["dataset_info"]["num_train"] == 5400 and record["dataset_info"]["context"] == 16


def test_the_best_lm_checkpoint_is_the_lowest_validation_loss(tmp_path):
  manager = checkpoints.make_manager(str(tmp_path), keep=1, best_metric="val_loss", best_lower=True)
  state = {"w": np.zeros(2, np.float32)}
  for step, loss in ((1, 3.0), (2, 1.5), (3, 2.0), (4, 2.5)):
    checkpoints.save(manager, step, state, {"iterator": {}}, {"val_loss": loss})
  assert sorted(manager.all_steps()) == [2, 4]  # the best (lowest) and the latest
  manager.close()


def test_resuming_an_lm_run_on_another_text_is_refused(lm_run, small_text):
  run, text, _ = lm_run
  with pytest.raises(ValueError, match="--data-file"):  # another file: another recipe
    harness.train_and_evaluate(_lm_config(run, small_text, max_steps=8), verbose=False)
  text.write_text(text.read_text(encoding="utf-8") + "~", encoding="utf-8")  # the same file, edited
  with pytest.raises(ValueError, match="records another vocabulary than this run's data has"):
    harness.train_and_evaluate(_lm_config(run, str(text), max_steps=8), verbose=False)


# --- train.py, end to end -----------------------------------------------------------------------------

_TINY_TRAIN = ("import runpy, sys; from tgq_jax import models; from tgq_jax.models.llama import Llama; "
               f"models.register('tiny_llama', Llama, **{TINY!r}); sys.argv = ['train.py'] + sys.argv[1:]; "
               "runpy.run_path('train.py', run_name='__main__')")


@pytest.mark.slow
def test_train_py_trains_the_baby_preset_and_reports(tmp_path):
  out = subprocess.run([sys.executable, "train.py", "--config", "shakespeare_char_baby", "--max-steps", "6",
                        "--eval-every", "3", "--eval-windows", "8", "--sample-tokens", "20", "--workdir",
                        str(tmp_path)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(tmp_path / "summary.json"))
  for key in ("val_loss", "val_bpc", "best_val_loss", "steps", "wall_seconds", "sample", "config"):
    assert summary[key] is not None, key
  assert summary["steps"] == 6 and len(summary["sample"]) == 21
  assert 3.0 < summary["val_loss"] < math.log(65) + 0.5  # near the uniform guess after 6 steps
  assert [(r["split"], r["step"]) for r in _rows(tmp_path) if r["split"] == "val"] == [("val", 3), ("val", 6)]
  lines = out.stdout.splitlines()
  assert any(line.startswith("validation loss: ") for line in lines)
  assert any(line.startswith("layers_3/mlp/down") for line in lines) and any("model size" in line for line in lines)
  assert lines[-2] == "sample:" and lines[-1] == summary["sample"].splitlines()[-1]


@pytest.mark.slow
def test_an_lm_run_killed_with_sigkill_resumes_bit_for_bit(tmp_path, small_text):
  args = ["--config", "shakespeare_char_baby", "--arch", "tiny_llama", "--data-file", small_text, "--batch-size", "8",
          "--train-steps", "60", "--warmup-steps", "2", "--eval-every", "100", "--eval-windows", "8",
          "--eval-batch-size", "8", "--log-every", "1", "--checkpoint-every", "2", "--sample-tokens", "0"]
  killed = tmp_path / "killed"
  proc = popen_until_logged([sys.executable, "-c", _TINY_TRAIN, *args, "--workdir", str(killed)], ENV,
                            killed / "metrics.jsonl", rows=5)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  saved = max(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert saved >= 2
  end = saved + 3  # an odd step: the last steps run after the resume, past the last checkpoint
  cfg = _lm_config(killed, small_text, train_steps=60, eval_every=100, checkpoint_every=2, log_every=1,
                   sample_tokens=0, max_steps=end)
  harness.train_and_evaluate(cfg, verbose=False)
  straight = tmp_path / "straight"
  harness.train_and_evaluate(_lm_config(straight, small_text, train_steps=60, eval_every=100, checkpoint_every=2,
                                        log_every=1, sample_tokens=0, max_steps=end), verbose=False)
  a, b = (checkpoints.load_variables(str(d)) for d in (killed, straight))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = lambda d: [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in _rows(d) if r["split"] == "train"]
  assert rows(killed) == rows(straight)
