"""The file container: safetensors with a SHA-256 over every byte, read with hostile input in mind.

Writing: :func:`write_container` (tensors + string metadata -> bytes, the checksum
placed in the metadata). Reading: :func:`read_header` checks everything the file
declares before any tensor is materialized (size limits, plain JSON, the
checksum, the format and its version, each tensor's dtype, shape and byte range),
:func:`read_tensors` then hands the bytes to the safetensors library. Every
problem is one :class:`PackedFormatError` line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any

import numpy as np

FORMAT = "tgq_jax.packed"
FORMAT_VERSION = 3
MAX_HEADER_BYTES = 16 * 2**20  # a ResNet-50's header is ~40 KB
MAX_JSON_DEPTH = 32
ZERO_DIGEST = "0" * 64
# The safetensors dtype codes a packed model holds (codes uint8; scales, BatchNorm, biases: floats), their bytes.
ITEMSIZE = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}


class PackedFormatError(ValueError):
  """A packed file that cannot be read: truncated, corrupt, another format version, a model it may not name."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One tensor as the header declares it."""

  dtype: str  # safetensors code ("U8", "F32", ...)
  shape: tuple[int, ...]
  start: int  # byte range in the data section
  end: int


def safetensors_numpy():
  try:
    import safetensors.numpy
  except ImportError:
    raise ImportError("tgq_jax.export needs the safetensors package (pip install safetensors).") from None
  return safetensors.numpy


def dtype_code(dtype: Any) -> str:
  """The safetensors code of a numpy dtype (``bfloat16`` included)."""
  name = np.dtype(dtype).name
  codes = {"uint8": "U8", "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
           "int32": "I32", "int64": "I64"}
  if name not in codes:
    raise ValueError(f"dtype {name} cannot be stored in a packed file (allowed: {', '.join(codes)}).")
  return codes[name]


def _reject_constant(name: str):
  raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs):
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
  return dict(pairs)


def _depth(raw: str | bytes) -> int:
  """The deepest bracket nesting of a JSON text (strings skipped): checked before parsing it."""
  text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
  depth = deepest = 0
  in_string = escaped = False
  for c in text:
    if in_string:
      if escaped:
        escaped = False
      elif c == "\\":
        escaped = True
      elif c == '"':
        in_string = False
    elif c == '"':
      in_string = True
    elif c in "[{":
      depth += 1
      deepest = max(deepest, depth)
    elif c in "]}":
      depth -= 1
  return deepest


def parse_json(raw: str | bytes, what: str) -> Any:
  """Strict JSON of a file: no NaN/Infinity, no duplicate keys, at most :data:`MAX_JSON_DEPTH` deep,
  at most :data:`MAX_HEADER_BYTES`; ValueError (one line, naming ``what``) otherwise."""
  if len(raw) > MAX_HEADER_BYTES:
    raise ValueError(f"{what}: {len(raw):,} bytes, more than the {MAX_HEADER_BYTES:,} allowed.")
  if _depth(raw) > MAX_JSON_DEPTH:
    raise ValueError(f"{what}: JSON nested more than {MAX_JSON_DEPTH} deep.")
  try:
    return json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise ValueError(f"{what}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None


def write_container(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
  """A safetensors file of ``tensors`` whose ``metadata["sha256"]`` is the SHA-256 of the whole file
  with these 64 hex digits written as ``0``."""
  blob = safetensors_numpy().save(tensors, {**metadata, "sha256": ZERO_DIGEST})
  (header_len,) = struct.unpack_from("<Q", blob)
  header = blob[8:8 + header_len]
  if header.count(ZERO_DIGEST.encode()) != 1:
    raise AssertionError("safetensors header: cannot place the checksum.")
  digest = hashlib.sha256(blob).hexdigest().encode()
  return blob[:8] + header.replace(ZERO_DIGEST.encode(), digest) + blob[8 + header_len:]


def read_header(blob: bytes, path) -> tuple[dict[str, str], dict[str, TensorEntry]]:
  """The metadata and the tensor entries of a packed file, after checking all of it.

  Checked: the 8-byte length and the header's size (at most :data:`MAX_HEADER_BYTES`),
  strict JSON, the SHA-256 of the whole file, the format name and version, every
  metadata value a string, every tensor's dtype (:data:`DTYPES`), shape (non-negative
  integers) and byte range (its size exactly, the ranges tiling the data section).

  Raises:
    PackedFormatError: one line naming the problem.
  """
  if len(blob) < 8:
    raise PackedFormatError(f"{path}: truncated: {len(blob)} bytes, not a safetensors file.")
  (header_len,) = struct.unpack_from("<Q", blob)
  if header_len > len(blob) - 8 or blob[8:9] != b"{":
    raise PackedFormatError(f"{path}: not a safetensors file, or truncated (header of {header_len:,} bytes "
                            f"in a file of {len(blob):,}).")
  if header_len > MAX_HEADER_BYTES:
    raise PackedFormatError(f"{path}: header of {header_len:,} bytes, more than the {MAX_HEADER_BYTES:,} allowed.")
  raw = blob[8:8 + header_len]
  try:
    header = parse_json(raw, "header")
  except ValueError as e:
    raise PackedFormatError(f"{path}: {e}") from None
  metadata = header.get("__metadata__") if isinstance(header, dict) else None
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise PackedFormatError(f"{path}: a safetensors file without tgq_jax metadata: not a tgq_jax packed model.")
  if metadata.get("format") != FORMAT:
    raise PackedFormatError(f"{path}: a safetensors file, but not a tgq_jax packed model "
                            f"(format {metadata.get('format')!r:.60}).")
  digest = metadata.get("sha256")
  if not (isinstance(digest, str) and len(digest) == 64 and raw.count(digest.encode()) == 1):
    raise PackedFormatError(f"{path}: corrupt checksum field.")
  zeroed = blob[:8] + raw.replace(digest.encode(), ZERO_DIGEST.encode()) + blob[8 + header_len:]
  if hashlib.sha256(zeroed).hexdigest() != digest:
    raise PackedFormatError(f"{path}: corrupt or truncated file (SHA-256 mismatch).")
  if metadata.get("format_version") != str(FORMAT_VERSION):
    raise PackedFormatError(f"{path}: format version {metadata.get('format_version')!r:.20}; this tgq_jax "
                            f"reads version {FORMAT_VERSION}.")
  entries = {name: _entry(name, value, path) for name, value in header.items() if name != "__metadata__"}
  position, data_bytes = 0, len(blob) - 8 - header_len
  for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
    if entry.start != position:
      raise PackedFormatError(f"{path}: tensor {name!r:.80}: the tensors do not tile the data section "
                              f"(a gap or an overlap at byte {position:,}).")
    position = entry.end
  if position != data_bytes:
    raise PackedFormatError(f"{path}: the tensors cover {position:,} of the data section's {data_bytes:,} bytes.")
  return metadata, entries


def _entry(name: str, value: Any, path) -> TensorEntry:
  if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
    raise PackedFormatError(f"{path}: tensor {name!r:.80}: corrupt entry.")
  dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
  if dtype not in ITEMSIZE:
    raise PackedFormatError(f"{path}: tensor {name!r:.80}: dtype {dtype!r:.20} is not one a packed model holds "
                            f"({', '.join(ITEMSIZE)}).")
  ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                 for x in xs)
  if not ints(shape) or len(shape) > 8:
    raise PackedFormatError(f"{path}: tensor {name!r:.80}: shape {shape!r:.80} is not a list of at most 8 "
                            "non-negative integers.")
  if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
    raise PackedFormatError(f"{path}: tensor {name!r:.80}: corrupt data_offsets {offsets!r:.80}.")
  nbytes = ITEMSIZE[dtype] * int(np.prod(shape, dtype=object))
  if offsets[1] - offsets[0] != nbytes:
    raise PackedFormatError(f"{path}: tensor {name!r:.80}: {offsets[1] - offsets[0]:,} bytes stored, its "
                            f"{dtype}{shape} takes {nbytes:,}.")
  return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def read_tensors(blob: bytes, path) -> dict[str, np.ndarray]:
  """The tensors of a file :func:`read_header` accepted (the safetensors library's reader)."""
  try:
    return safetensors_numpy().load(blob)
  except Exception as e:  # the library's own validation: a corrupt file
    raise PackedFormatError(f"{path}: corrupt safetensors data ({str(e).splitlines()[0] if str(e) else e!r}).") \
      from None
