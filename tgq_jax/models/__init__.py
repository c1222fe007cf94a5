"""The model zoo: one entry point, :func:`create_model`.

Every model is a ``flax.linen`` module called as
``model.apply(variables, images, train=...)`` on NHWC images, with BatchNorm
statistics in the ``batch_stats`` collection (the flax examples' convention).
All conv and dense layers are :class:`~tgq_jax.layers.TernaryConv` /
:class:`~tgq_jax.layers.TernaryDense`; ``ternary_first`` / ``ternary_last``
keep the first conv / the classifier in full precision when False (the paper's
"ff_lf" setting); with ``quantizer="fp"`` the model is its full-precision twin.

torchvision ImageNet checkpoints load through :mod:`tgq_jax.models.torchvision`
(:func:`load_torchvision_weights`, :func:`convert_state_dict`), and
:func:`init_ternary_from_fp` starts a ternary model from its FP twin.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from tgq_jax.models.resnet import BasicBlock, Bottleneck, CifarResNet, ResNet
from tgq_jax.models.small_cnn import SmallCNN
# torchvision.py imports create_model lazily (inside a function), so this is no cycle.
from tgq_jax.layers import init_ternary_from_fp
from tgq_jax.models.torchvision import convert_state_dict, load_torchvision_weights
from tgq_jax.quantizers import get_quantizer, packed_name

# arch name -> (module class, fixed constructor arguments)
_ARCHS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
  "small_cnn": (SmallCNN, {}),
  # ImageNet, torchvision's layout and parameter counts.
  "resnet18": (ResNet, {"stage_sizes": (2, 2, 2, 2), "block_cls": BasicBlock}),
  "resnet34": (ResNet, {"stage_sizes": (3, 4, 6, 3), "block_cls": BasicBlock}),
  "resnet50": (ResNet, {"stage_sizes": (3, 4, 6, 3), "block_cls": Bottleneck}),
  # CIFAR (He et al. 2016), option-A shortcuts; also fine on 28x28x1.
  "resnet20": (CifarResNet, {"depth": 20}),
  "resnet32": (CifarResNet, {"depth": 32}),
  "resnet44": (CifarResNet, {"depth": 44}),
  "resnet56": (CifarResNet, {"depth": 56}),
}


def register(name: str, cls: Callable[..., nn.Module], **fixed: Any) -> None:
  """Adds an architecture to :func:`create_model`.

  ``cls`` takes every :func:`create_model` keyword (``num_classes``,
  ``quantizer``, ``per_channel``, ``ternary_first``, ``ternary_last``,
  ``dtype``, ``bn_axis_name``, ``bn_unbiased_running_var``) plus ``fixed``; a
  model with BatchNorm passes the two ``bn_*`` ones to
  :class:`tgq_jax.layers.BatchNorm` (``axis_name=``, ``unbiased_running_var=``).
  """
  _ARCHS[name] = (cls, fixed)


def archs() -> tuple[str, ...]:
  return tuple(_ARCHS)


def create_model(arch: str, num_classes: int, *, quantizer: str = "tga", per_channel: bool = False,
                 ternary_first: bool = True, ternary_last: bool = True,
                 dtype: Any = jnp.float32, packed: bool = False, bn_axis_name: str | None = None,
                 bn_unbiased_running_var: bool = False) -> nn.Module:
  """Builds ``arch`` with ``num_classes`` outputs.

  Args:
    arch: an architecture name; see :func:`archs`.
    num_classes: size of the classifier.
    quantizer: "tga", "twn", "ttq" or "fp" for every conv and dense layer.
    per_channel: per-output-channel quantizer statistics.
    ternary_first: quantize the first conv too (the paper's default) or keep it FP.
    ternary_last: quantize the classifier too (the paper's default) or keep it FP.
    dtype: computation dtype (``jnp.bfloat16`` for mixed precision); parameters
      and quantizer statistics stay float32. ``jnp.float64`` (under
      ``jax_enable_x64``) computes and returns float64.
    bn_axis_name: BatchNorm statistics in training mode are averaged over this
      mapped axis (``jax.shard_map``/``jax.pmap``): the global batch's
      statistics, whatever the device count. Training-mode calls must then run
      inside the mapping; initialization and evaluation-mode calls work
      anywhere. None (default): each call's own batch.
    bn_unbiased_running_var: torch's running-variance rule
      (:class:`tgq_jax.layers.BatchNorm`); default: flax's biased one.
    packed: the inference form: ternary layers hold 2-bit packed codes and
      scales instead of float kernels (``quantizer`` becomes ``"packed:<quantizer>"``;
      :func:`tgq_jax.export.load_packed` fills its variables).
  """
  if packed and get_quantizer(quantizer, per_channel=per_channel).ternary:
    quantizer = packed_name(quantizer)
  if arch not in _ARCHS:
    raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(sorted(_ARCHS))}.")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  get_quantizer(quantizer, per_channel=per_channel)  # validates name and per-channel support
  cls, fixed = _ARCHS[arch]
  return cls(num_classes=num_classes, quantizer=quantizer, per_channel=per_channel,
             ternary_first=ternary_first, ternary_last=ternary_last, dtype=dtype, bn_axis_name=bn_axis_name,
             bn_unbiased_running_var=bn_unbiased_running_var, **fixed)
