"""tgq_jax.export: 2-bit packing, exact logits from the packed file, the size bound, the errors."""
import itertools
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgq_jax import export
from tgq_jax.models import create_model


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 9, 255, 1001])
def test_pack_round_trip_sizes_not_multiple_of_4(size):
  codes = np.random.default_rng(size).integers(-1, 2, size=size).astype(np.int8)
  packed = export.pack_codes(codes)
  assert packed.dtype == np.uint8 and packed.size == -(-size // 4)
  np.testing.assert_array_equal(export.unpack_codes(packed, (size,)), codes)


def test_pack_every_code_pattern_of_a_byte():
  patterns = np.array(list(itertools.product((-1, 0, 1), repeat=4)), np.int8)  # 81 patterns
  packed = export.pack_codes(patterns)
  np.testing.assert_array_equal(export.unpack_codes(packed, patterns.shape), patterns)


def test_pack_bit_layout_is_the_documented_one():
  # code i at bits 2*(i % 4); 00 = 0, 01 = +1, 10 = -1.
  packed = export.pack_codes(np.array([1, -1, 0, 1, -1], np.int8))
  assert packed.tolist() == [0b01_00_10_01, 0b00_00_00_10]


def test_unpack_rejects_invalid_pattern_and_wrong_length():
  with pytest.raises(export.PackedFormatError, match="invalid 2-bit pattern"):
    export.unpack_codes(np.array([0b11], np.uint8), (1,))
  with pytest.raises(export.PackedFormatError, match="expected"):
    export.unpack_codes(np.zeros(3, np.uint8), (5,))
  with pytest.raises(ValueError, match="codes must be in"):
    export.pack_codes(np.array([2]))


def _trained_like_variables(model, shape, seed=0):
  x = jax.random.normal(jax.random.key(seed + 1), (8, *shape))
  v = model.init(jax.random.key(seed), x, train=False)
  # Non-trivial batch statistics, as after training.
  _, stats = model.apply(v, x, train=True, mutable=["batch_stats"])
  return {"params": v["params"], **stats}, x


@pytest.mark.parametrize("quantizer,first,per_channel", [
  ("tga", True, False), ("tga", False, True), ("twn", True, False), ("ttq", False, False), ("fp", True, False)])
def test_packed_logits_equal_trained_logits_exactly(tmp_path, quantizer, first, per_channel):
  settings = export.model_settings("small_cnn", 10, quantizer=quantizer, ternary_first=first,
                                   per_channel=per_channel)
  model = create_model(**{**settings, "dtype": jnp.float32})
  variables, x = _trained_like_variables(model, (28, 28, 1))
  path = tmp_path / "m.tgq"
  report = export.export_variables(path, variables, settings, (28, 28, 1), extra={"note": "test"})
  loaded_model, loaded, header = export.load_packed(path)
  assert header["arch"] == "small_cnn" and header["quantizer"] == quantizer and header["note"] == "test"
  want = model.apply(variables, x, train=False)
  got = loaded_model.apply(loaded, x, train=False)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert path.stat().st_size < report.packed_bytes + 20_000  # payload + a JSON header
  if quantizer == "fp":
    assert report.ratio == 1.0


def test_size_bound_and_report(tmp_path):
  settings = export.model_settings("small_cnn", 10)
  model = create_model("small_cnn", 10)
  variables, _ = _trained_like_variables(model, (28, 28, 1))
  report = export.export_variables(tmp_path / "m.tgq", variables, settings, (28, 28, 1))
  ternary = [l for l in report.layers if l.ternary]
  assert [l.name for l in ternary] == ["conv0", "conv1", "conv2", "conv3", "head"]
  for layer in ternary:
    assert layer.fp32_bytes == 4 * layer.num_weights
    assert layer.packed_bytes == -(-layer.num_weights // 4) + 4  # codes + one float32 scale
    if layer.num_weights >= 480:
      assert layer.packed_bytes * 15 <= layer.fp32_bytes
  assert report.ternary_ratio <= 1 / 15
  text = report.format()
  assert "conv1" in text and "total" in text and "1/" in text
  json.dumps(report.as_dict())


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("packed") / "m.tgq"
  model = create_model("small_cnn", 10)
  variables, _ = _trained_like_variables(model, (28, 28, 1))
  export.export_variables(path, variables, export.model_settings("small_cnn", 10), (28, 28, 1))
  return path


def _rewrite_header(src, dst, change):
  blob = src.read_bytes()
  magic, version, n = struct.unpack_from("<4sIQ", blob)
  header = json.loads(blob[16:16 + n])
  change(header)
  new = json.dumps(header).encode()
  dst.write_bytes(struct.pack("<4sIQ", magic, version, len(new)) + new + blob[16 + n:])


def test_errors_truncated_corrupt_version_arch(packed_file, tmp_path):
  blob = packed_file.read_bytes()
  bad = tmp_path / "bad.tgq"
  cases = [
    (blob[:10], "truncated"),
    (blob[:40], "truncated inside the header"),
    (blob[:-7], "truncated or padded payload"),
    (b"XXXX" + blob[4:], "not a tgq_jax packed model"),
    (blob[:4] + struct.pack("<I", 99) + blob[8:], "format version 99"),
    (blob[:-1] + bytes([blob[-1] ^ 0xFF]), "SHA-256"),
  ]
  for data, message in cases:
    bad.write_bytes(data)
    with pytest.raises(export.PackedFormatError, match=message):
      export.load_packed(bad)
  _rewrite_header(packed_file, bad, lambda h: h.update(arch="resnet9000"))
  with pytest.raises(export.PackedFormatError, match="unknown arch 'resnet9000'"):
    export.load_packed(bad)
  _rewrite_header(packed_file, bad, lambda h: h["tensors"][0].update(shape=[3, 3]))
  with pytest.raises(export.PackedFormatError, match="corrupt tensor entry|expected"):
    export.load_packed(bad)


def test_export_cli_from_a_train_workdir_gives_the_checkpoint_logits(tmp_path, capsys):
  from trainer_helpers import quick  # registers the tiny test archs
  from tgq_jax import checkpoints, train_lib

  workdir = tmp_path / "run"
  train_lib.train_and_evaluate(quick(workdir, max_steps=3), verbose=False)
  out = tmp_path / "model.tgq"
  assert export.main(["--workdir", str(workdir), "--out", str(out),
                      "--report-json", str(tmp_path / "r.json")]) == 0
  printed = capsys.readouterr().out
  assert "wrote" in printed and "ternary layers: packed/fp32" in printed
  assert json.loads((tmp_path / "r.json").read_text())["packed_bytes"] > 0

  loaded_model, loaded, header = export.load_packed(out)
  assert header["arch"] == "tiny_cnn" and header["dataset"] == "synthetic"
  trained = create_model("tiny_cnn", 10, quantizer="tga")
  variables = checkpoints.load_variables(str(workdir))
  x = jax.random.normal(jax.random.key(3), (5, 28, 28, 1))
  np.testing.assert_array_equal(np.asarray(loaded_model.apply(loaded, x, train=False)),
                                np.asarray(trained.apply(variables, x, train=False)))


def test_export_cli_errors_are_one_line(tmp_path, capsys):
  assert export.main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "m.tgq")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and "config.json" in err and err.count("\n") == 1
