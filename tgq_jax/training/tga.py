"""TGA's update (He & Fan 2019, Fig. 1) over a loss of parameters: any framework, any training loop.

:class:`TGA` names the update's configuration: the threshold optimizer, the
weight optimizer, which leaf of the parameters is which (``labels``), and the
rule (sequential or joint). Its :meth:`TGA.update` takes a loss of the
parameters::

  loss_fn(params, threshold_pass: bool) -> (loss, aux)

* ``sequential`` (default, the paper's): the gradient of
  ``loss_fn(params, True)`` for the thresholds, a threshold step; then the
  gradient of ``loss_fn(params, False)`` at the new thresholds for the weights,
  a weight step.
* joint: one gradient of ``loss_fn(params, False)``, both steps.

``threshold_pass=True`` tells the model that only the threshold gradients of
this pass are used: a front end may compute them more cheaply there (the Linen
layers scale their outputs instead of their kernels, so no kernel gradient is
computed). A loss that ignores the flag gives the same update.

A model with state that a pass changes (BatchNorm running statistics, RNG
counters) uses :meth:`TGA.update_with_state`, whose loss threads it::

  loss_fn(params, model_state, threshold_pass) -> (loss, (aux, new_model_state))

Both passes start from the given state and the second pass's new state is kept
(the statistics move once per step, with the thresholds the weights are
trained with), or, with ``state_through_both_passes``, the second pass starts
from the first pass's (the authors' torch code: BatchNorm updates its running
statistics in both passes).

Data parallelism: with ``axis_name``, the update runs per device inside a
mapping (``jax.shard_map``/``jax.pmap``) and averages the gradients over that
axis (only the group each step uses).

The two optimizers each see the whole parameter tree through
``optax.multi_transform`` with ``optax.set_to_zero()`` for the other group
(:func:`split_optimizers`); not ``optax.masked``, which would pass the other
group's raw gradients through as updates.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

THRESHOLD, WEIGHT = "threshold", "weight"


class TGAOptState(NamedTuple):
  """The states of TGA's two optimizers (each over the whole parameter tree)."""

  threshold: optax.OptState
  weight: optax.OptState


class UpdateInfo(NamedTuple):
  """What one :meth:`TGA.update` computed besides the new parameters.

  Attributes:
    loss: the loss whose gradient the weight step took (sequential: the second
      pass, at the new thresholds, before the weight step; joint: the one pass).
    aux: that pass's ``aux``.
    threshold_pass_loss: the first pass's loss (sequential with thresholds), else None.
    grad_norm: global norm of the (averaged) gradient the weight step took
      (joint: of the whole gradient); a NaN guard watches it, since ReLU and
      max-pooling can hide a NaN from the loss.
  """

  loss: jax.Array
  aux: Any
  threshold_pass_loss: jax.Array | None
  grad_norm: jax.Array


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


def mean_over(axis_name: str | None) -> Callable[[Any], Any]:
  """``lax.pmean`` over the mapped ``axis_name``; the identity unmapped or over one device
  (where XLA would still copy every leaf through an all-reduce)."""
  if axis_name is None or lax.axis_size(axis_name) == 1:
    return lambda tree: tree
  return lambda tree: lax.pmean(tree, axis_name)


def step_rngs(rng: jax.Array, streams: Sequence[str] = ("dropout",)) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(the next step's key, this step's key per rng stream) from one key.

  With the default single stream, ``{"dropout": k}`` where ``next, k = split(rng)``.
  Both passes of a sequential step should use the same keys, so that they
  differ only by the threshold update.
  """
  keys = jax.random.split(rng, 1 + len(streams))
  return keys[0], dict(zip(streams, keys[1:]))


def labels_like(labels: Any, params: Any) -> Any:
  """``labels`` as a tree of the structure of ``params`` (dicts and frozen dicts alike).

  Raises a one-line ValueError unless ``labels`` gives every leaf of ``params``, and nothing else,
  :data:`THRESHOLD` or :data:`WEIGHT` (each leaf then belongs to exactly one optimizer).
  """
  got = {jax.tree_util.keystr(path): label for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}
  want = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for path, label in got.items():
    if label not in (THRESHOLD, WEIGHT):
      raise ValueError(f"TGA labels: {path} is labelled {label!r}; valid: {THRESHOLD!r}, {WEIGHT!r}.")
  missing, extra = [p for p in want if p not in got], sorted(set(got) - set(want))
  if missing or extra:
    what = f"parameter {missing[0]} has no label" if missing else f"label {extra[0]} names no parameter"
    raise ValueError(f"TGA labels do not match the parameters: {what} ({len(missing)} unlabelled, "
                     f"{len(extra)} unknown); make them from the same parameters.")
  return jax.tree.unflatten(jax.tree.structure(params), [got[path] for path in want])


def _select(tree: Any, labels: Any, group: str, fn: Callable) -> Any:
  """fn(leaf) on ``group``'s leaves, zeros elsewhere (XLA then drops the unused gradients)."""
  return jax.tree.map(lambda g, lab: fn(g) if lab == group else jnp.zeros_like(g), tree, labels)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so usable as a static jit argument
class TGA:
  """TGA's update: two optimizers, the parameters' labels, the rule.

  Attributes:
    threshold_tx: steps the leaves labelled :data:`THRESHOLD` (the authors':
      :func:`threshold_optimizer`, which clips the gradient to +-0.001 first).
    weight_tx: steps the leaves labelled :data:`WEIGHT` (everything else).
    labels: :data:`THRESHOLD` or :data:`WEIGHT` per leaf of the parameters, a tree of the
      parameters' structure, or a function of the parameters returning one (as
      ``optax.multi_transform`` takes). Without any threshold the sequential
      update is the joint one.
    sequential: the paper's two-pass update (else joint).
  """

  threshold_tx: optax.GradientTransformation
  weight_tx: optax.GradientTransformation
  labels: Any
  sequential: bool = True

  def labels_of(self, params: Any) -> Any:
    """The labels of ``params``, checked and in their tree structure (:func:`labels_like`)."""
    return labels_like(self.labels(params) if callable(self.labels) else self.labels, params)

  def optimizers(self, params: Any) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """(threshold optimizer, weight optimizer) over the whole tree of ``params`` (:func:`split_optimizers`)."""
    return split_optimizers(self.labels_of(params), self.weight_tx, self.threshold_tx)

  def init(self, params: Any) -> TGAOptState:
    """Both optimizers' initial states for ``params``."""
    tx_thr, tx_w = self.optimizers(params)
    return TGAOptState(threshold=tx_thr.init(params), weight=tx_w.init(params))

  def update(self, loss_fn: Callable[[Any, bool], tuple[jax.Array, Any]], params: Any, opt_state: TGAOptState,
             *, axis_name: str | None = None) -> tuple[Any, TGAOptState, UpdateInfo]:
    """One update of ``params`` for ``loss_fn(params, threshold_pass) -> (loss, aux)``.

    Returns ``(new params, new opt_state, UpdateInfo)``. ``axis_name``: the mapped
    data axis to average the gradients over, or None (not mapped).
    """
    def threaded(p, state, threshold_pass):
      loss, aux = loss_fn(p, threshold_pass)
      return loss, (aux, state)

    params, _, opt_state, info = self.update_with_state(threaded, params, None, opt_state, axis_name=axis_name)
    return params, opt_state, info

  def update_with_state(self, loss_fn: Callable[[Any, Any, bool], tuple[jax.Array, tuple[Any, Any]]], params: Any,
                        model_state: Any, opt_state: TGAOptState, *, axis_name: str | None = None,
                        state_through_both_passes: bool = False) -> tuple[Any, Any, TGAOptState, UpdateInfo]:
    """One update for ``loss_fn(params, model_state, threshold_pass) -> (loss, (aux, new_model_state))``.

    Returns ``(new params, new model_state, new opt_state, UpdateInfo)``: the model
    state of the pass the weight gradient came from. ``state_through_both_passes``:
    the second pass of a sequential update starts from the first pass's model state
    (else from ``model_state``); see the module docstring. The new model state is
    not averaged over ``axis_name`` (the caller knows whether it differs per device).
    """
    labels = self.labels_of(params)
    tx_thr, tx_w = split_optimizers(labels, self.weight_tx, self.threshold_tx)
    mean = mean_over(axis_name)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if self.sequential and THRESHOLD in jax.tree.leaves(labels):
      # Pass 1: only the threshold gradients are used (averaged).
      (threshold_pass_loss, (_, pass1_state)), grads = grad_fn(params, model_state, True)
      grads = _select(grads, labels, THRESHOLD, mean)
      updates, thr_state = tx_thr.update(grads, opt_state.threshold, params)
      params = optax.apply_updates(params, updates)
      # Pass 2: with the new thresholds, for the weights.
      start = pass1_state if state_through_both_passes else model_state
      (loss, (aux, model_state)), grads = grad_fn(params, start, False)
      grads = _select(grads, labels, WEIGHT, mean)
      updates, w_state = tx_w.update(grads, opt_state.weight, params)
      params = optax.apply_updates(params, updates)
    else:
      threshold_pass_loss = None
      (loss, (aux, model_state)), grads = grad_fn(params, model_state, False)
      grads = mean(grads)
      thr_updates, thr_state = tx_thr.update(grads, opt_state.threshold, params)
      w_updates, w_state = tx_w.update(grads, opt_state.weight, params)
      params = optax.apply_updates(optax.apply_updates(params, thr_updates), w_updates)
    info = UpdateInfo(loss=loss, aux=aux, threshold_pass_loss=threshold_pass_loss,
                      grad_norm=optax.tree.norm(grads))
    return params, model_state, TGAOptState(threshold=thr_state, weight=w_state), info
