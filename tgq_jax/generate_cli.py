"""``python -m tgq_jax.generate``: text from a trained language model, a workdir's or an exported file's.

    python -m tgq_jax.generate --model W --prompt "ROMEO:" --max-new-tokens 200 [--temperature 0.8]
        [--top-k 40] [--seed 0]

``--model`` is a ``train.py`` workdir (its newest intact checkpoint, the model spec and the
vocabulary of its ``config.json``, read as data as the export reads it) or an exported
``.safetensors`` file (loaded packed: the 2-bit codes stay resident and each layer multiplies by
them; the vocabulary comes from the file's header). Nothing a file names is imported or called.
Prints the prompt followed by the generated text. Every failure is one ``error:`` line on stderr,
exit status 2: a missing file, a model that is not a language model, a file without a vocabulary,
a prompt longer than the context or with a character outside the vocabulary, a bad option.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from tgq_jax.data.text import Vocabulary
from tgq_jax.generate import generate_text, language_model


def load_language_model(path: str) -> tuple[Any, dict, Vocabulary]:
  """``(model, variables, vocabulary)`` of a workdir or an exported ``.safetensors`` file (packed).

  Raises:
    FileNotFoundError, ValueError: one line naming the problem.
  """
  from tgq_jax.export import cli as export_cli
  from tgq_jax.export import load_packed
  from tgq_jax.training import checkpoints

  if not os.path.exists(path):
    raise FileNotFoundError(f"--model {path}: no such file or directory.")
  if os.path.isdir(path):
    spec, _, _ = export_cli.run_record(path)
    model = spec.build()
    language_model(model)  # refuses another kind of model before its checkpoint is read
    vocabulary = export_cli.run_vocabulary(path, required=False)
    if vocabulary is None:
      raise ValueError(f"{os.path.join(path, 'config.json')} records no vocabulary: not a language model's run.")
    try:
      variables = checkpoints.load_variables(path, report=lambda message: None)
    except checkpoints.CheckpointError as e:
      raise ValueError(" ".join(str(e).split())) from None
    return model, {"params": variables["params"]}, vocabulary
  model, variables, header = load_packed(path, packed=True)
  language_model(model)
  if header.get("vocabulary") is None:
    raise ValueError(f"{path} holds no vocabulary: export it from a language model's workdir "
                     "(python -m tgq_jax.export --workdir W --out F), whose config.json records one.")
  try:
    vocabulary = Vocabulary.from_dict(header["vocabulary"])
  except ValueError as e:
    raise ValueError(f"{path}: corrupt vocabulary ({e})") from None
  return model, variables, vocabulary


def _arguments(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m tgq_jax.generate",
                                   description="Generate text with a trained ternary language model.")
  parser.add_argument("--model", required=True, help="a train.py workdir or an exported .safetensors file")
  parser.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
  parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
  parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0)")
  parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = _arguments(argv)
  try:
    model, variables, vocabulary = load_language_model(args.model)
    text = generate_text(model, variables, vocabulary, args.prompt, args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed)
  except (OSError, ValueError) as e:
    text = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {text}", file=sys.stderr)
    return 2
  print(args.prompt + text)
  return 0
