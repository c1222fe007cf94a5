"""``python -m tgq_jax.export``: a training workdir's latest checkpoint as one packed file, or as a GGUF file.

    python -m tgq_jax.export --workdir W --out model.safetensors [--report-json report.json]
    python -m tgq_jax.export --workdir W --out model.gguf [--gguf-type TQ2_0|F16|F32] [--gguf-unaligned float]

The output's suffix picks the format: ``.safetensors`` (the 2-bit packed file, any model) or ``.gguf``
(llama.cpp, the decoder LM only: :func:`tgq_jax.export.gguf.export_gguf`, with the vocabulary the run's
``config.json`` records).

The workdir's ``config.json`` is read as data (:class:`~tgq_jax.models.ModelSpec`):
the command builds registered architectures only and never imports or calls
anything the file names. Every failure is one ``error:`` line (exit status 2);
the output paths are checked before anything is written, and each file is
written atomically (a failure leaves any previous file in place).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from tgq_jax.core.policy import QuantPolicy
from tgq_jax.data.text import Vocabulary
from tgq_jax.export import container, files
from tgq_jax.export import gguf as gguf_export
from tgq_jax.export.packing import check_image_shape, export_variables
from tgq_jax.export.sizes import SizeReport
from tgq_jax.models import ModelSpec, example_input
from tgq_jax.models.spec import ModelArg

SUFFIX = ".safetensors"
GGUF_SUFFIX = gguf_export.SUFFIX
MAX_RECORD_BYTES = 2**20  # config.json, summary.json: a few KB


def _read_json(path: str, what: str) -> Any:
  with open(path, "rb") as f:
    raw = f.read(MAX_RECORD_BYTES + 1)
  if len(raw) > MAX_RECORD_BYTES:
    raise ValueError(f"{path}: more than {MAX_RECORD_BYTES:,} bytes: not a {what}.")
  try:
    return container.parse_json(raw, path)
  except ValueError as e:
    raise ValueError(f"{e} (not a {what})") from None


def run_record(workdir: str, model: ModelArg = None) -> tuple[ModelSpec, tuple[int, ...], str]:
  """The model spec, input shape and dataset name a workdir's ``config.json`` records, checked as data.

  Its ``"model"`` entry (a ModelSpec), or, for a workdir written before there was
  one, the ``"config"`` options. ValueError (one line) for anything else.
  """
  from tgq_jax.training.workdir import RUN_CONFIG

  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a train.py workdir?")
  record = _read_json(path, "train.py run record")
  try:
    if not isinstance(record, Mapping) or not isinstance(record.get("dataset_info"), Mapping):
      raise ValueError("no 'dataset_info' object")
    info = record["dataset_info"]
    if "model" in record:
      spec = ModelSpec.from_dict(record["model"])
    else:
      spec = _config_spec(record.get("config"), info)
    image_shape = _input_shape(spec.bind(model), info.get("image_shape"))
    dataset = info.get("name")
    if not isinstance(dataset, str) or len(dataset) > 200:
      raise ValueError(f"dataset_info.name {dataset!r:.60} is not a name")
    spec = spec.bind(model)
    spec.check()
  except (KeyError, TypeError, ValueError) as e:
    text = str(e).splitlines()[0] if str(e) else repr(e)
    raise ValueError(f"{path} is not a usable run record: {text}") from None
  return spec, image_shape, dataset


def _input_shape(spec: ModelSpec, recorded: Any) -> tuple[int, ...]:
  """The recorded input shape (checked); for a model of token ids, which takes any length, (1,) where
  none is recorded."""
  if recorded is None and jnp.issubdtype(example_input(spec.build(), (1,)).dtype, jnp.integer):
    return (1,)
  return check_image_shape(recorded)


def _config_spec(cfg: Any, info: Mapping[str, Any]) -> ModelSpec:
  """The ModelSpec of a config.json written before it held one (its training options), types checked."""
  if not isinstance(cfg, Mapping):
    raise ValueError("no 'config' object")
  types = {"arch": str, "quantizer": str, "per_channel": bool, "ternary_first": bool, "ternary_last": bool}
  for key, kind in types.items():
    if not isinstance(cfg.get(key), kind):
      raise ValueError(f"config.{key}: {cfg.get(key)!r:.60} is not a {kind.__name__}")
  dropout = cfg.get("dropout")
  if dropout is not None and (not isinstance(dropout, float) or not math.isfinite(dropout)):
    raise ValueError(f"config.dropout: {dropout!r:.60} is not a finite number")
  policy = QuantPolicy(cfg["quantizer"], per_channel=cfg["per_channel"], ternary_first=cfg["ternary_first"],
                       ternary_last=cfg["ternary_last"])
  kwargs = {} if dropout is None else {"dropout_rate": dropout}
  return ModelSpec(cfg["arch"], info.get("num_classes"), policy,
                   "bfloat16" if cfg.get("half_precision") is True else "float32", kwargs)


def _run_spec(workdir: str) -> ModelSpec:
  """The ModelSpec (``"model"``) a workdir's ``config.json`` records, registered and checked; no input shape is
  read (a language model's record has a context instead). ValueError (one line) otherwise."""
  from tgq_jax.training.workdir import RUN_CONFIG

  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a train.py workdir?")
  record = _read_json(path, "train.py run record")
  try:
    if not isinstance(record, Mapping) or "model" not in record:
      raise ValueError("no 'model' entry")
    spec = ModelSpec.from_dict(record["model"]).bind(None)
    spec.check()
  except (KeyError, TypeError, ValueError) as e:
    text = str(e).splitlines()[0] if str(e) else repr(e)
    raise ValueError(f"{path} is not a usable run record: {text}") from None
  return spec


def _test_accuracy(workdir: str) -> float | None:
  path = os.path.join(workdir, "summary.json")
  if not os.path.isfile(path):
    return None
  summary = _read_json(path, "train.py summary")
  accuracy = summary.get("test_accuracy") if isinstance(summary, Mapping) else None
  return accuracy if isinstance(accuracy, float) and math.isfinite(accuracy) else None


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike, *, model: ModelArg = None) -> SizeReport:
  """Exports the latest checkpoint of a ``train.py`` workdir to ``out`` (a ``.safetensors`` file).

  The model comes from ``<workdir>/config.json`` (:func:`run_record`), built from
  the registry (``model=``: a user's constructor, as for :func:`~tgq_jax.export.load_packed`).
  """
  workdir, out = os.fspath(workdir), os.fspath(out)
  if os.path.isdir(out):
    raise ValueError(f"--out {out} is a directory: give a file name (e.g. {os.path.join(out, 'model' + SUFFIX)}).")
  spec, image_shape, dataset = run_record(workdir, model)
  variables = latest_variables(workdir)
  extra: dict[str, Any] = {"dataset": dataset}
  vocabulary = run_vocabulary(workdir, required=False)
  if vocabulary is not None:  # a language model's: generation decodes the file's tokens with it
    extra["vocabulary"] = vocabulary.to_dict()
  accuracy = _test_accuracy(workdir)
  if accuracy is not None:
    extra["test_accuracy"] = accuracy
  return export_variables(out, variables, spec, image_shape, extra=extra)


def latest_variables(workdir: str) -> Mapping[str, Any]:
  """The variables of a workdir's newest verified checkpoint (FileNotFoundError, one line, when it has none)."""
  from tgq_jax.training import checkpoints

  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [p for p in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
           if p.isdigit() and os.path.isdir(os.path.join(ckpt_dir, p, "state"))]
  if not steps:
    raise FileNotFoundError(f"{workdir} has no checkpoint to export (no finished step under {ckpt_dir}): "
                            "the run saved none yet; train it (or let it reach its first checkpoint) first.")
  return checkpoints.load_variables(workdir)


def run_vocabulary(workdir: str, *, required: bool = True) -> Vocabulary | None:
  """The vocabulary a language-model run's ``config.json`` records (``"vocabulary"``), checked as data;
  where it records none, a one-line ValueError (``required``) or None."""
  from tgq_jax.training.workdir import RUN_CONFIG

  path = os.path.join(workdir, RUN_CONFIG)
  record = _read_json(path, "train.py run record")
  entry = record.get("vocabulary") if isinstance(record, Mapping) else None
  if entry is None and isinstance(record, Mapping) and isinstance(record.get("dataset_info"), Mapping):
    entry = record["dataset_info"].get("vocabulary")
  if entry is None and not required:
    return None
  if entry is None:
    raise ValueError(f"{path} records no vocabulary: a GGUF file needs the run's vocabulary (a language-model run "
                     "of --dataset text writes it).")
  try:
    return Vocabulary.from_dict(entry)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def export_workdir_gguf(workdir: str | os.PathLike, out: str | os.PathLike, *, ternary_type: str = "TQ2_0",
                        float_type: str | None = None, unaligned: str = "refuse") -> gguf_export.GGUFReport:
  """Exports the latest checkpoint of a language-model ``train.py`` workdir to ``out`` (a ``.gguf`` file for
  llama.cpp); the options are :func:`~tgq_jax.export.gguf.export_gguf`'s."""
  workdir, out = os.fspath(workdir), os.fspath(out)
  if os.path.isdir(out):
    raise ValueError(f"--out {out} is a directory: give a file name (e.g. {os.path.join(out, 'model' + GGUF_SUFFIX)}).")
  spec = _run_spec(workdir)
  gguf_export.check_llama(spec)  # a non-LM run: refused before its checkpoint is read
  vocabulary = run_vocabulary(workdir)
  return gguf_export.export_gguf(out, latest_variables(workdir), spec, vocabulary, ternary_type=ternary_type,
                                 float_type=float_type, unaligned=unaligned)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m tgq_jax.export",
    description="Write a train.py workdir's latest checkpoint as one 2-bit packed .safetensors file, or (a "
                "language model) as a .gguf file for llama.cpp.")
  parser.add_argument("--workdir", required=True, help="the train.py --workdir of the run")
  parser.add_argument("--out", required=True, help=f"output file: model{SUFFIX} or model{GGUF_SUFFIX}")
  parser.add_argument("--report-json", help="also write the size report (.gguf: the tensor list) as JSON here")
  parser.add_argument("--gguf-type", default="TQ2_0", choices=gguf_export.TERNARY_TYPES,
                      help="(.gguf) ternary kernels as TQ2_0 (2 bits a weight), or their values as F16/F32")
  parser.add_argument("--gguf-float-type", default=None, choices=gguf_export.FLOAT_TYPES,
                      help="(.gguf) full-precision matrices (embedding, head, fp kernels); default F16 with "
                           "--gguf-type F16, else F32")
  parser.add_argument("--gguf-unaligned", default="refuse", choices=gguf_export.UNALIGNED,
                      help="(.gguf) a ternary kernel TQ2_0 cannot hold (input width not a multiple of 256): "
                           "refuse (default) or write it at full precision")
  args = parser.parse_args(argv)
  try:
    if os.path.isdir(args.out):
      raise ValueError(f"--out {args.out} is a directory: give a file name "
                       f"(e.g. {os.path.join(args.out, 'model' + SUFFIX)}).")
    is_gguf = args.out.lower().endswith(GGUF_SUFFIX)
    if not (is_gguf or args.out.lower().endswith(SUFFIX)):
      raise ValueError(f"--out {args.out}: the name must end in {SUFFIX} (the packed file) or {GGUF_SUFFIX} "
                       "(llama.cpp).")
    files.check_writable(args.out, "--out")
    if args.report_json:  # checked before the model is written: a bad path fails first, nothing written
      files.check_writable(args.report_json, "--report-json")
    if is_gguf:
      report = export_workdir_gguf(args.workdir, args.out, ternary_type=args.gguf_type,
                                   float_type=args.gguf_float_type, unaligned=args.gguf_unaligned)
      print(f"wrote {report.format()}")
      report_dict = dataclasses.asdict(report)
    else:
      report = export_workdir(args.workdir, args.out)
      print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")
      print(report.format())
      report_dict = report.as_dict()
    if args.report_json:
      files.atomic_write(args.report_json, json.dumps(report_dict, indent=2).encode(), "--report-json")
  except (OSError, ValueError, ImportError) as e:
    text = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {text}", file=sys.stderr)
    return 2
  return 0
