"""orbax checkpoints: round trip, last N + best retention, a crash mid-save, integrity checks and fallback."""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tgq_jax.training import checkpoints


def _state(v: float) -> dict:
  return {"params": {"layer": {"kernel": np.full((3, 2), v, np.float32), "delta": np.array(v / 10, np.float32)}},
          "batch_stats": {"bn": {"mean": np.arange(2, dtype=np.float32) + v}}, "step": np.array(int(v), np.int32)}


def test_round_trip_is_exact(tmp_path):
  manager = checkpoints.make_manager(str(tmp_path))
  checkpoints.save(manager, 7, _state(1.5), {"iterator": {"epoch": 1, "index": 3}})
  state, data_state = checkpoints.restore(manager, _state(0.0))
  jax.tree.map(np.testing.assert_array_equal, state, _state(1.5))
  assert data_state == {"iterator": {"epoch": 1, "index": 3}}


def test_keeps_the_last_n_and_the_best(tmp_path):
  manager = checkpoints.make_manager(str(tmp_path), keep=2)
  accuracies = {1: 0.5, 2: 0.9, 3: 0.6, 4: None, 5: 0.7}  # step 4: a SIGTERM save without metrics
  for step, acc in accuracies.items():
    metrics = None if acc is None else {checkpoints.BEST_METRIC: acc}
    checkpoints.save(manager, step, _state(step), {"iterator": {}}, metrics)
  assert manager.all_steps() == [2, 4, 5]  # best (2) + last two


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
  manager = checkpoints.make_manager(str(tmp_path))
  checkpoints.save(manager, 1, _state(1.0), {"iterator": {"index": 1}})

  # A crash in the middle of writing step 2: the arrays are written into orbax's tmp dir, then
  # the JSON item's writer dies.
  def boom(*args, **kwargs):
    raise KeyboardInterrupt("simulated crash mid-save")
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", boom)
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", boom)
  with pytest.raises(KeyboardInterrupt):
    checkpoints.save(manager, 2, _state(2.0), {"iterator": {"index": 2}})
  monkeypatch.undo()
  assert any(p.name.startswith("2.orbax-checkpoint-tmp") for p in tmp_path.iterdir())  # half-written
  # Also a process killed mid-write: a partial tmp directory of step 3 left on disk.
  partial = tmp_path / "3.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 100)

  fresh = checkpoints.make_manager(str(tmp_path))
  assert fresh.latest_step() == 1
  state, data_state = checkpoints.restore(fresh, _state(0.0))
  jax.tree.map(np.testing.assert_array_equal, state, _state(1.0))
  assert data_state == {"iterator": {"index": 1}}
  # The new manager cleans tmp directories up in the background (an orbax CommitFuture).
  deadline = time.monotonic() + 60
  while partial.exists() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not partial.exists()

def test_load_variables_accepts_workdir_checkpoint_dir_and_step_dir(tmp_path):
  manager = checkpoints.make_manager(str(tmp_path / "checkpoints"))
  checkpoints.save(manager, 5, _state(5.0), {"iterator": {}})
  for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "5"):
    got = checkpoints.load_variables(str(path))
    np.testing.assert_array_equal(got["params"]["layer"]["kernel"], 5.0)
  with pytest.raises(checkpoints.CheckpointError, match="no such"):
    checkpoints.load_variables(os.path.join(str(tmp_path), "nope"))


# --- integrity: checksums written at save time, verified at restore -----------------------------


def _big_state(v: float) -> dict:
  """A state whose kernel dominates the array file (so "the largest file" holds array bytes)."""
  state = _state(v)
  state["params"]["layer"]["kernel"] = np.random.default_rng(int(v)).normal(size=(64, 64)).astype(np.float32)
  return state


def _largest_file(directory) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def _garble(step_dir):
  path = _largest_file(step_dir / "state")
  raw = bytearray(open(path, "rb").read())
  raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(range(64))
  open(path, "wb").write(bytes(raw))


def _truncate(step_dir):
  path = _largest_file(step_dir / "state")
  os.truncate(path, os.path.getsize(path) // 2)


def _garble_record(step_dir):
  (step_dir / "integrity" / "metadata").write_text("{not json")


DAMAGE = {
  "garbled bytes": _garble,
  "truncated file": _truncate,
  "deleted state/": lambda d: shutil.rmtree(d / "state"),
  "deleted integrity/": lambda d: shutil.rmtree(d / "integrity"),
  "garbled integrity record": _garble_record,
}


def _two_checkpoints(directory) -> ocp.CheckpointManager:
  manager = checkpoints.make_manager(str(directory))
  for step in (1, 2):
    checkpoints.save(manager, step, _big_state(step), {"iterator": {"index": step}})
  return manager


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage):
  _two_checkpoints(tmp_path)
  DAMAGE[damage](tmp_path / "2")
  reports = []
  manager = checkpoints.make_manager(str(tmp_path))
  state, data_state = checkpoints.restore(manager, _big_state(0), report=reports.append, quarantine=True)
  jax.tree.map(np.testing.assert_array_equal, state, _big_state(1))
  assert data_state == {"iterator": {"index": 1}}
  assert len(reports) == 1 and "\n" not in reports[0], reports
  assert reports[0].startswith(f"warning: checkpoint {tmp_path / '2'} ")
  assert reports[0].endswith("using the previous one (step 1)"), reports[0]
  # Moved aside: the resumed run saves step 2 afresh instead of skipping it as "already saved".
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith("2.corrupt-")]
  assert manager.all_steps() == [1]
  checkpoints.save(manager, 2, _big_state(2), {"iterator": {"index": 2}})
  state, _ = checkpoints.restore(checkpoints.make_manager(str(tmp_path)), _big_state(0), report=reports.append)
  jax.tree.map(np.testing.assert_array_equal, state, _big_state(2))


def test_a_garbled_checkpoint_is_caught_whether_or_not_orbax_notices(tmp_path):
  """Why the checksums exist: orbax may restore garbled array bytes without an error (where the
  64 bytes land in raw array data; in a zstd frame the read fails instead, which depends on where
  the save put each array). Either way our restore names the damaged checkpoint."""
  _two_checkpoints(tmp_path)
  _garble(tmp_path / "2")
  try:
    raw = checkpoints.make_manager(str(tmp_path)).restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  except ValueError:  # the storage layer noticed
    raw, expected = None, r"cannot be read"
  else:
    expected = r"fails its integrity check \(1 of 4 arrays .* params/layer/kernel\)"
    assert not np.array_equal(raw["state"]["params"]["layer"]["kernel"], _big_state(2)["params"]["layer"]["kernel"])
  with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint {tmp_path / '2'} {expected}"):
    checkpoints.restore(checkpoints.make_manager(str(tmp_path)), _big_state(0), step=2)


def test_no_intact_checkpoint_is_an_error(tmp_path):
  _two_checkpoints(tmp_path)
  for step in ("1", "2"):
    _truncate(tmp_path / step)
  reports = []
  with pytest.raises(checkpoints.CheckpointError, match=f"no intact checkpoint in {tmp_path}"):
    checkpoints.restore(checkpoints.make_manager(str(tmp_path)), _big_state(0), report=reports.append)
  assert len(reports) == 2 and reports[1].endswith("no older checkpoint left")


def test_another_model_is_one_clear_line_not_a_fallback(tmp_path):
  _two_checkpoints(tmp_path)
  other = _big_state(0)
  other["params"]["layer"]["kernel"] = np.zeros((3, 3), np.float32)
  reports = []
  with pytest.raises(checkpoints.CheckpointError, match=r"2 holds another model .*1 arrays differ, e\.g\. "
                                                        r"params/layer/kernel: \(64, 64\) float32 there, "
                                                        r"\(3, 3\) float32 here") as err:
    checkpoints.restore(checkpoints.make_manager(str(tmp_path)), other, report=reports.append)
  assert not isinstance(err.value, checkpoints.CorruptCheckpointError) and not reports


@pytest.mark.parametrize("where", [("params", "layer", "kernel"), ("batch_stats", "bn", "mean")])
def test_save_refuses_non_finite_leaves_and_writes_nothing(tmp_path, where):
  manager = checkpoints.make_manager(str(tmp_path))
  state = _state(1.0)
  leaf = state[where[0]][where[1]]
  leaf[where[2]] = np.where(np.arange(leaf[where[2]].size).reshape(leaf[where[2]].shape) == 1, np.inf,
                            leaf[where[2]]).astype(np.float32)
  with pytest.raises(checkpoints.NonFiniteStateError, match=f"non-finite values in {'/'.join(where)}$"):
    checkpoints.save(manager, 1, state, {"iterator": {}})
  assert manager.all_steps() == [] and not [p for p in tmp_path.iterdir() if p.name[0].isdigit()]


def test_non_finite_leaves_knows_bfloat16_and_ignores_integers():
  arrays = {"a": np.array([1, np.nan], jnp.bfloat16), "b": np.array([1, 2], np.uint32),
            "c": np.array(np.inf, np.float32), "d": np.ones(3, np.float32)}
  assert checkpoints.nonfinite_leaves(arrays) == ["a", "c"]


def test_load_variables_falls_back_past_a_damaged_step_and_verifies_a_named_one(tmp_path):
  _two_checkpoints(tmp_path / "checkpoints")
  _garble(tmp_path / "checkpoints" / "2")
  reports = []
  got = checkpoints.load_variables(str(tmp_path), report=reports.append)
  np.testing.assert_array_equal(got["params"]["layer"]["kernel"], _big_state(1)["params"]["layer"]["kernel"])
  assert len(reports) == 1 and re.search(r"checkpoints/2 (fails its integrity check|cannot be read)", reports[0])
  assert (tmp_path / "checkpoints" / "2").is_dir()  # reading someone's run moves nothing
  with pytest.raises(checkpoints.CheckpointError, match="checkpoints/2 (fails its integrity check|cannot be read)"):
    checkpoints.load_variables(str(tmp_path / "checkpoints" / "2"))


def test_load_variables_without_checkpoints_names_the_path_only(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(checkpoints.CheckpointError, match=f"^no checkpoint found in {tmp_path}$"):
    checkpoints.load_variables(str(tmp_path))


def test_load_variables_leaves_logging_alone(tmp_path):
  manager = checkpoints.make_manager(str(tmp_path / "checkpoints"))
  checkpoints.save(manager, 5, _state(5.0), {"iterator": {}})
  before = {name: list(logging.getLogger(name).filters) for name in ("", "absl")}
  for _ in range(2):
    checkpoints.load_variables(str(tmp_path))
  assert {name: list(logging.getLogger(name).filters) for name in ("", "absl")} == before


def test_uses_only_orbax_public_api():
  source = open(checkpoints.__file__).read()
  assert "_src" not in source


def test_a_failed_restore_leaves_no_closed_event_loop_tracebacks(tmp_path, monkeypatch):
  """orbax closes its event loop when a read fails; tensorstore reads still in flight then raise
  "Event loop is closed" through sys.unraisablehook (the issue's traceback spam, some runs only)."""
  time.sleep(0.5)  # stragglers of earlier tests' failed restores land in the hook they found
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  # Many arrays: many concurrent reads, so some are still in flight when the first one fails.
  rng = np.random.default_rng(0)
  many = {"params": {f"layer{i}": {"kernel": rng.normal(size=(64, 64)).astype(np.float32)} for i in range(20)}}
  manager = checkpoints.make_manager(str(tmp_path))
  checkpoints.save(manager, 1, many, {"iterator": {}})
  _truncate(tmp_path / "1")
  for _ in range(10):
    with pytest.raises(checkpoints.CorruptCheckpointError, match="cannot be read"):
      checkpoints.restore(manager, many, step=1)
  time.sleep(0.5)  # let stragglers land
  assert not seen
  other = types.SimpleNamespace(exc_value=ValueError("something else"))
  sys.unraisablehook(other)
  assert seen == [other]  # everything else still reaches the previous hook
  checkpoints.save(manager, 2, many, {"iterator": {}})
  checkpoints.restore(manager, many, step=2)
  assert isinstance(sys.unraisablehook, functools.partial)  # a success restores the hook it found ...
  assert sys.unraisablehook.args == (seen.append,)  # ... which is the one kept after the failures
