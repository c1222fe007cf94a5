"""What a model takes in FP32 and packed: one function, :func:`size_report`, for the
export report (:func:`tgq_jax.export.export_variables`) and the end-of-run table
(:func:`tgq_jax.training.harness.model_size_bits`), so the two always agree.

Per leaf of the model's variables (every collection: ``params``, ``batch_stats``, ...):

* the kernel of a ternary layer: its 2-bit codes plus 4 bytes (float32) per
  scale, twice that for an asymmetric quantizer (TTQ's separate magnitude of a -1
  code). Codes take ``ceil(K / 4) * N`` bytes in the planar layout (the packed
  inference model's ``codes`` leaf, what the file stores; ``K`` the product of the
  kernel's leading axes, ``N`` its last);
* the quantizer's own leaves (TGA's ``delta``, TTQ's trainable scales): not
  stored (the scales carry what inference needs), and not counted in FP32 either
  (the full-precision model has none);
* every other leaf as it is (its own dtype's bytes); its FP32 size is 4 bytes per value.

Only shapes are read: sizes do not depend on the values (sparsity, when wanted, is given).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from tgq_jax.core.packing import planar_shape
from tgq_jax.core.ternarize import stat_shape
from tgq_jax.core.trees import kernel_key

SCALE_BYTES = 4  # scales are stored as float32

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LayerSize:
  """One ternary layer (its kernel: codes and scales) or one other stored leaf."""

  name: str  # the layer's params path ("/"-joined), or "<collection>/<leaf path>"
  num_weights: int
  fp32_bytes: int
  packed_bytes: int
  sparsity: float | None  # fraction of zero codes (0 for full-precision leaves; None: not computed)
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
    return self.packed_bytes / max(self.fp32_bytes, 1)

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
      sparsity = "-" if l.sparsity is None else f"{l.sparsity:.3f}"
      rows.append(f"{l.name:<40} {l.num_weights:>10,} {l.fp32_bytes:>11,} {l.packed_bytes:>10,} {sparsity:>8}")
    rest = [l for l in self.layers if not l.ternary]
    rows.append(f"{'(full-precision leaves: ' + str(len(rest)) + ')':<40} {sum(l.num_weights for l in rest):>10,} "
                f"{sum(l.fp32_bytes for l in rest):>11,} {sum(l.packed_bytes for l in rest):>10,} {'':>8}")
    rows.append(f"{'total':<40} {sum(l.num_weights for l in self.layers):>10,} {self.fp32_bytes:>11,} "
                f"{self.packed_bytes:>10,} {'':>8}")
    tern = f"1/{1 / self.ternary_ratio:.1f}" if self.ternary_ratio else "- (none)"
    rows.append(f"ternary layers: packed/fp32 = {tern}; whole model: packed/fp32 = 1/{1 / self.ratio:.1f}")
    return "\n".join(rows)


def code_bytes(shape: tuple[int, ...]) -> int:
  """Bytes of the planar 2-bit codes of a kernel of ``shape`` (see the module docstring)."""
  k4, n = planar_shape(shape)
  return k4 * n


def ternary_kernel_bytes(shape: tuple[int, ...], quantizer) -> int:
  """Stored bytes of one ternary kernel: codes, its scales and (asymmetric quantizers) its -1 magnitudes."""
  scales = int(np.prod(stat_shape(tuple(shape), quantizer.per_channel), dtype=np.int64))
  return code_bytes(tuple(shape)) + SCALE_BYTES * scales * (1 if quantizer.symmetric else 2)


def leaves(tree: Mapping, prefix: Path = ()) -> list[tuple[Path, Any]]:
  """``(path, leaf)`` of a nested mapping, keys sorted at every level (the order export stores them in)."""
  out = []
  for key in sorted(tree, key=str):
    value = tree[key]
    if isinstance(value, Mapping):
      out.extend(leaves(value, prefix + (str(key),)))
    else:
      out.append((prefix + (str(key),), value))
  return out


def size_report(variables: Mapping, layers: Mapping[Path, Any], *,
                sparsity: Mapping[Path, float] | None = None) -> SizeReport:
  """FP32 bytes vs packed bytes of a model, per ternary layer and per other leaf.

  Args:
    variables: the training-form variables, ``{"params": ..., "batch_stats": ..., ...}``
      (arrays or anything with ``shape`` and ``dtype``; only those are read).
    layers: :func:`tgq_jax.frontends.linen_layers.quantized_layers` of the model (params path ->
      ``Quantizer``); layers whose quantizer is not ternary count as full precision.
    sparsity: each ternary layer's fraction of zero codes, when known (else None in the report).

  Returns:
    The :class:`SizeReport`: the ternary layers first, in ``layers``' order, then
    every other leaf by collection and path.
  """
  ternary = {path: q for path, q in layers.items() if q.ternary}
  params = variables.get("params", {})
  rows, skip = [], set()
  for path, quantizer in ternary.items():
    node = params
    for key in path:
      node = node[key]
    shape = tuple(int(d) for d in np.shape(node[kernel_key(node)]))
    n = int(np.prod(shape, dtype=np.int64))
    rows.append(LayerSize("/".join(path), n, 4 * n, ternary_kernel_bytes(shape, quantizer),
                          None if sparsity is None else float(sparsity[path]), True))
    skip.update(("params", *path, leaf) for leaf in (kernel_key(node), *quantizer.param_names))
  for collection in sorted(variables):
    for leaf_path, value in leaves(variables[collection]):
      if (collection, *leaf_path) in skip:
        continue
      n = int(np.prod(np.shape(value), dtype=np.int64))
      rows.append(LayerSize("/".join((collection, *leaf_path)), n, 4 * n, n * np.dtype(value.dtype).itemsize,
                            0.0, False))
  return SizeReport(tuple(rows))
