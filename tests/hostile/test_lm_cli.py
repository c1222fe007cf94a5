"""train.py's language-model options used wrongly: each is one line (exit 2) before any work, the workdir untouched."""
from __future__ import annotations

import importlib.util
import os

import pytest

from tgq_jax.training import configs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_module():
  spec = importlib.util.spec_from_file_location("train_cli_lm", os.path.join(REPO, "train.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


TRAIN = _train_module()


def _one_line_error(capsys, *args) -> str:
  capsys.readouterr()
  code = TRAIN.main([*map(str, args)])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "run_fun" not in line]
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


def test_an_lm_arch_on_image_data_and_an_image_arch_on_text_are_one_line(tmp_path, capsys):
  line = _one_line_error(capsys, "--arch", "llama_baby", "--dataset", "synthetic", "--workdir", tmp_path / "a")
  assert line == ("error: --arch llama_baby is a language model: it trains on --dataset text (with --data-file F), "
                  "not on --dataset synthetic")
  line = _one_line_error(capsys, "--config", "shakespeare_char_baby", "--arch", "small_cnn", "--workdir", tmp_path / "b")
  assert line == ("error: --dataset text trains a language model, but --arch small_cnn is not one "
                  "(use --arch llama_baby or llama_256)")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before the workdir is made


@pytest.mark.parametrize("content, message", [
  (None, "no such file"),
  (b"", "is empty"),
  (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text (byte 0 cannot be decoded)"),
  (b"To be, or not to be", "is too short: its training split"),
])
def test_a_data_file_that_cannot_train_is_one_line(tmp_path, capsys, content, message):
  path = tmp_path / "corpus.txt"
  if content is not None:
    path.write_bytes(content)
  line = _one_line_error(capsys, "--config", "shakespeare_char_baby", "--data-file", path, "--max-steps", "1",
                         "--workdir", tmp_path / "run")
  assert line.startswith(f"error: --data-file {path}") and message in line, line
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("args, message", [
  (["--config", "shakespeare_char_baby", "--vocabulary", "words"], "argument --vocabulary: invalid choice: 'words'"),
  (["--config", "shakespeare_char_baby", "--context", "0"], "--context must be an integer >= 1 (got 0)"),
  (["--config", "shakespeare_char_baby", "--eval-every", "-1"], "--eval-every must be an integer >= 0 (got -1)"),
  (["--config", "shakespeare_char_baby", "--lr-end", "2"], "--lr-end must be in [0, 1] (a fraction of --lr) (got 2.0)"),
  (["--config", "shakespeare_char_baby", "--adam-b2", "1"], "--adam-b2 must be in [0, 1) (got 1.0)"),
  (["--config", "shakespeare_char_baby", "--warmup-epochs", "1"],
   "--warmup-steps (100) and --warmup-epochs (1.0) both set: give one"),
  (["--config", "shakespeare_char_baby", "--lr-schedule", "step"],
   "--lr-end applies to --lr-schedule cosine only (got --lr-schedule step)"),
  (["--config", "shakespeare_char_baby", "--num-train", "100"],
   "--num-train do not apply to --dataset text (a text file's size and vocabulary are its own)"),
  (["--data-file", "x.txt"], "--data-file names a text file, for --dataset text only (got --dataset fashion_mnist)"),
  (["--config", "shakespeare_char_baby", "--weight-decay-on", "norms"],
   "argument --weight-decay-on: invalid choice: 'norms'"),
])
def test_impossible_lm_options_are_one_line(args, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    configs.from_args(args)
  err = capsys.readouterr().err.strip()
  assert exit_.value.code == 2 and "\n" not in err and message in err, err


def test_too_many_eval_windows_is_one_line(tmp_path, capsys):
  line = _one_line_error(capsys, "--config", "shakespeare_char_baby", "--eval-windows", "200000", "--max-steps", "1",
                         "--workdir", tmp_path)
  assert line == "error: --eval-windows 200000 is more than the 111476 distinct windows of the validation split " \
                 "(111540 tokens, context 64)"
