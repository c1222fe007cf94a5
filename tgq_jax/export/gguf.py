"""GGUF export of the decoder LM for llama.cpp: ternary kernels as TQ2_0, the vocabulary as its tokenizer.

    python -m tgq_jax.export --workdir W --out model.gguf [--gguf-type TQ2_0|F16|F32]

:func:`export_gguf` writes a :class:`~tgq_jax.models.llama.Llama` (``llama_baby``, ``llama_256``, or any
``Llama`` a :class:`~tgq_jax.models.ModelSpec` builds) as a GGUF file of llama.cpp's ``llama``
architecture, with the ``gguf`` package's writer. The model's layout is llama.cpp's already (adjacent-pair
rotary embeddings = its NORM rope type, RMSNorm epsilon 1e-5, rope base 1e4, untied head, grouped-query
attention), so the tensors go as they are, transposed to ggml's ``(out, in)`` rows:

=================================  ============================  ==========================
our params path                    GGUF tensor                   stored as
=================================  ============================  ==========================
``embed/embedding`` (V, d)         ``token_embd.weight``         float (ternary if quantized)
``layers_{i}/attn_norm/scale``     ``blk.{i}.attn_norm.weight``  F32
``layers_{i}/attn/{q,k,v,o}``      ``blk.{i}.attn_{q,k,v,output}.weight``  TQ2_0 when ternary
``layers_{i}/mlp_norm/scale``      ``blk.{i}.ffn_norm.weight``   F32
``layers_{i}/mlp/{gate,up,down}``  ``blk.{i}.ffn_{gate,up,down}.weight``    TQ2_0 when ternary
``norm/scale``                     ``output_norm.weight``        F32
``head/kernel`` (d, V)             ``output.weight``             float (TQ2_0 if ternary)
=================================  ============================  ==========================

**Ternary kernels.** A TQ2_0 row holds blocks of 256 codes along the input axis, each block with one
float16 scale ``d`` (dequantized: ``code * d``). A ternary kernel's codes and scales come from its
quantizer (:meth:`~tgq_jax.core.quantizers.Quantizer.parts`, as the packed export takes them), so a
per-tensor or per-output-channel scale is carried exactly, to its float16 rounding. A kernel TQ2_0
cannot hold (an input width that is not a multiple of 256, a scale that varies within a block, TTQ's two
magnitudes, a scale beyond float16) is refused with its name and shape, or written at full precision
with ``unaligned="float"`` (the report lists those layers). Full-precision layers (the ``fp`` policy,
the embedding, an unquantized head) are written as ``float_type`` (F32 or F16); norms are F32.

**Tokenizer.** The vocabulary (:class:`~tgq_jax.data.text.Vocabulary`, characters or bytes) is written
as llama.cpp's ``rwkv`` tokenizer (``tokenizer.ggml.model = "rwkv"``): each token is the escaped
UTF-8 bytes of its character (or its byte), and llama.cpp tokenizes by longest byte match and
detokenizes by unescaping. Every character of a character vocabulary (``"\\n"`` and ``" "`` included)
and every byte of a byte vocabulary maps to exactly our id and back, with no BOS/EOS token, no added
space, no whitespace escaping and no clean-up of spaces (the ``llama`` (SentencePiece) model escapes
spaces and has fixed BOS/EOS ids 1 and 2; ``gpt2`` (BPE) has EOS 11 and cleans spaces before
punctuation). A character outside the vocabulary is llama.cpp's unknown token (none: an error there).

The file also records ``tgq_jax.model`` (the ModelSpec, JSON) and ``tgq_jax.vocabulary`` (JSON).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgq_jax.data.text import Vocabulary
from tgq_jax.export import files
from tgq_jax.export.packing import as_spec, check_finite
from tgq_jax.export.sizes import leaves
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models import ModelSpec
from tgq_jax.models.llama import RMS_EPSILON, ROPE_THETA, Llama

__all__ = ["FLOAT_TYPES", "GGUFReport", "GGUFTensor", "SUFFIX", "TERNARY_TYPES", "UNALIGNED", "check_llama",
           "export_gguf", "gguf_tensor_name", "token_texts"]

SUFFIX = ".gguf"
TERNARY_TYPES = ("TQ2_0", "F16", "F32")  # how ternary kernels are stored
FLOAT_TYPES = ("F32", "F16")  # how full-precision matrices (embedding, head, fp kernels) are stored
UNALIGNED = ("refuse", "float")  # a ternary kernel TQ2_0 cannot hold: refused, or written as float_type
BLOCK = 256  # TQ2_0's block (ggml's QK_K): inputs per float16 scale
TOKENIZER = "rwkv"

# A block's params path below layers_{i} -> its GGUF tensor (blk.{i}.<name>.weight).
# In the model's order (the file's and the report's order).
_BLOCK_TENSORS = {
  ("attn_norm", "scale"): "attn_norm",
  ("attn", "q", "kernel"): "attn_q", ("attn", "k", "kernel"): "attn_k", ("attn", "v", "kernel"): "attn_v",
  ("attn", "o", "kernel"): "attn_output",
  ("mlp_norm", "scale"): "ffn_norm",
  ("mlp", "gate", "kernel"): "ffn_gate", ("mlp", "up", "kernel"): "ffn_up", ("mlp", "down", "kernel"): "ffn_down",
}
_TOP_TENSORS = {("embed", "embedding"): "token_embd", ("norm", "scale"): "output_norm", ("head", "kernel"): "output"}


def _model_order(path: tuple[str, ...]) -> tuple:
  """Sort key of a params leaf: embedding, blocks in order (each as :data:`_BLOCK_TENSORS`), final norm, head."""
  if path[0].startswith("layers_") and path[0][len("layers_"):].isdigit():
    block = list(_BLOCK_TENSORS)
    return (1, int(path[0][len("layers_"):]), block.index(path[1:]) if path[1:] in block else len(block), path)
  return ({"embed": 0, "norm": 2, "head": 3}.get(path[0], 4), 0, 0, path)


def gguf_tensor_name(path: tuple[str, ...]) -> str | None:
  """The GGUF tensor of a :class:`~tgq_jax.models.llama.Llama` params leaf (``("layers_0", "attn", "q",
  "kernel")`` -> ``"blk.0.attn_q.weight"``); None for a leaf that is not one (a quantizer's threshold)."""
  if path in _TOP_TENSORS:
    return f"{_TOP_TENSORS[path]}.weight"
  if path and path[0].startswith("layers_") and path[0][len("layers_"):].isdigit() and path[1:] in _BLOCK_TENSORS:
    return f"blk.{int(path[0][len('layers_'):])}.{_BLOCK_TENSORS[path[1:]]}.weight"
  return None


def _escape_piece(text: str) -> str:
  """llama.cpp's rwkv token text of ``text``: backslash, ``\\n``, ``\\t``, ``\\r`` escaped, other
  non-printable characters as ``\\xNN`` per UTF-8 byte (lower-case hex, as its unescaper reads)."""
  out = []
  for c in text:
    if c == "\\":
      out.append("\\\\")
    elif c in "\n\t\r":
      out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[c])
    elif c.isprintable():
      out.append(c)
    else:
      out.extend(f"\\x{b:02x}" for b in c.encode("utf-8"))
  return "".join(out)


def token_texts(vocabulary: Vocabulary) -> list[str]:
  """The ``tokenizer.ggml.tokens`` of ``vocabulary`` (id order) for llama.cpp's ``rwkv`` tokenizer.

  A character vocabulary: each character escaped (:func:`_escape_piece`); a byte vocabulary: each byte,
  printable ASCII as itself, the others as ``\\xNN`` (a lone byte >= 0x80 is no UTF-8 string).
  """
  if vocabulary.kind == "bytes":
    return [_escape_piece(chr(b)) if b < 0x80 else f"\\x{b:02x}" for b in range(256)]
  return [_escape_piece(c) for c in vocabulary.chars]


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  """One tensor of an exported file: its GGUF name, ggml type, numpy shape (rows, columns) and source."""

  name: str
  ggml_type: str  # "TQ2_0", "F16" or "F32"
  shape: tuple[int, ...]  # numpy order (ggml's ne reversed): (out, in) for a matrix
  source: str  # our params path, "/"-joined
  ternary: bool  # its layer's quantizer is ternary


@dataclasses.dataclass(frozen=True)
class GGUFReport:
  """What :func:`export_gguf` wrote.

  Attributes:
    path: the file.
    file_bytes: its size.
    tensors: every tensor, in file order.
    float_layers: ternary layers written at full precision (``unaligned="float"``), with the reason.
  """

  path: str
  file_bytes: int
  tensors: tuple[GGUFTensor, ...]
  float_layers: tuple[tuple[str, str], ...]

  def format(self) -> str:
    counts: dict[str, int] = {}
    for t in self.tensors:
      counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
    lines = [f"{self.path}: {self.file_bytes:,} bytes, {len(self.tensors)} tensors ("
             + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) + ")"]
    lines += [f"  ternary layer {layer} written at full precision: {why}" for layer, why in self.float_layers]
    return "\n".join(lines)


def _check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
  if value not in choices:
    raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}.")
  return value


def check_llama(spec: ModelSpec) -> tuple[Any, Llama]:
  """The model ``spec`` builds and its :class:`Llama` (ValueError, one line, for any other architecture)."""
  model = spec.build()
  inner = getattr(model, "module", model)
  if not isinstance(inner, Llama):
    raise ValueError(f"GGUF export writes the decoder LM (a tgq_jax.models.llama.Llama, e.g. llama_256); "
                     f"arch {spec.arch!r} is a {type(inner).__name__}: export it as .safetensors.")
  return model, inner


def _tq2_0_problem(weight: np.ndarray) -> str | None:
  """Why TQ2_0 cannot hold ``weight`` (rows, inputs) exactly, or None: each block of 256 inputs of a row
  must be ``{-d, 0, d}`` for one ``d`` that float16 represents."""
  rows, inputs = weight.shape
  if inputs % BLOCK:
    return f"its input width {inputs} is not a multiple of {BLOCK} (TQ2_0's block)"
  magnitude = np.abs(weight).reshape(rows, inputs // BLOCK, BLOCK)
  d = magnitude.max(axis=-1, keepdims=True)
  if not np.all((magnitude == 0) | (magnitude == d)):
    return ("its scale varies within a block of 256 inputs (TQ2_0 has one scale per block: per-input-channel "
            "scales or a quantizer's two magnitudes do not fit)")
  with np.errstate(over="ignore"):  # an overflow is what is checked for
    d16 = d.astype(np.float16)
  if not np.all(np.isfinite(d16)) or np.any((d > 0) & (d16 == 0)):
    return f"a scale ({float(d.max()):.3g} or {float(d[d > 0].min()):.3g}) is outside float16's range"
  return None


def _float_array(array: np.ndarray, ggml_type: str, name: str) -> np.ndarray:
  with np.errstate(over="ignore"):  # an overflow is what is checked for
    out = np.ascontiguousarray(array, dtype=np.float16 if ggml_type == "F16" else np.float32)
  if not np.all(np.isfinite(out)):
    raise ValueError(f"{name}: a value beyond float16's range ({float(np.abs(array).max()):.3g}); "
                     "export with F32.")
  return out


def _check_shapes(model: Any, params: Mapping, context: int) -> None:
  """ValueError unless ``params`` has exactly the leaves and shapes of ``model``'s own initialization."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, min(context, 8)), jnp.int32)))
  want = {p: tuple(v.shape) for p, v in leaves(abstract["params"])}
  have = {p: tuple(np.shape(v)) for p, v in leaves(params)}
  for path in sorted(set(want) | set(have)):
    if want.get(path) != have.get(path):
      raise ValueError(f"variables do not match the model spec at params/{'/'.join(path)}: "
                       f"expected {want.get(path)}, got {have.get(path)} (None: absent).")


def _gguf_tensors(variables: Mapping, model: Any, llama: Llama, ternary_type: str, float_type: str,
                  unaligned: str) -> tuple[list[tuple[GGUFTensor, np.ndarray]], list[tuple[str, str]]]:
  """Every GGUF tensor (spec and data, ggml order) and the ternary layers written at full precision."""
  import gguf

  params = variables["params"]
  _check_shapes(model, params, llama.context)
  quantizers = quantized_layers(model, jax.ShapeDtypeStruct((1, 1), jnp.int32), train=False)
  layer_of = {}  # params leaf -> (layer path, quantizer) for the kernels that go through a quantizer
  for layer_path, quantizer in quantizers.items():
    for leaf in ("kernel", "embedding"):
      layer_of[(*layer_path, leaf)] = (layer_path, quantizer)
  quantizer_leaves = {(*p, name) for p, q in quantizers.items() for name in q.param_names}

  out, fallback, refused = [], [], []
  for path, value in sorted(leaves(params), key=lambda leaf: _model_order(leaf[0])):
    name = gguf_tensor_name(path)
    if name is None:
      if path in quantizer_leaves:
        continue  # a threshold or trainable scale: the codes and scales carry what inference needs
      raise ValueError(f"params/{'/'.join(path)} is not a tensor of the Llama layout.")
    array = np.asarray(value, np.float32)
    layer_path, quantizer = layer_of.get(path, (None, None))
    is_ternary = quantizer is not None and quantizer.ternary
    if is_ternary:
      layer = params
      for key in layer_path:
        layer = layer[key]
      parts = quantizer.parts(layer[path[-1]], {k: layer[k] for k in quantizer.param_names})
      codes = np.asarray(parts.codes)
      # The ternary weights: a +1 code is `scale`, a -1 code `-neg_scale` (scalars, or one per output feature:
      # the kernel's last axis, which broadcasting pairs them with).
      array = (np.where(codes > 0, np.asarray(parts.scale, np.float32), np.float32(0))
               - np.where(codes < 0, np.asarray(parts.neg_scale, np.float32), np.float32(0))).astype(np.float32)
      if not np.all(np.isfinite(array)):
        raise ValueError(f"refusing to export: layer {'/'.join(layer_path)} has a non-finite scale.")
    # ggml stores a matrix as rows of its input axis: torch's (out, in), our kernel transposed.
    weight = array if path[-1] in ("embedding", "scale") else array.T
    source = "/".join(path)
    if path[-1] == "scale":
      ggml_type = "F32"
      data = np.ascontiguousarray(weight, np.float32)
    elif is_ternary and ternary_type == "TQ2_0":
      problem = _tq2_0_problem(weight)
      if problem is None:
        ggml_type = "TQ2_0"
        data = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.TQ2_0)
      elif unaligned == "float":
        fallback.append(("/".join(layer_path), problem))
        ggml_type = float_type
        data = _float_array(weight, ggml_type, source)
      else:
        refused.append(f"{'/'.join(layer_path)} (kernel {tuple(array.shape)}: {problem})")
        continue
    else:
      ggml_type = (ternary_type if is_ternary else float_type)
      data = _float_array(weight, ggml_type, source)
    out.append((GGUFTensor(name, ggml_type, tuple(weight.shape), source, is_ternary), data))
  if refused:
    raise ValueError(f"TQ2_0 cannot hold {len(refused)} ternary layer(s): {'; '.join(refused)}. "
                     "Pass unaligned='float' (--gguf-unaligned float) to write them at full precision, or "
                     "ternary_type F16/F32.")
  return out, fallback


def export_gguf(path: str | os.PathLike, variables: Mapping, spec: ModelSpec | Mapping[str, Any],
                vocabulary: Vocabulary | Mapping[str, Any], *, ternary_type: str = "TQ2_0",
                float_type: str | None = None, unaligned: str = "refuse", name: str | None = None) -> GGUFReport:
  """Writes a trained decoder LM as a GGUF file for llama.cpp (``llama`` architecture).

  Args:
    path: output file (``.gguf``); written to a temporary name and renamed (nothing is left half-written).
    variables: the run's variables (``{"params": ...}``: kernels and the quantizer's leaves); all finite.
    spec: the :class:`~tgq_jax.models.ModelSpec` (training form) of a :class:`~tgq_jax.models.llama.Llama`.
    vocabulary: the run's :class:`~tgq_jax.data.text.Vocabulary` (or its ``to_dict()``); its size is the
      model's ``num_classes``. Written as llama.cpp's tokenizer (see the module docstring).
    ternary_type: how ternary kernels are stored: ``"TQ2_0"`` (2 bits a weight, one float16 scale per 256
      inputs), or ``"F16"``/``"F32"`` (the ternary weights ``code * scale`` at that precision).
    float_type: full-precision matrices (embedding, an unquantized head, the ``fp`` policy's kernels):
      ``"F32"`` or ``"F16"``; default F16 when ``ternary_type`` is F16, else F32. Norms are always F32.
    unaligned: a ternary kernel TQ2_0 cannot hold (input width not a multiple of 256, a scale varying
      within a block, a scale beyond float16): ``"refuse"`` (ValueError naming each, with its shape) or
      ``"float"`` (written as ``float_type``; listed in the report's ``float_layers``).
    name: ``general.name`` (default: the spec's arch).

  Returns:
    The :class:`GGUFReport` (tensors, types, layers written at full precision, file size).

  Raises:
    ValueError: not a Llama, a vocabulary of another size, a non-finite value, variables that do not match
      the spec, a layer TQ2_0 cannot hold (``unaligned="refuse"``), a bad option (one line each).
    OSError: ``path`` cannot be written (one line; a previous file there is left intact).
  """
  import gguf

  from tgq_jax import __version__

  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"output {path} is a directory: give a file name.")
  ternary_type = _check_choice(ternary_type, TERNARY_TYPES, "ternary_type")
  float_type = _check_choice("F16" if float_type is None and ternary_type == "F16" else (float_type or "F32"),
                             FLOAT_TYPES, "float_type")
  unaligned = _check_choice(unaligned, UNALIGNED, "unaligned")
  spec = as_spec(spec)
  if not isinstance(vocabulary, Vocabulary):
    vocabulary = Vocabulary.from_dict(vocabulary)
  model, llama = check_llama(spec)
  if vocabulary.size != llama.num_classes:
    raise ValueError(f"the vocabulary has {vocabulary.size} tokens but the model's output has {llama.num_classes}: "
                     "not this model's vocabulary.")
  if "params" not in variables:
    raise ValueError("variables must hold a 'params' collection.")
  check_finite(variables)
  tensors, fallback = _gguf_tensors(variables, model, llama, ternary_type, float_type, unaligned)

  types = {t.ggml_type for t, _ in tensors if len(t.shape) == 2}
  file_type = (gguf.LlamaFileType.MOSTLY_TQ2_0 if "TQ2_0" in types else
               gguf.LlamaFileType.MOSTLY_F16 if "F16" in types else gguf.LlamaFileType.ALL_F32)

  def write(tmp: str) -> None:
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name or spec.arch)
    writer.add_description(f"tgq-jax {spec.policy.quantizer} decoder LM (tgq_jax {__version__})")
    writer.add_context_length(llama.context)
    writer.add_embedding_length(llama.width)
    writer.add_block_count(llama.num_layers)
    writer.add_feed_forward_length(llama.mlp_dim)
    writer.add_head_count(llama.num_heads)
    writer.add_head_count_kv(llama.num_kv_heads)
    writer.add_layer_norm_rms_eps(RMS_EPSILON)
    writer.add_rope_dimension_count(llama.head_dim)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_vocab_size(vocabulary.size)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(TOKENIZER)
    writer.add_token_list(token_texts(vocabulary))
    writer.add_token_types([int(gguf.TokenType.NORMAL)] * vocabulary.size)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_string("tgq_jax.model", json.dumps(spec.to_dict()))
    writer.add_string("tgq_jax.vocabulary", json.dumps(vocabulary.to_dict()))
    for tensor, data in tensors:
      raw_dtype = gguf.GGMLQuantizationType.TQ2_0 if tensor.ggml_type == "TQ2_0" else None
      writer.add_tensor(tensor.name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

  files.atomic_write_with(path, write, "GGUF file")
  return GGUFReport(path, os.path.getsize(path), tuple(t for t, _ in tensors), tuple(fallback))
