"""Training throughput (images/s) and compile time: FP vs TGA-joint vs TGA-sequential, one device.

    python benchmarks/throughput.py [--archs resnet18 resnet50] [--batches 256 128] [--bf16]
                                    [--image-size 224] [--steps 10] [--rounds 2] [--json OUT.json]

For each arch the three variants' train steps (the trainer's own step
functions, synthetic data resident on the device) are compiled (timed:
``lower`` + ``compile``), warmed up, then timed round-robin ``--rounds`` times
``--steps`` steps each; the median gives images/s. The batch is the first of
``--batches`` whose three steps all fit in device memory. Goals on an
accelerator: TGA-joint >= 0.9x FP, TGA-sequential >= 0.5x FP images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from step_time import VARIANTS, build_step, time_steps  # noqa: E402

from tgq_jax.training import xla_cpu  # noqa: E402

NUM_CLASSES = 1000


def _compiled(arch: str, variant, batch: int, size: int, dtype):
  step, state, data = build_step(arch, *variant, batch, (size, size, 3), NUM_CLASSES, dtype)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  return compiled, state, data, time.perf_counter() - t0


def measure(arch: str, batch: int, size: int, dtype, steps: int, rounds: int) -> dict:
  runs, compile_s = {}, {}
  for variant in VARIANTS:
    compiled, state, data, compile_s[variant] = _compiled(arch, variant, batch, size, dtype)
    _, state = time_steps(compiled, state, data, 2)  # warm-up (and the out-of-memory check)
    runs[variant] = [compiled, state, data, []]
  for _ in range(rounds):
    for run in runs.values():
      t, run[1] = time_steps(run[0], run[1], run[2], steps)
      run[3].append(t)
  result = {"arch": arch, "batch": batch, "image_size": size, "dtype": jnp.dtype(dtype).name}
  for variant, run in runs.items():
    name = "fp" if variant[0] == "fp" else f"tga_{variant[1]}"
    result[name] = {"images_per_s": batch / statistics.median(run[3]), "compile_s": compile_s[variant]}
  fp = result["fp"]["images_per_s"]
  result["joint_over_fp"] = result["tga_joint"]["images_per_s"] / fp
  result["sequential_over_fp"] = result["tga_sequential"]["images_per_s"] / fp
  return result


def _out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archs", nargs="*", default=["resnet18", "resnet50"])
  parser.add_argument("--batches", nargs="*", type=int, default=[256, 128])
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--bf16", action="store_true", help="bf16 activations (parameters stay float32)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  xla_cpu.configure()  # XLA:CPU convolutions on the thread pool, as train.py runs them
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  dev = jax.devices()[0]
  print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}", flush=True)
  results = []
  for arch in args.archs:
    for batch in args.batches:
      try:
        r = measure(arch, batch, args.image_size, dtype, args.steps, args.rounds)
      except Exception as e:  # noqa: BLE001 - only out-of-memory moves on to the next batch
        if not _out_of_memory(e):
          raise
        print(f"{arch} batch {batch}: out of memory, trying a smaller batch", flush=True)
        continue
      results.append(r)
      if args.json:  # after every arch: a time limit mid-way keeps what was measured
        with open(args.json, "w") as f:
          json.dump({"device": dev.device_kind, "jax": jax.__version__, "results": results}, f, indent=2)
      print(f"{arch} batch {batch} {r['dtype']} {args.image_size}x{args.image_size}: images/s "
            f"FP {r['fp']['images_per_s']:.0f}, TGA-joint {r['tga_joint']['images_per_s']:.0f} "
            f"({r['joint_over_fp']:.2f}x, goal >= 0.9), TGA-sequential "
            f"{r['tga_sequential']['images_per_s']:.0f} ({r['sequential_over_fp']:.2f}x, goal >= 0.5); "
            f"compile s: FP {r['fp']['compile_s']:.1f}, joint {r['tga_joint']['compile_s']:.1f}, "
            f"sequential {r['tga_sequential']['compile_s']:.1f}", flush=True)
      break


if __name__ == "__main__":
  main()
