"""Reading a packed file: :func:`load_packed`.

A file is data. Loading one never imports or calls anything it names: its model
is a registered architecture (:func:`tgq_jax.models.register`) or a user's module
the caller passes (``model=``); its constructor options are JSON values checked
against the constructor's fields; everything the header declares (sizes, dtypes,
shapes) is checked against the model before a tensor is read.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tgq_jax.core.ternarize import TernaryParts, channel_axes, dequantize
from tgq_jax.core.trees import KERNEL_KEYS
from tgq_jax.export import container
from tgq_jax.export.container import PackedFormatError
from tgq_jax.export.packing import check_image_shape, set_path
from tgq_jax.export.sizes import leaves
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.core.packing import unpack_planar
from tgq_jax.models import ModelSpec, example_input
from tgq_jax.models.spec import ModelArg


def _read_bytes(path: str | os.PathLike) -> bytes:
  path = os.fspath(path)
  if os.path.isdir(path):
    raise PackedFormatError(f"{path} is a directory, not a packed model file.")
  if os.path.exists(path) and not os.path.isfile(path):
    raise PackedFormatError(f"{path} is not a regular file.")
  with open(path, "rb") as f:
    return f.read()


def _one_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def spec_of(metadata: Mapping[str, str], model: ModelArg, path) -> tuple[ModelSpec, tuple[int, ...], dict]:
  """The model the metadata names (bound to the caller's ``model=``), its input shape, the extra facts.

  Data only: an arch that is neither registered nor given by ``model=`` is refused here.
  """
  try:
    record = container.parse_json(metadata.get("model", ""), "metadata 'model'")
    extra = container.parse_json(metadata.get("extra", "{}"), "metadata 'extra'")
    if not isinstance(record, dict) or set(record) != {"spec", "image_shape"}:
      raise ValueError("metadata 'model' must hold exactly spec and image_shape")
    if not isinstance(extra, dict):
      raise ValueError("metadata 'extra' is not an object")
    spec = ModelSpec.from_dict(record["spec"])
    image_shape = check_image_shape(record["image_shape"])
  except (ValueError, TypeError) as e:
    raise PackedFormatError(f"{path}: corrupt model spec ({_one_line(e)}).") from None
  if spec.policy.packed:
    raise PackedFormatError(f"{path}: corrupt model spec (the policy is the packed form {spec.policy.quantizer!r}).")
  try:
    spec = spec.bind(model)
  except ValueError as e:
    raise PackedFormatError(f"{path}: {_one_line(e)}") from None
  try:
    spec.check()
  except ValueError as e:
    raise PackedFormatError(f"{path}: cannot build the model the file names: {_one_line(e)}") from None
  return spec, image_shape, extra


def _build_abstract(spec: ModelSpec, image_shape, path, **overrides):
  """``spec``'s model (``packed=True``: the inference form; ``policy``: another policy) and its variables'
  shapes and dtypes (traced, nothing allocated)."""
  policy = overrides.pop("policy", None)
  if policy is not None:
    spec = dataclasses.replace(spec, policy=policy)
  try:
    model = spec.build(**overrides)
    x = example_input(model, image_shape)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  except Exception as e:  # options the constructor rejects, shapes it cannot take: the file's model is not buildable
    raise PackedFormatError(f"{path}: cannot build the model the file names ({spec.arch!r:.80}): "
                            f"{_one_line(e)}") from None
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(nn.unbox(dict(abstract))).items()}
  return model, flat


def _list(names, limit: int = 8) -> str:
  names = sorted(names)
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_entries(want: Mapping[str, Any], entries: Mapping[str, container.TensorEntry], path) -> None:
  """The header's tensors are exactly the model's variables: names, shapes, dtypes (before any is read)."""
  problems = []
  missing, unexpected = set(want) - set(entries), set(entries) - set(want)
  if missing:
    problems.append(f"missing tensors: {_list(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_list(repr(n)[:80] for n in unexpected)}")
  mismatched = [f"{k}: {entries[k].dtype}{list(entries[k].shape)}, expected "
                f"{container.dtype_code(want[k].dtype)}{list(want[k].shape)}"
                for k in sorted(set(want) & set(entries))
                if entries[k].shape != tuple(want[k].shape) or entries[k].dtype != container.dtype_code(want[k].dtype)]
  if mismatched:
    problems.append(f"shape or dtype mismatches: {'; '.join(mismatched[:8])}")
  if problems:
    raise PackedFormatError(f"{path}: the tensors do not match the model it names: " + "; ".join(problems))


def check_values(tree: Mapping, path) -> None:
  """Valid 2-bit codes (never the pattern ``11``), finite floats."""
  for leaf_path, value in leaves(tree):
    name, array = "/".join(leaf_path), np.asarray(value)
    if name.endswith("/codes") and array.dtype == np.uint8:
      if ((array & (array >> 1)) & 0x55).any():
        raise PackedFormatError(f"{path}: {name}: the invalid 2-bit pattern 11: the file is corrupt.")
    elif jnp.issubdtype(array.dtype, jnp.inexact) and not np.isfinite(array.astype(np.float64)).all():
      raise PackedFormatError(f"{path}: {name} holds non-finite values.")


def load_packed(path: str | os.PathLike, *, model: ModelArg = None, packed: bool = False):
  """Loads a packed file for inference.

  Returns ``(model, variables, header)``: ``model.apply(variables, images, train=False)``
  gives the trained model's evaluation logits.

  Loading never imports or calls anything the file names. The file's model is
  built from its :class:`~tgq_jax.models.ModelSpec`: a registered architecture
  (the zoo, or one the caller registered in code with :func:`tgq_jax.models.register`),
  or a user's own module, only when the caller passes its constructor as ``model``.
  Any other name is a :class:`PackedFormatError` before anything else happens.

  Args:
    path: the ``.safetensors`` file.
    model: a user's Linen module constructor (its :func:`tgq_jax.models.model_name`
      must be the file's arch, as :meth:`ModelSpec.for_model` records it), or a mapping
      ``{arch: constructor}`` of the user models this call may build (an allow-list);
      None: registered architectures only.
    packed: False: the model is the full-precision twin of the exported model
      (the spec with quantizer "fp"), its kernels the dequantized ternary kernels
      (``scale * q``, the values the trained model computes with): logits equal
      the trained model's exactly, at full FP32 size in memory. True: the
      packed inference model (``spec.build(packed=True)``): its variables
      hold the 2-bit codes (4 per byte) and scales, and each kernel is rebuilt
      inside the forward pass, layer by layer (on GPU/TPU, dense layers multiply
      by the codes directly, with the Pallas ternary kernel); only the packed
      bytes stay resident.

  ``header`` holds ``spec`` (``ModelSpec.to_dict()``), ``image_shape``, ``format``,
  ``format_version``, ``tgq_jax_version`` and the extra facts recorded at export
  (``dataset``, ``test_accuracy``, ...).

  Raises:
    PackedFormatError: one line: the file is truncated or corrupt (any changed byte),
      of another format version, names a model this call may not build, or holds
      other tensors (names, dtypes, shapes) than its model has.
    OSError: the file cannot be read (it does not exist, permissions).
  """
  blob = _read_bytes(path)
  metadata, entries = container.read_header(blob, path)
  spec, image_shape, extra = spec_of(metadata, model, path)
  packed_model, want = _build_abstract(spec, image_shape, path, packed=True)
  check_entries(want, entries, path)
  tree: dict = {}
  for name, array in container.read_tensors(blob, path).items():
    set_path(tree, name.split("/"), array)
  check_values(tree, path)
  header = {**extra, "format": "safetensors", "format_version": container.FORMAT_VERSION,
            "tgq_jax_version": metadata.get("tgq_jax_version"), "spec": spec.to_dict(),
            "image_shape": list(image_shape)}
  if packed:
    return packed_model, jax.tree.map(jnp.asarray, tree), header
  fp_model, fp_want = _build_abstract(spec, image_shape, path, policy=dataclasses.replace(spec.policy, quantizer="fp"))
  return fp_model, _dequantized(packed_model, fp_want, tree, image_shape), header


def _dequantized(packed_model, fp_want: Mapping[str, Any], tree: Mapping, image_shape) -> dict:
  """The full-precision twin's variables: each ternary layer's kernel rebuilt from its codes.

  The scale (and neg_scale) has the quantizer's statistic shape, over the kernel's
  output-feature axes (:func:`tgq_jax.core.ternarize.channel_axes`: the last for Dense
  and Conv, ``heads x head_dim`` of an attention projection ...): it is
  broadcast along the other axes.
  """
  x = example_input(packed_model, image_shape)
  flat = {"/".join(k): v for k, v in leaves(tree)}
  for layer_path, quantizer in quantized_layers(packed_model, x, train=False).items():
    if not quantizer.packed:
      continue
    prefix = "/".join(("params", *layer_path))
    codes, scale = flat.pop(f"{prefix}/codes"), flat.pop(f"{prefix}/scale")
    neg = flat.pop(f"{prefix}/neg_scale", scale)
    name = next((f"{prefix}/{key}" for key in KERNEL_KEYS if f"{prefix}/{key}" in fp_want), f"{prefix}/kernel")
    kernel = fp_want[name]
    shape = tuple(kernel.shape)
    axes = channel_axes(len(shape), quantizer.per_channel)
    keep = tuple(shape[i] if i in axes else 1 for i in range(len(shape)))
    scale, neg = (jnp.reshape(jnp.asarray(s), keep) for s in (scale, neg))
    flat[name] = dequantize(TernaryParts(jnp.asarray(unpack_planar(codes, shape)), scale, neg,
                                                       None, None, None), kernel.dtype)
  out: dict = {}
  for name, value in flat.items():
    set_path(out, name.split("/"), jnp.asarray(value))
  return out
