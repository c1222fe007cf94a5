"""Activation quantization at the input of a quantized layer: BitNet b1.58's per-token absmax (W1.58A8).

BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs") trains ternary weights with
8-bit activations: the input ``x`` of every quantized linear layer is quantized per
token, over the axes the layer contracts with its kernel, as

    s = (2**(b-1) - 1) / max(|x|, over those axes, kept).clip(min=1e-5)
    y = clip(round(x * s), -2**(b-1), 2**(b-1) - 1) / s

(``b = 8``: codes in [-128, 127]), with a straight-through gradient
(``x + stop_gradient(y - x)``: the gradient with respect to ``x`` is the identity).
:func:`quantize_activations` is that function; :attr:`tgq_jax.QuantPolicy.activation_bits`
turns it on for the layers a policy quantizes, with any weight quantizer.

Which axes a layer contracts (its "token" is everything else):

* :func:`dense_input_axes`: ``Dense``/``Linear`` and ``Conv``: the last (features; per pixel for a conv);
* :func:`general_input_axes`: ``DenseGeneral``/``LinearGeneral``: their ``axis``;
* :func:`einsum_input_axes`: ``Einsum``: the input letters that also index the kernel and are
  absent from the output; the last axis where the string does not say (see there).

Framework-neutral: jax only.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["MAX_BITS", "MIN_BITS", "check_activation_bits", "dense_input_axes", "einsum_input_axes",
           "general_input_axes", "quantize_activations", "quantize_layer_input"]

MIN_BITS, MAX_BITS = 2, 16
#: ``max|x|`` is clipped from below to this before dividing (BitNet's ``clamp_(min=1e-5)``): an
#: all-zero token stays zero instead of becoming NaN.
ABSMAX_FLOOR = 1e-5


def check_activation_bits(bits: object, what: str = "activation_bits") -> int | None:
  """``bits`` if None or an integer in [:data:`MIN_BITS`, :data:`MAX_BITS`], else a one-line ValueError."""
  if bits is None:
    return None
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{what} must be None (full-precision activations) or an integer in "
                     f"[{MIN_BITS}, {MAX_BITS}], got {bits!r:.60}.")
  return int(bits)


def quantize_activations(x: jax.Array, bits: int, axes: int | Sequence[int] = -1) -> jax.Array:
  """``x`` quantized to ``bits``-bit integers times one scale per token, with a straight-through gradient.

  Args:
    x: a layer's input (any float dtype; an integer input is treated as float32).
    bits: bits per value, in [2, 16] (8: BitNet's A8, codes in [-128, 127]).
    axes: the axes one scale covers (the ones the layer contracts, see the module
      docstring); every index of the other axes (a token, a pixel) has its own scale.

  Returns:
    ``clip(round(x * s), -2**(bits-1), 2**(bits-1) - 1) / s`` with
    ``s = (2**(bits-1) - 1) / max(|x| over axes).clip(min=1e-5)``, computed in float32
    at least and returned in ``x``'s dtype (float32 for an integer ``x``). Its gradient
    with respect to ``x`` is the identity (straight-through). A NaN or an infinity in a
    token makes that token's output NaN: nothing non-finite is hidden.
  """
  bits = check_activation_bits(bits, "quantize_activations: bits")
  if bits is None:
    raise ValueError("quantize_activations: bits must be an integer in [2, 16], got None.")
  x = jnp.asarray(x)
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)
  wide = x.astype(jnp.promote_types(out_dtype, jnp.float32))  # bf16/fp16 inputs: the arithmetic in float32
  top = 2.0 ** (bits - 1)
  absmax = jnp.max(jnp.abs(wide), axis=axes, keepdims=True)
  scale = (top - 1) / jnp.maximum(absmax, ABSMAX_FLOOR)  # max propagates NaN (jnp.maximum does too)
  y = jnp.clip(jnp.round(wide * scale), -top, top - 1) / scale
  return (wide + jax.lax.stop_gradient(y - wide)).astype(out_dtype)


def dense_input_axes() -> tuple[int, ...]:
  """``Dense``/``Linear`` ``(..., in)`` and ``Conv`` ``(..., *spatial, in)``: the last axis."""
  return (-1,)


def general_input_axes(axis: int | Sequence[int]) -> tuple[int, ...]:
  """``DenseGeneral``/``LinearGeneral``: the layer's ``axis`` (the input axes it contracts)."""
  return (axis,) if isinstance(axis, int) else tuple(axis)


def einsum_input_axes(einsum_str: str | None) -> tuple[int, ...]:
  """``Einsum``: the axes of the input (the first operand) whose letters the kernel (the second) also
  has and the output has not, i.e. the axes contracted with the kernel.

  Letters before a ``...`` count from the start, letters after it from the end, so the
  axes are known without the input's rank. Where the string does not say (no explicit
  ``->``, not two operands, a repeated input letter, or no letter contracted with the
  kernel) the last axis, as for a Dense layer.
  """
  spec = (einsum_str or "").replace(" ", "")
  operands, arrow, out = spec.partition("->")
  parts = operands.split(",")
  if not arrow or len(parts) != 2:
    return dense_input_axes()
  lhs, kernel = parts
  head, dots, tail = lhs.partition("...")
  letters = head + tail
  if "." in tail or len(set(letters)) != len(letters):
    return dense_input_axes()
  axes = tuple(i for i, c in enumerate(head) if c in kernel and c not in out)
  axes += tuple(i - len(tail) for i, c in enumerate(tail) if c in kernel and c not in out)
  return axes or dense_input_axes()


def quantize_layer_input(args: tuple, kwargs: dict, bits: int | None, axes: Sequence[int]) -> tuple[tuple, dict]:
  """A layer call's ``(args, kwargs)`` with its input (the first positional argument, or ``inputs=``)
  quantized by :func:`quantize_activations`; unchanged when ``bits`` is None or there is no input."""
  if bits is None:
    return args, kwargs
  if args:
    return (quantize_activations(args[0], bits, axes), *args[1:]), kwargs
  if "inputs" in kwargs:
    return args, {**kwargs, "inputs": quantize_activations(kwargs["inputs"], bits, axes)}
  return args, kwargs
