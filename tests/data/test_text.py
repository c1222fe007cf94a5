"""Text data for language models: the file's checks, the 90/10 split, train windows per (seed, step), eval windows."""
from __future__ import annotations

import numpy as np
import pytest

from tgq_jax import data
from tgq_jax.data.text import TextDataset, Vocabulary, default_text_file, load_text_dataset

TEXT = "".join(chr(ord("a") + (i * 7) % 26) for i in range(1000))  # 1,000 characters, 26 distinct


def _dataset(context=8, eval_windows=0, text=TEXT, kind="chars"):
  return TextDataset(text, Vocabulary.of_text(text, kind), context, eval_windows=eval_windows)


def test_the_committed_corpus_is_nanogpt_s_shakespeare_char():
  d = data.get_dataset("text", context=64, eval_windows=240)
  # nanoGPT's data/shakespeare_char/prepare.py: 65 characters, 1,003,854 train and 111,540 val tokens.
  assert (d.info.num_classes, d.info.num_train, d.info.num_test) == (65, 1_003_854, 111_540)
  assert d.vocabulary.chars == "".join(sorted(set(open(default_text_file(), encoding="utf-8").read())))
  assert d.info.chars_per_token == 1.0


def test_the_split_is_the_first_90_percent_and_the_last_10():
  d = _dataset()
  tokens = Vocabulary.of_text(TEXT).encode(TEXT)
  np.testing.assert_array_equal(d.train_tokens, tokens[:900])
  np.testing.assert_array_equal(d.val_tokens, tokens[900:])


def test_a_train_batch_is_windows_of_context_plus_one_drawn_from_seed_and_step():
  d = _dataset(context=8)
  batch = d.train_batch(5, global_batch_size=6, seed=3)["tokens"]
  assert batch.shape == (6, 9) and batch.dtype == np.int32
  starts = np.random.default_rng([3, 5]).integers(0, 900 - 8, size=6)  # every start with a whole window
  for row, s in zip(batch, starts):
    np.testing.assert_array_equal(row, d.train_tokens[s:s + 9])
  # The last possible window ends at the split's last token; none reaches into validation.
  assert (starts + 9 <= 900).all()
  again = d.train_batch(5, global_batch_size=6, seed=3)["tokens"]
  np.testing.assert_array_equal(batch, again)
  assert not np.array_equal(batch, d.train_batch(6, global_batch_size=6, seed=3)["tokens"])
  assert not np.array_equal(batch, d.train_batch(5, global_batch_size=6, seed=4)["tokens"])


def test_the_starts_cover_exactly_the_split_s_windows():
  d = _dataset(context=8)
  starts = np.concatenate([d.train_starts(s, global_batch_size=512, seed=0) for s in range(20)])
  assert starts.min() == 0 and starts.max() == 900 - 8 - 1


def test_the_iterator_state_is_the_step_and_a_restored_iterator_continues_identically():
  d = _dataset()
  it = d.train_iterator(global_batch_size=4, seed=1, process_index=0, process_count=1, num_devices=1)
  first = [next(it)["tokens"] for _ in range(5)]
  state = it.get_state()
  assert state == {"step": 5, "seed": 1, "global_batch_size": 4, "dataset": "text"}
  later = [next(it)["tokens"] for _ in range(3)]
  other = d.train_iterator(global_batch_size=4, seed=1, process_index=0, process_count=1, num_devices=1)
  other.set_state(state)
  for a, b in zip(later, [next(other)["tokens"] for _ in range(3)]):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(first[0], d.train_batch(0, global_batch_size=4, seed=1)["tokens"])
  with pytest.raises(ValueError, match="does not belong"):
    other.set_state({**state, "seed": 2})


def test_each_host_gets_its_rows_of_the_single_host_batch():
  d = _dataset()
  whole = d.train_batch(7, global_batch_size=8, seed=0)["tokens"]
  parts = [d.train_batch(7, global_batch_size=8, seed=0, process_index=p, process_count=4)["tokens"] for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  evals = [list(d.eval_batches(global_batch_size=8, process_index=p, process_count=2, num_devices=2)) for p in (0, 1)]
  single = list(d.eval_batches(global_batch_size=8, process_index=0, process_count=1, num_devices=2))
  assert len(evals[0]) == len(evals[1]) == len(single)
  for a, b, s in zip(*evals, single):
    np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), s["tokens"])
    np.testing.assert_array_equal(np.concatenate([a["mask"], b["mask"]]), s["mask"])


def test_every_non_overlapping_window_predicts_each_validation_token_once():
  d = _dataset(context=8)  # 100 validation tokens: windows at 0, 8, ..., 88 (each 9 tokens long)
  np.testing.assert_array_equal(d.eval_starts(), np.arange(12) * 8)
  batches = list(d.eval_batches(global_batch_size=5, process_index=0, process_count=1, num_devices=1))
  tokens = np.concatenate([b["tokens"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [1.0] * 12 + [0.0] * 3  # 3 batches of 5, the last padded
  targets = tokens[mask == 1][:, 1:].reshape(-1)
  np.testing.assert_array_equal(targets, d.val_tokens[1:97])
  assert (tokens[mask == 0] == 0).all()


def test_fixed_eval_windows_are_evenly_spaced_and_the_same_every_time():
  d = _dataset(context=8, eval_windows=5)
  np.testing.assert_array_equal(d.eval_starts(), [0, 23, 46, 68, 91])  # 0 .. 100 - 8 - 1
  a = [b["tokens"] for b in d.eval_batches(global_batch_size=4, process_index=0, process_count=1, num_devices=1)]
  b = [b["tokens"] for b in d.eval_batches(global_batch_size=4, process_index=0, process_count=1, num_devices=1)]
  np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
  np.testing.assert_array_equal(np.concatenate(a)[4], d.val_tokens[91:100])
  with pytest.raises(ValueError, match="more than the 92 distinct windows"):
    _dataset(context=8, eval_windows=93)


def test_an_eval_batch_is_no_larger_than_the_windows_need():
  d = _dataset(context=8, eval_windows=6)
  batches = list(d.eval_batches(global_batch_size=1000, process_index=0, process_count=1, num_devices=4))
  assert len(batches) == 1 and batches[0]["tokens"].shape == (8, 9)  # 6 windows, rounded up to 4 devices


def test_bytes_count_characters_for_bits_per_character():
  text = "é" * 500 + "a" * 500  # validation: 100 "a" bytes (1,500 bytes in all)
  d = _dataset(text=text, kind="bytes")
  assert d.info.num_classes == 256 and d.info.chars_per_token == 1.0
  d = _dataset(text="a" * 100 + "é" * 900, kind="bytes")  # validation: 180 bytes, 90 characters
  assert d.info.chars_per_token == pytest.approx(0.5)


@pytest.mark.parametrize("content, message", [
  (None, r"--data-file .*nothing\.txt: no such file$"),
  (b"", r"--data-file .*\.txt is empty$"),
  (b"\xff\xfe\x00binary", r"--data-file .*\.txt is not UTF-8 text \(byte 0 cannot be decoded\)$"),
  (b"text\x00with a NUL byte" * 10, r"--data-file .*\.txt holds NUL bytes: a binary file, not text$"),
  (b"short text, one window of 64 does not fit", r"--data-file .*\.txt is too short: its training split .* holds "
                                                 r"\d+ tokens, fewer than one window of context \+ 1 = 65$"),
  (b"x" * 600, r"--data-file .*\.txt is too short: its validation split .* holds 60 tokens, fewer than one window "
               r"of context \+ 1 = 65$"),
])
def test_a_file_that_cannot_train_is_one_line_naming_it(tmp_path, content, message):
  path = tmp_path / ("nothing.txt" if content is None else "corpus.txt")
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(ValueError, match=message) as e:
    load_text_dataset(str(path), context=64)
  assert "\n" not in str(e.value)


def test_a_directory_is_not_a_text_file(tmp_path):
  with pytest.raises(ValueError, match="is a directory, not a text file"):
    data.get_dataset("text", data_file=str(tmp_path), context=8)
