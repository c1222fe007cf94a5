"""2-bit packed export of a trained model, and inference from the packed file.

    python -m tgq_jax.export --workdir W --out model.safetensors   # or --out model.tgq

Two containers, chosen by the suffix of ``--out``; :func:`load_packed` reads
both (and version-1 ``.tgq`` files) and recognizes them by their content.

**safetensors** (``.safetensors``, the ecosystem's container; format version 2).
The tensors are exactly the variables of the packed inference model
(``create_model(..., packed=True)``), named ``"<collection>/<module path>/<leaf>"``:

* a ternary layer ``P`` has ``params/P/codes`` (``uint8 (ceil(K/4), N)``: its
  kernel's codes in the planar 2-bit layout of
  :mod:`tgq_jax.kernels.ternary_matmul`, ``K`` the product of the kernel's leading
  axes, ``N`` its last), ``params/P/scale`` (float32, scalar or one per output
  channel: the value of a +1 code) and, for TTQ, ``params/P/neg_scale`` (the
  magnitude of a -1 code);
* every other leaf (BatchNorm, biases, kernels of full-precision layers) as it is.

The metadata (``__metadata__``, strings) holds ``format`` (``"tgq_jax.packed"``),
``format_version``, ``tgq_jax_version``, ``model`` (JSON: the model's settings,
``create_model``'s arguments, and ``image_shape``), ``ternary`` (JSON: each
ternary layer's kernel shape), ``extra`` (JSON: dataset, test accuracy, ...)
and ``sha256``: the SHA-256 of the whole file with these 64 hex digits written
as ``0``. Every byte of the file is covered: any change, any truncation is a
:class:`PackedFormatError`. Any safetensors reader (``safetensors.numpy.load_file``)
reads the tensors.

**.tgq** (tgq_jax's own layout; format version 2, all integers little-endian)::

    bytes 0-3    magic b"TGQ\\x00"
    bytes 4-7    uint32 format version (2)
    bytes 8-15   uint64 length H of the header
    next H bytes UTF-8 JSON header
    next bytes   payload: the blobs the header's "tensors" entries point to
                 (offsets relative to the payload's start)
    last 32      SHA-256 of every byte before them (version 2; version 1 has no
                 trailer and only a payload SHA-256 in the header)

The header holds the model's settings (``arch``, ``num_classes``,
``quantizer``, ``per_channel``, ``ternary_first``, ``ternary_last``,
``image_shape``, ``dtype``), the ``tgq_jax_version``, the ``format_version``, the
payload's length and one entry per tensor:

* ``{"kind": "ternary", "path": [...], "shape": [...], "codes": blob,
  "scale_shape": [...], "scale": blob, "neg_scale": blob or null}`` for the
  kernel of a ternary layer: its codes packed 4 per byte in C order (below) and
  its float32 scale (scalar, or one per output channel); ``neg_scale``, the
  magnitude of a -1 code, is null when it equals ``scale`` (TGA, TWN; TTQ has
  its own);
* ``{"kind": "array", "collection": ..., "path": [...], "shape": [...],
  "dtype": ..., "data": blob}`` for every other leaf as it is.

The blobs must tile the payload exactly (checked on reading, which is what
protects version-1 files, whose header no checksum covers).

Bit layout of ``.tgq`` codes: the kernel's codes are flattened in C order (Flax's
HWIO / (in, out) layout); code ``i`` occupies bits ``2*(i % 4)`` and
``2*(i % 4) + 1`` of byte ``i // 4``, encoded ``00 = 0``, ``01 = +1``,
``10 = -1`` (``11`` is invalid); the last byte is padded with ``00``.

In both containers quantizer-only leaves (TGA's ``delta``, TTQ's trainable
scales) are not stored: the scales carry all that inference needs. A ternary
layer of N weights takes ``ceil(N / 4)`` bytes (a few more in the planar layout
when K is not a multiple of 4) plus 4 bytes per scale: at most 1/15 of its FP32
bytes once ``N >= 480`` per scale. A model with a non-finite value is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import struct
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgq_jax.kernels.ternary_matmul import pack_planar, planar_shape, unpack_planar
from tgq_jax.layers import quantized_layers
from tgq_jax.models import create_model

MAGIC = b"TGQ\x00"
FORMAT_VERSION = 2  # .tgq and .safetensors; load_packed also reads version-1 .tgq files
READABLE_VERSIONS = (1, 2)
SAFETENSORS_FORMAT = "tgq_jax.packed"
SUFFIXES = (".safetensors", ".tgq")
_PREFIX = struct.Struct("<4sIQ")
_DIGEST = 32  # bytes of the .tgq version-2 trailer
_ZERO_DIGEST = "0" * 64
_MODEL_KEYS = ("arch", "num_classes", "quantizer", "per_channel", "ternary_first", "ternary_last", "dtype")


class PackedFormatError(ValueError):
  """A packed file that cannot be read: truncated, corrupt, another format version, unknown arch."""


# --- 2-bit packing -----------------------------------------------------------


def pack_codes(codes: np.ndarray) -> np.ndarray:
  """Packs ternary codes (-1, 0, 1; any shape) 4 per byte; see the module docstring."""
  flat = np.asarray(codes).reshape(-1)
  if flat.size and not np.isin(flat, (-1, 0, 1)).all():
    raise ValueError("pack_codes: codes must be in {-1, 0, 1}.")
  two_bits = np.where(flat > 0, 1, np.where(flat < 0, 2, 0)).astype(np.uint8)
  two_bits = np.pad(two_bits, (0, -flat.size % 4))
  quads = two_bits.reshape(-1, 4)
  return (quads[:, 0] | quads[:, 1] << 2 | quads[:, 2] << 4 | quads[:, 3] << 6).astype(np.uint8)


def unpack_codes(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of :func:`pack_codes`: int8 codes of ``shape``."""
  packed = np.asarray(packed, np.uint8).reshape(-1)
  size = int(np.prod(shape, dtype=np.int64))
  if packed.size != -(-size // 4):
    raise PackedFormatError(f"packed codes hold {packed.size} bytes, {-(-size // 4)} expected for shape {tuple(shape)}.")
  two_bits = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:size]
  if (two_bits == 3).any():
    raise PackedFormatError("packed codes contain the invalid 2-bit pattern 11: the file is corrupt.")
  return np.where(two_bits == 1, 1, np.where(two_bits == 2, -1, 0)).astype(np.int8).reshape(shape)


# --- size report -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerSize:
  name: str
  num_weights: int
  fp32_bytes: int
  packed_bytes: int
  sparsity: float  # fraction of zero codes; 0 for full-precision tensors
  ternary: bool


@dataclasses.dataclass(frozen=True)
class SizeReport:
  layers: tuple[LayerSize, ...]

  @property
  def fp32_bytes(self) -> int:
    return sum(layer.fp32_bytes for layer in self.layers)

  @property
  def packed_bytes(self) -> int:
    return sum(layer.packed_bytes for layer in self.layers)

  @property
  def ratio(self) -> float:
    """Packed size over FP32 size, whole model."""
    return self.packed_bytes / self.fp32_bytes

  @property
  def ternary_ratio(self) -> float:
    """Packed size over FP32 size of the ternary layers alone."""
    tern = [layer for layer in self.layers if layer.ternary]
    return sum(l.packed_bytes for l in tern) / max(sum(l.fp32_bytes for l in tern), 1)

  def as_dict(self) -> dict[str, Any]:
    return {"layers": [dataclasses.asdict(l) for l in self.layers], "fp32_bytes": self.fp32_bytes,
            "packed_bytes": self.packed_bytes, "ratio": self.ratio, "ternary_ratio": self.ternary_ratio}

  def format(self) -> str:
    """A table: per layer and in total, FP32 bytes vs packed bytes, sparsity."""
    ternary = [l for l in self.layers if l.ternary]
    rows = [f"{'layer':<40} {'weights':>10} {'fp32 B':>11} {'packed B':>10} {'sparsity':>8}"]
    for l in ternary:
      rows.append(f"{l.name:<40} {l.num_weights:>10,} {l.fp32_bytes:>11,} {l.packed_bytes:>10,} {l.sparsity:>8.3f}")
    rest = [l for l in self.layers if not l.ternary]
    rows.append(f"{'(full-precision leaves: ' + str(len(rest)) + ')':<40} {sum(l.num_weights for l in rest):>10,} "
                f"{sum(l.fp32_bytes for l in rest):>11,} {sum(l.packed_bytes for l in rest):>10,} {'':>8}")
    rows.append(f"{'total':<40} {sum(l.num_weights for l in self.layers):>10,} {self.fp32_bytes:>11,} "
                f"{self.packed_bytes:>10,} {'':>8}")
    rows.append(f"ternary layers: packed/fp32 = 1/{1 / self.ternary_ratio:.1f}; whole model: "
                f"packed/fp32 = 1/{1 / self.ratio:.1f}")
    return "\n".join(rows)


# --- what is stored ------------------------------------------------------------


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
  out = []
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      out.extend(_flatten(value, prefix + (str(key),)))
    else:
      out.append((prefix + (str(key),), value))
  return out


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def model_settings(arch: str, num_classes: int, *, quantizer: str = "tga", per_channel: bool = False,
                   ternary_first: bool = True, ternary_last: bool = True,
                   dtype: Any = "float32") -> dict[str, Any]:
  """The settings :func:`export_variables` records: ``create_model``'s arguments, JSON-friendly."""
  return dict(arch=arch, num_classes=int(num_classes), quantizer=quantizer, per_channel=bool(per_channel),
              ternary_first=bool(ternary_first), ternary_last=bool(ternary_last),
              dtype=jnp.dtype(dtype).name)


def _create(settings: Mapping[str, Any], **overrides):
  kwargs = {**settings, **overrides}
  return create_model(**{**kwargs, "dtype": jnp.dtype(kwargs["dtype"])})


@dataclasses.dataclass(frozen=True)
class _TernaryLayer:
  path: tuple[str, ...]  # the layer's params path
  shape: tuple[int, ...]  # its kernel's
  codes: np.ndarray  # int8, the kernel's shape
  scale: np.ndarray  # float32, () or (out,)
  neg_scale: np.ndarray  # float32, the magnitude of a -1 code
  symmetric: bool  # the quantizer's -1 code is -scale (TGA, TWN): no neg_scale leaf in the packed model


def _check_finite(variables: Mapping) -> None:
  bad = []
  for collection in sorted(variables):
    for leaf_path, value in _flatten(variables[collection]):
      array = np.asarray(value)
      if jnp.issubdtype(array.dtype, jnp.inexact) and not np.isfinite(array.astype(np.float64)).all():
        bad.append("/".join((collection, *leaf_path)))
  if bad:
    shown = ", ".join(bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
    raise ValueError(f"refusing to export a model with non-finite values (NaN or inf) in: {shown}. "
                     "The run diverged: export an earlier checkpoint.")


def _ternary_layers(variables: Mapping, settings: Mapping[str, Any],
                    image_shape: tuple[int, ...]) -> tuple[list[_TernaryLayer], set[tuple[str, ...]]]:
  """The ternary layers' codes and scales, and the params leaves they replace."""
  model = _create(settings)
  layers = quantized_layers(model, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  out, skip = [], set()
  for layer_path, quantizer in layers.items():
    if not quantizer.ternary:
      continue
    layer = variables["params"]
    for key in layer_path:
      layer = layer[key]
    kernel = layer["kernel"]
    parts = quantizer.parts(kernel, {k: layer[k] for k in quantizer.param_names})
    out.append(_TernaryLayer(layer_path, tuple(kernel.shape), np.asarray(parts.codes),
                             np.asarray(parts.scale, np.float32), np.asarray(parts.neg_scale, np.float32),
                             quantizer.symmetric))
    skip.add((*layer_path, "kernel"))
    skip.update((*layer_path, k) for k in quantizer.param_names)
  return out, skip


def pack_variables(variables: Mapping, settings: Mapping[str, Any], image_shape: tuple[int, int, int]) -> dict:
  """The variables of the packed inference model (``create_model(**settings, packed=True)``), in memory.

  What a ``.safetensors`` export holds, as numpy arrays: each ternary layer's
  ``codes`` (planar 2-bit layout) and ``scale`` (and TTQ's ``neg_scale``), every
  other leaf as it is.
  """
  settings = model_settings(**settings)
  layers, skip = _ternary_layers(variables, settings, image_shape)
  out: dict[str, dict] = {}
  for collection in sorted(variables):
    out[collection] = {}
    for leaf_path, value in _flatten(variables[collection]):
      if not (collection == "params" and leaf_path in skip):
        _set(out[collection], leaf_path, np.asarray(value))
  for layer in layers:
    _set(out["params"], (*layer.path, "codes"), pack_planar(layer.codes))
    _set(out["params"], (*layer.path, "scale"), layer.scale)
    if not layer.symmetric:
      _set(out["params"], (*layer.path, "neg_scale"), layer.neg_scale)
  return out


# --- writing -------------------------------------------------------------------


def _format_of(path: str | os.PathLike) -> str:
  return "safetensors" if os.fspath(path).lower().endswith(".safetensors") else "tgq"


def _atomic_write(path: str | os.PathLike, blob: bytes) -> None:
  """Writes ``blob`` to a temporary name beside ``path`` and renames it; leaves nothing behind on failure."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"output {path} is a directory: give a file name (e.g. {os.path.join(path, 'model.safetensors')}).")
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def _tgq_blob(variables, settings, image_shape, layers, skip, extra) -> tuple[bytes, list[LayerSize]]:
  from tgq_jax import __version__

  payload, entries, sizes = _Payload(), [], []
  for layer in layers:
    packed = pack_codes(layer.codes)
    symmetric = np.array_equal(layer.scale, layer.neg_scale)  # TGA, TWN: store the scale once
    entries.append({"kind": "ternary", "collection": "params", "path": [*layer.path, "kernel"],
                    "shape": list(layer.shape), "codes": payload.add(packed.tobytes()),
                    "scale_shape": list(layer.scale.shape), "scale": payload.add(layer.scale.tobytes()),
                    "neg_scale": None if symmetric else payload.add(layer.neg_scale.tobytes())})
    stored = packed.nbytes + layer.scale.nbytes * (1 if symmetric else 2)
    sizes.append(LayerSize("/".join(layer.path), layer.codes.size, 4 * layer.codes.size, stored,
                           float(np.mean(layer.codes == 0)), True))
  for collection in sorted(variables):
    for leaf_path, value in _flatten(variables[collection]):
      if collection == "params" and leaf_path in skip:
        continue
      array = np.asarray(value)
      entries.append({"kind": "array", "collection": collection, "path": list(leaf_path),
                      "shape": list(array.shape), "dtype": array.dtype.name,
                      "data": payload.add(np.ascontiguousarray(array).tobytes())})
      sizes.append(LayerSize("/".join((collection, *leaf_path)), array.size, 4 * array.size,
                             array.nbytes, 0.0, False))
  data = b"".join(payload.chunks)
  header = {"format_version": FORMAT_VERSION, "tgq_jax_version": __version__, **dict(settings),
            "image_shape": list(image_shape), "payload_bytes": len(data), "tensors": entries, **dict(extra or {})}
  header_bytes = json.dumps(header).encode()
  body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + data
  return body + hashlib.sha256(body).digest(), sizes


def _safetensors_blob(variables, settings, image_shape, layers, extra) -> tuple[bytes, list[LayerSize]]:
  from tgq_jax import __version__

  safetensors_numpy = _safetensors()
  packed = pack_variables(variables, settings, image_shape)
  tensors = {"/".join((collection, *leaf_path)): np.array(value, order="C")  # (ascontiguousarray makes 0-d 1-d)
             for collection in sorted(packed) for leaf_path, value in _flatten(packed[collection])}
  sizes, counted = [], set()
  for layer in layers:
    names = [f"params/{'/'.join(layer.path)}/{leaf}" for leaf in ("codes", "scale", "neg_scale")]
    names = [n for n in names if n in tensors]
    counted.update(names)
    sizes.append(LayerSize("/".join(layer.path), layer.codes.size, 4 * layer.codes.size,
                           sum(tensors[n].nbytes for n in names), float(np.mean(layer.codes == 0)), True))
  for name, array in tensors.items():
    if name not in counted:
      sizes.append(LayerSize(name, array.size, 4 * array.size, array.nbytes, 0.0, False))
  metadata = {
    "format": SAFETENSORS_FORMAT, "format_version": str(FORMAT_VERSION), "tgq_jax_version": __version__,
    "model": json.dumps({**dict(settings), "image_shape": list(image_shape)}),
    "ternary": json.dumps({"/".join(l.path): {"kernel_shape": list(l.shape)} for l in layers}),
    "extra": json.dumps(dict(extra or {})),
    "sha256": _ZERO_DIGEST,
  }
  blob = safetensors_numpy.save(tensors, metadata)
  # The digest of the whole file with its own 64 digits zeroed, written in their place.
  (header_len,) = struct.unpack_from("<Q", blob)
  header = blob[8:8 + header_len]
  if header.count(_ZERO_DIGEST.encode()) != 1:
    raise AssertionError("safetensors header: cannot place the checksum.")
  digest = hashlib.sha256(blob).hexdigest().encode()
  return blob[:8] + header.replace(_ZERO_DIGEST.encode(), digest) + blob[8 + header_len:], sizes


def _safetensors():
  try:
    import safetensors.numpy
  except ImportError:
    raise ImportError("the .safetensors container needs the safetensors package (pip install safetensors); "
                      "the .tgq container does not.") from None
  return safetensors.numpy


def export_variables(path: str | os.PathLike, variables: Mapping, settings: Mapping[str, Any],
                     image_shape: tuple[int, int, int], *, extra: Mapping[str, Any] | None = None,
                     format: str | None = None) -> SizeReport:
  """Writes ``variables`` ({"params", "batch_stats"}) of the model ``settings`` to a packed file.

  Args:
    path: output file; written to a temporary name and renamed, so an existing
      file is never left half-written (and nothing is left behind on failure).
    variables: the model's variables (arrays on any device); every value must be finite.
    settings: :func:`model_settings` (how to rebuild the model).
    image_shape: (H, W, C) of the model's input.
    extra: more JSON-serializable facts to record (e.g. dataset, test accuracy).
    format: "safetensors" or "tgq"; default by ``path``'s suffix (``.safetensors``,
      anything else is ``.tgq``).

  Returns:
    The :class:`SizeReport` of what was written.

  Raises:
    ValueError: a non-finite value in ``variables``, or ``path`` is a directory.
  """
  format = format or _format_of(path)
  if format not in ("safetensors", "tgq"):
    raise ValueError(f"format must be 'safetensors' or 'tgq', got {format!r}.")
  if os.path.isdir(os.fspath(path)):
    raise ValueError(f"output {os.fspath(path)} is a directory: give a file name.")
  settings = model_settings(**settings)
  _check_finite(variables)
  layers, skip = _ternary_layers(variables, settings, image_shape)
  for layer in layers:  # the scales are computed: check them too
    if not (np.isfinite(layer.scale).all() and np.isfinite(layer.neg_scale).all()):
      raise ValueError(f"refusing to export: layer {'/'.join(layer.path)} has a non-finite scale.")
  if format == "safetensors":
    blob, sizes = _safetensors_blob(variables, settings, image_shape, layers, extra)
  else:
    blob, sizes = _tgq_blob(variables, settings, image_shape, layers, skip, extra)
  _atomic_write(path, blob)
  return SizeReport(tuple(sizes))


class _Payload:
  def __init__(self):
    self.chunks: list[bytes] = []
    self.size = 0

  def add(self, data: bytes) -> dict[str, int]:
    self.chunks.append(data)
    blob = {"offset": self.size, "nbytes": len(data)}
    self.size += len(data)
    return blob


# --- reading -------------------------------------------------------------------


def _read_bytes(path: str | os.PathLike) -> bytes:
  if os.path.isdir(os.fspath(path)):
    raise PackedFormatError(f"{path} is a directory, not a packed model file.")
  with open(path, "rb") as f:
    return f.read()


def read_packed(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
  """Reads and validates a ``.tgq`` file (format version 1 or 2): returns (header, payload)."""
  return _parse_tgq(_read_bytes(path), path)


def _parse_tgq(blob: bytes, path) -> tuple[dict[str, Any], bytes]:
  if len(blob) < _PREFIX.size:
    raise PackedFormatError(f"{path}: truncated: {len(blob)} bytes, not even the {_PREFIX.size}-byte prefix.")
  magic, version, header_len = _PREFIX.unpack_from(blob)
  if magic != MAGIC:
    raise PackedFormatError(f"{path}: not a tgq_jax packed model (magic {magic!r}, expected {MAGIC!r}).")
  if version not in READABLE_VERSIONS:
    raise PackedFormatError(f"{path}: format version {version}, this tgq_jax reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}.")
  if version >= 2:  # the trailer covers every byte before it, the prefix and the header included
    if len(blob) < _PREFIX.size + _DIGEST:
      raise PackedFormatError(f"{path}: truncated: {len(blob)} bytes.")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
      raise PackedFormatError(f"{path}: corrupt or truncated file (SHA-256 mismatch).")
    blob = body
  end = _PREFIX.size + header_len
  if len(blob) < end:
    raise PackedFormatError(f"{path}: truncated inside the header ({len(blob)} of at least {end} bytes).")
  try:
    header = json.loads(blob[_PREFIX.size:end])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PackedFormatError(f"{path}: corrupt header ({e}).") from None
  if not isinstance(header, dict):
    raise PackedFormatError(f"{path}: corrupt header (not a JSON object).")
  payload = blob[end:]
  if len(payload) != header.get("payload_bytes"):
    raise PackedFormatError(f"{path}: truncated or padded payload: {len(payload)} bytes, "
                            f"header says {header.get('payload_bytes')}.")
  if version == 1 and hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
    raise PackedFormatError(f"{path}: corrupt payload (SHA-256 mismatch).")
  if header.get("format_version") != version:
    raise PackedFormatError(f"{path}: header says format version {header.get('format_version')!r}, "
                            f"the prefix {version}.")
  return header, payload


def _tgq_tree(header: Mapping[str, Any], payload: bytes) -> dict:
  """The packed model's variables from a .tgq header and payload; every blob checked against the payload.

  The blobs must tile the payload exactly, each of the size its entry's shape
  and dtype imply: in a version-1 file, whose header no checksum covers, a
  changed offset, size or shape is caught here.
  """
  quantizer = header["quantizer"]
  tree: dict[str, dict] = {}
  blobs: list[tuple[int, int]] = []

  def read(ref, nbytes: int, what: str) -> bytes:
    offset, size = int(ref["offset"]), int(ref["nbytes"])
    if size != nbytes or offset < 0 or offset + size > len(payload):
      raise PackedFormatError(f"blob of {what} at {offset}+{size} does not fit (expected {nbytes} bytes "
                              f"within a payload of {len(payload)}).")
    blobs.append((offset, size))
    return payload[offset: offset + size]

  for index, entry in enumerate(header["tensors"]):
    name = f"#{index}"
    try:
      path = [str(p) for p in entry["path"]]
      name = "/".join(path)
      shape = tuple(int(d) for d in entry["shape"])
      if any(d < 0 for d in shape):
        raise PackedFormatError(f"negative dimension in shape {shape}.")
      size = int(np.prod(shape, dtype=np.int64))
      if entry["kind"] == "ternary":
        if entry["collection"] != "params" or path[-1] != "kernel" or len(shape) < 1:
          raise PackedFormatError("a ternary entry must be a params kernel.")
        codes = unpack_codes(np.frombuffer(read(entry["codes"], -(-size // 4), f"{name} codes"), np.uint8), shape)
        scale_shape = tuple(int(d) for d in entry["scale_shape"])
        nscale = 4 * int(np.prod(scale_shape, dtype=np.int64))
        scale = np.frombuffer(read(entry["scale"], nscale, f"{name} scale"), np.float32).reshape(scale_shape)
        neg = scale if entry["neg_scale"] is None else np.frombuffer(
          read(entry["neg_scale"], nscale, f"{name} neg_scale"), np.float32).reshape(scale_shape)
        layer = path[:-1]
        _set(tree.setdefault("params", {}), [*layer, "codes"], pack_planar(codes))
        _set(tree["params"], [*layer, "scale"], scale.copy())
        if quantizer == "ttq":
          _set(tree["params"], [*layer, "neg_scale"], neg.copy())
        elif not np.array_equal(neg, scale):
          raise PackedFormatError(f"quantizer {quantizer!r} is symmetric but the entry has its own neg_scale.")
      elif entry["kind"] == "array":
        dtype = np.dtype(entry["dtype"])
        data = read(entry["data"], size * dtype.itemsize, name)
        _set(tree.setdefault(str(entry["collection"]), {}), path,
             np.frombuffer(data, dtype).reshape(shape).copy())
      else:
        raise PackedFormatError(f"unknown tensor kind {entry['kind']!r}.")
    except PackedFormatError as e:
      raise PackedFormatError(f"tensor {name!r}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise PackedFormatError(f"corrupt tensor entry {name!r}: {e!r}") from None
  position = 0
  for offset, size in sorted(blobs):
    if offset != position:
      raise PackedFormatError(f"the tensor entries do not tile the payload (a gap or an overlap at byte {position}).")
    position += size
  if position != len(payload):
    raise PackedFormatError(f"the tensor entries cover {position} of the payload's {len(payload)} bytes.")
  return tree


def _safetensors_header(blob: bytes, path) -> dict[str, Any]:
  """The JSON header of a safetensors file, after checking the whole file against its SHA-256."""
  if len(blob) < 8:
    raise PackedFormatError(f"{path}: truncated: {len(blob)} bytes, not a safetensors file either.")
  (header_len,) = struct.unpack_from("<Q", blob)
  if header_len > len(blob) - 8 or blob[8:9] != b"{":
    raise PackedFormatError(f"{path}: neither a tgq_jax .tgq file nor a safetensors file, or truncated "
                            f"(header of {header_len} bytes in a file of {len(blob)}).")
  raw = blob[8:8 + header_len]
  try:
    header = json.loads(raw)
    metadata = header["__metadata__"]
    digest = metadata["sha256"]
    fmt = metadata["format"]
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise PackedFormatError(f"{path}: corrupt safetensors header, or not a tgq_jax export ({e!r}).") from None
  if fmt != SAFETENSORS_FORMAT:
    raise PackedFormatError(f"{path}: a safetensors file, but not a tgq_jax packed model (format {fmt!r}).")
  if not (isinstance(digest, str) and len(digest) == 64 and raw.count(digest.encode()) == 1):
    raise PackedFormatError(f"{path}: corrupt checksum field.")
  zeroed = blob[:8] + raw.replace(digest.encode(), _ZERO_DIGEST.encode()) + blob[8 + header_len:]
  if hashlib.sha256(zeroed).hexdigest() != digest:
    raise PackedFormatError(f"{path}: corrupt or truncated file (SHA-256 mismatch).")
  return header


def _safetensors_tree(blob: bytes, path) -> tuple[dict[str, Any], dict]:
  header = _safetensors_header(blob, path)
  metadata = header["__metadata__"]
  try:
    version = int(metadata["format_version"])
    model = json.loads(metadata["model"])
    extra = json.loads(metadata.get("extra", "{}"))
  except (KeyError, ValueError, TypeError) as e:
    raise PackedFormatError(f"{path}: corrupt metadata ({e!r}).") from None
  if version != FORMAT_VERSION:
    raise PackedFormatError(f"{path}: format version {version}, this tgq_jax reads safetensors version "
                            f"{FORMAT_VERSION}.")
  try:
    tensors = _safetensors().load(blob)
  except Exception as e:  # the library's own validation (offsets, dtypes): a corrupt file
    raise PackedFormatError(f"{path}: corrupt safetensors data ({e}).") from None
  tree: dict = {}
  for name, array in tensors.items():
    _set(tree, name.split("/"), array)
  info = {"format": "safetensors", "format_version": version,
          "tgq_jax_version": metadata.get("tgq_jax_version"), **model, **extra}
  return info, tree


def _check_against_model(model, tree: Mapping, image_shape, path) -> None:
  """The file's tensors are exactly the model's variables (names, shapes, dtypes); valid codes; finite."""
  from flax import traverse_util

  import flax.linen as nn
  from tgq_jax.layers import _mismatch_problems

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  want = {"/".join(k): v for k, v in traverse_util.flatten_dict(nn.unbox(dict(abstract))).items()}
  got = {"/".join(k): v for k, v in _flatten(tree)}
  mismatched = [f"{k}: {got[k].dtype}{list(got[k].shape)}, expected {want[k].dtype}{list(want[k].shape)}"
                for k in sorted(set(got) & set(want))
                if tuple(got[k].shape) != tuple(want[k].shape) or np.dtype(got[k].dtype) != np.dtype(want[k].dtype)]
  problems = _mismatch_problems(set(want) - set(got), set(got) - set(want), mismatched, "tensors",
                                "shape or dtype mismatches")
  if problems:
    raise PackedFormatError(f"{path}: the tensors do not match the model it names: " + "; ".join(problems))
  for name, value in got.items():
    array = np.asarray(value)
    if name.endswith("/codes") and array.dtype == np.uint8:
      if ((array & (array >> 1)) & 0x55).any():
        raise PackedFormatError(f"{path}: {name}: the invalid 2-bit pattern 11: the file is corrupt.")
    elif jnp.issubdtype(array.dtype, jnp.inexact) and not np.isfinite(array.astype(np.float64)).all():
      raise PackedFormatError(f"{path}: {name} holds non-finite values.")


def _settings_of(info: Mapping[str, Any], path) -> tuple[dict[str, Any], tuple[int, int, int]]:
  from tgq_jax.models import archs
  from tgq_jax.quantizers import get_quantizer

  missing = [k for k in (*_MODEL_KEYS, "image_shape") if k not in info]
  if missing:
    raise PackedFormatError(f"{path}: header lacks {', '.join(missing)}.")
  if info["arch"] not in archs():
    raise PackedFormatError(f"{path}: unknown arch {info['arch']!r}; this tgq_jax knows {', '.join(archs())}.")
  try:
    settings = model_settings(**{k: info[k] for k in _MODEL_KEYS})
    get_quantizer(settings["quantizer"], per_channel=settings["per_channel"])
    image_shape = tuple(int(d) for d in info["image_shape"])
  except (TypeError, ValueError) as e:
    raise PackedFormatError(f"{path}: corrupt model settings ({e}).") from None
  if len(image_shape) != 3 or min(image_shape) < 1:
    raise PackedFormatError(f"{path}: corrupt image_shape {info['image_shape']!r}.")
  return settings, image_shape


def load_packed(path: str | os.PathLike, packed: bool = False):
  """Loads a packed file (``.safetensors``, or ``.tgq`` of format version 1 or 2) for inference.

  Returns ``(model, variables, header)``: ``model.apply(variables, images, train=False)``
  gives the trained model's evaluation logits.

  Args:
    path: the file; its container is recognized from its content.
    packed: False: the model is the full-precision twin (quantizer "fp") of
      the exported architecture, its kernels the dequantized ternary kernels
      (``scale * q``, the values the trained model computes with): logits equal
      the trained model's exactly, at full FP32 size in memory. True: the
      packed inference model (``create_model(..., packed=True)``): its variables
      hold the 2-bit codes (4 per byte) and scales, and each kernel is rebuilt
      inside the forward pass, layer by layer (on GPU/TPU, dense layers multiply
      by the codes directly, with the Pallas ternary kernel); only the packed
      bytes stay resident.

  ``header`` holds the model's settings, ``image_shape``, ``format_version``
  and the extra facts recorded at export (``dataset``, ``test_accuracy``, ...).

  Raises:
    PackedFormatError: the file is truncated or corrupt (any changed byte of a
      version-2 or safetensors file), of another format version, or names an
      unknown architecture or other tensors than its model has.
  """
  blob = _read_bytes(path)
  if blob[:4] == MAGIC:
    header, payload = _parse_tgq(blob, path)
    settings, image_shape = _settings_of(header, path)
    if not isinstance(header.get("tensors"), list):
      raise PackedFormatError(f"{path}: header lacks tensors.")
    try:
      tree = _tgq_tree(header, payload)
    except PackedFormatError as e:
      raise PackedFormatError(f"{path}: {e}") from None
  else:
    header, tree = _safetensors_tree(blob, path)
    settings, image_shape = _settings_of(header, path)
  packed_model = _create(settings, packed=True)
  _check_against_model(packed_model, tree, image_shape, path)
  if packed:
    return packed_model, jax.tree.map(jnp.asarray, tree), header
  fp_model = _create(settings, quantizer="fp")
  return fp_model, _dequantized(packed_model, fp_model, tree, image_shape), header


def _dequantized(packed_model, fp_model, tree: Mapping, image_shape) -> dict:
  """The full-precision twin's variables: each ternary layer's kernel rebuilt from its codes."""
  from flax import traverse_util

  import flax.linen as nn
  from tgq_jax.ternarize import TernaryParts, dequantize

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  abstract = jax.eval_shape(lambda x: fp_model.init(jax.random.key(0), x, train=False), x)
  kernel_shapes = {k[:-1]: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(dict(abstract))["params"]).items()
                   if k[-1] == "kernel"}
  flat = {("/".join(k)): v for k, v in _flatten(tree)}
  for layer_path, quantizer in quantized_layers(packed_model, x, train=False).items():
    if not quantizer.packed:
      continue
    prefix = "/".join(("params", *layer_path))
    codes, scale = flat.pop(f"{prefix}/codes"), flat.pop(f"{prefix}/scale")
    neg = flat.pop(f"{prefix}/neg_scale", scale)
    shape = kernel_shapes[layer_path]
    flat[f"{prefix}/kernel"] = dequantize(TernaryParts(jnp.asarray(unpack_planar(codes, shape)), scale, neg,
                                                       None, None, None), jnp.float32)
  out: dict = {}
  for name, value in flat.items():
    _set(out, name.split("/"), jnp.asarray(value))
  return out


# --- from a training workdir -----------------------------------------------------


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike) -> SizeReport:
  """Exports the latest checkpoint of a ``train.py`` workdir to ``out`` (``.safetensors`` or ``.tgq``).

  The model's settings come from ``<workdir>/config.json``, which the trainer
  writes when a run starts.
  """
  from tgq_jax import checkpoints
  from tgq_jax.train_lib import RUN_CONFIG

  workdir = os.fspath(workdir)
  config_path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a train.py workdir?")
  if os.path.isdir(os.fspath(out)):
    raise ValueError(f"--out {os.fspath(out)} is a directory: give a file name "
                     f"(e.g. {os.path.join(os.fspath(out), 'model.safetensors')}).")
  try:
    with open(config_path) as f:
      record = json.load(f)
    cfg, info = record["config"], record["dataset_info"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{config_path} is corrupt ({e!r}).") from None
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [p for p in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
           if p.isdigit() and os.path.isdir(os.path.join(ckpt_dir, p, "state"))]
  if not steps:
    raise FileNotFoundError(f"{workdir} has no checkpoint to export (no finished step under {ckpt_dir}): "
                            "the run saved none yet; train it (or let it reach its first checkpoint) first.")
  settings = model_settings(cfg["arch"], info["num_classes"], quantizer=cfg["quantizer"],
                            per_channel=cfg["per_channel"], ternary_first=cfg["ternary_first"],
                            ternary_last=cfg["ternary_last"],
                            dtype="bfloat16" if cfg.get("half_precision") else "float32")
  variables = checkpoints.load_variables(workdir)
  extra = {"dataset": info["name"]}
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      extra["test_accuracy"] = json.load(f).get("test_accuracy")
  return export_variables(out, variables, settings, tuple(info["image_shape"]), extra=extra)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m tgq_jax.export",
    description="Write a train.py workdir's latest checkpoint as one 2-bit packed file: "
                ".safetensors (the standard container) or .tgq (tgq_jax's own), by --out's suffix.")
  parser.add_argument("--workdir", required=True, help="the train.py --workdir of the run")
  parser.add_argument("--out", required=True, help="output file: model.safetensors or model.tgq")
  parser.add_argument("--report-json", help="also write the size report as JSON here")
  args = parser.parse_args(argv)
  try:
    if os.path.isdir(args.out):
      raise ValueError(f"--out {args.out} is a directory: give a file name "
                       f"(e.g. {os.path.join(args.out, 'model.safetensors')}).")
    if not args.out.lower().endswith(SUFFIXES):
      raise ValueError(f"--out {args.out}: the name must end in {' or '.join(SUFFIXES)} (it picks the container).")
    report = export_workdir(args.workdir, args.out)
  except (OSError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")
  print(report.format())
  if args.report_json:
    with open(args.report_json, "w") as f:
      json.dump(report.as_dict(), f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
