"""The run harness: a :class:`Config` made into optimizers, a model and the loop (data, devices,
checkpoints, logs). The algorithm itself (state, labels, steps) is :mod:`tgq_jax.training.algorithm`.

The step functions run *per device* (pmap style): they see their shard of the
batch and average gradients, running statistics and metrics explicitly with
``lax.pmean(..., "data")``; BatchNorm itself normalizes with the global
batch's statistics (``Config.bn_cross_device``, default), so a step gives the
same result on any number of devices. :func:`tgq_jax.training.parallel.map_step` maps them over
the devices with ``jax.shard_map`` or ``jax.pmap``; under ``--parallel fsdp`` the steps are
the global-view functions (no axis), jitted with the state sharded
(:func:`tgq_jax.training.parallel.map_steps`). :func:`train_and_evaluate`
runs it all (``train.py`` and the notebooks call it): :func:`start_run` builds a
:class:`Run`, :func:`train_loop` drives it, one named action per period (log,
checkpoint, evaluate; the divergence rule of :mod:`tgq_jax.training.divergence`
inside them), :meth:`Run.finish` writes the summary. Metrics files are
:mod:`tgq_jax.training.metrics`; the workdir (lock, ``config.json``) is
:mod:`tgq_jax.training.workdir`.

The update rules (sequential, joint) and the BatchNorm running-statistics
rules are described in :mod:`tgq_jax.training.algorithm`; ``Config.bn_running_stats``
"once" / "authors" selects ``bn_both_passes`` False / True.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax import lax

from tgq_jax.training import checkpoints, parallel, xla_cpu
from tgq_jax.training.algorithm import (THRESHOLD, WEIGHT, ClassificationStep, TrainState, param_labels,
                                        state_from_variables, step_rngs, threshold_names)
from tgq_jax.training.tga import TGA
from tgq_jax import data as data_lib
from tgq_jax.training.configs import Config
from tgq_jax.core.trees import layer_stats
from tgq_jax.frontends.linen_layers import init_ternary_from_fp, quantized_layers
from tgq_jax.models import create_model, load_torchvision_weights
# DivergenceError, NonFiniteLossError, nonfinite_scales: re-exported (train.py and callers use them from here).
from tgq_jax.training.divergence import (DivergenceError, DivergenceGuard, NonFiniteLossError,  # noqa: F401
                                         nonfinite_scales)
from tgq_jax.training.lm import LanguageModelTask, check_task_fits, model_context
from tgq_jax.training.metrics import MetricsWriter
from tgq_jax.training.parallel import to_host
from tgq_jax.training.workdir import (check_resume_config, check_run_config, prepare_workdir, workdir_lock,
                                      write_json_atomically, write_run_config)

# --- the algorithm, configured from a Config ----------------------------------


def run_steps(cfg: Config, steps_per_epoch: int) -> int:
  """The run's length in steps, which the schedule spans: ``cfg.train_steps``, else ``cfg.epochs`` epochs
  (``--max-steps`` may stop the loop earlier; it does not change the schedule)."""
  return max(1, cfg.train_steps or cfg.epochs * steps_per_epoch)


def lr_schedule(cfg: Config, base_lr: float, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate per step: linear warm-up from 0 over ``cfg.warmup_steps`` (or ``cfg.warmup_epochs``),
  then cosine to ``cfg.lr_end * base_lr`` at the end of the run (:func:`run_steps`), or x gamma at each
  listed epoch."""
  total = run_steps(cfg, steps_per_epoch)
  warmup = min(cfg.warmup_steps or int(cfg.warmup_epochs * steps_per_epoch), total - 1)
  if cfg.lr_schedule == "cosine":
    if warmup:
      return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps=warmup, decay_steps=total,
                                                end_value=cfg.lr_end * base_lr)
    return optax.cosine_decay_schedule(base_lr, decay_steps=total, alpha=cfg.lr_end)
  if cfg.lr_schedule == "step":
    if len(cfg.schedule) != len(cfg.gammas):
      raise ValueError(f"--schedule ({len(cfg.schedule)} epochs) and --gammas ({len(cfg.gammas)} factors) "
                       "must have the same length.")
    # piecewise_constant_schedule multiplies cumulatively, like the reference's gammas.
    bounds = {int(e * steps_per_epoch): float(g) for e, g in zip(cfg.schedule, cfg.gammas)}
    step = optax.piecewise_constant_schedule(base_lr, bounds)
    if not warmup:
      return step
    return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), step], [warmup])
  raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r}; valid: step, cosine.")


def threshold_recipe(cfg: Config) -> tuple[str, float, float]:
  """(kind, base lr, weight decay) of the threshold optimizer.

  ``threshold_optimizer="auto"`` is the authors' pairing (main_dc.py): the
  thresholds always use SGD (``cfg.momentum``, Nesterov) at the weights'
  learning rate; with SGD weights they share the weights' weight decay, with
  Adam (or AdamW) weights they get none. Explicit ``threshold_*`` fields override.
  """
  kind = "sgd" if cfg.threshold_optimizer == "auto" else cfg.threshold_optimizer
  lr = cfg.lr if cfg.threshold_lr is None else cfg.threshold_lr
  if cfg.threshold_weight_decay is not None:
    decay = cfg.threshold_weight_decay
  else:
    decay = cfg.weight_decay if cfg.optimizer == "sgd" else 0.0
  return kind, lr, decay


def decay_mask(weight_decay_on: str) -> Callable[[Any], Any] | None:
  """Which leaves weight decay applies to: None (every leaf, "all"), or ("matrices") a mask of the leaves
  with two or more axes (kernels, embeddings; not norms, biases, scalars), as nanoGPT's optimizer groups."""
  if weight_decay_on == "all":
    return None
  if weight_decay_on == "matrices":
    return lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  raise ValueError(f"unknown weight decay target {weight_decay_on!r}; valid: all, matrices.")


def _base_optimizer(kind: str, lr: optax.Schedule, weight_decay: float, cfg: Config,
                    mask: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
  if kind == "adamw":  # decoupled weight decay (Loshchilov & Hutter), on the leaves ``mask`` selects (all: None)
    return optax.adamw(lr, b2=cfg.adam_b2, weight_decay=weight_decay, mask=mask)
  # Coupled L2 weight decay (added to the gradient), as torch's SGD/Adam weight_decay.
  decay = [optax.add_decayed_weights(weight_decay, mask=mask)] if weight_decay else []
  if kind == "sgd":
    opt = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov and bool(cfg.momentum))
  elif kind == "adam":
    opt = optax.adam(lr, b2=cfg.adam_b2)  # torch's defaults: b1 0.9, b2 0.999, eps 1e-8 outside the sqrt
  else:
    raise ValueError(f"unknown optimizer {kind!r}; valid: sgd, adam, adamw.")
  return optax.chain(*decay, opt)


def make_tga(cfg: Config, labels: Any, steps_per_epoch: int) -> tuple[TGA, optax.Schedule]:
  """(the TGA update, weight lr schedule) of ``cfg``: its two optimizers, ``labels``, ``cfg.update``.

  See :class:`tgq_jax.training.tga.TGA`. The threshold gradient is
  clipped to ``+-threshold_grad_clip`` before weight decay is added, as the
  reference's backward hook does; ``grad_clip`` clips the weights' gradient
  by its global norm (the transformer recipe).
  """
  thr_kind, thr_base_lr, thr_decay = threshold_recipe(cfg)
  thr_lr = lr_schedule(cfg, thr_base_lr, steps_per_epoch)
  w_lr = lr_schedule(cfg, cfg.lr, steps_per_epoch)
  thr = optax.chain(optax.clip(cfg.threshold_grad_clip), _base_optimizer(thr_kind, thr_lr, thr_decay, cfg))
  weights = _base_optimizer(cfg.optimizer, w_lr, cfg.weight_decay, cfg, decay_mask(cfg.weight_decay_on))
  if cfg.grad_clip:
    weights = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), weights)
  return TGA(threshold_tx=thr, weight_tx=weights, labels=labels, sequential=cfg.update == "sequential"), w_lr


def make_model(cfg: Config, num_classes: int, dtype: Any = None) -> nn.Module:
  """The model ``cfg`` trains, as the trainer builds it (:meth:`Config.model_spec`).

  ``dtype``: the computation dtype; None is the config's (bfloat16 with
  ``half_precision``, else float32). BatchNorm gets the ``cfg.bn_*`` options:
  with ``bn_cross_device`` its training-mode statistics are averaged over the
  data axis, so training-mode calls must run inside the mapped step
  (evaluation and initialization run anywhere); under ``--parallel fsdp`` the
  step sees the global batch, so BatchNorm needs no axis.
  """
  spec = cfg.model_spec(num_classes)
  if dtype is not None:
    spec = dataclasses.replace(spec, dtype=jnp.dtype(dtype).name)
  return spec.build(bn_axis_name=parallel.step_axis_name(cfg.parallel) if cfg.bn_cross_device else None,
                    bn_unbiased_running_var=cfg.bn_running_stats == "authors")


def create_state(model: nn.Module, image_shape: tuple[int, ...], tga: TGA, seed: int) -> TrainState:
  """Initializes the variables and both optimizer states (host-identical on every process) for images."""
  return init_state(model, jnp.zeros((1, *image_shape), jnp.float32), tga, seed)


def init_state(model: nn.Module, example_input: jax.Array, tga: TGA, seed: int) -> TrainState:
  """Initializes the variables (on ``example_input``: a task's :meth:`example_input`) and both optimizer
  states, host-identical on every process."""
  rng = jax.random.PRNGKey(seed)
  init_rng, rng = jax.random.split(rng)
  variables = jax.jit(functools.partial(model.init, train=False))(init_rng, example_input)
  return state_from_variables(variables, tga, rng)


def make_step_fns(model: nn.Module, tga: TGA, cfg: Config, num_classes: int) -> tuple[Callable, Callable]:
  """The (train_step, eval_step) of ``cfg``: per device (reducing over the data axis), or global-view
  under fsdp (:func:`tgq_jax.training.parallel.step_axis_name`)."""
  if cfg.bn_running_stats not in ("once", "authors"):
    raise ValueError(f"unknown bn running stats rule {cfg.bn_running_stats!r}; valid: once, authors.")
  step = ClassificationStep(model=model, tga=tga, num_classes=num_classes, label_smoothing=cfg.label_smoothing,
                            bn_both_passes=cfg.bn_running_stats == "authors",
                            axis_name=parallel.step_axis_name(cfg.parallel))
  return step.train, step.evaluate


# --- reports -----------------------------------------------------------------


def model_size_bits(variables: Any, layers: Mapping) -> tuple[int, int]:
  """(FP32 bits, packed bits) of the model: :func:`tgq_jax.export.sizes.size_report` (the export's
  size report) of ``variables`` ({"params", "batch_stats", ...}; a bare params tree is taken as
  {"params": ...}): ternary kernels at 2 bits per weight (planar layout, as the packed model and
  a ``.safetensors`` export hold them) plus their float32 scales, quantizer leaves not stored,
  everything else as it is."""
  from tgq_jax.export.sizes import size_report

  variables = variables if "params" in variables else {"params": variables}
  report = size_report(flax.core.unfreeze(variables), layers)
  return 8 * report.fp32_bytes, 8 * report.packed_bytes


def format_report(test_metrics: dict, stats: list, size_bits: tuple[int, int]) -> str:
  """The table printed at the end of a classification run; ``size_bits`` is :func:`model_size_bits`."""
  return "\n".join([accuracy_line(test_metrics), *layer_table(stats, size_bits)])


def accuracy_line(test_metrics: Mapping[str, float]) -> str:
  return (f"test accuracy: {100 * test_metrics['accuracy']:.2f}%"
          + (f"   top-5: {100 * test_metrics['top5_accuracy']:.2f}%" if "top5_accuracy" in test_metrics else ""))


def layer_table(stats: list, size_bits: tuple[int, int]) -> list[str]:
  """The per-layer lines (quantizer, sparsity, threshold, scale) and the model-size line of the final report."""
  lines = [f"{'layer':<28}{'shape':<20}{'quantizer':<10}{'sparsity':>9}{'threshold':>11}{'scale':>10}"]
  for s in stats:
    thr, scale = ("-", "-") if s.scale is None else (f"{s.threshold:.4g}", f"{s.scale:.4g}")
    lines.append(f"{s.name:<28}{str(s.shape):<20}{s.quantizer:<10}{s.sparsity:>9.3f}{thr:>11}{scale:>10}")
  fp32, packed = size_bits
  lines.append(f"model size: FP32 {fp32 / 8 / 1024:.1f} KiB -> 2-bit ternary {packed / 8 / 1024:.1f} KiB "
               f"({fp32 / packed:.1f}x smaller; codes, scales and full-precision leaves, as exported)")
  return lines


# --- tasks: what a classification run and a language-model run do differently ----------------


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """The classification task of a run (the other: :class:`tgq_jax.training.lm.LanguageModelTask`).

  A task says what the loop does not: the model's example input, the step functions, the metrics
  derived from the evaluation's means, which checkpoint is best, the throughput unit, the summary
  fields and the final report. Both have the same attributes and methods.
  """

  cfg: Config
  info: Any  # the dataset's DatasetInfo

  name = "classification"
  eval_split = "test"
  best_key = "best_test_accuracy"
  best_metric = checkpoints.BEST_METRIC
  best_lower = False
  throughput_key = "img_per_sec"
  tokens_per_example = 1

  def example_input(self) -> jax.Array:
    return jnp.zeros((1, *self.info.image_shape), jnp.float32)

  def step_fns(self, model: nn.Module, tga: TGA, axis_name: str | None) -> tuple[Callable, Callable]:
    del axis_name  # (make_step_fns takes the axis from cfg.parallel, as make_model does)
    return make_step_fns(model, tga, self.cfg, self.info.num_classes)

  def record(self) -> dict:
    return {}

  def finish_eval(self, means: Mapping[str, float]) -> dict:
    return dict(means)

  def checkpoint_metrics(self, metrics: Mapping[str, float]) -> dict:
    return {self.best_metric: metrics["accuracy"]}

  def better(self, metrics: Mapping[str, float], best: float | None) -> float:
    return metrics["accuracy"] if best is None else max(best, metrics["accuracy"])

  def announce(self, step: int, epoch: float, metrics: Mapping[str, float]) -> str:
    return f"epoch {epoch:.2f} (step {step}): test accuracy {100 * metrics['accuracy']:.2f}%"

  def sample(self, model: nn.Module, params: Any) -> None:
    return None

  def summary(self, metrics: Mapping[str, float] | None, best: float | None, sample: None) -> dict:
    return {"test_accuracy": None if metrics is None else metrics["accuracy"], "best_test_accuracy": best}

  def report(self, metrics: Mapping[str, float], table: list[str], sample: None) -> str:
    return "\n".join([accuracy_line(metrics), *table])


def make_task(cfg: Config, dataset) -> ClassificationTask | LanguageModelTask:
  """The task of ``cfg``'s run on ``dataset``: language modelling on ``--dataset text``, else classification."""
  if cfg.dataset == "text":
    return LanguageModelTask(dataset, sample_tokens=cfg.sample_tokens, sample_prompt=cfg.sample_prompt,
                             seed=cfg.seed)
  return ClassificationTask(cfg, dataset.info)


# --- the loop ----------------------------------------------------------------


def threshold_values(params: Any, layers: Mapping) -> dict[str, float]:
  """Each TGA layer's trainable threshold ``delta`` (mean |delta| over channels), by layer name.

  Cheap enough for every train log row: the threshold trajectories of a run.
  """
  out = {}
  for path, quantizer in layers.items():
    for name in quantizer.threshold_params:
      leaf = params
      for key in (*path, name):
        leaf = leaf[key]
      out["/".join(path)] = float(np.mean(np.abs(to_host(leaf))))
  return out


def evaluate(eval_fn: Callable, state: TrainState, dataset, cfg: Config, mesh, kind: str) -> dict:
  """Test metrics over the whole test split (padding masked out)."""
  totals = None
  for batch in dataset.eval_batches(global_batch_size=cfg.eval_batch_size):
    sums = eval_fn(state, parallel.put_batch(batch, mesh, kind))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = to_host(totals)
  count = max(float(totals.pop("count")), 1.0)
  return {k: float(v) / count for k, v in totals.items()}


class _Preemption:
  """SIGTERM and SIGINT (Ctrl-C) set :attr:`signal` (its name), which the loop checks after every step
  (then: save, summary, exit cleanly). A second SIGINT interrupts at once (KeyboardInterrupt)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.signal == "SIGINT":
      raise KeyboardInterrupt  # pressed twice: the user does not want to wait for the save
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


def check_eval_only(cfg: Config) -> None:
  """ValueError (one line) if ``--eval-only`` names a workdir without a checkpoint (nothing to evaluate)."""
  workdir = cfg.resolved_workdir()
  directory = os.path.join(workdir, "checkpoints")
  if not (os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))):
    what = "does not exist" if not os.path.exists(workdir) else "holds no checkpoint"
    raise ValueError(f"--eval-only: workdir {workdir} {what}; it evaluates a trained run's checkpoint "
                     "(a mistyped --workdir?)")


def check_image_shape(cfg: Config, num_classes: int, image_shape: tuple[int, ...]) -> None:
  """ValueError (one line) unless a training step of ``cfg``'s model can take images of ``image_shape``.

  Traces (does not run) the gradient of the model in training mode on a batch
  of such images: too small an image fails in a pooling or slicing op only there.
  """
  model = cfg.model_spec(num_classes).build()  # (no BatchNorm axis: traced outside the mapped step)
  images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
  key = jax.random.PRNGKey(0)

  def train_loss(x):
    variables = model.init({"params": key, "dropout": key}, x, train=False)

    def loss(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": key})
      return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss)(variables["params"])

  try:
    jax.eval_shape(train_loss, images)
  except (TypeError, ValueError, IndexError) as e:
    shape = " ".join(map(str, image_shape))
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"--image-shape {shape} does not fit --arch {cfg.arch}: a training step fails ({first}); "
                     "use larger images") from None


def setup(cfg: Config, cleanup: contextlib.ExitStack | None = None):
  """Builds everything a run needs; raises ValueError (one line) on bad options, before any work.

  ``cleanup``: where the workdir lock (:func:`tgq_jax.training.workdir.workdir_lock`) is held
  (None: no lock; only :func:`train_and_evaluate` writes).
  """
  cfg.validate()
  if cfg.eval_only:
    check_eval_only(cfg)  # before prepare_workdir: a mistyped workdir is not created
  check_task_fits(cfg.arch, cfg.dataset)
  workdir = cfg.resolved_workdir()
  prepare_workdir(workdir)
  if cleanup is not None and jax.process_index() == 0:  # (only the primary host writes)
    cleanup.enter_context(workdir_lock(workdir))
  check_run_config(workdir, cfg)
  if cfg.dataset == "text":
    if cfg.init_from:
      raise ValueError("--init-from is not supported for language models (--dataset text) yet")
    dataset = data_lib.get_dataset("text", data_file=cfg.data_file, vocabulary=cfg.vocabulary,
                                   context=cfg.context or model_context(cfg.arch), eval_windows=cfg.eval_windows)
  else:
    dataset = data_lib.get_dataset(cfg.dataset, data_dir=cfg.data_dir, image_shape=cfg.image_shape or None,
                                   num_classes=cfg.num_classes, num_train=cfg.num_train, num_test=cfg.num_test)
  info = dataset.info
  parallel.check_batch_size(cfg.batch_size)
  parallel.mesh_shape(cfg.parallel, cfg.fsdp_devices)  # --fsdp-devices must divide the device count
  if cfg.init_from:
    with _init_from_errors():
      check_init_from(cfg.init_from)  # a missing path fails now, before anything starts
  parallel.check_batch_size(cfg.eval_batch_size, "eval batch size")
  if cfg.image_shape:  # (a dataset's own shape fits every zoo model)
    check_image_shape(cfg, info.num_classes, info.image_shape)
  model = make_model(cfg, info.num_classes)
  layers = quantized_layers(model, make_task(cfg, dataset).example_input(), train=False)
  train_iter = dataset.train_iterator(global_batch_size=cfg.batch_size, seed=cfg.seed, augment=cfg.augment)
  return dataset, model, layers, train_iter


@dataclasses.dataclass
class Run:
  """A run in progress: what the loop changes (state, step, windows) and one method per action.

  :func:`train_loop` drives it: one training step, then each action whose period has
  come (the ``*_due`` predicates), as flax's examples/imagenet and big_vision's
  ``itstime`` loops do. The divergence guard checks inside the actions that read
  the state (:meth:`checked_host_state`), so nothing diverged is logged as good or saved.
  """

  cfg: Config
  task: ClassificationTask | LanguageModelTask
  dataset: Any
  train_iter: Any
  layers: Mapping
  mesh: Any
  train_fn: Callable
  eval_fn: Callable
  lr_fn: optax.Schedule
  manager: Any  # the orbax CheckpointManager
  writer: MetricsWriter
  guard: DivergenceGuard
  state: TrainState
  extra: dict  # saved with every checkpoint: the best evaluation (task.best_key), wall seconds before this process
  started: float  # time.time() when this process started the run
  total: int  # the last step
  verbose: bool = True
  step: int = 0
  pending: tuple[int, Any] | None = None  # the newest step's (step, metrics), checked one step late
  window: list = dataclasses.field(default_factory=list)  # metrics since the last train row
  window_started: float = 0.0
  checked: tuple[int, TrainState] | None = None  # (step, host state) the guard last checked
  test: dict | None = None  # the newest evaluation's metrics (test or val split) and layer statistics
  stats: list | None = None
  interrupted: str | None = None  # the signal that stopped the run, if one did
  model: nn.Module | None = None  # the model the state trains (the LM task samples text from it)

  @property
  def steps_per_epoch(self) -> int:
    return self.train_iter.steps_per_epoch

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  # --- when --------------------------------------------------------------------------------

  def epoch_ends(self) -> bool:
    """The step just done ends an epoch (or the run)."""
    return self.step % self.steps_per_epoch == 0 or self.step == self.total

  def log_due(self) -> bool:
    return self.step % self.cfg.log_every == 0 or self.epoch_ends()

  def eval_due(self) -> bool:
    """An evaluation (then a checkpoint): every ``--eval-every`` steps, else at epoch ends; and at the run's end."""
    every = self.cfg.eval_every
    return (self.step % every == 0 if every else self.step % self.steps_per_epoch == 0) or self.step == self.total

  def checkpoint_due(self) -> bool:
    """A checkpoint between evaluations (``--checkpoint-every``); evaluations save after evaluating."""
    every = self.cfg.checkpoint_every
    return bool(every) and self.step % every == 0 and not self.eval_due()

  # --- what --------------------------------------------------------------------------------

  def epoch_bar(self) -> tqdm.tqdm:
    epoch = self.step // self.steps_per_epoch
    end = min((epoch + 1) * self.steps_per_epoch, self.total)
    self.window, self.window_started = [], time.time()
    epochs = -(-self.total // self.steps_per_epoch)
    return tqdm.tqdm(total=end - self.step, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                     disable=not (self.verbose and self.is_main and sys.stderr.isatty()))

  def train_step(self) -> None:
    """One step; the guard checks the previous step's metrics meanwhile (lagged: keeps the device busy)."""
    batch = parallel.put_batch(next(self.train_iter), self.mesh, self.cfg.parallel)
    self.state, metrics = self.train_fn(self.state, batch)
    self.check_pending()
    self.step += 1
    self.pending = (self.step, metrics)
    self.window.append(metrics)

  def check_pending(self) -> None:
    if self.pending is not None:
      self.guard.check_step(*self.pending)

  def checked_host_state(self) -> TrainState:
    """Host copy of the state at this step, checked by the divergence guard (once per step)."""
    if self.checked is None or self.checked[0] != self.step:
      host = to_host(self.state)
      self.guard.check_state(self.step, host)
      self.checked = (self.step, host)
    return self.checked[1]

  def log_train(self, bar: tqdm.tqdm) -> None:
    """A train row: the window's mean metrics, the learning rate, throughput, thresholds."""
    self.check_pending()
    host = self.checked_host_state()
    means = {k: float(np.mean([to_host(m[k]) for m in self.window])) for k in self.window[0]}
    examples = len(self.window) * self.cfg.batch_size * self.task.tokens_per_example
    rate = examples / max(time.time() - self.window_started, 1e-9)
    deltas = threshold_values(host.params, self.layers) if threshold_names(self.layers) else None
    self.writer.write({"step": self.step, "epoch": self.step / self.steps_per_epoch, "split": "train", **means,
                       "lr": float(self.lr_fn(self.step - 1)), self.task.throughput_key: rate,
                       **({"delta": deltas} if deltas is not None else {})})
    bar.set_postfix(loss=f"{means['loss']:.4f}", per_s=f"{rate:.0f}")
    self.window, self.window_started = [], time.time()

  def save(self, metrics: dict | None = None) -> None:
    """A checkpoint of this step (host copies, or the sharded arrays under fsdp; any topology restores it),
    checked first: nothing diverged is saved."""
    self.check_pending()
    host = self.checked_host_state()
    # Under fsdp the sharded arrays are saved as they are (each process writes its shards).
    state = self.state if self.cfg.parallel == "fsdp" else host
    data_state = {"iterator": self.train_iter.get_state(),
                  "extra": {**self.extra, "wall_seconds": self.extra["wall_seconds"] + time.time() - self.started}}
    checkpoints.save(self.manager, self.step, state, data_state, metrics, host_state=host)
    self.guard.last_saved = self.step

  def log_test(self) -> None:
    """An evaluation row (split "test", or "val" for LMs): the task's metrics and each quantized layer's
    statistics."""
    means = evaluate(self.eval_fn, self.state, self.dataset, self.cfg, self.mesh, self.cfg.parallel)
    self.test = self.task.finish_eval(means)
    self.stats = layer_stats(to_host(self.state.params), self.layers)
    self.writer.write({"step": self.step, "epoch": self.step / self.steps_per_epoch, "split": self.task.eval_split,
                       **self.test, "layers": [s.as_dict() for s in self.stats]})
    self.extra[self.task.best_key] = self.task.better(self.test, self.extra.get(self.task.best_key))

  def end_epoch(self) -> None:
    """Checks the state (a diverged one gets no evaluation row), evaluates, saves with the task's best metric."""
    self.check_pending()
    self.checked_host_state()
    self.log_test()
    self.save(self.task.checkpoint_metrics(self.test))
    if self.verbose and self.is_main:
      print(self.task.announce(self.step, self.step / self.steps_per_epoch, self.test))

  def finish(self) -> dict:
    """The summary (summary.json; the final report printed): evaluates first if no epoch ended here."""
    if self.interrupted is None and self.test is None:  # eval-only, or resumed a finished run
      self.log_test()
    sample = None if self.interrupted is not None else self.task.sample(self.model, to_host(self.state.params))
    self.extra["wall_seconds"] += time.time() - self.started
    summary = {**self.task.summary(self.test, self.extra.get(self.task.best_key), sample), "steps": self.step,
               "wall_seconds": self.extra["wall_seconds"], "interrupted": self.interrupted is not None,
               "config": dataclasses.asdict(self.cfg)}
    if self.test is not None:
      summary[f"{self.task.eval_split}_metrics"] = self.test
      host = to_host({"params": self.state.params, "batch_stats": self.state.batch_stats})
      summary["report"] = self.task.report(self.test, layer_table(self.stats, model_size_bits(host, self.layers)),
                                           sample)
    if self.is_main:
      write_json_atomically(os.path.join(self.cfg.resolved_workdir(), "summary.json"),
                            {k: v for k, v in summary.items() if k != "report"}, indent=2)
      if self.verbose and self.interrupted:
        print(f"interrupted ({self.interrupted}): checkpoint saved at step {self.step}")
      elif self.verbose:
        print(summary["report"])
    return summary


def train_loop(run: Run, preemption: _Preemption) -> None:
  """Trains ``run`` up to ``run.total``: a step, then each action that is due, in this order."""
  bar = None
  while run.step < run.total:
    bar = bar or run.epoch_bar()
    run.train_step()
    bar.update(1)
    if run.log_due():
      run.log_train(bar)
    if preemption.signal or run.manager.reached_preemption(run.step):
      run.save()
      run.interrupted = preemption.signal or "preemption"
      break
    if run.checkpoint_due():
      run.save()
    if run.epoch_ends():
      bar.close()
      bar = None
    if run.eval_due():
      run.end_epoch()
  if bar is not None:
    bar.close()


def start_run(cfg: Config, cleanup: contextlib.ExitStack, verbose: bool = True) -> Run:
  """Everything before the first step: setup, the step functions, the state (new, resumed or
  ``--init-from``), the checkpoint manager and writers (closed by ``cleanup``)."""
  started = time.time()
  dataset, model, layers, train_iter = setup(cfg, cleanup)
  info, spe = dataset.info, train_iter.steps_per_epoch
  task = make_task(cfg, dataset)
  workdir = cfg.resolved_workdir()
  is_main = jax.process_index() == 0
  mesh, kind = parallel.make_mesh(cfg.parallel, cfg.fsdp_devices), cfg.parallel
  labels = param_labels(jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                                       task.example_input())["params"], layers)
  tga, lr_fn = make_tga(cfg, labels, spe)
  train_fn, eval_fn = task.step_fns(model, tga, parallel.step_axis_name(kind))
  train_fn, eval_fn = dataset.wrap_step(train_fn), dataset.wrap_step(eval_fn)  # uint8 "pixels" -> "image" on device
  state = init_state(model, task.example_input(), tga, cfg.seed)
  train_fn, eval_fn = parallel.map_steps(train_fn, eval_fn, mesh, kind, state)
  manager = checkpoints.make_manager(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints,
                                     best_metric=task.best_metric, best_lower=task.best_lower)
  cleanup.callback(manager.close)
  cleanup.callback(manager.wait_until_finished)  # (callbacks run last-in first-out)
  extra = {task.best_key: None, "wall_seconds": 0.0}
  resumed = manager.latest_step() is not None
  if resumed:  # re-running the same command resumes
    check_resume_config(workdir, cfg, cfg.model_spec(info.num_classes).to_dict(), task.record())
    # The newest intact checkpoint; damaged newer ones are reported and moved aside.
    state, restored = checkpoints.restore(manager, to_host(state), quarantine=True,
                                          shardings=parallel.state_shardings(state, mesh, kind),
                                          report=checkpoints.report_to_stderr if is_main else lambda _: None)
    train_iter.set_state(restored["iterator"])
    extra = {**extra, **restored.get("extra", {})}
    if verbose and is_main:
      print(f"resuming from step {int(state.step)} in {workdir}")
  elif cfg.eval_only:  # (check_eval_only saw a step folder, but none is a checkpoint orbax lists)
    raise ValueError(f"--eval-only: workdir {workdir} holds no checkpoint to evaluate")
  elif cfg.init_from:
    state = init_from_checkpoint(state, cfg.init_from, model, info.image_shape, tga, arch=cfg.arch)
  step = int(to_host(state.step))
  if is_main:  # only now: a workdir whose checkpoints do not fit this model keeps its record
    write_run_config(workdir, cfg, info, resumed_at=step if resumed else None, record=task.record())
  state = parallel.put_state(state, mesh, kind)

  total = run_steps(cfg, spe) if cfg.max_steps is None else min(cfg.max_steps, run_steps(cfg, spe))
  writer = MetricsWriter(workdir, enabled=is_main, start_step=step)
  cleanup.callback(writer.close)
  guard = DivergenceGuard(info.num_classes, layers, manager.latest_step())
  return Run(cfg, task, dataset, train_iter, layers, mesh, train_fn, eval_fn, lr_fn, manager, writer, guard, state,
             extra, started, total=step if cfg.eval_only else total, verbose=verbose, step=step, model=model)


def train_and_evaluate(cfg: Config, *, verbose: bool = True) -> dict:
  """Trains (or resumes, or only evaluates) as ``cfg`` says; returns the summary (also summary.json).

  One process per workdir (a second is refused, :class:`~tgq_jax.training.workdir.WorkdirBusyError`).
  SIGTERM or SIGINT stop it after the current step with a checkpoint and summary. Raises
  :class:`DivergenceError` (nothing diverged saved), :class:`~tgq_jax.training.workdir.WriteFailure` /
  :class:`~tgq_jax.training.checkpoints.CheckpointWriteError` (a full disk: the files before intact),
  ValueError (bad options or inputs, before any work).
  """
  xla_cpu.configure()  # before the first computation, or it changes nothing
  with contextlib.ExitStack() as cleanup:  # the lock, checkpoint manager and writers: released on any exit
    run = start_run(cfg, cleanup, verbose)
    with _Preemption() as preemption:
      train_loop(run, preemption)
    return run.finish()


TORCHVISION_SUFFIXES = (".npz", ".pth", ".pt")


def is_torchvision_file(path: str) -> bool:
  """``--init-from`` names a torchvision state dict (a file), not a checkpoint of this trainer."""
  return os.path.splitext(path)[1].lower() in TORCHVISION_SUFFIXES


_ZIP_MAGIC = b"PK\x03\x04"  # .npz archives, and .pth/.pt files torch saves since 1.6
_PICKLE_MAGIC = b"\x80"  # .pth/.pt files of older torch (a pickle protocol >= 2 stream)


def check_init_from(path: str) -> None:
  """Raises CheckpointError (one line) unless ``path`` can be an ``--init-from`` source.

  Says what ``path`` is when it is not what is expected: a file that is no checkpoint
  directory, or a ``.npz``/``.pth`` whose bytes are no such file (read before numpy or torch
  sees them: numpy would suggest ``allow_pickle``, which must never be followed for it).
  """
  expected = ("--init-from takes a checkpoint of this trainer (a workdir, its checkpoints/ or one step "
              "directory) or a torchvision state dict (.npz; .pth/.pt with torch)")
  if not is_torchvision_file(path):
    if os.path.isfile(path):
      raise checkpoints.CheckpointError(f"{path} is a file, not a checkpoint directory; {expected}")
    checkpoints.resolve(path)
    return
  if os.path.isdir(path):
    raise checkpoints.CheckpointError(f"{path} is a directory, not a torchvision state dict file; {expected}")
  if not os.path.isfile(path):
    raise checkpoints.CheckpointError(f"no such torchvision state dict file: {path}")
  with open(path, "rb") as f:
    head = f.read(4)
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz" and head != _ZIP_MAGIC:
    raise checkpoints.CheckpointError(f"{path} is not a .npz archive (no zip header; an .npz is a zip of .npy "
                                      "arrays, see docs/torchvision.md)")
  if suffix != ".npz" and head != _ZIP_MAGIC and not head.startswith(_PICKLE_MAGIC):
    raise checkpoints.CheckpointError(f"{path} is not a torch state dict file (neither a zip archive nor a "
                                      "pickle stream)")


def load_fp_variables(path: str, arch: str) -> dict:
  """The full-precision variables ``--init-from`` names: a torchvision file or a trainer checkpoint."""
  if not is_torchvision_file(path):
    return checkpoints.load_variables(path)
  try:
    return load_torchvision_weights(path, arch)
  except ImportError as e:  # a .pth without torch: the message says how to make a .npz
    raise checkpoints.CheckpointError(str(e)) from None
  except ValueError as e:  # another arch, or not a torchvision ResNet state dict
    raise checkpoints.CheckpointError(str(e)) from None


@contextlib.contextmanager
def _init_from_errors():
  """Prefixes checkpoint errors with the option they came from."""
  try:
    yield
  except checkpoints.CheckpointError as e:
    raise checkpoints.CheckpointError(f"--init-from: {e}") from None


def init_from_checkpoint(state: TrainState, path: str, model: nn.Module, image_shape: tuple[int, ...],
                         tga: TGA, arch: str | None = None) -> TrainState:
  """Loads full-precision weights, re-initializes the thresholds, fresh optimizer states (fine-tuning).

  ``path``: a checkpoint of this trainer (workdir, checkpoints dir or step dir) or a torchvision
  state dict of ``arch`` (``.npz``; ``.pth``/``.pt`` when torch is importable). Thresholds start at
  ``delta = 0.05 max|w|`` of the loaded kernels, as the authors re-initialize them after loading.
  """
  if is_torchvision_file(path) and arch is None:
    raise ValueError("init_from_checkpoint: a torchvision state dict needs arch=.")
  with _init_from_errors():
    source = load_fp_variables(path, arch)
  try:
    variables = init_ternary_from_fp(model, source, image_shape)
  except ValueError as e:
    raise checkpoints.CheckpointError(f"--init-from: checkpoint is of another architecture ({e})") from None
  variables = jax.tree.map(np.asarray, variables)
  return state_from_variables(variables, tga, state.rng).replace(step=state.step)
