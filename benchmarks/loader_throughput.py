"""Loader throughput: images/s of process-local train batches, against the train step's.

  python benchmarks/loader_throughput.py [--batch-size 256] [--num-batches 200] [--no-step]

For each dataset it also times the ResNet-20 train step (batch 128, TGA, the
paper's sequential update, single device) on that dataset's image shape and
prints loader images/s over step images/s: the loader must be >= 3x faster.

``measure_loader(name, batch_size, num_batches)`` is importable. ``name`` is
a dataset of ``tgq_jax.data.DATASETS`` or ``"cifar_in_memory"``: 50,000
random 32x32x3 uint8 images held in memory and fed through the CIFAR-10
augmentation and normalization (the CIFAR path without needing the data).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tgq_jax import data  # noqa: E402

BENCHMARKS = ("fashion_mnist", "cifar_in_memory")


def make_dataset(name: str, **kwargs) -> data.Dataset:
  if name == "cifar_in_memory":
    rng = np.random.default_rng(0)
    return data.from_arrays("cifar10", rng.integers(0, 256, (50_000, 32, 32, 3), np.uint8),
                            rng.integers(0, 10, 50_000), np.zeros((1, 32, 32, 3), np.uint8), [0])
  return data.get_dataset(name, **kwargs)


def measure_loader(name: str, batch_size: int, num_batches: int, **kwargs) -> float:
  """Images/s over ``num_batches`` train batches after one warm-up batch.

  One process, no device divisibility constraint; ``kwargs`` go to
  ``get_dataset`` (e.g. ``data_dir``).
  """
  ds = make_dataset(name, **kwargs)
  it = ds.train_iterator(global_batch_size=batch_size, seed=0, process_index=0, process_count=1,
                         num_devices=1)
  next(it)  # starts grain's threads and fills the epoch-permutation cache
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  elapsed = time.perf_counter() - start
  assert batch["image"].shape[0] == batch_size
  return batch_size * num_batches / elapsed


def measure_train_step(image_shape, batch_size: int = 128, steps: int = 10, update: str = "sequential") -> float:
  """Images/s of the ResNet-20 TGA train step on ``image_shape`` (after compiling and warming up)."""
  from step_time import build_step, time_steps  # the step-time benchmark's single-device step

  step, state, batch = build_step("resnet20", "tga", update, batch_size, image_shape, 10)
  _, state = time_steps(step, state, batch, 2)
  seconds, _ = time_steps(step, state, batch, steps)
  return batch_size / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--num-batches", type=int, default=200)
  parser.add_argument("--datasets", nargs="+", default=list(BENCHMARKS))
  parser.add_argument("--step", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the ResNet-20 train step and print the ratio")
  args = parser.parse_args()
  for name in args.datasets:
    rate = measure_loader(name, args.batch_size, args.num_batches)
    print(f"{name:>16}: loader {rate:12,.0f} images/s  (batch {args.batch_size}, {args.num_batches} batches)")
    if args.step:
      shape = make_dataset(name).info.image_shape
      step_rate = measure_train_step(shape)
      print(f"{'':>16}  ResNet-20 TGA-sequential step {step_rate:8,.0f} images/s on {shape}: "
            f"loader / step = {rate / step_rate:.0f}x (target >= 3x)")


if __name__ == "__main__":
  main()
