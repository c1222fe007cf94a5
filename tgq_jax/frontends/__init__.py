"""The Flax front ends: thin adapters that say how a layer is reached (Linen by interception and the
explicit ``Ternary*`` layers, NNX by swapping a layer's class) over :mod:`tgq_jax.core`.

:func:`ternarize_model` is the one front door for both (``tgq_jax.ternarize_model``)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx as flax_nnx

from tgq_jax.core.policy import QuantPolicy
from tgq_jax.frontends import linen, nnx


def ternarize_model(model: Any, policy: QuantPolicy | None = None, *example_args, **example_kwargs) -> Any:
  """``model`` with ternary kernels where ``policy`` says, for a Linen or an NNX model.

  * A ``flax.linen`` Module: :func:`tgq_jax.frontends.linen.ternarize_model` returns a new
    module called exactly as ``model`` (the first/last layer is found when it is called, so
    an example call is not needed and is ignored).
  * A ``flax.nnx`` Module: :func:`tgq_jax.frontends.nnx.ternarize_model` makes the selected
    layers ternary in place and returns ``model``; an example call (arrays or
    ``jax.ShapeDtypeStruct``) is needed when ``policy.ternary_first`` or ``ternary_last`` is False.

  Example::

    linen_model = tgq_jax.ternarize_model(MyLinenNet(), tgq_jax.QuantPolicy("tga", ternary_last=False))
    nnx_model = tgq_jax.ternarize_model(MyNnxNet(rngs=nnx.Rngs(0)), tgq_jax.QuantPolicy("tga", ternary_last=False), x)
  """
  if isinstance(model, nn.Module):
    return linen.ternarize_model(model, policy)
  if isinstance(model, flax_nnx.Module):
    return nnx.ternarize_model(model, policy, *example_args, **example_kwargs)
  raise TypeError(f"ternarize_model takes a flax.linen or flax.nnx Module, got {type(model).__name__}.")
