"""idx files (the MNIST / Fashion-MNIST format): parse, read (gzipped or not), find and load.

Pure numpy; :mod:`tgq_jax.data` builds the Fashion-MNIST dataset on it.
"""
from __future__ import annotations

import gzip
import os
import pathlib
import zlib

import numpy as np


#: Where Debian's package dataset-fashion-mnist puts the four files.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class IdxFormatError(ValueError):
  """An idx file (MNIST format) is malformed: bad magic, truncated, ..."""


_IDX_TYPES = {0x08: np.uint8}
FASHION_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}


def parse_idx(data: bytes, *, rank: int | None = None, where: str = "idx data") -> np.ndarray:
  """Parses idx bytes (big-endian header ``0 0 type rank``, dims, data).

  Raises:
    IdxFormatError: naming ``where`` and what is wrong (short or bad header,
      unsupported type, unexpected rank, payload shorter or longer than the
      dimensions say).
  """
  if len(data) < 4:
    raise IdxFormatError(f"{where}: {len(data)} bytes, too short for an idx header")
  magic = int.from_bytes(data[:4], "big")
  if data[0] != 0 or data[1] != 0:
    raise IdxFormatError(
        f"{where}: bad magic number 0x{magic:08x}; an idx file starts with two "
        "zero bytes, a type code and a rank (0x00000803 for uint8 images, "
        "0x00000801 for uint8 labels). Is it an idx file (and, if gzipped, "
        "named *.gz)?")
  if data[2] not in _IDX_TYPES:
    raise IdxFormatError(
        f"{where}: magic number 0x{magic:08x} has type code 0x{data[2]:02x}; "
        "only unsigned bytes (0x08) are supported")
  ndim = data[3]
  if rank is not None and ndim != rank:
    raise IdxFormatError(
        f"{where}: magic number 0x{magic:08x} says rank {ndim}, expected {rank} "
        f"({'images' if rank == 3 else 'labels'})")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IdxFormatError(
        f"{where}: truncated header: {len(data)} bytes, rank {ndim} needs {header}")
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  expected = int(np.prod(dims, dtype=np.int64))
  actual = len(data) - header
  if actual != expected:
    kind = "truncated" if actual < expected else "too long"
    raise IdxFormatError(
        f"{where}: {kind}: the header promises {' x '.join(map(str, dims))} = "
        f"{expected} bytes of data, the file has {actual}")
  return np.frombuffer(data, _IDX_TYPES[data[2]], expected, header).reshape(dims)


def read_idx(path: str | os.PathLike, *, rank: int | None = None) -> np.ndarray:
  """Reads an idx file, gzipped or not (told by its content, not its name)."""
  raw = pathlib.Path(path).read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # BadGzipFile is an OSError
      raise IdxFormatError(f"{path}: broken or truncated gzip stream ({e})") from e
  return parse_idx(raw, rank=rank, where=str(path))


def _idx_paths(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
  """The Fashion-MNIST idx files present in ``directory`` (plain or ``.gz``), by key."""
  found = {}
  for key, (stem, _) in FASHION_MNIST_FILES.items():
    for name in (stem, stem + ".gz"):
      if (path := pathlib.Path(directory) / name).is_file():
        found[key] = path
        break
  return found


def find_idx_files(directory: str | os.PathLike) -> dict[str, pathlib.Path] | None:
  """The four Fashion-MNIST idx paths in ``directory`` (plain or ``.gz``), or None."""
  found = _idx_paths(directory)
  return found if len(found) == len(FASHION_MNIST_FILES) else None


def missing_idx_files(directory: str | os.PathLike) -> list[str]:
  """Names of the Fashion-MNIST idx files ``directory`` lacks (each may also be ``.gz``)."""
  found = _idx_paths(directory)
  return [stem for key, (stem, _) in FASHION_MNIST_FILES.items() if key not in found]


def load_idx_dataset(directory: str | os.PathLike, *, image_size=(28, 28),
                     num_classes: int = 10) -> dict[str, np.ndarray]:
  """Loads and cross-checks the four idx files of an MNIST-format dataset.

  Returns ``{"train_images": (N, H, W, 1) uint8, "train_labels": (N,) int32,
  "test_images", "test_labels"}``.
  """
  paths = find_idx_files(directory)
  if paths is None:
    raise FileNotFoundError(
        f"{directory}: needs {', '.join(s for s, _ in FASHION_MNIST_FILES.values())} "
        "(each optionally .gz)")
  out = {k: read_idx(paths[k], rank=FASHION_MNIST_FILES[k][1]) for k in paths}
  for split in ("train", "test"):
    images, labels = out[f"{split}_images"], out[f"{split}_labels"]
    if images.shape[1:] != tuple(image_size):
      raise IdxFormatError(f"{paths[split + '_images']}: images are "
                           f"{images.shape[1:]}, expected {tuple(image_size)}")
    if len(images) != len(labels):
      raise IdxFormatError(f"{paths[split + '_images']} has {len(images)} images "
                           f"but {paths[split + '_labels']} has {len(labels)} labels")
    if labels.size and labels.max() >= num_classes:
      raise IdxFormatError(f"{paths[split + '_labels']}: label {labels.max()} "
                           f"outside [0, {num_classes})")
    out[f"{split}_images"] = images[..., None]
    out[f"{split}_labels"] = labels.astype(np.int32)
  return out
