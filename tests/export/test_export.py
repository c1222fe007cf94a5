"""tgq_jax.export: 2-bit packing, exact logits from the packed file, the size bound, the errors."""
import hashlib
import itertools
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tgq_jax
from tgq_jax import export
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models import ModelSpec, create_model
from tgq_jax.core.policy import QuantPolicy

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference")


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


@pytest.mark.parametrize("suffix", ["tgq", "safetensors"])
@pytest.mark.parametrize("quantizer,first,per_channel", [
  ("tga", True, False), ("tga", False, True), ("twn", True, False), ("ttq", False, False), ("fp", True, False)])
def test_packed_logits_equal_trained_logits_exactly(tmp_path, quantizer, first, per_channel, suffix):
  spec = ModelSpec("small_cnn", 10, QuantPolicy(quantizer, per_channel=per_channel, ternary_first=first))
  model = spec.build()
  variables, x = _trained_like_variables(model, (28, 28, 1))
  path = tmp_path / f"m.{suffix}"
  report = export.export_variables(path, variables, spec, (28, 28, 1), extra={"note": "test"})
  loaded_model, loaded, header = export.load_packed(path)
  assert ModelSpec.from_dict(header["spec"]) == spec and header["note"] == "test"
  assert header["format_version"] == export.FORMAT_VERSION == 3
  want = model.apply(variables, x, train=False)
  got = loaded_model.apply(loaded, x, train=False)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Packed inference: codes and scales resident, kernels rebuilt in the forward pass, eager and jitted.
  packed_model, packed, _ = export.load_packed(path, packed=True)
  assert packed_model.policy.quantizer == ("fp" if quantizer == "fp" else f"packed:{quantizer}")
  np.testing.assert_array_equal(np.asarray(packed_model.apply(packed, x, train=False)), np.asarray(want))
  jitted = jax.jit(lambda v, x: packed_model.apply(v, x, train=False))
  np.testing.assert_allclose(np.asarray(jitted(packed, x)), np.asarray(want), rtol=0,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))
  assert path.stat().st_size < report.packed_bytes + 20_000  # payload + a JSON header
  if quantizer == "fp":
    assert report.ratio == 1.0


def test_size_bound_and_report(tmp_path):
  model = create_model("small_cnn", 10)
  variables, _ = _trained_like_variables(model, (28, 28, 1))
  report = export.export_variables(tmp_path / "m.tgq", variables, ModelSpec("small_cnn", 10), (28, 28, 1))
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
  export.export_variables(path, variables, ModelSpec("small_cnn", 10), (28, 28, 1))
  return path


def _flat_settings(header: dict) -> dict:
  """A header naming its model by ``spec`` rewritten with the flat settings of versions 1 and 2."""
  if "spec" not in header:
    return header
  spec = header["spec"]
  policy = spec["policy"]
  flat = dict(arch=spec["arch"], num_classes=spec["num_classes"], quantizer=policy["quantizer"],
              per_channel=policy["per_channel"], ternary_first=policy["ternary_first"],
              ternary_last=policy["ternary_last"], dtype=spec["dtype"])
  first = {k: header[k] for k in ("format_version", "tgq_jax_version")}
  return {**first, **flat, **{k: v for k, v in header.items() if k not in first and k != "spec"}}


def _to_v1(blob: bytes) -> bytes:
  """A .tgq file rewritten in version 1's layout: no trailer, the payload's SHA-256 and the flat settings
  in the header."""
  _, _, n = struct.unpack_from("<4sIQ", blob)
  header = _flat_settings(json.loads(blob[16:16 + n]))
  payload = blob[16 + n:-32]
  header.update(format_version=1, payload_sha256=hashlib.sha256(payload).hexdigest())
  new = json.dumps(header).encode()
  return struct.pack("<4sIQ", b"TGQ\x00", 1, len(new)) + new + payload


def _rewrite_tgq(blob: bytes, change) -> bytes:
  """A .tgq file of version 2 or 3 with its header changed by ``change`` and a valid trailer."""
  _, version, n = struct.unpack_from("<4sIQ", blob)
  header = json.loads(blob[16:16 + n])
  change(header)
  new = json.dumps(header).encode()
  body = struct.pack("<4sIQ", b"TGQ\x00", version, len(new)) + new + blob[16 + n:-32]
  return body + hashlib.sha256(body).digest()


def _rewrite_v1_header(blob: bytes, change) -> bytes:
  _, _, n = struct.unpack_from("<4sIQ", blob)
  header = json.loads(blob[16:16 + n])
  change(header)
  new = json.dumps(header).encode()
  return struct.pack("<4sIQ", b"TGQ\x00", 1, len(new)) + new + blob[16 + n:]


def test_errors_truncated_corrupt_version_arch(packed_file, tmp_path):
  blob = packed_file.read_bytes()
  bad = tmp_path / "bad.tgq"
  cases = [
    (b"", "truncated"),
    (blob[:10], "truncated"),
    (blob[:40], "truncated"),
    (blob[:-7], "SHA-256"),
    (blob + b"\x00", "SHA-256"),
    (b"XXXX" + blob[4:], "neither a tgq_jax .tgq file nor a safetensors file"),
    (blob[:4] + struct.pack("<I", 99) + blob[8:], "format version 99"),
    (blob[:-1] + bytes([blob[-1] ^ 0xFF]), "SHA-256"),
    (blob[:20] + bytes([blob[20] ^ 1]) + blob[21:], "SHA-256"),  # inside the header: covered too
  ]
  for data, message in cases:
    bad.write_bytes(data)
    with pytest.raises(export.PackedFormatError, match=message):
      export.load_packed(bad)
  v1 = _to_v1(blob)
  for change, message in [(lambda h: h.update(arch="resnet9000"), "unknown arch 'resnet9000'"),
                          (lambda h: h["tensors"][0].update(shape=[3, 3]), "tensor|expected"),
                          (lambda h: h["tensors"][1]["scale"].update(offset=3), "do not tile|does not fit"),
                          (lambda h: h["tensors"][0].update(path=["conv9", "kernel"]), "do not match the model")]:
    bad.write_bytes(_rewrite_v1_header(v1, change))
    with pytest.raises(export.PackedFormatError, match=message):
      export.load_packed(bad)
  bad.write_bytes(v1[:-1] + bytes([v1[-1] ^ 0xFF]))
  with pytest.raises(export.PackedFormatError, match="SHA-256"):
    export.load_packed(bad)
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(export.PackedFormatError, match="neither"):
    export.load_packed(bad)
  with pytest.raises(export.PackedFormatError, match="directory"):
    export.load_packed(tmp_path)


def test_reads_version_1_files(packed_file, tmp_path):
  model = create_model("small_cnn", 10)
  variables, x = _trained_like_variables(model, (28, 28, 1))
  v2 = tmp_path / "m.tgq"
  export.export_variables(v2, variables, ModelSpec("small_cnn", 10), (28, 28, 1))
  v1 = tmp_path / "old.tgq"
  v1.write_bytes(_to_v1(v2.read_bytes()))
  want = np.asarray(model.apply(variables, x, train=False))
  for packed in (False, True):
    loaded_model, loaded, header = export.load_packed(v1, packed=packed)
    assert header["format_version"] == 1
    np.testing.assert_array_equal(np.asarray(loaded_model.apply(loaded, x, train=False)), want)


def test_spec_errors_name_the_problem(packed_file, tmp_path):
  """A version-3 header (checksum recomputed) naming a model this process cannot build."""
  blob = packed_file.read_bytes()
  bad = tmp_path / "bad.tgq"
  for change, message in [
      (lambda spec: spec.update(arch="resnet9000"), "unknown arch 'resnet9000'"),
      (lambda spec: spec.update(arch="no_such_module_xyz:Net"), "cannot be imported here"),
      (lambda spec: spec.update(arch="export_models:NoSuchNet"), "cannot be imported here"),
      (lambda spec: spec.update(arch="export_models:ConvHead", kwargs={"bogus": 1}), "cannot build the model"),
      (lambda spec: spec["policy"].update(quantizer="nope"), "corrupt model spec.*unknown quantizer 'nope'"),
      (lambda spec: spec.pop("policy"), "corrupt model spec.*missing policy")]:
    bad.write_bytes(_rewrite_tgq(blob, lambda h: change(h["spec"])))
    with pytest.raises(export.PackedFormatError, match=message):
      export.load_packed(bad)
  bad.write_bytes(_rewrite_tgq(blob, lambda h: h.pop("spec")))
  with pytest.raises(export.PackedFormatError, match="header lacks arch"):
    export.load_packed(bad)


@pytest.mark.parametrize("suffix", ["tgq", "safetensors"])
def test_a_users_linen_model_exports_and_loads_with_identical_logits(tmp_path, suffix):
  """A plain Linen module of the user's (conv, BatchNorm, attention, dense), ternarized per channel by
  tgq_jax.ternarize_model, named by its import path: the file rebuilds it, both forms give its logits."""
  import export_models

  policy = QuantPolicy("tga", per_channel=True)
  model = tgq_jax.ternarize_model(export_models.TinyNet(num_classes=10), policy)
  variables, x = _trained_like_variables(model, (8, 8, 3))
  layers = quantized_layers(model, x, train=False)
  assert layers[("attn", "query")].per_channel == (1, 2) and layers[("head",)].per_channel == (1,)
  want = np.asarray(model.apply(variables, x, train=False))
  spec = ModelSpec("export_models:TinyNet", 10, policy)
  path = tmp_path / f"m.{suffix}"
  export.export_variables(path, variables, spec, (8, 8, 3))
  for packed in (False, True):
    loaded_model, loaded, header = export.load_packed(path, packed=packed)
    assert ModelSpec.from_dict(header["spec"]) == spec
    np.testing.assert_array_equal(np.asarray(loaded_model.apply(loaded, x, train=False)), want)
  # The packed form holds codes and one scale per (head, head_dim) feature of each attention projection.
  query = loaded["params"]["attn"]["query"]
  assert sorted(query) == ["bias", "codes", "scale"] and query["scale"].shape == (2, 4)
  assert query["codes"].dtype == jnp.uint8 and query["codes"].shape == (4, 4)  # planar: (ceil(8 * 2 / 4), 4)
  assert "delta" not in query and loaded["batch_stats"]["bn"]["var"].shape == (8,)


@pytest.mark.parametrize("quantizer,per_channel", [("tga", True), ("ttq", False)])
def test_end_of_run_sizes_and_the_export_report_agree(tmp_path, quantizer, per_channel):
  """harness's end-of-run size line and export's SizeReport are one function's numbers, and they are
  the bytes each container stores (planar codes in .safetensors, C-order codes in .tgq)."""
  import export_models
  from safetensors.numpy import load_file
  from tgq_jax.export import sizes
  from tgq_jax.training import harness

  spec = ModelSpec("export_models:TinyNet", 10, QuantPolicy(quantizer, per_channel=per_channel))
  model = spec.build()
  variables, x = _trained_like_variables(model, (8, 8, 3))
  layers = quantized_layers(model, x, train=False)
  safetensors_report = export.export_variables(tmp_path / "m.safetensors", variables, spec, (8, 8, 3))
  tgq_report = export.export_variables(tmp_path / "m.tgq", variables, spec, (8, 8, 3))
  fp32_bits, packed_bits = harness.model_size_bits(variables, layers)
  assert (fp32_bits, packed_bits) == (8 * safetensors_report.fp32_bytes, 8 * safetensors_report.packed_bytes)
  assert harness.model_size_bits(variables["params"], layers)[0] < fp32_bits  # params alone: no batch_stats
  line = harness.format_report({"accuracy": 0.5}, [], (fp32_bits, packed_bits)).splitlines()[-1]
  assert f"-> 2-bit ternary {safetensors_report.packed_bytes / 1024:.1f} KiB" in line

  # What is stored: every tensor of the .safetensors file; the .tgq payload.
  assert safetensors_report.packed_bytes == sum(a.nbytes for a in load_file(str(tmp_path / "m.safetensors")).values())
  assert tgq_report.packed_bytes == export.read_packed(tmp_path / "m.tgq")[0]["payload_bytes"]
  assert tgq_report.fp32_bytes == safetensors_report.fp32_bytes
  # The full-precision twin's size: every leaf but the quantizer's own, at 4 bytes.
  fp_variables = export_models.TinyNet(10).init(jax.random.key(0), x, train=False)
  assert safetensors_report.fp32_bytes == 4 * sum(a.size for a in jax.tree.leaves(fp_variables))
  ternary = {l.name: l for l in safetensors_report.layers if l.ternary}
  assert list(ternary) == ["/".join(p) for p, q in layers.items() if q.ternary]
  scales = 2 * 4 if quantizer == "ttq" else 4 * 2 * 4  # per channel: one per (head, head_dim)
  assert ternary["attn/query"].packed_bytes == 4 * 4 + scales  # planar codes (ceil(8 * 2 / 4), 4) + scales
  assert sizes.code_bytes((3, 3, 1, 4), "planar") == 3 * 4 and sizes.code_bytes((3, 3, 1, 4), "c_order") == 9


def test_files_written_by_the_previous_release_still_load(tmp_path):
  """Version-2 files written by tgq_jax before ModelSpec (flat header keys; tests/reference/README.md), and a
  version-1 rewrite of each .tgq: the logits of the model that wrote them, in both forms."""
  import trainer_helpers  # noqa: F401  (registers tiny_cnn)

  expected = np.load(os.path.join(DATA, "legacy_v2_expected.npz"))
  specs = {"tga_pc": ModelSpec("tiny_cnn", 10, QuantPolicy("tga", per_channel=True, ternary_first=False)),
           "ttq": ModelSpec("tiny_cnn", 10, QuantPolicy("ttq", ternary_last=False))}
  for name in ("legacy_v2_tga_pc.tgq", "legacy_v2_tga_pc.safetensors", "legacy_v2_ttq.tgq"):
    key = name.split(".")[0].removeprefix("legacy_v2_")
    paths = {2: os.path.join(DATA, name)}
    if name.endswith(".tgq"):
      paths[1] = tmp_path / f"v1_{name}"
      paths[1].write_bytes(_to_v1(open(paths[2], "rb").read()))
    for version, path in paths.items():
      for packed in (False, True):
        model, variables, header = export.load_packed(path, packed=packed)
        assert header["format_version"] == version and header["arch"] == "tiny_cnn"
        assert ModelSpec.from_dict(header["spec"]) == specs[key]
        np.testing.assert_array_equal(np.asarray(model.apply(variables, expected["x"], train=False)),
                                      expected[f"{key}_logits"])
    if key == "ttq":  # conv0's entry has a null neg_scale (equal scales, stored once): the scale; conv1 its own
      assert not np.array_equal(variables["params"]["conv1"]["neg_scale"], variables["params"]["conv1"]["scale"])
      np.testing.assert_array_equal(variables["params"]["conv0"]["neg_scale"], variables["params"]["conv0"]["scale"])


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
  """A tiny ternary model (conv 3x3x1x4, dense 4x10; TTQ, so a neg_scale too) in both containers."""
  root = tmp_path_factory.mktemp("tiny")
  spec = ModelSpec("export_models:ConvHead", 10, QuantPolicy("ttq"))
  model = spec.build()
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  paths = {}
  for suffix in ("tgq", "safetensors"):
    paths[suffix] = root / f"m.{suffix}"
    export.export_variables(paths[suffix], variables, spec, (6, 6, 1), extra={"dataset": "synthetic"})
  return paths


@pytest.mark.parametrize("suffix", ["tgq", "safetensors"])
def test_every_single_byte_change_and_truncation_is_rejected(tiny_files, tmp_path, suffix):
  blob = tiny_files[suffix].read_bytes()
  export.load_packed(tiny_files[suffix])  # the intact file loads
  bad = tmp_path / f"bad.{suffix}"
  for i in range(len(blob)):  # every byte, the header's included
    for flip in (0x01, 0xFF):
      bad.write_bytes(blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1:])
      with pytest.raises(export.PackedFormatError):
        export.load_packed(bad)
  for n in sorted({0, 1, 7, 8, 9, 15, 16, 17, len(blob) // 2, len(blob) - 33, len(blob) - 1}):
    bad.write_bytes(blob[:n])
    with pytest.raises(export.PackedFormatError):
      export.load_packed(bad)


def test_version_1_header_changes_are_caught_by_validation(tiny_files, tmp_path):
  """Version 1 has no checksum over its header: every entry is validated against the payload and the model.

  Each digit of the tensor entries (offsets, sizes, shapes, names) changed to another digit,
  and each letter to another letter (the JSON stays valid), must be an error.
  """
  v1 = _to_v1(tiny_files["tgq"].read_bytes())
  start = v1.index(b'"tensors"', 16)
  end = v1.index(b', "dataset"', start)  # the extra facts after the entries are not checked (nor checkable)
  bad = tmp_path / "bad.tgq"
  changed = 0
  for i in range(start + len(b'"tensors"'), end):
    c = chr(v1[i])
    if c.isdigit():
      new = str((int(c) + 1) % 10)
    elif c.isalpha() and c.islower():
      new = "q" if c != "q" else "r"
    else:
      continue
    bad.write_bytes(v1[:i] + new.encode() + v1[i + 1:])
    with pytest.raises(export.PackedFormatError):
      export.load_packed(bad)
    changed += 1
  assert changed > 100


def test_safetensors_file_is_standard_and_holds_the_packed_variables(tiny_files):
  from safetensors.numpy import load_file
  from safetensors import safe_open

  tensors = load_file(str(tiny_files["safetensors"]))
  assert sorted(tensors) == ["params/conv/bias", "params/conv/codes", "params/conv/neg_scale", "params/conv/scale",
                             "params/head/bias", "params/head/codes", "params/head/neg_scale", "params/head/scale"]
  assert tensors["params/conv/codes"].dtype == np.uint8 and tensors["params/conv/codes"].shape == (3, 4)  # ceil(9/4)
  with safe_open(str(tiny_files["safetensors"]), "np") as f:
    metadata = f.metadata()
  assert metadata["format"] == "tgq_jax.packed" and metadata["format_version"] == str(export.FORMAT_VERSION)
  assert json.loads(metadata["model"])["spec"]["arch"] == "export_models:ConvHead"
  assert json.loads(metadata["ternary"])["conv"] == {"kernel_shape": [3, 3, 1, 4]}
  _, _, header = export.load_packed(tiny_files["safetensors"])
  assert header["dataset"] == "synthetic" and header["image_shape"] == [6, 6, 1]


def test_export_refuses_non_finite_models_and_directories(tmp_path):
  spec = ModelSpec("small_cnn", 10)
  model = create_model("small_cnn", 10)
  variables, _ = _trained_like_variables(model, (28, 28, 1))
  broken = jax.tree.map(lambda a: a, variables)
  broken["batch_stats"]["bn1"]["var"] = broken["batch_stats"]["bn1"]["var"].at[0].set(jnp.inf)
  for suffix in ("tgq", "safetensors"):
    with pytest.raises(ValueError, match="non-finite.*batch_stats/bn1/var"):
      export.export_variables(tmp_path / f"m.{suffix}", broken, spec, (28, 28, 1))
  with pytest.raises(ValueError, match="is a directory"):
    export.export_variables(tmp_path, variables, spec, (28, 28, 1))
  with pytest.raises(ValueError, match="spec, tensors are keys of the file format"):
    export.export_variables(tmp_path / "m.tgq", variables, spec, (28, 28, 1), extra={"tensors": 1, "spec": 2})
  with pytest.raises(ValueError, match="packed inference form"):
    export.export_variables(tmp_path / "m.tgq", variables, ModelSpec("small_cnn", 10, QuantPolicy("packed:tga")),
                            (28, 28, 1))
  assert sorted(os.listdir(tmp_path)) == []  # nothing written, no temporary left behind


@pytest.mark.parametrize("suffix", ["safetensors", "tgq"])
def test_export_cli_from_a_train_workdir_gives_the_checkpoint_logits(tmp_path, capsys, suffix):
  from trainer_helpers import quick  # registers the tiny test archs
  from tgq_jax.training import checkpoints, harness

  workdir = tmp_path / "run"
  summary = harness.train_and_evaluate(quick(workdir, max_steps=3), verbose=False)
  out = tmp_path / f"model.{suffix}"
  assert export.main(["--workdir", str(workdir), "--out", str(out),
                      "--report-json", str(tmp_path / "r.json")]) == 0
  printed = capsys.readouterr().out
  assert "wrote" in printed and "ternary layers: packed/fp32" in printed
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["packed_bytes"] > 0
  if suffix == "safetensors":  # the end-of-run table counts what a .safetensors export stores (planar codes)
    assert (f"FP32 {report['fp32_bytes'] / 1024:.1f} KiB -> 2-bit ternary {report['packed_bytes'] / 1024:.1f} KiB"
            in summary["report"]), summary["report"]

  trained = create_model("tiny_cnn", 10, quant=QuantPolicy("tga"))
  variables = checkpoints.load_variables(str(workdir))
  x = jax.random.normal(jax.random.key(3), (5, 28, 28, 1))
  want = np.asarray(trained.apply(variables, x, train=False))
  for packed in (False, True):
    loaded_model, loaded, header = export.load_packed(out, packed=packed)
    assert header["spec"]["arch"] == "tiny_cnn" and header["dataset"] == "synthetic"
    np.testing.assert_array_equal(np.asarray(loaded_model.apply(loaded, x, train=False)), want)

  # A workdir written before config.json held the model spec: the same spec, from the run's options.
  config = json.loads((workdir / "config.json").read_text())
  model_entry = config.pop("model")
  assert model_entry == header["spec"]
  (workdir / "config.json").write_text(json.dumps(config))
  old = tmp_path / f"old.{suffix}"
  assert export.main(["--workdir", str(workdir), "--out", str(old)]) == 0
  loaded_model, loaded, header = export.load_packed(old)
  assert header["spec"] == model_entry
  np.testing.assert_array_equal(np.asarray(loaded_model.apply(loaded, x, train=False)), want)


def test_export_cli_errors_are_one_line(tmp_path, capsys):
  def error(*argv):
    assert export.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    return err

  assert "config.json" in error("--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "m.tgq"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({
    "config": {"arch": "small_cnn", "quantizer": "tga", "per_channel": False, "ternary_first": True,
               "ternary_last": True},
    "dataset_info": {"name": "synthetic", "num_classes": 10, "image_shape": [28, 28, 1]}}))
  err = error("--workdir", str(workdir), "--out", str(tmp_path / "m.safetensors"))
  assert "no checkpoint to export" in err and "--init-from" not in err
  out_dir = tmp_path / "out.safetensors"
  out_dir.mkdir()
  assert "is a directory" in error("--workdir", str(workdir), "--out", str(out_dir))
  assert "is a directory" in error("--workdir", str(workdir), "--out", str(tmp_path))
  assert os.listdir(out_dir) == [] and not any(".tmp-" in p.name for p in tmp_path.iterdir())
  assert "must end in .safetensors or .tgq" in error("--workdir", str(workdir), "--out", str(tmp_path / "m.bin"))
