"""python -m tgq_jax.export: a workdir's checkpoint as one file; one-line errors; nothing half-written."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tgq_jax import export
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.models import create_model

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 3-step run of the registered test arch tiny_cnn: (workdir, the trainer's summary)."""
  from trainer_helpers import quick  # registers the tiny test archs
  from tgq_jax.training import harness

  workdir = tmp_path_factory.mktemp("cli") / "run"
  summary = harness.train_and_evaluate(quick(workdir, max_steps=3), verbose=False)
  return workdir, summary


def _error(capsys, *argv) -> str:
  assert export.main(list(argv)) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and err.count("\n") == 1, err
  return err


def _child(code: str, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh python (tests/ and the repository importable), optionally with at most
  ``fsize`` bytes per written file (RLIMIT_FSIZE: a full disk, as the writer sees it)."""
  prefix = "" if fsize is None else textwrap.dedent(f"""
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  """)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS]), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", prefix + textwrap.dedent(code), *args], capture_output=True,
                        text=True, env=env, timeout=300, check=False)


def test_export_cli_from_a_train_workdir_gives_the_checkpoint_logits(trained, tmp_path, capsys):
  from tgq_jax.training import checkpoints

  workdir, summary = trained
  out = tmp_path / "model.safetensors"
  assert export.main(["--workdir", str(workdir), "--out", str(out), "--report-json", str(tmp_path / "r.json")]) == 0
  printed = capsys.readouterr().out
  assert "wrote" in printed and "ternary layers: packed/fp32" in printed
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["packed_bytes"] > 0
  # The end-of-run table counts what an export stores (planar codes).
  assert (f"FP32 {report['fp32_bytes'] / 1024:.1f} KiB -> 2-bit ternary {report['packed_bytes'] / 1024:.1f} KiB"
          in summary["report"]), summary["report"]

  trained_model = create_model("tiny_cnn", 10, quant=QuantPolicy("tga"))
  variables = checkpoints.load_variables(str(workdir))
  x = jax.random.normal(jax.random.key(3), (5, 28, 28, 1))
  want = np.asarray(trained_model.apply(variables, x, train=False))
  for packed in (False, True):
    loaded_model, loaded, header = export.load_packed(out, packed=packed)
    assert header["spec"]["arch"] == "tiny_cnn" and header["dataset"] == "synthetic"
    np.testing.assert_array_equal(np.asarray(loaded_model.apply(loaded, x, train=False)), want)

  # A workdir written before config.json held the model spec: the same spec, from the run's options.
  old_workdir = tmp_path / "old_run"
  shutil.copytree(workdir, old_workdir)
  config = json.loads((old_workdir / "config.json").read_text())
  model_entry = config.pop("model")
  assert model_entry == header["spec"]
  (old_workdir / "config.json").write_text(json.dumps(config))
  old = tmp_path / "old.safetensors"
  assert export.main(["--workdir", str(old_workdir), "--out", str(old)]) == 0
  loaded_model, loaded, header = export.load_packed(old)
  assert header["spec"] == model_entry
  np.testing.assert_array_equal(np.asarray(loaded_model.apply(loaded, x, train=False)), want)


def test_export_cli_errors_are_one_line(tmp_path, capsys):
  assert "config.json" in _error(capsys, "--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "m.safetensors"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({
    "config": {"arch": "small_cnn", "quantizer": "tga", "per_channel": False, "ternary_first": True,
               "ternary_last": True},
    "dataset_info": {"name": "synthetic", "num_classes": 10, "image_shape": [28, 28, 1]}}))
  err = _error(capsys, "--workdir", str(workdir), "--out", str(tmp_path / "m.safetensors"))
  assert "no checkpoint to export" in err and "--init-from" not in err
  out_dir = tmp_path / "out.safetensors"
  out_dir.mkdir()
  assert "is a directory" in _error(capsys, "--workdir", str(workdir), "--out", str(out_dir))
  assert "is a directory" in _error(capsys, "--workdir", str(workdir), "--out", str(tmp_path))
  assert os.listdir(out_dir) == [] and not any(".tmp-" in p.name for p in tmp_path.iterdir())
  assert "must end in .safetensors" in _error(capsys, "--workdir", str(workdir), "--out", str(tmp_path / "m.tgq"))
  assert "does not exist" in _error(capsys, "--workdir", str(workdir), "--out", str(tmp_path / "no" / "m.safetensors"))


def test_report_path_is_checked_before_the_model_is_written(trained, tmp_path, capsys):
  """--report-json into a missing directory or onto a directory: one line, and no model file either."""
  workdir, _ = trained
  out = tmp_path / "m.safetensors"
  err = _error(capsys, "--workdir", str(workdir), "--out", str(out), "--report-json", str(tmp_path / "no" / "r.json"))
  assert "--report-json" in err and "does not exist" in err
  assert "is a directory" in _error(capsys, "--workdir", str(workdir), "--out", str(out), "--report-json",
                                    str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_leaves_the_previous_file_intact(trained, tmp_path):
  """The export runs out of space (RLIMIT_FSIZE in a child process): one error line, exit status 2, the
  model file from before unchanged, no temporary file left."""
  workdir, _ = trained
  out = tmp_path / "model.safetensors"
  out.write_bytes(b"the previous export")
  child = _child("""
    import sys
    import trainer_helpers  # registers tiny_cnn, as the run that made the workdir did
    from tgq_jax.export.cli import main
    sys.exit(main(["--workdir", sys.argv[1], "--out", sys.argv[2]]))
  """, str(workdir), str(out), fsize=1024)
  assert child.returncode == 2, child.stderr[-2000:]
  assert child.stderr.startswith("error:") and child.stderr.count("\n") == 1, child.stderr[-2000:]
  assert "cannot write" in child.stderr and "File too large" in child.stderr and "nothing was changed" in child.stderr
  assert out.read_bytes() == b"the previous export"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_killed_export_leaves_a_temporary_file_the_next_one_removes(trained, tmp_path, capsys):
  """kill -9 between writing and renaming: the previous file is intact, the temporary file stays; the next
  export to that path removes it (its process is gone) but not another live process's."""
  workdir, _ = trained
  out = tmp_path / "model.safetensors"
  out.write_bytes(b"the previous export")
  child = _child("""
    import os, signal, sys
    from tgq_jax.export import files
    os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed at the worst moment
    files.atomic_write(sys.argv[1], b"half of a new export")
  """, str(out))
  assert child.returncode == -signal.SIGKILL
  (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith("model.safetensors.tmp-")]
  assert stale.read_bytes() == b"half of a new export" and out.read_bytes() == b"the previous export"
  live = tmp_path / f"model.safetensors.tmp-{os.getppid()}"  # a process that runs (pytest's parent)
  live.write_bytes(b"another export in progress")
  other = tmp_path / "other.safetensors.tmp-999999999"  # another destination's: not this export's business
  other.write_bytes(b"x")
  assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
  capsys.readouterr()
  assert not stale.exists() and live.exists() and other.exists()
  export.load_packed(out)


def test_export_does_not_import_the_training_harness():
  child = _child("""
    import sys
    import tgq_jax.export, tgq_jax.export.cli, tgq_jax.training.checkpoints, tgq_jax.training.workdir
    print(sorted(m for m in sys.modules if m.startswith("tgq_jax.training")))
  """)
  assert child.returncode == 0, child.stderr[-2000:]
  loaded = set(eval(child.stdout.strip().splitlines()[-1]))
  assert "tgq_jax.training.harness" not in loaded and "tgq_jax.training.checkpoints" in loaded
