"""metrics.jsonl and TensorBoard events: a failed write is one WriteFailure and leaves the file as it was."""
from __future__ import annotations

import errno
import json
import os
import struct

import pytest

from tgq_jax.training import metrics
from tgq_jax.training.workdir import WriteFailure


def _row(step: int) -> dict:
  return {"step": step, "epoch": step / 10, "split": "train", "loss": 1.0 / step, "delta": {"conv0": 0.1}}


def _events(logdir) -> list:
  """Every Event of the (one) events file in ``logdir``, parsed from its TFRecord framing."""
  from tensorboardX.proto.event_pb2 import Event
  (name,) = os.listdir(logdir)
  data, out, i = open(os.path.join(logdir, name), "rb").read(), [], 0
  while i < len(data):
    (n,) = struct.unpack("Q", data[i:i + 8])
    event = Event()
    event.ParseFromString(data[i + 12:i + 12 + n])
    out.append(event)
    i += 12 + n + 4
  return out


def test_rows_and_scalars_are_written_and_a_resume_drops_the_later_rows(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3):
    writer.write(_row(step))
  writer.close()
  assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
  scalars = {(v.tag, e.step): v.simple_value for e in _events(tmp_path / "tensorboard") for v in e.summary.value}
  assert scalars[("train/loss", 2)] == pytest.approx(0.5) and scalars[("delta/conv0", 3)] == pytest.approx(0.1)
  metrics.MetricsWriter(str(tmp_path), enabled=True, start_step=2).close()  # resuming from step 2
  assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_row_that_cannot_be_written_leaves_no_part_of_it(tmp_path, monkeypatch):
  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  writer.write(_row(1))
  before = (tmp_path / "metrics.jsonl").read_bytes()
  real_write = os.write

  def half_then_full(fd, data):  # the disk fills up half-way through the row
    real_write(fd, bytes(data[:len(data) // 2]))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(metrics.os, "write", half_then_full)
  with pytest.raises(WriteFailure, match=f"^cannot write {tmp_path / 'metrics.jsonl'} \\(No space left on device\\)$"):
    writer.write(_row(2))
  monkeypatch.undo()
  writer.close()
  assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_tensorboard_events_that_cannot_be_written_are_one_line_and_nothing_more(tmp_path, monkeypatch, capfd):
  from tensorboardX import record_writer

  writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
  writer.write(_row(1))

  def full(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(record_writer.RecordWriter, "flush", full)
  with pytest.raises(WriteFailure, match=f"^cannot write TensorBoard events in {tmp_path / 'tensorboard'} "
                                         r"\(No space left on device\)$"):
    writer.write(_row(2))
  writer.close()  # after the failure: closes without raising again
  assert capfd.readouterr().err == ""  # no traceback from a writer thread or at exit


def test_a_json_record_that_cannot_be_written_keeps_the_old_one_and_no_temporary(tmp_path, monkeypatch):
  from tgq_jax.training import workdir

  path = tmp_path / "summary.json"
  workdir.write_json_atomically(str(path), {"steps": 1})
  real_dump = json.dump

  def dump_then_full(obj, f, **kw):  # writes part of it, then the disk is full
    real_dump({"steps": 2, "partial": True}, f, **kw)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(workdir.json, "dump", dump_then_full)
  with pytest.raises(WriteFailure, match=f"^cannot write {path} \\(No space left on device\\)$"):
    workdir.write_json_atomically(str(path), {"steps": 2})
  assert json.loads(path.read_text()) == {"steps": 1} and os.listdir(tmp_path) == ["summary.json"]
