"""What a quantized layer computes with, framework-neutral: modes, kernel layouts, the layer's kernel.

Both Flax front ends (:mod:`tgq_jax.frontends.linen`, :mod:`tgq_jax.frontends.nnx`)
say how a layer is reached and call these pure functions for what it computes:

* :func:`layer_kernel`: ``(quantizer, mode, kernel, qparams, layout)`` -> the
  kernel the layer multiplies by, and a scale for its output (threshold pass);
* :func:`finish_output`: the layer's output with that scale, then the bias held back;
* :func:`tgq_jax.core.packing.packed_kernel`: a packed layer's kernel from its codes and scales;
* :func:`dense_layout`, :func:`general_layout`, :func:`einsum_layout`: which kernel
  axes index a layer's output features (per-channel statistics go over them);
* :func:`order_skips`: the first / last matched layer in call order, as ``policy`` says;
* :func:`check_coverage`: what ``policy.on_unquantized`` says about layers and patterns left out.

Modes (what a quantized layer computes; a field of the model, never ambient state):

* :data:`TRAIN`: the layer multiplies by ``quantizer(kernel, qparams)``.
* :data:`THRESHOLD_PASS`: for the first pass of the sequential update, which
  needs nothing but the thresholds' gradient. A layer whose quantizer has
  thresholds (TGA) multiplies by the codes ``q`` and scales its *output* by
  ``alpha``, the bias added after: ``alpha * (x . q) + b``, the same output as
  ``x . (alpha q) + b``, the same threshold gradient (``dL/dalpha`` then comes
  from the output, an element-wise product), and no gradient for the kernel, so
  the kernel-gradient products (a third of a backward pass) are never computed.
  Layers whose output cannot take the scale (an Einsum, a DenseGeneral with batch
  dims, per-channel scales on inner axes) and quantizers without thresholds
  compute as in :data:`TRAIN`.

Packed inference is not a mode: it is the quantizer (``"packed:tga"``,
:meth:`tgq_jax.core.policy.QuantPolicy.as_packed`), since the layer holds other variables.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tgq_jax.core.quantizers import Quantizer
from tgq_jax.core.ternarize import channel_axes, stat_shape

__all__ = ["MODES", "THRESHOLD_PASS", "TRAIN", "KernelLayout", "LayerKernel", "UnquantizedLayerWarning",
           "check_coverage", "check_mode", "dense_layout", "einsum_layout", "finish_output", "general_layout",
           "layer_kernel", "order_skips"]

TRAIN = "train"
THRESHOLD_PASS = "threshold_pass"
MODES = (TRAIN, THRESHOLD_PASS)


def check_mode(mode: Any) -> str:
  """``mode`` if it is one of :data:`MODES`, else a ValueError naming the valid ones."""
  if not isinstance(mode, str) or mode not in MODES:
    raise ValueError(f"unknown quantized-layer mode {mode!r}; valid modes: {', '.join(map(repr, MODES))}.")
  return mode


# --- kernel layouts ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """How a layer's kernel axes relate to its output.

  Attributes:
    output_axes: the kernel axes that index the layer's output features (per-channel
      statistics keep one threshold and scale per index of these axes).
    trailing_output: whether these axes are also the output's trailing axes, in
      order, with the bias broadcasting over them: a scale over them can then
      multiply the output directly (the threshold pass).
  """

  output_axes: tuple[int, ...]
  trailing_output: bool


def dense_layout(kernel_ndim: int) -> KernelLayout:
  """Dense / Linear ``(in, out)`` and Conv ``(*window, in, out)``: the last axis."""
  return KernelLayout((kernel_ndim - 1,), True)


def general_layout(kernel_ndim: int, num_features: int, num_batch: int = 0) -> KernelLayout:
  """DenseGeneral / LinearGeneral ``(*batch, *in, *features)``: the ``features`` axes (the trailing
  ones) and the batch axes (each batch entry is a kernel of its own, and leads the output)."""
  axes = tuple(range(num_batch)) + tuple(range(kernel_ndim - num_features, kernel_ndim))
  return KernelLayout(axes, num_batch == 0)


def einsum_layout(einsum_str: str) -> KernelLayout:
  """Einsum: the kernel axes whose letters appear in the einsum's output.

  Raises:
    ValueError: no explicit ``->`` output, not two operands, or ``...`` in the kernel operand.
  """
  spec = einsum_str.replace(" ", "")
  operands, arrow, out = spec.partition("->")
  if not arrow or operands.count(",") != 1:
    raise ValueError(f"Einsum {einsum_str!r}: expected two operands and an explicit output ('x,k->y').")
  kernel_letters = operands.split(",")[1]
  if "." in kernel_letters:
    raise ValueError(f"Einsum {einsum_str!r}: per-channel statistics need the kernel's axes spelled "
                     "out (no '...' in the kernel operand).")
  # The bias of an Einsum is reshaped by the layer itself: the output is never scaled in its place.
  return KernelLayout(tuple(i for i, c in enumerate(kernel_letters) if c in out), False)


# --- the kernel a layer uses -------------------------------------------------


class LayerKernel(NamedTuple):
  """What a quantized layer computes with.

  Attributes:
    kernel: what the layer multiplies by (its own code then runs on it).
    output_scale: None, or what :func:`finish_output` multiplies the layer's
      output by (shaped to broadcast against it), with the bias added after.
  """

  kernel: jax.Array
  output_scale: jax.Array | None


def _output_scale_shape(layout: KernelLayout, quantizer: Quantizer, shape: tuple[int, ...]) -> tuple | None:
  # The bias is added after the scale, as it is: only where it broadcasts over the output's trailing axes.
  axes = channel_axes(len(shape), quantizer.per_channel)
  if layout.trailing_output and axes == tuple(range(len(shape) - len(axes), len(shape))):
    return stat_shape(shape, quantizer.per_channel)  # () per tensor
  return None


def layer_kernel(quantizer: Quantizer, mode: str, kernel: jax.Array, qparams: Mapping[str, jax.Array],
                 layout: KernelLayout | None) -> LayerKernel:
  """The kernel (and output scale) a quantized layer in ``mode`` computes with.

  Args:
    quantizer: the layer's quantizer (not packed: see :func:`tgq_jax.core.packing.packed_kernel`).
    mode: :data:`TRAIN` or :data:`THRESHOLD_PASS` (see the module docstring).
    kernel: the layer's full-precision kernel.
    qparams: the quantizer's parameters (``{"delta": ...}`` for TGA).
    layout: the layer's :class:`KernelLayout` (only the threshold pass reads it); None: the
      layer's output takes no scale (the threshold pass then computes as TRAIN does).

  Returns:
    ``LayerKernel(quantizer(kernel, qparams), None)`` in :data:`TRAIN` (and where the
    threshold pass does not apply); in :data:`THRESHOLD_PASS`, the codes (in the
    kernel's dtype, no gradient) and ``alpha`` shaped for the output.
  """
  if check_mode(mode) == THRESHOLD_PASS:
    scale_shape = None if layout is None else _output_scale_shape(layout, quantizer, tuple(kernel.shape))
    split = None if scale_shape is None else quantizer.threshold_split(kernel, qparams)
    if split is not None:
      codes, scale = split
      return LayerKernel(codes.astype(kernel.dtype), jnp.reshape(scale, scale_shape))
  return LayerKernel(quantizer(kernel, qparams), None)


def finish_output(y: jax.Array, output_scale: jax.Array | None, bias: jax.Array | None) -> jax.Array:
  """A layer's output ``y`` (computed with :func:`layer_kernel`'s kernel and a zero bias) finished:
  times ``output_scale``, plus the held-back ``bias``. ``y`` as it is when ``output_scale`` is None."""
  if output_scale is None:
    return y
  y = y * output_scale.astype(y.dtype)  # () per tensor, the output-feature shape per channel
  return y if bias is None else y + jnp.asarray(bias).astype(y.dtype)


# --- selecting layers --------------------------------------------------------


def order_skips(call_order: Sequence[Any], ternary_first: bool, ternary_last: bool) -> set[Any]:
  """The layers of ``call_order`` (the matched layers, first call first) left full precision:
  the first unless ``ternary_first``, the last unless ``ternary_last``."""
  skips = set()
  if call_order and not ternary_first:
    skips.add(call_order[0])
  if call_order and not ternary_last:
    skips.add(call_order[-1])
  return skips


class UnquantizedLayerWarning(UserWarning):
  """A layer the policy selects has a kernel no quantizer takes, or a policy pattern matches no layer."""


def check_coverage(policy: Any, candidate_paths: Iterable[str], unquantizable: Mapping[str, str]) -> None:
  """Reports what ``policy`` leaves out, as ``policy.on_unquantized`` says ("warn", "error", "ignore").

  Args:
    policy: a :class:`tgq_jax.core.policy.QuantPolicy`.
    candidate_paths: the ``"/"``-joined paths of every layer whose kernel a quantizer can take.
    unquantizable: ``{path: layer type name}`` of the layers with a kernel that no quantizer
      takes (a transposed or unshared conv) whose path the policy matches.

  Raises:
    ValueError: with ``on_unquantized="error"``, naming every such layer and pattern.
  """
  if policy.on_unquantized == "ignore" or not policy.ternary:
    return
  paths = list(candidate_paths)
  problems = [f"layer {path!r} ({kind}) has a kernel that is not quantized (no quantizer takes it)"
              for path, kind in unquantizable.items()]
  for field in ("include", "exclude"):
    for pattern in getattr(policy, field):
      if not any(re.fullmatch(pattern, path) for path in paths):
        problems.append(f"QuantPolicy.{field} pattern {pattern!r} matches no quantizable layer")
  if not problems:
    return
  message = "; ".join(problems) + " (QuantPolicy.on_unquantized='ignore' silences this)."
  if policy.on_unquantized == "error":
    raise ValueError(message)
  warnings.warn(message, UnquantizedLayerWarning, stacklevel=3)
