"""Ternarize any Flax Linen model by interception: :func:`ternarize_model`.

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

The layer-level mechanics (threshold pass, packed kernels) are those of
:mod:`tgq_jax.frontends.linen_layers`, shared with ``TernaryDense``/``TernaryConv``.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from tgq_jax.frontends.linen_layers import (KernelHook, _layer_input, _QuantizedKernel, packed_dense_pallas, pallas_applies,
                            record_layer, recording)
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.core.quantizers import get_quantizer

#: The layer types whose kernels are intercepted.
CANDIDATES: tuple[type, ...] = (nn.Dense, nn.Conv, nn.DenseGeneral, nn.Einsum)


def _einsum_str(module: nn.Einsum, args, kwargs) -> str:
  call_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
  return (call_str or module.einsum_str or "").replace(" ", "")


def output_axes(module: nn.Module, kernel_ndim: int, args=(), kwargs=None) -> tuple[int, ...]:
  """The kernel axes of ``module`` that index its output features (per-channel statistics go over them).

  Dense, Conv: the last. DenseGeneral: the ``features`` axes, and its
  ``batch_dims`` axes (each batch entry is its own kernel). Einsum: the kernel
  axes whose letters appear in the output of the einsum string.
  """
  if isinstance(module, nn.Einsum):
    spec = _einsum_str(module, args, kwargs or {})
    lhs, out = spec.split("->")
    kernel_letters = lhs.split(",")[1]
    if "." in kernel_letters:
      raise ValueError(f"Einsum {spec!r}: per-channel statistics need explicit kernel axes (no '...').")
    return tuple(i for i, c in enumerate(kernel_letters) if c in out)
  if isinstance(module, nn.DenseGeneral):
    features = module.features if isinstance(module.features, tuple | list) else (module.features,)
    batch_dims = module.batch_dims if isinstance(module.batch_dims, tuple | list) else (module.batch_dims,)
    return tuple(range(len(batch_dims))) + tuple(range(kernel_ndim - len(features), kernel_ndim))
  return (kernel_ndim - 1,)


def _output_scale_broadcasts(module: nn.Module, axes: tuple[int, ...], kernel_ndim: int) -> bool:
  """Whether a per-channel scale over ``axes`` broadcasts against the layer's output as is.

  True where the output-feature axes are the kernel's trailing axes and the
  output's trailing axes, in order (Dense, Conv, DenseGeneral without batch
  dims); the threshold pass multiplies the output by the scale only then.
  """
  if isinstance(module, nn.Einsum):
    return False
  if isinstance(module, nn.DenseGeneral) and module.batch_dims not in ((), None):
    return False
  return axes == tuple(range(kernel_ndim - len(axes), kernel_ndim))


@contextlib.contextmanager
def _shadowed(module: nn.Module, **attributes: Any) -> Iterator[None]:
  """Instance attributes of a (frozen) module for the duration of one call.

  ``param`` shadows the class method so the layer's own ``self.param("kernel", ...)``
  returns the quantized kernel; ``dtype`` sets the policy's compute dtype. Both
  are removed afterwards: the module is left as it was.
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


def _call_order(module: nn.Module, args, kwargs) -> list[tuple[str, ...]]:
  """The paths (relative to ``module``) of its candidate layers that the policy matches, in call order.

  Traced abstractly (``jax.eval_shape`` of ``module.init``): only shapes.
  """
  order: list[tuple[str, ...]] = []
  root = None

  def record(next_fun, a, k, context):
    nonlocal root
    if root is None:
      root = tuple(context.module.path)  # the first call is the wrapped module's own
    m = context.module
    if context.method_name == "__call__" and isinstance(m, CANDIDATES) and not isinstance(m, _QuantizedKernel):
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
  """``module`` with the kernels the ``policy`` selects quantized (see :func:`ternarize_model`)."""

  module: nn.Module
  policy: QuantPolicy = QuantPolicy()

  def setup(self):
    # The wrapped module's variables live at this module's own paths, as in the plain model.
    nn.share_scope(self, self.module)

  def __call__(self, *args, **kwargs):
    policy = self.policy
    order: list[tuple[str, ...]] | None = None
    if not (policy.ternary_first and policy.ternary_last):
      unbound = self.module.clone(parent=None, _deep_clone=True)
      order = [p for p in _call_order(unbound, args, kwargs) if policy.matches(p)]
    skip = set()
    if order:
      if not policy.ternary_first:
        skip.add(order[0])
      if not policy.ternary_last:
        skip.add(order[-1])
    root = tuple(self.path)

    def intercept(next_fun: Callable, a, k, context):
      m = context.module
      if (context.method_name != "__call__" or not isinstance(m, CANDIDATES)
          or isinstance(m, _QuantizedKernel) or "param" in m.__dict__):
        return next_fun(*a, **k)  # not a candidate, a Ternary* layer, or already intercepted
      path = tuple(m.path)[len(root):]
      if not policy.matches(path) or path in skip:
        record_layer(tuple(m.path), get_quantizer("fp"))
        return next_fun(*a, **k)
      if policy.packed and type(m) is nn.Dense and pallas_applies(m):
        # Serving: lowered for GPU/TPU the Pallas kernel multiplies by the 2-bit codes (no float kernel at all).
        quantizer = policy.layer_quantizer(output_axes(m, 2))
        record_layer(tuple(m.path), quantizer)
        return packed_dense_pallas(m, functools.partial(nn.Module.param, m), quantizer, a[0], dtype=policy.dtype)
      hook = KernelHook(
        m, lambda ndim: policy.layer_quantizer(output_axes(m, ndim, a, k)),
        lambda axes, ndim: _output_scale_broadcasts(m, axes, ndim))
      attributes = {"param": hook.param}
      if policy.dtype is not None and hasattr(m, "dtype"):
        attributes["dtype"] = policy.dtype
      # _layer_input: a packed layer rebuilds its kernel only once its input exists (layers.py).
      with _shadowed(m, **attributes), _layer_input(a[0] if a else None):
        y = next_fun(*a, **k)
      return hook.finish(y)

    with nn.intercept_methods(intercept):
      return self.module(*args, **kwargs)


def ternarize_model(module: nn.Module, policy: QuantPolicy | None = None) -> TernarizedModel:
  """A Linen module computing ``module`` with ternary kernels where ``policy`` says.

  Args:
    module: any ``flax.linen`` module (unbound), e.g. a ResNet written with
      ``nn.Conv``/``nn.Dense`` or a transformer built from
      ``nn.MultiHeadDotProductAttention``.
    policy: which layers and how (:class:`~tgq_jax.core.policy.QuantPolicy`);
      default: TGA on every Dense, Conv, DenseGeneral and Einsum kernel, per tensor.

  Returns:
    A module called exactly as ``module`` (same arguments, same variables
    plus the quantizer's parameters beside each quantized kernel).

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
  return TernarizedModel(module, policy)
