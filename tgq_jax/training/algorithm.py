"""TGA for Linen models: the train state, the labels, and the steps built on :class:`~tgq_jax.training.tga.TGA`
(:class:`ClassificationStep` for classifiers, :class:`LanguageModelStep` for next-token prediction).

Nothing here reads a :class:`~tgq_jax.training.configs.Config`, touches data,
devices, checkpoints or logs (that is :mod:`tgq_jax.training.harness`, the run
harness): a user's own loop can train their own (ternarized) Linen model with it::

  model = tgq_jax.ternarize_model(MyNet(), tgq_jax.QuantPolicy())
  layers = quantized_layers(model, x, train=False)            # tgq_jax.frontends.linen_layers
  state, tga = algorithm.init(model, x, optax.adam(1e-3), layers, train=False)
  step = jax.jit(algorithm.ClassificationStep(model, tga).train)
  state, metrics = step(state, {"image": x, "label": y})

The update itself (sequential or joint, the two optimizers, gradient averaging)
is :class:`~tgq_jax.training.tga.TGA`'s; :class:`ClassificationStep` supplies
its loss (cross-entropy of ``model.apply``), threads the BatchNorm statistics
through it and adds the metrics. Its ``bn_both_passes``:

* False (default): both passes start from the same running statistics and
  only the second pass's update is kept, so the running averages move once per
  step (as in joint mode), with the thresholds the weights are trained with.
* True: the reference's torch rule: each pass of a sequential step updates
  them (twice per step).

Data parallelism: with ``axis_name`` set, the steps run per device inside a
mapping (``jax.shard_map``/``jax.pmap``, :func:`tgq_jax.training.parallel.map_step`)
and average gradients, statistics and metrics over that axis; with None they
run on the whole batch as is (plain ``jax.jit``).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from tgq_jax.core.kernel import THRESHOLD_PASS
from tgq_jax.frontends.linen import with_mode
from tgq_jax.training.tga import (THRESHOLD, TGA, WEIGHT, TGAOptState, UpdateInfo, mean_over, split_optimizers,
                                  step_rngs, threshold_optimizer)

__all__ = ["THRESHOLD", "TGA", "WEIGHT", "ClassificationStep", "LanguageModelStep", "TGAOptState", "TrainSetup",
           "TrainState", "UpdateInfo", "classification_metrics", "cross_entropy", "init", "next_token_losses",
           "param_labels", "split_optimizers", "state_from_variables", "step_rngs", "threshold_names",
           "threshold_optimizer"]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and goes into a checkpoint).

  The two optimizer states are fields of their own (the checkpoint layout);
  :attr:`opt_state` is them as the :class:`~tgq_jax.training.tga.TGAOptState` the update takes.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  threshold_opt_state: Any
  weight_opt_state: Any
  rng: jax.Array  # raw uint32 key: orbax saves it as a plain array

  @property
  def opt_state(self) -> TGAOptState:
    return TGAOptState(threshold=self.threshold_opt_state, weight=self.weight_opt_state)


class TrainSetup(NamedTuple):
  """What :func:`init` makes: the state at step 0 and the update that trains it."""

  state: TrainState
  tga: TGA


# --- labels ------------------------------------------------------------------


def threshold_names(layers: Mapping) -> frozenset[str]:
  """Names of the quantizer leaves trained by the threshold optimizer (TGA: {"delta"}).

  ``layers`` is :func:`tgq_jax.frontends.linen_layers.quantized_layers` of the model.
  """
  return frozenset(name for q in layers.values() for name in q.threshold_params)


def param_labels(params: Any, layers: Mapping) -> Any:
  """THRESHOLD for the threshold leaves of quantized layers, WEIGHT for everything else."""
  names = threshold_names(layers)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels = {k: THRESHOLD if (k[-1] in names and tuple(k[:-1]) in layers) else WEIGHT for k in flat}
  return flax.traverse_util.unflatten_dict(labels)


# --- state -------------------------------------------------------------------


def state_from_variables(variables: Mapping, tga: TGA, rng: jax.Array) -> TrainState:
  """Step 0 of training from given variables: fresh optimizer states (e.g. fine-tuning)."""
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  opt_state = tga.init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    threshold_opt_state=opt_state.threshold, weight_opt_state=opt_state.weight, rng=rng)


def init(model: nn.Module, example_input: jax.Array, weight_tx: optax.GradientTransformation, layers: Mapping,
         *, threshold_tx: optax.GradientTransformation | None = None, sequential: bool = True,
         rng: jax.Array | None = None, **init_kwargs) -> TrainSetup:
  """``TrainSetup(state, tga)`` for training ``model`` from a fresh initialization.

  ``layers`` is :func:`tgq_jax.frontends.linen_layers.quantized_layers` of the model
  (it says which leaves are thresholds); ``threshold_tx`` defaults to
  :func:`~tgq_jax.training.tga.threshold_optimizer` at learning rate 1e-3.
  ``init_kwargs`` go to ``model.init`` (e.g. ``train=False``).
  """
  rng = jax.random.key(0) if rng is None else rng
  init_rng, rng = jax.random.split(rng)
  variables = jax.jit(functools.partial(model.init, **init_kwargs))(init_rng, example_input)
  tga = TGA(threshold_tx=threshold_tx or threshold_optimizer(1e-3), weight_tx=weight_tx,
            labels=param_labels(variables["params"], layers), sequential=sequential)
  return TrainSetup(state=state_from_variables(variables, tga, jax.random.key_data(rng)), tga=tga)


# --- steps -------------------------------------------------------------------


def classification_metrics(logits: jax.Array, labels: jax.Array, num_classes: int) -> dict[str, jax.Array]:
  """Per-example cross-entropy, accuracy and (above 10 classes) top-5 accuracy."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  out = {"loss": losses, "accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)}
  if num_classes > 10:
    top5 = lax.top_k(logits, 5)[1]
    out["top5_accuracy"] = jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32)
  return out


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy with integer labels, optionally smoothed (``optax.smooth_labels``)."""
  if not label_smoothing:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def _apply_for_pass(model: nn.Module, threshold_pass: bool) -> Callable:
  """``model.apply`` for one pass of the update: in the threshold pass the model in the THRESHOLD_PASS mode,
  whose TGA layers scale their outputs instead of their kernels (no kernel gradient is computed; the same
  threshold gradients). The mode is a field of the module, so each pass is its own trace."""
  return (with_mode(model, THRESHOLD_PASS) if threshold_pass else model).apply


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationStep:
  """The train and eval steps of a Linen classifier on ``{"image", "label"(, "mask")}`` batches.

  Attributes:
    model: a Linen module called as ``model.apply(variables, images, **train_kwargs)``.
    tga: the update (optimizers, labels, sequential or joint).
    num_classes: for the top-5 metric (default: the logits' width).
    label_smoothing: the loss's label smoothing (0: plain cross-entropy).
    bn_both_passes: see the module docstring.
    axis_name: the mapped data axis to average over, or None (not mapped).
    rng_streams: the rng streams the model draws from (dropout, stochastic
      depth, ...): each gets its own key per step, split from ``state.rng``
      and, when mapped, folded with the device index so every shard draws
      its own. Both passes of a sequential step use the same keys, so they
      differ only by the threshold update.
    train_kwargs: the model's training-mode call arguments (``{}`` for a model without ``train``).
    eval_kwargs: its evaluation-mode call arguments.
  """

  model: nn.Module
  tga: TGA
  num_classes: int | None = None
  label_smoothing: float = 0.0
  bn_both_passes: bool = False
  axis_name: str | None = None
  rng_streams: Sequence[str] = ("dropout",)
  train_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"train": True})
  eval_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"train": False})

  def train(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
    """One training step on ``batch`` (this device's shard when mapped): the new state and the
    metrics (loss, accuracy(, top5_accuracy), grad_norm(, threshold_pass_loss)), averaged."""
    mean = mean_over(self.axis_name)
    next_rng, rngs = step_rngs(state.rng, self.rng_streams)
    if self.axis_name:
      rngs = {k: jax.random.fold_in(v, lax.axis_index(self.axis_name)) for k, v in rngs.items()}

    def loss_fn(params, batch_stats, threshold_pass):
      apply = _apply_for_pass(self.model, threshold_pass)
      logits, new_vars = apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                               mutable=["batch_stats"], rngs=rngs, **self.train_kwargs)
      loss = cross_entropy(logits, batch["label"], self.label_smoothing)
      return loss, (logits, new_vars.get("batch_stats", {}))

    params, batch_stats, opt_state, info = self.tga.update_with_state(
      loss_fn, state.params, state.batch_stats, state.opt_state, axis_name=self.axis_name,
      state_through_both_passes=self.bn_both_passes)
    logits = info.aux
    num_classes = logits.shape[-1] if self.num_classes is None else self.num_classes
    metrics = jax.tree.map(jnp.mean, classification_metrics(logits, batch["label"], num_classes))
    if info.threshold_pass_loss is not None:
      metrics["threshold_pass_loss"] = info.threshold_pass_loss
    metrics["grad_norm"] = info.grad_norm
    # With cross-device BatchNorm the running statistics are equal on every device already;
    # per-device statistics are averaged here.
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=mean(batch_stats),
                              threshold_opt_state=opt_state.threshold, weight_opt_state=opt_state.weight,
                              rng=next_rng)
    return new_state, mean(metrics)

  def evaluate(self, state: TrainState, batch: Mapping[str, jax.Array]) -> dict:
    """Sums of the per-example metrics over the batch (``batch["mask"]`` marks real examples,
    default all), with ``count``; summed over ``axis_name`` when mapped."""
    logits = self.model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                              **self.eval_kwargs)
    num_classes = logits.shape[-1] if self.num_classes is None else self.num_classes
    per_example = classification_metrics(logits, batch["label"], num_classes)
    mask = batch.get("mask", jnp.ones(logits.shape[:1], jnp.float32))
    sums = {k: jnp.sum(v * mask) for k, v in per_example.items()}
    sums["count"] = jnp.sum(mask)
    return lax.psum(sums, self.axis_name) if self.axis_name else sums


def next_token_losses(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Per-position cross-entropy (nats) of ``logits`` ``(B, n, V)`` for the next tokens ``tokens[:, 1:]``
  (``tokens`` ``(B, n + 1)``: the model saw ``tokens[:, :-1]``)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModelStep:
  """The train and eval steps of a Linen language model on ``{"tokens" (B, n + 1)(, "mask" (B,))}`` batches:
  next-token cross-entropy of ``model.apply(variables, tokens[:, :-1])`` against ``tokens[:, 1:]``.

  The update is :class:`~tgq_jax.training.tga.TGA`'s, as :class:`ClassificationStep`'s (sequential or joint;
  the threshold pass in the THRESHOLD_PASS mode; without thresholds, e.g. ``quantizer="fp"`` or absmean,
  one forward and backward pass per step). The model has no batch statistics or dropout.

  Attributes:
    model: a Linen module mapping token ids ``(B, n)`` to logits ``(B, n, V)``.
    tga: the update (optimizers, labels, sequential or joint).
    axis_name: the mapped data axis to average over, or None (not mapped).
  """

  model: nn.Module
  tga: TGA
  axis_name: str | None = None

  def train(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
    """One training step: the new state and the metrics (loss in nats per token, grad_norm(,
    threshold_pass_loss)), averaged over the mapped axis."""
    tokens = batch["tokens"]

    def loss_fn(params, threshold_pass):
      logits = _apply_for_pass(self.model, threshold_pass)({"params": params}, tokens[:, :-1])
      return jnp.mean(next_token_losses(logits, tokens)), None

    params, opt_state, info = self.tga.update(loss_fn, state.params, state.opt_state, axis_name=self.axis_name)
    metrics = {"loss": info.loss, "grad_norm": info.grad_norm}
    if info.threshold_pass_loss is not None:
      metrics["threshold_pass_loss"] = info.threshold_pass_loss
    new_state = state.replace(step=state.step + 1, params=params, threshold_opt_state=opt_state.threshold,
                              weight_opt_state=opt_state.weight)
    return new_state, mean_over(self.axis_name)(metrics)

  def evaluate(self, state: TrainState, batch: Mapping[str, jax.Array]) -> dict:
    """Sums over the batch's real rows (``batch["mask"]``, default all): ``loss`` (nats, summed over every
    predicted token) and ``count`` (the tokens predicted); summed over ``axis_name`` when mapped."""
    tokens = batch["tokens"]
    logits = self.model.apply({"params": state.params}, tokens[:, :-1])
    mask = batch.get("mask", jnp.ones(tokens.shape[:1], jnp.float32))
    losses = next_token_losses(logits, tokens)
    sums = {"loss": jnp.sum(losses * mask[:, None]), "count": jnp.sum(mask) * losses.shape[1]}
    return lax.psum(sums, self.axis_name) if self.axis_name else sums
