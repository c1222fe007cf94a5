"""2-bit packed export of a trained model, and inference from the packed file.

    python -m tgq_jax.export --workdir W --out model.tgq

File layout (all integers little-endian)::

    bytes 0-3    magic b"TGQ\\x00"
    bytes 4-7    uint32 format version (FORMAT_VERSION)
    bytes 8-15   uint64 length H of the header
    next H bytes UTF-8 JSON header
    the rest     payload: the blobs the header's "tensors" entries point to
                 (offsets relative to the payload's start)

The header holds the model's settings (``arch``, ``num_classes``,
``quantizer``, ``per_channel``, ``ternary_first``, ``ternary_last``,
``image_shape``, ``dtype``), the ``tgq_jax_version``, the ``format_version``, the
payload's length and SHA-256, and one entry per tensor:

* ``{"kind": "ternary", "path": [...], "shape": [...], "codes": blob,
  "scale_shape": [...], "scale": blob, "neg_scale": blob or null}`` for the
  kernel of a ternary layer: its codes packed 4 per byte (below) and its
  float32 scale (scalar, or one per output channel); ``neg_scale``, the
  magnitude of a -1 code, is null when it equals ``scale`` (TGA, TWN; TTQ has
  its own);
* ``{"kind": "array", "collection": ..., "path": [...], "shape": [...],
  "dtype": ..., "data": blob}`` for every other leaf (BatchNorm, biases,
  kernels of full-precision layers) as it is.

Quantizer-only leaves (TGA's ``delta``, TTQ's scales) are not stored: the
scales carry all that inference needs.

A ternary layer of N weights takes ``ceil(N / 4)`` bytes plus 4 bytes per
scale: at most 1/15 of its FP32 bytes once ``N >= 480`` per scale.

Bit layout of packed codes: the kernel's codes are flattened in C order (Flax's
HWIO / (in, out) layout); code ``i`` occupies bits ``2*(i % 4)`` and
``2*(i % 4) + 1`` of byte ``i // 4``, encoded ``00 = 0``, ``01 = +1``,
``10 = -1`` (``11`` is invalid); the last byte is padded with ``00``.
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

from tgq_jax.layers import quantized_layers
from tgq_jax.models import create_model

MAGIC = b"TGQ\x00"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sIQ")
_MODEL_KEYS = ("arch", "num_classes", "quantizer", "per_channel", "ternary_first", "ternary_last", "dtype")


class PackedFormatError(ValueError):
  """A .tgq file that cannot be read: truncated, corrupt, another format version, unknown arch."""


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


# --- writing -----------------------------------------------------------------


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
  out = []
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      out.extend(_flatten(value, prefix + (str(key),)))
    else:
      out.append((prefix + (str(key),), value))
  return out


class _Payload:
  def __init__(self):
    self.chunks: list[bytes] = []
    self.size = 0

  def add(self, data: bytes) -> dict[str, int]:
    self.chunks.append(data)
    blob = {"offset": self.size, "nbytes": len(data)}
    self.size += len(data)
    return blob


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


def export_variables(path: str | os.PathLike, variables: Mapping, settings: Mapping[str, Any],
                     image_shape: tuple[int, int, int], *, extra: Mapping[str, Any] | None = None) -> SizeReport:
  """Writes ``variables`` ({"params", "batch_stats"}) of the model ``settings`` to a .tgq file.

  Args:
    path: output file; written to a temporary name and renamed, so an existing
      file is never left half-written.
    variables: the model's variables (arrays on any device).
    settings: :func:`model_settings` (how to rebuild the model).
    image_shape: (H, W, C) of the model's input.
    extra: more JSON-serializable facts to record in the header (e.g. dataset, test accuracy).

  Returns:
    The :class:`SizeReport` of what was written.
  """
  from tgq_jax import __version__

  settings = model_settings(**settings)
  model = _create(settings)
  layers = quantized_layers(model, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables["params"]
  payload = _Payload()
  entries, sizes = [], []
  skip: set[tuple[str, ...]] = set()
  for layer_path, quantizer in layers.items():
    if not quantizer.ternary:
      continue
    layer = params
    for key in layer_path:
      layer = layer[key]
    kernel = layer["kernel"]
    parts = quantizer.parts(kernel, {k: layer[k] for k in quantizer.param_names})
    codes = np.asarray(parts.codes)
    packed = pack_codes(codes)
    scale = np.asarray(parts.scale, np.float32)
    neg_scale = np.asarray(parts.neg_scale, np.float32)
    symmetric = np.array_equal(scale, neg_scale)  # TGA, TWN: store the scale once
    entry = {"kind": "ternary", "collection": "params", "path": [*layer_path, "kernel"],
             "shape": list(kernel.shape), "codes": payload.add(packed.tobytes()),
             "scale_shape": list(scale.shape), "scale": payload.add(scale.tobytes()),
             "neg_scale": None if symmetric else payload.add(neg_scale.tobytes())}
    entries.append(entry)
    stored = packed.nbytes + scale.nbytes * (1 if symmetric else 2)
    sizes.append(LayerSize("/".join(layer_path), codes.size, 4 * codes.size, stored,
                           float(np.mean(codes == 0)), True))
    skip.add((*layer_path, "kernel"))
    skip.update((*layer_path, k) for k in quantizer.param_names)
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
            "image_shape": list(image_shape), "payload_bytes": len(data),
            "payload_sha256": hashlib.sha256(data).hexdigest(), "tensors": entries, **dict(extra or {})}
  header_bytes = json.dumps(header).encode()
  tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)))
    f.write(header_bytes)
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return SizeReport(tuple(sizes))


# --- reading -----------------------------------------------------------------


def read_packed(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
  """Reads and validates a .tgq file: returns (header, payload)."""
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < _PREFIX.size:
    raise PackedFormatError(f"{path}: truncated: {len(blob)} bytes, not even the {_PREFIX.size}-byte prefix.")
  magic, version, header_len = _PREFIX.unpack_from(blob)
  if magic != MAGIC:
    raise PackedFormatError(f"{path}: not a tgq_jax packed model (magic {magic!r}, expected {MAGIC!r}).")
  if version != FORMAT_VERSION:
    raise PackedFormatError(f"{path}: format version {version}, this tgq_jax reads version {FORMAT_VERSION}.")
  end = _PREFIX.size + header_len
  if len(blob) < end:
    raise PackedFormatError(f"{path}: truncated inside the header ({len(blob)} of at least {end} bytes).")
  try:
    header = json.loads(blob[_PREFIX.size:end])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PackedFormatError(f"{path}: corrupt header ({e}).") from None
  payload = blob[end:]
  if len(payload) != header.get("payload_bytes"):
    raise PackedFormatError(f"{path}: truncated or padded payload: {len(payload)} bytes, "
                            f"header says {header.get('payload_bytes')}.")
  if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
    raise PackedFormatError(f"{path}: corrupt payload (SHA-256 mismatch).")
  return header, payload


def _blob(payload: bytes, ref: Mapping[str, int]) -> bytes:
  return payload[ref["offset"]: ref["offset"] + ref["nbytes"]]


def _set(tree: dict, path: list[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_packed(path: str | os.PathLike):
  """Loads a .tgq file for inference.

  Returns ``(model, variables, header)``: ``model.apply(variables, images, train=False)``
  gives the trained model's evaluation logits. The model is the full-precision
  twin (quantizer "fp") of the exported architecture, whose kernels are the
  dequantized ternary kernels (``scale * q``, exactly the values the trained
  model computes with).
  """
  from tgq_jax.models import archs

  header, payload = read_packed(path)
  missing = [k for k in (*_MODEL_KEYS, "image_shape", "tensors") if k not in header]
  if missing:
    raise PackedFormatError(f"{path}: header lacks {', '.join(missing)}.")
  if header["arch"] not in archs():
    raise PackedFormatError(f"{path}: unknown arch {header['arch']!r}; this tgq_jax knows {', '.join(archs())}.")
  variables: dict[str, dict] = {}
  for entry in header["tensors"]:
    try:
      collection, leaf_path, value = _read_tensor(entry, payload)
    except PackedFormatError as e:
      raise PackedFormatError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
      raise PackedFormatError(f"{path}: corrupt tensor entry {entry.get('path')!r}: {e!r}") from None
    _set(variables.setdefault(collection, {}), leaf_path, value)
  settings = {k: header[k] for k in _MODEL_KEYS}
  model = _create(settings, quantizer="fp")
  return model, variables, header


def _read_tensor(entry: Mapping[str, Any], payload: bytes):
  """One header entry and its blobs -> (collection, path, array)."""
  from tgq_jax.ternarize import TernaryParts, dequantize

  shape = tuple(entry["shape"])
  if entry["kind"] == "ternary":
    codes = unpack_codes(np.frombuffer(_blob(payload, entry["codes"]), np.uint8), shape)
    scale_shape = tuple(entry["scale_shape"])
    scale = np.frombuffer(_blob(payload, entry["scale"]), np.float32).reshape(scale_shape)
    neg = scale if entry["neg_scale"] is None else (
      np.frombuffer(_blob(payload, entry["neg_scale"]), np.float32).reshape(scale_shape))
    value = dequantize(TernaryParts(jnp.asarray(codes), scale, neg, None, None, None), jnp.float32)
  elif entry["kind"] == "array":
    data = _blob(payload, entry["data"])
    value = jnp.asarray(np.frombuffer(data, np.dtype(entry["dtype"])).reshape(shape))
  else:
    raise PackedFormatError(f"unknown tensor kind {entry['kind']!r}.")
  return entry["collection"], list(entry["path"]), value


# --- from a training workdir -------------------------------------------------


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike) -> SizeReport:
  """Exports the latest checkpoint of a ``train.py`` workdir to ``out``.

  The model's settings come from ``<workdir>/config.json``, which the trainer
  writes when a run starts.
  """
  from tgq_jax import checkpoints
  from tgq_jax.train_lib import RUN_CONFIG

  config_path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a train.py workdir?")
  with open(config_path) as f:
    record = json.load(f)
  cfg, info = record["config"], record["dataset_info"]
  settings = model_settings(cfg["arch"], info["num_classes"], quantizer=cfg["quantizer"],
                            per_channel=cfg["per_channel"], ternary_first=cfg["ternary_first"],
                            ternary_last=cfg["ternary_last"],
                            dtype="bfloat16" if cfg.get("half_precision") else "float32")
  variables = checkpoints.load_variables(os.fspath(workdir))
  extra = {"dataset": info["name"]}
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      extra["test_accuracy"] = json.load(f).get("test_accuracy")
  return export_variables(out, variables, settings, tuple(info["image_shape"]), extra=extra)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m tgq_jax.export",
    description="Write a train.py workdir's latest checkpoint as one 2-bit packed .tgq file.")
  parser.add_argument("--workdir", required=True, help="the train.py --workdir of the run")
  parser.add_argument("--out", required=True, help="output file, e.g. model.tgq")
  parser.add_argument("--report-json", help="also write the size report as JSON here")
  args = parser.parse_args(argv)
  try:
    report = export_workdir(args.workdir, args.out)
  except (OSError, ValueError) as e:
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
