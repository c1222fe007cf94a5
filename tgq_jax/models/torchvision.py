"""torchvision ImageNet checkpoints for ``resnet18/34/50``.

The paper fine-tunes ternary ImageNet ResNets from full-precision
checkpoints. The flow here:

1. Once, with torch installed, dump a torchvision state dict to ``.npz`` (so
   that nothing else needs torch)::

     import numpy as np, torchvision
     sd = torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()
     np.savez("resnet18.npz", **{k: v.numpy() for k, v in sd.items()})

2. ``fp = load_torchvision_weights("resnet18.npz", "resnet18")``: the
   variables of ``create_model("resnet18", 1000, quant=QuantPolicy("fp"))``.
3. ``variables = tgq_jax.frontends.linen_layers.init_ternary_from_fp(create_model("resnet18", 1000),
   fp, (224, 224, 3))``: every weight copied, quantizer leaves (TGA ``delta``,
   TTQ scales) initialized from the loaded kernels (``delta = 0.05 max|w|``).

Name mapping (see :mod:`tgq_jax.models.resnet`): torchvision ``layer{i}.{j}``
is flax ``layer{i}_{j}``, ``downsample.0`` / ``downsample.1`` is
``downsample_conv`` / ``downsample_bn``; conv weights go OIHW -> HWIO, linear
weights (out, in) -> (in, out), BN ``weight``/``bias`` -> ``scale``/``bias``,
``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``.
``num_batches_tracked`` has no flax counterpart and is ignored.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tgq_jax.core.trees import as_leaf, mismatch_problems

ARCHS = ("resnet18", "resnet34", "resnet50")

_NPZ_HOWTO = (
  "Convert it once, where torch is installed, with:\n"
  "  import numpy as np, torchvision\n"
  "  sd = torchvision.models.resnet18(weights='IMAGENET1K_V1').state_dict()\n"
  "  np.savez('resnet18.npz', **{k: v.numpy() for k, v in sd.items()})")

# (flax collection, flax leaf) -> torchvision tensor name.
_LEAF_NAMES = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIX = "num_batches_tracked"  # a BN step counter; flax's BatchNorm has none


def _torch_module_name(path: tuple[str, ...]) -> str:
  """Flax module path -> torchvision module name (``layer2_0/downsample_conv`` -> ``layer2.0.downsample.0``)."""
  parts = []
  for name in path:
    block = re.fullmatch(r"(layer\d+)_(\d+)", name)
    if block:
      parts += [block[1], block[2]]
    elif name == "downsample_conv":
      parts += ["downsample", "0"]
    elif name == "downsample_bn":
      parts += ["downsample", "1"]
    else:
      parts.append(name)
  return ".".join(parts)


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a flax leaf: HWIO -> OIHW, (in, out) -> (out, in), vectors unchanged."""
  if len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  if len(shape) == 2:
    return tuple(reversed(shape))
  return tuple(shape)


def _to_flax(value: np.ndarray) -> np.ndarray:
  """The inverse of :func:`_to_torch_shape` on values."""
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:
    return value.T
  return value


@functools.lru_cache(maxsize=8)
def _fp_structure(arch: str, num_classes: int, in_channels: int) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flattened abstract variables of the FP ``arch`` (traced only; cached, as tracing ResNet-50 costs seconds)."""
  # Imported here: tgq_jax.models imports this module, so a top-level import would be a cycle.
  from tgq_jax.models import create_model
  from tgq_jax.core.policy import QuantPolicy

  model = create_model(arch, num_classes, quant=QuantPolicy("fp"))
  # Parameter shapes do not depend on the spatial size; 32x32 keeps the trace cheap.
  x = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return traverse_util.flatten_dict(nn.unbox(dict(abstract)))


def convert_state_dict(state_dict: Mapping[str, Any], arch: str) -> dict:
  """A torchvision ResNet state dict -> flax variables of ``create_model(arch, n, quant=QuantPolicy("fp"))``.

  Args:
    state_dict: torchvision tensor name -> array (numpy, or anything
      ``np.asarray`` takes, e.g. CPU torch tensors).
    arch: "resnet18", "resnet34" or "resnet50".

  Returns:
    ``{"params": ..., "batch_stats": ...}`` as nested dicts of float32 jax
    arrays (float64 for a float64 state dict under ``jax_enable_x64``). The
    number of classes comes from ``fc.weight``, the input channels from
    ``conv1.weight``.

  Raises:
    ValueError: unknown ``arch``, or the state dict does not match it leaf for
      leaf: missing or unexpected keys (``num_batches_tracked`` aside), or
      mis-shaped tensors; the message lists all of them.
  """
  if arch not in ARCHS:
    raise ValueError(f"convert_state_dict: unsupported arch {arch!r}; torchvision archs: {', '.join(ARCHS)}.")
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  for key, ndim in (("fc.weight", 2), ("conv1.weight", 4)):
    if key not in state_dict or state_dict[key].ndim != ndim:
      got = "missing" if key not in state_dict else f"shape {state_dict[key].shape}"
      raise ValueError(f"convert_state_dict: {key!r} must be a {ndim}-d tensor of a torchvision {arch}; got {got}.")
  num_classes = state_dict["fc.weight"].shape[0]
  in_channels = state_dict["conv1.weight"].shape[1]
  structure = _fp_structure(arch, num_classes, in_channels)

  # Validate everything before converting anything, and report every problem at once.
  sources, missing, mismatched = {}, [], []
  for path, leaf in structure.items():
    collection, *modules, name = path
    if (collection, name) not in _LEAF_NAMES:
      raise ValueError(f"convert_state_dict: no torchvision counterpart for flax leaf {'/'.join(path)!r}.")
    key = f"{_torch_module_name(tuple(modules))}.{_LEAF_NAMES[collection, name]}"
    sources[path] = key
    if key not in state_dict:
      missing.append(key)
    elif state_dict[key].shape != _to_torch_shape(leaf.shape):
      mismatched.append(f"{key}: got {tuple(state_dict[key].shape)}, expected {_to_torch_shape(leaf.shape)}")
  used = set(sources.values())
  unexpected = [k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIX)]
  problems = mismatch_problems(missing, unexpected, mismatched, "keys", "shape mismatches (torch layout)")
  if problems:
    raise ValueError(f"convert_state_dict: the state dict does not match torchvision {arch} "
                     f"({num_classes} classes):\n  " + "\n  ".join(problems))

  flat = {path: as_leaf(_to_flax(state_dict[sources[path]]), leaf.dtype) for path, leaf in structure.items()}
  return traverse_util.unflatten_dict(flat)


def load_torchvision_weights(path: str | os.PathLike, arch: str) -> dict:
  """Loads a torchvision ResNet checkpoint as flax variables (see :func:`convert_state_dict`).

  ``path`` is a ``.npz`` of the state dict (the module docstring shows how to
  make one), or a ``.pth``/``.pt`` when ``torch`` is importable.
  """
  path = os.fspath(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz":
    with np.load(path) as data:  # allow_pickle stays False: plain arrays only
      state_dict = {k: data[k] for k in data.files}
  elif suffix in (".pth", ".pt"):
    try:
      import torch  # optional: only for reading torch's pickles directly
    except ImportError:
      raise ImportError(f"load_torchvision_weights: reading {path!r} needs torch, which is not installed. "
                        f"Use a .npz of the state dict instead. {_NPZ_HOWTO}") from None
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints often wrap the state dict; torchvision's files are the bare dict.
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
      loaded = loaded["state_dict"]
    state_dict = {k: v.detach().cpu().numpy() for k, v in loaded.items()}
  else:
    raise ValueError(f"load_torchvision_weights: expected a .npz (or .pth/.pt with torch installed), "
                     f"got {path!r}. {_NPZ_HOWTO}")
  return convert_state_dict(state_dict, arch)
