"""Ternary weights for Flax NNX models: :func:`ternarize_model`, :class:`Threshold`, TGA's update steps.

``ternarize_model(model, policy, x)`` turns the ``nnx.Linear``, ``nnx.Conv``,
``nnx.LinearGeneral`` and ``nnx.Einsum`` layers of any NNX model that the
:class:`~tgq_jax.core.policy.QuantPolicy` selects into ternary layers: the
full-precision kernel stays the layer's trained ``nnx.Param`` ``kernel``, and
each call runs the layer's own ``__call__`` on the quantized kernel (so bias,
padding, strides, feature groups, dtype promotion and a custom
``dot_general`` are the layer's own code). The quantizer's parameters sit on
the same layer under their names (TGA: ``delta``, initialized to
``0.05 max|w|``; TTQ: ``pos_scale``, ``neg_scale``).

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

Not yet for NNX: packed (2-bit inference) layers; layers stacked by
``nnx.vmap``/``nnx.scan``; and the Linen layers' cheaper threshold pass: here
pass 1 runs a full backward pass (see ``_model_for_pass``).
"""
from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx, traverse_util

from tgq_jax.core.policy import QuantPolicy
from tgq_jax.core.quantizers import Quantizer
from tgq_jax.training.tga import THRESHOLD, TGA, WEIGHT, TGAOptState, UpdateInfo

__all__ = [
  "CANDIDATES",
  "TRAINABLE",
  "TernaryConv",
  "TernaryEinsum",
  "TernaryLayer",
  "TernaryLinear",
  "TernaryLinearGeneral",
  "Threshold",
  "loss_of_params",
  "output_axes",
  "param_labels",
  "ternarize_model",
  "train_step",
  "trainable_params",
]

#: The layer types whose kernels :func:`ternarize_model` can quantize (their subclasses too).
CANDIDATES: tuple[type, ...] = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)


class Threshold(nnx.Variable):
  """A quantizer threshold (TGA's ``delta``), trained by the threshold optimizer.

  Deliberately not a subclass of ``nnx.Param``: ``wrt=nnx.Param`` selects the
  weights (and quantizer parameters that are not thresholds, such as TTQ's
  scales) without the thresholds, ``wrt=Threshold`` the thresholds alone, so
  the two optimizers of the sequential update never see each other's leaves.
  """


# --- the ternary layers --------------------------------------------------------


class _QuantizedKernel:
  """Stands in for a layer's ``kernel`` Variable during one call of a ternary layer.

  Reading it (``kernel[...]``, ``.value``, ``.get_value()``) gives the
  quantized kernel; shape, dtype and metadata are the Variable's. It is never
  stored: the layer's attribute is the ``nnx.Param`` again when the call returns.
  """

  __slots__ = ("_value", "_variable")

  def __init__(self, value: jax.Array, variable: nnx.Variable):
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


class TernaryLayer(nnx.Module):
  """Mixin that makes a candidate layer ternary (``TernaryLinear`` is ``(TernaryLayer, nnx.Linear)``).

  An ``nnx.Module`` itself only so that a layer's class can be swapped for the
  ternary one in place (Python refuses ``__class__`` assignment when a mixin
  outside the Module hierarchy changes the object layout); never made on its own.

  Attributes set by :func:`ternarize_model`:
    quantizer: the layer's :class:`~tgq_jax.core.quantizers.Quantizer` (per-channel
      statistics, if any, over the kernel's output-feature axes; see :func:`output_axes`).
    <name> for each of ``quantizer.param_names``: a :class:`Threshold`
      (``quantizer.threshold_params``) or an ``nnx.Param`` (the others).

  ``__call__`` is the layer class's own, with ``self.kernel`` reading as the
  quantized kernel for the duration of the call. The attribute is swapped, not
  the Variable's value: nothing is written to any Variable, so the stored
  kernel stays the full-precision one under ``nnx.jit``/``nnx.grad`` and also
  under plain ``jax`` transforms, which forbid writing Variables from an inner
  trace. (A swapped attribute means a layer must not run in two Python
  threads at once; NNX modules with state do not support that either.)
  """

  def quantizer_params(self) -> dict[str, jax.Array]:
    """The quantizer's parameters as arrays (``{"delta": ...}`` for TGA)."""
    return {name: getattr(self, name)[...] for name in self.quantizer.param_names}

  def quantized_kernel(self) -> jax.Array:
    """The kernel the layer computes with (differentiable in the kernel and the quantizer's parameters)."""
    kernel = vars(self)["kernel"]
    if isinstance(kernel, _QuantizedKernel):
      return kernel.value
    return self.quantizer(kernel[...], self.quantizer_params())

  def __call__(self, *args, **kwargs):
    kernel = vars(self)["kernel"]
    if isinstance(kernel, _QuantizedKernel):  # re-entered from inside its own call: already quantized
      return super().__call__(*args, **kwargs)
    if isinstance(self, nnx.Einsum):
      _check_einsum_call(self, args, kwargs)
    # object.__setattr__, not Module.__setattr__: the latter refuses writes from an inner trace
    # level (a jax.jit or jax.grad closing over the model). Restored in `finally` whatever happens.
    object.__setattr__(self, "kernel", _QuantizedKernel(self.quantized_kernel(), kernel))
    try:
      return super().__call__(*args, **kwargs)
    finally:
      object.__setattr__(self, "kernel", kernel)


class TernaryLinear(TernaryLayer, nnx.Linear):
  """``nnx.Linear`` with a quantized kernel (made by :func:`ternarize_model`)."""


class TernaryConv(TernaryLayer, nnx.Conv):
  """``nnx.Conv`` with a quantized kernel (made by :func:`ternarize_model`)."""


class TernaryLinearGeneral(TernaryLayer, nnx.LinearGeneral):
  """``nnx.LinearGeneral`` with a quantized kernel (made by :func:`ternarize_model`)."""


class TernaryEinsum(TernaryLayer, nnx.Einsum):
  """``nnx.Einsum`` with a quantized kernel (made by :func:`ternarize_model`)."""


_TERNARY: dict[type, type] = {nnx.Linear: TernaryLinear, nnx.Conv: TernaryConv,
                              nnx.LinearGeneral: TernaryLinearGeneral, nnx.Einsum: TernaryEinsum}


def _ternary_class(cls: type) -> type:
  """The ternary class of a candidate class; a user's subclass of ``nnx.Linear`` etc. gets its
  own, made once (its ``__call__`` then runs with the quantized kernel, as the base's does)."""
  if cls not in _TERNARY:
    _TERNARY[cls] = type(f"Ternary{cls.__name__}", (TernaryLayer, cls), {"__module__": __name__})
  return _TERNARY[cls]


def _einsum_output_axes(einsum_str: str) -> tuple[int, ...]:
  operands, out = einsum_str.replace(" ", "").split("->")
  kernel = operands.split(",")[1]
  if "." in kernel:
    raise NotImplementedError(f"Einsum {einsum_str!r}: per-channel statistics need the kernel's axes "
                              "spelled out (no '...' in the kernel operand).")
  return tuple(i for i, letter in enumerate(kernel) if letter in out)


def output_axes(layer: nnx.Module) -> tuple[int, ...]:
  """The kernel axes of a candidate layer that index its output features.

  Per-channel statistics keep one threshold and scale per index of these
  axes. ``Linear`` ``(in, out)`` and ``Conv`` ``(*window, in, out)``: the last
  axis. ``LinearGeneral`` ``(*batch, *in, *out)``: its ``out_features`` axes
  (the trailing ones) and its ``batch_axis`` axes (each batch entry is a
  kernel of its own). ``Einsum``: the kernel axes whose letters appear in
  the output of its ``einsum_str``.
  """
  ndim = vars(layer)["kernel"].ndim
  if isinstance(layer, nnx.Einsum):
    return _einsum_output_axes(layer.einsum_str)
  if isinstance(layer, nnx.LinearGeneral):
    n_out = len(layer.out_features)
    return tuple(range(len(layer.batch_axis))) + tuple(range(ndim - n_out, ndim))
  return (ndim - 1,)


def _check_einsum_call(layer: nnx.Einsum, args, kwargs) -> None:
  # Einsum accepts an einsum_str per call; per-channel thresholds were shaped for the constructor's.
  call_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
  per_channel = layer.quantizer.per_channel
  if call_str is None or per_channel in (False, None, ()):
    return
  if _einsum_output_axes(call_str) != _einsum_output_axes(layer.einsum_str):
    raise ValueError(f"ternary Einsum: the call's einsum_str {call_str!r} has other output axes than "
                     f"{layer.einsum_str!r}, for which its per-channel thresholds were made.")


def _kernel_ndim(layer: nnx.Module) -> int:
  """The kernel rank the layer's own configuration implies (a stacked layer has more)."""
  if isinstance(layer, nnx.LinearGeneral):
    return len(layer.batch_axis) + len(layer.in_features) + len(layer.out_features)
  if isinstance(layer, (nnx.Conv, nnx.Einsum)):
    return len(layer.kernel_shape)
  return 2


# --- selecting the layers ------------------------------------------------------

_CALLS: contextvars.ContextVar = contextvars.ContextVar("tgq_nnx_calls", default=None)
_RECORDING: dict[type, type] = {}


class _Recording(nnx.Module):
  """Mixin for one abstract run: appends the layer's index to the active call list.

  A Module for the same reason as :class:`TernaryLayer`.
  """

  def __call__(self, *args, **kwargs):
    calls = _CALLS.get()
    if calls is not None:
      calls.append(vars(self)["_tgq_call_index"])
    return super().__call__(*args, **kwargs)


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
  plain copy with ``nnx.clone(model)`` beforehand if you need one.

  Args:
    model: an ``nnx.Module``.
    policy: quantizer, per-channel statistics (over each layer's :func:`output_axes`),
      include/exclude patterns, first/last layer, compute dtype (``policy.dtype``
      becomes the quantized layers' ``dtype``). Default ``QuantPolicy()``: TGA on every
      candidate layer, per tensor.
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
      that already has ternary layers; a layer attribute named like a quantizer parameter.
    NotImplementedError: a packed quantizer (``"packed:..."``); a stacked layer (made by
      ``nnx.vmap``/``nnx.scan``, kernel with a leading layer axis).
  """
  policy = QuantPolicy() if policy is None else policy
  if not isinstance(policy, QuantPolicy):
    raise TypeError(f"ternarize_model: policy must be a tgq_jax.core.policy.QuantPolicy, got {type(policy).__name__} "
                    "(example inputs come after the policy: ternarize_model(model, policy, x)).")
  if not isinstance(model, nnx.Module):
    raise TypeError(f"ternarize_model takes a flax.nnx Module, got {type(model).__name__} "
                    "(for flax.linen models use the Linen ternarize_model).")
  if policy.packed:
    raise NotImplementedError(f"quantizer {policy.quantizer!r}: packed (inference) layers are not "
                              "available for NNX models yet; use the float quantizer "
                              f"{policy.quantizer.split(':', 1)[1]!r}.")
  needs_order = not (policy.ternary_first and policy.ternary_last)
  if needs_order and not (example_args or example_kwargs):
    raise ValueError("ternarize_model: policy.ternary_first / ternary_last = False needs an example call "
                     "to find the first / last layer in call order: ternarize_model(model, policy, x) "
                     "with x an input (or jax.ShapeDtypeStruct) of model.")

  matched: list[tuple[str, nnx.Module]] = []
  for keys, node in nnx.iter_graph(model, graph=True):  # a shared layer is visited once, at its first path
    if isinstance(node, TernaryLayer):
      raise ValueError(f"ternarize_model: layer {_path(keys)!r} is ternary already; ternarize a plain model.")
    if isinstance(node, CANDIDATES) and policy.matches(_path(keys)):
      matched.append((_path(keys), node))

  skipped: set[int] = set()
  if needs_order and matched:
    order = _call_order(model, [layer for _, layer in matched], example_args, example_kwargs)
    if order:
      if not policy.ternary_first:
        skipped.add(order[0])
      if not policy.ternary_last:
        skipped.add(order[-1])

  # Everything is checked and initialized before the first layer changes: an error leaves the model as it was.
  plans = []
  for i, (path, layer) in enumerate(matched):
    if i in skipped:
      continue
    kernel = vars(layer).get("kernel")
    if not isinstance(kernel, nnx.Variable):
      raise TypeError(f"layer {path!r}: expected its kernel as an nnx.Variable attribute 'kernel', "
                      f"got {type(kernel).__name__}.")
    if kernel.ndim != _kernel_ndim(layer):
      raise NotImplementedError(f"layer {path!r}: kernel of shape {kernel.shape} has more axes than a "
                                f"{type(layer).__name__} of its configuration: a stacked layer "
                                "(nnx.vmap / nnx.scan over layers) cannot be ternarized yet.")
    quantizer: Quantizer = policy.layer_quantizer(output_axes(layer) if policy.per_channel else ())
    for name in ("quantizer", *quantizer.param_names):
      if name in vars(layer):
        raise ValueError(f"layer {path!r} already has an attribute {name!r}.")
    init = quantizer.init(kernel[...])
    variables = {name: (Threshold if name in quantizer.threshold_params else nnx.Param)(init[name])
                 for name in quantizer.param_names}
    plans.append((layer, quantizer, variables))

  for layer, quantizer, variables in plans:
    layer.__class__ = _ternary_class(type(layer))
    layer.quantizer = quantizer  # static: part of the graph definition, as the layer's other settings
    for name, variable in variables.items():
      setattr(layer, name, variable)
    if policy.dtype is not None:
      layer.dtype = policy.dtype
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
  """The model as one pass of the update runs it. The threshold pass is a plain training pass for now
  (the same threshold gradients, with the kernel gradients computed and discarded): the one place
  to switch the TGA layers to their cheaper threshold-pass mode."""
  # When the layers have a mode field: set_mode(model, THRESHOLD_PASS if threshold_pass else TRAIN).
  del threshold_pass
  return model


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
