"""tgq_jax.generate: cached decoding equals the full forward pass; greedy equals a loop of full passes
(nanoGPT's cropping past the context); seeds; one trace per (shapes, options)."""
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax import QuantPolicy
from tgq_jax.data.text import Vocabulary
from tgq_jax.export import pack_variables
from tgq_jax.generate import generate, generate_text, language_model, sample_logits
from tgq_jax.models import ModelSpec, create_model, register
from tgq_jax.models.llama import Llama

VOCAB = 13
TINY = dict(width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, context=16)
ONE_BLOCK = {**TINY, "num_layers": 1}
register("llama_test_tiny", Llama, **TINY)
register("llama_test_one_block", Llama, **ONE_BLOCK)


def _spec(quantizer: str, arch: str = "llama_test_tiny") -> ModelSpec:
  return ModelSpec(arch, VOCAB, QuantPolicy(quantizer, ternary_last=False))


def _sharpened(variables):
  """Kernels and embeddings x8 (TGA thresholds too, so the codes stay): peaked, varied predictions
  (at N(0, 0.02) initialization every position predicts nearly the same token)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: x if path[-1].key == "scale" else x * 8, variables)


def _model(quantizer: str, packed: bool = False, arch: str = "llama_test_tiny"):
  spec = _spec(quantizer, arch)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the embedding is reported as left full precision
    model = spec.build()
    variables = _sharpened(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32)))
  if not packed:
    return model, variables
  packed_vars = jax.tree.map(jnp.asarray, pack_variables(variables, spec, (TINY["context"],)))
  return spec.build(packed=True), packed_vars


@pytest.fixture(scope="module")
def tga():
  return _model("tga")


def _full(model, variables, tokens):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return np.asarray(model.apply(variables, jnp.asarray(tokens)))


@pytest.mark.parametrize("quantizer,packed", [("fp", False), ("tga", False), ("tga", True)])
def test_cached_logits_equal_the_full_forward_pass_at_every_position(quantizer, packed):
  model, variables = _model(quantizer, packed)
  tokens = np.asarray(jax.random.randint(jax.random.key(0), (2, 14), 0, VOCAB))
  full = _full(model, variables, tokens)
  cache = Llama(VOCAB, **TINY).init_cache(2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    logits, cache = model.apply(variables, tokens[:, :5], cache=cache, index=0)  # prefill
    steps = [logits]
    for i in range(5, 14):
      logits, cache = model.apply(variables, tokens[:, i:i + 1], cache=cache, index=i)
      steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)
  assert np.ptp(full[..., :].argmax(-1)) > 0  # the model is not degenerate


def test_packed_model_computes_the_ternary_model():
  (model, variables), (packed_model, packed_vars) = _model("tga"), _model("tga", packed=True)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (1, 9), 0, VOCAB))
  np.testing.assert_allclose(_full(packed_model, packed_vars, tokens), _full(model, variables, tokens),
                             rtol=1e-4, atol=1e-4)
  assert packed_vars["params"]["layers_0"]["attn"]["q"]["codes"].dtype == jnp.uint8


def _naive_greedy(model, variables, prompt, n, context):
  """nanoGPT's sampling loop at temperature 0: a full forward pass (no cache) over the last ``context``
  tokens. The window is left-padded to ``context`` (``start``: the padding is never attended to) so one
  compiled pass serves every step."""
  full_pass = jax.jit(lambda v, window, start: model.apply(v, window, start=start))
  seq = list(prompt)
  for _ in range(n):
    window = seq[-context:]
    padded = np.zeros((1, context), np.int32)
    padded[0, context - len(window):] = window
    logits = full_pass(variables, jnp.asarray(padded), jnp.asarray([context - len(window)]))
    seq.append(int(np.asarray(logits)[0, -1].argmax()))
  return seq[len(prompt):]


def test_greedy_generation_equals_a_loop_of_full_passes_past_the_context():
  model, variables = _model("tga", packed=True)
  prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [9, 2]]  # left-padded to 8 in one batch
  n = 14  # 8 + 14 > context 16: the last tokens are conditioned on cropped windows
  out = generate(model, variables, prompts, n, temperature=0.0)
  assert out.shape == (2, n) and out.dtype == np.int32
  for row, prompt in zip(out, prompts):
    assert row.tolist() == _naive_greedy(model, variables, prompt, n, TINY["context"])


def test_one_block_ring_buffer_logits_equal_the_cropped_window():
  """Past its slots, a ring cache attends to the last ``slots`` keys. With one block (keys depend on
  their own token only) that is the full pass over the cropped window, whose positions start at 0
  (rotary attention is relative); deeper, it is sliding-window attention (not asserted equal)."""
  model, variables = _model("tga", arch="llama_test_one_block")
  context = TINY["context"]
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (1, context + 8), 0, VOCAB))
  cache = Llama(VOCAB, **ONE_BLOCK).init_cache(1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _, cache = model.apply(variables, tokens[:, :7], cache=cache, index=0)
    for i in range(7, tokens.shape[1]):
      logits, cache = model.apply(variables, tokens[:, i:i + 1], cache=cache, index=i)
      window = _full(model, variables, tokens[:, max(0, i + 1 - context):i + 1])
      np.testing.assert_allclose(np.asarray(logits)[0, -1], window[0, -1], rtol=2e-4, atol=2e-4)
  assert sorted(np.asarray(cache["index"]).tolist()) == list(range(tokens.shape[1] - context, tokens.shape[1]))
  # One call of more tokens than slots: each query sees the last 8 keys; the ring keeps the last 8.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    logits, cache = model.apply(variables, tokens[:, :12], cache=Llama(VOCAB, **ONE_BLOCK).init_cache(1, 8), index=0)
  full = _full(model, variables, tokens[:, :12])
  np.testing.assert_allclose(np.asarray(logits)[0, :8], full[0, :8], rtol=1e-4, atol=1e-4)
  for i in range(8, 12):
    np.testing.assert_allclose(np.asarray(logits)[0, i], _full(model, variables, tokens[:, i - 7:i + 1])[0, -1],
                               rtol=2e-4, atol=2e-4)
  assert sorted(np.asarray(cache["index"]).tolist()) == list(range(4, 12))


def test_same_seed_same_tokens_other_seed_other_tokens(tga):
  model, variables = tga
  draw = lambda seed: generate(model, variables, [[1, 2, 3]], 40, temperature=1.0, seed=seed)
  first = draw(0)
  np.testing.assert_array_equal(first, draw(0))
  assert (first != draw(1)).any()
  assert len(set(first[0].tolist())) > 2  # sampled, not greedy


def test_top_k_one_is_greedy_and_top_k_keeps_the_most_likely():
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.9, 0.0]])
  keys = jax.random.split(jax.random.key(0), 400)
  draws = np.stack([np.asarray(sample_logits(logits, k, jnp.float32(1.0), 2)) for k in keys])
  assert set(draws[:, 0]) == {1, 3} and set(draws[:, 1]) == {0, 2}
  # top_k=1 at any temperature, and temperature 0 with any top_k, are the argmax.
  for temperature, top_k in ((7.0, 1), (0.0, None), (0.0, 3)):
    np.testing.assert_array_equal(sample_logits(logits, keys[0], jnp.float32(temperature), top_k), [1, 0])
  # Without top_k, temperature 1 samples softmax(logits): row 0's frequencies within 4 sigma.
  draws = np.stack([np.asarray(sample_logits(logits, k, jnp.float32(1.0), None)) for k in keys])[:, 0]
  p = np.asarray(jax.nn.softmax(logits[0]))
  freq = np.bincount(draws, minlength=4) / len(draws)
  assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / len(draws)) + 1e-9), (freq, p)


def test_compiled_once_no_trace_per_token():
  """The model is traced twice (prefill, the loop body) whatever the number of tokens, and not at all
  when the same shapes and options come again with another seed or temperature."""
  model = create_model("llama_test_tiny", VOCAB, quant=QuantPolicy("fp"))
  variables = _sharpened(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32)))
  calls = []

  def count(next_fun, args, kwargs, context):
    if isinstance(context.module, Llama) and context.method_name == "__call__":
      calls.append(args[0].shape)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(count):
    generate(model, variables, [[1, 2, 3], [4]], 25, temperature=0.7, seed=3)
    # Prefill, the cached step, the step past the context (a window of 16 tokens): each traced once.
    assert calls == [(2, 3), (2, 1), (2, 16)]
    generate(model, variables, [[5, 6, 7], [8, 9]], 25, temperature=0.0, seed=4)
    assert len(calls) == 3  # same shapes, other values: the compiled function again
    generate(model, variables, [[5, 6, 7], [8, 9]], 7, temperature=0.7, seed=4)
    assert calls[3:] == [(2, 3), (2, 1)]  # another length, within the context: one new trace


def test_generate_text_decodes_and_refuses_unknown_characters(tga):
  model, variables = tga
  vocabulary = Vocabulary("chars", "\n !ABCDEFGHIJ")
  assert vocabulary.size == VOCAB
  text = generate_text(model, variables, vocabulary, "AB C", 20, temperature=0.0)
  ids = generate(model, variables, [vocabulary.encode("AB C")], 20, temperature=0.0)[0]
  assert text == vocabulary.decode(ids) and len(text) == 20
  with pytest.raises(ValueError, match="'z' is not in the model's vocabulary"):
    generate_text(model, variables, vocabulary, "Az", 5)
  with pytest.raises(ValueError, match="vocabulary has 256 tokens but the model predicts 13"):
    generate_text(model, variables, Vocabulary("bytes"), "A", 5)


@pytest.mark.parametrize("prompts,kwargs,message", [
  ([list(range(13)) + [0, 1, 2, 3]], {}, "prompt 0 has 17 tokens, more than the model's context of 16"),
  ([[]], {}, "prompt 0 is empty"),
  ([[1, 13]], {}, r"token ids must be integers in \[0, 13\)"),
  ([[1]], {"temperature": -1.0}, "temperature must be a finite number >= 0"),
  ([[1]], {"temperature": float("nan")}, "temperature must be a finite number >= 0"),
  ([[1]], {"top_k": 0}, r"top_k must be None or an integer in \[1, 13\]"),
  ([[1]], {"top_k": 14}, r"top_k must be None or an integer in \[1, 13\]"),
])
def test_bad_requests_are_one_line_errors(tga, prompts, kwargs, message):
  model, variables = tga
  with pytest.raises(ValueError, match=message) as e:
    generate(model, variables, prompts, 3, **kwargs)
  assert "\n" not in str(e.value)


def test_not_a_language_model_is_refused():
  model = create_model("small_cnn", 10, quant=QuantPolicy("fp"))
  with pytest.raises(ValueError, match="not a language model"):
    language_model(model)
  with pytest.raises(ValueError, match="not a language model"):
    generate(model, {}, [[1]], 3)
