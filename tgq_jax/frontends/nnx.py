"""Ternary weights for Flax NNX models: :func:`ternarize_model`, :func:`set_mode`, :func:`pack`, TGA's update steps.

``ternarize_model(model, policy, x)`` turns the ``nnx.Linear``, ``nnx.Conv``,
``nnx.LinearGeneral`` and ``nnx.Einsum`` layers of any NNX model that the
:class:`~tgq_jax.core.policy.QuantPolicy` selects into ternary layers: the
full-precision kernel stays the layer's trained ``nnx.Param`` ``kernel``, and
each call runs the layer's own ``__call__`` on the kernel
:func:`tgq_jax.core.kernel.layer_kernel` gives (so bias, padding, strides,
feature groups, dtype promotion and a custom ``dot_general`` are the layer's
own code). The quantizer's parameters sit on the same layer under their names
(TGA: ``delta``, initialized to ``0.05 max|w|``; TTQ: ``pos_scale``, ``neg_scale``).
What a layer computes is the framework-neutral core's (:mod:`tgq_jax.core.kernel`),
the same as the Linen front end's.

Modes: each ternary layer's ``mode`` is a static attribute (part of the graph
definition, so ``nnx.jit``/``jax.jit`` trace each mode on its own), set for a
whole model by :func:`set_mode`: :data:`~tgq_jax.core.kernel.TRAIN` (default) or
:data:`~tgq_jax.core.kernel.THRESHOLD_PASS`, in which a TGA layer computes
``alpha * (x . q) + bias``: the same output and threshold gradient, and no
gradient (nor its cost) for the kernels.

Packed inference: :func:`pack` (or ``ternarize_model`` with ``QuantPolicy("packed:...")``)
replaces each ternary layer's float kernel and quantizer parameters by
``codes`` (``uint8``, 2-bit planar: :mod:`tgq_jax.core.packing`), ``scale``
(and TTQ's ``neg_scale``), :class:`Packed` variables; the layer rebuilds its
ternary kernel from them inside each call and computes what the trained layer does.

TGA's thresholds are :class:`Threshold` variables, not ``nnx.Param``, so
:func:`param_labels` tells them from the weights. The model trains with TGA's
one update, :class:`tgq_jax.training.tga.TGA` (He & Fan 2019, Fig. 1: a gradient
for the thresholds, a threshold step, then a gradient for the weights at the
updated thresholds and a weight step), through ``nnx.split``/``nnx.merge``:
:func:`loss_of_params` makes the model a loss of its parameters, and
:func:`train_step` is that update applied to the model in place.

Example (``MyNet`` is any NNX model, ``x, y`` a batch)::

  import optax, tgq_jax.frontends.nnx as tnnx
  from flax import nnx
  from tgq_jax.core.policy import QuantPolicy
  from tgq_jax.training.tga import TGA, threshold_optimizer

  model = tnnx.ternarize_model(MyNet(rngs=nnx.Rngs(0)), QuantPolicy("tga", ternary_last=False), x)
  # thresholds: gradient clipped to +-0.001 and Nesterov SGD, as the authors train them
  tga = TGA(threshold_optimizer(1e-4), optax.adam(1e-4), labels=tnnx.param_labels(model))
  opt_state = tga.init(tnnx.trainable_params(model))
  loss_fn = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  step = nnx.jit(tnnx.train_step, static_argnums=(0, 3))
  opt_state, info = step(tga, model, opt_state, loss_fn, x, y)  # info.loss, info.threshold_pass_loss

``ternarize_model`` changes the model in place (the layers' classes are
swapped, no weight is copied). To fine-tune a pretrained model, load its
full-precision weights first, then ternarize: the thresholds start from the
loaded kernels, as the authors re-initialize them.

``QuantPolicy.activation_bits``: each ternary layer quantizes its input per token
(:func:`tgq_jax.core.activations.quantize_activations` over :func:`input_axes`) before
its own ``__call__`` runs. ``QuantPolicy.embeddings``: ``nnx.Embed`` layers become
:class:`TernaryEmbed` (lookups and ``attend`` read the quantized ``embedding``).

Not yet for NNX: layers stacked by ``nnx.vmap``/``nnx.scan``; the Pallas
kernel for packed layers (they multiply by the rebuilt kernel).
"""
from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from tgq_jax.core.activations import (dense_input_axes, einsum_input_axes, general_input_axes,
                                      quantize_layer_input)
from tgq_jax.core.kernel import (MODES, THRESHOLD_PASS, TRAIN, KernelLayout, LayerKernel, check_coverage, check_mode,
                                 dense_layout, einsum_layout, finish_output, general_layout, layer_kernel, order_skips)
from tgq_jax.core.packing import after_input, pack_planar, packed_kernel
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.core.quantizers import PACKED_PREFIX, Quantizer, get_quantizer, packed_name
from tgq_jax.training.tga import THRESHOLD, TGA, WEIGHT, TGAOptState, UpdateInfo

__all__ = [
  "CANDIDATES",
  "EMBEDDINGS",
  "MODES",
  "THRESHOLD_PASS",
  "TRAIN",
  "TRAINABLE",
  "UNQUANTIZABLE",
  "Packed",
  "TernaryConv",
  "TernaryEinsum",
  "TernaryEmbed",
  "TernaryLayer",
  "TernaryLinear",
  "TernaryLinearGeneral",
  "Threshold",
  "input_axes",
  "kernel_layout",
  "loss_of_params",
  "output_axes",
  "pack",
  "param_labels",
  "set_mode",
  "ternarize_model",
  "train_step",
  "trainable_params",
]

#: The layer types whose kernels :func:`ternarize_model` can quantize (their subclasses too).
CANDIDATES: tuple[type, ...] = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)
#: Embedding tables: candidates under ``QuantPolicy(embeddings=True)``, else full precision (not reported).
EMBEDDINGS: tuple[type, ...] = (nnx.Embed,)
#: Layers with a kernel that no quantizer takes: reported by ``QuantPolicy.on_unquantized``.
UNQUANTIZABLE: tuple[type, ...] = (nnx.ConvTranspose,)


class Threshold(nnx.Variable):
  """A quantizer threshold (TGA's ``delta``), trained by the threshold optimizer.

  Deliberately not a subclass of ``nnx.Param``: ``wrt=nnx.Param`` selects the
  weights (and quantizer parameters that are not thresholds, such as TTQ's
  scales) without the thresholds, ``wrt=Threshold`` the thresholds alone, so
  the two optimizers of the sequential update never see each other's leaves.
  """


class Packed(nnx.Variable):
  """A packed layer's ``codes`` (uint8, 2-bit planar), ``scale`` or ``neg_scale``: not trained."""


# --- the ternary layers --------------------------------------------------------


class _Standin:
  """Stands in for a layer's ``kernel`` (or held-back ``bias``) Variable during one call of a ternary layer.

  Reading it (``kernel[...]``, ``.value``, ``.get_value()``) gives the value the
  layer computes with; shape, dtype and metadata are the Variable's (a packed
  layer has none). It is never stored: the layer's attribute is the Variable
  again when the call returns.
  """

  __slots__ = ("_value", "_variable")

  def __init__(self, value: jax.Array, variable: nnx.Variable | None):
    object.__setattr__(self, "_value", value)
    object.__setattr__(self, "_variable", variable)

  def __getitem__(self, index):
    return self._value if index is ... else self._value[index]

  def get_value(self, **kwargs):
    return self[kwargs.get("index", ...)]

  @property
  def value(self) -> jax.Array:
    return self._value

  def __jax_array__(self) -> jax.Array:
    return self._value

  @property
  def shape(self):
    return self._value.shape

  @property
  def dtype(self):
    return self._value.dtype

  @property
  def ndim(self) -> int:
    return self._value.ndim

  def __getattr__(self, name: str):
    return getattr(self._variable, name)  # Variable metadata (sharding, ...)

  def __setitem__(self, index, value):
    raise RuntimeError("a ternary layer's kernel cannot be written while the layer runs: it is the "
                       "quantized kernel there (write layer.kernel outside the call).")

  __setattr__ = __setitem__


_MISSING = object()


class TernaryLayer(nnx.Module):
  """Mixin that makes a candidate layer ternary (``TernaryLinear`` is ``(TernaryLayer, nnx.Linear)``).

  An ``nnx.Module`` itself only so that a layer's class can be swapped for the
  ternary one in place (Python refuses ``__class__`` assignment when a mixin
  outside the Module hierarchy changes the object layout); never made on its own.

  Attributes set by :func:`ternarize_model` (static ones are part of the graph definition):
    quantizer: the layer's :class:`~tgq_jax.core.quantizers.Quantizer` (static; per-channel
      statistics, if any, over the kernel's output-feature axes: :func:`kernel_layout`).
    mode: :data:`~tgq_jax.core.kernel.TRAIN` or :data:`~tgq_jax.core.kernel.THRESHOLD_PASS` (static;
      :func:`set_mode`).
    activation_bits: None or the bits the layer's input is quantized to per token
      (static; ``QuantPolicy.activation_bits``, over :func:`input_axes`); never set on an Embed.
    <name> for each of ``quantizer.param_names``: a :class:`Threshold`
      (``quantizer.threshold_params``) or an ``nnx.Param`` (the others).
    Packed layers (:func:`pack`): no ``kernel`` and no quantizer parameters, but ``codes``,
      ``scale`` (``neg_scale``) :class:`Packed` variables and the static ``packed_shape``.

  ``__call__`` is the layer class's own, with ``self.kernel`` reading as the
  kernel :func:`~tgq_jax.core.kernel.layer_kernel` gives for the call (in the
  threshold pass also ``self.bias`` as zeros, the bias added after the output
  scale). The attributes are swapped, not the Variables' values: nothing is
  written to any Variable, so the stored kernel stays the full-precision one under
  ``nnx.jit``/``nnx.grad`` and also under plain ``jax`` transforms, which forbid
  writing Variables from an inner trace. (A swapped attribute means a layer must
  not run in two Python threads at once; NNX modules with state do not support that either.)
  An Embed's kernel is its ``embedding`` table (:attr:`kernel_name`), read by ``__call__`` and ``attend``.
  """

  #: The attribute holding the layer's float kernel.
  kernel_name = "kernel"

  def quantizer_params(self) -> dict[str, jax.Array]:
    """The quantizer's parameters as arrays (``{"delta": ...}`` for TGA)."""
    return {name: getattr(self, name)[...] for name in self.quantizer.param_names}

  def quantized_kernel(self) -> jax.Array:
    """The kernel the layer computes with in TRAIN mode (differentiable in the kernel and the
    quantizer's parameters; for a packed layer, rebuilt from its codes and scales)."""
    return self._layer_kernel(TRAIN, None, None).kernel

  def _layer_kernel(self, mode: str, inputs, einsum_str: str | None) -> LayerKernel:
    if self.quantizer.packed:
      neg = self.neg_scale[...] if not self.quantizer.symmetric else None
      codes = after_input(self.codes[...], inputs)
      return LayerKernel(packed_kernel(codes, self.scale[...], neg, self.packed_shape, self.quantizer.per_channel,
                                       self.param_dtype), None)
    # Only the threshold pass reads the layout; an Embed's output takes no scale there (attend's has the rows).
    layout = kernel_layout(self, einsum_str) if mode == THRESHOLD_PASS and self.kernel_name == "kernel" else None
    return layer_kernel(self.quantizer, mode, getattr(self, self.kernel_name)[...], self.quantizer_params(), layout)

  def __call__(self, *args, **kwargs):
    return self._run(super().__call__, args, kwargs)

  def _run(self, method: Callable, args: tuple, kwargs: dict):
    """``method(*args, **kwargs)`` (the layer class's own) computing with the quantized kernel."""
    kernel = vars(self).get(self.kernel_name, _MISSING)
    if isinstance(kernel, _Standin):  # re-entered from inside its own call: already quantized
      return method(*args, **kwargs)
    einsum_str = None
    if isinstance(self, nnx.Einsum):
      einsum_str = _checked_einsum_call(self, args, kwargs)
    if self.kernel_name == "kernel":  # a lookup has no matmul input: never an Embed's
      args, kwargs = quantize_layer_input(args, kwargs, getattr(self, "activation_bits", None),
                                          input_axes(self, einsum_str))
    used = self._layer_kernel(check_mode(self.mode), args[0] if args else kwargs.get("inputs"), einsum_str)
    swaps = {self.kernel_name: _Standin(used.kernel, None if kernel is _MISSING else kernel)}
    bias = vars(self).get("bias")
    held_bias = None
    if used.output_scale is not None and isinstance(bias, nnx.Variable):
      held_bias = bias[...]  # added after the output scale (finish_output)
      swaps["bias"] = _Standin(jnp.zeros_like(held_bias), bias)
    saved = {name: vars(self).get(name, _MISSING) for name in swaps}
    # object.__setattr__, not Module.__setattr__: the latter refuses writes from an inner trace
    # level (a jax.jit or jax.grad closing over the model). Restored in `finally` whatever happens.
    for name, value in swaps.items():
      object.__setattr__(self, name, value)
    try:
      y = method(*args, **kwargs)
    finally:
      for name, value in saved.items():
        if value is _MISSING:
          object.__delattr__(self, name)
        else:
          object.__setattr__(self, name, value)
    return finish_output(y, used.output_scale, held_bias)


class TernaryLinear(TernaryLayer, nnx.Linear):
  """``nnx.Linear`` with a quantized kernel (made by :func:`ternarize_model`)."""


class TernaryConv(TernaryLayer, nnx.Conv):
  """``nnx.Conv`` with a quantized kernel (made by :func:`ternarize_model`)."""


class TernaryLinearGeneral(TernaryLayer, nnx.LinearGeneral):
  """``nnx.LinearGeneral`` with a quantized kernel (made by :func:`ternarize_model`)."""


class TernaryEinsum(TernaryLayer, nnx.Einsum):
  """``nnx.Einsum`` with a quantized kernel (made by :func:`ternarize_model`)."""


class TernaryEmbed(TernaryLayer, nnx.Embed):
  """``nnx.Embed`` with a quantized table (``QuantPolicy(embeddings=True)``): lookups and ``attend`` both
  read the quantized ``embedding``."""

  kernel_name = "embedding"

  def attend(self, *args, **kwargs):
    return self._run(super().attend, args, kwargs)


_TERNARY: dict[type, type] = {nnx.Linear: TernaryLinear, nnx.Conv: TernaryConv,
                              nnx.LinearGeneral: TernaryLinearGeneral, nnx.Einsum: TernaryEinsum,
                              nnx.Embed: TernaryEmbed}


def _ternary_class(cls: type) -> type:
  """The ternary class of a candidate class; a user's subclass of ``nnx.Linear`` etc. gets its
  own, made once (its ``__call__`` then runs with the quantized kernel, as the base's does)."""
  if cls not in _TERNARY:
    base = TernaryEmbed if issubclass(cls, nnx.Embed) else TernaryLayer  # an Embed's kernel is its table
    _TERNARY[cls] = type(f"Ternary{cls.__name__}", (base, cls), {"__module__": __name__})
  return _TERNARY[cls]


def _kernel_ndim(layer: nnx.Module) -> int:
  """The kernel rank the layer's own configuration implies (a stacked layer has more)."""
  if isinstance(layer, nnx.LinearGeneral):
    return len(layer.batch_axis) + len(layer.in_features) + len(layer.out_features)
  if isinstance(layer, (nnx.Conv, nnx.Einsum)):
    return len(layer.kernel_shape)
  return 2  # Linear (in, out), Embed (num_embeddings, features)


def kernel_layout(layer: nnx.Module, einsum_str: str | None = None) -> KernelLayout:
  """The :class:`~tgq_jax.core.kernel.KernelLayout` of a candidate layer's kernel.

  ``Linear`` ``(in, out)`` and ``Conv`` ``(*window, in, out)``: the last axis.
  ``LinearGeneral`` ``(*batch, *in, *out)``: its ``out_features`` axes and its
  ``batch_axis`` axes. ``Einsum``: the kernel axes whose letters appear in the
  output of ``einsum_str`` (default: the layer's own). ``Embed`` ``(num_embeddings,
  features)``: the features axis, the last.
  """
  ndim = _kernel_ndim(layer)
  if isinstance(layer, nnx.Einsum):
    spec = einsum_str or layer.einsum_str
    if spec is None:
      raise ValueError("an nnx.Einsum without its own einsum_str: its kernel's output axes are unknown "
                       "until it is called (give the layer its einsum_str for per-channel statistics).")
    return einsum_layout(spec)
  if isinstance(layer, nnx.LinearGeneral):
    return general_layout(ndim, len(layer.out_features), len(layer.batch_axis))
  return dense_layout(ndim)


def input_axes(layer: nnx.Module, einsum_str: str | None = None) -> tuple[int, ...]:
  """The axes of a candidate layer's input that it contracts with its kernel (one activation scale per
  index of the others, :mod:`tgq_jax.core.activations`): the last for ``Linear`` and ``Conv``, ``axis``
  for ``LinearGeneral``, the contracted letters of ``einsum_str`` (default: the layer's own) for ``Einsum``."""
  if isinstance(layer, nnx.Einsum):
    return einsum_input_axes(einsum_str or layer.einsum_str)
  if isinstance(layer, nnx.LinearGeneral):
    return general_input_axes(layer.axis)
  return dense_input_axes()


def output_axes(layer: nnx.Module) -> tuple[int, ...]:
  """The kernel axes of a candidate layer that index its output features (:func:`kernel_layout`)."""
  return kernel_layout(layer).output_axes


def _checked_einsum_call(layer: nnx.Einsum, args, kwargs) -> str | None:
  """The einsum string of this call; per-channel thresholds were shaped for the constructor's."""
  call_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
  if call_str is None or layer.quantizer.per_channel in (False, None, ()):
    return call_str
  if einsum_layout(call_str).output_axes != kernel_layout(layer).output_axes:
    raise ValueError(f"ternary Einsum: the call's einsum_str {call_str!r} has other output axes than "
                     f"{layer.einsum_str!r}, for which its per-channel thresholds were made.")
  return call_str


def set_mode(model: nnx.Module, mode: str) -> nnx.Module:
  """Sets the mode of every ternary layer of ``model`` in place; returns ``model``.

  The mode is a static attribute of each layer (part of ``nnx.split``'s graph
  definition), so a function compiled by ``nnx.jit`` (or ``jax.jit`` over
  ``nnx.split``'s parts) traces each mode separately: it cannot reuse one mode's
  trace for the other. It may be called inside ``nnx.jit`` (or a ``jax`` transform
  closing over the model), e.g. around the threshold pass of a training step.

  Args:
    model: an NNX model with ternary layers (:func:`ternarize_model`).
    mode: :data:`~tgq_jax.core.kernel.TRAIN` or :data:`~tgq_jax.core.kernel.THRESHOLD_PASS`.
  """
  check_mode(mode)
  for _, node in nnx.iter_graph(model, graph=True):
    if isinstance(node, TernaryLayer):
      # object.__setattr__: a static string (never a tracer), so it may also be set from inside a
      # jax.jit / jax.grad closing over the model, where Module.__setattr__ refuses any write.
      object.__setattr__(node, "mode", mode)
  return model


# --- selecting the layers ------------------------------------------------------

_CALLS: contextvars.ContextVar = contextvars.ContextVar("tgq_nnx_calls", default=None)
_RECORDING: dict[type, type] = {}


class _Recording(nnx.Module):
  """Mixin for one abstract run: appends the layer's index to the active call list (it only
  observes the call order; what the layer computes does not depend on it).

  A Module for the same reason as :class:`TernaryLayer`.
  """

  def __call__(self, *args, **kwargs):
    self._record()
    return super().__call__(*args, **kwargs)

  def attend(self, *args, **kwargs):  # an Embed's other use of its table (only an Embed has it)
    self._record()
    return super().attend(*args, **kwargs)

  def _record(self):
    calls = _CALLS.get()
    if calls is not None:
      calls.append(vars(self)["_tgq_call_index"])


def _recording_class(cls: type) -> type:
  if cls not in _RECORDING:
    _RECORDING[cls] = type(f"_Recording{cls.__name__}", (_Recording, cls), {"__module__": __name__})
  return _RECORDING[cls]


def _call_order(model: nnx.Module, layers: Sequence[nnx.Module], args, kwargs) -> list[int]:
  """Indices into ``layers`` in the order of their first call in ``model(*args, **kwargs)``.

  The model runs once under ``nnx.eval_shape`` (shapes only; the model's state,
  BatchNorm statistics and RNG counters included, is not changed). The layers'
  classes are swapped for recording subclasses meanwhile; an index attribute
  tells the copies ``nnx.eval_shape`` makes which layer they are.
  """
  leaves, treedef = jax.tree.flatten((args, kwargs))
  # Arrays become abstract; anything else (train=True, a string) reaches the model as is.
  is_array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]
  arrays = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x, array in zip(leaves, is_array) if array]

  def run(m, arrays):
    it = iter(arrays)
    a, k = jax.tree.unflatten(treedef, [next(it) if array else x for x, array in zip(leaves, is_array)])
    m(*a, **k)  # the output is not needed (and need not be made of arrays)

  classes = [type(layer) for layer in layers]
  calls: list[int] = []
  token = _CALLS.set(calls)
  try:
    for i, layer in enumerate(layers):
      layer.__class__ = _recording_class(classes[i])
      object.__setattr__(layer, "_tgq_call_index", i)  # not a Pytree node name: a static attribute
    nnx.eval_shape(run, model, arrays, graph=True)
  finally:
    _CALLS.reset(token)
    for layer, cls in zip(layers, classes):
      layer.__class__ = cls
      vars(layer).pop("_tgq_call_index", None)
  return list(dict.fromkeys(calls))


def _path(keys: tuple) -> str:
  return "/".join(str(k) for k in keys)


def _unpacked(policy: QuantPolicy) -> QuantPolicy:
  return dataclasses.replace(policy, quantizer=policy.quantizer[len(PACKED_PREFIX):]) if policy.packed else policy


def ternarize_model(model: nnx.Module, policy: QuantPolicy | None = None, *example_args, **example_kwargs
                    ) -> nnx.Module:
  """Makes the layers of ``model`` that ``policy`` selects ternary; modifies ``model`` in place and returns it.

  Every ``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral`` and ``nnx.Einsum``
  (or subclass) in the model whose ``"/"``-joined path below ``model`` (``"blocks/0/attn/query"``,
  list indices as numbers) ``policy.matches`` becomes a ternary layer (:class:`TernaryLayer`):
  the same object, with its class swapped for the ternary subclass, so every reference to
  it (a parent's attribute, a list entry, a layer shared by two parents, the caller's
  own variable) sees the ternary layer, and no weight is copied. Its ``kernel`` stays the
  full-precision ``nnx.Param``; the quantizer's parameters are added beside it, initialized
  by ``quantizer.init(kernel)`` (TGA: ``delta = 0.05 max|w|``, a :class:`Threshold`). Keep a
  plain copy with ``nnx.clone(model)`` beforehand if you need one. Layers start in
  :data:`~tgq_jax.core.kernel.TRAIN` mode (:func:`set_mode`).

  Args:
    model: an ``nnx.Module``.
    policy: quantizer, per-channel statistics (over each layer's :func:`kernel_layout` axes),
      include/exclude patterns, first/last layer, compute dtype (``policy.dtype``
      becomes the quantized layers' ``dtype``), what to do about layers left out
      (``policy.on_unquantized``). Default ``QuantPolicy()``: TGA on every candidate
      layer, per tensor. A packed quantizer (``"packed:tga"``) ternarizes the layers
      with their initial thresholds, then :func:`pack`s them.
    *example_args, **example_kwargs: a call of ``model`` (arrays or
      ``jax.ShapeDtypeStruct``; other values are passed as they are), needed when
      ``policy.ternary_first`` or ``policy.ternary_last`` is False: the first / last
      *matched* layer in call order is then left full precision. The model runs once
      abstractly (``nnx.eval_shape``: no computation, no state change). Layers that this
      call does not reach are quantized if they match.

  Returns:
    ``model`` itself.

  Raises:
    ValueError: first or last layer to be excluded but no example call given; a model
      that already has ternary layers; a layer attribute named like a quantizer parameter;
      layers or patterns left out under ``QuantPolicy(on_unquantized="error")``.
    NotImplementedError: a stacked layer (made by ``nnx.vmap``/``nnx.scan``, kernel with a
      leading layer axis).
  """
  policy = QuantPolicy() if policy is None else policy
  if not isinstance(policy, QuantPolicy):
    raise TypeError(f"ternarize_model: policy must be a tgq_jax.core.policy.QuantPolicy, got {type(policy).__name__} "
                    "(example inputs come after the policy: ternarize_model(model, policy, x)).")
  if not isinstance(model, nnx.Module):
    raise TypeError(f"ternarize_model takes a flax.nnx Module, got {type(model).__name__} "
                    "(for flax.linen models use the Linen ternarize_model).")
  needs_order = not (policy.ternary_first and policy.ternary_last)
  if needs_order and not (example_args or example_kwargs):
    raise ValueError("ternarize_model: policy.ternary_first / ternary_last = False needs an example call "
                     "to find the first / last layer in call order: ternarize_model(model, policy, x) "
                     "with x an input (or jax.ShapeDtypeStruct) of model.")

  matched: list[tuple[str, nnx.Module]] = []
  candidates: list[str] = []
  unquantizable: dict[str, str] = {}
  for keys, node in nnx.iter_graph(model, graph=True):  # a shared layer is visited once, at its first path
    if isinstance(node, TernaryLayer):
      raise ValueError(f"ternarize_model: layer {_path(keys)!r} is ternary already; ternarize a plain model.")
    if isinstance(node, CANDIDATES) or (policy.embeddings and isinstance(node, EMBEDDINGS)):
      candidates.append(_path(keys))
      if policy.matches(_path(keys)):
        matched.append((_path(keys), node))
    elif isinstance(node, UNQUANTIZABLE) and policy.matches(_path(keys)):
      unquantizable[_path(keys)] = f"{type(node).__module__}.{type(node).__name__}"
  check_coverage(policy, candidates, unquantizable)

  skipped: set[int] = set()
  if needs_order and matched:
    order = _call_order(model, [layer for _, layer in matched], example_args, example_kwargs)
    skipped = order_skips(order, policy.ternary_first, policy.ternary_last)

  # Everything is checked and initialized before the first layer changes: an error leaves the model as it was.
  float_policy = _unpacked(policy)
  plans = []
  for i, (path, layer) in enumerate(matched):
    if i in skipped:
      continue
    kernel_name = "embedding" if isinstance(layer, EMBEDDINGS) else "kernel"
    kernel = vars(layer).get(kernel_name)
    if not isinstance(kernel, nnx.Variable):
      raise TypeError(f"layer {path!r}: expected its kernel as an nnx.Variable attribute {kernel_name!r}, "
                      f"got {type(kernel).__name__}.")
    if kernel.ndim != _kernel_ndim(layer):
      raise NotImplementedError(f"layer {path!r}: kernel of shape {kernel.shape} has more axes than a "
                                f"{type(layer).__name__} of its configuration: a stacked layer "
                                "(nnx.vmap / nnx.scan over layers) cannot be ternarized yet.")
    quantizer: Quantizer = float_policy.layer_quantizer(kernel_layout(layer).output_axes if policy.per_channel else ())
    for name in ("quantizer", "mode", "activation_bits", *quantizer.param_names):
      if name in vars(layer):
        raise ValueError(f"layer {path!r} already has an attribute {name!r}.")
    init = quantizer.init(kernel[...])
    variables = {name: (Threshold if name in quantizer.threshold_params else nnx.Param)(init[name])
                 for name in quantizer.param_names}
    plans.append((layer, quantizer, variables))

  for layer, quantizer, variables in plans:
    layer.__class__ = _ternary_class(type(layer))
    layer.quantizer = quantizer  # static: part of the graph definition, as the layer's other settings
    layer.mode = TRAIN  # static too: set_mode
    layer.activation_bits = None if isinstance(layer, EMBEDDINGS) else policy.activation_bits  # static
    for name, variable in variables.items():
      setattr(layer, name, variable)
    if policy.dtype is not None:
      layer.dtype = policy.dtype
  return pack(model) if policy.packed else model


def pack(model: nnx.Module) -> nnx.Module:
  """Replaces, in place, each ternary layer's float kernel by its 2-bit codes and scales; returns ``model``.

  For every :class:`TernaryLayer` with a ternary quantizer (``"fp"`` layers stay as
  they are): the codes and scales of ``quantizer.parts(kernel, qparams)`` become
  :class:`Packed` variables ``codes`` (``uint8 (ceil(K/4), N)``, the planar layout of
  :mod:`tgq_jax.core.packing` over the kernel seen as ``(prod(shape[:-1]), shape[-1])``),
  ``scale`` and, for TTQ, ``neg_scale`` (the quantizer's statistic shape); the kernel and
  the quantizer's parameters are removed, the quantizer becomes its ``"packed:"`` form
  and the static ``packed_shape`` keeps the kernel's shape. Each call rebuilds the kernel
  (in ``param_dtype``) from them: the values the layer computed with before, so the
  model's outputs are the ternary model's. Runs eagerly (the codes are packed on the host).
  """
  plans = []
  for _, layer in nnx.iter_graph(model, graph=True):
    if not isinstance(layer, TernaryLayer) or layer.quantizer.packed or not layer.quantizer.ternary:
      continue
    quantizer = layer.quantizer
    kernel = getattr(layer, layer.kernel_name)[...]
    parts = quantizer.parts(kernel, layer.quantizer_params())
    packed = {"codes": jnp.asarray(pack_planar(np.asarray(parts.codes))), "scale": parts.scale}
    if not quantizer.symmetric:
      packed["neg_scale"] = parts.neg_scale
    plans.append((layer, get_quantizer(packed_name(quantizer.name), per_channel=quantizer.per_channel),
                  tuple(kernel.shape), packed))
  for layer, quantizer, shape, packed in plans:
    for name in (layer.kernel_name, *layer.quantizer.param_names):
      delattr(layer, name)
    layer.quantizer = quantizer
    layer.packed_shape = shape
    for name, value in packed.items():
      setattr(layer, name, Packed(jnp.asarray(value, jnp.float32) if name != "codes" else value))
  return model


# --- training with TGA's update (tgq_jax.training.tga) -------------------------------

#: The variables TGA trains: the weights (``nnx.Param``: kernels, biases, BatchNorm scales, TTQ's
#: scales...) and the thresholds (:class:`Threshold`). Everything else (BatchNorm statistics, RNG
#: counters) is the model's state, which a pass may change but no optimizer steps.
TRAINABLE = nnx.Any(nnx.Param, Threshold)


def trainable_params(model: nnx.Module, wrt: Any = TRAINABLE) -> dict:
  """The variables ``wrt`` selects as a pure dict of arrays: the ``params`` of :meth:`TGA.update`."""
  return nnx.to_pure_dict(nnx.state(model, wrt))


def param_labels(model: nnx.Module, wrt: Any = TRAINABLE) -> dict:
  """``THRESHOLD`` for each :class:`Threshold` of :func:`trainable_params`, ``WEIGHT`` for the rest:
  the ``labels`` of :class:`~tgq_jax.training.tga.TGA`."""
  thresholds = set(traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.All(wrt, Threshold)))))
  flat = traverse_util.flatten_dict(trainable_params(model, wrt))
  return traverse_util.unflatten_dict({k: THRESHOLD if k in thresholds else WEIGHT for k in flat})


def _model_for_pass(model: nnx.Module, threshold_pass: bool) -> nnx.Module:
  """The model as one pass of the update runs it: in the threshold pass its TGA layers in the THRESHOLD_PASS
  mode (the output scaled instead of the kernel: the same threshold gradients, no kernel gradient computed).
  ``model`` is the pass's own merged copy, so setting the mode (a static attribute) changes nothing else."""
  return set_mode(model, THRESHOLD_PASS) if threshold_pass else model


def loss_of_params(model: nnx.Module, loss_fn: Callable[..., Any], *batch, wrt: Any = TRAINABLE,
                   has_aux: bool = False) -> tuple[Callable, dict, nnx.State]:
  """``model`` split for :meth:`TGA.update_with_state <tgq_jax.training.tga.TGA.update_with_state>`:
  ``(loss, params, model_state)``.

  ``params`` is :func:`trainable_params` (a pure dict), ``model_state`` the model's other
  variables (BatchNorm statistics, RNG counters; an ``nnx.State``), and
  ``loss(params, model_state, threshold_pass) -> (value, (aux, new_model_state))`` runs
  ``loss_fn(m, *batch)`` (a scalar; ``(scalar, aux)`` with ``has_aux``) on
  ``m = nnx.merge(graphdef, params, model_state)`` and returns the state the run left in ``m``.
  ``model`` itself is not changed: write the update back with
  ``nnx.update(model, new_params, new_model_state)`` (as :func:`train_step` does).
  """
  graphdef, params, model_state = nnx.split(model, wrt, ...)

  def loss(params, model_state, threshold_pass):
    # copy: fresh Variables of this trace level, which the run may write (BatchNorm statistics, RNG counts).
    m = _model_for_pass(nnx.merge(graphdef, params, model_state, copy=True), threshold_pass)
    out = loss_fn(m, *batch)
    value, aux = out if has_aux else (out, None)
    return value, (aux, nnx.state(m, nnx.Not(wrt)))

  return loss, nnx.to_pure_dict(params), model_state


def train_step(tga: TGA, model: nnx.Module, opt_state: TGAOptState, loss_fn: Callable[..., Any], *batch,
               wrt: Any = TRAINABLE, has_aux: bool = False, state_through_both_passes: bool = False,
               axis_name: str | None = None) -> tuple[TGAOptState, UpdateInfo]:
  """One :class:`~tgq_jax.training.tga.TGA` update of ``model`` (in place) for ``loss_fn(model, *batch)``.

  The model goes through ``tga.update_with_state`` by :func:`loss_of_params`; the new
  parameters and the model state of the pass the weight gradient came from are
  written back. Both passes of a sequential update start from the model's state, so
  they draw the same dropout masks and the BatchNorm running statistics move once
  per step; with ``state_through_both_passes`` the second pass starts from the
  first pass's state (the authors' code: the statistics move in both passes, and
  the second pass draws new masks). ``tga``'s labels are :func:`param_labels` of
  the model (same ``wrt``); ``opt_state`` is ``tga.init(trainable_params(model))``.
  Compile it with ``nnx.jit(train_step, static_argnums=(0, 3))``.

  ``axis_name``: the mapped data axis to average the gradients over (inside
  ``jax.shard_map``); the model state is written back as this device computed it.

  Returns ``(new opt_state, UpdateInfo)`` (``info.loss``, ``info.threshold_pass_loss``,
  ``info.grad_norm``, ``info.aux``: ``loss_fn``'s aux with ``has_aux``, else None).
  """
  loss, params, model_state = loss_of_params(model, loss_fn, *batch, wrt=wrt, has_aux=has_aux)
  params, model_state, opt_state, info = tga.update_with_state(
    loss, params, model_state, opt_state, axis_name=axis_name, state_through_both_passes=state_through_both_passes)
  nnx.update(model, params, model_state)
  return opt_state, info
