"""A decoder-only language model in the Llama layout, in plain ``flax.linen`` layers (one readable file).

The structure is Llama's (Touvron et al. 2023), as llama.cpp's ``llama`` architecture computes it:

* a token embedding ``embed`` (``nn.Embed``, ``vocab_size x width``);
* ``num_layers`` pre-norm blocks ``layers_{i}``::

      x = x + attn(attn_norm(x))      # causal self-attention, rotary positions, no biases
      x = x + mlp(mlp_norm(x))        # SwiGLU: down(silu(gate(x)) * up(x))

  ``attn_norm``/``mlp_norm`` are RMSNorm (epsilon :data:`RMS_EPSILON`); the
  attention's ``q``/``k``/``v``/``o`` and the MLP's ``gate``/``up``/``down``
  are bias-free ``nn.Dense`` layers; ``num_kv_heads < num_heads`` shares each
  key/value head between ``num_heads / num_kv_heads`` query heads
  (grouped-query attention);
* a final RMSNorm ``norm`` and an untied output head ``head`` (``width x vocab_size``).

Rotary embeddings rotate *adjacent pairs* of each head's features,
``(x[2i], x[2i+1])`` by the angle ``pos * theta**(-2i / head_dim)``: Meta's
original Llama code and llama.cpp's ``LLAMA_ROPE_TYPE_NORM``, so the kernels go
to a GGUF file as they are (Hugging Face's checkpoints rotate half-split pairs
and are permuted on conversion; ours need no permutation).

Every projection is a plain ``nn.Dense``: the model is full precision as
written, and :func:`tgq_jax.ternarize_model` (or :func:`tgq_jax.models.create_model`
with a policy) makes the projections ternary by interception. Call order, which
the policy's first/last switches go by: ``embed`` (a candidate only with
``QuantPolicy(embeddings=True)``), then each block's ``q, k, v, o, gate, up,
down``, then ``head``.

Decoding with a key/value cache: :meth:`Llama.init_cache` makes an empty cache
of ``slots`` entries per row (default ``context``); ``model.apply(variables,
tokens, cache=cache, index=i)`` computes the logits of ``tokens`` (``(batch,
n)``) at sequence indices ``i .. i + n - 1``, attending to the cached keys
before them and to each other (causally), and returns ``(logits, new_cache)``.
A prompt is one such call (prefill), each generated token another; the result
equals the full forward pass over the same tokens. Left-padded batches of
prompts pass ``start`` (``(batch,)``): row ``b``'s tokens before ``start[b]``
are padding, never attended to, and its positions count from ``start[b]``.

The cache is a ring: index ``i`` is written to slot ``i % slots``, and the
cache records which index each slot holds (``cache["index"]``, -1 while
empty). A query at index ``i`` sees the keys at indices ``i - slots + 1 .. i``
(itself included). A cache of at least as many slots as tokens never wraps: it
is the plain key/value cache, and cached logits equal the full forward pass.
Once it wraps it is sliding-window attention (Mistral's rolling buffer): the
keys it keeps were computed with the longer past, so past the first block the
logits differ from a full pass over the cropped window (nanoGPT's generation
past the context, which :mod:`tgq_jax.generate` computes as such); with one
block, whose keys depend on their own token only, they are equal (rotary
positions are relative).

Module paths (``model.init(...)["params"]``)::

    embed/embedding                                   (vocab_size, width)
    layers_{i}/attn_norm/scale   layers_{i}/mlp_norm/scale            (width,)
    layers_{i}/attn/{q,k,v,o}/kernel   q: (width, heads*head_dim), k, v: (width, kv_heads*head_dim),
                                       o: (heads*head_dim, width)
    layers_{i}/mlp/{gate,up}/kernel (width, mlp_dim)   layers_{i}/mlp/down/kernel (mlp_dim, width)
    norm/scale (width,)   head/kernel (width, vocab_size)

Configurations (:data:`LLAMA_CONFIGS`): ``llama_baby`` (nanoGPT's CPU "baby"
size: 4 layers, 4 heads, width 128, context 64) and ``llama_256`` (width 256,
every kernel's input a multiple of 256 as llama.cpp's ternary blocks need).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["LLAMA_CONFIGS", "RMS_EPSILON", "ROPE_THETA", "Attention", "Block", "Llama", "MLP", "apply_rope",
           "mlp_width", "num_params", "write_slots"]

RMS_EPSILON = 1e-5  # llama.attention.layer_norm_rms_epsilon of the GGUF export
ROPE_THETA = 10000.0  # llama.rope.freq_base


def mlp_width(width: int, multiple_of: int) -> int:
  """Llama's SwiGLU hidden width: ``8 * width / 3`` (the parameters of a ``4 * width`` two-matrix MLP in three
  matrices) rounded up to a multiple of ``multiple_of``."""
  return multiple_of * math.ceil(8 * width / 3 / multiple_of)


LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
  # nanoGPT's CPU "baby" configuration (4 layers, 4 heads, width 128, context 64), in the Llama layout.
  "llama_baby": {"width": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": mlp_width(128, 32),
                 "context": 64},
  # The study model: width 256; kernel inputs (256, heads*head_dim = 256, mlp_dim = 768) are multiples of 256,
  # the block of llama.cpp's TQ1_0/TQ2_0; two key/value heads for four query heads.
  "llama_256": {"width": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": mlp_width(256, 256),
                "context": 128},
}


def num_params(vocab_size: int, width: int, num_layers: int, num_heads: int, num_kv_heads: int, mlp_dim: int,
               **_: Any) -> int:
  """The parameter count of :class:`Llama` in closed form (full precision; no quantizer leaves)."""
  head_dim = width // num_heads
  attention = width * num_heads * head_dim * 2 + width * num_kv_heads * head_dim * 2  # q, o; k, v
  block = attention + 3 * width * mlp_dim + 2 * width  # + gate, up, down + two norms
  return vocab_size * width + num_layers * block + width + width * vocab_size  # embed, blocks, norm, head


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = ROPE_THETA) -> jax.Array:
  """Rotary position embedding of ``x`` ``(batch, length, heads, head_dim)`` at ``positions`` ``(batch, length)``.

  Rotates each adjacent pair ``(x[..., 2i], x[..., 2i+1])`` by ``positions * theta**(-2i / head_dim)``
  (Meta's Llama, llama.cpp's NORM rope type). Computed in float32, returned in ``x.dtype``.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head width, got {head_dim}.")
  freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # (head_dim / 2,)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # (batch, length, 1, head_dim / 2)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], head_dim // 2, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def _dense(features: int, name: str, dtype: Any, std: float) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, kernel_init=nn.initializers.normal(stddev=std), name=name)


def write_slots(buffer: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
  """``buffer`` ``(batch, slots_total, ...)`` with ``new``'s last ``len(slots)`` entries along axis 1 written at
  ``slots`` (distinct slot numbers)."""
  m = slots.shape[0]
  new = new[:, new.shape[1] - m:].astype(buffer.dtype)
  if m == 1:  # one token (decoding): an in-place dynamic update
    return jax.lax.dynamic_update_slice_in_dim(buffer, new, slots[0], axis=1)
  return buffer.at[:, slots].set(new, unique_indices=True)


class Attention(nn.Module):
  """Causal multi-head self-attention with rotary positions and grouped key/value heads (no biases).

  Called as ``(x, positions, key_mask, cache, slots)``: ``x`` ``(batch, n, width)``; ``positions``
  ``(batch, n)`` the rotary positions of ``x``'s tokens; ``cache`` None (the keys are ``x``'s own) or
  ``{"k", "v"}`` of shape ``(batch, cache_slots, kv_heads, head_dim)``: the keys attended to are then the
  cache's, followed by ``x``'s own; ``key_mask`` ``(batch, n, keys)`` which keys each query sees (cache
  slots first); ``slots`` (with a cache) ``(m,)`` the slots that ``x``'s last ``m`` keys and values are
  written to. Returns ``(y, new_cache)``.
  """

  num_heads: int
  num_kv_heads: int
  dtype: Any = jnp.float32
  init_std: float = 0.02
  out_std: float = 0.02

  @nn.compact
  def __call__(self, x, positions, key_mask, cache=None, slots=None):
    batch, n, width = x.shape
    if width % self.num_heads or self.num_heads % self.num_kv_heads:
      raise ValueError(f"width {width} must be divisible by num_heads {self.num_heads}, and num_heads by "
                       f"num_kv_heads {self.num_kv_heads}.")
    head_dim = width // self.num_heads
    q = _dense(self.num_heads * head_dim, "q", self.dtype, self.init_std)(x)
    k = _dense(self.num_kv_heads * head_dim, "k", self.dtype, self.init_std)(x)
    v = _dense(self.num_kv_heads * head_dim, "v", self.dtype, self.init_std)(x)
    q = apply_rope(q.reshape(batch, n, self.num_heads, head_dim), positions)
    k = apply_rope(k.reshape(batch, n, self.num_kv_heads, head_dim), positions)
    v = v.reshape(batch, n, self.num_kv_heads, head_dim)
    # The cache's keys and the new ones are scored separately and the (small) scores joined: joining
    # the keys themselves would copy the whole cache at every decoding step.
    keys, values = ([k], [v]) if cache is None else ([cache["k"], k], [cache["v"], v])
    # Grouped-query attention: query head h reads key/value head h // (num_heads / num_kv_heads).
    group = self.num_heads // self.num_kv_heads
    q = q.reshape(batch, n, self.num_kv_heads, group, head_dim)
    scores = [jnp.einsum("bqhgd,bkhd->bhgqk", q, kk.astype(q.dtype), preferred_element_type=jnp.float32)
              for kk in keys]
    scores = (scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1)) / math.sqrt(head_dim)
    scores = jnp.where(key_mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    splits = [vv.shape[1] for vv in values][:-1]
    parts = jnp.split(weights, splits, axis=-1) if splits else [weights]
    y = sum(jnp.einsum("bhgqk,bkhd->bqhgd", w, vv.astype(self.dtype)) for w, vv in zip(parts, values))
    if cache is not None:
      cache = {"k": write_slots(cache["k"], k, slots), "v": write_slots(cache["v"], v, slots)}
    return _dense(width, "o", self.dtype, self.out_std)(y.reshape(batch, n, width)), cache


class MLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``, bias-free."""

  mlp_dim: int
  dtype: Any = jnp.float32
  init_std: float = 0.02
  out_std: float = 0.02

  @nn.compact
  def __call__(self, x):
    gate = _dense(self.mlp_dim, "gate", self.dtype, self.init_std)(x)
    up = _dense(self.mlp_dim, "up", self.dtype, self.init_std)(x)
    return _dense(x.shape[-1], "down", self.dtype, self.out_std)(nn.silu(gate) * up)


class Block(nn.Module):
  """One pre-norm decoder block (see the module docstring); returns ``(x, new_cache)``."""

  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  out_std: float = 0.02

  @nn.compact
  def __call__(self, x, positions, key_mask, cache=None, slots=None):
    h = nn.RMSNorm(epsilon=RMS_EPSILON, dtype=self.dtype, name="attn_norm")(x)
    h, cache = Attention(self.num_heads, self.num_kv_heads, self.dtype, out_std=self.out_std, name="attn")(
      h, positions, key_mask, cache, slots)
    x = x + h
    h = nn.RMSNorm(epsilon=RMS_EPSILON, dtype=self.dtype, name="mlp_norm")(x)
    return x + MLP(self.mlp_dim, self.dtype, out_std=self.out_std, name="mlp")(h), cache


class Llama(nn.Module):
  """The decoder LM (see the module docstring). ``num_classes`` is the vocabulary size (the zoo's name for the
  output width), so :func:`tgq_jax.models.create_model` builds it like any other architecture.

  Attributes:
    num_classes: vocabulary size.
    width: model width ``d``; divisible by ``num_heads``, head width ``d / num_heads`` even.
    num_layers: decoder blocks.
    num_heads: query heads per block.
    num_kv_heads: key/value heads (divides ``num_heads``; fewer is grouped-query attention).
    mlp_dim: SwiGLU hidden width.
    context: the longest sequence the model is trained on; also the largest cache
      :meth:`init_cache` makes by default.
    dtype: computation dtype; parameters stay float32; logits are float32 (float64 for float64).

  Initialization: N(0, 0.02) for the embedding and every kernel, the output projections ``o`` and
  ``down`` at ``0.02 / sqrt(2 * num_layers)`` (GPT-2's residual scaling, as nanoGPT), norms at 1.
  """

  num_classes: int
  width: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  mlp_dim: int = 352
  context: int = 64
  dtype: Any = jnp.float32

  input_dtype = jnp.int32  # token ids (not a field): what tgq_jax.models.example_input traces it with

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def init_cache(self, batch: int, slots: int | None = None, dtype: Any = None) -> dict[str, Any]:
    """An empty key/value cache of ``slots`` entries (default ``context``) for ``batch`` sequences.

    ``{"index": int32 (slots,), "layers": [{"k", "v"}, ...]}``: the sequence index each slot holds (-1:
    empty; shared by the rows, which a left-padded batch aligns) and each block's keys and values
    ``(batch, slots, num_kv_heads, head_dim)``. A ring (see the module docstring): a query sees the last
    ``slots`` tokens, so a cache of ``context`` slots generates past the context as nanoGPT does.
    """
    length = self.context if slots is None else slots
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
      raise ValueError(f"a key/value cache needs a positive number of slots, got {length!r}.")
    shape = (batch, length, self.num_kv_heads, self.head_dim)
    dtype = self.dtype if dtype is None else dtype
    return {"index": jnp.full((length,), -1, jnp.int32),
            "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(self.num_layers)]}

  @nn.compact
  def __call__(self, tokens, train: bool = False, *, cache=None, index=None, start=None):
    """Logits ``(batch, n, vocab)`` of ``tokens`` ``(batch, n)`` (int); with ``cache``: ``(logits, new_cache)``.

    ``train`` is accepted for the trainer's uniform call (the model has no dropout or batch statistics).
    ``index`` (with ``cache``): the sequence index of ``tokens[:, 0]`` (an int or int scalar array);
    ``start`` ``(batch,)``: left padding per row (see the module docstring).
    """
    del train
    if tokens.ndim != 2:
      raise ValueError(f"Llama takes token ids of shape (batch, length), got shape {tokens.shape}.")
    if self.width % self.num_heads or (self.width // self.num_heads) % 2:
      raise ValueError(f"width {self.width} must be divisible by num_heads {self.num_heads} into an even head width.")
    batch, n = tokens.shape
    index = jnp.zeros((), jnp.int32) if index is None else jnp.asarray(index, jnp.int32)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    query_idx = index + jnp.arange(n, dtype=jnp.int32)  # (n,) sequence indices of these tokens
    positions = query_idx[None, :] - start[:, None]  # (batch, n)

    def visible(key_idx):  # (batch, n, keys): causal, and never a padding token of the row
      return (key_idx[None, None, :] <= query_idx[None, :, None]) & (key_idx[None, None, :] >= start[:, None, None])

    if cache is None:
      key_mask, slots, layer_caches = visible(query_idx), None, [None] * self.num_layers
    else:
      held = cache["index"]  # (cache_slots,)
      window = query_idx[None, :, None] - held.shape[0]  # a key at this index or before has left the ring
      # Cached keys at or after `index` are stale (these tokens replace them); -1 is an empty slot.
      cached = visible(held) & (held[None, None, :] > window) & ((held >= 0) & (held < index))[None, None, :]
      key_mask = jnp.concatenate([cached, visible(query_idx) & (query_idx[None, None, :] > window)], axis=-1)
      written = query_idx[max(n - held.shape[0], 0):]  # a call of more tokens than slots keeps the last ones
      slots = written % held.shape[0]
      new_index = held.at[slots].set(written, unique_indices=True)
      layer_caches = cache["layers"]

    x = nn.Embed(self.num_classes, self.width, embedding_init=nn.initializers.normal(stddev=0.02),
                 name="embed")(tokens).astype(self.dtype)
    out_std = 0.02 / math.sqrt(2 * self.num_layers)
    new_layers = []
    for i in range(self.num_layers):
      x, layer_cache = Block(self.num_heads, self.num_kv_heads, self.mlp_dim, self.dtype, out_std=out_std,
                             name=f"layers_{i}")(x, positions, key_mask, layer_caches[i], slots)
      new_layers.append(layer_cache)
    x = nn.RMSNorm(epsilon=RMS_EPSILON, dtype=self.dtype, name="norm")(x)
    logits = _dense(self.num_classes, "head", self.dtype, 0.02)(x)
    logits = logits.astype(jnp.promote_types(self.dtype, jnp.float32))
    return logits if cache is None else (logits, {"index": new_index, "layers": new_layers})
