"""The model zoo: one entry point, :func:`create_model`.

Every model is a plain ``flax.linen`` module (``nn.Conv``, ``nn.Dense``,
``nn.MultiHeadDotProductAttention``) called as
``model.apply(variables, images, train=...)`` on NHWC images, with BatchNorm
statistics (if any) in the ``batch_stats`` collection (the flax examples'
convention). :func:`create_model` makes it ternary the way any user model is
made ternary: :func:`tgq_jax.ternarize_model` with one
:class:`tgq_jax.QuantPolicy` (which quantizer, per-channel statistics, which
layers: ``ternary_first`` / ``ternary_last`` keep the stem / the classifier
in full precision when False, the paper's "ff_lf" setting). With
``QuantPolicy("fp")`` the model is its full-precision twin.

Adding an architecture is one file (a Linen module taking ``num_classes`` and
``dtype``) and one :func:`register` line.

torchvision ImageNet checkpoints load through :mod:`tgq_jax.models.torchvision`
(:func:`load_torchvision_weights`, :func:`convert_state_dict`), and
:func:`init_ternary_from_fp` starts a ternary model from its FP twin.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from tgq_jax.models.resnet import BasicBlock, Bottleneck, CifarResNet, ResNet
from tgq_jax.models.small_cnn import SmallCNN
from tgq_jax.models.vit import VIT_CONFIGS, ViT
# torchvision.py imports create_model lazily (inside a function), so this is no cycle.
from tgq_jax.frontends.linen_layers import init_ternary_from_fp
from tgq_jax.models.torchvision import convert_state_dict, load_torchvision_weights
from tgq_jax.frontends.linen import ternarize_model
from tgq_jax.core.policy import QuantPolicy

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
}


def register(name: str, cls: Callable[..., nn.Module], **fixed: Any) -> None:
  """Adds an architecture to :func:`create_model`.

  ``cls`` is a plain Linen module class (or constructor) taking
  ``num_classes`` and ``dtype`` plus ``fixed``; a model with BatchNorm may
  also take ``bn_axis_name`` and ``bn_unbiased_running_var`` and pass them to
  :class:`tgq_jax.frontends.linen_layers.BatchNorm` (``axis_name=``, ``unbiased_running_var=``).
  """
  _ARCHS[name] = (cls, fixed)


def archs() -> tuple[str, ...]:
  return tuple(_ARCHS)


def _fields(cls) -> set[str]:
  cls = getattr(cls, "func", cls)  # a functools.partial
  return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


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
      (:class:`tgq_jax.frontends.linen_layers.BatchNorm`); default: flax's biased one.
    **model_kwargs: further constructor arguments of the architecture (e.g.
      ``dropout_rate`` for the ViTs, ``width`` for the ResNets).
  """
  if arch not in _ARCHS:
    raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(sorted(_ARCHS))}.")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
  policy = QuantPolicy() if quant is None else quant
  if not isinstance(policy, QuantPolicy):
    raise TypeError(f"quant must be a tgq_jax.QuantPolicy, got {type(policy).__name__}.")
  if packed:
    policy = policy.as_packed()
  cls, fixed = _ARCHS[arch]
  fields = _fields(cls)
  unknown = sorted(set(model_kwargs) - fields) if fields else []
  if unknown:
    raise ValueError(f"arch {arch!r} has no option {', '.join(unknown)} "
                     f"(its options: {', '.join(sorted(fields - {'num_classes', 'parent', 'name'}))}).")
  bn = {"bn_axis_name": bn_axis_name, "bn_unbiased_running_var": bn_unbiased_running_var}
  kwargs = {**fixed, **{k: v for k, v in bn.items() if k in fields}, **model_kwargs}
  return ternarize_model(cls(num_classes=num_classes, dtype=dtype, **kwargs), policy)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything needed to rebuild a model: written to a run's ``config.json`` and to the
  header of an exported file, so both can be reloaded without the code that made them.

  Attributes:
    arch: a zoo name (:func:`archs`), or ``"package.module:Name"``: an
      importable Linen module class (or function returning one) of the
      user's, called with ``num_classes=`` (when not None), ``dtype=`` and ``kwargs``.
    num_classes: classifier size (None: a user constructor that takes none).
    policy: the :class:`~tgq_jax.QuantPolicy` (the training form; export
      builds its packed form).
    dtype: computation dtype name ("float32", "bfloat16", "float64").
    kwargs: further constructor arguments (JSON values), e.g. ``{"dropout_rate": 0.1}``.
  """

  arch: str
  num_classes: int | None
  policy: QuantPolicy = QuantPolicy()
  dtype: str = "float32"
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

  def build(self, *, packed: bool = False, **runtime: Any) -> nn.Module:
    """The module (``packed``: its inference form). ``runtime``: options that are not part of
    the model's identity (``bn_axis_name``, ``bn_unbiased_running_var``)."""
    dtype = jnp.dtype(self.dtype)
    if self.arch in _ARCHS:
      return create_model(self.arch, self.num_classes, quant=self.policy, dtype=dtype, packed=packed,
                          **runtime, **self.kwargs)
    constructor = _import(self.arch)
    fields = _fields(constructor)
    extra = {k: v for k, v in runtime.items() if k in fields}
    classes = {} if self.num_classes is None else {"num_classes": self.num_classes}
    if not fields or "dtype" in fields:
      classes["dtype"] = dtype
    module = constructor(**classes, **self.kwargs, **extra)
    return ternarize_model(module, self.policy.as_packed() if packed else self.policy)

  def to_dict(self) -> dict[str, Any]:
    return {"arch": self.arch, "num_classes": self.num_classes, "policy": self.policy.to_dict(),
            "dtype": self.dtype, "kwargs": dict(self.kwargs)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
    missing = {"arch", "num_classes", "policy"} - set(d)
    if missing:
      raise ValueError(f"model spec: missing {', '.join(sorted(missing))}.")
    return cls(d["arch"], d["num_classes"], QuantPolicy.from_dict(d["policy"]), d.get("dtype", "float32"),
               dict(d.get("kwargs", {})))


def _import(path: str):
  module_name, _, name = path.partition(":")
  if not module_name or not name:
    raise ValueError(f"unknown arch {path!r}: neither a zoo name ({', '.join(sorted(_ARCHS))}) "
                     "nor 'package.module:Name'.")
  try:
    obj = importlib.import_module(module_name)
    for part in name.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"cannot import the model constructor {path!r}: {e}") from None
  return obj
