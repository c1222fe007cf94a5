"""Vision Transformer (Dosovitskiy et al. 2021) in plain ``flax.linen`` layers.

The structure is the paper's / timm's ``vit_small_patch16_224``:

* **patch embedding**: a ``p x p`` convolution with stride ``p`` and VALID
  padding (``embedding``), i.e. a linear projection of each non-overlapping
  ``p x p`` patch to ``hidden_size`` features; ``N = (H / p) * (W / p)`` tokens;
* a learned **class token** ``cls`` ``(1, 1, hidden_size)`` prepended to them;
* learned **position embeddings** ``pos_embedding`` ``(1, N + 1, hidden_size)``
  added to the ``N + 1`` tokens, then dropout;
* ``depth`` **pre-LN encoder blocks** ``encoderblock_{i}``::

      x = x + dropout(attn(norm1(x)))                          # multi-head self-attention
      x = x + dropout(mlp_out(dropout(gelu(mlp_in(norm2(x))))))

  with ``attn`` a :class:`flax.linen.MultiHeadDotProductAttention` (its
  ``query``/``key``/``value``/``out`` projections are
  :class:`flax.linen.DenseGeneral` layers), ``mlp_in``/``mlp_out``
  :class:`flax.linen.Dense` layers and GELU the exact (erf) one, as timm;
* a final LayerNorm ``encoder_norm``, the class token's output, a dense
  classifier ``head``.

Every layer is a plain flax one: the model is full precision as written, and a
ternary model is obtained by intercepting its ``Conv`` / ``Dense`` /
``DenseGeneral`` calls. Call order is what first/last layer switches go by:
the patch embedding is the first kernel layer called and ``head`` the last.

LayerNorm epsilon is 1e-6 (timm / the official JAX code). Initialization
follows the official JAX code: Xavier-uniform kernels for the attention and MLP
layers (MLP biases ~ N(0, 1e-6)), LeCun-normal for the patch embedding, a zero
class token, position embeddings ~ N(0, 0.02). The head keeps flax's default
LeCun-normal kernel and zero bias rather than the official all-zero kernel: a
constant kernel is a degenerate input for ternary quantizers (zero spread, no
weight beyond any threshold).

Module paths (``model.init(...)["params"]``) are::

    embedding/{kernel,bias}   cls   pos_embedding
    encoderblock_{i}/norm1/{scale,bias}
    encoderblock_{i}/attn/{query,key,value}/{kernel,bias}   kernel (hidden, heads, hidden // heads)
    encoderblock_{i}/attn/out/{kernel,bias}                  kernel (heads, hidden // heads, hidden)
    encoderblock_{i}/norm2/{scale,bias}
    encoderblock_{i}/mlp_in/{kernel,bias}   encoderblock_{i}/mlp_out/{kernel,bias}
    encoder_norm/{scale,bias}   head/{kernel,bias}

Configurations (:data:`VIT_CONFIGS`): ``vit_tiny`` for 28x28x1 images
(Fashion-MNIST) and ``vit_s16`` (ViT-S/16: 22,050,664 parameters at 1000
classes on 224x224 images, timm's count).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["VIT_CONFIGS", "EncoderBlock", "ViT"]

_LN_EPSILON = 1e-6  # timm / the official JAX code (flax's default is 1e-5)

VIT_CONFIGS: dict[str, dict[str, Any]] = {
  # Fashion-MNIST 28x28x1: 7x7 patches -> 4 x 4 = 16 patches + the class token = 17 tokens; sized so a
  # ternary (sequential-update) epoch takes minutes on 2 CPU cores (4x4 patches cost ~4x more).
  "vit_tiny": {"patch_size": 7, "hidden_size": 128, "depth": 6, "num_heads": 4, "mlp_dim": 512},
  # ViT-S/16 (timm's vit_small_patch16_224): 224x224 -> 14 x 14 = 196 patches + the class token.
  "vit_s16": {"patch_size": 16, "hidden_size": 384, "depth": 12, "num_heads": 6, "mlp_dim": 1536},
}


def _low_precision(dtype: Any) -> bool:
  """True for 16-bit float dtypes (bfloat16, float16), whose softmax runs in float32."""
  return jnp.dtype(dtype).itemsize < 4


class EncoderBlock(nn.Module):
  """One pre-LN Transformer encoder block on ``(batch, tokens, hidden_size)``.

  Attributes:
    num_heads: attention heads; ``hidden_size`` (the input's last axis) must be
      divisible by it.
    mlp_dim: hidden width of the MLP.
    dropout_rate: dropout after the attention, after the GELU and after ``mlp_out``.
    attention_dropout_rate: dropout on the attention weights.
    dtype: computation dtype; parameters stay float32.
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = x.shape[-1]
    deterministic = not train
    xavier = nn.initializers.xavier_uniform()

    y = nn.LayerNorm(epsilon=_LN_EPSILON, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads, qkv_features=hidden, dropout_rate=self.attention_dropout_rate,
      deterministic=deterministic, dtype=self.dtype, kernel_init=xavier,
      # float32 softmax for bfloat16/float16; float64 must not be narrowed to float32.
      force_fp32_for_softmax=_low_precision(self.dtype), name="attn")(y)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    x = x + y

    y = nn.LayerNorm(epsilon=_LN_EPSILON, dtype=self.dtype, name="norm2")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=xavier,
                 bias_init=nn.initializers.normal(stddev=1e-6), name="mlp_in")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    y = nn.Dense(hidden, dtype=self.dtype, kernel_init=xavier,
                 bias_init=nn.initializers.normal(stddev=1e-6), name="mlp_out")(y)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    return x + y


class ViT(nn.Module):
  """Vision Transformer classifier on NHWC images (see the module docstring).

  The image height and width must be multiples of ``patch_size``; the number
  of position embeddings is fixed at initialization by the image size
  (``(H / p) * (W / p) + 1``), so later calls need the same size.

  Attributes:
    num_classes: size of the classifier.
    patch_size: side ``p`` of the square patches (and of the embedding conv's
      kernel and stride).
    hidden_size: token width ``d``; divisible by ``num_heads``.
    depth: number of encoder blocks.
    num_heads: attention heads per block (head width ``d / num_heads``).
    mlp_dim: hidden width of each block's MLP.
    dropout_rate: dropout after the position embeddings and in every block
      (after the attention, after the GELU, after ``mlp_out``).
    attention_dropout_rate: dropout on the attention weights.
    dtype: computation dtype (``jnp.bfloat16`` for mixed precision); parameters
      stay float32. Logits are ``jnp.promote_types(dtype, jnp.float32)``:
      float32 for bfloat16/float32 models, float64 for float64 ones (under
      ``jax_enable_x64``).

  Dropout draws from the ``"dropout"`` rng stream, and only when ``train`` is
  True and the rate is positive: evaluation (and training with both rates 0)
  needs no rng.
  """

  num_classes: int
  patch_size: int = 16
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Returns ``(batch, num_classes)`` logits for ``(batch, H, W, C)`` images."""
    p = self.patch_size
    if x.ndim != 4:
      raise ValueError(f"ViT expects NHWC images, got shape {x.shape}.")
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of patch_size={p}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}.")

    x = x.astype(self.dtype)
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embedding")(x)
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)

    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, d)), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, h * w + 1, d))
    x = x + pos.astype(self.dtype)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

    for i in range(self.depth):
      x = EncoderBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                       attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                       name=f"encoderblock_{i}")(x, train=train)

    x = nn.LayerNorm(epsilon=_LN_EPSILON, dtype=self.dtype, name="encoder_norm")(x)
    x = x[:, 0]  # the class token
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))
