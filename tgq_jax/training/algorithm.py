"""The TGA training algorithm, usable in any training loop: state, labels, optimizers, steps.

Nothing here reads a :class:`~tgq_jax.training.configs.Config`, touches data,
devices, checkpoints or logs (that is :mod:`tgq_jax.training.harness`, the run
harness): every function takes what it needs as arguments, so a user's own
loop can train their own (ternarized) Linen model with it::

  model = tgq_jax.ternarize_model(MyNet(), tgq_jax.QuantPolicy())
  layers = quantized_layers(model, x, train=False)            # tgq_jax.frontends.linen_layers
  state, tx_thr, tx_w, labels = algorithm.init(model, x, optax.adam(1e-3), layers, train=False)
  step = jax.jit(functools.partial(algorithm.train_step, model=model, tx_thr=tx_thr, tx_w=tx_w,
                                   labels=labels))
  state, metrics = step(state, {"image": x, "label": y})

Update rules (He & Fan 2019, Fig. 1):

* ``sequential`` (default): forward/backward, step the threshold optimizer;
  forward/backward again with the new thresholds, step the weight optimizer.
* ``joint``: one forward/backward; both optimizers step on the same gradients.

BatchNorm running statistics (``bn_both_passes``):

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

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from tgq_jax.core.kernel import THRESHOLD_PASS
from tgq_jax.frontends.linen import with_mode

THRESHOLD, WEIGHT = "threshold", "weight"


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and goes into a checkpoint)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  threshold_opt_state: Any
  weight_opt_state: Any
  rng: jax.Array  # raw uint32 key: orbax saves it as a plain array


# --- labels and optimizers ----------------------------------------------------


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


def threshold_optimizer(learning_rate: float | optax.Schedule, *, momentum: float = 0.9, nesterov: bool = True,
                        weight_decay: float = 0.0, grad_clip: float = 0.001) -> optax.GradientTransformation:
  """The authors' threshold optimizer: gradient clipped to ``+-grad_clip``, then (coupled
  L2 ``weight_decay``, as torch's) SGD with momentum and Nesterov (main_dc.py)."""
  decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  clip = [optax.clip(grad_clip)] if grad_clip else []
  return optax.chain(*clip, *decay, optax.sgd(learning_rate, momentum=momentum or None,
                                               nesterov=nesterov and bool(momentum)))


def split_optimizers(labels: Any, weight_tx: optax.GradientTransformation,
                     threshold_tx: optax.GradientTransformation
                     ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(threshold optimizer, weight optimizer), each over the whole params tree.

  ``multi_transform`` zeroes the group each must not touch (``set_to_zero``;
  not ``optax.masked``, which would pass the other group's raw gradients
  through as updates).
  """
  tx_thr = optax.multi_transform({THRESHOLD: threshold_tx, WEIGHT: optax.set_to_zero()}, labels)
  tx_w = optax.multi_transform({THRESHOLD: optax.set_to_zero(), WEIGHT: weight_tx}, labels)
  return tx_thr, tx_w


def state_from_variables(variables: Mapping, tx_thr, tx_w, rng: jax.Array) -> TrainState:
  """Step 0 of training from given variables: fresh optimizer states (e.g. fine-tuning)."""
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    threshold_opt_state=tx_thr.init(params), weight_opt_state=tx_w.init(params), rng=rng)


def init(model: nn.Module, example_input: jax.Array, weight_tx: optax.GradientTransformation, layers: Mapping,
         *, threshold_tx: optax.GradientTransformation | None = None, rng: jax.Array | None = None,
         **init_kwargs) -> tuple[TrainState, Any, Any, Any]:
  """``(state, tx_thr, tx_w, labels)`` for training ``model`` from a fresh initialization.

  ``layers`` is :func:`tgq_jax.frontends.linen_layers.quantized_layers` of the model;
  ``threshold_tx`` defaults to :func:`threshold_optimizer` at learning rate
  1e-3. ``init_kwargs`` go to ``model.init`` (e.g. ``train=False``).
  """
  rng = jax.random.key(0) if rng is None else rng
  init_rng, rng = jax.random.split(rng)
  variables = jax.jit(functools.partial(model.init, **init_kwargs))(init_rng, example_input)
  labels = param_labels(variables["params"], layers)
  tx_thr, tx_w = split_optimizers(labels, weight_tx, threshold_tx or threshold_optimizer(1e-3))
  return state_from_variables(variables, tx_thr, tx_w, jax.random.key_data(rng)), tx_thr, tx_w, labels


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


def _select(tree: Any, labels: Any, group: str, fn: Callable) -> Any:
  """fn(leaf) on ``group``'s leaves, zeros elsewhere (XLA then drops the unused gradients)."""
  return jax.tree.map(lambda g, lab: fn(g) if lab == group else jnp.zeros_like(g), tree, labels)


def step_rngs(rng: jax.Array, streams: Sequence[str] = ("dropout",)) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(the state's next key, this step's key per rng stream) from ``TrainState.rng``.

  With the default single stream, ``{"dropout": k}`` where ``next, k = split(rng)``.
  """
  keys = jax.random.split(rng, 1 + len(streams))
  return keys[0], dict(zip(streams, keys[1:]))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module, tx_thr, tx_w, labels: Any,
               sequential: bool = True, has_thresholds: bool = True, num_classes: int | None = None,
               bn_both_passes: bool = False, label_smoothing: float = 0.0, axis_name: str | None = None,
               rng_streams: Sequence[str] = ("dropout",), apply_kwargs: Mapping[str, Any] | None = None
               ) -> tuple[TrainState, dict]:
  """One training step of ``model`` on ``batch = {"image", "label"}``.

  Args:
    state: the :class:`TrainState`.
    batch: images (NHWC) and integer labels (this device's shard when mapped).
    model: a Linen module called as ``model.apply(variables, images, **apply_kwargs)``.
    tx_thr, tx_w, labels: from :func:`split_optimizers` / :func:`param_labels`.
    sequential: the paper's two-pass update (else joint).
    has_thresholds: whether the model has thresholds (without any, the sequential update is the joint one).
    num_classes: for the top-5 metric (default: the logits' width).
    bn_both_passes: see the module docstring.
    label_smoothing: the loss's label smoothing (0: plain cross-entropy).
    axis_name: the mapped data axis to average over, or None (not mapped).
    rng_streams: the rng streams the model draws from (dropout, stochastic
      depth, ...): each gets its own key per step, split from ``state.rng``
      and, when mapped, folded with the device index so every shard draws
      its own. Both passes of a sequential step use the same keys, so they
      differ only by the threshold update.
    apply_kwargs: the model's training-mode call arguments (default ``{"train": True}``;
      ``{}`` for a model without such an argument).
  """
  apply_kwargs = {"train": True} if apply_kwargs is None else dict(apply_kwargs)
  # Over one device the mean is the value itself; XLA would still copy every gradient through an all-reduce.
  mapped = axis_name is not None and lax.axis_size(axis_name) > 1
  pmean = functools.partial(lax.pmean, axis_name=axis_name) if mapped else (lambda x: x)
  next_rng, rngs = step_rngs(state.rng, rng_streams)
  if axis_name:
    rngs = {k: jax.random.fold_in(v, lax.axis_index(axis_name)) for k, v in rngs.items()}

  def loss_fn(params, batch_stats, model=model):
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                   mutable=["batch_stats"], rngs=rngs, **apply_kwargs)
    loss = cross_entropy(logits, batch["label"], label_smoothing)
    return loss, (logits, new_vars.get("batch_stats", {}))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  params, thr_state = state.params, state.threshold_opt_state
  extra = {}
  if sequential and has_thresholds:
    # Pass 1: only the threshold gradients are used (averaged). THRESHOLD_PASS: the layers
    # scale their outputs instead of their kernels, so no kernel gradient is computed here.
    threshold_grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=with_mode(model, THRESHOLD_PASS)),
                                           has_aux=True)
    (extra["threshold_pass_loss"], (_, stats)), grads = threshold_grad_fn(params, state.batch_stats)
    grads = _select(grads, labels, THRESHOLD, pmean)
    updates, thr_state = tx_thr.update(grads, thr_state, params)
    params = optax.apply_updates(params, updates)
    # Pass 2: with the new thresholds, for the weights.
    start = stats if bn_both_passes else state.batch_stats
    (_, (logits, batch_stats)), grads = grad_fn(params, start)
    grads = _select(grads, labels, WEIGHT, pmean)
    grad_norm = optax.tree.norm(grads)
    updates, w_state = tx_w.update(grads, state.weight_opt_state, params)
    params = optax.apply_updates(params, updates)
  else:
    (_, (logits, batch_stats)), grads = grad_fn(params, state.batch_stats)
    grads = pmean(grads)
    grad_norm = optax.tree.norm(grads)
    thr_updates, thr_state = tx_thr.update(grads, thr_state, params)
    w_updates, w_state = tx_w.update(grads, state.weight_opt_state, params)
    params = optax.apply_updates(optax.apply_updates(params, thr_updates), w_updates)
  num_classes = logits.shape[-1] if num_classes is None else num_classes
  metrics = {**jax.tree.map(jnp.mean, classification_metrics(logits, batch["label"], num_classes)), **extra}
  # A NaN guard watches the gradient too: ReLU/max-pool can hide a NaN from the loss.
  metrics["grad_norm"] = grad_norm
  # With cross-device BatchNorm the running statistics are equal on every device already;
  # per-device statistics are averaged here.
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=pmean(batch_stats),
                            threshold_opt_state=thr_state, weight_opt_state=w_state, rng=next_rng)
  return new_state, pmean(metrics)


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module, num_classes: int | None = None,
              axis_name: str | None = None, apply_kwargs: Mapping[str, Any] | None = None) -> dict:
  """Sums of the per-example metrics over the batch (``batch["mask"]`` marks real examples,
  default all), with ``count``; summed over ``axis_name`` when mapped. ``apply_kwargs``:
  the model's evaluation-mode call arguments (default ``{"train": False}``)."""
  apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], **apply_kwargs)
  num_classes = logits.shape[-1] if num_classes is None else num_classes
  per_example = classification_metrics(logits, batch["label"], num_classes)
  mask = batch.get("mask", jnp.ones(logits.shape[:1], jnp.float32))
  sums = {k: jnp.sum(v * mask) for k, v in per_example.items()}
  sums["count"] = jnp.sum(mask)
  return lax.psum(sums, axis_name) if axis_name else sums
