"""The baselines TGA is compared with, in TGA's call form, and the registry.

Every quantizer is ``fn(w, params) -> w_t`` (same shape and dtype as ``w``) with
an ``init(w) -> params`` helper and a ``parts(w, params) -> TernaryParts``
helper for inspection and export:

* ``"tga"``: :mod:`tgq_jax.core.ternarize` (He & Fan 2019), trainable threshold ``delta``.
* ``"twn"``: Ternary Weight Networks (Li et al. 2016). ``t = 0.7 mean|w|``,
  scale = mean of ``|w|`` over the kept weights, straight-through gradient
  (``dL/dw = dL/dw_t``); no trainable parameter.
* ``"ttq"``: Trained Ternary Quantization (Zhu et al. 2017). ``t = 0.05 max|w|``,
  ``w_t = W_p`` above ``t``, ``-W_n`` below ``-t``, with trainable ``W_p, W_n``.
  Gradients: ``dL/dW_p = sum_{I_p} g``, ``dL/dW_n = -sum_{I_n} g`` (the exact
  derivative of ``w_t = -W_n``; the paper's Eq. 7 drops that minus sign) and
  ``dL/dw = W_p g`` on ``I_p``, ``g`` on ``I_z``, ``W_n g`` on ``I_n``.
* ``"absmean"``: BitNet b1.58's weight quantizer (Ma et al. 2024).
  ``scale = mean|w|`` (+ a 1e-5 floor as BitNet's ``eps``), ``codes =
  clip(round(w / scale), -1, 1)`` (so the threshold is ``scale / 2``),
  straight-through gradient (``dL/dw = dL/dw_t``, the scale is detached as in
  BitNet's ``w + (quant(w) - w).detach()``); no trainable parameter.
* ``"fp"``: identity, so every model has a full-precision twin of identical
  structure.

``"packed:<name>"`` (:func:`packed_name`) is the inference form of a ternary
quantizer: a layer built with it holds the 2-bit packed codes and scales
instead of a float kernel (see :mod:`tgq_jax.core.packing`); ``"packed:fp"`` is
``"fp"``.

Statistics are per tensor by default; TGA, TWN and absmean take ``per_channel=True``
(statistics per slice of the last axis, Flax's output-channel axis).

Non-finite weights propagate: a NaN or infinite weight makes the output of its
tensor (per channel: its slice) NaN, and TTQ's scale gradients too (the
straight-through gradients are the output's, NaN with it), never zeros that
look like a quantized tensor.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tgq_jax.core.ternarize import PerChannel, TernaryParts, moments, reduction_axes, stat_shape
from tgq_jax.core.ternarize import init_params as tga_init
from tgq_jax.core.ternarize import ternarize as tga
from tgq_jax.core.ternarize import ternary_parts as tga_parts
from tgq_jax.core.ternarize import threshold_split as tga_threshold_split

Params = Mapping[str, jax.Array]

TWN_THRESHOLD_FACTOR = 0.7
TTQ_THRESHOLD_FACTOR = 0.05


def _axes(w: jax.Array, per_channel: PerChannel) -> tuple[int, ...]:
  return reduction_axes(w.ndim, per_channel)


def _stat_shape(w: jax.Array, per_channel: PerChannel) -> tuple[int, ...]:
  return stat_shape(w.shape, per_channel)


def _compute(w: jax.Array) -> jax.Array:
  w = jnp.asarray(w)
  return w.astype(jnp.promote_types(w.dtype, jnp.float32))


def _check_empty(params: Any, name: str) -> None:
  if params is not None and (not isinstance(params, Mapping) or len(params)):
    raise ValueError(f"{name}: takes no parameters (params must be {{}}), got {params!r}.")


# --- TWN ---------------------------------------------------------------------


def _twn_codes_and_scale(w: jax.Array, per_channel: PerChannel):
  axes = _axes(w, per_channel)
  abs_w = jnp.abs(w)
  t = TWN_THRESHOLD_FACTOR * jnp.mean(abs_w, axis=axes, keepdims=True)
  kept = abs_w > t
  count = jnp.sum(kept, axis=axes, keepdims=True)
  # An all-zero tensor keeps nothing: scale 0 rather than 0/0.
  scale = jnp.sum(jnp.where(kept, abs_w, 0), axis=axes, keepdims=True) / jnp.maximum(count, 1)
  scale = jnp.where(jnp.isfinite(t), scale, jnp.nan)  # a non-finite weight: NaN, not a scale of the rest
  codes = jnp.where(kept, jnp.sign(w), 0)
  return codes, scale, t


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _twn(w: jax.Array, per_channel: PerChannel) -> jax.Array:
  codes, scale, _ = _twn_codes_and_scale(w, per_channel)
  return scale * codes


def _twn_fwd(w, per_channel):
  return _twn(w, per_channel), None


def _twn_bwd(per_channel, _, g):
  return (g,)  # straight-through


_twn.defvjp(_twn_fwd, _twn_bwd)


def twn(w: jax.Array, params: Params | None = None, *, per_channel: PerChannel = False) -> jax.Array:
  """TWN-ternarizes ``w`` (no trainable parameters; ``params`` must be empty)."""
  _check_empty(params, "twn")
  w = jnp.asarray(w)
  return _twn(_compute(w), per_channel).astype(w.dtype)


def twn_init(w: jax.Array, *, per_channel: PerChannel = False) -> dict:
  del w, per_channel
  return {}


def twn_parts(w: jax.Array, params: Params | None = None, *, per_channel: PerChannel = False) -> TernaryParts:
  _check_empty(params, "twn")
  w = jnp.asarray(w)
  codes, scale, t = _twn_codes_and_scale(_compute(w), per_channel)
  shape = _stat_shape(w, per_channel)
  _, _, sigma = moments(_compute(w), _axes(w, per_channel))  # reported, not used
  scale = jnp.reshape(scale, shape)
  return TernaryParts(codes.astype(jnp.int8), scale, scale, jnp.reshape(t, shape),
                      jnp.zeros(shape, scale.dtype), jnp.reshape(sigma, shape))


# --- absmean (BitNet b1.58) ---------------------------------------------------

ABSMEAN_EPS = 1e-5


def _absmean_codes_and_scale(w: jax.Array, per_channel: PerChannel):
  scale = jnp.maximum(jnp.mean(jnp.abs(w), axis=_axes(w, per_channel), keepdims=True), ABSMEAN_EPS)
  return jnp.clip(jnp.round(w / scale), -1, 1), scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _absmean(w: jax.Array, per_channel: PerChannel) -> jax.Array:
  codes, scale = _absmean_codes_and_scale(w, per_channel)
  return scale * codes


def _absmean_fwd(w, per_channel):
  return _absmean(w, per_channel), None


_absmean.defvjp(_absmean_fwd, _twn_bwd)  # straight-through, like TWN


def absmean(w: jax.Array, params: Params | None = None, *, per_channel: PerChannel = False) -> jax.Array:
  """BitNet b1.58's absmean ternarization of ``w`` (no trainable parameters)."""
  _check_empty(params, "absmean")
  w = jnp.asarray(w)
  return _absmean(_compute(w), per_channel).astype(w.dtype)


def absmean_parts(w: jax.Array, params: Params | None = None, *, per_channel: PerChannel = False) -> TernaryParts:
  _check_empty(params, "absmean")
  wc = _compute(w)
  codes, scale = _absmean_codes_and_scale(wc, per_channel)
  shape = _stat_shape(wc, per_channel)
  _, _, sigma = moments(wc, _axes(wc, per_channel))  # reported, not used
  scale = jnp.reshape(scale, shape)
  return TernaryParts(codes.astype(jnp.int8), scale, scale, 0.5 * scale, jnp.zeros(shape, scale.dtype),
                      jnp.reshape(sigma, shape))


# --- TTQ ---------------------------------------------------------------------


def _ttq_codes(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  t = TTQ_THRESHOLD_FACTOR * jnp.max(jnp.abs(w))
  return jnp.where(w > t, 1, jnp.where(w < -t, -1, 0)).astype(w.dtype), t


def _ttq_forward(w: jax.Array, pos: jax.Array, neg: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(output, codes, whether w is finite): a non-finite weight makes the output and every gradient NaN
  (its threshold would otherwise compare every code to 0 and output zeros)."""
  codes, t = _ttq_codes(w)
  finite = jnp.isfinite(t)
  out = jnp.where(codes > 0, pos, jnp.where(codes < 0, -neg, jnp.zeros_like(w)))
  return jnp.where(finite, out, jnp.nan), codes, finite


@jax.custom_vjp
def _ttq(w: jax.Array, pos: jax.Array, neg: jax.Array) -> jax.Array:
  return _ttq_forward(w, pos, neg)[0]


def _ttq_fwd(w, pos, neg):
  out, codes, finite = _ttq_forward(w, pos, neg)
  return out, (codes, pos, neg, finite)


def _ttq_bwd(residuals, g):
  codes, pos, neg, finite = residuals
  dpos = jnp.sum(jnp.where(codes > 0, g, 0))
  dneg = -jnp.sum(jnp.where(codes < 0, g, 0))
  dw = jnp.where(codes > 0, pos * g, jnp.where(codes < 0, neg * g, g))
  nan_unless_finite = lambda x: jnp.where(finite, x, jnp.nan)
  return (nan_unless_finite(dw), jnp.reshape(nan_unless_finite(dpos), pos.shape),
          jnp.reshape(nan_unless_finite(dneg), neg.shape))


_ttq.defvjp(_ttq_fwd, _ttq_bwd)


def _ttq_scales(params: Any) -> tuple[jax.Array, jax.Array]:
  if not isinstance(params, Mapping) or not {"pos_scale", "neg_scale"} <= set(params):
    got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(f"ttq: params must have keys 'pos_scale' and 'neg_scale', got {got}. "
                     "Use ttq_init(w) to create them.")
  for key in ("pos_scale", "neg_scale"):
    if jnp.shape(params[key]) != ():
      raise ValueError(f"ttq: params[{key!r}] must be a scalar, got shape {jnp.shape(params[key])}.")
  return params["pos_scale"], params["neg_scale"]


def ttq(w: jax.Array, params: Params, *, per_channel: PerChannel = False) -> jax.Array:
  """TTQ-ternarizes ``w`` with the trainable scales ``params = {"pos_scale", "neg_scale"}``."""
  if per_channel:
    raise ValueError("ttq: per-channel statistics are not supported (TTQ learns one scale pair per layer).")
  pos, neg = _ttq_scales(params)
  w = jnp.asarray(w)
  wc = _compute(w)
  return _ttq(wc, jnp.asarray(pos, wc.dtype), jnp.asarray(neg, wc.dtype)).astype(w.dtype)


def ttq_init(w: jax.Array, *, per_channel: PerChannel = False, dtype=None) -> dict[str, jax.Array]:
  """Scales initialized to the mean magnitude of the weights on each side of the threshold.

  ``dtype`` defaults to the statistics' dtype (float32; float64 for float64 weights).
  """
  if per_channel:
    raise ValueError("ttq: per-channel statistics are not supported.")
  wc = _compute(w)
  codes, _ = _ttq_codes(wc)
  mean_where = lambda m: jnp.sum(jnp.where(m, jnp.abs(wc), 0)) / jnp.maximum(jnp.sum(m), 1)
  dtype = wc.dtype if dtype is None else dtype
  return {"pos_scale": mean_where(codes > 0).astype(dtype), "neg_scale": mean_where(codes < 0).astype(dtype)}


def ttq_parts(w: jax.Array, params: Params, *, per_channel: PerChannel = False) -> TernaryParts:
  if per_channel:
    raise ValueError("ttq: per-channel statistics are not supported.")
  pos, neg = _ttq_scales(params)
  wc = _compute(w)
  codes, t = _ttq_codes(wc)
  _, _, sigma = moments(wc, _axes(wc, False))
  return TernaryParts(codes.astype(jnp.int8), jnp.asarray(pos, wc.dtype), jnp.asarray(neg, wc.dtype),
                      t, jnp.zeros((), wc.dtype), jnp.reshape(sigma, ()))


# --- full precision ----------------------------------------------------------


def fp(w: jax.Array, params: Params | None = None, *, per_channel: PerChannel = False) -> jax.Array:
  """Identity: the full-precision twin."""
  _check_empty(params, "fp")
  return w


def fp_init(w: jax.Array, *, per_channel: PerChannel = False) -> dict:
  del w, per_channel
  return {}


# --- registry ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
  """What :func:`register_quantizer` needs to know about a weight quantizer.

  The three functions take ``per_channel`` as a keyword: ``False`` (per tensor),
  ``True`` (per slice of the last axis) or a tuple of the axes that keep one
  statistic each (a layer's output-feature axes; see
  :func:`tgq_jax.core.ternarize.channel_axes`).

  Attributes:
    name: the registry name (what ``--quantizer`` and :class:`tgq_jax.QuantPolicy` take).
    apply: ``apply(w, params, *, per_channel) -> w_q``, same shape and dtype as ``w``.
    init: ``init(w, *, per_channel) -> params`` (``{}`` for a quantizer without parameters).
    parts: ``parts(w, params, *, per_channel) -> TernaryParts`` (codes and scales,
      for statistics and export); None for a quantizer that is not ternary (``"fp"``).
    param_names: the keys of ``init``'s dict, created beside each kernel.
    threshold_names: the subset of ``param_names`` that are thresholds: the
      trainer's threshold optimizer trains them; the others train with the weights.
    per_channel: whether per-channel statistics are supported.
    threshold_split: optional ``(w, params, *, per_channel) -> (codes, scale)``
      with ``scale * codes == apply(w, params)`` and a gradient for the
      thresholds only (:func:`tgq_jax.core.ternarize.threshold_split`); lets the
      sequential update's threshold pass skip the kernel gradients.
    symmetric: whether a -1 code is ``-scale`` (False: its own magnitude, as TTQ's).
    description: one line for ``--help`` and error messages.
  """

  name: str
  apply: Callable
  init: Callable
  parts: Callable | None
  param_names: tuple[str, ...] = ()
  threshold_names: tuple[str, ...] = ()
  per_channel: bool = True
  threshold_split: Callable | None = None
  symmetric: bool = True
  description: str = ""

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name or self.name.startswith(PACKED_PREFIX) or ":" in self.name:
      raise ValueError(f"quantizer name must be a non-empty string without ':', got {self.name!r}.")
    if not set(self.threshold_names) <= set(self.param_names):
      raise ValueError(f"quantizer {self.name!r}: threshold_names {self.threshold_names} must be among "
                       f"param_names {self.param_names}.")


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """A registered quantizer with its statistics layout bound.

  Attributes:
    name: registry name.
    per_channel: False (per tensor), True (last axis) or the kept axes (see :class:`QuantizerSpec`).
    ternary: whether ``apply`` produces ternary weights (False for ``"fp"``).
    param_names: names of the quantizer's own params leaves (``init``'s keys).
    threshold_params: the subset of ``param_names`` that are thresholds (trained
      by the trainer's threshold optimizer); other quantizer leaves train with
      the weights.
    packed: the inference form: the layer holds packed codes and scales, not a float kernel.
  """

  spec: QuantizerSpec = dataclasses.field(repr=False)
  per_channel: PerChannel = False
  packed: bool = False

  @property
  def name(self) -> str:
    return PACKED_PREFIX + self.spec.name if self.packed else self.spec.name

  def __repr__(self) -> str:
    return f"Quantizer({self.name!r}, per_channel={self.per_channel!r})"

  @property
  def ternary(self) -> bool:
    return self.spec.parts is not None

  @property
  def param_names(self) -> tuple[str, ...]:
    return () if self.packed else self.spec.param_names

  @property
  def threshold_params(self) -> tuple[str, ...]:
    return () if self.packed else self.spec.threshold_names

  @property
  def symmetric(self) -> bool:
    """Whether a -1 code is ``-scale`` (TGA, TWN); TTQ has its own magnitude for -1."""
    return self.spec.symmetric

  def _unpacked(self) -> QuantizerSpec:
    if self.packed:
      _packed_only()
    return self.spec

  def __call__(self, w: jax.Array, params: Params) -> jax.Array:
    return self._unpacked().apply(w, params, per_channel=self.per_channel)

  def init(self, w: jax.Array) -> dict[str, jax.Array]:
    return self._unpacked().init(w, per_channel=self.per_channel)

  def parts(self, w: jax.Array, params: Params) -> TernaryParts:
    if self._unpacked().parts is None:
      raise ValueError(f"quantizer {self.name!r} is not ternary: it has no codes.")
    return self.spec.parts(w, params, per_channel=self.per_channel)

  def threshold_split(self, w: jax.Array, params: Params) -> tuple[jax.Array, jax.Array] | None:
    """``(codes, scale)`` with the gradient reaching the thresholds only (see
    :func:`tgq_jax.core.ternarize.threshold_split`), or None for a quantizer without thresholds."""
    if self.packed or self.spec.threshold_split is None:
      return None
    return self.spec.threshold_split(w, params, per_channel=self.per_channel)


_REGISTRY: dict[str, QuantizerSpec] = {}
PACKED_PREFIX = "packed:"


def register_quantizer(spec: QuantizerSpec, *, replace: bool = False) -> QuantizerSpec:
  """Adds ``spec`` to the registry: every model, the trainer and the CLI can then use its name.

  Raises ValueError if the name is taken (unless ``replace``).
  """
  if not isinstance(spec, QuantizerSpec):
    raise TypeError(f"register_quantizer takes a QuantizerSpec, got {type(spec).__name__}.")
  if spec.name in _REGISTRY and not replace:
    raise ValueError(f"quantizer {spec.name!r} is already registered (pass replace=True to replace it).")
  _REGISTRY[spec.name] = spec
  return spec


def quantizer_names() -> tuple[str, ...]:
  """The registered quantizer names, in registration order."""
  return tuple(_REGISTRY)


def __getattr__(name: str):
  if name == "QUANTIZERS":  # the registry's names now, including quantizers registered later
    return quantizer_names()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def packed_name(name: str) -> str:
  """The packed (inference) form of quantizer ``name``: ``"tga"`` -> ``"packed:tga"``."""
  return name if name.startswith(PACKED_PREFIX) else PACKED_PREFIX + name


def _packed_only(*_args, **_kwargs):
  raise ValueError("a packed quantizer has no float kernel to quantize: its layer holds 2-bit codes "
                   "and scales (tgq_jax.export.load_packed fills them).")


def get_quantizer(name: str, *, per_channel: PerChannel = False) -> Quantizer:
  """Returns the quantizer registered under ``name`` (see :func:`quantizer_names`), or "packed:" one of them."""
  if isinstance(name, str) and name.startswith(PACKED_PREFIX):
    base = get_quantizer(name[len(PACKED_PREFIX):], per_channel=per_channel)
    # nothing to pack for a non-ternary quantizer: "packed:fp" is "fp"
    return dataclasses.replace(base, packed=True) if base.ternary else base
  if name not in _REGISTRY:
    raise ValueError(f"unknown quantizer {name!r}; valid quantizers: {', '.join(_REGISTRY)}.")
  spec = _REGISTRY[name]
  if per_channel not in (False, None, ()) and not spec.per_channel:
    raise ValueError(f"quantizer {name!r} does not support per-channel statistics "
                     "(supported by: " + ", ".join(n for n, r in _REGISTRY.items() if r.per_channel) + ").")
  return Quantizer(spec, False if per_channel is None else per_channel)


register_quantizer(QuantizerSpec(
  "tga", tga, tga_init, tga_parts, ("delta",), ("delta",), threshold_split=tga_threshold_split,
  description="TGA (He & Fan 2019): trainable threshold, truncated-Gaussian scale"))
register_quantizer(QuantizerSpec(
  "twn", twn, twn_init, twn_parts, description="TWN (Li et al. 2016): t = 0.7 mean|w|, straight-through"))
register_quantizer(QuantizerSpec(
  "ttq", ttq, ttq_init, ttq_parts, ("neg_scale", "pos_scale"), per_channel=False, symmetric=False,
  description="TTQ (Zhu et al. 2017): trained positive and negative scales"))
register_quantizer(QuantizerSpec(
  "absmean", absmean, twn_init, absmean_parts,
  description="BitNet b1.58 absmean (Ma et al. 2024): scale = mean|w|, straight-through"))
register_quantizer(QuantizerSpec("fp", fp, fp_init, None, description="full precision (identity)"))
