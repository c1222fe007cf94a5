"""Writing a packed file: the packed inference model's variables (:func:`pack_variables`) in the container
(:func:`export_variables`)."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgq_jax.core.ternarize import stat_shape
from tgq_jax.core.trees import kernel_key
from tgq_jax.export import container, files
from tgq_jax.export.sizes import SizeReport, leaves, size_report
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.core.packing import pack_planar
from tgq_jax.models import ModelSpec, example_input

# Metadata keys of the format itself: export's ``extra`` facts may not use them.
RESERVED = frozenset({"format", "format_version", "tgq_jax_version", "spec", "image_shape", "model", "ternary",
                      "extra", "sha256", "tensors"})
MAX_IMAGE_DIM = 2**16


def set_path(tree: dict, path, value) -> None:
  """``tree[path[0]][path[1]]... = value``, creating the levels."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def as_spec(spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
  """``spec``, or the ModelSpec of its ``to_dict()`` form; only the training form can be exported."""
  if isinstance(spec, Mapping):
    spec = ModelSpec.from_dict(spec)
  if not isinstance(spec, ModelSpec):
    raise TypeError(f"spec must be a tgq_jax.models.ModelSpec, got {type(spec).__name__}.")
  if spec.policy.packed:
    raise ValueError(f"spec: the policy {spec.policy.quantizer!r} is the packed inference form; "
                     "give the spec of the trained model (its quantizer without 'packed:').")
  return spec


def check_image_shape(image_shape: Any) -> tuple[int, ...]:
  """``image_shape`` as a tuple of 1 to 4 integers in [1, 2**16]; ValueError otherwise."""
  if (not isinstance(image_shape, (list, tuple)) or not 1 <= len(image_shape) <= 4
      or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and 1 <= d <= MAX_IMAGE_DIM
                 for d in image_shape)):
    raise ValueError(f"image_shape must be 1 to 4 integers in [1, {MAX_IMAGE_DIM}], got {image_shape!r:.80}.")
  return tuple(int(d) for d in image_shape)


@dataclasses.dataclass(frozen=True)
class TernaryLayer:
  path: tuple[str, ...]  # the layer's params path
  shape: tuple[int, ...]  # its kernel's
  codes: np.ndarray  # int8, the kernel's shape
  scale: np.ndarray  # float32, the quantizer's statistic shape (() or the output-feature axes)
  neg_scale: np.ndarray  # float32, the magnitude of a -1 code
  symmetric: bool  # the quantizer's -1 code is -scale (TGA, TWN): no neg_scale leaf in the packed model


def check_finite(variables: Mapping) -> None:
  """ValueError naming every leaf that holds a NaN or an infinity."""
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


def ternary_layers(variables: Mapping, spec: ModelSpec, image_shape: tuple[int, ...]
                   ) -> tuple[list[TernaryLayer], set[tuple[str, ...]], dict]:
  """The ternary layers' codes and scales, the params leaves they replace, and every quantized
  layer's quantizer (:func:`tgq_jax.frontends.linen_layers.quantized_layers` of the model ``spec`` builds)."""
  model = spec.build()
  x = example_input(model, image_shape)
  layers = quantized_layers(model, x, train=False)
  out, skip = [], set()
  for layer_path, quantizer in layers.items():
    if not quantizer.ternary:
      continue
    layer = variables["params"]
    for key in layer_path:
      layer = layer[key]
    name = kernel_key(layer)
    kernel = layer[name]
    parts = quantizer.parts(kernel, {k: layer[k] for k in quantizer.param_names})
    scale_shape = stat_shape(tuple(kernel.shape), quantizer.per_channel)
    out.append(TernaryLayer(layer_path, tuple(kernel.shape), np.asarray(parts.codes),
                            np.asarray(parts.scale, np.float32).reshape(scale_shape),
                            np.asarray(parts.neg_scale, np.float32).reshape(scale_shape),
                            quantizer.symmetric))
    skip.add((*layer_path, name))
    skip.update((*layer_path, k) for k in quantizer.param_names)
  return out, skip, layers


def packed_tree(variables: Mapping, layers: list[TernaryLayer], skip: set) -> dict:
  """The packed model's variables: the ternary layers' planar codes and scales, every other leaf as it is."""
  out: dict[str, dict] = {}
  for collection in sorted(variables):
    out[collection] = {}
    for leaf_path, value in leaves(variables[collection]):
      if not (collection == "params" and leaf_path in skip):
        set_path(out[collection], leaf_path, np.asarray(value))
  for layer in layers:
    set_path(out["params"], (*layer.path, "codes"), pack_planar(layer.codes))
    set_path(out["params"], (*layer.path, "scale"), layer.scale)
    if not layer.symmetric:
      set_path(out["params"], (*layer.path, "neg_scale"), layer.neg_scale)
  return out


def pack_variables(variables: Mapping, spec: ModelSpec, image_shape: tuple[int, int, int]) -> dict:
  """The variables of the packed inference model (``spec.build(packed=True)``), in memory.

  What an export holds, as numpy arrays: each ternary layer's ``codes`` (planar
  2-bit layout) and ``scale`` (and TTQ's ``neg_scale``), every other leaf as it is.
  """
  layers, skip, _ = ternary_layers(variables, as_spec(spec), check_image_shape(image_shape))
  return packed_tree(variables, layers, skip)


def export_variables(path: str | os.PathLike, variables: Mapping, spec: ModelSpec,
                     image_shape: tuple[int, int, int], *, extra: Mapping[str, Any] | None = None) -> SizeReport:
  """Writes ``variables`` ({"params", "batch_stats", ...}) of the model ``spec`` to a packed file.

  Args:
    path: output file (``.safetensors``); written to a temporary name and renamed, so an
      existing file is never left half-written, and nothing is left behind on failure.
    variables: the trained model's variables (arrays on any device); every value must be finite.
    spec: the :class:`~tgq_jax.models.ModelSpec` of the trained model (its training
      form: ``spec.build()`` is the model ``variables`` belong to), recorded in the
      file so that :func:`~tgq_jax.export.load_packed` can build it again: a registered
      arch, or a user's module (:meth:`ModelSpec.for_model`), which the loader passes as ``model=``.
    image_shape: (H, W, C) of the model's input.
    extra: more JSON facts to record (e.g. dataset, test accuracy); not the format's
      own keys (``spec``, ``image_shape``, ``tensors``, ...).

  Returns:
    The :class:`~tgq_jax.export.sizes.SizeReport` of what was written: its
    ``packed_bytes`` are the file's tensor bytes exactly.

  Raises:
    ValueError: a non-finite value in ``variables``, a reserved or non-JSON ``extra``,
      a bad ``image_shape``, ``path`` is a directory.
    OSError: ``path`` cannot be written, e.g. a full disk (one line; the previous file
      there, if any, is intact).
  """
  from tgq_jax import __version__

  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"output {path} is a directory: give a file name.")
  spec = as_spec(spec)
  image_shape = check_image_shape(image_shape)
  extra = dict(extra or {})
  reserved = sorted(RESERVED & set(extra))
  if reserved:
    raise ValueError(f"extra: {', '.join(reserved)} are keys of the file format itself; use other names.")
  try:
    extra_json = json.dumps(extra, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"extra: not plain JSON ({e}).") from None
  check_finite(variables)
  layers, skip, quantizers = ternary_layers(variables, spec, image_shape)
  for layer in layers:  # the scales are computed: check them too
    if not (np.isfinite(layer.scale).all() and np.isfinite(layer.neg_scale).all()):
      raise ValueError(f"refusing to export: layer {'/'.join(layer.path)} has a non-finite scale.")
  packed = packed_tree(variables, layers, skip)
  tensors = {"/".join((collection, *leaf_path)): np.array(value, order="C")  # (ascontiguousarray makes 0-d 1-d)
             for collection in sorted(packed) for leaf_path, value in leaves(packed[collection])}
  for name, array in tensors.items():
    container.dtype_code(array.dtype)  # a leaf of a dtype the format does not hold: refused here, not on loading
  metadata = {
    "format": container.FORMAT, "format_version": str(container.FORMAT_VERSION), "tgq_jax_version": __version__,
    "model": json.dumps({"spec": spec.to_dict(), "image_shape": list(image_shape)}),
    "ternary": json.dumps({"/".join(l.path): {"kernel_shape": list(l.shape)} for l in layers}),
    "extra": extra_json,
  }
  files.atomic_write(path, container.write_container(tensors, metadata))
  sparsity = {layer.path: float(np.mean(layer.codes == 0)) for layer in layers}
  return size_report(variables, quantizers, sparsity=sparsity)
