"""Text generation with a key/value cache: :func:`generate` (token ids), :func:`generate_text` (text).

    python -m tgq_jax.generate --model W --prompt "ROMEO:" --max-new-tokens 200 [--temperature 0.8 --top-k 40]

The prompt is computed in one call of the model (prefill), which fills the
key/value cache (:meth:`tgq_jax.models.llama.Llama.init_cache`); each new token
is then one call on that token alone. Prefill and the whole decoding loop (a
``lax.fori_loop``) are one compiled function: it is traced and compiled once
per (model, batch size, padded prompt length, ``max_new_tokens``, ``top_k``),
and generating runs no Python per token. Temperature and seed are arguments of
the compiled function, not part of its key.

Sampling is nanoGPT's: the last logits divided by the temperature, cut to the
``top_k`` largest (ties at the k-th value kept), a categorical draw; temperature
0 is greedy (argmax). The same seed gives the same tokens.

Past the context, each token is conditioned on the last ``context`` tokens
exactly as nanoGPT crops them: a full forward pass over that window, inside the
same compiled loop. A cache cannot do this step: in the cropped window the
oldest token attends to nothing before it, so every key of every block above
the first changes when the window slides (a ring-buffer cache, which keeps the
keys computed with the longer past, is sliding-window attention, another
model; :meth:`~tgq_jax.models.llama.Llama.init_cache` offers it). So tokens
within the context cost one cached step each, and tokens past it one pass
over ``context`` tokens each. A prompt longer than the context is refused.

The model is a language model of the zoo (``create_model("llama_...")``, a
workdir's or an exported file's: see :mod:`tgq_jax.generate_cli`), full
precision, ternary or packed (``load_packed(path, packed=True)``: the 2-bit
codes stay resident and each layer multiplies by them).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tgq_jax.data.text import Vocabulary
from tgq_jax.frontends.linen import TernarizedModel
from tgq_jax.models.llama import Llama

__all__ = ["generate", "generate_text", "language_model", "sample_logits"]


def language_model(model: nn.Module) -> Llama:
  """The :class:`~tgq_jax.models.llama.Llama` that ``model`` is or wraps (a ternarized or packed zoo model).

  Raises:
    ValueError: ``model`` is not a language model (one line naming what it is).
  """
  inner = model
  while isinstance(inner, TernarizedModel):
    inner = inner.module
  if not isinstance(inner, Llama):
    raise ValueError(f"the model is not a language model (a {type(inner).__name__}, not a "
                     "tgq_jax.models.llama.Llama): it cannot generate text.")
  return inner


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int | None) -> jax.Array:
  """One token id per row of ``logits`` ``(batch, vocab)``: greedy where ``temperature == 0``, else a draw
  from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits (None: all)."""
  logits = logits.astype(jnp.float32)
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  greedy = jnp.argmax(logits, axis=-1)
  safe = jnp.where(temperature > 0, temperature, 1.0)
  drawn = jax.random.categorical(key, logits / safe, axis=-1)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k"))
def _generate_compiled(model: nn.Module, variables: Any, tokens: jax.Array, start: jax.Array, key: jax.Array,
                       temperature: jax.Array, *, max_new_tokens: int, top_k: int | None) -> jax.Array:
  """``max_new_tokens`` ids continuing ``tokens`` (left-padded: row ``b``'s prompt starts at ``start[b]``).

  New token ``t`` is predicted from the ``prompt_length + t`` tokens before it: while they fit the
  context, by the key/value cache (prefill, then one cached step per token); past it, by a full pass
  over the last ``context`` of them (nanoGPT's cropping: every key recomputed in the cropped window).
  """
  batch, prompt_length = tokens.shape
  context = language_model(model).context
  seq = jnp.zeros((batch, prompt_length + max_new_tokens), jnp.int32).at[:, :prompt_length].set(tokens)

  def emit(t, logits, seq, key):  # sample new token t from its logits (batch, vocab)
    key, sub = jax.random.split(key)
    token = sample_logits(logits, sub, temperature, top_k)
    return jax.lax.dynamic_update_slice_in_dim(seq, token[:, None], prompt_length + t, axis=1), key

  cache = language_model(model).init_cache(batch, context)
  logits, cache = model.apply(variables, tokens, cache=cache, index=0, start=start)
  seq, key = emit(0, logits[:, -1], seq, key)

  def cached_step(t, carry):
    seq, cache, key = carry
    index = prompt_length + t - 1  # the previous token's
    logits, cache = model.apply(variables, jax.lax.dynamic_slice_in_dim(seq, index, 1, axis=1), cache=cache,
                                index=index, start=start)
    seq, key = emit(t, logits[:, -1], seq, key)
    return seq, cache, key

  cached_end = min(max_new_tokens, context - prompt_length + 1)  # tokens whose past fits the context
  if cached_end > 1:
    seq, _, key = jax.lax.fori_loop(1, cached_end, cached_step, (seq, cache, key))

  def cropped_step(t, carry):
    seq, key = carry
    first = prompt_length + t - context  # the window's first index
    window = jax.lax.dynamic_slice_in_dim(seq, first, context, axis=1)
    logits = model.apply(variables, window, start=jnp.maximum(start - first, 0))
    return emit(t, logits[:, -1], seq, key)

  if cached_end < max_new_tokens:
    seq, _ = jax.lax.fori_loop(cached_end, max_new_tokens, cropped_step, (seq, key))
  return seq[:, prompt_length:]


def _check_options(max_new_tokens: Any, temperature: Any, top_k: Any, seed: Any, vocab_size: int) -> None:
  if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r:.40}.")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not np.isfinite(temperature) \
      or temperature < 0:
    raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r:.40}.")
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool)
                            or not 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k must be None or an integer in [1, {vocab_size}] (the vocabulary), got {top_k!r:.40}.")
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
    raise ValueError(f"seed must be an integer, got {seed!r:.40}.")


def generate(model: nn.Module, variables: Mapping, prompts: Sequence[Sequence[int]] | np.ndarray,
             max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0) -> np.ndarray:
  """Continues each prompt by ``max_new_tokens`` tokens.

  Args:
    model: a language model (:func:`language_model`): ``create_model("llama_...", vocab, ...)``, or a
      workdir's or exported file's (packed or not).
    variables: its variables (``{"params": ...}``).
    prompts: token ids, one sequence per row (lengths may differ: rows are left-padded); each of 1 to
      ``context`` tokens.
    max_new_tokens: tokens to generate per row (may exceed the context: each token is then
      conditioned on the ``context`` tokens before it, by a full pass over them as nanoGPT does).
    temperature: divides the logits before sampling; 0 is greedy (argmax).
    top_k: sample among the ``top_k`` most likely tokens only (None: all).
    seed: the sampling key's seed; the same seed gives the same tokens.

  Returns:
    int32 ``(len(prompts), max_new_tokens)``: the generated ids (the prompts not included).

  Raises:
    ValueError: one line: not a language model, an empty or too long prompt, a token id out of the
      vocabulary, a bad option.
  """
  lm = language_model(model)
  _check_options(max_new_tokens, temperature, top_k, seed, lm.num_classes)
  rows = [np.asarray(p).reshape(-1) if np.ndim(p) else np.asarray([p]) for p in prompts]
  if not rows:
    raise ValueError("generate needs at least one prompt.")
  for i, row in enumerate(rows):
    if row.size == 0:
      raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on.")
    if row.size > lm.context:
      raise ValueError(f"prompt {i} has {row.size} tokens, more than the model's context of {lm.context}.")
    if not np.issubdtype(row.dtype, np.integer) or row.min() < 0 or row.max() >= lm.num_classes:
      raise ValueError(f"prompt {i}: token ids must be integers in [0, {lm.num_classes}).")
  if max_new_tokens == 0:
    return np.zeros((len(rows), 0), np.int32)
  length = max(row.size for row in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  start = np.array([length - row.size for row in rows], np.int32)
  for i, row in enumerate(rows):
    tokens[i, start[i]:] = row
  out = _generate_compiled(model, variables, jnp.asarray(tokens), jnp.asarray(start), jax.random.key(int(seed)),
                           jnp.float32(temperature), max_new_tokens=int(max_new_tokens),
                           top_k=None if top_k is None else int(top_k))
  return np.asarray(out)


def generate_text(model: nn.Module, variables: Mapping, vocabulary: Vocabulary, prompt: str, max_new_tokens: int,
                  *, temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> str:
  """The text that continues ``prompt`` by ``max_new_tokens`` tokens (the prompt not included).

  ``vocabulary`` is the model's (a run's ``config.json`` or an exported file's header); a prompt
  character outside it is a one-line ValueError. Other arguments: :func:`generate`.
  """
  if not isinstance(vocabulary, Vocabulary):
    raise ValueError(f"vocabulary must be a tgq_jax.data.text.Vocabulary, got {type(vocabulary).__name__}.")
  lm = language_model(model)
  if vocabulary.size != lm.num_classes:
    raise ValueError(f"the vocabulary has {vocabulary.size} tokens but the model predicts {lm.num_classes}.")
  ids = vocabulary.encode(prompt)
  out = generate(model, variables, [ids], max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
  return vocabulary.decode(out[0])


if __name__ == "__main__":  # python -m tgq_jax.generate: the command line (tgq_jax.generate_cli)
  import sys

  from tgq_jax.generate_cli import main

  sys.exit(main())
