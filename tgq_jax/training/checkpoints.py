"""Checkpoints with orbax: the training state, the data iterator position, the best and the last N.

Layout: ``<workdir>/checkpoints/<step>/{state,data,integrity}`` managed by one
``ocp.CheckpointManager``. ``state`` is the train state (params, batch
statistics, both optimizer states, step, RNG) as a ``StandardSave`` pytree;
``data`` is the iterator position as JSON; ``integrity`` is JSON with the
shape, dtype and SHA-256 of every saved array and of ``data``. The state's
arrays are host arrays (replicated runs) or global device arrays saved as they
are (``--parallel fsdp``: each process writes its shards); :func:`restore`
reads any of them into host arrays or into the shardings it is given, on any
device count.

Retention: orbax preservation policies combine ``LatestN(keep)`` with
``BestN(n=1)`` on the ``test_accuracy`` metric (``AnyPreservationPolicy``): the
last N checkpoints and the best one survive, in a single manager. Checkpoints
saved without metrics (mid-epoch, on SIGTERM) only count for "last N".

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<ts>`` and
renames it to ``<step>`` only once everything is written (on POSIX file
systems; on GCS it writes a commit marker instead). A crash during a save
leaves a tmp directory that ``latest_step`` ignores (and the next manager
cleans up), so the previous checkpoint is intact; ``tests/training/test_checkpoints.py``
simulates this.

Integrity: atomic renames do not protect against later damage (a disk error,
a truncated copy, a deleted folder), and orbax's storage restores garbled bytes
without complaint. So every restore recomputes the checksums of what it read
and compares them with the ones written at save time; a checkpoint that cannot
be read or does not match is :class:`CorruptCheckpointError`, and
:func:`restore` / :func:`load_variables` then fall back to the previous one,
reporting both on one line. Nothing non-finite is ever saved (:func:`save`
refuses), so a restored checkpoint is also finite.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tgq_jax.training.parallel import to_host

BEST_METRIC = "test_accuracy"
STATE, DATA, INTEGRITY = "state", "data", "integrity"
ITEMS = (STATE, DATA, INTEGRITY)
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked (missing, another model, nothing intact)."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint that cannot be read or fails its integrity check (the message names its path)."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (e.g. a full disk); nothing of it is left, older ones are intact."""


class NonFiniteStateError(CheckpointError):
  """A state with NaN/Inf leaves was about to be saved; ``leaves`` names them."""

  def __init__(self, leaves: list[str]):
    self.leaves = leaves
    more = f" (and {len(leaves) - 1} more)" if len(leaves) > 1 else ""
    super().__init__(f"non-finite values in {leaves[0]}{more}")


def report_to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def make_manager(directory: str, keep: int = 2, *, best_metric: str = BEST_METRIC,
                 best_lower: bool = False) -> ocp.CheckpointManager:
  """The run's checkpoint manager: keeps the last ``keep`` and the best by ``best_metric`` (the highest, or
  with ``best_lower`` the lowest: a validation loss) among those saved with metrics."""
  cm = ocp.checkpoint_managers
  policy = cm.AnyPreservationPolicy(policies=[
    cm.LatestN(n=keep),
    # BestN sorts ascending (descending with reverse) and keeps the last n.
    cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_lower, n=1, keep_checkpoints_without_metrics=False),
  ])
  # Synchronous saves: the SIGTERM / divergence paths exit right after saving, and a
  # few small arrays do not need a background thread.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=False,
                                         create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


# --- integrity records -------------------------------------------------------


def flat_arrays(state_dict: Mapping) -> dict[str, np.ndarray]:
  """The array leaves of a (nested dict) state, keyed ``"params/conv0/kernel"``, as host arrays
  (replicated or sharded device arrays are copied whole: :func:`tgq_jax.training.parallel.to_host`)."""
  flat = flax.traverse_util.flatten_dict(dict(state_dict), sep="/")
  return to_host(flat)


def _flat_specs(state_dict: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
  """(shape, dtype) of each leaf of a state dict of arrays or ShapeDtypeStructs, keyed as :func:`flat_arrays`."""
  flat = flax.traverse_util.flatten_dict(dict(state_dict), sep="/")
  return {k: (tuple(np.shape(v)), str(np.dtype(v.dtype) if hasattr(v, "dtype") else np.asarray(v).dtype))
          for k, v in flat.items()}


def _sha256(a: np.ndarray) -> str:
  # Bytes of the array in C order; uint8 view: also works for bfloat16 and 0-d arrays.
  return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def _data_sha256(data_state: Any) -> str:
  return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def integrity_record(arrays: Mapping[str, np.ndarray], data_state: Any) -> dict:
  """What ``integrity`` holds: shape, dtype and SHA-256 of each array, and of the data item."""
  return {"algorithm": "sha256", "data": _data_sha256(data_state),
          "arrays": {k: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha256(a)}
                     for k, a in arrays.items()}}


def nonfinite_leaves(arrays: Mapping[str, np.ndarray]) -> list[str]:
  """Names of the floating-point leaves holding a NaN or Inf."""
  # jnp.issubdtype also knows bfloat16 (numpy does not).
  return [k for k, a in arrays.items() if jnp.issubdtype(a.dtype, jnp.inexact) and not np.all(np.isfinite(a))]


# --- save / restore ----------------------------------------------------------


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         metrics: dict | None = None, *, host_state: Any = None) -> None:
  """Saves unless this step is already saved (e.g. SIGTERM right after an epoch-end save).

  ``state``: host arrays, or global device arrays (e.g. sharded by ``--parallel
  fsdp``), which orbax writes as they are: each process writes the shards it
  holds, nothing is gathered onto one device. The integrity record and the
  finiteness check need host copies of every array: ``host_state`` (the same
  state as host arrays, when the caller has them already) or copies made here
  (:func:`tgq_jax.training.parallel.to_host`; across hosts that gathers every
  array onto every process, a memory cost of one full state per host).

  Raises :class:`NonFiniteStateError` (and writes nothing) if any leaf holds a NaN or Inf.
  """
  if step in manager.all_steps():
    return
  state_dict = flax.serialization.to_state_dict(state)
  arrays = flat_arrays(state_dict if host_state is None else flax.serialization.to_state_dict(host_state))
  if bad := nonfinite_leaves(arrays):
    raise NonFiniteStateError(bad)
  args = ocp.args.Composite(**{
    STATE: ocp.args.StandardSave(state_dict),
    DATA: ocp.args.JsonSave(data_state),
    INTEGRITY: ocp.args.JsonSave(integrity_record(arrays, data_state))})
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.CRITICAL)  # orbax logs a failed write as ERROR before raising it: said below
  try:
    _quietly(lambda: (manager.save(step, args=args, metrics=metrics, force=True), manager.wait_until_finished()))
  except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise ValueError, OSError, RuntimeError...
    _remove_partial_save(manager, step)
    raise CheckpointWriteError(f"cannot save checkpoint {step} in {manager.directory} ({_write_error(e)}); "
                               "the older checkpoints are intact") from None
  finally:
    absl_logger.setLevel(level)


def _write_error(e: BaseException) -> str:
  """The cause of a failed write: the OS error tensorstore names (``[os_error_code='28']``), else the first line."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  if code := re.search(r"os_error_code='?(\d+)", str(e)):
    return os.strerror(int(code.group(1)))
  return _one_line(e)


def _remove_partial_save(manager: ocp.CheckpointManager, step: int, patience: float = 5.0) -> None:
  """Deletes what a failed save of ``step`` left (orbax's ``<step>.orbax-checkpoint-tmp*`` folder): frees
  the space it took (the next manager would clean it up too).

  tensorstore writes already in flight when the save failed still land afterwards
  (recreating folders under a deletion), so this retries until the folder stays gone.
  """
  if jax.process_index() != 0:
    return
  directory = str(manager.directory)
  deadline, quiet = time.time() + patience, 0
  while quiet < 3 and time.time() < deadline:  # gone, and still gone 0.3 s later
    partial = [n for n in os.listdir(directory) if n.startswith(f"{step}.orbax-checkpoint-tmp")]
    for name in partial:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    quiet = 0 if partial else quiet + 1
    time.sleep(0.1)


def _one_line(e: BaseException, limit: int = 200) -> str:
  """The first line of an exception's message, shortened (orbax's can run to kilobytes)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # str(KeyError) adds quotes
  text = (str(text).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _drop_closed_loop_errors(previous: Callable, unraisable: Any) -> None:
  exc = unraisable.exc_value
  if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
    previous(unraisable)


def _restore_quietly(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> Any:
  """``manager.restore`` without the late "Event loop is closed" tracebacks of a failed restore (:func:`_quietly`)."""
  return _quietly(lambda: manager.restore(step, args=args))


def _quietly(operation: Callable[[], Any]) -> Any:
  """Runs an orbax ``operation`` without the late "Event loop is closed" tracebacks of a failed one.

  orbax runs each restore (and save) in a fresh asyncio loop and closes it as soon as
  one read (write) fails; tensorstore operations still in flight complete afterwards and
  their callbacks raise ``RuntimeError('Event loop is closed')`` through
  ``sys.unraisablehook``: dozens of tracebacks, at unpredictable times, after
  the one-line report. So a hook that drops exactly that error (every other
  one reaches the previous hook) is set before the operation, removed after a
  success and kept after a failure, when the stragglers are still to come.
  """
  previous = sys.unraisablehook
  if not isinstance(previous, functools.partial) or previous.func is not _drop_closed_loop_errors:
    sys.unraisablehook = functools.partial(_drop_closed_loop_errors, previous)
  result = operation()
  sys.unraisablehook = previous
  return result


def _read_record(manager: ocp.CheckpointManager, step: int, where: str) -> dict:
  try:
    record = _restore_quietly(manager, step, ocp.args.Composite(**{INTEGRITY: ocp.args.JsonRestore()}))[INTEGRITY]
    if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
      raise ValueError("no checksums in it")
  except Exception as e:  # noqa: BLE001 -- any failure to read it means the checkpoint is damaged
    raise CorruptCheckpointError(f"checkpoint {where} has no readable integrity record ({_one_line(e)})") from None
  return record


def _structure_problems(record: dict, target: Mapping[str, tuple[tuple[int, ...], str]]) -> list[str]:
  """How the saved arrays differ from the arrays a restore expects (names, shapes, dtypes)."""
  saved = {k: (tuple(v["shape"]), v["dtype"]) for k, v in record["arrays"].items()}
  wanted = dict(target)
  problems = [f"{k} missing" for k in sorted(wanted.keys() - saved.keys())]
  problems += [f"{k} unexpected" for k in sorted(saved.keys() - wanted.keys())]
  problems += [f"{k}: {saved[k][0]} {saved[k][1]} there, {wanted[k][0]} {wanted[k][1]} here"
               for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]
  return problems


def _verify(record: dict, arrays: Mapping[str, np.ndarray], data_state: Any, where: str) -> None:
  expected = record["arrays"]
  bad = [k for k in expected if k not in arrays or _sha256(arrays[k]) != expected[k].get("sha256")]
  if bad:
    raise CorruptCheckpointError(f"checkpoint {where} fails its integrity check ({len(bad)} of {len(expected)} "
                                 f"arrays differ from their checksums, e.g. {bad[0]})")
  if record.get("data") != _data_sha256(data_state):
    raise CorruptCheckpointError(f"checkpoint {where} fails its integrity check (the data item differs "
                                 "from its checksum)")


def _state_restore_args(target: Mapping | None, shardings: Mapping | None) -> ocp.args.StandardRestore:
  """What orbax restores the state item into, whatever topology wrote it.

  No target: as saved, on the saved sharding when this topology has its
  devices, else replicated over all devices. A target without shardings: host
  numpy arrays. With ``shardings`` (a tree like the target): global arrays in
  those shardings, each process reading only its shards (a checkpoint written
  on 4 devices restores onto 2, a replicated one onto fsdp shards and back).
  """
  if target is None:
    everywhere = NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)), P())
    return ocp.args.StandardRestore(None, fallback_sharding=everywhere)
  if shardings is None:
    return ocp.args.StandardRestore(jax.tree.map(
      lambda x: np.zeros(np.shape(x), x.dtype) if not isinstance(x, np.ndarray) else x, dict(target)))
  return ocp.args.StandardRestore(jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), dict(target), dict(shardings)))


def _restore_verified(manager: ocp.CheckpointManager, step: int, target: Mapping | None,
                      shardings: Mapping | None = None) -> tuple[dict, Any]:
  """(state dict, data state) of one step, verified; ``target``: the expected state dict or None (as saved).

  The state dict holds host numpy arrays, or global arrays in ``shardings``
  when given (:func:`_state_restore_args`). Raises :class:`CorruptCheckpointError`
  if the step is damaged and :class:`CheckpointError` if it is intact but holds another model.
  """
  where = os.path.join(str(manager.directory), str(step))
  record = _read_record(manager, step, where)
  if target is not None and (problems := _structure_problems(record, _flat_specs(target))):
    raise CheckpointError(f"checkpoint {where} holds another model (another --arch or other model options?): "
                          f"{len(problems)} arrays differ, e.g. {problems[0]}")
  state_args = _state_restore_args(target, shardings)
  try:
    restored = _restore_quietly(manager, step, ocp.args.Composite(**{STATE: state_args, DATA: ocp.args.JsonRestore()}))
  except Exception as e:  # noqa: BLE001 -- missing or unreadable parts (the structure was checked above)
    raise CorruptCheckpointError(f"checkpoint {where} cannot be read ({_one_line(e)})") from None
  host = to_host(restored[STATE])  # the checksums need host copies (of whole arrays, across hosts too)
  _verify(record, flat_arrays(host), restored[DATA], where)
  return (host if shardings is None else restored[STATE]), restored[DATA]


def _newest_intact(manager: ocp.CheckpointManager, target: Mapping | None, report: Callable[[str], None],
                   quarantine: bool, shardings: Mapping | None = None) -> tuple[int, dict, Any]:
  """(step, state dict, data) of the newest checkpoint that passes its integrity check."""
  steps = sorted(manager.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      state, data_state = _restore_verified(manager, step, target, shardings)
    except CorruptCheckpointError as e:
      moved = _move_aside(manager, step) if quarantine else None
      what = f"; moved to {moved}" if moved else ""
      then = f"using the previous one (step {steps[i + 1]})" if i + 1 < len(steps) else "no older checkpoint left"
      report(f"warning: {e}{what}; {then}")
      continue
    if quarantine and i:
      if jax.process_count() > 1:  # every host must see the renames before listing steps again
        ocp.multihost.sync_global_processes("tgq_jax_checkpoints_moved_aside")
      manager.reload()  # it still lists the steps moved aside
    return step, state, data_state
  raise CheckpointError(f"no intact checkpoint in {manager.directory} (see the warnings above); "
                        "move the folder away to start over")


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str | None:
  """Renames a damaged step to ``<step>.corrupt-<time>`` (kept for inspection; never listed again).

  Without this the resumed run would reach the step again and skip its save
  ("already saved"), keeping the damaged copy as the newest. Only process 0 renames.
  """
  if jax.process_index() != 0:
    return None
  src = os.path.join(str(manager.directory), str(step))
  dst = f"{src}{CORRUPT_SUFFIX}-{time.strftime('%Y%m%d-%H%M%S')}"
  os.replace(src, dst)
  return dst


def restore(manager: ocp.CheckpointManager, target_state: Any, step: int | None = None, *,
            report: Callable[[str], None] = report_to_stderr, quarantine: bool = False,
            shardings: Any = None) -> tuple[Any, dict]:
  """Restores (state, data_state) into the structure of ``target_state``, verified against its checksums.

  ``step=None``: the newest intact checkpoint; damaged newer ones are reported
  (one line each, through ``report``) and, with ``quarantine``, moved aside. A
  given ``step`` that is damaged raises :class:`CorruptCheckpointError`.
  ``target_state`` may hold concrete arrays or ``jax.ShapeDtypeStruct``s; the
  result holds host numpy arrays, or, with ``shardings`` (a tree of
  ``jax.sharding.Sharding`` like ``target_state``, e.g.
  :func:`tgq_jax.training.parallel.state_shardings`), global arrays placed in
  them, read shard by shard: any device count restores any checkpoint.
  """
  target = flax.serialization.to_state_dict(target_state)
  shards = None if shardings is None else flax.serialization.to_state_dict(shardings)
  if step is None:
    _, state, data_state = _newest_intact(manager, target, report, quarantine, shards)
  else:
    state, data_state = _restore_verified(manager, step, target, shards)
  return flax.serialization.from_state_dict(target_state, state), data_state


# --- reading another run's checkpoint (--init-from, export) ---------------------


def resolve(path: str) -> tuple[str, int | None]:
  """(manager directory, step or None for latest) for a workdir, checkpoints dir or step dir."""
  if not os.path.isdir(path):
    raise CheckpointError(f"no such checkpoint directory: {path}")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  name = os.path.basename(os.path.normpath(path))
  if name.isdigit() and os.path.isdir(os.path.join(path, STATE)):
    return os.path.dirname(os.path.normpath(path)), int(name)
  return path, None


def _reader(directory: str) -> ocp.CheckpointManager:
  """A manager that only reads (creates, cleans and deletes nothing)."""
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def load_variables(path: str, *, report: Callable[[str], None] = report_to_stderr) -> dict:
  """Loads ``{"params", "batch_stats"}`` from a checkpoint of this trainer (host numpy arrays), verified.

  ``path``: a workdir or its ``checkpoints/`` (the newest intact step; damaged
  newer ones are reported through ``report``) or one step directory (which must
  be intact). Arrays come back as numpy: the checkpoint may come from another
  device topology.
  """
  directory, step = resolve(path)
  with _reader(directory) as manager:
    if not manager.all_steps():
      raise CheckpointError(f"no checkpoint found in {path}")
    if step is None:
      _, state, _ = _newest_intact(manager, None, report, quarantine=False)
    else:
      state, _ = _restore_verified(manager, step, None)
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
