"""Quantized layers: the kernel hook shared by interception and the explicit ``Ternary*`` layers.

:class:`KernelHook` is what a quantized layer's ``param`` does: its
``"kernel"`` comes back quantized, the quantizer's own parameters (TGA:
``delta``; TTQ: ``pos_scale``, ``neg_scale``) are created beside it from the
initialized kernel, so an optimizer can label them by name.
:func:`tgq_jax.ternarize_model` installs it on the ``nn.Dense``/``nn.Conv``/
``nn.DenseGeneral``/``nn.Einsum`` layers of any model; ``TernaryDense`` /
``TernaryConv`` are ``nn.Dense`` / ``nn.Conv`` with it built in (every
constructor argument of theirs works the same), for hand-written models.

The quantizer sees the kernel in ``param_dtype`` (float32 by default): with
``dtype=jnp.bfloat16`` the layer computes in bfloat16 on the ternarized
kernel while the quantizer's statistics stay in float32.

Packed (inference) mode: with a packed quantizer (``QuantPolicy("packed:tga")``,
``create_model(..., packed=True)``; see :func:`tgq_jax.core.quantizers.packed_name`)
the layer holds no float kernel. Its ``params`` are ``codes`` (``uint8 (ceil(K/4), N)``,
2-bit codes in the planar layout of :mod:`tgq_jax.kernels.ternary_matmul`),
``scale`` (float32, scalar or per output feature) and, for TTQ, ``neg_scale``;
the kernel is rebuilt from them inside the layer's call (so inside the
compiled forward, one layer at a time) with the values the trained layer
computes with. On GPU/TPU a packed ``TernaryDense`` multiplies by the Pallas
ternary kernel instead (codes unpacked on chip, scale after accumulation).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax import traverse_util

from tgq_jax.kernels import ternary_matmul as _tm
from tgq_jax.core.quantizers import Quantizer, get_quantizer, quantizer_names
from tgq_jax.core.ternarize import channel_axes, stat_shape

Path = tuple[str, ...]

# The input of the packed layer being called (set while its __call__ runs; read when its kernel is built).
_LAYER_INPUT: contextvars.ContextVar = contextvars.ContextVar("tgq_packed_layer_input", default=None)


@contextlib.contextmanager
def _layer_input(inputs):
  token = _LAYER_INPUT.set(inputs)
  try:
    yield
  finally:
    _LAYER_INPUT.reset(token)


def _after_input(codes: jax.Array) -> jax.Array:
  """``codes``, made to depend on the current packed layer's input: its kernel is rebuilt just in time.

  Without a data dependence XLA schedules every layer's unpacking at the start
  of the forward pass and holds all float kernels at once (``optimization_barrier``
  does not prevent it on CPU). ``x * 0`` is +-0 or NaN, and both convert to the
  integer 0, so the codes are unchanged; XLA cannot fold a float ``x * 0``, so the
  dependence stays.
  """
  x = _LAYER_INPUT.get()
  if x is None:
    return codes
  first = jnp.reshape(x, (-1,))[0]
  return codes | (first * 0).astype(codes.dtype)


_THRESHOLD_PASS = contextvars.ContextVar("tgq_threshold_pass", default=False)


@contextlib.contextmanager
def threshold_pass() -> Iterator[None]:
  """Traces the layers for a pass whose gradient is wanted for the thresholds alone.

  Within it, a layer whose quantizer has thresholds (TGA) computes
  ``alpha * (x conv q) + bias`` instead of ``(x conv alpha q) + bias``: the same
  output, but ``dL/dalpha`` then comes from the output (an element-wise product)
  and the kernel-gradient convolutions, a third of the backward pass, are not
  computed. The kernels receive no gradient. The sequential update's first pass
  runs in it (:func:`tgq_jax.training.harness.train_step`). It acts at trace time.
  """
  token = _THRESHOLD_PASS.set(True)
  try:
    yield
  finally:
    _THRESHOLD_PASS.reset(token)


# The recorder of quantized_layers: {params path: Quantizer}, or None when nobody is listening.
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


def packed_kernel(param_fn: Callable, quantizer: Quantizer, shape: tuple[int, ...], dtype) -> jax.Array:
  """The kernel of ``shape`` rebuilt from a packed layer's ``codes``/``scale``/(``neg_scale``) params.

  ``param_fn`` is the layer's (unshadowed) ``Module.param``. Codes are in the
  planar layout of :mod:`tgq_jax.kernels.ternary_matmul` over the kernel
  flattened to ``(prod(shape[:-1]), shape[-1])``; the scale has the
  quantizer's statistic shape (a scalar, or the output-feature axes).
  """
  codes, scale, neg = packed_params(param_fn, quantizer, shape)
  axes = channel_axes(len(shape), quantizer.per_channel)
  if axes in ((), (len(shape) - 1,)):
    return _tm.dequantize_planar(codes, scale, neg, shape, dtype)
  # Output features on other axes (DenseGeneral heads x head_dim, Einsum): codes times the broadcast scale.
  keep = tuple(shape[i] if i in axes else 1 for i in range(len(shape)))
  unit = _tm.dequantize_planar(codes, jnp.ones((), dtype), None, shape, dtype)
  return unit * jnp.reshape(scale, keep).astype(dtype)


def packed_params(param_fn: Callable, quantizer: Quantizer, shape: tuple[int, ...]):
  """A packed layer's (codes, scale, neg_scale or None) for a kernel of ``shape``."""
  k4, n = _tm.planar_shape(shape)
  scale_shape = stat_shape(shape, quantizer.per_channel)
  codes = _after_input(param_fn("codes", lambda _rng: jnp.zeros((k4, n), jnp.uint8)))
  scale = param_fn("scale", lambda _rng: jnp.zeros(scale_shape, jnp.float32))
  neg = None if quantizer.symmetric else param_fn("neg_scale", lambda _rng: jnp.zeros(scale_shape, jnp.float32))
  return codes, scale, neg


class KernelHook:
  """What a quantized layer's ``param`` does, for one call of the layer.

  The layer's ``"kernel"`` request returns the quantized kernel (its quantizer
  parameters created beside it, from the kernel); under :func:`threshold_pass`
  it returns the codes and keeps the scale, which :meth:`finish` applies to
  the output (then the bias, which is held back meanwhile). A packed layer's
  ``"kernel"`` is rebuilt from its codes and scales.

  Args:
    module: the layer (bound).
    quantizer_for: ``kernel_ndim -> Quantizer`` for this layer's kernel.
    scale_broadcasts: ``(channel_axes, kernel_ndim) -> bool``: whether a
      per-channel scale multiplies the layer's output directly (else the
      threshold pass quantizes the kernel as usual: same gradients, no saving).
    param_fn: the unshadowed ``param`` of the layer (default: ``Module.param``).
  """

  def __init__(self, module: nn.Module, quantizer_for: Callable[[int], Quantizer],
               scale_broadcasts: Callable[[tuple[int, ...], int], bool] | None = None,
               param_fn: Callable | None = None):
    self.module = module
    self.quantizer_for = quantizer_for
    self.scale_broadcasts = scale_broadcasts or (lambda axes, ndim: axes in ((), (ndim - 1,)))
    self.param_fn = param_fn or functools.partial(nn.Module.param, module)
    self.scale = None
    self.bias = None

  def param(self, name: str, init_fn: Callable[..., Any], *init_args, **init_kwargs):
    if name == "kernel":
      shape = tuple(init_args[0] if init_args else init_kwargs["shape"])
      quantizer = self.quantizer_for(len(shape))
      record_layer(tuple(self.module.path), quantizer)
      if quantizer.packed:
        dtype = init_args[1] if len(init_args) > 1 else init_kwargs.get("dtype", self.module.param_dtype)
        return packed_kernel(self.param_fn, quantizer, shape, dtype)
      return self._quantized(quantizer, self.param_fn(name, init_fn, *init_args, **init_kwargs))
    value = self.param_fn(name, init_fn, *init_args, **init_kwargs)
    if name == "bias" and self.scale is not None:  # threshold pass: added after the scale (finish)
      self.bias = value
      return jnp.zeros_like(value)
    return value

  def _quantized(self, quantizer: Quantizer, kernel: jax.Array) -> jax.Array:
    qparams = {key: self.param_fn(key, lambda _rng, key=key: quantizer.init(kernel)[key])
               for key in quantizer.param_names}
    axes = channel_axes(kernel.ndim, quantizer.per_channel)
    split = None
    if _THRESHOLD_PASS.get() and self.scale_broadcasts(axes, kernel.ndim):
      split = quantizer.threshold_split(kernel, qparams)
    if split is None:
      return quantizer(kernel, qparams)
    codes, scale = split
    self.scale = jnp.reshape(scale, stat_shape(kernel.shape, quantizer.per_channel))
    return codes.astype(kernel.dtype)

  def finish(self, y: jax.Array) -> jax.Array:
    """The layer's output with the threshold pass's scale and held-back bias applied."""
    if self.scale is None:
      return y
    y = y * self.scale.astype(y.dtype)  # () per tensor, the output-feature shape per channel
    return y if self.bias is None else y + self.bias.astype(y.dtype)


def pallas_applies(module: nn.Module) -> bool:
  """Whether a packed ``nn.Dense`` goes through :func:`tgq_jax.kernels.ternary_matmul.ternary_dense`
  (which picks the Pallas kernel for the platform it is lowered for: TPU/GPU, small batches) rather
  than through its dequantized kernel: unless the Pallas mode is "off" or the layer has its own dot."""
  custom_dot = module.dot_general is not None or module.dot_general_cls is not None
  return not custom_dot and _tm.pallas_mode() != "off"


def packed_dense_pallas(module: nn.Dense, param_fn: Callable, quantizer: Quantizer, inputs,
                        dtype: Any = None) -> jax.Array:
  """A packed ``nn.Dense``'s output computed by the Pallas kernel on its 2-bit codes directly.

  ``dtype``: the compute dtype (a policy's, which overrides the module's); None: the module's own.
  """
  with _layer_input(inputs):
    codes, scale, neg = packed_params(param_fn, quantizer, (jnp.shape(inputs)[-1], module.features))
  bias = param_fn("bias", module.bias_init, (module.features,), module.param_dtype) if module.use_bias else None
  dtype = dtype or module.dtype or jnp.result_type(inputs, module.param_dtype)
  y = _tm.ternary_dense(jnp.asarray(inputs, dtype), codes, scale, neg)
  if bias is not None:
    y += jnp.reshape(jnp.asarray(bias, dtype), (1,) * (y.ndim - 1) + (-1,))
  return y


class _QuantizedKernel:
  """Mixin: the ``kernel`` param is returned ternarized; quantizer params live beside it."""

  quantizer: str
  per_channel: bool

  def get_quantizer(self) -> Quantizer:
    return get_quantizer(self.quantizer, per_channel=self.per_channel)

  @nn.nowrap
  def param(self, name: str, init_fn: Callable[..., Any], *init_args, **init_kwargs):
    hook = self.__dict__.get("_kernel_hook") or self._new_hook()
    return hook.param(name, init_fn, *init_args, **init_kwargs)

  @nn.nowrap
  def _new_hook(self) -> KernelHook:
    return KernelHook(self, lambda ndim: self.get_quantizer(),
                      param_fn=super(_QuantizedKernel, self).param)

  def __call__(self, inputs, *args, **kwargs):
    hook = self._new_hook()
    object.__setattr__(self, "_kernel_hook", hook)
    try:
      with _layer_input(inputs):
        y = super().__call__(inputs, *args, **kwargs)
    finally:
      object.__setattr__(self, "_kernel_hook", None)
    return hook.finish(y)


class TernaryDense(_QuantizedKernel, nn.Dense):
  """``nn.Dense`` with a ternarized kernel.

  Attributes (beyond ``nn.Dense``'s):
    quantizer: "tga" (default), "twn", "ttq" or "fp" (full precision); "packed:..." for inference.
    per_channel: per-output-feature quantizer statistics (TGA, TWN).
  """

  quantizer: str = "tga"
  per_channel: bool = False

  @nn.compact
  def __call__(self, inputs):
    if self.get_quantizer().packed and pallas_applies(self):
      return packed_dense_pallas(self, super(_QuantizedKernel, self).param, self.get_quantizer(), inputs)
    return super().__call__(inputs)


class TernaryConv(_QuantizedKernel, nn.Conv):
  """``nn.Conv`` with a ternarized kernel (HWIO; statistics per tensor or per output channel).

  Attributes (beyond ``nn.Conv``'s):
    quantizer: "tga" (default), "twn", "ttq" or "fp" (full precision); "packed:..." for inference.
    per_channel: per-output-channel quantizer statistics (TGA, TWN).
  """

  quantizer: str = "tga"
  per_channel: bool = False

  @nn.compact
  def __call__(self, inputs):
    return super().__call__(inputs)


# --- tools over a params tree ------------------------------------------------


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


def _subtree(params: Mapping, path: Path) -> Mapping:
  node = params
  for key in path:
    node = node[key]
  return node


def _quantizer_params(layer: Mapping, quantizer: Quantizer) -> dict[str, jax.Array]:
  return {key: layer[key] for key in quantizer.param_names}


def reinit_thresholds(params: Mapping, layers: Mapping[Path, Quantizer]) -> dict:
  """Re-initializes every quantizer parameter from the current kernels.

  TGA's ``delta = 0.05 max|w|`` (the authors do this after loading full-precision
  weights, before ternary fine-tuning); TTQ's scales likewise from the kernel.
  Returns a new tree; ``params`` is not modified.
  """
  params = jax.tree.map(lambda x: x, dict(params))  # fresh containers, shared leaves

  def set_in(tree, path, values):
    node = tree
    for key in path[:-1]:
      node[key] = dict(node[key])
      node = node[key]
    node[path[-1]] = {**node[path[-1]], **values}

  for path, quantizer in layers.items():
    if not quantizer.param_names:
      continue
    layer = _subtree(params, path)
    fresh = quantizer.init(layer["kernel"])
    set_in(params, path, {k: jnp.asarray(v, layer[k].dtype) for k, v in fresh.items()})
  return params


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Statistics of one quantized layer, as the trainer logs and the exporter reports."""

  name: str  # "/"-joined params path
  shape: tuple[int, ...]
  num_weights: int
  quantizer: str
  sparsity: float  # fraction of zero codes (0 for full-precision layers)
  # None for full-precision layers (JSON null: metrics files stay standard JSON).
  scale: float | None  # value of a +1 code (mean over channels for per-channel statistics)
  neg_scale: float | None  # magnitude of a -1 code
  threshold: float | None  # clipped threshold t (mean over channels)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@functools.lru_cache(maxsize=None)
def _stats_fn(quantizer: Quantizer):
  """Sparsity and the mean scale, negative scale and threshold of a kernel, as one jitted function
  (op by op, each jnp call compiled on its own: ~140 small XLA:CPU compilations, ~11 s of the demo)."""

  def stats(kernel, qparams):
    parts = quantizer.parts(kernel, qparams)
    return (jnp.mean(parts.codes == 0), *(jnp.mean(x) for x in (parts.scale, parts.neg_scale, parts.threshold)))

  return jax.jit(stats)


def layer_stats(params: Mapping, layers: Mapping[Path, Quantizer]) -> list[LayerStats]:
  """Per-layer statistics of the quantized layers of a params tree.

  ``layers`` is :func:`quantized_layers` of the model. Full-precision layers
  report sparsity 0 and None for scale and threshold.
  """
  out = []
  for path, quantizer in layers.items():
    layer = _subtree(params, path)
    kernel = layer["kernel"]
    n = int(np.prod(kernel.shape))
    if quantizer.ternary:
      sparsity, scale, neg, thr = map(float, _stats_fn(quantizer)(kernel, _quantizer_params(layer, quantizer)))
    else:
      sparsity, scale, neg, thr = 0.0, None, None, None
    out.append(LayerStats("/".join(path), tuple(kernel.shape), n, quantizer.name, sparsity, scale, neg, thr))
  return out


# Every quantizer leaf name any quantizer may create (a source model may be ternary already).
def _quantizer_leaves() -> frozenset[str]:
  return frozenset(n for q in quantizer_names() for n in get_quantizer(q).param_names)


def _list_keys(keys) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:20])
  return shown + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")


def _mismatch_problems(missing, unexpected, mismatched, noun: str, shapes: str = "shape mismatches") -> list[str]:
  """What differs between two trees, one phrase per kind (empty when they match)."""
  problems = []
  if missing:
    problems.append(f"missing {noun}: {_list_keys(missing)}")
  if unexpected:
    problems.append(f"unexpected {noun}: {_list_keys(unexpected)}")
  if mismatched:
    problems.append(f"{shapes}: {'; '.join(mismatched)}")
  return problems


def as_leaf(value: Any, dtype: Any) -> jax.Array:
  """``value`` as a leaf of ``dtype``, kept wider when it is a wider float.

  A float64 source stays float64 under ``jax_enable_x64`` (and becomes
  float32 without it, as every jax array does); float32 or narrower sources
  become ``dtype``.
  """
  source = jnp.result_type(value) if isinstance(value, jax.Array) else np.asarray(value).dtype
  if jnp.issubdtype(source, jnp.floating) and jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.promote_types(source, dtype)
  return jnp.asarray(value, jax.dtypes.canonicalize_dtype(dtype))


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
                if p not in target and not (p[0] == "params" and p[-1] in _quantizer_leaves())]
  problems = _mismatch_problems(missing, unexpected, mismatched, "leaves")
  if problems:
    raise ValueError("fp_variables do not match the model: " + "; ".join(problems))

  # Copied only once everything matches (float64 sources stay float64 under x64); placeholders
  # just carry shape and dtype for reinit_thresholds: the dtype of their layer's kernel.
  out = {path: None if value is None else as_leaf(value, target[path].dtype) for path, value in out.items()}
  for path, value in out.items():
    if value is None:
      kernel = out.get((*path[:-1], "kernel"))
      dtype = target[path].dtype if kernel is None else jnp.promote_types(kernel.dtype, target[path].dtype)
      out[path] = jnp.zeros(target[path].shape, dtype)
  variables = traverse_util.unflatten_dict(out)
  # Jitted: eager, each quantizer's init dispatches op by op, slow for deep models.
  variables["params"] = jax.jit(lambda params: reinit_thresholds(params, layers))(variables["params"])
  return variables
