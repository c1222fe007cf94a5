"""Checkpoints with orbax: the training state, the data iterator position, the best and the last N.

Layout: ``<workdir>/checkpoints/<step>/{state,data}`` managed by one
``ocp.CheckpointManager``. ``state`` is the train state (params, batch
statistics, both optimizer states, step, RNG) as a ``StandardSave`` pytree;
``data`` is the iterator position as JSON.

Retention: orbax 0.12 preservation policies combine ``LatestN(keep)`` with
``BestN(n=1)`` on the ``test_accuracy`` metric (``AnyPreservationPolicy``): the
last N checkpoints and the best one survive, in a single manager. Checkpoints
saved without metrics (mid-epoch, on SIGTERM) only count for "last N".

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<ts>`` and
renames it to ``<step>`` only once everything is written (on POSIX file
systems; on GCS it writes a commit marker instead). A crash during a save
leaves a tmp directory that ``latest_step`` ignores (and the next manager
cleans up), so the previous checkpoint is intact; ``tests/test_checkpoints.py``
simulates this.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

BEST_METRIC = "test_accuracy"


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked (missing, wrong architecture)."""


def make_manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  policy = pp.AnyPreservationPolicy(policies=[
    pp.LatestN(n=keep),
    pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
  ])
  # Synchronous saves: the SIGTERM / NaN paths exit right after saving, and a
  # few small arrays do not need a background thread.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=False,
                                         create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         metrics: dict | None = None) -> None:
  """Saves unless this step is already saved (e.g. SIGTERM right after an epoch-end save)."""
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.Composite(
    state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
    data=ocp.args.JsonSave(data_state)), metrics=metrics, force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, target_state: Any, step: int | None = None) -> tuple[Any, dict]:
  """Restores (state, data_state) at ``step`` (default: latest) into the structure of ``target_state``.

  ``target_state`` may hold concrete arrays or ``jax.ShapeDtypeStruct``s (with
  shardings); the restored arrays get its shardings.
  """
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(target_state))
  restored = manager.restore(step, args=ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  return flax.serialization.from_state_dict(target_state, restored["state"]), restored["data"]


def resolve(path: str) -> tuple[str, int | None]:
  """(manager directory, step or None for latest) for a workdir, checkpoints dir or step dir."""
  if not os.path.isdir(path):
    raise CheckpointError(f"--init-from: no such checkpoint directory: {path}")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(os.path.normpath(path)).isdigit():
    return os.path.dirname(os.path.normpath(path)), int(os.path.basename(os.path.normpath(path)))
  return path, None


def _ignore_missing_item_metadata(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("Metadata file does not exist")


def load_variables(path: str) -> dict:
  """Loads ``{"params", "batch_stats"}`` from a checkpoint of this trainer (host numpy arrays)."""
  directory, step = resolve(path)
  if step is None:  # finalized steps only: orbax's tmp dirs are not plain integers
    steps = [int(p) for p in os.listdir(directory) if p.isdigit() and os.path.isdir(os.path.join(directory, p, "state"))]
    step = max(steps, default=None)
  if step is None:
    raise CheckpointError(f"--init-from: no checkpoint found in {path}")
  # Restore as host numpy arrays: the checkpoint may come from another device topology.
  item = os.path.join(os.path.abspath(directory), str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  # The step-level metadata lives one folder up (the manager's); orbax warns that the item has
  # none of its own, which is expected here and would only confuse users.
  logging.getLogger("absl").addFilter(_ignore_missing_item_metadata)
  tree = checkpointer.metadata(item).item_metadata
  tree = getattr(tree, "tree", tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                              is_leaf=lambda x: hasattr(x, "shape"))
  state = checkpointer.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
