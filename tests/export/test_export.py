"""tgq_jax.export: exact logits from the packed file, the size bound, the errors, tampering."""
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tgq_jax
from packed_files import rewrite, rewrite_model, rewrite_spec
from tgq_jax import export
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models import ModelSpec, create_model


def _trained_like_variables(model, shape, seed=0):
  x = jax.random.normal(jax.random.key(seed + 1), (8, *shape))
  v = model.init(jax.random.key(seed), x, train=False)
  # Non-trivial batch statistics, as after training.
  _, stats = model.apply(v, x, train=True, mutable=["batch_stats"])
  return {"params": v["params"], **stats}, x


@pytest.mark.parametrize("quantizer,first,per_channel", [
  ("tga", True, False), ("tga", False, True), ("twn", True, False), ("ttq", False, False), ("fp", True, False)])
def test_packed_logits_equal_trained_logits_exactly(tmp_path, quantizer, first, per_channel):
  spec = ModelSpec("small_cnn", 10, QuantPolicy(quantizer, per_channel=per_channel, ternary_first=first))
  model = spec.build()
  variables, x = _trained_like_variables(model, (28, 28, 1))
  path = tmp_path / "m.safetensors"
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
  assert path.stat().st_size < report.packed_bytes + 20_000  # tensors + a JSON header
  if quantizer == "fp":
    assert report.ratio == 1.0


def test_size_bound_and_report(tmp_path):
  model = create_model("small_cnn", 10)
  variables, _ = _trained_like_variables(model, (28, 28, 1))
  report = export.export_variables(tmp_path / "m.safetensors", variables, ModelSpec("small_cnn", 10), (28, 28, 1))
  ternary = [l for l in report.layers if l.ternary]
  assert [l.name for l in ternary] == ["conv0", "conv1", "conv2", "conv3", "head"]
  kernels = {"/".join(p): v["kernel"].shape for p, v in
             [((k,), variables["params"][k]) for k in ("conv0", "conv1", "conv2", "conv3", "head")]}
  for layer in ternary:
    shape = kernels[layer.name]
    k = int(np.prod(shape[:-1]))
    assert layer.fp32_bytes == 4 * layer.num_weights
    assert layer.packed_bytes == -(-k // 4) * shape[-1] + 4  # planar codes (ceil(K/4), N) + one float32 scale
    if layer.num_weights >= 480:
      assert layer.packed_bytes * 15 <= layer.fp32_bytes
  assert report.ternary_ratio <= 1 / 15
  text = report.format()
  assert "conv1" in text and "total" in text and "1/" in text
  json.dumps(report.as_dict())


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("packed") / "m.safetensors"
  model = create_model("small_cnn", 10)
  variables, _ = _trained_like_variables(model, (28, 28, 1))
  export.export_variables(path, variables, ModelSpec("small_cnn", 10), (28, 28, 1))
  return path


def _flip_version_digit(blob: bytes) -> bytes:
  """``blob`` with the last digit of the header's tgq_jax_version changed (same length, still valid JSON)."""
  key = b'"tgq_jax_version":"'
  i = blob.index(key) + len(key)
  j = blob.index(b'"', i) - 1
  return blob[:j] + bytes([ord("0") + (blob[j] - ord("0") + 1) % 10]) + blob[j + 1:]


def test_errors_truncated_corrupt_version_arch(packed_file, tmp_path):
  blob = packed_file.read_bytes()
  (n,) = struct.unpack_from("<Q", blob)
  bad = tmp_path / "bad.safetensors"
  cases = [
    (b"", "truncated"),
    (blob[:7], "truncated"),
    (blob[:40], "not a safetensors file, or truncated"),
    (blob[:-7], "SHA-256|do not tile|cover"),
    (blob + b"\x00", "SHA-256|cover"),
    (b"XXXXXXXX" + blob[8:], "not a safetensors file"),
    (blob[:-1] + bytes([blob[-1] ^ 0xFF]), "SHA-256"),
    (_flip_version_digit(blob), "SHA-256"),  # inside the header (a field nothing else checks): covered too
    (blob[:8] + blob[8:8 + n].rstrip()[:-1].ljust(n) + blob[8 + n:], "JSON"),  # the closing brace dropped
    (rewrite(blob, lambda h: h["__metadata__"].update(format_version="99")), "format version '99'"),
    (rewrite(blob, lambda h: h["__metadata__"].update(format="other")), "not a tgq_jax packed model"),
    (rewrite(blob, lambda h: h.pop("__metadata__")), "not a tgq_jax packed model"),
    (rewrite_spec(blob, lambda s: s.update(arch="resnet9000")), "unknown arch 'resnet9000'"),
    (rewrite(blob, lambda h: h["params/conv0/codes"].update(shape=[3, 3])), "bytes stored"),
    (rewrite(blob, lambda h: h["params/conv0/scale"].update(data_offsets=[3, 7])), "do not tile"),
    (rewrite(blob, lambda h: h.update({"params/conv9/codes": h.pop("params/conv0/codes")})),
     "do not match the model"),
  ]
  for data, message in cases:
    bad.write_bytes(data)
    with pytest.raises(export.PackedFormatError, match=message):
      export.load_packed(bad)
  bad.write_bytes(b"\x00" * 100)
  with pytest.raises(export.PackedFormatError, match="not a safetensors file"):
    export.load_packed(bad)
  with pytest.raises(export.PackedFormatError, match="directory"):
    export.load_packed(tmp_path)


def test_spec_errors_name_the_problem(packed_file, tmp_path):
  """A header (checksum recomputed) naming a model this call may not or cannot build."""
  import export_models

  blob = packed_file.read_bytes()
  bad = tmp_path / "bad.safetensors"
  for change, message, model in [
      (lambda spec: spec.update(arch="resnet9000"), "unknown arch 'resnet9000'", None),
      (lambda spec: spec.update(arch="no_such_module_xyz:Net"), "unknown arch.*model=YourModule", None),
      (lambda spec: spec.update(arch="export_models:NoSuchNet"), "model= is 'export_models:ConvHead'",
       export_models.ConvHead),
      (lambda spec: spec.update(arch="export_models:ConvHead", kwargs={"bogus": 1}),
       "cannot build the model.*no option 'bogus'", export_models.ConvHead),
      (lambda spec: spec.update(kwargs={"widths": [1, 2]}), "do not match the model", None),
      (lambda spec: spec["policy"].update(quantizer="nope"), "corrupt model spec.*unknown quantizer 'nope'", None),
      (lambda spec: spec.pop("policy"), "corrupt model spec.*missing policy", None)]:
    bad.write_bytes(rewrite_spec(blob, change))
    with pytest.raises(export.PackedFormatError, match=message):
      export.load_packed(bad, model=model)
  bad.write_bytes(rewrite_model(blob, lambda m: m.pop("spec")))
  with pytest.raises(export.PackedFormatError, match="corrupt model spec.*spec and image_shape"):
    export.load_packed(bad)


@pytest.mark.parametrize("packed", [False, True])
def test_a_users_linen_model_exports_and_loads_with_identical_logits(tmp_path, packed):
  """A plain Linen module of the user's (conv, BatchNorm, attention, dense), ternarized per channel by
  tgq_jax.ternarize_model: the file names it, the loader builds it from the constructor the caller passes."""
  import export_models

  policy = QuantPolicy("tga", per_channel=True)
  model = tgq_jax.ternarize_model(export_models.TinyNet(num_classes=10), policy)
  variables, x = _trained_like_variables(model, (8, 8, 3))
  layers = quantized_layers(model, x, train=False)
  assert layers[("attn", "query")].per_channel == (1, 2) and layers[("head",)].per_channel == (1,)
  want = np.asarray(model.apply(variables, x, train=False))
  spec = ModelSpec.for_model(export_models.TinyNet, 10, policy)
  assert spec.arch == "export_models:TinyNet"
  path = tmp_path / "m.safetensors"
  export.export_variables(path, variables, spec, (8, 8, 3))
  with pytest.raises(export.PackedFormatError, match="unknown arch 'export_models:TinyNet'.*model="):
    export.load_packed(path, packed=packed)  # the caller did not pass it: refused
  for given in (export_models.TinyNet, {"export_models:TinyNet": export_models.TinyNet}):
    loaded_model, loaded, header = export.load_packed(path, model=given, packed=packed)
    assert ModelSpec.from_dict(header["spec"]) == spec
    np.testing.assert_array_equal(np.asarray(loaded_model.apply(loaded, x, train=False)), want)
  if packed:  # the packed form holds codes and one scale per (head, head_dim) feature of each attention projection
    query = loaded["params"]["attn"]["query"]
    assert sorted(query) == ["bias", "codes", "scale"] and query["scale"].shape == (2, 4)
    assert query["codes"].dtype == jnp.uint8 and query["codes"].shape == (4, 4)  # planar: (ceil(8 * 2 / 4), 4)
    assert "delta" not in query and loaded["batch_stats"]["bn"]["var"].shape == (8,)
  # An allow-list that does not hold the file's name, or another constructor: refused, naming both.
  with pytest.raises(export.PackedFormatError, match="nor one of model= \\('other:Net'\\)"):
    export.load_packed(path, model={"other:Net": export_models.TinyNet})
  with pytest.raises(export.PackedFormatError, match="model= is 'export_models:ConvHead'"):
    export.load_packed(path, model=export_models.ConvHead)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_ternary_embedding_and_a8_export_and_load_with_identical_outputs(tmp_path, per_channel):
  """QuantPolicy(embeddings=True, activation_bits=8): the Embed table is packed planar like a kernel, and
  both loaded forms (float twin, packed) compute the trained model's outputs."""
  import export_models
  from tgq_jax import ternarize
  from tgq_jax.core.packing import unpack_planar

  policy = QuantPolicy("tga", per_channel=per_channel, embeddings=True, activation_bits=8)
  model = tgq_jax.ternarize_model(export_models.TokenNet(num_classes=5), policy)
  x = jax.random.randint(jax.random.key(3), (4, 7), 0, 11).astype(jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  layers = quantized_layers(model, x, train=False)
  assert list(layers) == [("embed",), ("mid",), ("head",)] and all(q.ternary for q in layers.values())
  want = np.asarray(model.apply(variables, x, train=False))
  spec = ModelSpec.for_model(export_models.TokenNet, 5, policy)
  path = tmp_path / "m.safetensors"
  report = export.export_variables(path, variables, spec, (7,))
  rows = {l.name: l for l in report.layers}
  scale_bytes = 4 * (8 if per_channel else 1)
  assert rows["embed"].ternary and rows["embed"].packed_bytes == 3 * 8 + scale_bytes  # (ceil(11 / 4), 8) codes
  for packed in (False, True):
    loaded_model, loaded, header = export.load_packed(path, model=export_models.TokenNet, packed=packed)
    assert ModelSpec.from_dict(header["spec"]) == spec
    np.testing.assert_array_equal(np.asarray(loaded_model.apply(loaded, x, train=False)), want)
  embed = loaded["params"]["embed"]  # the packed form
  assert sorted(embed) == ["codes", "scale"] and embed["codes"].dtype == jnp.uint8
  p = variables["params"]["embed"]
  table = ternarize(p["embedding"], {"delta": p["delta"]}, per_channel=(1,) if per_channel else False)
  np.testing.assert_array_equal(unpack_planar(np.asarray(embed["codes"]), (11, 8)), np.sign(np.asarray(table)))
  fp_model, fp_loaded, _ = export.load_packed(path, model=export_models.TokenNet)
  np.testing.assert_array_equal(fp_loaded["params"]["embed"]["embedding"], table)
  assert fp_model.policy.activation_bits == 8  # the float twin quantizes the same activations


@pytest.mark.parametrize("quantizer,per_channel", [("tga", True), ("ttq", False)])
def test_end_of_run_sizes_and_the_export_report_agree(tmp_path, quantizer, per_channel):
  """harness's end-of-run size line and export's SizeReport are one function's numbers, and they are
  the bytes the file stores (planar codes)."""
  import export_models
  from safetensors.numpy import load_file
  from tgq_jax.export import sizes
  from tgq_jax.training import harness

  spec = ModelSpec.for_model(export_models.TinyNet, 10, QuantPolicy(quantizer, per_channel=per_channel))
  model = spec.build()
  variables, x = _trained_like_variables(model, (8, 8, 3))
  layers = quantized_layers(model, x, train=False)
  report = export.export_variables(tmp_path / "m.safetensors", variables, spec, (8, 8, 3))
  fp32_bits, packed_bits = harness.model_size_bits(variables, layers)
  assert (fp32_bits, packed_bits) == (8 * report.fp32_bytes, 8 * report.packed_bytes)
  assert harness.model_size_bits(variables["params"], layers)[0] < fp32_bits  # params alone: no batch_stats
  line = harness.format_report({"accuracy": 0.5}, [], (fp32_bits, packed_bits)).splitlines()[-1]
  assert f"-> 2-bit ternary {report.packed_bytes / 1024:.1f} KiB" in line

  # What is stored: every tensor of the file.
  assert report.packed_bytes == sum(a.nbytes for a in load_file(str(tmp_path / "m.safetensors")).values())
  # The full-precision twin's size: every leaf but the quantizer's own, at 4 bytes.
  fp_variables = export_models.TinyNet(10).init(jax.random.key(0), x, train=False)
  assert report.fp32_bytes == 4 * sum(a.size for a in jax.tree.leaves(fp_variables))
  ternary = {l.name: l for l in report.layers if l.ternary}
  assert list(ternary) == ["/".join(p) for p, q in layers.items() if q.ternary]
  scales = 2 * 4 if quantizer == "ttq" else 4 * 2 * 4  # per channel: one per (head, head_dim)
  assert ternary["attn/query"].packed_bytes == 4 * 4 + scales  # planar codes (ceil(8 * 2 / 4), 4) + scales
  assert sizes.code_bytes((3, 3, 1, 4)) == 3 * 4


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
  """A tiny ternary model (conv 3x3x1x4, dense 4x10; TTQ, so a neg_scale too)."""
  import export_models

  path = tmp_path_factory.mktemp("tiny") / "m.safetensors"
  spec = ModelSpec.for_model(export_models.ConvHead, 10, QuantPolicy("ttq"))
  model = spec.build()
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  export.export_variables(path, variables, spec, (6, 6, 1), extra={"dataset": "synthetic"})
  return path


def test_every_single_byte_change_and_truncation_is_rejected(tiny_file, tmp_path):
  import export_models

  blob = tiny_file.read_bytes()
  export.load_packed(tiny_file, model=export_models.ConvHead)  # the intact file loads
  bad = tmp_path / "bad.safetensors"
  for i in range(len(blob)):  # every byte, the header's included
    for flip in (0x01, 0xFF):
      bad.write_bytes(blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1:])
      with pytest.raises(export.PackedFormatError):
        export.load_packed(bad, model=export_models.ConvHead)
  for n in sorted({0, 1, 7, 8, 9, 15, 16, 17, len(blob) // 2, len(blob) - 33, len(blob) - 1}):
    bad.write_bytes(blob[:n])
    with pytest.raises(export.PackedFormatError):
      export.load_packed(bad, model=export_models.ConvHead)


def test_safetensors_file_is_standard_and_holds_the_packed_variables(tiny_file):
  import export_models
  from safetensors import safe_open
  from safetensors.numpy import load_file

  tensors = load_file(str(tiny_file))
  assert sorted(tensors) == ["params/conv/bias", "params/conv/codes", "params/conv/neg_scale", "params/conv/scale",
                             "params/head/bias", "params/head/codes", "params/head/neg_scale", "params/head/scale"]
  assert tensors["params/conv/codes"].dtype == np.uint8 and tensors["params/conv/codes"].shape == (3, 4)  # ceil(9/4)
  with safe_open(str(tiny_file), "np") as f:
    metadata = f.metadata()
  assert metadata["format"] == "tgq_jax.packed" and metadata["format_version"] == str(export.FORMAT_VERSION)
  assert json.loads(metadata["model"])["spec"]["arch"] == "export_models:ConvHead"
  assert json.loads(metadata["ternary"])["conv"] == {"kernel_shape": [3, 3, 1, 4]}
  _, _, header = export.load_packed(tiny_file, model=export_models.ConvHead)
  assert header["dataset"] == "synthetic" and header["image_shape"] == [6, 6, 1]


def test_export_refuses_non_finite_models_bad_arguments_and_directories(tmp_path):
  spec = ModelSpec("small_cnn", 10)
  model = create_model("small_cnn", 10)
  variables, _ = _trained_like_variables(model, (28, 28, 1))
  broken = jax.tree.map(lambda a: a, variables)
  broken["batch_stats"]["bn1"]["var"] = broken["batch_stats"]["bn1"]["var"].at[0].set(jnp.inf)
  out = tmp_path / "m.safetensors"
  with pytest.raises(ValueError, match="non-finite.*batch_stats/bn1/var"):
    export.export_variables(out, broken, spec, (28, 28, 1))
  with pytest.raises(ValueError, match="is a directory"):
    export.export_variables(tmp_path, variables, spec, (28, 28, 1))
  with pytest.raises(ValueError, match="spec, tensors are keys of the file format"):
    export.export_variables(out, variables, spec, (28, 28, 1), extra={"tensors": 1, "spec": 2})
  with pytest.raises(ValueError, match="extra: not plain JSON"):
    export.export_variables(out, variables, spec, (28, 28, 1), extra={"accuracy": float("nan")})
  with pytest.raises(ValueError, match="image_shape must be"):
    export.export_variables(out, variables, spec, (28, -28, 1))
  with pytest.raises(ValueError, match="packed inference form"):
    export.export_variables(out, variables, ModelSpec("small_cnn", 10, QuantPolicy("packed:tga")), (28, 28, 1))
  assert sorted(os.listdir(tmp_path)) == []  # nothing written, no temporary left behind
