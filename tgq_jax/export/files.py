"""Writing files so that a failure changes nothing: atomic replacement, stale temporaries, writability.

A file is written to ``<path>.tmp-<pid>`` beside its destination and renamed over
it: a full disk, an error or a signal leaves the previous file at ``path``
intact. A process killed outright (``kill -9``) cannot remove its temporary
file; the next write to the same ``path`` removes those whose process is gone.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable

from tgq_jax.training.workdir import process_alive

TMP_MARK = ".tmp-"


def temporary_name(path: str) -> str:
  return f"{path}{TMP_MARK}{os.getpid()}"


def remove_stale_temporaries(path: str) -> list[str]:
  """Removes ``<path>.tmp-<pid>`` files whose process no longer runs (left by a killed export);
  returns their names. Another live process's temporary file is left alone."""
  directory, base = os.path.split(os.path.abspath(path))
  pattern = re.compile(re.escape(base + TMP_MARK) + r"(\d+)")
  removed = []
  try:
    names = os.listdir(directory)
  except OSError:
    return removed
  for name in names:
    match = pattern.fullmatch(name)
    if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
      try:
        os.remove(os.path.join(directory, name))
        removed.append(name)
      except OSError:
        pass
  return removed


def check_writable(path: str, what: str) -> None:
  """OSError (one line) unless a file can be created at ``path``: its directory exists and takes a
  real write (right for root, read-only mounts and ACLs, unlike ``os.access``), ``path`` is no directory."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"{what} {path} is a directory: give a file name.")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{what} {path}: the directory {directory} does not exist.")
  try:
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise OSError(f"{what} {path} cannot be written ({e.strerror or e}).") from None


def atomic_write(path: str | os.PathLike, blob: bytes, what: str = "output") -> None:
  """Writes ``blob`` to ``path`` all or nothing.

  The bytes go to ``<path>.tmp-<pid>``, are synced, and the file is renamed over
  ``path``; on any failure (a full disk included) the temporary file is removed
  and the previous file at ``path``, if any, is left as it was. Stale temporary
  files of killed writers are removed first (:func:`remove_stale_temporaries`).

  Raises:
    IsADirectoryError: ``path`` is a directory.
    OSError: the write failed (one line: ``path``, the reason, and that nothing changed there).
  """
  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      f.write(blob)

  atomic_write_with(path, write, what)


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None], what: str = "output") -> None:
  """:func:`atomic_write` for a writer that makes the file itself: ``write(tmp)`` creates ``tmp`` (e.g. a
  library's writer given a file name); the file is then synced and renamed over ``path``, all or nothing."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"{what} {path} is a directory: give a file name.")
  remove_stale_temporaries(path)
  tmp = temporary_name(path)
  try:
    write(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    if isinstance(e, OSError):
      raise OSError(e.errno, f"cannot write {what} {path} ({e.strerror or e}); "
                             "nothing was changed there") from None
    raise
