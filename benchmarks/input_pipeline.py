"""ImageNet input pipeline: images per core-second of the whole host side at 224, and the cores to feed a GPU.

  python benchmarks/input_pipeline.py [--images 512] [--batch-size 128] [--batches 24] [--workers 2]

Generates ``--images`` photo-like JPEGs of ImageNet's sizes (~100 KB each,
:mod:`tgq_jax.data.fake_imagenet`) in a temporary directory, and times the
training input (random-resized crop to 224, flip; uint8 out) three ways:

* ``jpeg, host normalize``: decode every JPEG in full, normalize to float32 on the host (the old path);
* ``jpeg``: decode with DCT-domain downscaling where the crop allows, uint8 out
  (normalization runs on the device, in the step);
* ``cache, host crop``: read the decode-once uint8 cache (longer side ``--max-side``), crop and resize;
* ``cache, device crop``: read the cache, put each image on a uint8 canvas with its crop box and flip
  (cropped and resized on the device; what ``get_dataset(..., normalize_on_device=True)`` does with a cache).

The figure is CPU time, not wall time: the user+system seconds of this process
and of all its worker processes (psutil), so other load on the machine does
not change it. ``--profile`` prints where one process spends the time per example.
"""
import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tgq_jax import data  # noqa: E402
from tgq_jax.data import fake_imagenet, imagenet, imagenet_cache  # noqa: E402

# Measured H200 step rates (ResNet-18, bf16): FP, and TGA with the sequential update (issue 23).
GPU_RATES = {"FP": 17_244, "TGA sequential": 9_798}


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
  rng = np.random.default_rng(seed)
  return [fake_imagenet._photo_jpeg(rng, None) for _ in range(n)]  # pylint: disable=protected-access


def cpu_seconds() -> np.ndarray:
  """User + system CPU seconds of (this process, all its live descendants)."""
  me = psutil.Process()
  total = np.zeros(2)
  for i, p in enumerate([me, *me.children(recursive=True)]):
    try:
      t = p.cpu_times()
      total[min(i, 1)] += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def measure(ds: data.Dataset, batch_size: int, batches: int, warmup: int = 4) -> tuple[float, float, float]:
  """(images per core-second, images per wall-second, share of the CPU time in this process) of ``batches``
  train batches after ``warmup``."""
  it = ds.train_iterator(global_batch_size=batch_size, seed=0, process_index=0, process_count=1, num_devices=1)
  for _ in range(warmup):
    next(it)
  cpu0, wall0 = cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
  # (a cache batch holds whole images on a canvas, cropped and resized on the device)
  images = batch.get("pixels", batch.get("image"))
  assert images.shape[0] == batch_size and (images.dtype == np.uint8) == ds.normalize_on_device
  it.close()
  return batch_size * batches / cpu.sum(), batch_size * batches / wall, cpu[0] / cpu.sum()


def profile(examples, label: str, n: int = 200) -> None:
  """Per-example host costs of the crop path, in one process (cProfile on CPU time, top functions by own time)."""
  rng = np.random.default_rng(1)
  draws = rng.random((n, 3 + 4 * data.CROP_ATTEMPTS))
  prof = cProfile.Profile(time.process_time)
  prof.enable()
  for i in range(n):
    imagenet.random_resized_crop(examples[i % len(examples)], draws[i], (224, 224))
  prof.disable()
  stats = pstats.Stats(prof)
  print(f"--- profile: {label}: {1e3 * stats.total_tt / n:.2f} ms of CPU per example ({n} examples)")
  stats.sort_stats("tottime").print_stats(6)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--batches", type=int, default=24)
  parser.add_argument("--workers", type=int, default=2, help="grain worker processes")
  parser.add_argument("--max-side", type=int, default=320, help="longer side of the cached images")
  parser.add_argument("--profile", action="store_true")
  parser.add_argument("--only", default="", help="run only the variants whose name contains this")
  args = parser.parse_args()

  jpegs = make_jpegs(args.images)
  labels = np.arange(args.images) % 1000
  print(f"{args.images} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB; batch {args.batch_size}, "
        f"{args.batches} batches, {args.workers} worker processes, {os.cpu_count()} cores here")
  with tempfile.TemporaryDirectory() as tmp:
    records = [{"image": j, "label": int(y)} for j, y in zip(jpegs, labels)]
    imagenet_cache.write_cache(imagenet_cache.cache_dir(tmp), {"train": records, "validation": records[:8]},
                               max_side=args.max_side, workers=args.workers, log=lambda _: None)
    cached = data.get_dataset("imagenet2012", data_dir=tmp, num_workers=args.workers, normalize_on_device=True)
    runs = {
        "jpeg, host normalize": data.from_examples("imagenet2012", jpegs, labels, jpegs[:8], labels[:8],
                                                   num_workers=args.workers),
        "jpeg": data.from_examples("imagenet2012", jpegs, labels, jpegs[:8], labels[:8],
                                   num_workers=args.workers, normalize_on_device=True),
        f"cache {args.max_side}, host crop": data.Dataset(cached.info, cached.recipe, cached.train, cached.test,
                                                          num_workers=args.workers, normalize_on_device=True),
        f"cache {args.max_side}, device crop": cached,
    }
    results = {}
    for name, ds in runs.items():
      if args.only and args.only not in name:
        continue
      per_core, per_wall, main_share = measure(ds, args.batch_size, args.batches)
      results[name] = per_core
      cores = ", ".join(f"{rate / per_core:.1f} cores for {rate:,} img/s ({k})" for k, rate in GPU_RATES.items())
      print(f"{name:>26}: {per_core:7,.0f} images per core-second ({per_wall:6,.0f}/s wall, "
            f"{100 * main_share:.0f}% of the CPU in the main process); {cores}")
    if args.profile:
      profile(jpegs, "jpeg (decode with DCT downscaling, crop, resize)")
      profile(cached.train.take(np.arange(64))[0], f"cache (max side {args.max_side}: crop, resize)")


if __name__ == "__main__":
  main()
