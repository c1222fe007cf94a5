"""Text for language models: the vocabulary (characters or bytes) and a text file as windows of tokens.

A :class:`Vocabulary` maps text to token ids and back. It is data (a kind and,
for characters, the string of the characters), written to a run's
``config.json`` and to exported model files, so a file's text can be decoded
without the training text. :class:`TextDataset` (:func:`load_text_dataset`, or
``tgq_jax.data.get_dataset("text", data_file=..., vocabulary=..., context=...)``) is a
text file's tokens split 90/10 into training and validation windows.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["TextDataset", "TextInfo", "TextTrainIterator", "Vocabulary", "default_text_file", "load_text_dataset",
           "read_text"]

KINDS = ("chars", "bytes")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Token ids of text.

  Attributes:
    kind: "chars" (one id per distinct character of the training text, in
      sorted order, as nanoGPT's shakespeare_char) or "bytes" (the 256 byte
      values of the UTF-8 encoding: any text, no unknown symbol).
    chars: the characters, id order ("chars" only).
  """

  kind: str
  chars: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"vocabulary kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
    if self.kind == "chars":
      if not isinstance(self.chars, str) or not self.chars:
        raise ValueError("a character vocabulary needs its characters (a non-empty string).")
      if len(set(self.chars)) != len(self.chars):
        raise ValueError("a character vocabulary lists each character once.")
    elif self.chars:
      raise ValueError("a byte vocabulary has no character list.")

  @classmethod
  def of_text(cls, text: str, kind: str = "chars") -> Vocabulary:
    """The vocabulary of ``text``: its sorted distinct characters, or bytes."""
    return cls("bytes") if kind == "bytes" else cls(kind, "".join(sorted(set(text))))

  @property
  def size(self) -> int:
    return 256 if self.kind == "bytes" else len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Token ids (int32) of ``text``; ValueError naming the first character not in the vocabulary."""
    if self.kind == "bytes":
      return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    index = {c: i for i, c in enumerate(self.chars)}
    try:
      return np.fromiter((index[c] for c in text), np.int32, len(text))
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the model's vocabulary "
                       f"({self.size} characters)") from None

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of token ids (bytes that do not form UTF-8 are replaced by U+FFFD)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.size):
      raise ValueError(f"token id out of range for a vocabulary of {self.size}.")
    if self.kind == "bytes":
      return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    return "".join(self.chars[i] for i in ids)

  def to_dict(self) -> dict[str, Any]:
    return {"kind": self.kind, **({"chars": self.chars} if self.kind == "chars" else {})}

  @classmethod
  def from_dict(cls, d: Any) -> Vocabulary:
    """The vocabulary a file records (plain data; anything else is a one-line ValueError)."""
    if not isinstance(d, dict) or set(d) - {"kind", "chars"} or not isinstance(d.get("kind"), str):
      raise ValueError("vocabulary: expected {\"kind\": \"chars\"|\"bytes\"[, \"chars\": str]}.")
    return cls(d["kind"], d.get("chars", ""))


# ----------------------------------------------------------------------------
# A text file as training data: windows of tokens.

DEFAULT_TEXT = "tinyshakespeare.txt"  # in tgq_jax/data/corpora: the LM presets' offline default
TRAIN_FRACTION = 0.9  # the first 90% of the tokens train, the last 10% validate (nanoGPT's split)


def default_text_file() -> str:
  """The path of the committed Tiny Shakespeare (package data: works on a fresh clone, offline)."""
  return str(importlib.resources.files("tgq_jax.data").joinpath("corpora", DEFAULT_TEXT))


def read_text(path: str) -> str:
  """The UTF-8 text of ``path``; a one-line ValueError naming the file when it is missing, empty or not text."""
  if not os.path.exists(path):
    raise ValueError(f"--data-file {path}: no such file")
  if os.path.isdir(path):
    raise ValueError(f"--data-file {path} is a directory, not a text file")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw:
    raise ValueError(f"--data-file {path} is empty")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"--data-file {path} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
  if "\x00" in text:
    raise ValueError(f"--data-file {path} holds NUL bytes: a binary file, not text")
  return text


@dataclasses.dataclass(frozen=True)
class TextInfo:
  """Facts the trainer needs about a text dataset (``num_classes``: the vocabulary size, the model's output
  width; ``num_train``/``num_test``: tokens in each split; ``chars_per_token``: characters per token of the
  validation split, 1 for characters, which turns nats per token into bits per character)."""

  name: str
  num_classes: int
  context: int
  num_train: int
  num_test: int
  chars_per_token: float
  data_file: str


def _character_count(tokens: np.ndarray, vocabulary: Vocabulary) -> int:
  """How many characters ``tokens`` spell: one per token, or (bytes) the bytes that start a UTF-8 sequence."""
  if vocabulary.kind == "chars":
    return int(tokens.size)
  return int(np.count_nonzero((tokens & 0xC0) != 0x80))


class TextDataset:
  """A text file split into training and validation tokens, served as windows of ``context + 1`` tokens.

  Batches are ``{"tokens": int32 (rows, context + 1)}`` (evaluation adds ``"mask"``, 1 for real rows).
  Train batch ``s`` is ``global_batch_size`` windows at uniform random starts drawn from
  ``numpy.random.default_rng([seed, s])``, a pure function of ``(seed, s)``: a resumed run sees the
  same batches, and process ``p`` of ``P`` gets rows ``[p B/P, (p + 1) B/P)`` of the global batch.
  Evaluation reads a fixed set of validation windows (:meth:`eval_starts`).
  """

  def __init__(self, text: str, vocabulary: Vocabulary, context: int, *, eval_windows: int = 0,
               data_file: str = "<text>"):
    if not _is_count(context):
      raise ValueError(f"context must be an integer >= 1, got {context!r}")
    if not (_is_count(eval_windows) or eval_windows == 0):
      raise ValueError(f"eval_windows must be an integer >= 0, got {eval_windows!r}")
    self.vocabulary, self.context, self.data_file = vocabulary, int(context), data_file
    tokens = vocabulary.encode(text)
    split = int(TRAIN_FRACTION * tokens.size)
    self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
    for what, part in (("training", self.train_tokens), ("validation", self.val_tokens)):
      if part.size < context + 1:
        raise ValueError(f"--data-file {data_file} is too short: its {what} split ({what} is "
                         f"{'the first 90%' if what == 'training' else 'the last 10%'} of {tokens.size} tokens) "
                         f"holds {part.size} tokens, fewer than one window of context + 1 = {context + 1}")
    self._eval_starts = self._fixed_starts(eval_windows)
    self.info = TextInfo("text", vocabulary.size, self.context, int(self.train_tokens.size),
                         int(self.val_tokens.size),
                         _character_count(self.val_tokens, vocabulary) / self.val_tokens.size, data_file)

  def _fixed_starts(self, count: int) -> np.ndarray:
    n, c = self.val_tokens.size, self.context
    if count == 0:  # every non-overlapping window: each validation token after the first is a target once
      return np.arange((n - 1) // c, dtype=np.int64) * c
    if count > n - c:
      raise ValueError(f"--eval-windows {count} is more than the {n - c} distinct windows of the validation "
                       f"split ({n} tokens, context {c})")
    return np.round(np.linspace(0, n - c - 1, count)).astype(np.int64)

  def eval_starts(self) -> np.ndarray:
    """The validation windows' first tokens: ``eval_windows`` evenly spaced (first and last possible
    included), or (0) every non-overlapping window ``k * context``."""
    return self._eval_starts.copy()

  def wrap_step(self, step):
    """Batches go to the step as they are (the harness's uniform call)."""
    return step

  @staticmethod
  def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return tokens[starts[:, None] + np.arange(length)].astype(np.int32)

  def train_starts(self, step: int, *, global_batch_size: int, seed: int) -> np.ndarray:
    """The first tokens of global train batch ``step``'s windows (uniform over every window of the split)."""
    return np.random.default_rng([seed, step]).integers(0, self.train_tokens.size - self.context,
                                                        size=global_batch_size)

  def train_batch(self, step: int, *, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> dict[str, np.ndarray]:
    """Process-local rows of global train batch ``step``."""
    local = global_batch_size // process_count
    starts = self.train_starts(step, global_batch_size=global_batch_size, seed=seed)
    starts = starts[process_index * local:(process_index + 1) * local]
    return {"tokens": self._windows(self.train_tokens, starts, self.context + 1)}

  def train_iterator(self, *, global_batch_size: int, seed: int, process_index: int | None = None,
                     process_count: int | None = None, num_devices: int | None = None, augment: bool = True
                     ) -> TextTrainIterator:
    """Infinite, resumable iterator of this process's train batches (``augment`` is ignored: text has none)."""
    del augment
    p, count = _process(process_index, process_count)
    _check_divisible(global_batch_size, count, jax.device_count() if num_devices is None else num_devices)
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")
    fn = functools.partial(self.train_batch, global_batch_size=global_batch_size, seed=seed, process_index=p,
                           process_count=count)
    steps_per_epoch = max(1, self.train_tokens.size // (global_batch_size * self.context))
    return TextTrainIterator(fn, steps_per_epoch, {"seed": seed, "global_batch_size": global_batch_size,
                                                   "dataset": self.info.name})

  def eval_batch_size(self, global_batch_size: int, multiple: int) -> int:
    """``global_batch_size`` or, if that is more, the fixed windows rounded up to ``multiple`` (no batch of
    mostly padding)."""
    windows = self._eval_starts.size
    return min(global_batch_size, -(-windows // multiple) * multiple)

  def eval_batches(self, *, global_batch_size: int, process_index: int | None = None,
                   process_count: int | None = None, num_devices: int | None = None) -> Iterator[dict]:
    """One pass over the fixed validation windows, in batches padded with masked rows; the same number of
    batches on every process."""
    p, count = _process(process_index, process_count)
    devices = jax.device_count() if num_devices is None else num_devices
    _check_divisible(global_batch_size, count, devices)
    batch = self.eval_batch_size(global_batch_size, math.lcm(count, devices))
    local, starts = batch // count, self._eval_starts
    for first in range(0, starts.size, batch):
      rows = starts[first + p * local:first + (p + 1) * local]
      tokens = np.zeros((local, self.context + 1), np.int32)
      mask = np.zeros(local, np.float32)
      tokens[:rows.size] = self._windows(self.val_tokens, rows, self.context + 1)
      mask[:rows.size] = 1.0
      yield {"tokens": tokens, "mask": mask}


class TextTrainIterator:
  """Infinite iterator of process-local train batches; its state is the step (``get_state``:
  ``{"step", "seed", "global_batch_size", "dataset"}``, JSON-serializable)."""

  def __init__(self, batch_fn, steps_per_epoch: int, key: dict):
    self._batch_fn, self.steps_per_epoch, self._key, self._step = batch_fn, steps_per_epoch, key, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self._batch_fn(self._step)
    self._step += 1
    return batch

  def close(self) -> None:
    """Nothing to stop (batches are computed in this thread: a few microseconds of numpy)."""

  @property
  def step(self) -> int:
    return self._step

  @property
  def epoch(self) -> int:
    return self._step // self.steps_per_epoch

  def get_state(self) -> dict:
    return {"step": self._step, **self._key}

  def set_state(self, state: dict) -> None:
    mismatch = {k: (state.get(k), v) for k, v in self._key.items() if state.get(k) != v}
    if mismatch:
      raise ValueError(f"iterator state does not belong to this iterator: (saved, current) = {mismatch}")
    self._step = int(state["step"])


def _is_count(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= p < count:
    raise ValueError(f"process index {p} outside [0, {count})")
  return p, count


def _check_divisible(global_batch_size: int, process_count: int, num_devices: int) -> None:
  for count, desc in ((num_devices, "number of devices"), (process_count, "process count")):
    if global_batch_size < 1 or global_batch_size % count:
      raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of the {desc} {count}")


def load_text_dataset(data_file: str | None = None, *, vocabulary: str = "chars", context: int,
                      eval_windows: int = 0) -> TextDataset:
  """The :class:`TextDataset` of ``data_file`` (default: the committed Tiny Shakespeare) with a ``vocabulary``
  of its characters (sorted, of the whole file, as nanoGPT) or of bytes."""
  path = default_text_file() if data_file is None else data_file
  text = read_text(path)
  return TextDataset(text, Vocabulary.of_text(text, vocabulary), context, eval_windows=eval_windows,
                     data_file=path)
