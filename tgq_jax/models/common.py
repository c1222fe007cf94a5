"""Building blocks the zoo's models share: the logits dtype rule and a BatchNorm that can keep torch's
running variance."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def output_dtype(dtype: Any) -> jnp.dtype:
  """A model's logits dtype: float32 at least (bfloat16 models give float32 logits); float64 stays."""
  return jnp.promote_types(dtype, jnp.float32)


class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` that can also keep torch's running variance.

  Attributes (beyond ``nn.BatchNorm``'s):
    unbiased_running_var: fold the *unbiased* batch variance (``n / (n - 1)``
      times the biased one, ``n`` the number of values per channel over the
      whole batch, all devices of ``axis_name`` included) into the running
      average, as ``torch.nn.BatchNorm2d`` does. Normalization itself uses the
      biased variance either way (as torch does too). Default False: flax's
      rule, the biased variance.
  """

  unbiased_running_var: bool = False

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_ra = nn.module.merge_param("use_running_average", self.use_running_average, use_running_average)
    correct = self.unbiased_running_var and not use_ra and not self.is_initializing()
    old = self.get_variable("batch_stats", "var") if correct else None
    y = super().__call__(x, use_running_average, mask=mask)
    if correct and self.is_mutable_collection("batch_stats"):
      if mask is not None:
        raise NotImplementedError("BatchNorm: unbiased_running_var with a mask.")
      n = x.size // np.prod([x.shape[a] for a in _feature_axes(x.ndim, self.axis)])
      if self.axis_name is not None:
        n = n * jax.lax.psum(1, self.axis_name)
      new = self.get_variable("batch_stats", "var")
      # new = m old + (1 - m) v  with v the biased variance; torch keeps m old + (1 - m) v n / (n - 1),
      # i.e. new + (1 - m) v / (n - 1) = new + (new - m old) / (n - 1).
      self.put_variable("batch_stats", "var", new + (new - self.momentum * old) / (n - 1))
    return y


def _feature_axes(ndim: int, axis) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axes)
