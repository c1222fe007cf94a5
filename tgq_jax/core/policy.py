"""Which layers are quantized, and how: :class:`QuantPolicy`.

One frozen dataclass says everything a model needs to know about its
quantization (the quantizer, per-channel statistics, which layers, the
compute dtype). :func:`tgq_jax.ternarize_model` (Linen),
:func:`tgq_jax.frontends.nnx.ternarize_model` (NNX) and the model zoo
(:func:`tgq_jax.models.create_model`) all take one.

Layers are chosen by their module path, ``"/"``-joined below the model the
policy is applied to (``"layer1_0/conv1"``, ``"encoder/block_3/attn/query"``):
a layer is quantized when its path matches one of ``include`` and none of
``exclude`` (Python regular expressions, matched against the whole path with
``re.fullmatch``), and, for the first and the last of those matched layers in
call order (a network's stem and classifier), when ``ternary_first`` /
``ternary_last`` allow it. Candidate layers are those whose kernel a
quantizer can take: Linen ``Dense``, ``Conv``, ``DenseGeneral``, ``Einsum``;
NNX ``Linear``, ``Conv``, ``LinearGeneral``, ``Einsum``; and, with ``embeddings=True``,
``Embed`` tables (Linen and NNX). Other layers with a kernel (``ConvTranspose``,
``ConvLocal``) stay full precision, and ``on_unquantized`` says whether that is
reported; an ``Embed`` left full precision (``embeddings=False``, the default) is a
choice of the policy and is not reported.

``activation_bits`` adds BitNet b1.58's activation quantization (W1.58A8 with 8):
the input of every layer the policy selects is quantized per token
(:func:`tgq_jax.core.activations.quantize_activations`) before the layer multiplies it
by its kernel, whatever the weight quantizer ("fp" too: W32A8), in every mode and
in the packed inference form. Never at an ``Embed`` (a lookup has no matmul input).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from tgq_jax.core.activations import check_activation_bits
from tgq_jax.core.quantizers import PACKED_PREFIX, Quantizer, get_quantizer, packed_name


#: The values of :attr:`QuantPolicy.on_unquantized`.
ON_UNQUANTIZED = ("warn", "error", "ignore")


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
  """How a model is quantized.

  Attributes:
    quantizer: a registered quantizer name (:func:`tgq_jax.core.quantizers.quantizer_names`:
      "tga", "twn", "ttq", "absmean", "fp", ...), or "packed:<name>" for the
      inference form (layers hold 2-bit codes; see :mod:`tgq_jax.export`).
    per_channel: one statistic (threshold, scale) per output feature of each
      kernel instead of one per kernel. Output features are the kernel's
      output axes: the last for Dense and Conv, all of ``features`` for
      DenseGeneral (``heads x head_dim`` slices), the axes of an Einsum kernel
      that appear in its output.
    include: regular expressions; a layer whose path fully matches one is a candidate.
    exclude: regular expressions; a layer whose path fully matches one stays full precision.
    ternary_first: quantize the first matched layer in call order (a stem conv, a patch embedding).
    ternary_last: quantize the last matched layer in call order (the classifier).
    dtype: compute dtype of the quantized layers (e.g. ``jnp.bfloat16``); None
      keeps each layer's own. Kernels and thresholds stay in their param dtype.
    on_unquantized: what ``ternarize_model`` does (Linen and NNX alike, see
      :func:`tgq_jax.core.kernel.check_coverage`) about a layer the patterns select
      whose kernel no quantizer takes (a transposed or unshared conv)
      and about an include/exclude pattern that matches no quantizable layer:
      "warn" (an :class:`~tgq_jax.core.kernel.UnquantizedLayerWarning`), "error"
      (ValueError) or "ignore". Nothing is reported for a policy that quantizes
      nothing (``"fp"``).
    activation_bits: None (default): the layers' inputs stay full precision. An integer
      in [2, 16]: the input of each layer the policy selects is quantized to that many
      bits per token (absmax scale over the axes the layer contracts: the last for
      Dense and Conv, ``axis`` for DenseGeneral, the contracted letters of an Einsum),
      straight-through gradient; 8 is BitNet b1.58's A8
      (:func:`tgq_jax.core.activations.quantize_activations`).
    embeddings: quantize ``Embed`` tables too (Linen ``nn.Embed``, NNX ``nnx.Embed``): they
      become candidate layers like Dense (include/exclude, first/last in call order;
      the table's feature axis, the last, is its output-feature axis). Default False:
      embeddings stay full precision, unreported.
  """

  quantizer: str = "tga"
  per_channel: bool = False
  include: tuple[str, ...] = (".*",)
  exclude: tuple[str, ...] = ()
  ternary_first: bool = True
  ternary_last: bool = True
  dtype: Any = None
  on_unquantized: str = "warn"
  activation_bits: int | None = None
  embeddings: bool = False

  def __post_init__(self):
    for name in ("include", "exclude"):
      value = getattr(self, name)
      if isinstance(value, str):
        value = (value,)
      object.__setattr__(self, name, tuple(value))
      for pattern in getattr(self, name):
        try:
          re.compile(pattern)
        except (re.error, TypeError) as e:
          raise ValueError(f"QuantPolicy.{name}: {pattern!r} is not a regular expression ({e}).") from None
    if self.dtype is not None:
      object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    if self.on_unquantized not in ON_UNQUANTIZED:
      raise ValueError(f"QuantPolicy.on_unquantized must be one of {', '.join(map(repr, ON_UNQUANTIZED))}, "
                       f"got {self.on_unquantized!r}.")
    check_activation_bits(self.activation_bits, "QuantPolicy.activation_bits")
    if not isinstance(self.embeddings, bool):
      raise ValueError(f"QuantPolicy.embeddings must be True or False, got {self.embeddings!r:.60}.")
    self.layer_quantizer((0,))  # validates the name and per-channel support now, not at trace time

  @property
  def packed(self) -> bool:
    return self.quantizer.startswith(PACKED_PREFIX)

  @property
  def ternary(self) -> bool:
    """Whether the policy quantizes anything (False for the full-precision twin)."""
    return get_quantizer(self.quantizer).ternary

  def as_packed(self) -> QuantPolicy:
    """The inference form of this policy: same layers, 2-bit packed kernels."""
    if not self.ternary:
      return self
    return dataclasses.replace(self, quantizer=packed_name(self.quantizer))

  def matches(self, path: str | Sequence[str]) -> bool:
    """Whether a layer at ``path`` is a candidate (include / exclude; first/last are decided by order)."""
    path = path if isinstance(path, str) else "/".join(path)
    return (any(re.fullmatch(p, path) for p in self.include)
            and not any(re.fullmatch(p, path) for p in self.exclude))

  def layer_quantizer(self, channel_axes: tuple[int, ...] | bool) -> Quantizer:
    """The quantizer for one kernel whose output-feature axes are ``channel_axes``."""
    per_channel = channel_axes if self.per_channel else False
    return get_quantizer(self.quantizer, per_channel=per_channel)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready form (the model spec in config.json and in the packed file's header)."""
    d = dataclasses.asdict(self)
    d["include"], d["exclude"] = list(self.include), list(self.exclude)
    d["dtype"] = None if self.dtype is None else jnp.dtype(self.dtype).name
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> QuantPolicy:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"QuantPolicy: unknown fields {sorted(unknown)}.")
    return cls(**{k: tuple(v) if k in ("include", "exclude") else v for k, v in d.items()})
