"""Shared pieces of the trainer tests: tiny registered models and quick configs."""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import subprocess
import time
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tgq_jax import data, models
from tgq_jax.training import algorithm, harness, parallel
from tgq_jax.training.configs import Config
from tgq_jax.training.tga import TGA
from tgq_jax.frontends.linen_layers import quantized_layers
from tgq_jax.models.resnet import CifarResNet
from tgq_jax.models.small_cnn import SmallCNN
from tgq_jax.models.vit import ViT

# conv -> relu -> mean-pool -> dense, without BatchNorm: data parallel == single device exactly.
from export_models import ConvHead as NoBNNet  # noqa: E402  (tests/ is on sys.path, as for this module)


class DropoutNet(nn.Module):
  """dense -> relu -> dropout(0.5) -> dense: a model whose training step needs a dropout key."""

  num_classes: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(32, dtype=self.dtype, name="hidden")(x.reshape((x.shape[0], -1))))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


models.register("tiny_cnn", SmallCNN, widths=(4, 8))
models.register("tiny_cnn_wide", SmallCNN, widths=(4, 6))
models.register("nobn", NoBNNet)
models.register("dropout_net", DropoutNet)
# BatchNorm without max-pooling: ternary kernels on uint8 images give exactly tied activations,
# and max-pooling then routes the gradient by last-bit rounding (a subgradient choice).
models.register("tiny_resnet", CifarResNet, depth=8, width=4)
# A one-block ViT on 28x28x1 (4x4 patches of 7x7): attention (DenseGeneral q/k/v/out), MLP, dropout.
models.register("tiny_vit", ViT, patch_size=7, hidden_size=16, depth=1, num_heads=2, mlp_dim=32)

SYNTH = dict(image_shape=(28, 28, 1), num_train=512, num_test=128)
SYNTH_ARGS = ["--dataset", "synthetic", "--image-shape", "28", "28", "1", "--num-train", "512",
              "--num-test", "128"]
QUICK = Config(arch="tiny_cnn", dataset="synthetic", batch_size=32, eval_batch_size=64, epochs=2,
               log_every=1, optimizer="sgd", lr=0.05, threshold_lr=0.01, **SYNTH)


def synthetic_batches(n: int, batch_size: int = 32, seed: int = 0, image_shape=None) -> list[dict]:
  kw = SYNTH if image_shape is None else {**SYNTH, "image_shape": image_shape}
  it = data.get_dataset("synthetic", **kw).train_iterator(global_batch_size=batch_size, seed=seed)
  return [next(it) for _ in range(n)]


def quick(tmp_path, **kw) -> Config:
  return dataclasses.replace(QUICK, workdir=str(tmp_path), **kw)


def mesh_of(n: int) -> Mesh:
  return Mesh(np.asarray(jax.devices()[:n]), (parallel.AXIS,))


class Built(NamedTuple):
  """What :func:`build` makes: the trainer's pieces for ``cfg``, with per-device step functions."""

  model: nn.Module
  layers: dict
  tga: TGA
  state: algorithm.TrainState
  train_fn: Callable
  eval_fn: Callable


def build(cfg: Config, num_classes: int = 10, image_shape=(28, 28, 1), steps_per_epoch: int = 16,
          dtype=None) -> Built:
  """The model, its quantized layers, the TGA update, the initial state and the per-device step functions.

  ``dtype=jnp.float64`` (inside ``jax.enable_x64(True)``): the model computes in float64 and every
  float leaf of the state is float64.
  """
  model = harness.make_model(cfg, num_classes, dtype)
  layers = quantized_layers(model, jnp.zeros((1, *image_shape)), train=False)
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, *image_shape)))["params"]
  tga, _ = harness.make_tga(cfg, algorithm.param_labels(params, layers), steps_per_epoch)
  state = harness.create_state(model, image_shape, tga, cfg.seed)
  if dtype is not None:
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  train_fn, eval_fn = harness.make_step_fns(model, tga, cfg, num_classes)
  return Built(model, layers, tga, state, train_fn, eval_fn)


def run_steps(train_fn, state, batches, mesh, kind):
  step = parallel.map_step(train_fn, mesh, kind)
  state = parallel.put_state(state, mesh, kind)
  losses = []
  for batch in batches:
    state, metrics = step(state, parallel.put_batch(batch, mesh, kind))
    losses.append(float(harness.to_host(metrics["loss"])))
  return harness.to_host(state), losses


def popen_until_logged(cmd: list[str], env: dict, metrics: pathlib.Path, rows: int = 2,
                       timeout: float = 180) -> subprocess.Popen:
  """``cmd`` (a long train.py run) started, returned once ``metrics`` holds ``rows`` rows (it is training)."""
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while not (metrics.exists() and metrics.read_text().count("\n") >= rows):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.2)
  return proc
