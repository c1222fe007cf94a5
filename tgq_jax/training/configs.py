"""Training options (a frozen dataclass), the authors' recipes as named presets, and the CLI parser.

The command line is generated from :class:`Config`: every field is a flag
(``--field-name``). Flags default to "not given" so that a preset
(``--config NAME``) supplies the values and only explicitly passed flags
override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import typing
from typing import Any

from tgq_jax.models import ModelSpec
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.core.quantizers import quantizer_names



@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a training run depends on (saved in summary.json)."""

  # model and data
  arch: str = "small_cnn"
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  image_shape: tuple[int, ...] = ()  # (H, W, C) of synthetic data / ImageNet crops; () = the dataset's
  num_train: int | None = None  # synthetic split sizes; for real data: only the first n examples
  num_test: int | None = None
  num_classes: int | None = None  # synthetic data's class count; None = the dataset's
  augment: bool = True  # the dataset's training augmentation (crops, flips)
  # language models (--dataset text): the text, its vocabulary, the window length
  data_file: str | None = None  # a UTF-8 text file; None = the committed Tiny Shakespeare
  vocabulary: str = "chars"  # chars (the file's sorted distinct characters, as nanoGPT) | bytes
  context: int | None = None  # training window in tokens; None = the model's (llama_baby 64, llama_256 128)
  eval_windows: int = 0  # fixed validation windows, evenly spaced; 0 = every non-overlapping window
  sample_tokens: int = 200  # characters (tokens) of text sampled at the end of an LM run; 0 = none
  sample_prompt: str = ""  # the sample's prompt; "" = the first character of the validation split
  workdir: str | None = None  # default: runs/<arch>_<dataset>_<quantizer>
  # quantization (tgq_jax.QuantPolicy): which quantizer, per-channel statistics, first/last layer
  quantizer: str = "tga"
  per_channel: bool = False
  ternary_first: bool = True
  ternary_last: bool = True
  # BitNet b1.58's W1.58A8: the input of every quantized layer quantized to this many bits per token
  # (8), with any --quantizer; None = full-precision activations (QuantPolicy.activation_bits)
  activation_bits: int | None = None
  ternary_embeddings: bool = False  # quantize Embed tables too (QuantPolicy.embeddings); default full precision
  dropout: float | None = None  # the model's dropout rate (models that have one: the ViTs); None = its default
  # schedule
  epochs: int = 5
  max_steps: int | None = None  # stop early (smoke runs)
  train_steps: int | None = None  # the run's length in steps (schedule and loop); None = --epochs epochs
  eval_every: int = 0  # evaluate (and save) every N steps; 0 = at epoch ends
  batch_size: int = 128  # global, over all devices and hosts
  eval_batch_size: int = 1000
  # optimization
  update: str = "sequential"  # sequential (the paper) | joint
  optimizer: str = "adam"  # sgd | adam | adamw (decoupled weight decay)
  lr: float = 5e-3
  momentum: float = 0.9
  nesterov: bool = True
  lr_schedule: str = "cosine"  # step | cosine
  schedule: tuple[int, ...] = ()  # epochs at which the step schedule multiplies the lr ...
  gammas: tuple[float, ...] = ()  # ... by these factors (cumulative, like the reference)
  weight_decay: float = 0.0
  warmup_epochs: float = 0.0  # linear warm-up from 0 before the schedule (fractions of an epoch allowed)
  warmup_steps: int = 0  # the same in steps (one of the two)
  lr_end: float = 0.0  # cosine's final learning rate as a fraction of --lr (nanoGPT: 1e-3 -> 1e-4 is 0.1)
  adam_b2: float = 0.999  # Adam/AdamW's second-moment decay (nanoGPT's small runs: 0.99)
  weight_decay_on: str = "all"  # all | matrices (no decay on norms, biases and other 1-D leaves)
  grad_clip: float = 0.0  # clip the weights' gradient to this global norm; 0 = off
  label_smoothing: float = 0.0
  # The threshold optimizer. "auto" is the authors' pairing (main_dc.py): SGD with --momentum
  # and Nesterov for the thresholds whatever the weights use, at the weights' learning rate and
  # schedule; weight decay as the weights' under --optimizer sgd, none under adam.
  threshold_optimizer: str = "auto"  # auto | sgd | adam
  threshold_lr: float | None = None  # None: --lr (the same schedule shape in any case)
  threshold_weight_decay: float | None = None  # None: the pairing's (sgd: --weight-decay; adam: 0)
  threshold_grad_clip: float = 0.001  # the reference clamps delta's gradient to +-0.001
  # BatchNorm. Training-mode statistics over the global batch (all devices: a step does not
  # depend on the device count), or each device's own shard (--no-bn-cross-device: torch
  # DataParallel's behaviour, one all-reduce less per BN layer).
  bn_cross_device: bool = True
  # Running statistics: "once" per step (the second pass's batch, biased variance: flax's rule),
  # or "authors" (both passes of a sequential step, unbiased variance: the reference's torch rule).
  bn_running_stats: str = "once"  # once | authors
  # initialization / modes
  # Full-precision start: a checkpoint of this trainer (workdir or checkpoint dir), or a
  # torchvision state dict of --arch resnet18/34/50 (.npz; .pth/.pt when torch is installed).
  init_from: str | None = None
  eval_only: bool = False
  half_precision: bool = False  # bf16 activations; parameters and statistics stay float32
  parallel: str = "shard_map"  # shard_map | pmap | fsdp (parameters and optimizer state sharded)
  fsdp_devices: int = 0  # --parallel fsdp: devices on the fsdp axis (0: all); the data axis is the rest
  seed: int = 0
  # logging and checkpoints
  log_every: int = 50
  checkpoint_every: int = 0  # steps; 0 = at every epoch end only
  keep_checkpoints: int = 2  # the last N, plus the best by test accuracy
  # multi-host (see README/train.py): jax.distributed.initialize arguments
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def policy(self) -> QuantPolicy:
    """The quantization policy of these options."""
    return QuantPolicy(self.quantizer, per_channel=self.per_channel, ternary_first=self.ternary_first,
                       ternary_last=self.ternary_last, activation_bits=self.activation_bits,
                       embeddings=self.ternary_embeddings)

  def model_spec(self, num_classes: int) -> ModelSpec:
    """The model these options train (written to config.json and to exported files)."""
    kwargs = {} if self.dropout is None else {"dropout_rate": self.dropout}
    if self.context is not None:
      kwargs["context"] = self.context
    return ModelSpec(self.arch, num_classes, self.policy(), "bfloat16" if self.half_precision else "float32",
                     kwargs)

  def resolved_workdir(self) -> str:
    return self.workdir or f"runs/{self.arch}_{self.dataset}_{self.quantizer}"

  def validate(self) -> Config:
    """Checks every option that can be checked without touching data or devices; returns self.

    Raises ValueError with one line naming each impossible option (the
    trainer calls this before any work, so nothing fails after training).
    Names (arch, dataset) and the batch/device divisibility are checked
    where their registries live, also before any work.
    """
    problems = _problems(self)
    if problems:
      raise ValueError("; ".join(problems))
    return self


_IMAGENET_FT = dict(
  dataset="imagenet2012", optimizer="adam", lr=1e-4, epochs=50, lr_schedule="step",
  schedule=(25, 30, 35), gammas=(0.2, 0.2, 0.5), weight_decay=5e-6, batch_size=256,
  ternary_first=True, ternary_last=True, eval_batch_size=250,
  log_every=100, checkpoint_every=2000)
_CIFAR = dict(
  dataset="cifar10", optimizer="sgd", momentum=0.9, nesterov=True, lr=0.1, weight_decay=1e-4,
  epochs=200, lr_schedule="step", schedule=(80, 120, 160), gammas=(0.1, 0.1, 0.1), batch_size=128)

# nanoGPT's config/train_shakespeare_char.py at its CPU "baby" size (eval_interval 250, lr 1e-3 -> 1e-4 over the
# run, warm-up 100, beta2 0.99, weight decay 0.1, clip 1.0); 240 fixed validation windows.
_SHAKESPEARE = dict(
  dataset="text", vocabulary="chars", optimizer="adamw", lr=1e-3, lr_schedule="cosine", lr_end=0.1,
  warmup_steps=100, adam_b2=0.99, weight_decay=0.1, weight_decay_on="matrices", grad_clip=1.0,
  ternary_last=False, update="sequential", threshold_optimizer="auto", eval_every=250, eval_windows=240,
  eval_batch_size=240, log_every=50)
# The width-256 run's length, sized for about 25-30 minutes on this 2-core CPU: a step (32 x 128 tokens, the
# sequential update's two passes) measured 18.6 s at load 9 on the 2 cores, about 4 s alone; to re-measure.
SHAKESPEARE_CHAR_STEPS = 400

PRESETS: dict[str, dict[str, Any]] = {
  # The demo: the defaults, without augmentation (a 5-epoch run learns faster without it;
  # pass --augment, or use another preset, for real training).
  "demo": dict(augment=False),
  # He & Fan's ImageNet flow: fine-tune a full-precision checkpoint (pass --init-from).
  "imagenet_resnet18": dict(_IMAGENET_FT, arch="resnet18"),
  "imagenet_resnet34": dict(_IMAGENET_FT, arch="resnet34"),
  "imagenet_resnet50": dict(_IMAGENET_FT, arch="resnet50"),
  # CIFAR ResNets trained from scratch with the reference SGD recipe.
  **{f"cifar10_{a}": dict(_CIFAR, arch=a) for a in ("resnet20", "resnet32", "resnet44", "resnet56")},
  # Ternary vision transformers: the transformer recipe (AdamW, warm-up then cosine, gradient
  # clipping, label smoothing, dropout). The sequential TGA update is unchanged; under "auto" the
  # thresholds keep the authors' SGD pairing at the weights' learning rate.
  "fmnist_vit_tiny": dict(arch="vit_tiny", dataset="fashion_mnist", optimizer="adamw", lr=1e-3,
                          weight_decay=0.05, warmup_epochs=0.5, lr_schedule="cosine", grad_clip=1.0,
                          label_smoothing=0.1, dropout=0.0, epochs=5, batch_size=128, augment=False),
  # ViT-S/16 on ImageNet, DeiT's recipe (AdamW 5e-4 x batch/512, wd 0.05, 5 warm-up epochs, smoothing 0.1).
  "imagenet_vit_s16": dict(arch="vit_s16", dataset="imagenet2012", optimizer="adamw", lr=5e-4, weight_decay=0.05,
                           warmup_epochs=5, lr_schedule="cosine", grad_clip=1.0, label_smoothing=0.1,
                           dropout=0.0, epochs=300, batch_size=512, half_precision=True, eval_batch_size=250,
                           log_every=100, checkpoint_every=2000),
  # Ternary decoder LMs on Tiny Shakespeare (committed: offline). nanoGPT's shakespeare_char recipe:
  # AdamW (beta2 0.99), warm-up then cosine to a tenth of the peak, decay on matrices only, clipping;
  # the head and embeddings full precision; TGA sequential, thresholds on the authors' SGD pairing.
  "shakespeare_char_baby": dict(_SHAKESPEARE, arch="llama_baby", batch_size=12, train_steps=2000),
  "shakespeare_char": dict(_SHAKESPEARE, arch="llama_256", batch_size=32, train_steps=SHAKESPEARE_CHAR_STEPS,
                           eval_every=100),
  # Full-precision pretraining for the --init-from flow.
  "imagenet_resnet18_fp": dict(dataset="imagenet2012", arch="resnet18", quantizer="fp", optimizer="sgd",
                               lr=0.1, epochs=90, lr_schedule="step", schedule=(30, 60, 80),
                               gammas=(0.1, 0.1, 0.1), weight_decay=1e-4, batch_size=256),
}

CHOICES: dict[str, tuple[str, ...]] = {
  "update": ("sequential", "joint"), "optimizer": ("sgd", "adam", "adamw"),
  "threshold_optimizer": ("auto", "sgd", "adam"), "lr_schedule": ("step", "cosine"),
  "bn_running_stats": ("once", "authors"),
  "parallel": ("shard_map", "pmap", "fsdp"),
  "vocabulary": ("chars", "bytes"), "weight_decay_on": ("all", "matrices"),
}


def choices() -> dict[str, tuple[str, ...]]:
  """Every option with a fixed set of values; quantizers as registered now (register_quantizer)."""
  return {**CHOICES, "quantizer": quantizer_names()}


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _is_real(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# (fields, test, what the test requires): one phrase per violated field.
_RULES: tuple[tuple[tuple[str, ...], Any, str], ...] = (
  (("lr", "weight_decay", "threshold_grad_clip", "warmup_epochs", "grad_clip"),
   lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
  (("label_smoothing",), lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
  (("lr_end",), lambda v: _is_real(v) and 0 <= v <= 1, "in [0, 1] (a fraction of --lr)"),
  (("adam_b2",), lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
  (("dropout",), lambda v: v is None or (_is_real(v) and 0 <= v < 1), "in [0, 1)"),
  (("threshold_lr", "threshold_weight_decay"),  # None: the authors' pairing decides
   lambda v: v is None or (_is_real(v) and v >= 0), "a finite number >= 0"),
  (("momentum",), lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
  (("epochs", "batch_size", "eval_batch_size", "log_every", "keep_checkpoints"),
   lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  (("max_steps", "num_train", "num_test", "num_classes", "num_processes", "train_steps", "context"),
   lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
  (("checkpoint_every", "seed", "fsdp_devices", "eval_every", "eval_windows", "warmup_steps", "sample_tokens"),
   lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
  (("sample_prompt",), lambda v: isinstance(v, str), "a string"),
  (("data_file",), lambda v: v is None or (isinstance(v, str) and v != ""), "a file name"),
  (("process_id",), lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0"),
  (("activation_bits",), lambda v: v is None or (_is_int(v) and 2 <= v <= 16), "an integer in [2, 16]"),
  (("image_shape",), lambda v: len(v) == 0 or (len(v) == 3 and all(_is_int(d) and d >= 1 for d in v)),
   "three integers >= 1, height width channels"),
  (("schedule",), lambda v: all(_is_real(e) and e >= 0 for e in v), "epochs >= 0"),
  (("gammas",), lambda v: all(_is_real(g) and g > 0 for g in v), "finite factors > 0"),
)


def _problems(cfg: Config) -> list[str]:
  """One phrase per impossible option of ``cfg`` (empty when every option is possible)."""
  out = []
  for name, values in choices().items():
    if getattr(cfg, name) not in values:
      out.append(f"{_flag(name)} must be one of {', '.join(values)} (got {getattr(cfg, name)!r})")
  for names, ok, requirement in _RULES:
    for name in names:
      value = getattr(cfg, name)
      if not ok(value):
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
        out.append(f"{_flag(name)} must be {requirement} (got {shown})")
  if cfg.lr_schedule == "step" and len(cfg.schedule) != len(cfg.gammas):
    out.append(f"--schedule ({len(cfg.schedule)} epochs) and --gammas ({len(cfg.gammas)} factors) "
               "must have the same length")
  if cfg.lr_schedule != "step" and (cfg.schedule or cfg.gammas):
    out.append(f"--schedule and --gammas apply to --lr-schedule step only (got --lr-schedule {cfg.lr_schedule} "
               "with them)")
  if any(b <= a for a, b in zip(cfg.schedule, cfg.schedule[1:])):
    out.append(f"--schedule must list increasing epochs (got {' '.join(map(str, cfg.schedule))})")
  if cfg.parallel == "fsdp" and not cfg.bn_cross_device:
    out.append("--no-bn-cross-device does not apply to --parallel fsdp (its step sees the global batch: "
               "BatchNorm statistics are always over all devices)")
  if cfg.parallel != "fsdp" and cfg.fsdp_devices:
    out.append(f"--fsdp-devices applies to --parallel fsdp only (got --parallel {cfg.parallel})")
  if cfg.warmup_steps and cfg.warmup_epochs:
    out.append(f"--warmup-steps ({cfg.warmup_steps}) and --warmup-epochs ({cfg.warmup_epochs}) both set: give one")
  if cfg.lr_end and cfg.lr_schedule != "cosine":
    out.append(f"--lr-end applies to --lr-schedule cosine only (got --lr-schedule {cfg.lr_schedule})")
  if cfg.dataset == "text":
    given = [_flag(k) for k in ("image_shape", "num_train", "num_test", "num_classes") if getattr(cfg, k)]
    if given:
      out.append(f"{', '.join(given)} do not apply to --dataset text (a text file's size and vocabulary are its own)")
  elif cfg.data_file is not None:
    out.append(f"--data-file names a text file, for --dataset text only (got --dataset {cfg.dataset})")
  if _is_int(cfg.process_id) and _is_int(cfg.num_processes) and cfg.process_id >= cfg.num_processes:
    out.append(f"--process-id must be below --num-processes ({cfg.num_processes}; got {cfg.process_id})")
  return out


def _field_type(field: dataclasses.Field) -> tuple[Any, bool]:
  """(scalar parser, is_tuple) for a Config field."""
  hints = typing.get_type_hints(Config)
  t = hints[field.name]
  origin, args = typing.get_origin(t), typing.get_args(t)
  if origin is tuple:
    return args[0], True
  if args:  # Optional[X]
    t = next(a for a in args if a is not type(None))
  return t, False


class _Parser(argparse.ArgumentParser):
  """Bad options are one line on stderr (``error: ...``) and exit code 2, without the usage block."""

  def error(self, message):
    self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
    prog="train.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    description="Train a ternary-weight network with TGA (He & Fan, CVPR 2019). With no options: "
                "the small CNN on Fashion-MNIST, every layer ternary (the demo). Defaults shown are "
                "the demo's; a --config preset replaces them and explicit flags override the preset.")
  parser.add_argument("--config", default="demo", choices=sorted(PRESETS), help="named preset")
  for field in dataclasses.fields(Config):
    flag = _flag(field.name)
    scalar, is_tuple = _field_type(field)
    default = PRESETS["demo"].get(field.name, field.default)  # what `python train.py` uses
    kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"(default: {default})")
    if scalar is bool:
      parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
      continue
    if is_tuple:
      kw.update(nargs="*", type=scalar)
    else:
      kw["type"] = scalar
    if field.name in choices():
      kw["choices"] = choices()[field.name]
    parser.add_argument(flag, **kw)
  return parser


def from_args(argv: list[str] | None = None) -> Config:
  """Parses a command line into a validated Config: the preset, then the explicitly given flags.

  An impossible option exits like argparse does: ``error: ...`` on one line, code 2.
  """
  parser = build_parser()
  args = vars(parser.parse_args(argv))
  preset = PRESETS[args.pop("config")]
  if args.get("lr_schedule", "step") != "step":  # a preset's step epochs do not carry over to another schedule
    preset = {k: v for k, v in preset.items() if k not in ("schedule", "gammas")}
  values = {**preset, **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}}
  try:
    return Config(**values).validate()
  except ValueError as e:
    parser.error(str(e))
