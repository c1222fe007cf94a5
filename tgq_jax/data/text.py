"""Text for language models: the vocabulary (characters or bytes).

A :class:`Vocabulary` maps text to token ids and back. It is data (a kind and,
for characters, the string of the characters), written to a run's
``config.json`` and to exported model files, so a file's text can be decoded
without the training text.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Vocabulary"]

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
