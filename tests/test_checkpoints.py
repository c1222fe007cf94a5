"""orbax checkpoints: round trip, last N + best retention, a crash mid-save, architecture checks."""
from __future__ import annotations

import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tgq_jax import checkpoints


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
