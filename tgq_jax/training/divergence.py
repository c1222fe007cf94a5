"""The divergence rule: when a run stops rather than train on, log or save a state that is not usable."""
from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from tgq_jax.core.trees import kernel_key, layer_stats
from tgq_jax.training import checkpoints
from tgq_jax.training.algorithm import TrainState
from tgq_jax.training.parallel import to_host


class DivergenceError(RuntimeError):
  """Training diverged (the rule: :class:`DivergenceGuard`); nothing of the diverged state was saved."""


NonFiniteLossError = DivergenceError  # its former name


@functools.lru_cache(maxsize=None)
def _finite_parts_fn(quantizer):
  """One jitted "are the scales, negative scales and thresholds of this kernel all finite" per quantizer."""

  def finite(kernel, qparams):
    parts = quantizer.parts(kernel, qparams)
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in (parts.scale, parts.neg_scale, parts.threshold)]))

  return jax.jit(finite)


def nonfinite_scales(params: Mapping, layers: Mapping) -> list[str]:
  """Names of the ternary layers whose scales or thresholds (``Quantizer.parts``) are not all finite.

  A checkpoint needs them finite: export packs them and a resumed run multiplies
  by them. Finite weights do not make finite scales (a mean of huge weights overflows).
  """
  bad = []
  for path, quantizer in layers.items():
    if not quantizer.ternary:
      continue
    layer = params
    for key in path:
      layer = layer[key]
    qparams = {name: layer[name] for name in quantizer.param_names}
    if not bool(_finite_parts_fn(quantizer)(layer[kernel_key(layer)], qparams)):
      bad.append("/".join(path))
  return bad


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
  * the state is not usable: any leaf (parameters, thresholds, BatchNorm
    statistics, optimizer states) is NaN or Inf, a ternary layer's scales or
    threshold as its quantizer computes them (``Quantizer.parts``: what export
    packs and a resume uses) are not finite, or a ternary layer has sparsity
    1.0 (every weight zero). Checked at every train log row and before every
    save, so nothing diverged or unusable is ever saved.
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
    """Every leaf finite (thresholds named as such), every ternary layer's scales finite and not every
    weight of one zero."""
    bad = checkpoints.nonfinite_leaves(checkpoints.flat_arrays(flax.serialization.to_state_dict(host_state)))
    for leaf in bad:  # a threshold first: the likelier cause, and the clearer message
      if leaf in self._thresholds:
        self.fail(step, f"layer {self._thresholds[leaf]} has a non-finite threshold ({leaf})")
    if bad:
      self.fail(step, str(checkpoints.NonFiniteStateError(bad)))
    if scales := nonfinite_scales(host_state.params, self.layers):
      more = f" (and {len(scales) - 1} more)" if len(scales) > 1 else ""
      self.fail(step, f"layer {scales[0]}{more} has non-finite scales (its weights overflow float32), a "
                      "checkpoint of it could be neither resumed nor exported")
    for s in layer_stats(host_state.params, self.layers):
      if s.scale is not None and s.sparsity >= 1.0:  # (scale None: a full-precision layer)
        self.fail(step, f"layer {s.name} has sparsity 1.0 (every weight is zero)")
