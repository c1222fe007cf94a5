"""The README's "Ternarize your own model" examples run as written, on models defined here."""
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _examples() -> list[str]:
  """The Linen and the NNX example of the "Ternarize your own model" section."""
  section = README.read_text().split("## Ternarize your own model")[1].split("\n## ")[0]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = x.reshape(x.shape[0], -1, 8)
    x = x + nn.MultiHeadDotProductAttention(2)(x)
    return nn.Dense(3)(jnp.mean(x, axis=1))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2)))


def _data():
  x = jax.random.normal(jax.random.key(0), (6, 6, 6, 1))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  return x, [(x, y)] * 2


def test_readme_examples_are_short_and_run():
  linen, nnx_example = _examples()
  for code in (linen, nnx_example):
    assert len([line for line in code.splitlines() if line.strip()]) <= 10, code
  x, batches = _data()
  scope = {"MyNet": LinenNet, "x": x, "batches": batches}
  exec(linen, scope)
  assert int(scope["state"].step) == 2 and np.isfinite(float(scope["metrics"]["loss"]))
  scope = {"MyNet": NnxNet, "x": x, "batches": batches}
  exec(nnx_example, scope)
  assert np.isfinite(float(scope["info"].loss)) and np.isfinite(float(scope["info"].threshold_pass_loss))
  assert scope["model"].conv.delta.get_value().shape == ()  # the first conv is ternary, the head is not
  assert not hasattr(scope["model"].head, "delta")
