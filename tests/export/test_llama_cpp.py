"""llama.cpp runs our GGUF export: the same greedy text, token for token, and how close its logits are.

Needs the ``llama`` extra (``pip install -e '.[llama]'``: llama-cpp-python, which builds llama.cpp); skipped
without it. A width-256 ternary LM (TGA, per-channel scales, grouped-query attention, ternary head) is
trained for a few hundred steps on Tiny Shakespeare (peaked predictions), exported as TQ2_0, F16 and F32,
and run by llama.cpp with its own key/value cache, token ids in and out.

Why llama.cpp's logits differ from ours: TQ2_0 stores each scale in float16 (relative rounding <= 2**-11)
and multiplies the ternary rows with the activations quantized to 8 bits per block of 256 (ggml's Q8_K:
``round(x * 127 / max|x|)``, an error up to ``max|x| / 254`` per activation); F16 rounds weights and
activations to float16 (2**-11); F32 only reorders the float32 sums.
"""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tgq_jax import QuantPolicy
from tgq_jax.data.text import Vocabulary
from tgq_jax.export import export_gguf
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models import ModelSpec
from tgq_jax.models.llama import Llama
from tgq_jax.training import algorithm

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding (the llama extra) is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::tgq_jax.core.kernel.UnquantizedLayerWarning")  # the embedding
CORPUS = pathlib.Path(__file__).resolve().parents[2] / "tgq_jax" / "data" / "corpora" / "tinyshakespeare.txt"
LM = {"width": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 512, "context": 64}
# The model learns the play's opening (the first TRAIN_CHARS characters) nearly by heart, so its greedy
# continuation of the first line is confident (top-1 margins of nats, not hundredths) and worth comparing.
TRAIN_CHARS, STEPS, BATCH, LEARNING_RATE = 400, 300, 16, 3e-3
PROMPT = "Before we"


@pytest.fixture(scope="module")
def trained():
  return train_lm()


def train_lm():
  """(spec, variables, vocabulary) of the small LM after STEPS steps of TGA (sequential) with Adam."""
  text = CORPUS.read_text(encoding="utf-8")
  vocabulary = Vocabulary.of_text(text)  # the whole play's 65 characters
  tokens = vocabulary.encode(text[:TRAIN_CHARS])
  spec = ModelSpec.for_model(Llama, vocabulary.size, QuantPolicy("tga", per_channel=True), **LM)
  model = spec.build()
  layers = quantized_layers(model, jax.ShapeDtypeStruct((1, 1), jnp.int32), train=False)
  setup = algorithm.init(model, jnp.zeros((1, LM["context"]), jnp.int32), optax.adam(LEARNING_RATE), layers,
                         sequential=False, train=False)
  params, opt_state = setup.state.params, setup.tga.init(setup.state.params)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p, threshold_pass):  # the same loss in both passes (the update's rule stays sequential)
      del threshold_pass
      logits = model.apply({"params": p}, batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), None

    params, opt_state, info = setup.tga.update(loss_fn, params, opt_state)
    return params, opt_state, info.loss

  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    starts = rng.integers(0, len(tokens) - LM["context"] - 1, BATCH)
    batch = jnp.asarray(np.stack([tokens[s:s + LM["context"] + 1] for s in starts]))
    params, opt_state, loss = step(params, opt_state, batch)
  assert float(loss) < 0.5, float(loss)  # it learned the passage (uniform: ln 65 = 4.2)
  return spec, {"params": params}, vocabulary


def _our_greedy(spec, variables, prompt_ids, n) -> tuple[list[int], np.ndarray]:
  """Greedy continuation by full forward passes (no cache); the logits that chose each token."""
  model = spec.build()
  # One shape for every step (the window padded to the context; causal, so the padding changes nothing before it).
  apply = jax.jit(lambda window, last: model.apply(variables, window[None])[0, last])
  ids, chosen = list(prompt_ids), []
  for _ in range(n):
    window = np.zeros(LM["context"], np.int32)
    window[:len(ids)] = ids
    logits = np.asarray(apply(jnp.asarray(window), len(ids) - 1))
    chosen.append(logits)
    ids.append(int(np.argmax(logits)))
  return ids[len(prompt_ids):], np.stack(chosen)


def _llama_cpp_greedy(path, prompt_ids, n) -> tuple[list[int], np.ndarray]:
  """llama.cpp's greedy continuation with its key/value cache: the prompt in one batch, then a token at a time."""
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=LM["context"], n_batch=LM["context"], n_threads=2,
                        logits_all=True, verbose=False)
  llm.eval(list(prompt_ids))
  ids, chosen = [], []
  for _ in range(n):
    logits = np.array(llm.scores[llm.n_tokens - 1], np.float32)
    chosen.append(logits)
    ids.append(int(np.argmax(logits)))
    llm.eval([ids[-1]])
  llm.close()
  return ids, np.stack(chosen)


@pytest.mark.parametrize("ternary_type, bound", [("TQ2_0", 0.06), ("F16", 0.01), ("F32", 1e-4)])
def test_llama_cpp_continues_a_prompt_as_we_do(trained, tmp_path, ternary_type, bound):
  """The same greedy tokens for the whole context (58 after the prompt), and logits within ``bound`` of ours,
  relative to the logits' spread (max - min over the vocabulary, about 20 here)."""
  spec, variables, vocabulary = trained
  path = tmp_path / f"m-{ternary_type}.gguf"
  export_gguf(path, variables, spec, vocabulary, ternary_type=ternary_type)
  prompt = list(vocabulary.encode(PROMPT))
  n = LM["context"] - len(prompt)
  ours, our_logits = _our_greedy(spec, variables, prompt, n)
  theirs, their_logits = _llama_cpp_greedy(path, prompt, n)
  diff = np.abs(their_logits - our_logits).max(axis=-1)
  top2 = np.sort(our_logits, axis=-1)[:, -2:]
  margin = top2[:, 1] - top2[:, 0]
  spread = (our_logits.max(-1) - our_logits.min(-1)).mean()
  print(f"\n{ternary_type}: {n} tokens, max |logit diff| {diff.max():.4g} (spread {spread:.3g}), "
        f"smallest top-1 margin {margin.min():.4g}\n  ours:      {vocabulary.decode(ours)!r}\n"
        f"  llama.cpp: {vocabulary.decode(theirs)!r}")
  assert theirs == ours
  assert diff.max() <= bound * spread
  assert n >= 50


def test_llama_cpp_high_level_completion_is_our_text(trained, tmp_path):
  """The README's lines: ``Llama(model_path=...)(prompt, max_tokens=..., temperature=0)`` gives our greedy text."""
  spec, variables, vocabulary = trained
  path = tmp_path / "m.gguf"
  export_gguf(path, variables, spec, vocabulary)
  ours, _ = _our_greedy(spec, variables, list(vocabulary.encode(PROMPT)), 50)
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=LM["context"], n_threads=2, verbose=False)
  out = llm(PROMPT, max_tokens=50, temperature=0.0, top_k=1, repeat_penalty=1.0)
  llm.close()
  assert out["choices"][0]["text"] == vocabulary.decode(ours)


@pytest.mark.parametrize("vocabulary", [
  Vocabulary.of_text("ROMEO:\nBut, soft! what light\tthrough yonder \\window\r breaks? é€\u2581\x00"),
  Vocabulary("bytes")], ids=["chars", "bytes"])
def test_llama_cpp_tokenizes_and_detokenizes_as_our_vocabulary(tmp_path, vocabulary):
  spec = ModelSpec.for_model(Llama, vocabulary.size, QuantPolicy("tga"), **{**LM, "num_layers": 1})
  variables = spec.build().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  path = tmp_path / "m.gguf"
  export_gguf(path, variables, spec, vocabulary)
  llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
  texts = ["\n", " ", "ROMEO:\nBut,  soft!\n\n what light\tthrough yonder \\window\r breaks? é€\u2581\x00 "]
  if vocabulary.kind == "bytes":
    texts += ["any text at all: Ünïcödé ✓ 日本語 \x7f"]
  for text in texts:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # add_bos: the file adds none
    assert ids == list(vocabulary.encode(text)), text
    assert llm.detokenize(ids) == text.encode("utf-8")
  assert [llm.detokenize([i]) for i in range(vocabulary.size)] == (
    [bytes([b]) for b in range(256)] if vocabulary.kind == "bytes" else [c.encode() for c in vocabulary.chars])
  llm.close()
