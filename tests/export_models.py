"""User-written Linen models for the export tests, importable as ``"export_models:<Name>"``.

They are plain ``flax.linen`` (no tgq_jax layer): :func:`tgq_jax.ternarize_model`
quantizes them, and a :class:`tgq_jax.models.ModelSpec` names them by import path,
as a user's own model would be. ``tests/`` is on ``sys.path`` under pytest (the
directory of ``conftest.py``), as for ``trainer_helpers``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class TinyNet(nn.Module):
  """conv (stride 2) -> BatchNorm -> tokens -> self-attention -> LayerNorm -> MLP -> mean -> head.

  Quantized kernels: ``stem`` (Conv), ``attn/query|key|value`` (DenseGeneral,
  ``(in, heads, head_dim)``: per-channel statistics over ``heads x head_dim``),
  ``attn/out`` (DenseGeneral, ``(heads, head_dim, out)``), ``mlp`` and ``head`` (Dense).
  """

  num_classes: int
  features: int = 8
  heads: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (3, 3), strides=(2, 2), dtype=self.dtype, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name="bn")(x))
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    tokens = tokens + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name="attn")(tokens)
    tokens = nn.LayerNorm(dtype=self.dtype, name="ln")(tokens)
    y = nn.gelu(nn.Dense(2 * self.features, dtype=self.dtype, name="mlp")(tokens))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(jnp.mean(y, axis=1))


class ConvHead(nn.Module):
  """conv -> relu -> mean-pool -> dense, no BatchNorm: the smallest model with two quantized kernels."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), dtype=self.dtype, name="conv")(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class TokenNet(nn.Module):
  """token embedding -> dense -> relu -> dense over the mean: a ternary ``Embed`` under
  ``QuantPolicy(embeddings=True)``. The export traces models on float inputs, so the token ids
  come as floats holding integers (``image_shape`` = ``(length,)``)."""

  num_classes: int
  vocab: int = 11
  features: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Embed(self.vocab, self.features, name="embed")(x.astype(jnp.int32))
    h = nn.relu(nn.Dense(2 * self.features, dtype=self.dtype, name="mid")(h))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(jnp.mean(h, axis=1))
