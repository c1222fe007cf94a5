"""GGUF export (tgq_jax.export.gguf): read back with the gguf package's own reader and dequantizer.

Every tensor is compared with our ternary weights (codes times the scale, to the scale's float16 rounding),
a forward pass written here in numpy from the file alone (llama.cpp's llama graph: adjacent-pair rope,
grouped-query heads) gives the model's logits, and the tokens decode as llama.cpp's rwkv tokenizer reads them.
"""
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax import QuantPolicy
from tgq_jax.data.text import Vocabulary
from tgq_jax.export import export_gguf
from tgq_jax.export import gguf as gguf_export
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models import ModelSpec
from tgq_jax.models.llama import Llama

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\tIt is the east \\ é€ \u2581\x00"
VOCAB = Vocabulary.of_text(TEXT)
# Every kernel input (256, heads * head_dim = 256, mlp_dim = 512) a multiple of TQ2_0's 256; GQA (4 / 2).
pytestmark = pytest.mark.filterwarnings("ignore::tgq_jax.core.kernel.UnquantizedLayerWarning")  # the embedding
LM = {"width": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 512, "context": 16}


def _spec(policy: QuantPolicy, **overrides) -> ModelSpec:
  return ModelSpec.for_model(Llama, VOCAB.size, policy, **{**LM, **overrides})


def _variables(spec: ModelSpec, seed: int = 0) -> dict:
  """Initialized variables with norm scales away from 1 (a swapped or missing norm changes the logits)."""
  variables = spec.build().init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
  keys = iter(jax.random.split(jax.random.key(seed + 1), 100))

  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    return x * (1 + 0.5 * jax.random.normal(next(keys), x.shape)) if "scale" in name else x

  return jax.tree_util.tree_map_with_path(perturb, variables)


def _ternary_weights(spec: ModelSpec, variables: dict) -> dict[str, np.ndarray]:
  """Each quantized layer's kernel as the model computes with it (``quantizer(kernel, params)``)."""
  out = {}
  layers = quantized_layers(spec.build(), jax.ShapeDtypeStruct((1, 1), jnp.int32), train=False)
  for path, quantizer in layers.items():
    node = variables["params"]
    for key in path:
      node = node[key]
    out["/".join(path)] = np.asarray(quantizer(node["kernel"], {k: node[k] for k in quantizer.param_names}))
  return out


def _read(path) -> tuple[dict[str, np.ndarray], dict[str, str], dict]:
  """The file's tensors dequantized (numpy shape: ggml's reversed), their ggml types, and its metadata."""
  reader = gguf.GGUFReader(str(path))
  tensors, types = {}, {}
  for t in reader.tensors:
    shape = tuple(int(d) for d in reversed(t.shape))
    tensors[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    types[t.name] = t.tensor_type.name
  meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  return tensors, types, meta


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _forward(tensors: dict, meta: dict, tokens: np.ndarray) -> np.ndarray:
  """Logits of ``tokens`` by llama.cpp's llama graph, from the GGUF file alone (float64 numpy)."""
  t = {k: v.astype(np.float64) for k, v in tensors.items()}
  heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
  eps, base = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
  n, width = len(tokens), meta["llama.embedding_length"]
  head_dim = width // heads
  angle = np.arange(n)[:, None] * base ** (-np.arange(0, head_dim, 2) / head_dim)  # (n, head_dim / 2)

  def rope(x):  # (n, h, head_dim): rotate adjacent pairs (llama.cpp's NORM rope type)
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    return np.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)

  x = t["token_embd.weight"][tokens]
  for i in range(meta["llama.block_count"]):
    b = lambda name: t[f"blk.{i}.{name}.weight"]  # noqa: E731
    h = _rms(x, b("attn_norm"), eps)
    q = rope((h @ b("attn_q").T).reshape(n, heads, head_dim))
    k = rope((h @ b("attn_k").T).reshape(n, kv_heads, head_dim))
    v = (h @ b("attn_v").T).reshape(n, kv_heads, head_dim)
    out = np.zeros((n, heads, head_dim))
    for head in range(heads):
      kv = head // (heads // kv_heads)
      scores = q[:, head] @ k[:, kv].T / np.sqrt(head_dim) + np.triu(np.full((n, n), -np.inf), 1)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = weights / weights.sum(-1, keepdims=True) @ v[:, kv]
    x = x + out.reshape(n, width) @ b("attn_output").T
    h = _rms(x, b("ffn_norm"), eps)
    gate = h @ b("ffn_gate").T
    x = x + (gate / (1 + np.exp(-gate)) * (h @ b("ffn_up").T)) @ b("ffn_down").T
  return _rms(x, t["output_norm.weight"], eps) @ t["output.weight"].T


def _llama_cpp_unescape(text: str) -> bytes:
  """llama.cpp's llama_unescape_rwkv_token (llama-vocab.cpp), ported: ``\\t \\n \\r \\xNN``, ``\\c`` -> c."""
  out, raw, i = bytearray(), text.encode("utf-8"), 0
  while i < len(raw):
    c = raw[i]
    if c == ord("\\"):
      nxt = raw[i + 1]
      if nxt == ord("x"):
        hi, lo = (d - ord("a") + 10 if d >= ord("a") else d - ord("0") for d in raw[i + 2:i + 4])
        out.append(hi * 16 + lo)
        i += 4
        continue
      out.append({ord("t"): 9, ord("n"): 10, ord("r"): 13}.get(nxt, nxt))
      i += 2
      continue
    out.append(c)
    i += 1
  return bytes(out)


def _longest_match(pieces: list[bytes], text: bytes) -> list[int]:
  """llama.cpp's rwkv tokenization (longest byte match from the left), on the unescaped pieces."""
  ids, pos = [], 0
  while pos < len(text):
    best = max((len(p), i) for i, p in enumerate(pieces) if text.startswith(p, pos))
    ids.append(best[1])
    pos += best[0]
  return ids


@pytest.fixture(scope="module")
def per_channel_gqa():
  spec = _spec(QuantPolicy("tga", per_channel=True))
  return spec, _variables(spec)


@pytest.mark.parametrize("per_channel", [False, True])
def test_tq2_0_tensors_are_our_ternary_weights_to_the_scales_float16(tmp_path, per_channel, per_channel_gqa):
  if per_channel:
    spec, variables = per_channel_gqa
  else:
    spec = _spec(QuantPolicy("tga"))
    variables = _variables(spec, 3)
  report = export_gguf(tmp_path / "m.gguf", variables, spec, VOCAB)
  tensors, types, _ = _read(tmp_path / "m.gguf")
  assert report.file_bytes == os.path.getsize(tmp_path / "m.gguf") and not report.float_layers
  weights = _ternary_weights(spec, variables)
  names = {"head": "output", **{f"layers_{i}/{m}/{p}": f"blk.{i}.{n}" for i in range(2) for m, p, n in [
    ("attn", "q", "attn_q"), ("attn", "k", "attn_k"), ("attn", "v", "attn_v"), ("attn", "o", "attn_output"),
    ("mlp", "gate", "ffn_gate"), ("mlp", "up", "ffn_up"), ("mlp", "down", "ffn_down")]}}
  assert set(weights) == set(names)  # the default policy quantizes the head too
  for layer, name in names.items():
    w = weights[layer].T  # ggml rows: (out, in)
    got = tensors[f"{name}.weight"]
    assert types[f"{name}.weight"] == "TQ2_0" and got.shape == w.shape, layer
    row_scales = np.unique(np.abs(w[w != 0]))  # one scale per tensor, or one per output row
    assert len(row_scales) == (w.shape[0] if per_channel else 1), layer
    # code * float16(scale): exactly, and within float16's rounding of the weights themselves
    np.testing.assert_array_equal(got, np.sign(w) * np.abs(w).astype(np.float16).astype(np.float32), err_msg=layer)
    np.testing.assert_allclose(got, w, rtol=2.0 ** -11, atol=0)
  p = variables["params"]
  np.testing.assert_array_equal(tensors["token_embd.weight"], p["embed"]["embedding"])
  assert types["token_embd.weight"] == "F32"
  for i in range(2):
    np.testing.assert_array_equal(tensors[f"blk.{i}.attn_norm.weight"], p[f"layers_{i}"]["attn_norm"]["scale"])
    np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_norm.weight"], p[f"layers_{i}"]["mlp_norm"]["scale"])
  np.testing.assert_array_equal(tensors["output_norm.weight"], p["norm"]["scale"])
  assert len(tensors) == 3 + 2 * 9


@pytest.mark.parametrize("ternary_type, float_type, rtol", [("F32", "F32", 1e-5), ("TQ2_0", "F32", 3e-3),
                                                            ("F16", "F16", 3e-3)])
def test_a_forward_pass_from_the_file_alone_gives_the_model_logits(tmp_path, per_channel_gqa, ternary_type,
                                                                   float_type, rtol):
  spec, variables = per_channel_gqa
  export_gguf(tmp_path / "m.gguf", variables, spec, VOCAB, ternary_type=ternary_type, float_type=float_type)
  tensors, types, meta = _read(tmp_path / "m.gguf")
  assert {types[k] for k in types if k.startswith("blk.") and "norm" not in k} == {ternary_type}
  assert types["token_embd.weight"] == float_type and types["blk.0.attn_norm.weight"] == "F32"
  tokens = VOCAB.encode(TEXT[:LM["context"]])
  want = np.asarray(spec.build().apply(variables, tokens[None]))[0]
  got = _forward(tensors, meta, tokens)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=rtol * scale, rtol=0)
  assert rtol == 1e-5 or not np.allclose(got, want, atol=1e-6 * scale, rtol=0)  # the rounding is seen


def test_metadata_is_the_llama_architecture(tmp_path, per_channel_gqa):
  spec, variables = per_channel_gqa
  export_gguf(tmp_path / "m.gguf", variables, spec, VOCAB, name="tiny")
  _, _, meta = _read(tmp_path / "m.gguf")
  want = {"general.architecture": "llama", "general.name": "tiny", "llama.context_length": 16,
          "llama.embedding_length": 256, "llama.block_count": 2, "llama.feed_forward_length": 512,
          "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 64,
          "llama.rope.freq_base": 10000.0, "llama.vocab_size": VOCAB.size,
          "general.file_type": int(gguf.LlamaFileType.MOSTLY_TQ2_0), "tokenizer.ggml.model": "rwkv",
          "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False}
  assert {k: meta[k] for k in want} == want
  assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
  assert meta["tokenizer.ggml.token_type"] == [int(gguf.TokenType.NORMAL)] * VOCAB.size
  assert ModelSpec.from_dict(json.loads(meta["tgq_jax.model"])) == spec
  assert Vocabulary.from_dict(json.loads(meta["tgq_jax.vocabulary"])) == VOCAB


@pytest.mark.parametrize("vocabulary", [VOCAB, Vocabulary("bytes")], ids=["chars", "bytes"])
def test_tokens_decode_to_our_ids_as_llama_cpp_reads_them(vocabulary):
  """Each token unescapes (llama.cpp's rule) to exactly its character's or byte's UTF-8 bytes, and longest-match
  tokenization of any text gives our ids; the texts are printable UTF-8 strings."""
  texts = gguf_export.token_texts(vocabulary)
  pieces = [_llama_cpp_unescape(t) for t in texts]
  if vocabulary.kind == "bytes":
    assert pieces == [bytes([b]) for b in range(256)]
  else:
    assert pieces == [c.encode("utf-8") for c in vocabulary.chars]
  assert all(t.isprintable() for t in texts)
  text = TEXT if vocabulary.kind == "chars" else TEXT + "\u00ff\x7f"
  assert _longest_match(pieces, text.encode("utf-8")) == list(vocabulary.encode(text))
  assert b"".join(pieces[i] for i in vocabulary.encode(text)).decode("utf-8") == text


def _refused(tmp_path, match, *args, **kwargs) -> str:
  path = tmp_path / "m.gguf"
  with pytest.raises(ValueError, match=match) as info:
    export_gguf(path, *args, **kwargs)
  assert "\n" not in str(info.value)
  assert os.listdir(tmp_path) == []  # nothing written, no temporary left
  return str(info.value)


def test_a_kernel_tq2_0_cannot_hold_is_refused_by_name_or_written_at_full_precision(tmp_path):
  spec = _spec(QuantPolicy("tga"), width=128, mlp_dim=384, num_heads=2, num_kv_heads=1)
  variables = _variables(spec)
  msg = _refused(tmp_path, "TQ2_0 cannot hold", variables, spec, VOCAB)
  assert "layers_0/attn/q (kernel (128, 128): its input width 128 is not a multiple of 256" in msg
  assert "layers_1/mlp/down (kernel (384, 128)" in msg and "unaligned" in msg
  report = export_gguf(tmp_path / "m.gguf", variables, spec, VOCAB, unaligned="float")
  assert [layer for layer, _ in report.float_layers] == [
    f"layers_{i}/{p}" for i in range(2) for p in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up",
                                                  "mlp/down")] + ["head"]
  assert "ternary layer layers_0/attn/q written at full precision" in report.format()
  assert [t.name for t in report.tensors][:3] == ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"]
  tensors, types, _ = _read(tmp_path / "m.gguf")
  weights = _ternary_weights(spec, variables)
  assert types["blk.1.ffn_down.weight"] == "F32"
  np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], weights["layers_1/mlp/down"].T)
  np.testing.assert_array_equal(tensors["output.weight"], weights["head"].T)


def test_two_magnitudes_and_scales_beyond_float16_are_refused(tmp_path, per_channel_gqa):
  spec = _spec(QuantPolicy("ttq"))  # a +1 code is pos_scale, a -1 code -neg_scale: two values per block
  msg = _refused(tmp_path, "TQ2_0 cannot hold 15 ternary", _variables(spec), spec, VOCAB)
  assert "layers_0/attn/q (kernel (256, 256): its scale varies within a block" in msg
  spec, variables = per_channel_gqa
  huge = jax.tree.map(lambda x: x, variables)
  huge["params"]["layers_1"]["mlp"]["up"]["kernel"] = variables["params"]["layers_1"]["mlp"]["up"]["kernel"] * 1e8
  msg = _refused(tmp_path, "TQ2_0 cannot hold 1 ternary", huge, spec, VOCAB)
  assert "layers_1/mlp/up" in msg and "outside float16's range" in msg
  _refused(tmp_path, "beyond float16's range", huge, spec, VOCAB, ternary_type="F16")


def test_full_precision_policy_writes_every_matrix_as_float(tmp_path):
  spec = _spec(QuantPolicy("fp"), num_layers=1)
  variables = _variables(spec)
  report = export_gguf(tmp_path / "m.gguf", variables, spec, VOCAB, float_type="F16")
  tensors, types, meta = _read(tmp_path / "m.gguf")
  assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
  assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
  q = np.asarray(variables["params"]["layers_0"]["attn"]["q"]["kernel"]).T
  np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], q.astype(np.float16).astype(np.float32))
  assert not any(t.ternary for t in report.tensors)


def test_other_models_vocabularies_and_values_are_refused(tmp_path, per_channel_gqa):
  spec, variables = per_channel_gqa
  _refused(tmp_path, "writes the decoder LM.*small_cnn.*safetensors", {"params": {}}, ModelSpec("small_cnn", 10),
           VOCAB)
  _refused(tmp_path, "vocabulary has 256 tokens but the model's output has", variables, spec, Vocabulary("bytes"))
  bad = jax.tree.map(lambda x: x, variables)
  bad["params"]["layers_0"]["mlp"]["gate"]["kernel"] = bad["params"]["layers_0"]["mlp"]["gate"]["kernel"].at[0, 0].set(
    jnp.nan)
  _refused(tmp_path, "non-finite.*layers_0/mlp/gate/kernel", bad, spec, VOCAB)
  other = _spec(QuantPolicy("tga", per_channel=True), num_layers=1)
  _refused(tmp_path, "do not match the model spec at params/layers_1", variables, other, VOCAB)
  for option, value in [("ternary_type", "Q4_0"), ("float_type", "BF16"), ("unaligned", "drop")]:
    _refused(tmp_path, f"{option} must be one of", variables, spec, VOCAB, **{option: value})


def _lm_workdir(path, spec: ModelSpec, variables: dict | None, record_extra: dict) -> str:
  """A train.py workdir as the language-model trainer leaves it: config.json and (optionally) a checkpoint."""
  from tgq_jax.training import checkpoints

  path.mkdir()
  record = {"model": spec.to_dict(), "dataset_info": {"name": "text", "num_classes": spec.num_classes,
                                                      "image_shape": [LM["context"]]}, **record_extra}
  (path / "config.json").write_text(json.dumps(record))
  if variables is not None:
    with checkpoints.make_manager(str(path / "checkpoints")) as manager:
      checkpoints.save(manager, 1, {"params": variables["params"]}, {"step": 1})
  return str(path)


def _cli_error(capsys, *argv) -> str:
  from tgq_jax.export import main

  assert main(list(argv)) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and err.count("\n") == 1, err
  return err


def test_export_command_writes_the_gguf_of_an_lm_workdir(tmp_path, capsys, per_channel_gqa):
  from tgq_jax.export import main
  from tgq_jax.models import register

  register("gguf_test_lm", Llama, **LM)
  _, variables = per_channel_gqa
  spec = ModelSpec("gguf_test_lm", VOCAB.size, QuantPolicy("tga", per_channel=True))
  workdir = _lm_workdir(tmp_path / "run", spec, variables, {"vocabulary": VOCAB.to_dict()})
  out = tmp_path / "model.gguf"
  assert main(["--workdir", workdir, "--out", str(out), "--report-json", str(tmp_path / "r.json")]) == 0
  assert "wrote" in capsys.readouterr().out
  export_gguf(tmp_path / "direct.gguf", variables, spec, VOCAB)
  assert out.read_bytes() == (tmp_path / "direct.gguf").read_bytes()
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["file_bytes"] == os.path.getsize(out) and report["tensors"][1]["name"] == "blk.0.attn_norm.weight"
  assert main(["--workdir", workdir, "--out", str(out), "--gguf-type", "F16"]) == 0
  _, types, _ = _read(out)
  assert types["blk.0.ffn_up.weight"] == "F16" and types["token_embd.weight"] == "F16"

  no_vocabulary = _lm_workdir(tmp_path / "old", spec, None, {})
  assert "needs the run's vocabulary" in _cli_error(capsys, "--workdir", no_vocabulary, "--out", str(out))
  cnn = _lm_workdir(tmp_path / "cnn", ModelSpec("small_cnn", 10), None, {})
  assert "writes the decoder LM" in _cli_error(capsys, "--workdir", cnn, "--out", str(tmp_path / "c.gguf"))
  assert "must end in .safetensors" in _cli_error(capsys, "--workdir", workdir, "--out", str(tmp_path / "m.bin"))
  assert not (tmp_path / "c.gguf").exists() and not any(".tmp-" in p.name for p in tmp_path.iterdir())
