"""A small CNN for 28x28 images that trains in a couple of minutes on 2 CPU cores."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tgq_jax.models.common import BatchNorm, output_dtype
from tgq_jax.models.pooling import max_pool


class SmallCNN(nn.Module):
  """conv-BN-ReLU blocks with 2x2 max-pooling between stages, then a linear classifier."""

  num_classes: int
  widths: Sequence[int] = (16, 32, 64, 128)
  dtype: Any = jnp.float32
  conv: Any = nn.Conv  # injected conv constructor (flax examples' pattern)
  bn_axis_name: str | None = None  # BatchNorm statistics over this mapped axis (training mode only)
  bn_unbiased_running_var: bool = False  # torch's running variance (see tgq_jax.frontends.linen_layers.BatchNorm)

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(self.conv, kernel_size=(3, 3), use_bias=False, dtype=self.dtype)
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.9, dtype=self.dtype,
                             axis_name=self.bn_axis_name, unbiased_running_var=self.bn_unbiased_running_var)
    x = x.astype(self.dtype)
    for i, width in enumerate(self.widths):
      x = conv(width, name=f"conv{i}")(x)
      x = nn.relu(norm(name=f"bn{i}")(x))
      if i < len(self.widths) - 1:
        x = max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(output_dtype(self.dtype))
