"""The run harness: a :class:`Config` made into optimizers, a model and the loop (data, devices,
checkpoints, logs). The algorithm itself (state, labels, steps) is :mod:`tgq_jax.training.algorithm`.

The step functions run *per device* (pmap style): they see their shard of the
batch and average gradients, running statistics and metrics explicitly with
``lax.pmean(..., "data")``; BatchNorm itself normalizes with the global
batch's statistics (``Config.bn_cross_device``, default), so a step gives the
same result on any number of devices. :func:`tgq_jax.training.parallel.map_step` maps them over
the devices with ``jax.shard_map`` or ``jax.pmap``. :func:`train_and_evaluate`
is the loop (``train.py`` and the notebooks call it).

The update rules (sequential, joint) and the BatchNorm running-statistics
rules are described in :mod:`tgq_jax.training.algorithm`; ``Config.bn_running_stats``
"once" / "authors" selects ``bn_both_passes`` False / True.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
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
from tgq_jax.training.parallel import AXIS
from tgq_jax.training.workdir import check_run_config, prepare_workdir, write_run_config

# --- the algorithm, configured from a Config ----------------------------------


def lr_schedule(cfg: Config, base_lr: float, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate per step: linear warm-up over ``cfg.warmup_epochs``, then cosine to 0
  over the rest of the run, or x gamma at each listed epoch."""
  total = max(1, cfg.epochs * steps_per_epoch)
  warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
  if cfg.lr_schedule == "cosine":
    if warmup:
      return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps=warmup, decay_steps=total)
    return optax.cosine_decay_schedule(base_lr, decay_steps=total)
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


def _base_optimizer(kind: str, lr: optax.Schedule, weight_decay: float, cfg: Config
                    ) -> optax.GradientTransformation:
  if kind == "adamw":  # decoupled weight decay (Loshchilov & Hutter), on every weight leaf
    return optax.adamw(lr, weight_decay=weight_decay)
  # Coupled L2 weight decay (added to the gradient), as torch's SGD/Adam weight_decay.
  decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  if kind == "sgd":
    opt = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov and bool(cfg.momentum))
  elif kind == "adam":
    opt = optax.adam(lr)  # torch's defaults: b1 0.9, b2 0.999, eps 1e-8 outside the sqrt
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
  weights = _base_optimizer(cfg.optimizer, w_lr, cfg.weight_decay, cfg)
  if cfg.grad_clip:
    weights = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), weights)
  return TGA(threshold_tx=thr, weight_tx=weights, labels=labels, sequential=cfg.update == "sequential"), w_lr


def make_model(cfg: Config, num_classes: int, dtype: Any = None) -> nn.Module:
  """The model ``cfg`` trains, as the trainer builds it (:meth:`Config.model_spec`).

  ``dtype``: the computation dtype; None is the config's (bfloat16 with
  ``half_precision``, else float32). BatchNorm gets the ``cfg.bn_*`` options:
  with ``bn_cross_device`` its training-mode statistics are averaged over the
  data axis, so training-mode calls must run inside the mapped step
  (evaluation and initialization run anywhere).
  """
  spec = cfg.model_spec(num_classes)
  if dtype is not None:
    spec = dataclasses.replace(spec, dtype=jnp.dtype(dtype).name)
  return spec.build(bn_axis_name=AXIS if cfg.bn_cross_device else None,
                    bn_unbiased_running_var=cfg.bn_running_stats == "authors")


def create_state(model: nn.Module, image_shape: tuple[int, ...], tga: TGA, seed: int) -> TrainState:
  """Initializes the variables and both optimizer states (host-identical on every process)."""
  rng = jax.random.PRNGKey(seed)
  init_rng, rng = jax.random.split(rng)
  variables = jax.jit(functools.partial(model.init, train=False))(
    init_rng, jnp.zeros((1, *image_shape), jnp.float32))
  return state_from_variables(variables, tga, rng)


def make_step_fns(model: nn.Module, tga: TGA, cfg: Config, num_classes: int) -> tuple[Callable, Callable]:
  """The per-device (train_step, eval_step) of ``cfg`` (mapped over AXIS)."""
  if cfg.bn_running_stats not in ("once", "authors"):
    raise ValueError(f"unknown bn running stats rule {cfg.bn_running_stats!r}; valid: once, authors.")
  step = ClassificationStep(model=model, tga=tga, num_classes=num_classes, label_smoothing=cfg.label_smoothing,
                            bn_both_passes=cfg.bn_running_stats == "authors", axis_name=AXIS)
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
  """The table printed at the end of a run; ``size_bits`` is :func:`model_size_bits`."""
  lines = [f"test accuracy: {100 * test_metrics['accuracy']:.2f}%"
           + (f"   top-5: {100 * test_metrics['top5_accuracy']:.2f}%" if "top5_accuracy" in test_metrics else ""),
           f"{'layer':<28}{'shape':<20}{'quantizer':<10}{'sparsity':>9}{'threshold':>11}{'scale':>10}"]
  for s in stats:
    thr, scale = ("-", "-") if s.scale is None else (f"{s.threshold:.4g}", f"{s.scale:.4g}")
    lines.append(f"{s.name:<28}{str(s.shape):<20}{s.quantizer:<10}{s.sparsity:>9.3f}{thr:>11}{scale:>10}")
  fp32, packed = size_bits
  lines.append(f"model size: FP32 {fp32 / 8 / 1024:.1f} KiB -> 2-bit ternary {packed / 8 / 1024:.1f} KiB "
               f"({fp32 / packed:.1f}x smaller; codes, scales and full-precision leaves, as exported)")
  return "\n".join(lines)


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


class DivergenceError(RuntimeError):
  """Training diverged (the rule: :class:`DivergenceGuard`); nothing of the diverged state was saved."""


NonFiniteLossError = DivergenceError  # its former name


def to_host(tree: Any) -> Any:
  """Host numpy copies of replicated arrays (works for multi-process global arrays too)."""
  def get(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def _read_jsonl(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; a line cut short by a crash is dropped."""
  rows = []
  with contextlib.suppress(FileNotFoundError), open(path) as f:
    for line in f:
      with contextlib.suppress(json.JSONDecodeError):
        rows.append(json.loads(line))
  return rows


def _rewrite_jsonl(path: str, rows: list[dict]) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)  # atomic: a crash leaves the old or the new file


class MetricsWriter:
  """metrics.jsonl (one object per event) and TensorBoard events (tensorboardX, no TensorFlow).

  At most one row per (split, step): a run that starts at step ``start_step``
  (0, or the step it resumes from) first drops the rows a killed run wrote
  after that step (the resumed run writes them again, identically), and a row
  for a (split, step) already there replaces it (an eval-only run's test row).
  TensorBoard events after ``start_step`` are purged likewise. Only process 0 writes.
  """

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      self._path = os.path.join(workdir, "metrics.jsonl")
      kept = [r for r in _read_jsonl(self._path) if r.get("step", 0) <= start_step]
      if os.path.exists(self._path):  # (also drops a line a crash cut short, which appending would extend)
        _rewrite_jsonl(self._path, kept)
      self._keys = {(r.get("split"), r.get("step")) for r in kept}
      self._jsonl = open(self._path, "a")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
      except ImportError:  # optional: metrics.jsonl is the record
        self._tb = None

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    key = (record["split"], record["step"])
    if key in self._keys:  # rare (re-evaluating a finished run): rewrite without the old row
      self._jsonl.close()
      _rewrite_jsonl(self._path, [r for r in _read_jsonl(self._path) if (r.get("split"), r.get("step")) != key])
      self._jsonl = open(self._path, "a")
    self._keys.add(key)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ("step", "epoch"):
          self._tb.add_scalar(f"{record['split']}/{k}", v, record["step"])
      for name, value in record.get("delta", {}).items():
        self._tb.add_scalar(f"delta/{name}", value, record["step"])
      for layer in record.get("layers", []):
        for k in ("sparsity", "threshold", "scale"):
          if layer[k] is not None:  # None: a full-precision layer
            self._tb.add_scalar(f"layers/{layer['name']}/{k}", layer[k], record["step"])

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def evaluate(eval_fn: Callable, state: TrainState, dataset, cfg: Config, mesh, kind: str) -> dict:
  """Test metrics over the whole test split (padding masked out)."""
  totals = None
  for batch in dataset.eval_batches(global_batch_size=cfg.eval_batch_size):
    sums = eval_fn(state, parallel.put_batch(batch, mesh, kind))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = to_host(totals)
  count = max(float(totals.pop("count")), 1.0)
  return {k: float(v) / count for k, v in totals.items()}


class DivergenceGuard:
  """The divergence rule (docs/training.md); :meth:`fail` stops the run naming the step and the reason.

  Training has diverged when

  * the loss or the gradient norm is NaN or Inf (checked every step);
  * the loss exceeds ``LOSS_FACTOR`` x its running level: the larger of
    ln(num_classes) (the loss of a uniform guess) and the running mean of the
    loss (an exponential moving average, decay ``LOSS_DECAY``, about the last
    100 steps, that starts at ln(num_classes) and takes in each step that
    passed). The floor keeps small, noisy losses late in training from
    tripping it (with 10 classes only a loss above 23 can); starting at the
    floor needs no warm-up and lets no early explosion become "the level";
  * any leaf of the state (parameters, thresholds, BatchNorm statistics,
    optimizer states) is NaN or Inf, or a ternary layer has sparsity 1.0
    (every weight zero) or a non-finite threshold (checked at every train log
    row and before every save, so nothing diverged is ever saved).
  """

  LOSS_FACTOR = 10.0
  LOSS_DECAY = 0.99

  def __init__(self, num_classes: int, layers: Mapping, last_saved: int | None):
    self.layers = layers
    self._thresholds = {"/".join(("params", *path, name)): "/".join(path)
                        for path, q in layers.items() for name in q.threshold_params}
    self.last_saved = last_saved  # the newest checkpoint: what stays when the run stops
    self._floor = float(np.log(max(num_classes, 2)))
    self._running = self._floor
    self._checked = -1

  def fail(self, step: int, reason: str):
    kept = ("no checkpoint was written" if self.last_saved is None
            else f"the newest checkpoint, step {self.last_saved}, is kept")
    raise DivergenceError(f"training diverged at step {step}: {reason}; stopping ({kept}).")

  def check_step(self, step: int, metrics: Mapping) -> None:
    """The loss and gradient norm of one step (idempotent: each step counts once)."""
    if step <= self._checked:
      return
    self._checked = step
    loss, grad_norm = (float(to_host(metrics[k])) for k in ("loss", "grad_norm"))
    if not np.isfinite(loss):
      self.fail(step, f"non-finite loss ({loss})")
    if not np.isfinite(grad_norm):
      self.fail(step, f"non-finite gradient norm ({grad_norm})")
    level = max(self._running, self._floor)
    if loss > self.LOSS_FACTOR * level:
      self.fail(step, f"loss {loss:.4g} is more than {self.LOSS_FACTOR:g}x its running level {level:.4g}")
    self._running = self.LOSS_DECAY * self._running + (1 - self.LOSS_DECAY) * loss

  def check_state(self, step: int, host_state: TrainState) -> None:
    """Every leaf finite (thresholds named as such), no ternary layer with every weight zero."""
    bad = checkpoints.nonfinite_leaves(checkpoints.flat_arrays(flax.serialization.to_state_dict(host_state)))
    for leaf in bad:  # a threshold first: the likelier cause, and the clearer message
      if leaf in self._thresholds:
        self.fail(step, f"layer {self._thresholds[leaf]} has a non-finite threshold ({leaf})")
    if bad:
      self.fail(step, str(checkpoints.NonFiniteStateError(bad)))
    for s in layer_stats(host_state.params, self.layers):
      if s.scale is not None and s.sparsity >= 1.0:  # (scale None: a full-precision layer)
        self.fail(step, f"layer {s.name} has sparsity 1.0 (every weight is zero)")


class _Preemption:
  """SIGTERM sets a flag the loop checks after every step (then: save, exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def setup(cfg: Config):
  """Builds everything a run needs; raises ValueError (one line) on bad options, before any work."""
  cfg.validate()
  prepare_workdir(cfg.resolved_workdir())
  check_run_config(cfg.resolved_workdir(), cfg)
  dataset = data_lib.get_dataset(cfg.dataset, data_dir=cfg.data_dir, image_shape=cfg.image_shape or None,
                                 num_classes=cfg.num_classes, num_train=cfg.num_train, num_test=cfg.num_test)
  info = dataset.info
  parallel.check_batch_size(cfg.batch_size)
  if cfg.init_from:
    with _init_from_errors():
      check_init_from(cfg.init_from)  # a missing path fails now, before anything starts
  parallel.check_batch_size(cfg.eval_batch_size, "eval batch size")
  model = make_model(cfg, info.num_classes)
  layers = quantized_layers(model, jnp.zeros((1, *info.image_shape)), train=False)
  train_iter = dataset.train_iterator(global_batch_size=cfg.batch_size, seed=cfg.seed, augment=cfg.augment)
  return dataset, model, layers, train_iter


def train_and_evaluate(cfg: Config, *, verbose: bool = True) -> dict:
  """Trains (or resumes, or only evaluates) as ``cfg`` says; returns the summary (also summary.json)."""
  xla_cpu.configure()  # before the first computation, or it changes nothing
  with contextlib.ExitStack() as cleanup:  # close the checkpoint manager and writers on any exit
    return _train_and_evaluate(cfg, verbose, cleanup)


def _train_and_evaluate(cfg: Config, verbose: bool, cleanup: contextlib.ExitStack) -> dict:
  t0 = time.time()
  dataset, model, layers, train_iter = setup(cfg)
  info, spe = dataset.info, train_iter.steps_per_epoch
  workdir = cfg.resolved_workdir()
  is_main = jax.process_index() == 0
  mesh, kind = parallel.make_mesh(), cfg.parallel
  labels = param_labels(jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                                       jnp.zeros((1, *info.image_shape)))["params"], layers)
  tga, lr_fn = make_tga(cfg, labels, spe)
  has_thr = bool(threshold_names(layers))
  train_fn, eval_fn = make_step_fns(model, tga, cfg, info.num_classes)
  train_fn, eval_fn = dataset.wrap_step(train_fn), dataset.wrap_step(eval_fn)  # uint8 "pixels" -> "image" on device
  train_fn, eval_fn = parallel.map_step(train_fn, mesh, kind), parallel.map_step(eval_fn, mesh, kind)

  state = create_state(model, info.image_shape, tga, cfg.seed)
  manager = checkpoints.make_manager(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
  cleanup.callback(manager.close)
  cleanup.callback(manager.wait_until_finished)  # (callbacks run last-in first-out)
  extra = {"best_test_accuracy": None, "wall_seconds": 0.0}
  if manager.latest_step() is not None:  # re-running the same command resumes
    # The newest intact checkpoint; damaged newer ones are reported and moved aside.
    state, restored = checkpoints.restore(manager, to_host(state), quarantine=True,
                                          report=checkpoints.report_to_stderr if is_main else lambda _: None)
    train_iter.set_state(restored["iterator"])
    extra = {**extra, **restored.get("extra", {})}
    if verbose and is_main:
      print(f"resuming from step {int(state.step)} in {workdir}")
  elif cfg.init_from:
    state = init_from_checkpoint(state, cfg.init_from, model, info.image_shape, tga, arch=cfg.arch)
  if is_main:  # only now: a workdir whose checkpoints do not fit this model keeps its record
    write_run_config(workdir, cfg, info)
  state = parallel.put_state(state, mesh, kind)

  total = spe * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, spe * cfg.epochs)
  step = int(to_host(state.step))
  writer = MetricsWriter(workdir, enabled=is_main, start_step=step)
  cleanup.callback(writer.close)
  guard = DivergenceGuard(info.num_classes, layers, manager.latest_step())
  interrupted, pending = False, None
  checked_step, checked_host = None, None  # the state changes only with the step: check each once

  def checked_host_state(step):
    """Host copy of the state at ``step``, checked by the divergence guard."""
    nonlocal checked_step, checked_host
    if checked_step != step:
      checked_host = to_host(state)
      guard.check_state(step, checked_host)
      checked_step = step
    return checked_host

  def check_pending():
    if pending is not None:
      guard.check_step(*pending)

  def data_state():
    return {"iterator": train_iter.get_state(), "extra": {**extra, "wall_seconds": extra["wall_seconds"]
                                                          + time.time() - t0}}

  def save(step, metrics=None):
    check_pending()
    # Host copies (any topology), checked first: nothing diverged is ever saved.
    checkpoints.save(manager, step, checked_host_state(step), data_state(), metrics)
    guard.last_saved = step

  def log_test(step):
    test = evaluate(eval_fn, state, dataset, cfg, mesh, kind)
    stats = layer_stats(to_host(state.params), layers)
    writer.write({"step": step, "epoch": step / spe, "split": "test", **test,
                  "layers": [s.as_dict() for s in stats]})
    best = extra["best_test_accuracy"]
    extra["best_test_accuracy"] = test["accuracy"] if best is None else max(best, test["accuracy"])
    return test, stats

  test = stats = None
  with _Preemption() as preempt:
    if cfg.eval_only:
      total = step
    while step < total:
      epoch = step // spe
      end = min((epoch + 1) * spe, total)
      bar = tqdm.tqdm(total=end - step, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                      disable=not (verbose and is_main and sys.stderr.isatty()))
      window, t_window, pending = [], time.time(), None
      while step < end:
        state, metrics = train_fn(state, parallel.put_batch(next(train_iter), mesh, kind))
        check_pending()  # lagged one step: keeps the device busy
        step += 1
        pending = (step, metrics)
        window.append(metrics)
        bar.update(1)
        if step % cfg.log_every == 0 or step == end:
          check_pending()
          host = checked_host_state(step)
          means = {k: float(np.mean([to_host(m[k]) for m in window])) for k in window[0]}
          ips = len(window) * cfg.batch_size / max(time.time() - t_window, 1e-9)
          writer.write({"step": step, "epoch": step / spe, "split": "train", **means,
                        "lr": float(lr_fn(step - 1)), "img_per_sec": ips,
                        **({"delta": threshold_values(host.params, layers)} if has_thr else {})})
          bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{ips:.0f}")
          window, t_window = [], time.time()
        if preempt.requested or manager.reached_preemption(step):
          save(step)
          interrupted = True
          break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % spe:
          save(step)
      bar.close()
      if interrupted:
        break
      check_pending()
      checked_host_state(step)  # before evaluating: a diverged state gets no test row
      test, stats = log_test(step)
      save(step, {checkpoints.BEST_METRIC: test["accuracy"]})
      if verbose and is_main:
        print(f"epoch {step / spe:.2f} (step {step}): test accuracy {100 * test['accuracy']:.2f}%")

  if not interrupted and test is None:  # eval-only, or resumed a finished run
    test, stats = log_test(step)
  extra["wall_seconds"] += time.time() - t0
  summary = {"test_accuracy": None if test is None else test["accuracy"],
             "best_test_accuracy": extra["best_test_accuracy"], "steps": step,
             "wall_seconds": extra["wall_seconds"], "interrupted": interrupted,
             "config": dataclasses.asdict(cfg)}
  if test is not None:
    summary["test_metrics"] = test
    summary["report"] = format_report(
      test, stats, model_size_bits(to_host({"params": state.params, "batch_stats": state.batch_stats}), layers))
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items() if k != "report"}, f, indent=2)
    if verbose:
      print("interrupted (SIGTERM): checkpoint saved at step", step) if interrupted else print(summary["report"])
  return summary


TORCHVISION_SUFFIXES = (".npz", ".pth", ".pt")


def is_torchvision_file(path: str) -> bool:
  """``--init-from`` names a torchvision state dict (a file), not a checkpoint of this trainer."""
  return os.path.splitext(path)[1].lower() in TORCHVISION_SUFFIXES


def check_init_from(path: str) -> None:
  """Raises CheckpointError (one line) unless ``path`` can be an ``--init-from`` source."""
  if is_torchvision_file(path):
    if not os.path.isfile(path):
      raise checkpoints.CheckpointError(f"no such torchvision state dict file: {path}")
  else:
    checkpoints.resolve(path)


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
