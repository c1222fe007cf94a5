"""Times the Pallas ternary matmul (2-bit codes unpacked on chip) against a bf16 ``jnp.dot``.

    python benchmarks/ternary_matmul_gpu.py                      # on a GPU (or TPU): M = 1, 64, 4096; K = N = 4096
    python benchmarks/ternary_matmul_gpu.py --interpret --quick  # anywhere: small sizes, Pallas interpreter

For each size it first checks the kernel against the reference (the kernel
rebuilt in bf16, then ``jnp.dot``, float32 accumulation), then times, for bf16
activations: the dense bf16 ``jnp.dot`` on a bf16 weight matrix, the Pallas
kernel on the packed codes (a few block configurations; the best is reported),
and the plain-JAX fallback (unpack in XLA, then the bf16 dot). Weight bytes:
bf16 ``2*K*N``, packed ``K*N/4``. Needs jax and numpy only; well under two
minutes on one GPU.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tgq_jax.kernels import ternary_matmul as tm  # noqa: E402

# (block_m, block_n, block_k, num_warps); block_m None = by M.
CONFIGS = [(None, None, None, None), (None, 128, 32, 4), (None, 64, 32, 4), (None, 128, 64, 8), (None, 256, 32, 8), (None, 64, 64, 4)]


def timeit(fn, *args, iters: int, warmup: int = 2) -> float:
  """Median seconds of one call (compiled; each call waited for)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--interpret", action="store_true", help="run the kernel in the Pallas interpreter")
  parser.add_argument("--quick", action="store_true", help="small sizes, few iterations, one config")
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--k", type=int, default=4096)
  parser.add_argument("--n", type=int, default=4096)
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  print(f"jax {jax.__version__}, backend {backend}, device {jax.devices()[0].device_kind}, "
        f"{'interpret' if args.interpret else 'native'} Pallas")
  if not args.interpret and backend not in ("gpu", "tpu"):
    print("no GPU/TPU: pass --interpret (with --quick) to run the kernel in the interpreter.")
    return 2
  if args.quick:
    sizes, k, n, iters, configs = (1, 16), 256, 256, args.iters or 3, CONFIGS[:1]
  else:
    sizes, k, n, iters, configs = (1, 64, 4096), args.k, args.n, args.iters or 20, CONFIGS

  rng = np.random.default_rng(0)
  codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(k, n), p=[0.3, 0.4, 0.3])
  packed = jnp.asarray(tm.pack_planar(codes))
  scale = jnp.asarray(rng.uniform(0.01, 0.1, size=(n,)), jnp.float32)  # per output channel
  w_bf16 = jnp.asarray(codes * np.asarray(scale)[None, :], jnp.bfloat16)
  print(f"K = {k}, N = {n}; weights: bf16 {2 * k * n:,} B, packed {packed.nbytes:,} B")

  dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
  fallback = jax.jit(lambda x, p, s: tm.ternary_matmul_reference(x, p, s))

  # Correctness first: every config at every size, and a float32 / asymmetric-scale case.
  ok = True
  kernels = {}
  for m in sizes:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    # The reference on the host in float64 (a float32 dot on a GPU defaults to TF32).
    ref = np.asarray(x, np.float64) @ codes.astype(np.float64) * np.asarray(scale, np.float64)
    for cfg in configs:
      bm, bn, bk, nw = cfg
      fn = jax.jit(lambda x, p, s, bm=bm, bn=bn, bk=bk, nw=nw: tm.ternary_matmul(
        x, p, s, block_m=bm, block_n=bn, block_k=bk, num_warps=nw, interpret=args.interpret))
      try:
        got = np.asarray(fn(x, packed, scale), np.float32)
      except Exception as e:  # a config the backend cannot lower: report and skip it
        print(f"  M={m} config {cfg}: failed to run: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        continue
      err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
      good = err < 1e-2  # bf16 output rounding (2^-8) on the largest entries
      ok &= good
      print(f"  check M={m} config {cfg}: max |err| / max |ref| = {err:.2e} {'ok' if good else 'FAIL'}")
      if good:
        kernels[m, cfg] = fn
  x32 = jnp.asarray(rng.normal(size=(5, k)), jnp.float32)
  got = tm.ternary_matmul(x32, packed, jnp.float32(0.05), jnp.float32(0.02), interpret=args.interpret)
  want = np.asarray(x32, np.float64) @ np.where(codes > 0, np.float32(0.05), np.where(codes < 0, -np.float32(0.02), 0.0))
  err = float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))
  print(f"  check float32, asymmetric scales: max |err| / max |ref| = {err:.2e} "
        f"{'ok' if err < 1e-5 else 'FAIL (TF32 products on chip?)'}")
  if not ok or not kernels:  # the bf16 checks gate the timings
    print("correctness check FAILED: no timings.")
    return 1

  print()
  print(f"{'M':>6} {'bf16 dot':>12} {'ternary Pallas':>15} {'fallback':>12} {'Pallas/bf16':>12}  best config")
  for m in sizes:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    t_dense = timeit(dense, x, w_bf16, iters=iters)
    t_fallback = timeit(fallback, x, packed, scale, iters=iters)
    best = None
    for cfg in configs:
      if (m, cfg) in kernels:
        t = timeit(kernels[m, cfg], x, packed, scale, iters=iters)
        if best is None or t < best[0]:
          best = (t, cfg)
    if best is None:
      continue
    print(f"{m:>6} {t_dense * 1e6:>10.1f}us {best[0] * 1e6:>13.1f}us {t_fallback * 1e6:>10.1f}us "
          f"{best[0] / t_dense:>11.2f}x  {best[1]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
