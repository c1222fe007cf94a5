"""Crafted files: loading one never imports, calls or writes anything it names, and fails in one line.

Each file below carries a valid SHA-256 (the checksum proves integrity, not origin:
``packed_files`` recomputes it, as an attacker would). For each, the loader
(:func:`tgq_jax.export.load_packed`, and the export command line for a workdir's
``config.json``) must raise one line, import no module (``sys.modules`` before and
after), call nothing the file names (marker files never created) and write nothing
(victim files unchanged).
"""
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import pytest

from packed_files import ZERO, assemble, rewrite, rewrite_model, rewrite_spec, split
from tgq_jax import export
from tgq_jax.models import ModelSpec

EVIL_MODULE = "tgq_hostile_side_effect"


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
  """A genuine export of the zoo's small_cnn, loaded once (so lazy imports of a genuine load are done)."""
  path = tmp_path_factory.mktemp("genuine") / "m.safetensors"
  spec = ModelSpec("small_cnn", 10)
  model = spec.build()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  export.export_variables(path, variables, spec, (28, 28, 1))
  export.load_packed(path)
  export.load_packed(path, packed=True)
  return path.read_bytes()


@pytest.fixture
def scene(tmp_path, monkeypatch):
  """A victim file, a marker path that a call would create, and a module with an import-time side effect
  on sys.path."""
  victim = tmp_path / "victim.txt"
  victim.write_bytes(b"precious data")
  marker = tmp_path / "marker"
  (tmp_path / f"{EVIL_MODULE}.py").write_text(
    f"open({str(marker)!r}, 'w').write('imported')\nimport flax.linen as nn\nclass Net(nn.Module):\n  pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  return victim, marker


def _refused(path, scene, match, **kwargs) -> str:
  """load_packed(path) raises one PackedFormatError line matching ``match``; nothing imported, called, written."""
  victim, marker = scene
  before, dumps = set(sys.modules), json.dumps
  with pytest.raises(export.PackedFormatError, match=match) as info:
    export.load_packed(path, **kwargs)
  message = str(info.value)
  assert "\n" not in message and len(message) < 1000, message
  assert set(sys.modules) - before == set(), "imported: " + ", ".join(sorted(set(sys.modules) - before))
  assert victim.read_bytes() == b"precious data" and not marker.exists() and EVIL_MODULE not in sys.modules
  assert json.dumps is dumps
  return message


def _write(tmp_path, data: bytes):
  path = tmp_path / "crafted.safetensors"
  path.write_bytes(data)
  return path


def _names(scene) -> list:
  """(arch, kwargs) of files naming code: each was a real attack on the loader that imported arch's module."""
  victim, marker = scene
  return [
    ("numpy:memmap", {"filename": str(victim), "mode": "w+", "shape": [4]}),  # zeroed the victim
    ("json:__dict__.update", {"dumps": None}),  # replaced json.dumps
    ("setuptools:setup", {"script_args": ["--version"]}),  # wrote files, raised SystemExit
    ("os:system", {"command": f"touch {marker}"}),
    ("builtins:eval", {"source": f"open({str(marker)!r}, 'w')"}),
    ("subprocess:Popen", {"args": ["touch", str(marker)]}),
    (f"{EVIL_MODULE}:Net", {}),  # a module on sys.path with import-time code
    ("tgq_jax.training.harness:train_and_evaluate", {}),
  ]


def test_a_file_naming_code_is_refused_before_anything_is_imported(blob, scene, tmp_path):
  for arch, kwargs in _names(scene):
    path = _write(tmp_path, rewrite_spec(blob, lambda s: s.update(arch=arch, kwargs=kwargs)))
    message = _refused(path, scene, "unknown arch.*not a registered architecture.*model=YourModule")
    assert repr(arch) in message


def test_a_callers_constructor_or_allow_list_admits_only_what_it_names(blob, scene, tmp_path):
  import export_models

  for arch, kwargs in _names(scene):
    path = _write(tmp_path, rewrite_spec(blob, lambda s: s.update(arch=arch, kwargs=kwargs)))
    _refused(path, scene, "model= is 'export_models:ConvHead'", model=export_models.ConvHead)
    _refused(path, scene, "nor one of model= \\('export_models:ConvHead'\\)",
             model={"export_models:ConvHead": export_models.ConvHead})


@pytest.mark.parametrize("kwargs,match", [
  ({"__class__": "numpy:memmap"}, "no option '__class__'"),
  ({"__init__": {"filename": "x"}}, "no option '__init__'"),
  ({"parent": None}, "no option 'parent'"),
  ({"name": "numpy:memmap"}, "no option 'name'"),
  ({"conv": "numpy:memmap"}, "no option 'conv'"),  # an option whose default is code: not data
  ({"bn_axis_name": "batch"}, "no option 'bn_axis_name'"),  # run-time options are the caller's
  ({"widths": [2**40, 2**40, 2**40, 2**40]}, "do not match the model|cannot build"),  # huge dims
  ({"widths": [-4, 8]}, "cannot build|do not match"),  # negative dims
  ({"widths": {"__class__": 1}}, "cannot build|do not match"),
])
def test_constructor_options_are_data_checked_against_the_constructor(blob, scene, tmp_path, kwargs, match):
  path = _write(tmp_path, rewrite_spec(blob, lambda s: s.update(kwargs=kwargs)))
  _refused(path, scene, match)


@pytest.mark.parametrize("change,match", [
  (lambda s: s.update(num_classes=10**12), "do not match the model"),  # huge: traced abstractly, refused
  (lambda s: s.update(num_classes=-3), "num_classes must be a positive integer"),
  (lambda s: s.update(num_classes=True), "num_classes must be a positive integer"),
  (lambda s: s.update(num_classes="10"), "num_classes must be a positive integer"),
  (lambda s: s.update(dtype="object"), "dtype 'object' is not one of"),
  (lambda s: s.update(dtype=["float32"]), "dtype must be a string"),
  (lambda s: s["policy"].update(dtype="object"), "policy.dtype"),
  (lambda s: s["policy"].update(quantizer="numpy:memmap"), "unknown quantizer"),
  (lambda s: s["policy"].update(per_channel="yes"), "policy.per_channel"),
  (lambda s: s["policy"].update(__class__="x"), "unknown field '__class__'"),
  (lambda s: s["policy"].update(include=["a" * 10_000]), "policy.include"),
  (lambda s: s["policy"].update(exclude=["(.*)*x"]), "bounded time"),  # catastrophic backtracking: a stalled load
  (lambda s: s["policy"].update(include=[".*" * 8 + "x"]), "bounded time"),
  (lambda s: s.update(__reduce__="os:system"), "unknown keys '__reduce__'"),
  (lambda s: s.update(kwargs=[["widths", [4]]]), "kwargs must be an object"),
  (lambda s: s.update(arch="x" * 1000), "arch must be a name"),
  (lambda s: s.update(arch="small_cnn\n"), "arch must be a name"),
])
def test_spec_fields_are_checked(blob, scene, tmp_path, change, match):
  _refused(_write(tmp_path, rewrite_spec(blob, change)), scene, match)


@pytest.mark.parametrize("image_shape", [[-28, 28, 1], [10**9, 10**9, 3], [], [28, 28, 1, 1, 1], ["28", 28, 1],
                                         [28.0, 28, 1], None])
def test_image_shape_is_checked(blob, scene, tmp_path, image_shape):
  _refused(_write(tmp_path, rewrite_model(blob, lambda m: m.update(image_shape=image_shape))), scene,
           "image_shape must be")


def test_hostile_json(blob, scene, tmp_path):
  header, data = split(blob)
  deep = "[" * 100_000 + "]" * 100_000  # RecursionError in json before
  raw = json.dumps(header).replace('"__metadata__"', f'"deep": {deep}, "__metadata__"', 1).encode()
  _refused(_write(tmp_path, assemble(raw.replace(header["__metadata__"]["sha256"].encode(), ZERO.encode()), data)),
           scene, "nested more than")
  nested_kwargs = {"widths": json.loads("[" * 200 + "]" * 200)}
  _refused(_write(tmp_path, rewrite_spec(blob, lambda s: s.update(kwargs=nested_kwargs))), scene, "nested more than")
  # NaN / Infinity are not JSON: a NaN never reaches a model option.
  model = json.loads(header["__metadata__"]["model"])
  model["spec"]["kwargs"] = {"widths": "NAN_HERE"}
  nan_model = json.dumps(model).replace('"NAN_HERE"', "NaN")
  _refused(_write(tmp_path, rewrite(blob, lambda h: h["__metadata__"].update(model=nan_model))), scene,
           "not valid JSON")
  # Duplicate keys (a reader that takes the first and one that takes the last would build different models).
  dup = json.dumps(model).replace('"spec":', '"spec": {}, "spec":', 1)
  _refused(_write(tmp_path, rewrite(blob, lambda h: h["__metadata__"].update(model=dup))), scene, "duplicate key")
  _refused(_write(tmp_path, rewrite(blob, lambda h: h["__metadata__"].update(model=5))), scene, "tgq_jax metadata")
  _refused(_write(tmp_path, rewrite(blob, lambda h: h["__metadata__"].update(extra="[1]"))), scene, "extra")


def test_header_sizes_are_limited(blob, scene, tmp_path):
  (n,) = struct.unpack_from("<Q", blob)
  _refused(_write(tmp_path, struct.pack("<Q", 2**62) + blob[8:]), scene, "not a safetensors file, or truncated")
  big = b"{" + b" " * (17 * 2**20) + b"}"
  _refused(_write(tmp_path, struct.pack("<Q", len(big)) + big), scene, "more than the 16,777,216 allowed")
  assert n < 2**16


@pytest.mark.parametrize("change,match", [
  (lambda h: h["params/conv0/codes"].update(shape=[-3, 8]), "shape"),
  (lambda h: h["params/conv0/codes"].update(shape=[2**40, 2**40]), "bytes stored"),
  (lambda h: h["params/conv0/codes"].update(shape=[1] * 9), "at most 8"),
  (lambda h: h["params/conv0/codes"].update(shape=[True, 2]), "shape"),
  (lambda h: h["params/conv0/codes"].update(data_offsets=[-8, 0]), "data_offsets"),
  (lambda h: h["params/conv0/codes"].update(dtype="BOOL"), "dtype 'BOOL' is not one"),
  (lambda h: h["params/conv0/codes"].update(dtype="F8_E4M3"), "dtype 'F8_E4M3' is not one"),
  (lambda h: h["params/conv0/codes"].update(extra="x"), "corrupt entry"),
  (lambda h: h.update({"params/x": [1, 2]}), "corrupt entry"),
])
def test_tensor_entries_are_checked(blob, scene, tmp_path, change, match):
  _refused(_write(tmp_path, rewrite(blob, change)), scene, match)


def test_tensors_of_another_dtype_or_shape_than_the_model_are_refused_before_they_are_read(blob, scene, tmp_path):
  def as_float(h):  # the codes as float32 (a quarter of the elements: the same bytes)
    entry = h["params/conv0/codes"]
    rows, cols = entry["shape"]
    assert cols % 4 == 0
    entry.update(dtype="F32", shape=[rows, cols // 4])
  _refused(_write(tmp_path, rewrite(blob, as_float)), scene, "params/conv0/codes: F32.*expected U8")


def test_values_are_checked(blob, scene, tmp_path):
  header, data = split(blob)

  def poke(name, value: bytes):
    start, _ = header[name]["data_offsets"]
    new = bytearray(data)
    new[start:start + len(value)] = value
    raw = json.dumps({**header, "__metadata__": {**header["__metadata__"], "sha256": ZERO}}).encode()
    return assemble(raw, bytes(new))

  _refused(_write(tmp_path, poke("params/conv0/scale", struct.pack("<f", float("nan")))), scene, "non-finite")
  _refused(_write(tmp_path, poke("params/conv0/codes", b"\xff")), scene, "invalid 2-bit pattern")


@pytest.mark.parametrize("record,match", [
  ({"model": {"arch": "numpy:memmap", "num_classes": 1, "policy": {}, "kwargs": {"filename": "VICTIM", "mode": "w+",
                                                                                  "shape": [4]}}},
   "unknown arch 'numpy:memmap'"),
  ({"model": {"arch": f"{EVIL_MODULE}:Net", "num_classes": 1, "policy": {}}}, "unknown arch"),
  ({"model": {"arch": "small_cnn", "num_classes": 10, "policy": {}, "kwargs": {"__class__": 1}}}, "no option"),
  ({"config": {"arch": "os:system", "quantizer": "tga", "per_channel": False, "ternary_first": True,
               "ternary_last": True}}, "unknown arch 'os:system'"),
  ({"config": {"arch": "small_cnn", "quantizer": "tga", "per_channel": "no", "ternary_first": True,
               "ternary_last": True}}, "config.per_channel"),
  ("DEEP", "nested more than"),
  ("NAN", "not valid JSON"),
])
def test_the_export_cli_reads_config_json_as_data(scene, tmp_path, capsys, record, match):
  victim, _ = scene
  workdir = tmp_path / "run"
  workdir.mkdir()
  info = {"name": "synthetic", "num_classes": 10, "image_shape": [28, 28, 1]}
  if record == "DEEP":
    text = '{"dataset_info": ' + json.dumps(info) + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
  elif record == "NAN":
    text = json.dumps({"dataset_info": info, "config": {"dropout": "N"}}).replace('"N"', "NaN")
  else:
    text = json.dumps({"dataset_info": info, **record}).replace("VICTIM", str(victim))
  (workdir / "config.json").write_text(text)
  import tgq_jax.training.checkpoints, tgq_jax.training.workdir  # noqa: F401,E401  (what the command itself imports)
  before = set(sys.modules)
  assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "m.safetensors")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and err.count("\n") == 1 and "config.json" in err, err
  assert __import__("re").search(match, err), err
  assert set(sys.modules) - before == set()
  assert victim.read_bytes() == b"precious data" and not (tmp_path / "m.safetensors").exists()
  assert not scene[1].exists() and EVIL_MODULE not in sys.modules
