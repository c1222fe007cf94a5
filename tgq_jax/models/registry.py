"""The architecture registry: :func:`register`, :func:`archs`, :func:`create_model`.

A registered name is the only way a file (a run's ``config.json``, an exported
model) can name a model: loading one looks the name up here and never imports
or calls anything else the file names (:class:`tgq_jax.models.ModelSpec`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tgq_jax.core.policy import QuantPolicy
from tgq_jax.frontends.linen import ternarize_model
from tgq_jax.models.resnet import BasicBlock, Bottleneck, CifarResNet, ResNet
from tgq_jax.models.small_cnn import SmallCNN
from tgq_jax.models.llama import LLAMA_CONFIGS, Llama
from tgq_jax.models.vit import VIT_CONFIGS, ViT

# arch name -> (module class, fixed constructor arguments)
_ARCHS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
  "small_cnn": (SmallCNN, {}),
  # ImageNet, torchvision's layout and parameter counts.
  "resnet18": (ResNet, {"stage_sizes": (2, 2, 2, 2), "block_cls": BasicBlock}),
  "resnet34": (ResNet, {"stage_sizes": (3, 4, 6, 3), "block_cls": BasicBlock}),
  "resnet50": (ResNet, {"stage_sizes": (3, 4, 6, 3), "block_cls": Bottleneck}),
  # CIFAR (He et al. 2016), option-A shortcuts; also fine on 28x28x1.
  "resnet20": (CifarResNet, {"depth": 20}),
  "resnet32": (CifarResNet, {"depth": 32}),
  "resnet44": (CifarResNet, {"depth": 44}),
  "resnet56": (CifarResNet, {"depth": 56}),
  # Vision transformers: vit_tiny for 28x28 Fashion-MNIST, vit_s16 (ViT-S/16) for 224x224.
  **{name: (ViT, dict(config)) for name, config in VIT_CONFIGS.items()},
  # Decoder-only language models (Llama layout; num_classes is the vocabulary size). The context is a default,
  # not fixed: a run may train on other window lengths (--context), which a file records in its kwargs.
  **{name: (functools.partial(Llama, context=config["context"]),
            {k: v for k, v in config.items() if k != "context"}) for name, config in LLAMA_CONFIGS.items()},
}

# Constructor arguments that are not a model option: Flax's own, and the run-time BatchNorm options.
NOT_OPTIONS = frozenset({"parent", "name", "num_classes", "dtype", "bn_axis_name", "bn_unbiased_running_var"})


def register(name: str, cls: Callable[..., nn.Module], **fixed: Any) -> None:
  """Adds an architecture to :func:`create_model` (and so to what files may name).

  ``cls`` is a plain Linen module class (or constructor) taking
  ``num_classes`` and ``dtype`` plus ``fixed``; a model with BatchNorm may
  also take ``bn_axis_name`` and ``bn_unbiased_running_var`` and pass them to
  :class:`tgq_jax.models.common.BatchNorm` (``axis_name=``, ``unbiased_running_var=``).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register: the name must be a non-empty string, got {name!r}.")
  if not callable(cls):
    raise TypeError(f"register: {name!r}: the constructor must be callable, got {type(cls).__name__}.")
  _ARCHS[name] = (cls, fixed)


def archs() -> tuple[str, ...]:
  """The registered architecture names."""
  return tuple(_ARCHS)


def registered(arch: str) -> tuple[Callable[..., nn.Module], dict[str, Any]] | None:
  """``(constructor, fixed arguments)`` of a registered ``arch``; None when it is not registered."""
  return _ARCHS.get(arch) if isinstance(arch, str) else None


def constructor_arguments(constructor: Callable[..., Any]) -> frozenset[str]:
  """The keyword arguments ``constructor`` names: a Linen module's dataclass fields (a
  ``functools.partial``'s function's), else its signature's named parameters; empty when unknown (no
  signature, or a ``**kwargs`` catch-all)."""
  target = getattr(constructor, "func", constructor)
  if dataclasses.is_dataclass(target):
    return frozenset(f.name for f in dataclasses.fields(target) if f.init)
  try:
    parameters = inspect.signature(target).parameters.values()
  except (TypeError, ValueError):
    return frozenset()
  parameters = list(parameters)
  if any(p.kind == p.VAR_KEYWORD for p in parameters):
    return frozenset()
  return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def data_options(constructor: Callable[..., Any], fixed: Any = ()) -> frozenset[str]:
  """The constructor arguments a spec's JSON ``kwargs`` may set: :func:`constructor_arguments` less
  :data:`NOT_OPTIONS`, less the registry's ``fixed`` ones, less those whose default is code (a class
  or function, e.g. ``conv=nn.Conv``): a file holds data and cannot swap a model's code."""
  target = getattr(constructor, "func", constructor)
  if dataclasses.is_dataclass(target):
    defaults = {f.name: f.default for f in dataclasses.fields(target)}
  else:
    try:
      defaults = {p.name: p.default for p in inspect.signature(target).parameters.values()}
    except (TypeError, ValueError):
      defaults = {}
  code = {name for name, default in defaults.items() if callable(default)}
  return constructor_arguments(constructor) - NOT_OPTIONS - set(fixed) - code


def example_input(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> jax.ShapeDtypeStruct:
  """The abstract input of ``batch`` examples of ``input_shape`` for a zoo model (to trace its init):
  float32 images, or int32 token ids for a model whose module (inside any ternarizing wrapper) declares
  ``input_dtype`` (the language models)."""
  inner = model
  while isinstance(getattr(inner, "module", None), nn.Module):  # TernarizedModel wrappers
    inner = inner.module
  return jax.ShapeDtypeStruct((batch, *input_shape), getattr(inner, "input_dtype", jnp.float32))


def create_model(arch: str, num_classes: int, *, quant: QuantPolicy | None = None, dtype: Any = jnp.float32,
                 packed: bool = False, bn_axis_name: str | None = None, bn_unbiased_running_var: bool = False,
                 **model_kwargs: Any) -> nn.Module:
  """Builds ``arch`` with ``num_classes`` outputs, quantized as ``quant`` says.

  Args:
    arch: an architecture name; see :func:`archs`.
    num_classes: size of the classifier.
    quant: the quantization policy (default ``QuantPolicy()``: TGA on every
      conv, dense and attention kernel, per tensor; ``QuantPolicy("fp")``: the
      full-precision twin).
    dtype: computation dtype (``jnp.bfloat16`` for mixed precision); parameters
      and quantizer statistics stay float32. ``jnp.float64`` (under
      ``jax_enable_x64``) computes and returns float64.
    packed: the inference form: ternary layers hold 2-bit packed codes and
      scales instead of float kernels (``quant.as_packed()``;
      :func:`tgq_jax.export.load_packed` fills its variables).
    bn_axis_name: BatchNorm statistics in training mode are averaged over this
      mapped axis (``jax.shard_map``/``jax.pmap``): the global batch's
      statistics, whatever the device count. Training-mode calls must then run
      inside the mapping. Models without BatchNorm ignore it.
    bn_unbiased_running_var: torch's running-variance rule
      (:class:`tgq_jax.models.common.BatchNorm`); default: flax's biased one.
    **model_kwargs: further constructor arguments of the architecture (e.g.
      ``dropout_rate`` for the ViTs, ``width`` for the ResNets).
  """
  if arch not in _ARCHS:
    raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(sorted(_ARCHS))}.")
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
  policy = QuantPolicy() if quant is None else quant
  if not isinstance(policy, QuantPolicy):
    raise TypeError(f"quant must be a tgq_jax.QuantPolicy, got {type(policy).__name__}.")
  if packed:
    policy = policy.as_packed()
  cls, fixed = _ARCHS[arch]
  fields = constructor_arguments(cls)
  unknown = sorted(set(model_kwargs) - fields) if fields else []
  if unknown:
    raise ValueError(f"arch {arch!r} has no option {', '.join(unknown)} "
                     f"(its options: {', '.join(sorted(fields - {'num_classes', 'parent', 'name'}))}).")
  bn = {"bn_axis_name": bn_axis_name, "bn_unbiased_running_var": bn_unbiased_running_var}
  kwargs = {**fixed, **{k: v for k, v in bn.items() if k in fields}, **model_kwargs}
  return ternarize_model(cls(num_classes=num_classes, dtype=dtype, **kwargs), policy)
