"""python -m tgq_jax.generate: from a workdir and from an exported file; one-line errors (exit 2)."""
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tgq_jax import QuantPolicy, export
from tgq_jax.data.text import Vocabulary
from tgq_jax.generate import generate_text
from tgq_jax.generate_cli import main
from tgq_jax.models import ModelSpec, register
from tgq_jax.models.llama import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "ROMEO: but soft, what light through yonder window breaks?\n" * 4
VOCAB = Vocabulary.of_text(TEXT)
TINY = dict(width=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, context=16)
register("llama_cli_tiny", Llama, **TINY)
SPEC = ModelSpec("llama_cli_tiny", VOCAB.size, QuantPolicy("tga", ternary_last=False))


def _trained_variables():
  """A few Adam steps of next-token prediction on TEXT: a model whose greedy text is not one character."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = SPEC.build()
    ids = VOCAB.encode(TEXT)
    windows = np.stack([ids[i:i + TINY["context"] + 1] for i in range(0, len(ids) - TINY["context"] - 1, 3)])
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = model.apply({"params": p}, windows[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(30):
    params, opt_state = step(params, opt_state)
  return model, {"params": params}


def _workdir(path, spec: ModelSpec, variables, record_extra: dict) -> str:
  """A train.py workdir as the language-model trainer leaves it: config.json and a checkpoint."""
  from tgq_jax.training import checkpoints

  path.mkdir()
  record = {"model": spec.to_dict(), "dataset_info": {"name": "text", "num_classes": spec.num_classes,
                                                      "image_shape": [TINY["context"]]}, **record_extra}
  (path / "config.json").write_text(json.dumps(record))
  if variables is not None:
    with checkpoints.make_manager(str(path / "checkpoints")) as manager:
      checkpoints.save(manager, 1, {"params": variables["params"]}, {"step": 1})
  return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(model, variables, workdir, exported .safetensors file) of a briefly trained tiny LM."""
  model, variables = _trained_variables()
  root = tmp_path_factory.mktemp("gen_cli")
  workdir = _workdir(root / "run", SPEC, variables, {"vocabulary": VOCAB.to_dict()})
  out = root / "model.safetensors"
  assert export.main(["--workdir", workdir, "--out", str(out)]) == 0
  return model, variables, workdir, str(out)


def _output(capsys, *argv) -> str:
  assert main(list(argv)) == 0
  return capsys.readouterr().out


def _error(capsys, *argv) -> str:
  assert main(list(argv)) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and not captured.out, captured
  return captured.err


def test_from_a_workdir_and_from_its_export_the_same_greedy_text(run, capsys):
  model, variables, workdir, exported = run
  want = generate_text(model, variables, VOCAB, "ROMEO:", 40, temperature=0.0)
  assert len(set(want)) > 3  # trained: not one repeated character
  args = ["--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0"]
  assert _output(capsys, "--model", workdir, *args) == "ROMEO:" + want + "\n"
  # The export: packed 2-bit codes resident, the vocabulary from the file's header.
  assert _output(capsys, "--model", exported, *args) == "ROMEO:" + want + "\n"
  _, packed_vars, header = export.load_packed(exported, packed=True)
  assert header["vocabulary"] == VOCAB.to_dict()
  assert packed_vars["params"]["layers_0"]["mlp"]["up"]["codes"].dtype == jnp.uint8


def test_sampling_options_and_seeds(run, capsys):
  _, _, workdir, _ = run
  args = ["--model", workdir, "--prompt", "ROMEO:", "--max-new-tokens", "30", "--temperature", "1.5", "--top-k", "5"]
  first = _output(capsys, *args, "--seed", "1")
  assert first == _output(capsys, *args, "--seed", "1")
  assert first != _output(capsys, *args, "--seed", "2")


def test_error_lines(run, capsys, tmp_path):
  _, variables, workdir, exported = run
  assert "more than the model's context of 16" in _error(capsys, "--model", workdir, "--prompt", "R" * 17)
  assert "'Z' is not in the model's vocabulary" in _error(capsys, "--model", exported, "--prompt", "ROMEZ")
  assert "no such file or directory" in _error(capsys, "--model", str(tmp_path / "missing.safetensors"))
  assert "temperature must be a finite number >= 0" in _error(capsys, "--model", workdir, "--temperature", "-1")
  # A run without a vocabulary; a workdir with no checkpoint.
  bare = _workdir(tmp_path / "bare", SPEC, variables, {})
  assert "records no vocabulary" in _error(capsys, "--model", bare)
  empty = _workdir(tmp_path / "empty", SPEC, None, {"vocabulary": VOCAB.to_dict()})
  assert "no checkpoint" in _error(capsys, "--model", empty)
  # An image classifier's export is not a language model.
  cnn_spec = ModelSpec("small_cnn", 10, QuantPolicy("tga"))
  cnn = cnn_spec.build()
  cnn_vars = cnn.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  export.export_variables(tmp_path / "cnn.safetensors", cnn_vars, cnn_spec, (28, 28, 1))
  assert "not a language model" in _error(capsys, "--model", str(tmp_path / "cnn.safetensors"))


@pytest.mark.slow
def test_module_entry_point(run):
  _, _, _, exported = run
  # The registered test arch lives in this process only: the child registers it the same way.
  code = ("import sys; from tgq_jax.models import register; from tgq_jax.models.llama import Llama; "
          f"register('llama_cli_tiny', Llama, **{TINY!r}); from tgq_jax.generate_cli import main; "
          "sys.exit(main(sys.argv[1:]))")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", code, "--model", exported, "--prompt", "RO", "--max-new-tokens", "5",
                         "--temperature", "0"], capture_output=True, text=True, env=env, timeout=300, check=False)
  assert done.returncode == 0 and done.stdout.startswith("RO") and len(done.stdout) == 8, done
  done = subprocess.run([sys.executable, "-m", "tgq_jax.generate", "--model", exported], capture_output=True,
                        text=True, env=env, timeout=300, check=False)
  assert done.returncode == 2 and done.stderr.startswith("error: ") and "llama_cli_tiny" in done.stderr, done
