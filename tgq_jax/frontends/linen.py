"""Ternarize any Flax Linen model by interception: :func:`ternarize_model`; its mode: :func:`with_mode`.

``ternarize_model(module, policy)`` returns a Linen module that calls
``module`` unchanged, except that the kernels of its ``nn.Dense``,
``nn.Conv``, ``nn.DenseGeneral`` and ``nn.Einsum`` layers (hence
``nn.MultiHeadDotProductAttention`` and every transformer block made of them)
that the :class:`~tgq_jax.core.policy.QuantPolicy` selects go through the policy's
quantizer. Nothing in the user's model is rewritten:

* ``nn.intercept_methods`` sees every module call inside the wrapped model;
  for a selected layer, the layer's own ``param`` method is shadowed for the
  duration of that call, so when the layer asks for ``"kernel"`` it gets the
  quantized kernel. Everything else the layer does (padding, feature groups,
  dtype promotion, bias, custom ``dot_general``) is its own code.
* The quantizer's parameters (TGA's ``delta``; TTQ's ``pos_scale``,
  ``neg_scale``) are created beside the kernel, in the same params
  dictionary, initialized from the kernel; the trainer labels them by name.
* The wrapper shares its scope with the wrapped module (``nn.share_scope``):
  the variables have exactly the paths the plain model has, plus the
  quantizer leaves. A full-precision checkpoint of the plain model loads
  into the ternarized one (:func:`tgq_jax.frontends.linen_layers.init_ternary_from_fp`).
* ``QuantPolicy.activation_bits``: a selected layer's input is quantized
  (:func:`tgq_jax.core.activations.quantize_activations`, over :func:`input_axes`)
  before the layer's own code runs on it.
* ``QuantPolicy.embeddings``: an ``nn.Embed``'s ``"embedding"`` table is quantized
  where the layer creates it (its ``setup``, intercepted like a call), so its
  lookups and ``attend`` both read the quantized table.

What a selected layer computes is :mod:`tgq_jax.core.kernel`'s, through
:class:`tgq_jax.frontends.linen_layers.KernelHook` (shared with ``TernaryDense``/``TernaryConv``);
the mode (:data:`~tgq_jax.core.kernel.TRAIN`, :data:`~tgq_jax.core.kernel.THRESHOLD_PASS`)
is the field :attr:`TernarizedModel.mode`, set by :func:`with_mode`.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from tgq_jax.core.activations import (dense_input_axes, einsum_input_axes, general_input_axes,
                                      quantize_layer_input)
from tgq_jax.core.kernel import (TRAIN, KernelLayout, check_coverage, check_mode, dense_layout, einsum_layout,
                                 general_layout, order_skips)
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.core.quantizers import get_quantizer
from tgq_jax.frontends.linen_layers import (KernelHook, QuantizedLayer, packed_dense_pallas, pallas_applies,
                                            record_layer, recording)

#: The layer types whose kernels are intercepted.
CANDIDATES: tuple[type, ...] = (nn.Dense, nn.Conv, nn.DenseGeneral, nn.Einsum)
#: Embedding tables: candidates under ``QuantPolicy(embeddings=True)``, else full precision (not reported).
EMBEDDINGS: tuple[type, ...] = (nn.Embed,)
#: Layers with a kernel that no quantizer takes: reported by ``QuantPolicy.on_unquantized``.
UNQUANTIZABLE: tuple[type, ...] = (nn.ConvTranspose, nn.ConvLocal)
#: The methods of an Embed that use its table: ``setup`` creates it (where it is quantized), the others read it.
EMBED_METHODS = ("setup", "__call__", "attend")


def kernel_layout(module: nn.Module, kernel_ndim: int, args=(), kwargs=None) -> KernelLayout:
  """The :class:`~tgq_jax.core.kernel.KernelLayout` of a candidate layer's kernel, for one call.

  Dense, Conv: the last axis. DenseGeneral: its ``features`` axes and ``batch_dims``
  axes. Einsum: the kernel axes whose letters appear in the output of the call's
  einsum string (``args``/``kwargs``: the call's, which may give it).
  """
  if isinstance(module, nn.Einsum):
    kwargs = kwargs or {}
    call_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return einsum_layout(call_str or module.einsum_str or "")
  if isinstance(module, nn.DenseGeneral):
    features = module.features if isinstance(module.features, tuple | list) else (module.features,)
    batch_dims = module.batch_dims if isinstance(module.batch_dims, tuple | list) else (module.batch_dims,)
    return general_layout(kernel_ndim, len(features), len(batch_dims))
  return dense_layout(kernel_ndim)


def input_axes(module: nn.Module, args=(), kwargs=None) -> tuple[int, ...]:
  """The axes of a candidate layer's input that it contracts with its kernel, for one call: one
  activation scale per index of the other axes (:mod:`tgq_jax.core.activations`).

  Dense, Conv: the last. DenseGeneral: its ``axis``. Einsum: the contracted letters of the
  call's einsum string.
  """
  if isinstance(module, nn.Einsum):
    kwargs = kwargs or {}
    call_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return einsum_input_axes(call_str or module.einsum_str)
  if isinstance(module, nn.DenseGeneral):
    return general_input_axes(module.axis)
  return dense_input_axes()


@contextlib.contextmanager
def _shadowed(module: nn.Module, **attributes: Any) -> Iterator[None]:
  """Instance attributes of a (frozen) module for the duration of one call.

  ``param`` shadows the class method so the layer's own ``self.param("kernel", ...)``
  returns the quantized kernel; ``dtype`` sets the policy's compute dtype; ``mode``
  the wrapper's mode on a ``Ternary*`` layer. All are removed afterwards: the
  module is left as it was.
  """
  saved = {name: module.__dict__[name] for name in attributes if name in module.__dict__}
  for name, value in attributes.items():
    object.__setattr__(module, name, value)
  try:
    yield
  finally:
    for name in attributes:
      object.__delattr__(module, name)
    for name, value in saved.items():
      object.__setattr__(module, name, value)


def _call_order(module: nn.Module, args, kwargs, embeddings: bool = False) -> list[tuple[str, ...]]:
  """The paths (relative to ``module``) of its candidate layers, in call order (``embeddings``: Embed
  tables too, at their first use).

  Traced abstractly (``jax.eval_shape`` of ``module.init``): only shapes.
  """
  order: list[tuple[str, ...]] = []
  root = None

  def record(next_fun, a, k, context):
    nonlocal root
    if root is None:
      root = tuple(context.module.path)  # the first call is the wrapped module's own
    m = context.module
    candidate = ((context.method_name == "__call__" and isinstance(m, CANDIDATES) and not isinstance(m, QuantizedLayer))
                 or (embeddings and context.method_name in EMBED_METHODS and isinstance(m, EMBEDDINGS)))
    if candidate:
      path = tuple(m.path)[len(root):]
      if path not in order:
        order.append(path)
    return next_fun(*a, **k)

  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]
  arrays = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x, arr in zip(leaves, is_array) if arr]

  def init(arrays):
    it = iter(arrays)
    a, k = jax.tree.unflatten(treedef, [next(it) if arr else x for x, arr in zip(leaves, is_array)])
    # Not a real init: nothing in it is reported to quantized_layers.
    with recording(None), nn.intercept_methods(record):
      return module.init(jax.random.key(0), *a, **k)

  jax.eval_shape(init, arrays)
  return order


class TernarizedModel(nn.Module):
  """``module`` with the kernels the ``policy`` selects quantized (see :func:`ternarize_model`).

  Attributes:
    module: the wrapped Linen module.
    policy: which layers, and how.
    mode: what every quantized layer inside computes (the intercepted ones and any
      ``TernaryDense``/``TernaryConv`` or nested wrapper, whatever their own mode):
      :data:`~tgq_jax.core.kernel.TRAIN` or :data:`~tgq_jax.core.kernel.THRESHOLD_PASS`.
  """

  module: nn.Module
  policy: QuantPolicy = QuantPolicy()
  mode: str = TRAIN

  def setup(self):
    # The wrapped module's variables live at this module's own paths, as in the plain model.
    nn.share_scope(self, self.module)

  def __call__(self, *args, **kwargs):
    policy, mode = self.policy, check_mode(self.mode)
    skip = set()
    if not (policy.ternary_first and policy.ternary_last):
      unbound = self.module.clone(parent=None, _deep_clone=True)
      order = [p for p in _call_order(unbound, args, kwargs, policy.embeddings) if policy.matches(p)]
      skip = order_skips(order, policy.ternary_first, policy.ternary_last)
    root = tuple(self.path)
    candidates: list[str] = []  # every quantizable layer reached, for check_coverage
    unquantizable: dict[str, str] = {}

    def intercept(next_fun: Callable, a, k, context):
      m = context.module
      path = tuple(m.path)[len(root):]
      if isinstance(m, UNQUANTIZABLE) and context.method_name in ("__call__", "attend") and policy.matches(path):
        unquantizable["/".join(path)] = f"{type(m).__module__}.{type(m).__name__}"
      if isinstance(m, EMBEDDINGS) and context.method_name in EMBED_METHODS:
        return embed(next_fun, a, k, m, path, context.method_name)
      if context.method_name != "__call__":
        return next_fun(*a, **k)
      if isinstance(m, (QuantizedLayer, TernarizedModel)):  # explicit Ternary* layers, nested wrappers: this mode
        if isinstance(m, QuantizedLayer):
          candidates.append("/".join(path))
        with _shadowed(m, mode=mode):
          return next_fun(*a, **k)
      if not isinstance(m, CANDIDATES) or "param" in m.__dict__:
        return next_fun(*a, **k)  # not a candidate, or already intercepted
      candidates.append("/".join(path))
      if not policy.matches(path) or path in skip:
        record_layer(tuple(m.path), get_quantizer("fp"))
        return next_fun(*a, **k)
      layout = functools.partial(kernel_layout, m, args=a, kwargs=k)
      a, k = quantize_layer_input(a, k, policy.activation_bits, input_axes(m, a, k))
      if policy.packed and type(m) is nn.Dense and pallas_applies(m):
        # Serving: lowered for GPU/TPU the Pallas kernel multiplies by the 2-bit codes (no float kernel at all).
        quantizer = policy.layer_quantizer(layout(2).output_axes)
        record_layer(tuple(m.path), quantizer)
        return packed_dense_pallas(m, functools.partial(nn.Module.param, m), quantizer, a[0], dtype=policy.dtype)
      hook = KernelHook(m, lambda ndim: policy.layer_quantizer(layout(ndim).output_axes), layout, mode,
                        a[0] if a else None)
      attributes = {"param": hook.param}
      if policy.dtype is not None and hasattr(m, "dtype"):
        attributes["dtype"] = policy.dtype
      with _shadowed(m, **attributes):
        y = next_fun(*a, **k)
      return hook.finish(y)

    def embed(next_fun: Callable, a, k, m: nn.Module, path: tuple[str, ...], method: str):
      # An Embed's table is quantized where it is created (setup, run before the table's first use); its
      # lookups and attend then read it. The threshold pass computes as TRAIN (layout None): attend's
      # output has the table's rows, not its features, on the last axis. No activation quantization.
      selected = policy.embeddings and policy.matches(path) and path not in skip
      if method != "setup" or not policy.embeddings or "param" in m.__dict__:
        attributes = {"dtype": policy.dtype} if selected and policy.dtype is not None and method != "setup" else {}
        with _shadowed(m, **attributes):
          return next_fun(*a, **k)
      candidates.append("/".join(path))
      if not selected:
        record_layer(tuple(m.path), get_quantizer("fp"))
        return next_fun(*a, **k)
      hook = KernelHook(m, lambda ndim: policy.layer_quantizer(dense_layout(ndim).output_axes), lambda ndim: None,
                        mode, None, kernel_name="embedding")
      with _shadowed(m, param=hook.param):
        return next_fun(*a, **k)

    with nn.intercept_methods(intercept):
      out = self.module(*args, **kwargs)
    check_coverage(policy, candidates, unquantizable)
    return out


def ternarize_model(module: nn.Module, policy: QuantPolicy | None = None, mode: str = TRAIN) -> TernarizedModel:
  """A Linen module computing ``module`` with ternary kernels where ``policy`` says.

  Args:
    module: any ``flax.linen`` module (unbound), e.g. a ResNet written with
      ``nn.Conv``/``nn.Dense`` or a transformer built from
      ``nn.MultiHeadDotProductAttention``.
    policy: which layers and how (:class:`~tgq_jax.core.policy.QuantPolicy`);
      default: TGA on every Dense, Conv, DenseGeneral and Einsum kernel, per tensor.
    mode: what the quantized layers compute (see :func:`with_mode`); default TRAIN.

  Returns:
    A module called exactly as ``module`` (same arguments, same variables
    plus the quantizer's parameters beside each quantized kernel).

  Raises:
    TypeError: not a Linen module, or not a QuantPolicy.
    ValueError: an unknown mode; when the model is traced, layers or patterns
      left out under ``QuantPolicy(on_unquantized="error")``.

  Example::

    model = tgq_jax.ternarize_model(MyNet(), tgq_jax.QuantPolicy("tga", ternary_last=False))
    variables = model.init(jax.random.key(0), x)   # params[...]["kernel"] and ["delta"]
    logits = model.apply(variables, x)
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"ternarize_model takes a flax.linen Module, got {type(module).__name__} "
                    "(for flax.nnx models use tgq_jax.frontends.nnx.ternarize_model).")
  policy = QuantPolicy() if policy is None else policy
  if not isinstance(policy, QuantPolicy):
    raise TypeError(f"policy must be a tgq_jax.QuantPolicy, got {type(policy).__name__}.")
  return TernarizedModel(module, policy, check_mode(mode))


#: The policy of :func:`with_mode`'s wrapper around a model that is not a TernarizedModel: it
#: quantizes no layer itself, it only sets the mode of the quantized layers inside.
_MODE_ONLY = QuantPolicy(include=())


def with_mode(model: nn.Module, mode: str) -> nn.Module:
  """``model`` with every quantized layer in ``mode``, the same variables (same paths, same values).

  Works for a :func:`ternarize_model` result (its ``mode`` field is replaced), a
  ``TernaryDense``/``TernaryConv``, and any Linen model built from them (wrapped
  in a :class:`TernarizedModel` that quantizes nothing itself and sets their mode).

  The mode is a field of the returned module, so a function jitted over it traces it:
  ``jax.jit(lambda p: with_mode(model, THRESHOLD_PASS).apply({"params": p}, x))``
  and the same over ``model`` are two functions, two traces; a model passed as a
  static argument hashes with its mode.

  Args:
    model: a Linen module.
    mode: :data:`~tgq_jax.core.kernel.TRAIN` or :data:`~tgq_jax.core.kernel.THRESHOLD_PASS`
      (the sequential update's threshold pass: same output and threshold gradients,
      no kernel gradient; see :mod:`tgq_jax.core.kernel`).
  """
  check_mode(mode)
  if not isinstance(model, nn.Module):
    raise TypeError(f"with_mode takes a flax.linen Module, got {type(model).__name__} "
                    "(for flax.nnx models use tgq_jax.frontends.nnx.set_mode).")
  if isinstance(model, (TernarizedModel, QuantizedLayer)):
    return model.clone(mode=mode)
  return TernarizedModel(model, _MODE_ONLY, mode)
