"""ResNets of the paper: the ImageNet ones (torchvision's layout) and the CIFAR ones (He et al. 2016).

ImageNet (``resnet18/34/50``): torchvision's structure and parameter count
(11,689,512 / 21,797,672 / 25,557,032 at 1000 classes), v1.5 bottlenecks
(stride on the 3x3 conv) and PyTorch's explicit paddings, so a torchvision
checkpoint maps leaf for leaf and gives the same outputs. Module names follow
torchvision's state dict: ``conv1``, ``bn1``, ``layer{i}_{j}`` (torchvision's
``layer{i}.{j}``) holding ``conv1``/``bn1``/.../``downsample_conv``/
``downsample_bn`` (torchvision's ``downsample.0``/``downsample.1``), and ``fc``.

CIFAR (``resnet20/32/44/56``): a 3x3 conv with 16 channels, three stages of
``n = (depth - 2) / 6`` basic blocks with 16/32/64 channels, global average
pooling, a dense classifier. Shortcuts are the paper's option A: identity,
subsampled by 2 and zero-padded in channels where the shape changes. It has
no parameters (resnet20 has 269,722 weights at 10 classes, as in the paper's
0.27M) and nothing to ternarize, so every conv and dense layer that exists is
a quantized one. Any input size works (28x28x1 Fashion-MNIST included).

BatchNorm: momentum 0.9 (PyTorch's 0.1), epsilon 1e-5, statistics over the
mapped axis ``bn_axis_name`` when set (the trainer's default).

The models are plain Flax: their convs are ``conv`` (``nn.Conv`` unless
injected, as in flax's examples/imagenet) and the classifier is ``nn.Dense``.
:func:`tgq_jax.models.create_model` makes them ternary by interception
(:func:`tgq_jax.ternarize_model` with a :class:`tgq_jax.QuantPolicy`).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tgq_jax.models.common import BatchNorm, output_dtype
from tgq_jax.models.pooling import max_pool

ModuleDef = Any  # a module constructor (a class or a functools.partial of one)

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
_IMAGENET_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# He et al. 2016 / the common CIFAR code: kaiming_normal_ with fan_in (convs and the classifier).
# The ImageNet classifier keeps flax's default init (lecun normal, zero bias) rather than
# torchvision's uniform one: only the distribution differs, and a checkpoint replaces it anyway.
_CIFAR_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's symmetric ``padding=k // 2``; 'SAME' pads stride-2 convs asymmetrically."""
  return ((k // 2, k // 2), (k // 2, k // 2))


def _conv(conv: ModuleDef, features: int, k: int, stride: int = 1, **kw) -> nn.Module:
  """A k x k conv with PyTorch's symmetric padding ``k // 2``."""
  return conv(features, (k, k), strides=(stride, stride), padding=_pad(k), **kw)


def _factories(model: nn.Module, train: bool, kernel_init) -> tuple[ModuleDef, ModuleDef]:
  """The conv and BatchNorm constructors of ``model``'s blocks (the flax examples' pattern)."""
  conv = functools.partial(model.conv, use_bias=False, dtype=model.dtype, kernel_init=kernel_init)
  norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=model.dtype, axis_name=model.bn_axis_name,
                           unbiased_running_var=model.bn_unbiased_running_var)
  return conv, norm


def _last_norm(norm: ModuleDef, zero_init: bool, name: str) -> nn.Module:
  # zero_init_residual: each residual branch starts as zero, so each block starts as the identity.
  return norm(name=name, scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN; the stride is on the first. ``expansion = 1``.

  ``shortcut`` where the shape changes: "B" a 1x1 conv + BN projection
  (torchvision), "A" parameter-free subsampling and zero channel padding
  (the CIFAR paper).
  """

  features: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = "B"
  zero_init_residual: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name="bn1")(_conv(self.conv, self.features, 3, self.stride, name="conv1")(x)))
    y = _conv(self.conv, self.features, 3, name="conv2")(y)
    y = _last_norm(self.norm, self.zero_init_residual, "bn2")(y)
    return nn.relu(y + _shortcut(self, x, self.features))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (with the stride: ResNet v1.5, as torchvision), 1x1 expand by 4."""

  features: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = "B"
  zero_init_residual: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x):
    out = self.features * self.expansion
    y = nn.relu(self.norm(name="bn1")(_conv(self.conv, self.features, 1, name="conv1")(x)))
    y = nn.relu(self.norm(name="bn2")(_conv(self.conv, self.features, 3, self.stride, name="conv2")(y)))
    y = _last_norm(self.norm, self.zero_init_residual, "bn3")(_conv(self.conv, out, 1, name="conv3")(y))
    return nn.relu(y + _shortcut(self, x, out))


def _shortcut(block: nn.Module, x, out_features: int):
  """The identity, or the block's shortcut where the stride or the width changes.

  Called from inside the block's compact ``__call__``, so the projection's
  modules are the block's submodules (``downsample_conv``, ``downsample_bn``).
  """
  if block.stride == 1 and x.shape[-1] == out_features:
    return x
  if block.shortcut == "A":
    x = x[:, ::block.stride, ::block.stride, :]
    extra = out_features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  if block.shortcut != "B":
    raise ValueError(f"shortcut must be 'A' or 'B', got {block.shortcut!r}.")
  x = _conv(block.conv, out_features, 1, block.stride, name="downsample_conv")(x)
  return block.norm(name="downsample_bn")(x)


class ResNet(nn.Module):
  """ImageNet ResNet (torchvision layout); ``stage_sizes`` blocks of ``block_cls`` per stage.

  ``width`` is the first stage's width (64 in every torchvision model; smaller
  values give cheap test models of the same structure).
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: ModuleDef = BasicBlock
  width: int = 64
  zero_init_residual: bool = False  # torchvision's option, off by default as there
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  bn_axis_name: str | None = None  # BatchNorm statistics over this mapped axis (training mode only)
  bn_unbiased_running_var: bool = False  # torch's running variance (see tgq_jax.frontends.linen_layers.BatchNorm)

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _factories(self, train, _IMAGENET_CONV_INIT)
    x = x.astype(self.dtype)
    x = nn.relu(norm(name="bn1")(_conv(conv, self.width, 7, 2, name="conv1")(x)))
    # Pads with -inf, as PyTorch's MaxPool2d(3, 2, padding=1).
    x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.width * 2**i, stride, conv, norm, shortcut="B",
                           zero_init_residual=self.zero_init_residual, name=f"layer{i + 1}_{j}")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return x.astype(output_dtype(self.dtype))


class CifarResNet(nn.Module):
  """CIFAR ResNet-``depth`` (depth = 6n + 2) with option-A shortcuts; any HxWxC input."""

  num_classes: int
  depth: int = 20
  width: int = 16
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  bn_axis_name: str | None = None  # BatchNorm statistics over this mapped axis (training mode only)
  bn_unbiased_running_var: bool = False  # torch's running variance (see tgq_jax.frontends.linen_layers.BatchNorm)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {self.depth}.")
    n = (self.depth - 2) // 6
    conv, norm = _factories(self, train, _CIFAR_INIT)
    x = x.astype(self.dtype)
    x = nn.relu(norm(name="bn1")(_conv(conv, self.width, 3, name="conv1")(x)))
    for i in range(3):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2**i, stride, conv, norm, shortcut="A",
                       zero_init_residual=self.zero_init_residual, name=f"layer{i + 1}_{j}")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_CIFAR_INIT, name="fc")(x)
    return x.astype(output_dtype(self.dtype))
