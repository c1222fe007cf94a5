"""Linen's quantized layers: the kernel hook shared by interception and the explicit ``Ternary*`` layers.

:class:`KernelHook` is what a quantized layer's ``param`` does, a thin adapter
over :mod:`tgq_jax.core.kernel`: its ``"kernel"`` comes back as
:func:`~tgq_jax.core.kernel.layer_kernel` says for the layer's mode, the
quantizer's own parameters (TGA: ``delta``; TTQ: ``pos_scale``, ``neg_scale``)
are created beside it from the initialized kernel, so an optimizer can label
them by name. :func:`tgq_jax.ternarize_model` installs it on the
``nn.Dense``/``nn.Conv``/``nn.DenseGeneral``/``nn.Einsum`` layers of any
model; ``TernaryDense`` / ``TernaryConv`` are ``nn.Dense`` / ``nn.Conv`` with
it built in (every constructor argument of theirs works the same), for
hand-written models.

The mode (:data:`~tgq_jax.core.kernel.TRAIN`, :data:`~tgq_jax.core.kernel.THRESHOLD_PASS`)
is a field: ``TernaryDense(..., mode=...)``, or for a whole model
:func:`tgq_jax.frontends.linen.with_mode`. A jitted function closes over (or
takes as a static argument) a model with one mode: the mode is part of what
is traced.

The quantizer sees the kernel in ``param_dtype`` (float32 by default): with
``dtype=jnp.bfloat16`` the layer computes in bfloat16 on the ternarized
kernel while the quantizer's statistics stay in float32.

Packed (inference) mode: with a packed quantizer (``QuantPolicy("packed:tga")``,
``create_model(..., packed=True)``; see :func:`tgq_jax.core.quantizers.packed_name`)
the layer holds no float kernel. Its ``params`` are ``codes`` (``uint8 (ceil(K/4), N)``,
2-bit codes in the planar layout of :mod:`tgq_jax.core.packing`),
``scale`` (float32, scalar or per output feature) and, for TTQ, ``neg_scale``;
the kernel is rebuilt from them inside the layer's call (so inside the
compiled forward, one layer at a time) with the values the trained layer
computes with. On GPU/TPU a packed ``TernaryDense`` multiplies by the Pallas
ternary kernel instead (codes unpacked on chip, scale after accumulation).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from tgq_jax.core.activations import check_activation_bits, dense_input_axes, quantize_activations
from tgq_jax.core.kernel import TRAIN, KernelLayout, check_mode, dense_layout, finish_output, layer_kernel
from tgq_jax.core.packing import after_input, packed_kernel, planar_shape
from tgq_jax.core.quantizers import Quantizer, get_quantizer
from tgq_jax.core.ternarize import stat_shape
from tgq_jax.core.trees import KERNEL_KEYS, as_leaf, mismatch_problems, quantizer_leaf_names, reinit_thresholds
from tgq_jax.kernels import ternary_matmul

Path = tuple[str, ...]

# The recorder of quantized_layers: {params path: Quantizer}, or None when nobody is listening. It only
# observes (during quantized_layers' abstract trace): what a layer computes never depends on it.
_RECORDER: contextvars.ContextVar = contextvars.ContextVar("tgq_layer_recorder", default=None)


def record_layer(path: Path, quantizer: Quantizer) -> None:
  """Tells :func:`quantized_layers` (when it is listening) that the layer at ``path`` uses ``quantizer``."""
  recorder = _RECORDER.get()
  if recorder is not None and path not in recorder:
    recorder[path] = quantizer


@contextlib.contextmanager
def recording(recorder: dict | None) -> Iterator[dict | None]:
  """Collects :func:`record_layer` calls into ``recorder`` (None: none are collected) while active."""
  token = _RECORDER.set(recorder)
  try:
    yield recorder
  finally:
    _RECORDER.reset(token)


def packed_params(param_fn: Callable, quantizer: Quantizer, shape: tuple[int, ...]):
  """A packed layer's (codes, scale, neg_scale or None) params for a kernel of ``shape``."""
  k4, n = planar_shape(shape)
  scale_shape = stat_shape(shape, quantizer.per_channel)
  codes = param_fn("codes", lambda _rng: jnp.zeros((k4, n), jnp.uint8))
  scale = param_fn("scale", lambda _rng: jnp.zeros(scale_shape, jnp.float32))
  neg = None if quantizer.symmetric else param_fn("neg_scale", lambda _rng: jnp.zeros(scale_shape, jnp.float32))
  return codes, scale, neg


class KernelHook:
  """What a quantized layer's ``param`` does, for one call of the layer.

  The layer's ``"kernel"`` request returns :func:`~tgq_jax.core.kernel.layer_kernel`'s
  kernel for ``mode`` (the quantizer's parameters created beside it, from the
  kernel); where that comes with an output scale (the threshold pass), the
  bias is held back meanwhile and :meth:`finish` applies both to the output.
  A packed layer's ``"kernel"`` is rebuilt from its codes and scales.

  The same for an ``nn.Embed``'s ``"embedding"`` table (``kernel_name="embedding"``; its
  ``setup`` asks for it).

  Args:
    module: the layer (bound).
    quantizer_for: ``kernel_ndim -> Quantizer`` for this layer's kernel.
    layout_for: ``kernel_ndim -> KernelLayout`` of this layer's kernel.
    mode: :data:`~tgq_jax.core.kernel.TRAIN` or :data:`~tgq_jax.core.kernel.THRESHOLD_PASS`.
    inputs: the layer's input (a packed kernel is rebuilt only once it exists), or None.
    param_fn: the unshadowed ``param`` of the layer (default: ``Module.param``).
    kernel_name: the name of the param that is the layer's kernel.
  """

  def __init__(self, module: nn.Module, quantizer_for: Callable[[int], Quantizer],
               layout_for: Callable[[int], KernelLayout], mode: str = TRAIN, inputs: Any = None,
               param_fn: Callable | None = None, kernel_name: str = "kernel"):
    self.module = module
    self.kernel_name = kernel_name
    self.quantizer_for = quantizer_for
    self.layout_for = layout_for
    self.mode = check_mode(mode)
    self.inputs = inputs
    self.param_fn = param_fn or functools.partial(nn.Module.param, module)
    self.output_scale = None
    self.bias = None

  def param(self, name: str, init_fn: Callable[..., Any], *init_args, **init_kwargs):
    if name == self.kernel_name:
      shape = tuple(init_args[0] if init_args else init_kwargs["shape"])
      quantizer = self.quantizer_for(len(shape))
      record_layer(tuple(self.module.path), quantizer)
      if quantizer.packed:
        dtype = init_args[1] if len(init_args) > 1 else init_kwargs.get("dtype", self.module.param_dtype)
        codes, scale, neg = packed_params(self.param_fn, quantizer, shape)
        return packed_kernel(after_input(codes, self.inputs), scale, neg, shape, quantizer.per_channel, dtype)
      kernel = self.param_fn(name, init_fn, *init_args, **init_kwargs)
      qparams = {key: self.param_fn(key, lambda _rng, key=key: quantizer.init(kernel)[key])
                 for key in quantizer.param_names}
      used = layer_kernel(quantizer, self.mode, kernel, qparams, self.layout_for(len(shape)))
      self.output_scale = used.output_scale
      return used.kernel
    value = self.param_fn(name, init_fn, *init_args, **init_kwargs)
    if name == "bias" and self.output_scale is not None:  # added after the output scale (finish)
      self.bias = value
      return jnp.zeros_like(value)
    return value

  def finish(self, y: jax.Array) -> jax.Array:
    """The layer's output with the output scale and the held-back bias applied (if any)."""
    return finish_output(y, self.output_scale, self.bias)


def pallas_applies(module: nn.Module) -> bool:
  """Whether a packed ``nn.Dense`` goes through :func:`tgq_jax.kernels.ternary_matmul.ternary_dense`
  (which picks the Pallas kernel for the platform it is lowered for: TPU/GPU, small batches) rather
  than through its dequantized kernel: unless the Pallas mode is "off" or the layer has its own dot."""
  custom_dot = module.dot_general is not None or module.dot_general_cls is not None
  return not custom_dot and ternary_matmul.pallas_mode() != "off"


def packed_dense_pallas(module: nn.Dense, param_fn: Callable, quantizer: Quantizer, inputs,
                        dtype: Any = None) -> jax.Array:
  """A packed ``nn.Dense``'s output computed by the Pallas kernel on its 2-bit codes directly.

  ``dtype``: the compute dtype (a policy's, which overrides the module's); None: the module's own.
  """
  codes, scale, neg = packed_params(param_fn, quantizer, (jnp.shape(inputs)[-1], module.features))
  codes = after_input(codes, inputs)
  bias = param_fn("bias", module.bias_init, (module.features,), module.param_dtype) if module.use_bias else None
  dtype = dtype or module.dtype or jnp.result_type(inputs, module.param_dtype)
  y = ternary_matmul.ternary_dense(jnp.asarray(inputs, dtype), codes, scale, neg)
  if bias is not None:
    y += jnp.reshape(jnp.asarray(bias, dtype), (1,) * (y.ndim - 1) + (-1,))
  return y


class QuantizedLayer:
  """Mixin of ``TernaryDense``/``TernaryConv``: the ``kernel`` param is returned quantized for the
  layer's ``mode``; quantizer params live beside it.

  Attributes (fields of the layers):
    quantizer: "tga" (default), "twn", "ttq" or "fp" (full precision); "packed:..." for inference.
    per_channel: per-output-feature quantizer statistics (TGA, TWN): one per index of the last axis.
    mode: :data:`~tgq_jax.core.kernel.TRAIN` (default) or :data:`~tgq_jax.core.kernel.THRESHOLD_PASS`
      (:func:`tgq_jax.frontends.linen.with_mode` sets it for a whole model).
    activation_bits: None (default), or the bits of the layer's input, quantized per token
      (per pixel for a conv: over the last axis) with
      :func:`~tgq_jax.core.activations.quantize_activations` before the product (8: BitNet's A8).
      The layer's own field: a wrapping policy's ``activation_bits`` does not change it.
  """

  quantizer: str
  per_channel: bool
  mode: str
  activation_bits: int | None

  def __post_init__(self):
    check_activation_bits(self.activation_bits, f"{type(self).__name__}.activation_bits")  # at construction
    super().__post_init__()

  @nn.nowrap
  def quantized_input(self, inputs):
    """``inputs`` as the layer multiplies them: quantized when ``activation_bits`` says so."""
    bits = check_activation_bits(self.activation_bits, f"{type(self).__name__}.activation_bits")
    return inputs if bits is None else quantize_activations(inputs, bits, dense_input_axes())

  def get_quantizer(self) -> Quantizer:
    return get_quantizer(self.quantizer, per_channel=self.per_channel)

  @nn.nowrap
  def param(self, name: str, init_fn: Callable[..., Any], *init_args, **init_kwargs):
    hook = self.__dict__.get("_kernel_hook") or self._new_hook(None)
    return hook.param(name, init_fn, *init_args, **init_kwargs)

  @nn.nowrap
  def _new_hook(self, inputs) -> KernelHook:
    # Dense (in, out) and Conv (*window, in, out): output features on the last axis.
    return KernelHook(self, lambda ndim: self.get_quantizer(), dense_layout, self.mode, inputs,
                      param_fn=super(QuantizedLayer, self).param)

  def __call__(self, inputs, *args, **kwargs):
    hook = self._new_hook(inputs)
    object.__setattr__(self, "_kernel_hook", hook)
    try:
      y = super().__call__(inputs, *args, **kwargs)
    finally:
      object.__setattr__(self, "_kernel_hook", None)
    return hook.finish(y)


class TernaryDense(QuantizedLayer, nn.Dense):
  """``nn.Dense`` with a ternarized kernel; attributes beyond ``nn.Dense``'s: :class:`QuantizedLayer`'s."""

  quantizer: str = "tga"
  per_channel: bool = False
  mode: str = TRAIN
  activation_bits: int | None = None

  @nn.compact
  def __call__(self, inputs):
    inputs = self.quantized_input(inputs)
    if self.get_quantizer().packed and pallas_applies(self):
      return packed_dense_pallas(self, super(QuantizedLayer, self).param, self.get_quantizer(), inputs)
    return super().__call__(inputs)


class TernaryConv(QuantizedLayer, nn.Conv):
  """``nn.Conv`` with a ternarized kernel (HWIO); attributes beyond ``nn.Conv``'s: :class:`QuantizedLayer`'s."""

  quantizer: str = "tga"
  per_channel: bool = False
  mode: str = TRAIN
  activation_bits: int | None = None

  @nn.compact
  def __call__(self, inputs):
    return super().__call__(self.quantized_input(inputs))


# --- the quantized layers of a model ----------------------------------------------


def quantized_layers(model: nn.Module, *args, **kwargs) -> dict[Path, Quantizer]:
  """Maps the params path of every Ternary* layer of ``model`` to its quantizer.

  ``args``/``kwargs`` are an example call (e.g. ``images, train=False``); only
  shapes are traced. Paths are listed in call order. Layers with quantizer "fp" are included (their
  ``Quantizer.ternary`` is False), so every kernel that goes through a
  quantizer is listed.
  """
  paths: dict[Path, Quantizer] = {}

  # Only the call's structure is needed: trace it abstractly. Quantized layers report themselves
  # (TernaryConv/TernaryDense and the layers tgq_jax.ternarize_model intercepts).
  def init(x_args):
    with recording(paths):
      return model.init(jax.random.key(0), *x_args, **kwargs)

  jax.eval_shape(init, args)
  return paths  # in call order: the first layer first


def init_ternary_from_fp(model: nn.Module, fp_variables: Mapping, image_shape: tuple[int, ...]) -> dict:
  """Variables for ternary ``model`` from those of its full-precision twin.

  Every leaf of ``fp_variables`` is copied; the quantizer leaves that
  ``model`` adds (TGA ``delta``, TTQ ``pos_scale``/``neg_scale``) are then
  initialized from the copied kernels by :func:`reinit_thresholds`
  (``delta = 0.05 max|w|``), as the paper does before ternary fine-tuning.
  Works for any model called as ``model.apply(variables, images, train=...)``,
  e.g. every :func:`~tgq_jax.models.create_model` arch.

  Args:
    model: the ternary model (same architecture as the FP one).
    fp_variables: its FP twin's variables (``params``, ``batch_stats``, ...).
      Quantizer leaves in it (a ternary source) are ignored: they are
      recomputed from the kernels.
    image_shape: (H, W, C) of one input image (only traced).

  Raises:
    ValueError: the trees differ beyond quantizer leaves (names or shapes);
      the message lists the differences.
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  # The model's init, traced only: its structure is what is needed, values come from fp_variables.
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  layers = quantized_layers(model, x, train=False)
  target = traverse_util.flatten_dict(nn.unbox(dict(abstract)))
  source = traverse_util.flatten_dict(nn.unbox(dict(fp_variables)))

  out, missing, mismatched = {}, [], []
  for path, leaf in target.items():
    collection, *modules, name = path
    if path in source:
      value = source[path]
      if tuple(value.shape) != tuple(leaf.shape):
        mismatched.append(f"{'/'.join(path)}: got {tuple(value.shape)}, expected {tuple(leaf.shape)}")
      out[path] = value
    elif (collection == "params" and tuple(modules) in layers
          and name in layers[tuple(modules)].param_names):
      out[path] = None  # a quantizer leaf: set by reinit_thresholds below
    else:
      missing.append("/".join(path))
  unexpected = ["/".join(p) for p in source
                if p not in target and not (p[0] == "params" and p[-1] in quantizer_leaf_names())]
  problems = mismatch_problems(missing, unexpected, mismatched, "leaves")
  if problems:
    raise ValueError("fp_variables do not match the model: " + "; ".join(problems))

  # Copied only once everything matches (float64 sources stay float64 under x64); placeholders
  # just carry shape and dtype for reinit_thresholds: the dtype of their layer's kernel.
  out = {path: None if value is None else as_leaf(value, target[path].dtype) for path, value in out.items()}
  for path, value in out.items():
    if value is None:
      kernel = next((out[k] for k in ((*path[:-1], name) for name in KERNEL_KEYS) if out.get(k) is not None), None)
      dtype = target[path].dtype if kernel is None else jnp.promote_types(kernel.dtype, target[path].dtype)
      out[path] = jnp.zeros(target[path].shape, dtype)
  variables = traverse_util.unflatten_dict(out)
  # Jitted: eager, each quantizer's init dispatches op by op, slow for deep models.
  variables["params"] = jax.jit(lambda params: reinit_thresholds(params, layers))(variables["params"])
  return variables
