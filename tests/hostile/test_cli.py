"""train.py used as a hostile user would (issue 21): each misuse is one line and leaves the workdir intact.

Most cases call ``train.main`` in this process (the CLI surface without a new interpreter);
signals, the workdir lock and a full disk need a real second process.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tgq_jax.training import checkpoints, configs, workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
           PYTHONPATH=REPO, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
from trainer_helpers import SYNTH_ARGS, popen_until_logged  # noqa: E402  (tests/ is on sys.path: conftest)

SYNTH = [*SYNTH_ARGS, "--batch-size", "32", "--eval-batch-size", "64"]


def _train_module():
  spec = importlib.util.spec_from_file_location("train_cli", os.path.join(REPO, "train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TRAIN = _train_module()


def _main(capsys, *args) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of ``train.py ARGS`` run in this process."""
  capsys.readouterr()
  code = TRAIN.main([*SYNTH, *map(str, args)])
  out, err = capsys.readouterr()
  return code, out, err


def _one_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


def _files(path) -> dict[str, bytes]:
  """Every file under ``path`` and its bytes (what "nothing was touched" compares)."""
  return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(path) for f in fs}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir holding a 1-step run of the synthetic demo (copy it before changing it)."""
  path = tmp_path_factory.mktemp("trained") / "run"
  assert TRAIN.main([*SYNTH, "--max-steps", "1", "--workdir", str(path)]) == 0
  return path


@pytest.fixture
def run_copy(trained, tmp_path):
  shutil.copytree(trained, tmp_path / "run")
  return tmp_path / "run"


# --- one process per workdir; SIGINT ------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_is_refused_naming_the_first_and_sigint_stops_the_first_cleanly(tmp_path, capsys):
  cmd = [sys.executable, os.path.join(REPO, "train.py"), *SYNTH, "--epochs", "1000", "--log-every", "1",
         "--workdir", str(tmp_path)]
  metrics = tmp_path / "metrics.jsonl"
  first = popen_until_logged(cmd, ENV, metrics)
  config, rows = (tmp_path / "config.json").read_bytes(), metrics.read_text()
  code, _, err = _main(capsys, "--epochs", "1000", "--log-every", "1", "--workdir", tmp_path)  # (in this process)
  assert code == 2
  assert re.fullmatch(f"error: workdir {tmp_path} is in use by another run \\(pid {first.pid} on host "
                      f"{re.escape(socket.gethostname())} since [^)]+\\); wait for it to finish or use another "
                      "--workdir", _one_line(err))
  assert (tmp_path / "config.json").read_bytes() == config
  assert metrics.read_text().startswith(rows)  # the first run's rows are all there, and it went on writing

  first.send_signal(signal.SIGINT)
  out, err = first.communicate(timeout=120)
  assert first.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["interrupted"] and f"interrupted (SIGINT): checkpoint saved at step {summary['steps']}" in out
  assert max(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == summary["steps"]
  assert (tmp_path / workdir_lib.LOCK).read_text() == ""  # released: the file names no holder


def test_the_lock_names_its_holder_and_a_dead_holder_s_record_is_no_lock(tmp_path):
  gone = subprocess.Popen(["true"])  # noqa: S607  (a pid that has exited)
  gone.wait()
  # What a crashed run leaves: a record naming it, but no flock (the kernel dropped it with the process).
  (tmp_path / workdir_lib.LOCK).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                                       "since": "yesterday"}))
  with workdir_lib.workdir_lock(str(tmp_path)):
    record = json.loads((tmp_path / workdir_lib.LOCK).read_text())
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    # Another open file description (as another process has) cannot take it, and is told who holds it.
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match=f"^workdir {tmp_path} is in use by another run \\(pid {os.getpid()} on host "):
      with workdir_lib.workdir_lock(str(tmp_path)):
        pass
  with workdir_lib.workdir_lock(str(tmp_path)):  # released on exit
    pass


# --- --eval-only, resume with another recipe, tampered config.json ------------------------------


def test_eval_only_on_a_mistyped_or_empty_workdir_is_an_error(tmp_path, capsys):
  code, out, err = _main(capsys, "--eval-only", "--workdir", tmp_path / "mistyped")
  assert code == 2 and _one_line(err) == (f"error: --eval-only: workdir {tmp_path / 'mistyped'} does not exist; it "
                                          "evaluates a trained run's checkpoint (a mistyped --workdir?)")
  assert not (tmp_path / "mistyped").exists() and "test accuracy" not in out
  (tmp_path / "empty").mkdir()
  code, _, err = _main(capsys, "--eval-only", "--workdir", tmp_path / "empty")
  assert code == 2 and _one_line(err).startswith(f"error: --eval-only: workdir {tmp_path / 'empty'} holds no checkpoint")
  assert os.listdir(tmp_path / "empty") == []


@pytest.mark.parametrize("args, message", [
  (["--update", "joint"], "--update 'sequential' there, 'joint' now"),
  (["--optimizer", "sgd"], "--optimizer 'adam' there, 'sgd' now"),
  (["--lr", "0.1", "--seed", "3"], "--lr 0.005 there, 0.1 now; --seed 0 there, 3 now"),
])
def test_resuming_with_another_recipe_is_refused_naming_the_option(run_copy, capsys, args, message):
  before = _files(run_copy)
  code, _, err = _main(capsys, "--max-steps", "2", *args, "--workdir", run_copy)
  line = _one_line(err)
  assert code == 2 and line.startswith(f"error: workdir {run_copy} holds a run trained with other options "
                                       f"({message}); resuming would continue it with another recipe"), line
  assert _files(run_copy) == before


@pytest.mark.slow
def test_a_resume_with_other_run_options_appends_them_and_never_rewrites_the_record(run_copy, capsys):
  record = json.loads((run_copy / "config.json").read_text())
  code, out, err = _main(capsys, "--max-steps", "1", "--eval-only", "--eval-batch-size", "32",
                         "--workdir", run_copy)  # (evaluating: a resume that compiles no train step)
  assert code == 0 and "resuming from step 1" in out, err
  after = json.loads((run_copy / "config.json").read_text())
  assert {k: v for k, v in after.items() if k != "resumes"} == record
  changed = {"workdir": str(run_copy), "eval_batch_size": 32, "eval_only": True}
  assert after["resumes"] == [{"step": 1, "changed": changed}]
  code, _, err = _main(capsys, "--max-steps", "1", "--eval-only", "--eval-batch-size", "32", "--workdir", run_copy)
  assert code == 0 and json.loads((run_copy / "config.json").read_text()) == after, err  # nothing new to record


def _edit_config(run, fn):
  path = run / "config.json"
  record = json.loads(path.read_text())
  fn(record)
  path.write_text(json.dumps(record))


@pytest.mark.parametrize("edit, message", [
  (lambda r: r["model"].update(arch="resnet18"),
   "records model arch 'resnet18', but the run's options build 'small_cnn' (was the file edited?)"),
  (lambda r: r["model"].update(kwargs={"widths": "abc"}),
   "records model kwargs {'widths': 'abc'}, but the run's options build {} (was the file edited?)"),
  # A module path ModelSpec could import: the trainer never imports or calls what the file names.
  (lambda r: r["model"].update(arch="hostile_module_that_must_not_load:Model"),
   "records model arch 'hostile_module_that_must_not_load:Model', but the run's options build 'small_cnn'"),
  (lambda r: r["config"].update(arch="resnet18"), "holds a run with other options (--arch 'resnet18' there, "
                                                  "'small_cnn' now)"),
])
def test_a_tampered_config_json_is_one_line_and_nothing_it_names_is_loaded(run_copy, capsys, edit, message):
  _edit_config(run_copy, edit)
  before = _files(run_copy)
  code, _, err = _main(capsys, "--max-steps", "2", "--workdir", run_copy)
  assert code == 2 and message in _one_line(err), err
  assert "hostile_module_that_must_not_load" not in sys.modules
  assert _files(run_copy) == before


# --- inputs checked up front ----------------------------------------------------------------------


def test_too_small_an_image_shape_is_one_line_before_any_work(tmp_path, capsys):
  code, _, err = _main(capsys, "--image-shape", "1", "1", "1", "--max-steps", "1", "--workdir", tmp_path)
  assert code == 2 and _one_line(err).startswith("error: --image-shape 1 1 1 does not fit --arch small_cnn: "
                                                 "a training step fails (")
  assert not (tmp_path / "metrics.jsonl").exists()


def test_init_from_and_data_dir_say_what_the_path_is(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "weights.npz").write_text("hello")  # a text file under an .npz name
  for args, expected in [
    (["--init-from", tmp_path / "notes.txt"],
     f"error: --init-from: {tmp_path / 'notes.txt'} is a file, not a checkpoint directory; --init-from takes a "
     "checkpoint of this trainer"),
    (["--init-from", tmp_path / "weights.npz"],
     f"error: --init-from: {tmp_path / 'weights.npz'} is not a .npz archive (no zip header"),
    (["--dataset", "fashion_mnist", "--data-dir", os.path.join(REPO, "README.md")],
     f"error: data directory {os.path.join(REPO, 'README.md')} is a file, not a directory"),
  ]:
    code, _, err = _main(capsys, *args, "--max-steps", "1", "--workdir", tmp_path / "run")
    line = _one_line(err)
    assert code == 2 and line.startswith(expected) and "allow_pickle" not in line, line


@pytest.mark.parametrize("args, message", [
  (["--schedule", "30", "60", "--gammas", "0.1", "0.1"],
   "--schedule and --gammas apply to --lr-schedule step only (got --lr-schedule cosine with them)"),
  (["--lr-schedule", "step", "--schedule", "60", "30", "--gammas", "0.1", "0.1"],
   "--schedule must list increasing epochs (got 60 30)"),
  (["--lr-schedule", "step", "--schedule", "30", "30", "--gammas", "0.1", "0.1"],
   "--schedule must list increasing epochs (got 30 30)"),
])
def test_a_schedule_that_would_be_ignored_or_is_decreasing_is_refused(args, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    configs.from_args(args)
  assert exit_.value.code == 2 and _one_line(capsys.readouterr().err) == f"error: {message}"


def test_a_preset_s_step_epochs_do_not_follow_it_to_cosine():
  cfg = configs.from_args(["--config", "cifar10_resnet20", "--lr-schedule", "cosine"])
  assert (cfg.lr_schedule, cfg.schedule, cfg.gammas) == ("cosine", (), ())


# --- divergence: a state is good only if a resume and an export can use it -------------------------


@pytest.mark.slow
def test_a_weight_decay_that_overflows_the_scales_saves_nothing(tmp_path, capsys):
  code, _, err = _main(capsys, "--optimizer", "sgd", "--weight-decay", "1e38", "--max-steps", "2",
                       "--checkpoint-every", "1", "--log-every", "1", "--workdir", tmp_path)
  assert code == 1 and re.fullmatch(r"error: training diverged at step 1: layer \w+ (\(and \d+ more\) )?has "
                                    r"non-finite scales .*; stopping \(no checkpoint was written\)\.", _one_line(err))
  assert not [p for p in os.listdir(tmp_path / "checkpoints") if p[0].isdigit()]


# --- a full disk ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _small_tmpfs(path, size: str):
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],  # noqa: S607
                           capture_output=True).returncode == 0
  if not mounted:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)  # noqa: S607


def _fill(path) -> None:
  with open(path / "filler", "wb") as f:
    with contextlib.suppress(OSError):
      while True:
        f.write(b"\0" * 4096)
        f.flush()
    with contextlib.suppress(OSError):
      f.close()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_run_s_files(tmp_path):
  with _small_tmpfs(tmp_path / "disk", "3000k") as disk:
    run = disk / "run"
    args = [sys.executable, os.path.join(REPO, "train.py"), *SYNTH, "--max-steps", "6", "--checkpoint-every", "2",
            "--log-every", "1", "--workdir", str(run)]
    # Two checkpoints (1.2 MB each, small CNN + Adam) fit; the third does not.
    first = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1
    assert _one_line(first.stderr) == (f"error: cannot save checkpoint 6 in {run / 'checkpoints'} (No space left "
                                       "on device); the older checkpoints are intact")
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]  # no orbax tmp folder left
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    checkpoints.load_variables(str(run), report=pytest.fail)  # the newest, step 4, intact (verified)
    json.loads((run / "config.json").read_text())

    _fill(disk)  # not a byte left: the rerun fails at its first write, one line, no traceback
    before = _files(run)
    again = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1
    assert _one_line(again.stderr) == f"error: cannot write {run / 'metrics.jsonl'} (No space left on device)"
    after = _files(run)
    assert {k: v for k, v in after.items() if k != workdir_lib.LOCK and "tfevents" not in k} == \
           {k: v for k, v in before.items() if k != workdir_lib.LOCK and "tfevents" not in k}
