"""2-bit packed export of a trained model, and inference from the packed file.

    python -m tgq_jax.export --workdir W --out model.safetensors   # or --out model.tgq

Two containers, chosen by the suffix of ``--out``; :func:`load_packed` reads
both (and the version-1 and version-2 files of earlier tgq_jax releases) and
recognizes them by their content.

Any Linen model can be exported: the file names its model by a
:class:`~tgq_jax.models.ModelSpec` (a zoo arch, or the import path
``"package.module:Name"`` of the user's module, the class count, the
:class:`~tgq_jax.QuantPolicy`, the compute dtype, constructor arguments), which
:func:`load_packed` builds again (``spec.build(packed=True)``); a user's module
must be importable where the file is loaded.

**safetensors** (``.safetensors``, the ecosystem's container; format version 3).
The tensors are exactly the variables of the packed inference model
(``spec.build(packed=True)``), named ``"<collection>/<module path>/<leaf>"``:

* a ternary layer ``P`` has ``params/P/codes`` (``uint8 (ceil(K/4), N)``: its
  kernel's codes in the planar 2-bit layout of
  :mod:`tgq_jax.kernels.ternary_matmul`, ``K`` the product of the kernel's leading
  axes, ``N`` its last), ``params/P/scale`` (float32: a scalar, or one per output
  feature, of shape :func:`tgq_jax.core.ternarize.stat_shape`: e.g. ``(heads, head_dim)``
  for an attention projection; the value of a +1 code) and, for TTQ,
  ``params/P/neg_scale`` (the magnitude of a -1 code);
* every other leaf (BatchNorm, biases, kernels of full-precision layers) as it is.

The metadata (``__metadata__``, strings) holds ``format`` (``"tgq_jax.packed"``),
``format_version``, ``tgq_jax_version``, ``model`` (JSON: ``{"spec": ModelSpec.to_dict(),
"image_shape": [H, W, C]}``; version 2: the flat settings below), ``ternary`` (JSON: each
ternary layer's kernel shape), ``extra`` (JSON: dataset, test accuracy, ...)
and ``sha256``: the SHA-256 of the whole file with these 64 hex digits written
as ``0``. Every byte of the file is covered: any change, any truncation is a
:class:`PackedFormatError`. Any safetensors reader (``safetensors.numpy.load_file``)
reads the tensors.

**.tgq** (tgq_jax's own layout; format version 3, all integers little-endian)::

    bytes 0-3    magic b"TGQ\\x00"
    bytes 4-7    uint32 format version (3)
    bytes 8-15   uint64 length H of the header
    next H bytes UTF-8 JSON header
    next bytes   payload: the blobs the header's "tensors" entries point to
                 (offsets relative to the payload's start)
    last 32      SHA-256 of every byte before them (versions 2 and 3; version 1
                 has no trailer and only a payload SHA-256 in the header)

The header holds ``spec`` (``ModelSpec.to_dict()``), ``image_shape``, the
``tgq_jax_version``, the ``format_version``, the payload's length, one entry per
tensor, and the extra facts given at export (dataset, test accuracy, ...):

* ``{"kind": "ternary", "path": [...], "shape": [...], "codes": blob,
  "scale_shape": [...], "scale": blob, "neg_scale": blob or null}`` for the
  kernel of a ternary layer: its codes packed 4 per byte in C order (below) and
  its float32 scale (scalar, or one per output feature); ``neg_scale``, the
  magnitude of a -1 code, is null for symmetric quantizers (TGA, TWN; TTQ
  stores its own);
* ``{"kind": "array", "collection": ..., "path": [...], "shape": [...],
  "dtype": ..., "data": blob}`` for every other leaf as it is.

The blobs must tile the payload exactly (checked on reading, which is what
protects version-1 files, whose header no checksum covers).

Versions 1 and 2 (.tgq; safetensors: version 2) named the model by flat settings instead of
``spec``: ``arch``, ``num_classes``, ``quantizer``, ``per_channel``,
``ternary_first``, ``ternary_last``, ``dtype`` (a zoo arch, the policy's fields);
:func:`load_packed` reads them as the equivalent :class:`~tgq_jax.models.ModelSpec`.

Bit layout of ``.tgq`` codes: the kernel's codes are flattened in C order (Flax's
HWIO / (in, out) layout); code ``i`` occupies bits ``2*(i % 4)`` and
``2*(i % 4) + 1`` of byte ``i // 4``, encoded ``00 = 0``, ``01 = +1``,
``10 = -1`` (``11`` is invalid); the last byte is padded with ``00``.

In both containers quantizer-only leaves (TGA's ``delta``, TTQ's trainable
scales) are not stored: the scales carry all that inference needs. A ternary
layer of N weights takes ``ceil(N / 4)`` bytes (a few more in the planar layout
when K is not a multiple of 4) plus 4 bytes per scale: at most 1/15 of its FP32
bytes once ``N >= 480`` per scale. :func:`tgq_jax.export.sizes.size_report` counts it
(the export's :class:`SizeReport`, and the trainer's end-of-run table). A model
with a non-finite value is refused.
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

from tgq_jax.kernels.ternary_matmul import pack_planar, unpack_planar
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models import ModelSpec
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.export.sizes import LayerSize, SizeReport, leaves, size_report  # noqa: F401  (LayerSize: part of the API here)
from tgq_jax.core.ternarize import TernaryParts, channel_axes, dequantize, stat_shape

MAGIC = b"TGQ\x00"
FORMAT_VERSION = 3  # .tgq and .safetensors written now; load_packed also reads the earlier versions
READABLE_VERSIONS = (1, 2, 3)  # .tgq
SAFETENSORS_VERSIONS = (2, 3)
SAFETENSORS_FORMAT = "tgq_jax.packed"
SUFFIXES = (".safetensors", ".tgq")
_PREFIX = struct.Struct("<4sIQ")
_DIGEST = 32  # bytes of the .tgq trailer (versions 2 and 3)
_ZERO_DIGEST = "0" * 64
# Versions 1 and 2 named the model by these flat header keys (a zoo arch and the policy's fields).
_LEGACY_KEYS = ("arch", "num_classes", "quantizer", "per_channel", "ternary_first", "ternary_last", "dtype")
# Header keys of the format itself: export's ``extra`` facts may not use them.
_RESERVED = frozenset({"format", "format_version", "tgq_jax_version", "spec", "image_shape", "payload_bytes",
                       "payload_sha256", "tensors"})


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


# --- what is stored ------------------------------------------------------------


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def legacy_spec(info: Mapping[str, Any]) -> ModelSpec:
  """The :class:`ModelSpec` of a version-1 or version-2 header's flat settings (a zoo arch and the
  policy's fields: ``arch``, ``num_classes``, ``quantizer``, ``per_channel``, ``ternary_first``,
  ``ternary_last``, ``dtype``)."""
  policy = QuantPolicy(info["quantizer"], per_channel=bool(info["per_channel"]),
                       ternary_first=bool(info["ternary_first"]), ternary_last=bool(info["ternary_last"]))
  return ModelSpec(str(info["arch"]), int(info["num_classes"]), policy, jnp.dtype(info["dtype"]).name)


def _as_spec(spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
  """``spec``, or the ModelSpec of its ``to_dict()`` form; only the training form can be exported."""
  if isinstance(spec, Mapping):
    spec = ModelSpec.from_dict(spec)
  if not isinstance(spec, ModelSpec):
    raise TypeError(f"spec must be a tgq_jax.models.ModelSpec, got {type(spec).__name__}.")
  if spec.policy.packed:
    raise ValueError(f"spec: the policy {spec.policy.quantizer!r} is the packed inference form; "
                     "give the spec of the trained model (its quantizer without 'packed:').")
  return spec


@dataclasses.dataclass(frozen=True)
class _TernaryLayer:
  path: tuple[str, ...]  # the layer's params path
  shape: tuple[int, ...]  # its kernel's
  codes: np.ndarray  # int8, the kernel's shape
  scale: np.ndarray  # float32, the quantizer's statistic shape (() or the output-feature axes)
  neg_scale: np.ndarray  # float32, the magnitude of a -1 code
  symmetric: bool  # the quantizer's -1 code is -scale (TGA, TWN): no neg_scale leaf in the packed model


def _check_finite(variables: Mapping) -> None:
  bad = []
  for collection in sorted(variables):
    for leaf_path, value in leaves(variables[collection]):
      array = np.asarray(value)
      if jnp.issubdtype(array.dtype, jnp.inexact) and not np.isfinite(array.astype(np.float64)).all():
        bad.append("/".join((collection, *leaf_path)))
  if bad:
    shown = ", ".join(bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
    raise ValueError(f"refusing to export a model with non-finite values (NaN or inf) in: {shown}. "
                     "The run diverged: export an earlier checkpoint.")


def _ternary_layers(variables: Mapping, spec: ModelSpec, image_shape: tuple[int, ...]
                    ) -> tuple[list[_TernaryLayer], set[tuple[str, ...]], dict]:
  """The ternary layers' codes and scales, the params leaves they replace, and every quantized
  layer's quantizer (:func:`tgq_jax.frontends.linen_layers.quantized_layers` of the model ``spec`` builds)."""
  model = spec.build()
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  layers = quantized_layers(model, x, train=False)
  out, skip = [], set()
  for layer_path, quantizer in layers.items():
    if not quantizer.ternary:
      continue
    layer = variables["params"]
    for key in layer_path:
      layer = layer[key]
    kernel = layer["kernel"]
    parts = quantizer.parts(kernel, {k: layer[k] for k in quantizer.param_names})
    scale_shape = stat_shape(tuple(kernel.shape), quantizer.per_channel)
    out.append(_TernaryLayer(layer_path, tuple(kernel.shape), np.asarray(parts.codes),
                             np.asarray(parts.scale, np.float32).reshape(scale_shape),
                             np.asarray(parts.neg_scale, np.float32).reshape(scale_shape),
                             quantizer.symmetric))
    skip.add((*layer_path, "kernel"))
    skip.update((*layer_path, k) for k in quantizer.param_names)
  return out, skip, layers


def _size_report(variables: Mapping, ternary: list[_TernaryLayer], layers: Mapping, layout: str) -> SizeReport:
  sparsity = {layer.path: float(np.mean(layer.codes == 0)) for layer in ternary}
  return size_report(variables, layers, layout=layout, sparsity=sparsity)


def pack_variables(variables: Mapping, spec: ModelSpec, image_shape: tuple[int, int, int]) -> dict:
  """The variables of the packed inference model (``spec.build(packed=True)``), in memory.

  What a ``.safetensors`` export holds, as numpy arrays: each ternary layer's
  ``codes`` (planar 2-bit layout) and ``scale`` (and TTQ's ``neg_scale``), every
  other leaf as it is.
  """
  layers, skip, _ = _ternary_layers(variables, _as_spec(spec), image_shape)
  return _packed_tree(variables, layers, skip)


def _packed_tree(variables: Mapping, layers: list[_TernaryLayer], skip: set) -> dict:
  out: dict[str, dict] = {}
  for collection in sorted(variables):
    out[collection] = {}
    for leaf_path, value in leaves(variables[collection]):
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


def _model_header(spec: ModelSpec, image_shape) -> dict[str, Any]:
  """How a file names its model: the spec and the input shape (the .tgq header; safetensors' ``model``)."""
  return {"spec": spec.to_dict(), "image_shape": [int(d) for d in image_shape]}


def _tgq_blob(variables, spec, image_shape, layers, skip, extra) -> bytes:
  from tgq_jax import __version__

  payload, entries = _Payload(), []
  for layer in layers:
    packed = pack_codes(layer.codes)
    entries.append({"kind": "ternary", "collection": "params", "path": [*layer.path, "kernel"],
                    "shape": list(layer.shape), "codes": payload.add(packed.tobytes()),
                    "scale_shape": list(layer.scale.shape), "scale": payload.add(layer.scale.tobytes()),
                    # TGA, TWN: the scale once; TTQ: its own -1 magnitude
                    "neg_scale": None if layer.symmetric else payload.add(layer.neg_scale.tobytes())})
  for collection in sorted(variables):
    for leaf_path, value in leaves(variables[collection]):
      if collection == "params" and leaf_path in skip:
        continue
      array = np.asarray(value)
      entries.append({"kind": "array", "collection": collection, "path": list(leaf_path),
                      "shape": list(array.shape), "dtype": array.dtype.name,
                      "data": payload.add(np.ascontiguousarray(array).tobytes())})
  data = b"".join(payload.chunks)
  header = {"format_version": FORMAT_VERSION, "tgq_jax_version": __version__, **_model_header(spec, image_shape),
            "payload_bytes": len(data), "tensors": entries, **dict(extra or {})}
  header_bytes = json.dumps(header).encode()
  body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + data
  return body + hashlib.sha256(body).digest()


def _safetensors_blob(variables, spec, image_shape, layers, skip, extra) -> bytes:
  from tgq_jax import __version__

  safetensors_numpy = _safetensors()
  packed = _packed_tree(variables, layers, skip)
  tensors = {"/".join((collection, *leaf_path)): np.array(value, order="C")  # (ascontiguousarray makes 0-d 1-d)
             for collection in sorted(packed) for leaf_path, value in leaves(packed[collection])}
  metadata = {
    "format": SAFETENSORS_FORMAT, "format_version": str(FORMAT_VERSION), "tgq_jax_version": __version__,
    "model": json.dumps(_model_header(spec, image_shape)),
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
  return blob[:8] + header.replace(_ZERO_DIGEST.encode(), digest) + blob[8 + header_len:]


def _safetensors():
  try:
    import safetensors.numpy
  except ImportError:
    raise ImportError("the .safetensors container needs the safetensors package (pip install safetensors); "
                      "the .tgq container does not.") from None
  return safetensors.numpy


def export_variables(path: str | os.PathLike, variables: Mapping, spec: ModelSpec,
                     image_shape: tuple[int, int, int], *, extra: Mapping[str, Any] | None = None,
                     format: str | None = None) -> SizeReport:
  """Writes ``variables`` ({"params", "batch_stats", ...}) of the model ``spec`` to a packed file.

  Args:
    path: output file; written to a temporary name and renamed, so an existing
      file is never left half-written (and nothing is left behind on failure).
    variables: the trained model's variables (arrays on any device); every value must be finite.
    spec: the :class:`~tgq_jax.models.ModelSpec` of the trained model (its training
      form: ``spec.build()`` is the model ``variables`` belong to), recorded in the
      file so that :func:`load_packed` can build it again. Any Linen model: a zoo
      arch, or ``"package.module:Name"`` of the user's module.
    image_shape: (H, W, C) of the model's input.
    extra: more JSON-serializable facts to record (e.g. dataset, test accuracy);
      not the format's own header keys (``spec``, ``image_shape``, ``tensors``, ...).
    format: "safetensors" or "tgq"; default by ``path``'s suffix (``.safetensors``,
      anything else is ``.tgq``).

  Returns:
    The :class:`SizeReport` of what was written (:func:`tgq_jax.export.sizes.size_report`:
    the planar codes of ``.safetensors``, the C-order ones of ``.tgq``); its
    ``packed_bytes`` are the file's tensor bytes exactly.

  Raises:
    ValueError: a non-finite value in ``variables``, ``path`` is a directory, or
      ``extra`` uses a reserved key.
  """
  format = format or _format_of(path)
  if format not in ("safetensors", "tgq"):
    raise ValueError(f"format must be 'safetensors' or 'tgq', got {format!r}.")
  if os.path.isdir(os.fspath(path)):
    raise ValueError(f"output {os.fspath(path)} is a directory: give a file name.")
  spec = _as_spec(spec)
  reserved = sorted(_RESERVED & set(extra or {}))
  if reserved:
    raise ValueError(f"extra: {', '.join(reserved)} are keys of the file format itself; use other names.")
  _check_finite(variables)
  layers, skip, quantizers = _ternary_layers(variables, spec, image_shape)
  for layer in layers:  # the scales are computed: check them too
    if not (np.isfinite(layer.scale).all() and np.isfinite(layer.neg_scale).all()):
      raise ValueError(f"refusing to export: layer {'/'.join(layer.path)} has a non-finite scale.")
  if format == "safetensors":
    blob = _safetensors_blob(variables, spec, image_shape, layers, skip, extra)
  else:
    blob = _tgq_blob(variables, spec, image_shape, layers, skip, extra)
  _atomic_write(path, blob)
  return _size_report(variables, layers, quantizers, "planar" if format == "safetensors" else "c_order")


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
  """Reads and validates a ``.tgq`` file (format version 1, 2 or 3): returns (header, payload)."""
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


def _tgq_tree(header: Mapping[str, Any], payload: bytes, symmetric: Mapping[tuple[str, ...], bool],
              default_symmetric: bool) -> dict:
  """The packed model's variables from a .tgq header and payload; every blob checked against the payload.

  The blobs must tile the payload exactly, each of the size its entry's shape
  and dtype imply: in a version-1 file, whose header no checksum covers, a
  changed offset, size or shape is caught here. ``symmetric``: whether each
  packed layer of the model (by params path) has no ``neg_scale`` leaf
  (``default_symmetric`` for a path the model lacks: the model check reports it).
  """
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
        if not symmetric.get(tuple(layer), default_symmetric):
          _set(tree["params"], [*layer, "neg_scale"], neg.copy())  # (versions 1, 2: the scale, when equal)
        elif not np.array_equal(neg, scale):
          raise PackedFormatError("the layer's quantizer is symmetric but the entry has its own neg_scale.")
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
  if version not in SAFETENSORS_VERSIONS:
    raise PackedFormatError(f"{path}: format version {version}, this tgq_jax reads safetensors versions "
                            f"{', '.join(map(str, SAFETENSORS_VERSIONS))}.")
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
  from tgq_jax.core.trees import mismatch_problems as _mismatch_problems

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  want = {"/".join(k): v for k, v in traverse_util.flatten_dict(nn.unbox(dict(abstract))).items()}
  got = {"/".join(k): v for k, v in leaves(tree)}
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


def _spec_of(info: Mapping[str, Any], path) -> tuple[ModelSpec, tuple[int, ...]]:
  """The model a header names (its ``spec``, or a version-1/2 header's flat settings) and its input shape."""
  from tgq_jax.models import _import, archs

  if "spec" in info:
    required, legacy = ("spec", "image_shape"), False
  else:
    required, legacy = (*_LEGACY_KEYS, "image_shape"), True
  missing = [k for k in required if k not in info]
  if missing:
    raise PackedFormatError(f"{path}: header lacks {', '.join(missing)}.")
  arch = info["arch"] if legacy else (info["spec"].get("arch") if isinstance(info["spec"], Mapping) else None)
  if not isinstance(arch, str) or (arch not in archs() and ":" not in arch):
    raise PackedFormatError(f"{path}: unknown arch {arch!r}; this tgq_jax knows {', '.join(archs())} "
                            "(or a user's Linen module, named 'package.module:Name').")
  if arch not in archs():
    try:
      _import(arch)
    except ValueError as e:
      raise PackedFormatError(f"{path}: the file's model is the user module {arch!r}, which cannot be imported "
                              f"here: make its module importable (on sys.path) and load again ({e}).") from None
  try:
    spec = legacy_spec(info) if legacy else ModelSpec.from_dict(info["spec"])
    jnp.dtype(spec.dtype)
    image_shape = tuple(int(d) for d in info["image_shape"])
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    raise PackedFormatError(f"{path}: corrupt model spec ({e}).") from None
  if spec.policy.packed:
    raise PackedFormatError(f"{path}: corrupt model spec (the policy is the packed form {spec.policy.quantizer!r}).")
  if not image_shape or min(image_shape) < 1:
    raise PackedFormatError(f"{path}: corrupt image_shape {info['image_shape']!r}.")
  return spec, image_shape


def _build(spec: ModelSpec, path, **overrides):
  """``spec``'s model (``packed=True``: the inference form; a ``policy``: another policy)."""
  policy = overrides.pop("policy", None)
  if policy is not None:
    spec = dataclasses.replace(spec, policy=policy)
  try:
    return spec.build(**overrides)
  except (TypeError, ValueError) as e:  # constructor arguments the module does not take, a bad value
    raise PackedFormatError(f"{path}: cannot build the model the file names ({spec.arch!r}): {e}") from None


def load_packed(path: str | os.PathLike, packed: bool = False):
  """Loads a packed file (``.safetensors`` or ``.tgq``, any format version so far) for inference.

  Returns ``(model, variables, header)``: ``model.apply(variables, images, train=False)``
  gives the trained model's evaluation logits. The model is built from the
  :class:`~tgq_jax.models.ModelSpec` the file records (a user's module must be
  importable by its ``"package.module:Name"``).

  Args:
    path: the file; its container is recognized from its content.
    packed: False: the model is the full-precision twin of the exported model
      (the spec with quantizer "fp"), its kernels the dequantized ternary kernels
      (``scale * q``, the values the trained model computes with): logits equal
      the trained model's exactly, at full FP32 size in memory. True: the
      packed inference model (``spec.build(packed=True)``): its variables
      hold the 2-bit codes (4 per byte) and scales, and each kernel is rebuilt
      inside the forward pass, layer by layer (on GPU/TPU, dense layers multiply
      by the codes directly, with the Pallas ternary kernel); only the packed
      bytes stay resident.

  ``header`` holds ``spec`` (``ModelSpec.to_dict()``: ``ModelSpec.from_dict(header["spec"])``;
  for a version-1/2 file, converted from its flat settings, which are kept too),
  ``image_shape``, ``format``, ``format_version`` and the extra facts recorded at
  export (``dataset``, ``test_accuracy``, ...).

  Raises:
    PackedFormatError: the file is truncated or corrupt (any changed byte of a
      version-2/3 or safetensors file), of another format version, or names an
      unknown architecture, a module that cannot be imported, or other tensors
      than its model has.
  """
  blob = _read_bytes(path)
  if blob[:4] == MAGIC:
    header, payload = _parse_tgq(blob, path)
    spec, image_shape = _spec_of(header, path)
    if not isinstance(header.get("tensors"), list):
      raise PackedFormatError(f"{path}: header lacks tensors.")
    packed_model = _build(spec, path, packed=True)
    layers = quantized_layers(packed_model, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32), train=False)
    symmetric = {p: q.symmetric for p, q in layers.items() if q.packed}
    default = next(iter(symmetric.values()), True)
    try:
      tree = _tgq_tree(header, payload, symmetric, default)
    except PackedFormatError as e:
      raise PackedFormatError(f"{path}: {e}") from None
    header = {"format": "tgq", **header}
  else:
    header, tree = _safetensors_tree(blob, path)
    spec, image_shape = _spec_of(header, path)
    packed_model = _build(spec, path, packed=True)
  header = {**header, "spec": spec.to_dict(), "image_shape": list(image_shape)}
  _check_against_model(packed_model, tree, image_shape, path)
  if packed:
    return packed_model, jax.tree.map(jnp.asarray, tree), header
  fp_model = _build(spec, path, policy=dataclasses.replace(spec.policy, quantizer="fp"))
  return fp_model, _dequantized(packed_model, fp_model, tree, image_shape), header


def _dequantized(packed_model, fp_model, tree: Mapping, image_shape) -> dict:
  """The full-precision twin's variables: each ternary layer's kernel rebuilt from its codes.

  The scale (and neg_scale) has the quantizer's statistic shape, over the kernel's
  output-feature axes (:func:`tgq_jax.core.ternarize.channel_axes`: the last for Dense
  and Conv, ``heads x head_dim`` of an attention projection ...): it is
  broadcast along the other axes.
  """
  from flax import traverse_util

  import flax.linen as nn

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  abstract = jax.eval_shape(lambda x: fp_model.init(jax.random.key(0), x, train=False), x)
  kernels = {k[:-1]: v for k, v in traverse_util.flatten_dict(nn.unbox(dict(abstract))["params"]).items()
             if k[-1] == "kernel"}
  flat = {("/".join(k)): v for k, v in leaves(tree)}
  for layer_path, quantizer in quantized_layers(packed_model, x, train=False).items():
    if not quantizer.packed:
      continue
    prefix = "/".join(("params", *layer_path))
    codes, scale = flat.pop(f"{prefix}/codes"), flat.pop(f"{prefix}/scale")
    neg = flat.pop(f"{prefix}/neg_scale", scale)
    kernel = kernels[layer_path]
    shape = tuple(kernel.shape)
    axes = channel_axes(len(shape), quantizer.per_channel)
    keep = tuple(shape[i] if i in axes else 1 for i in range(len(shape)))
    scale, neg = (jnp.reshape(jnp.asarray(s), keep) for s in (scale, neg))
    flat[f"{prefix}/kernel"] = dequantize(TernaryParts(jnp.asarray(unpack_planar(codes, shape)), scale, neg,
                                                       None, None, None), kernel.dtype)
  out: dict = {}
  for name, value in flat.items():
    _set(out, name.split("/"), jnp.asarray(value))
  return out


# --- from a training workdir -----------------------------------------------------


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike) -> SizeReport:
  """Exports the latest checkpoint of a ``train.py`` workdir to ``out`` (``.safetensors`` or ``.tgq``).

  The model comes from ``<workdir>/config.json``, which the trainer writes when a
  run starts: its ``"model"`` entry (a :class:`~tgq_jax.models.ModelSpec`), or,
  for a workdir written before there was one, the ``"config"`` options.
  """
  from tgq_jax.training import checkpoints
  from tgq_jax.training.workdir import RUN_CONFIG

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
    spec = ModelSpec.from_dict(record["model"]) if "model" in record else _config_spec(cfg, info)
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{config_path} is corrupt ({e!r}).") from None
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [p for p in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
           if p.isdigit() and os.path.isdir(os.path.join(ckpt_dir, p, "state"))]
  if not steps:
    raise FileNotFoundError(f"{workdir} has no checkpoint to export (no finished step under {ckpt_dir}): "
                            "the run saved none yet; train it (or let it reach its first checkpoint) first.")
  variables = checkpoints.load_variables(workdir)
  extra = {"dataset": info["name"]}
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      extra["test_accuracy"] = json.load(f).get("test_accuracy")
  return export_variables(out, variables, spec, tuple(info["image_shape"]), extra=extra)


def _config_spec(cfg: Mapping[str, Any], info: Mapping[str, Any]) -> ModelSpec:
  """The ModelSpec of a config.json written before it held one (its training options)."""
  policy = QuantPolicy(cfg["quantizer"], per_channel=bool(cfg["per_channel"]),
                       ternary_first=bool(cfg["ternary_first"]), ternary_last=bool(cfg["ternary_last"]))
  kwargs = {} if cfg.get("dropout") is None else {"dropout_rate": cfg["dropout"]}
  return ModelSpec(cfg["arch"], int(info["num_classes"]), policy,
                   "bfloat16" if cfg.get("half_precision") else "float32", kwargs)


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

