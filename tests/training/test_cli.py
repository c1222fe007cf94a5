"""train.py as a user runs it: --help, one-line errors, presets, SIGTERM + resume, the demo (short)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tgq_jax.training import configs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
           PYTHONPATH=REPO, JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # compile fast, as conftest does in-process
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the helpers
from trainer_helpers import SYNTH_ARGS, popen_until_logged  # noqa: E402

SYNTH = [*SYNTH_ARGS, "--batch-size", "32", "--eval-batch-size", "64"]


def _run(*args, timeout=240):
  return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], env=ENV,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_help_lists_every_option_with_its_default():
  out = _run("--help").stdout
  for field in dataclasses.fields(configs.Config):
    assert "--" + field.name.replace("_", "-") in out
  assert "--no-ternary-first" in out and "--config" in out
  assert out.count("(default:") >= len(dataclasses.fields(configs.Config))


def test_preset_and_explicit_flags_override():
  cfg = configs.from_args(["--config", "imagenet_resnet18", "--lr", "3e-4"])
  assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.epochs, cfg.schedule, cfg.gammas, cfg.weight_decay,
          cfg.batch_size) == ("resnet18", "adam", 3e-4, 50, (25, 30, 35), (0.2, 0.2, 0.5), 5e-6, 256)
  cifar = configs.from_args(["--config", "cifar10_resnet20", "--no-nesterov"])
  assert (cifar.optimizer, cifar.momentum, cifar.nesterov, cifar.weight_decay) == ("sgd", 0.9, False, 1e-4)
  assert configs.from_args([]) == configs.Config(augment=False)  # the demo preset
  assert cifar.augment and configs.from_args(["--augment"]).augment
  assert configs.from_args(["--num-classes", "1000"]).num_classes == 1000


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
  (["--arch", "nope"], "unknown arch 'nope'"),
  (["--dataset", "nope"], "unknown dataset 'nope'"),
  (["--quantizer", "nope"], "invalid choice"),
  (SYNTH + ["--batch-size", "30"], "not divisible by the device count 4"),
  (SYNTH + ["--init-from", "/nonexistent/ckpt"], "no such checkpoint"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
  result = _run(*args, "--workdir", str(tmp_path))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  error = [line for line in lines if line.startswith("error: ")]
  assert len(error) == 1 and message in error[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_init_from_another_architecture_is_a_one_line_error(tmp_path, capsys):
  import importlib.util

  import trainer_helpers  # noqa: F401  (registers tiny_cnn and tiny_cnn_wide)
  spec = importlib.util.spec_from_file_location("train_cli", os.path.join(REPO, "train.py"))
  train = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(train)
  assert train.main([*SYNTH, "--arch", "tiny_cnn", "--quantizer", "fp", "--max-steps", "1",
                     "--workdir", str(tmp_path / "fp")]) == 0
  capsys.readouterr()
  code = train.main([*SYNTH, "--arch", "tiny_cnn_wide", "--init-from", str(tmp_path / "fp"),
                     "--workdir", str(tmp_path / "t")])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: --init-from: checkpoint is of another architecture"), err
  assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_the_same_command_resumes(tmp_path):
  cmd = [sys.executable, os.path.join(REPO, "train.py"), *SYNTH, "--epochs", "1000", "--log-every", "1",
         "--workdir", str(tmp_path)]
  metrics = tmp_path / "metrics.jsonl"
  proc = popen_until_logged(cmd, ENV, metrics)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "interrupted (SIGTERM)" in out
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["interrupted"] and summary["steps"] >= 2
  steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert steps[-1] == summary["steps"]
  again = _run(*SYNTH, "--epochs", "1000", "--log-every", "1", "--workdir", str(tmp_path),
               "--max-steps", str(summary["steps"] + 1))
  assert again.returncode == 0 and f"resuming from step {summary['steps']}" in again.stdout, again.stderr[-2000:]
  assert json.loads((tmp_path / "summary.json").read_text())["steps"] == summary["steps"] + 1


@pytest.mark.slow
def test_the_demo_command_runs_and_prints_the_table(tmp_path):
  result = _run("--max-steps", "3", "--workdir", str(tmp_path), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  for text in ("test accuracy:", "sparsity", "threshold", "conv0", "head", "FP32", "2-bit ternary"):
    assert text in result.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 3 and summary["config"]["arch"] == "small_cnn"
  assert summary["config"]["update"] == "sequential" and summary["config"]["quantizer"] == "tga"
  assert any(p.startswith("events.out.tfevents") for p in os.listdir(tmp_path / "tensorboard"))


# --- every option is checked before any work (issue 12) ----------------------------------------


@pytest.mark.parametrize("args, message", [
  (["--lr", "-1"], "--lr must be a finite number >= 0 (got -1.0)"),
  (["--lr", "nan"], "--lr must be a finite number >= 0 (got nan)"),
  (["--threshold-lr", "inf"], "--threshold-lr must be a finite number >= 0 (got inf)"),
  (["--epochs", "0"], "--epochs must be an integer >= 1 (got 0)"),
  (["--epochs", "-1"], "--epochs must be an integer >= 1 (got -1)"),
  (["--max-steps", "0"], "--max-steps must be an integer >= 1 (got 0)"),
  (["--threshold-grad-clip", "-1"], "--threshold-grad-clip must be a finite number >= 0 (got -1.0)"),
  (["--checkpoint-every", "-1"], "--checkpoint-every must be an integer >= 0 (got -1)"),
  (["--log-every", "0"], "--log-every must be an integer >= 1 (got 0)"),
  (["--eval-batch-size", "0"], "--eval-batch-size must be an integer >= 1 (got 0)"),
  (["--batch-size", "-4"], "--batch-size must be an integer >= 1 (got -4)"),
  (["--keep-checkpoints", "0"], "--keep-checkpoints must be an integer >= 1 (got 0)"),
  (["--image-shape", "0", "0", "3"], "--image-shape must be three integers >= 1, height width channels (got 0 0 3)"),
  (["--image-shape", "28", "28"], "--image-shape must be three integers >= 1"),
  (["--num-train", "0"], "--num-train must be an integer >= 1 (got 0)"),
  (["--weight-decay=-1e-4"], "--weight-decay must be a finite number >= 0"),
  (["--momentum", "1.5"], "--momentum must be in [0, 1) (got 1.5)"),
  (["--seed", "-1"], "--seed must be an integer >= 0 (got -1)"),
  (["--lr-schedule", "step", "--schedule", "3"], "--schedule (1 epochs) and --gammas (0 factors) must have"),
  (["--lr-schedule", "step", "--schedule", "3", "--gammas", "0"], "--gammas must be finite factors > 0 (got 0.0)"),
  (["--num-processes", "2", "--process-id", "2"], "--process-id must be below --num-processes (2; got 2)"),
])
def test_impossible_options_are_one_line_errors_at_parse_time(args, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    configs.from_args(args)
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_several_impossible_options_are_named_together():
  with pytest.raises(ValueError, match=r"^--epochs must .*; --log-every must .*$"):
    configs.Config(epochs=0, log_every=0).validate()


def test_every_preset_is_valid():
  for name, preset in configs.PRESETS.items():
    assert configs.Config(**preset).validate() == configs.Config(**preset), name


def test_the_library_entry_point_validates_too(tmp_path):
  from tgq_jax.training import harness
  with pytest.raises(ValueError, match="--log-every must be an integer >= 1"):
    harness.train_and_evaluate(configs.Config(log_every=0, workdir=str(tmp_path / "w")), verbose=False)
  assert not (tmp_path / "w").exists()  # nothing was done


# --- issue 12 from the command line: one line each, no tracebacks ------------------------------


def _one_error_line(result, code: int) -> str:
  assert result.returncode == code, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  return lines[0]


def _make_data_dir_with_garbled_gz(path):
  import gzip
  path.mkdir()
  for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"):
    (path / f"{name}.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + bytes(4)))
  (path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage!" * 8)


def _make_run_of_another_arch(path):
  import trainer_helpers  # noqa: F401  (registers tiny_cnn)
  from tgq_jax.training import harness
  harness.train_and_evaluate(dataclasses.replace(trainer_helpers.QUICK, workdir=str(path), max_steps=1),
                               verbose=False)
  (path / "config.json").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("prepare, args, message", [
  (lambda p: (p / "empty").mkdir(), ["--dataset", "fashion_mnist", "--data-dir", "{tmp}/empty"],
   "error: data directory {tmp}/empty lacks the Fashion-MNIST idx files train-images-idx3-ubyte, "
   "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may be .gz)"),
  (lambda p: _make_data_dir_with_garbled_gz(p / "gz"), ["--dataset", "fashion_mnist", "--data-dir", "{tmp}/gz"],
   "error: {tmp}/gz/train-images-idx3-ubyte.gz: broken or truncated gzip stream"),
  (lambda p: (p / "run").write_text(""), ["--workdir", "{tmp}/run"],
   "error: --workdir {tmp}/run is a file, not a directory"),
  (lambda p: ((p / "run").mkdir(), (p / "run" / "config.json").write_text("{")), ["--workdir", "{tmp}/run"],
   "error: {tmp}/run/config.json is not a run record of this trainer ("),
  (lambda p: _make_run_of_another_arch(p / "run"), ["--workdir", "{tmp}/run"],
   "error: checkpoint {tmp}/run/checkpoints/1 holds another model (another --arch or other model options?): "),
  (lambda p: None, ["--log-every", "0", "--workdir", "{tmp}/run"], "error: --log-every must be an integer >= 1"),
])
def test_bad_inputs_are_one_line_errors_before_any_work(tmp_path, prepare, args, message):
  prepare(tmp_path)
  metrics = tmp_path / "run" / "metrics.jsonl"
  before = metrics.read_text() if metrics.exists() else None
  result = _run(*SYNTH, "--max-steps", "1", *[a.format(tmp=tmp_path) for a in args], "--workdir", str(tmp_path / "run"))
  assert _one_error_line(result, 2).startswith(message.format(tmp=tmp_path))
  assert (metrics.read_text() if metrics.exists() else None) == before  # nothing trained


@pytest.mark.slow
def test_a_diverging_run_exits_1_with_one_line_and_saves_nothing(tmp_path):
  result = _run(*SYNTH, "--lr", "1e6", "--workdir", str(tmp_path))
  assert re.fullmatch(r"error: training diverged at step 2: loss \S+e\+\d+ is more than 10x its running level "
                      r"2\.3\d*; stopping \(no checkpoint was written\)\.", _one_error_line(result, 1))
  assert not [p for p in os.listdir(tmp_path / "checkpoints") if p[0].isdigit()]


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_one_warning_and_the_run_resumes_from_the_previous_one(tmp_path):
  first = _run(*SYNTH, "--max-steps", "4", "--checkpoint-every", "2", "--workdir", str(tmp_path))
  assert first.returncode == 0, first.stderr[-2000:]
  arrays = tmp_path / "checkpoints" / "4" / "state" / "ocdbt.process_0" / "d"
  for name in os.listdir(arrays):  # every array file: one alone may hold only bytes nothing reads
    os.truncate(arrays / name, os.path.getsize(arrays / name) // 2)
  again = _run(*SYNTH, "--max-steps", "6", "--checkpoint-every", "2", "--workdir", str(tmp_path))
  warning = _one_error_line(again, 0)
  assert warning.startswith(f"warning: checkpoint {tmp_path}/checkpoints/4 cannot be read (")
  assert warning.endswith("; using the previous one (step 2)") and "Event loop is closed" not in again.stderr
  assert "resuming from step 2" in again.stdout
  assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
