"""Tools over a params tree of quantized layers, framework-neutral (nested dicts of arrays).

``layers`` arguments map a layer's params path (a tuple of keys) to its
:class:`~tgq_jax.core.quantizers.Quantizer`, as
:func:`tgq_jax.frontends.linen_layers.quantized_layers` returns them.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgq_jax.core.quantizers import Quantizer, get_quantizer, quantizer_names

__all__ = ["KERNEL_KEYS", "LayerStats", "as_leaf", "kernel_key", "layer_stats", "mismatch_problems",
           "quantizer_leaf_names", "reinit_thresholds", "subtree"]

Path = tuple[str, ...]

#: The names a quantized layer's float kernel has in its params: ``kernel`` (Dense, Conv, ...) or
#: ``embedding`` (an Embed table, quantized under ``QuantPolicy(embeddings=True)``).
KERNEL_KEYS = ("kernel", "embedding")


def kernel_key(layer: Mapping) -> str:
  """The name of the float kernel among a quantized layer's params (:data:`KERNEL_KEYS`); ``"kernel"``
  when it has none (a packed layer)."""
  return next((key for key in KERNEL_KEYS if key in layer), "kernel")


def subtree(params: Mapping, path: Path) -> Mapping:
  """The node of ``params`` at ``path`` (``params[path[0]][path[1]]...``)."""
  node = params
  for key in path:
    node = node[key]
  return node


def reinit_thresholds(params: Mapping, layers: Mapping[Path, Quantizer]) -> dict:
  """Re-initializes every quantizer parameter from the current kernels.

  TGA's ``delta = 0.05 max|w|`` (the authors do this after loading full-precision
  weights, before ternary fine-tuning); TTQ's scales likewise from the kernel.
  Returns a new tree; ``params`` is not modified.
  """
  params = jax.tree.map(lambda x: x, dict(params))  # fresh containers, shared leaves

  def set_in(tree, path, values):
    node = tree
    for key in path[:-1]:
      node[key] = dict(node[key])
      node = node[key]
    node[path[-1]] = {**node[path[-1]], **values}

  for path, quantizer in layers.items():
    if not quantizer.param_names:
      continue
    layer = subtree(params, path)
    fresh = quantizer.init(layer[kernel_key(layer)])
    set_in(params, path, {k: jnp.asarray(v, layer[k].dtype) for k, v in fresh.items()})
  return params


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Statistics of one quantized layer, as the trainer logs and the exporter reports."""

  name: str  # "/"-joined params path
  shape: tuple[int, ...]
  num_weights: int
  quantizer: str
  sparsity: float  # fraction of zero codes (0 for full-precision layers)
  # None for full-precision layers (JSON null: metrics files stay standard JSON).
  scale: float | None  # value of a +1 code (mean over channels for per-channel statistics)
  neg_scale: float | None  # magnitude of a -1 code
  threshold: float | None  # clipped threshold t (mean over channels)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@functools.lru_cache(maxsize=None)
def _stats_fn(quantizer: Quantizer):
  """Sparsity and the mean scale, negative scale and threshold of a kernel, as one jitted function
  (op by op, each jnp call compiled on its own: ~140 small XLA:CPU compilations, ~11 s of the demo)."""

  def stats(kernel, qparams):
    parts = quantizer.parts(kernel, qparams)
    return (jnp.mean(parts.codes == 0), *(jnp.mean(x) for x in (parts.scale, parts.neg_scale, parts.threshold)))

  return jax.jit(stats)


def layer_stats(params: Mapping, layers: Mapping[Path, Quantizer]) -> list[LayerStats]:
  """Per-layer statistics of the quantized layers of a params tree.

  Full-precision layers report sparsity 0 and None for scale and threshold.
  """
  out = []
  for path, quantizer in layers.items():
    layer = subtree(params, path)
    kernel = layer[kernel_key(layer)]
    n = int(np.prod(kernel.shape))
    if quantizer.ternary:
      qparams = {key: layer[key] for key in quantizer.param_names}
      sparsity, scale, neg, thr = map(float, _stats_fn(quantizer)(kernel, qparams))
    else:
      sparsity, scale, neg, thr = 0.0, None, None, None
    out.append(LayerStats("/".join(path), tuple(kernel.shape), n, quantizer.name, sparsity, scale, neg, thr))
  return out


def quantizer_leaf_names() -> frozenset[str]:
  """Every leaf name a registered quantizer may create beside a kernel (``delta``, ``pos_scale``, ...)."""
  return frozenset(n for q in quantizer_names() for n in get_quantizer(q).param_names)


def _list_keys(keys: Iterable[str]) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:20])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")


def mismatch_problems(missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable[str], noun: str,
                      shapes: str = "shape mismatches") -> list[str]:
  """What differs between two trees, one phrase per kind (empty when they match).

  ``missing``/``unexpected``: key names (sorted, the first 20 shown); ``mismatched``: phrases
  (``"a/b: got (3,), expected (4,)"``); ``noun`` names the keys ("leaves", "tensors").
  """
  missing, unexpected, mismatched = list(missing), list(unexpected), list(mismatched)
  problems = []
  if missing:
    problems.append(f"missing {noun}: {_list_keys(missing)}")
  if unexpected:
    problems.append(f"unexpected {noun}: {_list_keys(unexpected)}")
  if mismatched:
    problems.append(f"{shapes}: {'; '.join(mismatched)}")
  return problems


def as_leaf(value: Any, dtype: Any) -> jax.Array:
  """``value`` as a leaf of ``dtype``, kept wider when it is a wider float.

  A float64 source stays float64 under ``jax_enable_x64`` (and becomes
  float32 without it, as every jax array does); float32 or narrower sources
  become ``dtype``.
  """
  source = jnp.result_type(value) if isinstance(value, jax.Array) else np.asarray(value).dtype
  if jnp.issubdtype(source, jnp.floating) and jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.promote_types(source, dtype)
  return jnp.asarray(value, jax.dtypes.canonicalize_dtype(dtype))
