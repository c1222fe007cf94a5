r"""TGA: the ternary quantizer of He & Fan (CVPR 2019) as a pure JAX function.

``ternarize(w, {"delta": delta})`` returns ``alpha * q``: ternary codes ``q`` in
{-1, 0, +1} times one trainable-threshold-dependent scale ``alpha`` per tensor
(or per output channel). It reproduces the authors' PyTorch layer
(elliothe/tern_repo, ``tern_threshold_trainable_5.py``) forward and backward.

Forward
-------
With ``N`` weights, mean ``mu`` and *sample* standard deviation ``sigma``
(``N - 1`` denominator, ``torch.std``'s default)::

    t     = min(|delta|, 3 sigma)                 # threshold, hardtanh-clipped
    a     = t / sigma
    lam   = phi(a) / (1 - Phi(a))                 # inverse Mills ratio of N(0, 1)
    alpha = mu + sigma * lam                      # mean of N(mu, sigma^2) truncated to (mu + t, inf)
    q     = +1 if w > mu + t, -1 if w < mu - t, else 0

``alpha`` is a closed-form, differentiable function of ``delta``: that is what
lets back-propagation train the threshold together with the weights.

Backward (what the custom VJP returns)
--------------------------------------
Let ``g = dL/dw_t`` and ``S = sum(g * q)``; since ``w_t = alpha * q`` with ``q``
piecewise constant, ``S = dL/dalpha``. Differentiating the Mills ratio,
``lam'(a) = lam (lam - a)``.

*Threshold.* ``dalpha/ddelta = sigma * lam'(a) * da/ddelta`` and
``da/ddelta = sign(delta) / sigma`` inside the clip (hardtanh passes no
gradient at or beyond ``|delta| = 3 sigma``)::

    dL/ddelta = S * lam'(a) * sign(delta) * [|delta| < 3 sigma]

*Weights.* The reference scales the straight-through gradient by ``1/alpha``
("gradient correctness"), which cancels the ``alpha`` of ``alpha * q``: the
weights receive ``g`` itself. Autograd also flows from ``alpha`` into ``mu``
and ``sigma`` (the clip bound ``3 sigma`` and the comparison thresholds are
constants there: the reference takes them with ``.item()``). With
``dmu/dw_i = 1/N``, ``dsigma/dw_i = (w_i - mu) / ((N - 1) sigma)`` and
``dalpha/dsigma = lam + sigma lam' * (-t / sigma^2) = lam - a lam'``::

    dL/dw_i = g_i + S * (1/N + (lam - a lam') (w_i - mu) / ((N - 1) sigma))

Numerics and edge cases
-----------------------
* The Mills ratio is computed as ``sqrt(2/pi) / erfcx(a / sqrt 2)``: no
  ``1 - Phi(a)`` cancellation, finite for every ``a >= 0`` (``a <= 3`` anyway
  because of the clip).
* Statistics are computed in float32 at least (float64 under x64 stays
  float64); the result is cast back to ``w.dtype`` (bfloat16 in, bfloat16 out).
* ``sigma = 0`` (a constant tensor) and ``N = 1`` (where the sample std is
  undefined and torch returns NaN) are treated as ``sigma = 0``: the threshold
  is 0, no weight lies strictly beyond ``mu``, so every code is 0, ``w_t = 0``,
  ``alpha = mu``, and both gradients reduce to ``dL/dw = g`` and
  ``dL/ddelta = 0``.
* A huge ``delta`` is clipped to ``3 sigma`` (``alpha`` stays finite) and gets
  zero gradient, as in the paper: the threshold then stays where it is.
* A negative ``delta`` acts through ``|delta|``; its gradient carries
  ``sign(delta)``. ``delta = 0`` gets zero gradient (``sign(0) = 0``, as torch).
* Non-finite input propagates: a NaN or infinite weight, or a non-finite
  ``delta``, makes its tensor's (per channel: its channel's) scale, every
  output element and both gradients (``dL/dw`` of that slice and ``dL/ddelta``)
  NaN, so a trainer's finiteness check sees it. (Left alone, the comparisons
  would turn it into zero codes and a finite zero threshold gradient.) The
  codes of :func:`ternary_parts` stay in {-1, 0, 1}; its scale is NaN.

Per-channel statistics (``per_channel=True``) apply all of the above to each
slice along the last axis (Flax's output-channel axis: ``HWIO`` convolution
kernels, ``(in, out)`` dense kernels); ``delta`` then has shape ``(out,)``.
The default is per tensor, as in the paper.
"""
from __future__ import annotations

import functools
import math
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "TernaryParts",
  "clip_bound",
  "init_params",
  "mills_ratio",
  "moments",
  "reduction_axes",
  "scale_from_stats",
  "ternarize",
  "ternary_parts",
  "threshold_split",
  "dequantize",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
#: ``t`` is clipped to ``CLIP_SIGMAS * sigma`` (hardtanh bounds of the reference).
CLIP_SIGMAS = 3.0
#: ``delta`` is initialized to ``INIT_FRACTION * max|w|``.
INIT_FRACTION = 0.05


class TernaryParts(NamedTuple):
  """A ternarized tensor taken apart, for inspection and export.

  ``w_t = dequantize(parts)``: ``scale`` where ``codes == 1``, ``-neg_scale``
  where ``codes == -1`` and 0 elsewhere. Symmetric quantizers (TGA, TWN) have
  ``neg_scale == scale``. Scales, threshold, mean and std are scalars for
  per-tensor statistics and ``(out,)`` vectors for per-channel ones.
  """

  codes: jax.Array  # int8 in {-1, 0, 1}, shape of w
  scale: jax.Array  # value of a +1 code
  neg_scale: jax.Array  # magnitude of a -1 code
  threshold: jax.Array  # t (codes are nonzero beyond mean +- t)
  mean: jax.Array  # centre of the thresholds (0 for quantizers centred at 0)
  std: jax.Array  # sample std of the weights


def dequantize(parts: TernaryParts, dtype=jnp.float32) -> jax.Array:
  """Rebuilds the ternary tensor from its parts (exactly ``alpha * q`` for TGA)."""
  codes = parts.codes
  pos = jnp.asarray(parts.scale, dtype)
  neg = jnp.asarray(parts.neg_scale, dtype)
  return jnp.where(codes > 0, pos, jnp.where(codes < 0, -neg, jnp.zeros((), dtype)))


def mills_ratio(a: jax.Array) -> jax.Array:
  """Inverse Mills ratio ``phi(a) / (1 - Phi(a))`` of N(0, 1), stable for a >= 0.

  ``1 - Phi(a) = erfc(a / sqrt 2) / 2 = erfcx(a / sqrt 2) exp(-a^2 / 2) / 2``, and
  the ``exp(-a^2 / 2)`` cancels against ``phi(a)``.
  """
  return _SQRT_2_OVER_PI / jax.scipy.special.erfcx(a / math.sqrt(2.0))


def scale_from_stats(delta: jax.Array, mu: jax.Array, sigma: jax.Array) -> jax.Array:
  """The smooth path of TGA: ``alpha(delta, mu, sigma)`` with the 3-sigma clip.

  Differentiable by ordinary autodiff (used to check the custom VJP); assumes
  ``sigma > 0``.
  """
  t = jnp.minimum(jnp.abs(delta), CLIP_SIGMAS * jax.lax.stop_gradient(sigma))
  return mu + sigma * mills_ratio(t / sigma)


def _compute_dtype(dtype) -> jnp.dtype:
  # Statistics in float32 at least; float64 stays float64 (x64 mode).
  return jnp.promote_types(dtype, jnp.float32)


PerChannel = Union[bool, Sequence[int]]


def channel_axes(ndim: int, per_channel: PerChannel) -> tuple[int, ...]:
  """The axes that keep one statistic per slice: ``()`` per tensor, the last axis for
  ``per_channel=True``, or the given axes (e.g. the output-feature axes of a
  ``DenseGeneral`` kernel ``(in, heads, head_dim)``: ``(1, 2)``), normalized and sorted."""
  if per_channel is True:
    return (ndim - 1,) if ndim else ()
  if per_channel is False or per_channel is None:
    return ()
  axes = tuple(sorted({int(a) % ndim if -ndim <= int(a) < ndim else _bad_axis(a, ndim) for a in per_channel}))
  return axes


def _bad_axis(axis, ndim: int):
  raise ValueError(f"per_channel axis {axis} is out of range for weights with {ndim} axes.")


def reduction_axes(ndim: int, per_channel: PerChannel) -> tuple[int, ...]:
  """The axes a statistic is taken over: every axis :func:`channel_axes` does not keep."""
  kept = channel_axes(ndim, per_channel)
  return tuple(i for i in range(ndim) if i not in kept)


def stat_shape(shape: Sequence[int], per_channel: PerChannel) -> tuple[int, ...]:
  """Shape of one statistic (threshold, scale) for weights of ``shape``."""
  return tuple(shape[a] for a in channel_axes(len(shape), per_channel))


class _Stats(NamedTuple):
  n: int  # weights per statistic
  mu: jax.Array
  sigma: jax.Array  # 0 where undefined (N = 1) or constant
  safe_sigma: jax.Array  # sigma, with 1 where sigma == 0 (only used as a divisor)
  t: jax.Array
  a: jax.Array
  lam: jax.Array
  alpha: jax.Array
  q: jax.Array  # codes, in the compute dtype
  finite: jax.Array  # False where the slice's weights or its delta are not all finite


def moments(w: jax.Array, axes: tuple[int, ...]) -> tuple[int, jax.Array, jax.Array]:
  """Count, mean and sample std (0 for a single element) over ``axes``, kept as size-1 dims."""
  n = int(np.prod([w.shape[i] for i in axes], dtype=np.int64))
  # Shifted data: subtract the slice's first element before averaging, so a
  # constant slice gets mu equal to its value and sigma exactly 0 (a plain
  # mean of e.g. 0.1 repeated is off by an ulp, which made sigma tiny but
  # nonzero and, with delta = 0, turned every code into +-1).
  first = w[tuple(slice(0, 1) if i in axes else slice(None) for i in range(w.ndim))]
  shifted = w - first
  mean_shift = jnp.mean(shifted, axis=axes, keepdims=True)
  mu = first + mean_shift
  if n == 1:
    return n, mu, jnp.zeros_like(mu)
  centred = shifted - mean_shift
  return n, mu, jnp.sqrt(jnp.sum(centred * centred, axis=axes, keepdims=True) / (n - 1))


def _forward_stats(w: jax.Array, delta: jax.Array, axes: tuple[int, ...]) -> _Stats:
  n, mu, sigma = moments(w, axes)
  positive = sigma > 0
  safe_sigma = jnp.where(positive, sigma, jnp.ones_like(sigma))
  delta = jnp.reshape(delta, mu.shape)
  t = jnp.minimum(jnp.abs(delta), CLIP_SIGMAS * sigma)
  a = jnp.where(positive, t / safe_sigma, jnp.zeros_like(t))
  lam = mills_ratio(a)
  # A non-finite weight makes mu or sigma non-finite; a non-finite delta would be clipped (inf) or
  # compared away (NaN) into finite numbers: either way the slice's scale is NaN, not a plausible value.
  finite = jnp.isfinite(mu) & jnp.isfinite(sigma) & jnp.isfinite(delta)
  alpha = jnp.where(finite, mu + sigma * lam, jnp.nan)
  q = jnp.where(w > mu + t, 1, jnp.where(w < mu - t, -1, 0)).astype(w.dtype)
  return _Stats(n, mu, sigma, safe_sigma, t, a, lam, alpha, q, finite)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tga(w: jax.Array, delta: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  s = _forward_stats(w, delta, axes)
  return s.alpha * s.q


def _tga_fwd(w, delta, axes):
  s = _forward_stats(w, delta, axes)
  return s.alpha * s.q, (w, delta, s)


def _delta_cotangent(delta: jax.Array, s: _Stats, dalpha: jax.Array) -> jax.Array:
  """dL/ddelta from dL/dalpha: ``S * lam' * sign(delta)`` inside the 3-sigma clip, 0 beyond."""
  dlam = s.lam * (s.lam - s.a)
  inside_clip = jnp.abs(jnp.reshape(delta, s.mu.shape)) < CLIP_SIGMAS * s.sigma
  sign = jnp.sign(jnp.reshape(delta, s.mu.shape))
  ddelta = jnp.where(inside_clip, dalpha * dlam * sign, jnp.zeros_like(dalpha))
  ddelta = jnp.where(s.finite, ddelta, jnp.nan)  # a NaN scale comes with a NaN gradient, not a finite 0
  return jnp.reshape(ddelta, delta.shape)


def _tga_bwd(axes, residuals, g):
  w, delta, s = residuals
  dalpha = jnp.sum(g * s.q, axis=axes, keepdims=True)  # S = dL/dalpha
  dlam = s.lam * (s.lam - s.a)
  # alpha's path through mu and sigma; sigma == 0 (N = 1 or constant) has q == 0
  # hence S == 0, and the sigma term is dropped rather than divided by zero.
  dsigma_dw = jnp.where(
    s.sigma > 0, (w - s.mu) / (max(s.n - 1, 1) * s.safe_sigma), jnp.zeros_like(w))
  dw = g + dalpha * (1.0 / s.n + (s.lam - s.a * dlam) * dsigma_dw)
  dw = jnp.where(s.finite, dw, jnp.nan)
  return dw, _delta_cotangent(delta, s, dalpha)


_tga.defvjp(_tga_fwd, _tga_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _threshold_scale(w: jax.Array, delta: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  return _forward_stats(w, delta, axes).alpha


def _threshold_scale_fwd(w, delta, axes):
  s = _forward_stats(w, delta, axes)
  return s.alpha, (delta, s)


def _threshold_scale_bwd(axes, residuals, dalpha):
  delta, s = residuals
  return jnp.zeros(s.q.shape, s.q.dtype), _delta_cotangent(delta, s, dalpha)


_threshold_scale.defvjp(_threshold_scale_fwd, _threshold_scale_bwd)


def threshold_split(w: jax.Array, params: Mapping[str, jax.Array], *, per_channel: PerChannel = False
                    ) -> tuple[jax.Array, jax.Array]:
  """``(q, alpha)`` with ``alpha * q == ternarize(w, params)``, differentiable in ``delta`` only.

  For the threshold pass of the sequential update, which needs nothing but
  ``dL/ddelta``: a layer that computes ``alpha * (x @ q)`` instead of
  ``x @ (alpha q)`` gets ``dL/dalpha = sum(dL/dy * (x @ q))`` from its output,
  so the kernel-gradient products (a third of a backward pass) are never
  computed. ``dL/ddelta`` is exactly :func:`ternarize`'s; ``w`` gets no gradient
  (zeros). ``q`` is in ``w``'s compute dtype; ``alpha`` has size-1 dims on the
  reduced axes (a scalar's worth per tensor, or ``(1, ..., out)`` per channel).
  """
  wc, delta, axes = _validated(w, params, per_channel, "threshold_split")
  wc = jax.lax.stop_gradient(wc)
  q = jax.lax.stop_gradient(_forward_stats(wc, delta, axes).q)
  return q, _threshold_scale(wc, delta, axes)


def _check_w(w, per_channel: PerChannel, who: str) -> None:
  if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
    raise TypeError(f"{who}: weights must be floating point, got dtype {jnp.result_type(w)}.")
  if per_channel is not False and per_channel is not None and per_channel != () and jnp.ndim(w) < 1:
    raise ValueError(f"{who}: per-channel statistics need at least one axis, got a scalar.")
  if jnp.size(w) == 0:
    raise ValueError(f"{who}: cannot ternarize an empty tensor (shape {jnp.shape(w)}).")


def _delta_from(params: Any, w, per_channel: PerChannel) -> jax.Array:
  if not isinstance(params, Mapping) or "delta" not in params:
    got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(
      f"ternarize: params must be a mapping with key 'delta' (TGA's threshold), got {got}. "
      "Use tgq_jax.core.ternarize.init_params(w) to create it.")
  delta = params["delta"]
  expected = stat_shape(jnp.shape(w), per_channel)
  if jnp.shape(delta) != expected:
    what = "one threshold per output channel" if expected else "a scalar"
    raise ValueError(
      f"ternarize: params['delta'] must be {what} (shape {expected}), "
      f"got shape {jnp.shape(delta)} for weights of shape {jnp.shape(w)}.")
  if not jnp.issubdtype(jnp.result_type(delta), jnp.floating):
    raise TypeError(f"ternarize: params['delta'] must be floating point, got {jnp.result_type(delta)}.")
  return delta


def _validated(w, params, per_channel: PerChannel, who: str) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
  """Checks the inputs (at trace time); returns w and delta in the compute dtype, and the axes."""
  _check_w(w, per_channel, who)
  delta = _delta_from(params, w, per_channel)
  w = jnp.asarray(w)
  compute = _compute_dtype(w.dtype)
  return w.astype(compute), jnp.asarray(delta).astype(compute), reduction_axes(w.ndim, per_channel)


def ternarize(w: jax.Array, params: Mapping[str, jax.Array], *, per_channel: PerChannel = False) -> jax.Array:
  """TGA-ternarizes ``w``: returns ``alpha * q`` with ``w``'s shape and dtype.

  Args:
    w: full-precision weights of any shape (float32, float64 or bfloat16).
    params: ``{"delta": threshold}``; ``delta`` is a scalar, or ``(w.shape[-1],)``
      with ``per_channel=True``. Make it with :func:`init_params`.
    per_channel: statistics per slice of the last axis (``True``) or of the
      given axes (a sequence of ints) instead of per tensor.

  Gradients flow to both ``w`` and ``params["delta"]`` as derived in the module
  docstring. Works under ``jit``, ``vmap``, ``grad`` and ``lax.scan``.
  """
  wc, delta, axes = _validated(w, params, per_channel, "ternarize")
  return _tga(wc, delta, axes).astype(jnp.result_type(w))


def init_params(w: jax.Array, *, per_channel: PerChannel = False, dtype=None) -> dict[str, jax.Array]:
  """The reference initialization ``delta = 0.05 * max|w|`` (per tensor or per channel).

  ``dtype`` defaults to the statistics' dtype: float32, or float64 for float64
  weights (under x64), so a float64 start is not rounded through float32.
  """
  _check_w(w, per_channel, "init_params")
  w = jnp.asarray(w)
  axes = reduction_axes(w.ndim, per_channel)
  delta = INIT_FRACTION * jnp.max(jnp.abs(w.astype(_compute_dtype(w.dtype))), axis=axes)
  return {"delta": delta if dtype is None else delta.astype(dtype)}


def clip_bound(w: jax.Array, *, per_channel: PerChannel = False) -> jax.Array:
  """``3 sigma``: thresholds at or beyond it are clipped and receive no gradient."""
  w = jnp.asarray(w)
  shape = stat_shape(w.shape, per_channel)
  _, _, sigma = moments(w.astype(_compute_dtype(w.dtype)), reduction_axes(w.ndim, per_channel))
  return jnp.reshape(CLIP_SIGMAS * sigma, shape)


def ternary_parts(w: jax.Array, params: Mapping[str, jax.Array], *, per_channel: PerChannel = False) -> TernaryParts:
  """Codes (int8), scale, clipped threshold, mean and std of TGA on ``w``.

  ``dequantize(ternary_parts(w, p))`` equals ``ternarize(w, p)`` (in float32).
  """
  wc, delta, axes = _validated(w, params, per_channel, "ternary_parts")
  s = _forward_stats(wc, delta, axes)
  shape = stat_shape(wc.shape, per_channel)
  flat = lambda x: jnp.reshape(x, shape)
  return TernaryParts(
    codes=s.q.astype(jnp.int8), scale=flat(s.alpha), neg_scale=flat(s.alpha),
    threshold=flat(s.t), mean=flat(s.mu), std=flat(s.sigma))


class _CallableModule(types.ModuleType):
  """This module, callable as :func:`ternarize`.

  ``from tgq_jax import ternarize`` gives this module (``import tgq_jax.core.ternarize``
  does too: one name, one object), and ``ternarize(w, params)`` calls the
  function. Settings such as ``ternarize.CLIP_SIGMAS`` are this module's own
  globals, the ones the code reads.
  """

  def __call__(self, w: jax.Array, params: Mapping[str, jax.Array], *, per_channel: PerChannel = False
               ) -> jax.Array:
    return ternarize(w, params, per_channel=per_channel)


sys.modules[__name__].__class__ = _CallableModule
