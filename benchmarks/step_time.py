"""Step-time ratios TGA-joint / FP and TGA-sequential / FP, measured in one run on synthetic data.

    python benchmarks/step_time.py [--archs resnet20 resnet18] [--steps 10] [--rounds 3]

Cases: ResNet-20 (batch 128, 32x32x3, 10 classes) and ResNet-18 (batch 8,
224x224x3, 1000 classes). Targets: joint <= 1.05, sequential <= 2.05 (the
sequential step runs two forward/backward passes by design; the quantizer's
mean/std reductions are small next to the convolutions). The full-precision
baseline is the same model with ``quantizer="fp"`` (no threshold parameters,
so its step is a single pass). The three variants are timed round-robin,
``--rounds`` times, and the median step time of each is used, so a noisy
shared machine disturbs them alike.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tgq_jax import QuantPolicy, models  # noqa: E402
from tgq_jax.training import algorithm, harness, parallel, xla_cpu  # noqa: E402
from tgq_jax.training.configs import Config  # noqa: E402
from tgq_jax.frontends.linen_layers import quantized_layers  # noqa: E402

CASES = {"resnet20": (128, (32, 32, 3), 10), "resnet18": (8, (224, 224, 3), 1000),
         "small_cnn": (128, (28, 28, 1), 10)}  # not run by default; checks the script itself
VARIANTS = (("fp", "joint"), ("tga", "joint"), ("tga", "sequential"))


def build_step(arch: str, quantizer: str, update: str, batch: int, image_shape, num_classes: int,
               dtype=jnp.float32, **config):
  """A jitted single-device train step and its initial state and batch (``dtype``: activations;
  ``config``: Config fields of the optimizers, SGD 0.01 by default)."""
  cfg = Config(arch=arch, quantizer=quantizer, update=update, **{"optimizer": "sgd", "lr": 0.01, **config})
  model = models.create_model(arch, num_classes, dtype=dtype, quant=QuantPolicy(quantizer=quantizer))
  layers = quantized_layers(model, jnp.zeros((1, *image_shape)), train=False)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, *image_shape)))["params"]
  tga, _ = harness.make_tga(cfg, algorithm.param_labels(shapes, layers), 100)
  state = harness.create_state(model, image_shape, tga, 0)
  fn, _ = harness.make_step_fns(model, tga, cfg, num_classes)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,))
  step = parallel.map_step(fn, mesh, "shard_map")
  rng = np.random.default_rng(0)
  batch = parallel.put_batch({"image": rng.normal(size=(batch, *image_shape)).astype(np.float32),
                              "label": rng.integers(0, num_classes, batch).astype(np.int32)}, mesh, "shard_map")
  return step, parallel.put_state(state, mesh, "shard_map"), batch


def time_steps(step, state, batch, n: int) -> tuple[float, object]:
  start = time.perf_counter()
  for _ in range(n):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / n, state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archs", nargs="*", default=["resnet20", "resnet18"], choices=list(CASES))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  xla_cpu.configure()  # XLA:CPU convolutions on the thread pool, as train.py runs them
  print(f"devices: {jax.devices()[0].platform} x1 ({jax.devices()[0].device_kind})")
  for arch in args.archs:
    if arch not in models.archs():
      print(f"{arch}: not available in this checkout (create_model archs: {', '.join(models.archs())}); "
            "skipped. It arrives with the ResNet model zoo.")
      continue
    batch, shape, classes = CASES[arch]
    runs = {}
    for variant in VARIANTS:
      step, state, data = build_step(arch, *variant, batch, shape, classes)
      _, state = time_steps(step, state, data, 2)  # compile + warm up
      runs[variant] = [step, state, data, []]
    for _ in range(args.rounds):
      for variant, run in runs.items():
        t, run[1] = time_steps(run[0], run[1], run[2], args.steps)
        run[3].append(t)
    times = {v: statistics.median(r[3]) for v, r in runs.items()}
    fp = times[("fp", "joint")]
    print(f"{arch} (batch {batch}, {shape[0]}x{shape[1]}): FP {1e3 * fp:.1f} ms/step, "
          f"TGA-joint {1e3 * times[('tga', 'joint')]:.1f} ms, TGA-sequential {1e3 * times[('tga', 'sequential')]:.1f} ms")
    print(f"  TGA-joint / FP      = {times[('tga', 'joint')] / fp:.3f}  (target <= 1.05)")
    print(f"  TGA-sequential / FP = {times[('tga', 'sequential')] / fp:.3f}  (target <= 2.05)")


if __name__ == "__main__":
  main()
