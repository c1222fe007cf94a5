"""A run's metrics: ``metrics.jsonl`` (the record) and TensorBoard events, written so that a failure
(a full disk) is one :class:`~tgq_jax.training.workdir.WriteFailure` and leaves what was written intact."""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping

from tgq_jax.training.workdir import WriteFailure, writing


def _read_jsonl(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; a line cut short by a crash is dropped."""
  rows = []
  with contextlib.suppress(FileNotFoundError), open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):
        rows.append(json.loads(line))
  return rows


def _rewrite_jsonl(path: str, rows: list[dict]) -> None:
  tmp = f"{path}.tmp"
  try:
    with writing(path):
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      os.replace(tmp, path)  # atomic: a crash (or a full disk) leaves the old or the new file
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def _append(fd: int, data: bytes) -> None:
  """Appends ``data`` to the file ``fd`` entirely or not at all (a failed write is truncated away)."""
  size = os.fstat(fd).st_size
  view = memoryview(data)
  try:
    while view:
      view = view[os.write(fd, view):]
  except OSError:
    with contextlib.suppress(OSError):
      os.ftruncate(fd, size)
    raise


def _tensorboard_available() -> bool:
  """Whether tensorboardX imports (optional: metrics.jsonl is the record). Imported here, outside any
  write: a problem importing it is not a failed write."""
  try:
    import tensorboardX.event_file_writer  # noqa: F401
    import tensorboardX.proto.event_pb2  # noqa: F401
    import tensorboardX.summary  # noqa: F401
  except ImportError:
    return False
  return True


class _EventFile:
  """TensorBoard scalars written synchronously: a write that fails raises here, on this thread.

  (tensorboardX's ``SummaryWriter`` writes from a worker thread and again at exit: on a
  full disk that is a traceback per attempt and no way to stop cleanly.) Built from
  tensorboardX's ``EventsWriter`` and protos; ``purge_step`` discards the events a killed
  run wrote after it, as ``SummaryWriter(purge_step=...)`` does.
  """

  def __init__(self, logdir: str, purge_step: int):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.summary import scalar

    self._event, self._scalar = Event, scalar
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventsWriter(os.path.join(logdir, "events"))
    try:
      self._writer.write_event(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
      self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                     session_log=SessionLog(status=SessionLog.START)))
      self._writer.flush()
    except OSError:
      self.close()
      raise

  def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
    try:
      for tag, value in scalars.items():
        self._writer.write_event(self._event(summary=self._scalar(tag, value), step=step, wall_time=time.time()))
      self._writer.flush()
    except OSError:
      self.close()
      raise

  def close(self) -> None:
    if self._writer is not None:
      writer, self._writer = self._writer, None
      with contextlib.suppress(OSError):  # (after a failed write: the error was raised already)
        writer.close()


class MetricsWriter:
  """metrics.jsonl (one object per event) and TensorBoard events (tensorboardX, no TensorFlow).

  At most one row per (split, step): a run that starts at step ``start_step``
  (0, or the step it resumes from) first drops the rows a killed run wrote
  after that step (the resumed run writes them again, identically), and a row
  for a (split, step) already there replaces it (an eval-only run's test row).
  TensorBoard events after ``start_step`` are purged likewise. Only process 0 writes.
  A row is appended whole or not at all; a failed write is :class:`WriteFailure`.
  """

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self._fd = self._tb = None
    if enabled:
      self._path = os.path.join(workdir, "metrics.jsonl")
      kept = [r for r in _read_jsonl(self._path) if r.get("step", 0) <= start_step]
      if os.path.exists(self._path):  # (also drops a line a crash cut short, which appending would extend)
        _rewrite_jsonl(self._path, kept)
      self._keys = {(r.get("split"), r.get("step")) for r in kept}
      self._open()
      self._tb_dir = os.path.join(workdir, "tensorboard")
      try:
        if _tensorboard_available():
          with writing(f"TensorBoard events in {self._tb_dir}"):
            self._tb = _EventFile(self._tb_dir, purge_step=start_step + 1)
      except WriteFailure:
        self.close()
        raise

  def _open(self) -> None:
    with writing(self._path):
      self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    key = (record["split"], record["step"])
    if key in self._keys:  # rare (re-evaluating a finished run): rewrite without the old row
      os.close(self._fd)
      _rewrite_jsonl(self._path, [r for r in _read_jsonl(self._path) if (r.get("split"), r.get("step")) != key])
      self._open()
    with writing(self._path):
      _append(self._fd, (json.dumps(record) + "\n").encode())
    self._keys.add(key)
    if self._tb is not None:
      with writing(f"TensorBoard events in {self._tb_dir}"):
        self._tb.add_scalars(self._scalars(record), record["step"])

  @staticmethod
  def _scalars(record: dict) -> dict[str, float]:
    out = {f"{record['split']}/{k}": v for k, v in record.items()
           if isinstance(v, (int, float)) and k not in ("step", "epoch")}
    out.update({f"delta/{name}": value for name, value in record.get("delta", {}).items()})
    for layer in record.get("layers", []):
      for k in ("sparsity", "threshold", "scale"):
        if layer[k] is not None:  # None: a full-precision layer
          out[f"layers/{layer['name']}/{k}"] = layer[k]
    return out

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    if self._tb is not None:
      self._tb.close()
