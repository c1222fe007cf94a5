"""Times the Pallas ternary matmul (2-bit codes unpacked on chip) against a bf16 dense matmul, on device.

    python benchmarks/ternary_matmul_gpu.py --json tm.json        # GPU or TPU: M = 1, 16; K = N = 8192; bf16
    python benchmarks/ternary_matmul_gpu.py --interpret --quick   # anywhere (CPU): K = N = 256, Pallas interpreter

Method: timing one call from Python measures its dispatch (~100 µs), not the
kernel (8 MiB of codes read in ~2 µs at an H200's 4.8 TB/s). So each product
is timed as a chain of R calls compiled into ONE program (``lax.fori_loop``,
unrolled: straight-line code, no per-iteration loop control; ``--unroll U``
keeps a loop of U-call bodies instead, should compiling long chains be slow), each
call's output the next call's input (``x_{i+1} = y_i``, so K = N; the ternary
weights are scaled by ``1/sqrt(nonzeros per column)`` so the chain neither
vanishes nor overflows). The data dependence keeps XLA from overlapping,
hoisting or dropping calls. Two chain lengths ``R1 < R2`` are timed (median of
``--iters`` runs, each waited for) and the per-call time is
``(t(R2) - t(R1)) / (R2 - R1)``: the program's launch and transfer cost
cancels. What remains is what a model's layer pays per call: the kernel plus
its small XLA ops (padding M to the block, slicing the output).

Before timing, each block configuration is checked against a float64 host
reference; only checked configurations are timed (the best one is reported).
Columns: the bf16 ``jnp.dot`` on a bf16 weight matrix (float32 accumulation,
cuBLAS / XLA), the Pallas kernel on the packed codes, their ratio (> 1: the
kernel is faster), and the weight bytes each reads per call over its time.
Needs jax and numpy only; about a minute on one GPU.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from tgq_jax.core import packing  # noqa: E402
from tgq_jax.kernels import ternary_matmul as tm  # noqa: E402

# Block configurations tried per kernel: Triton (block_m, block_n, block_k, num_warps, num_stages),
# Mosaic TPU (block_m, block_n, block_k); None = the kernel's default.
CONFIGS = {
  "triton": [dict(), dict(block_n=64, block_k=64, num_warps=4), dict(block_n=128, block_k=64, num_warps=4),
             dict(block_n=128, block_k=128, num_warps=8), dict(block_n=256, block_k=64, num_warps=8),
             dict(block_n=64, block_k=128, num_warps=4, num_stages=3), dict(block_n=32, block_k=256, num_warps=2)],
  "mosaic_tpu": [dict(), dict(block_n=256, block_k=512), dict(block_n=512, block_k=1024), dict(block_n=1024, block_k=512),
                 dict(block_n=2048, block_k=256)],
}


def chain(product, reps: int, unroll: bool | int):
  """``x -> product(product(...product(x)))`` (``reps`` calls) as one jitted program (``unroll``: fori_loop's)."""
  return jax.jit(lambda x, *w: lax.fori_loop(0, reps, lambda i, x: product(x, *w), x, unroll=unroll))


def per_call_seconds(product, x, weights, *, short: int, long: int, iters: int, unroll: bool | int = True) -> float:
  """Seconds per call of ``product(x, *weights)`` inside one compiled chain (see the module docstring)."""
  medians = []
  for reps in (short, long):
    fn = chain(product, reps, unroll)
    jax.block_until_ready(fn(x, *weights))  # compile and warm up
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(x, *weights))
      times.append(time.perf_counter() - t0)
    medians.append(statistics.median(times))
  return max(medians[1] - medians[0], 0.0) / (long - short)


def relative_error(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / max(np.max(np.abs(want)), 1e-30))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--interpret", action="store_true", help="the Pallas interpreter (any backend; smoke test)")
  parser.add_argument("--quick", action="store_true", help="K = N = 256, M = 1, short chains, one configuration")
  parser.add_argument("--kernel", choices=tm.KERNELS, default=None,
                      help="default: mosaic_tpu on a TPU, else triton")
  parser.add_argument("--k", type=int, default=8192, help="K = N (the chain feeds each output back as input)")
  parser.add_argument("--m", type=int, nargs="+", default=[1, 16], help="rows of activations")
  parser.add_argument("--reps", type=int, nargs=2, default=[20, 120], metavar=("R1", "R2"),
                      help="the two chain lengths")
  parser.add_argument("--iters", type=int, default=10, help="timed runs of each chain (median)")
  parser.add_argument("--unroll", type=int, default=None,
                      help="calls per loop iteration (default: the whole chain, straight-line code)")
  parser.add_argument("--json", default=None, help="also write the results here")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  backend = jax.default_backend()
  kernel = args.kernel or ("mosaic_tpu" if backend == "tpu" else "triton")
  print(f"jax {jax.__version__}, backend {backend}, device {jax.devices()[0].device_kind}, "
        f"kernel {kernel} ({'Pallas interpreter' if args.interpret else 'native'})")
  if not args.interpret and backend not in ("gpu", "tpu"):
    print("no GPU/TPU: pass --interpret (with --quick) to run the kernel in the interpreter.")
    return 2
  if args.quick:
    k, sizes, (short, long), iters, configs = 256, [1], (1, 3), 1, CONFIGS[kernel][:1]
  else:
    k, sizes, (short, long), iters, configs = args.k, args.m, args.reps, args.iters, CONFIGS[kernel]
  if not 0 < short < long:
    raise SystemExit(f"--reps: need 0 < R1 < R2, got {short}, {long}.")
  unroll = True if args.unroll is None else args.unroll
  timing = dict(short=short, long=long, iters=iters, unroll=unroll)

  rng = np.random.default_rng(0)
  codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(k, k), p=[0.3, 0.4, 0.3])
  # Per output column, 1/sqrt(its nonzeros) (times a spread): the chain keeps x's magnitude.
  scale = (rng.uniform(0.8, 1.2, size=k) / np.sqrt(np.maximum(np.count_nonzero(codes, axis=0), 1))).astype(np.float32)
  packed, scale_dev = jnp.asarray(packing.pack_planar(codes)), jnp.asarray(scale)
  w_bf16 = jnp.asarray(codes * scale[None, :], jnp.bfloat16)
  bytes_bf16, bytes_packed = 2 * k * k, int(packed.nbytes)
  print(f"K = N = {k}; weights: bf16 {bytes_bf16 / 2**20:.1f} MiB, packed {bytes_packed / 2**20:.1f} MiB; "
        f"chains of {short} and {long} calls, median of {iters} runs each")

  def dense(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

  def pallas(cfg):
    return lambda x, p, s: tm.ternary_matmul(x, p, s, kernel=kernel, interpret=args.interpret, **cfg)

  results, ok = [], True
  for m in sizes:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ (codes.astype(np.float64) * scale.astype(np.float64))
    row = {"m": m, "configs": []}
    for cfg in configs:
      entry = {"config": cfg}
      try:
        err = relative_error(jax.jit(pallas(cfg))(x, packed, scale_dev), want)
      except Exception as e:  # a configuration this compiler rejects: reported, not timed
        entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"  M={m} {cfg}: failed: {entry['error']}")
        row["configs"].append(entry)
        continue
      entry["relative_error"] = err
      good = err < 1e-2  # bf16 output rounding (2^-8) on the largest entries
      ok &= good
      if good:
        entry["pallas_us"] = 1e6 * per_call_seconds(pallas(cfg), x, (packed, scale_dev), **timing)
      print(f"  M={m} {cfg}: max |err| / max |ref| = {err:.1e} {'ok' if good else 'FAIL'}"
            + (f", {entry['pallas_us']:.2f} µs per call" if good else ""))
      row["configs"].append(entry)
    timed = [c for c in row["configs"] if "pallas_us" in c]
    if timed:
      best = min(timed, key=lambda c: c["pallas_us"])
      row["dense_us"] = 1e6 * per_call_seconds(dense, x, (w_bf16,), **timing)
      resolved = row["dense_us"] > 0 and best["pallas_us"] > 0  # else below the timing noise (a smoke run)
      row.update(pallas_us=best["pallas_us"], best_config=best["config"],
                 dense_over_pallas=row["dense_us"] / best["pallas_us"] if resolved else None,
                 dense_weight_GBps=bytes_bf16 / row["dense_us"] / 1e3 if resolved else None,
                 pallas_weight_GBps=bytes_packed / best["pallas_us"] / 1e3 if resolved else None)
    results.append(row)

  # float32 activations and TTQ's two scales: exact to float32 rounding (no TF32 products on chip).
  x32 = jnp.asarray(rng.normal(size=(5, k)), jnp.float32)
  got = tm.ternary_matmul(x32, packed, jnp.float32(0.05), jnp.float32(0.02), kernel=kernel, interpret=args.interpret)
  err32 = relative_error(got, np.asarray(x32, np.float64) @ np.where(codes > 0, 0.05, np.where(codes < 0, -0.02, 0.0)))
  ok &= err32 < 1e-5
  print(f"  float32, asymmetric scales: max |err| / max |ref| = {err32:.1e} {'ok' if err32 < 1e-5 else 'FAIL'}")

  print()
  print(f"{'M':>5} {'bf16 dot':>11} {'ternary Pallas':>15} {'bf16 / Pallas':>14} {'bf16 GB/s':>10} "
        f"{'Pallas GB/s':>12}  best config")
  for row in results:
    if "pallas_us" in row:
      ratio, dense_gbps, pallas_gbps = (f"{row[key]:.{digits}f}" if row[key] is not None else "n/a" for key, digits in
                                        (("dense_over_pallas", 2), ("dense_weight_GBps", 0), ("pallas_weight_GBps", 0)))
      ratio = ratio if ratio == "n/a" else ratio + "x"
      print(f"{row['m']:>5} {row['dense_us']:>9.2f}µs {row['pallas_us']:>13.2f}µs {ratio:>14} "
            f"{dense_gbps:>10} {pallas_gbps:>12}  {row['best_config'] or 'defaults'}")
    else:
      print(f"{row['m']:>5}  no configuration ran correctly")
  if args.json:
    report = dict(jax=jax.__version__, backend=backend, device=jax.devices()[0].device_kind, kernel=kernel,
                  interpret=args.interpret, k=k, n=k, dtype="bfloat16", chain_lengths=[short, long], iters=iters, unroll=unroll,
                  float32_relative_error=err32,
                  weight_bytes={"bf16": bytes_bf16, "packed": bytes_packed}, checks_passed=ok, rows=results)
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
  if not ok or not all("pallas_us" in row for row in results):
    print("correctness check FAILED for some configuration(s) or size(s).")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
