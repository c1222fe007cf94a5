"""A run's working directory: its lock, its record of the run (``config.json``), and writing its files.

* One process per workdir: :func:`workdir_lock` holds an exclusive ``flock`` on
  ``<workdir>/.lock`` for the whole run; a second run is refused naming the holder.
* ``config.json`` records the options and the model of the run; a resume must use
  the same model and recipe (:func:`check_run_config`, :func:`check_resume_config`),
  and the record is never rewritten by a resume (its changes are appended).
* A file that cannot be written (full disk, lost permissions) is :class:`WriteFailure`,
  one line; what was written before stays intact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from tgq_jax.core.policy import QuantPolicy
from tgq_jax.training.configs import Config

RUN_CONFIG = "config.json"
LOCK = ".lock"


class WriteFailure(RuntimeError):
  """A file of the run could not be written (e.g. a full disk); the message names it. Files written
  before are intact."""


class WorkdirBusyError(ValueError):
  """Another process holds the workdir's lock; the message names it (pid, host, since when)."""


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
  """Turns an OSError while writing ``what`` into :class:`WriteFailure` (one line)."""
  try:
    yield
  except OSError as e:
    raise WriteFailure(f"cannot write {what} ({e.strerror or e})") from None


def write_json_atomically(path: str, obj: Any, **dump_kw) -> None:
  """Writes ``path`` through a temporary file and a rename: a failure leaves the old file (and no temporary)."""
  tmp = f"{path}.tmp"
  try:
    with writing(path):
      with open(tmp, "w") as f:
        json.dump(obj, f, **dump_kw)
      os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def prepare_workdir(workdir: str) -> None:
  """Creates ``workdir`` and checks that it can be written; ValueError (one line) otherwise."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    # A real write, not os.access: also right for root, read-only mounts and ACLs.
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir {workdir} cannot be written ({e.strerror or e})") from None


# --- the lock ---------------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
  """Whether process ``pid`` runs on this host (another user's counts as running)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    return True
  except OSError:
    return False
  return True


def _holder(fd: int) -> str:
  """"pid P on host H since T" from a lock file's content (what its holder wrote)."""
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    pid, host, since = info["pid"], info["host"], info["since"]
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown: the lock file names none"
  text = f"pid {pid} on host {host} since {since}"
  if host == socket.gethostname() and isinstance(pid, int) and not process_alive(pid):
    # The kernel drops a flock with its last descriptor: a process forked from the holder keeps it.
    text += f"; pid {pid} is no longer running, a process it started still holds the lock"
  return text


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on ``<workdir>/.lock`` (``fcntl.flock``) until the block exits.

  The kernel releases a flock when its holder exits in any way (also a crash or
  SIGKILL), so a crashed run leaves no stale lock: the next run takes it and
  overwrites the holder record. While held, the file names the holder (pid,
  host, start time); another process gets :class:`WorkdirBusyError` naming it and
  touches nothing. Multi-host runs take it on the primary host only (the one that
  writes). On a file system without flock (some network mounts) there is no lock.
  """
  path = os.path.join(workdir, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # (not inherited by exec'd children)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(f"workdir {workdir} is in use by another run ({_holder(fd)}); wait for it to "
                             "finish or use another --workdir") from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      yield  # no locking on this file system
      return
    try:
      record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
      with contextlib.suppress(OSError):  # (a full disk: the lock holds without the record naming it)
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
      yield
    finally:
      with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # released: the file names no holder
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


# --- the run record ---------------------------------------------------------------------------

# Fields that define the model: a workdir's checkpoints only fit a run with the same values.
_MODEL_FIELDS = ("arch", "dataset", "quantizer", "per_channel", "ternary_first", "ternary_last", "activation_bits",
                 "ternary_embeddings")
# Fields that define what a step computes or what data it sees: a resume with other values would
# silently continue another recipe from this run's state.
RECIPE_FIELDS = ("image_shape", "num_train", "num_test", "num_classes", "augment", "dropout", "epochs",
                 "batch_size", "update", "optimizer", "lr", "momentum", "nesterov", "lr_schedule", "schedule",
                 "gammas", "weight_decay", "warmup_epochs", "grad_clip", "label_smoothing", "threshold_optimizer",
                 "threshold_lr", "threshold_weight_decay", "threshold_grad_clip", "bn_cross_device",
                 "bn_running_stats", "half_precision", "seed", "data_file", "vocabulary", "context", "eval_windows",
                 "train_steps", "warmup_steps", "lr_end", "adam_b2", "weight_decay_on")


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _as_json(value: Any) -> Any:
  return json.loads(json.dumps(value))  # tuples as lists: how config.json holds them


def read_run_config(workdir: str) -> dict | None:
  """``<workdir>/config.json`` as a dict (None if absent); ValueError (one line) if it is not a run record."""
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
      raise TypeError("'config' is not an object")
    if not isinstance(record.get("model", {}), dict):
      raise TypeError("'model' is not an object")
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a run record of this trainer ({e}); "
                     "repair or remove it, or use another --workdir") from None
  return record


def _recorded(previous: dict, name: str) -> Any:
  """A recorded option; one the record predates (written before the option existed) is its default."""
  field = Config.__dataclass_fields__[name]
  return previous.get(name, _as_json(field.default) if field.default is not dataclasses.MISSING else None)


def _differences(previous: dict, cfg: Config, fields: tuple[str, ...]) -> list[str]:
  return [f"{_flag(k)} {_recorded(previous, k)!r} there, {_as_json(getattr(cfg, k))!r} now"
          for k in fields if _recorded(previous, k) != _as_json(getattr(cfg, k))]


def check_run_config(workdir: str, cfg: Config) -> None:
  """ValueError (one line) if ``<workdir>/config.json`` is unreadable or records other model options.

  A workdir that already holds a run with other model-defining options is a
  clear error instead of a shape mismatch deep inside the checkpoint restore.
  """
  record = read_run_config(workdir)
  if record is not None and (diff := _differences(record["config"], cfg, _MODEL_FIELDS)):
    raise ValueError(f"workdir {workdir} holds a run with other options ({'; '.join(diff)}); "
                     "use another --workdir.")


def check_resume_config(workdir: str, cfg: Config, model: dict, record: dict | None = None) -> None:
  """ValueError (one line) unless resuming the run in ``workdir`` with ``cfg`` continues the same recipe.

  ``model``: the model record this run would write (``ModelSpec.to_dict()``). The
  recorded model must match it (a hand-edited ``config.json`` is named, nothing it
  names is built), and so must every :data:`RECIPE_FIELDS` option: the update
  rule, optimizers, schedule, data. Run length (``--max-steps``), logging,
  checkpointing and device options may change; they are recorded by
  :func:`write_run_config`. ``record``: the task's further facts (an LM's ``vocabulary``), each of
  which must equal the recorded one (a text file edited since: another vocabulary).
  """
  facts, record = record or {}, read_run_config(workdir)
  if record is None:
    return
  for key, value in facts.items():
    if key in record and record[key] != _as_json(value):
      raise ValueError(f"{os.path.join(workdir, RUN_CONFIG)} records another {key} than this run's data has "
                       f"(was --data-file changed since?); resuming would train on other tokens: use another "
                       "--workdir")
  recorded = dict(record.get("model", {}))
  if isinstance(recorded.get("policy"), dict):  # policy fields the record predates: their defaults
    recorded["policy"] = {**_as_json(QuantPolicy().to_dict()), **recorded["policy"]}
  mismatched = sorted(k for k in recorded.keys() & model.keys() if recorded[k] != _as_json(model[k]))
  if mismatched:
    k = mismatched[0]
    raise ValueError(f"{os.path.join(workdir, RUN_CONFIG)} records model {k} {recorded[k]!r}, but the run's "
                     f"options build {_as_json(model[k])!r} (was the file edited?); restore it or use another "
                     "--workdir")
  if diff := _differences(record["config"], cfg, RECIPE_FIELDS):
    raise ValueError(f"workdir {workdir} holds a run trained with other options ({'; '.join(diff)}); resuming "
                     "would continue it with another recipe: use the same options, or another --workdir "
                     "(with --init-from to start from its weights)")


def write_run_config(workdir: str, cfg: Config, info, *, resumed_at: int | None = None,
                     record: dict | None = None) -> None:
  """Writes ``<workdir>/config.json`` (config + dataset facts: what export and resume read).

  A new run (``resumed_at`` None) writes the record. A resume at step ``resumed_at``
  keeps it and appends ``{"step": resumed_at, "changed": {field: value}}`` to its
  ``"resumes"`` list when options outside the recipe changed (``--max-steps``,
  ``--eval-only``, logging, ...): the record says which options held for which steps. ``record``: the
  task's further facts, written beside the config (an LM's ``{"vocabulary": {...}}``, which generate and
  export decode with).
  """
  check_run_config(workdir, cfg)
  path = os.path.join(workdir, RUN_CONFIG)
  previous = read_run_config(workdir) if resumed_at is not None else None
  if previous is not None:
    effective = dict(previous["config"])
    for resume in previous.get("resumes", []):
      effective.update(resume.get("changed", {}))
    changed = {k: v for k, v in _as_json(dataclasses.asdict(cfg)).items() if effective.get(k) != v}
    if not changed:
      return
    record = {**previous, "resumes": [*previous.get("resumes", []), {"step": resumed_at, "changed": changed}]}
  else:
    facts = record or {}
    record = {"config": dataclasses.asdict(cfg),
              "model": cfg.model_spec(info.num_classes).to_dict(),  # what export rebuilds the model from
              "dataset_info": _as_json(dataclasses.asdict(info)),  # (name, num_classes, sizes, shape or context)
              **_as_json(facts)}
  write_json_atomically(path, record, indent=2)
