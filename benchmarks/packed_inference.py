"""Packed inference vs FP32 inference from the same exported file: resident bytes, peak RSS, latency.

    python benchmarks/packed_inference.py             # ResNet-18 and ResNet-50, 224x224, batch 1 and 64 (minutes)
    python benchmarks/packed_inference.py --quick     # ResNet-20 at 32x32, small batches: checks that it runs

For each architecture (TGA, every layer ternary, freshly initialized: sizes
and speed do not depend on the values) the model is exported to a temporary
``.safetensors`` file, then each side runs in its own fresh process:

* **packed**: ``load_packed(path, packed=True)``: 2-bit codes and scales
  resident, each kernel rebuilt inside the jitted forward pass;
* **fp32**: ``load_packed(path)``: the full-precision twin, dequantized float32
  kernels resident (what deploying without packed inference costs).

Reported: resident parameter bytes (the variables the forward pass takes), the
compiled forward's argument and temporary buffer bytes (XLA's memory analysis), the
process's peak RSS (after importing jax; after loading; after running), and the
median latency of one jitted forward pass at each batch size. The two sides
alternate ``--repeats`` times in one run and the medians are reported, so both see
the same machine state. Goals (issue 15): parameters >= 12x smaller for
ResNet-18 and ResNet-50; packed latency <= 1.3x FP32 at batch 64 on CPU.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _rss_mib() -> float:
  """Current resident set size (Linux /proc), MiB."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> None:
  """One side (packed or fp32): load, compile, time; prints one JSON line."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tgq_jax import export

  jax.devices()
  out = {"side": args.child, "rss_jax_mib": _rss_mib()}
  model, variables, header = export.load_packed(args.file, packed=args.child == "packed")
  variables = jax.block_until_ready(jax.device_put(variables))
  out["param_bytes"] = int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(variables["params"])))
  out["variable_bytes"] = int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(variables)))
  out["rss_loaded_mib"] = _rss_mib()
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  out["latency_s"], out["memory"] = {}, {}
  for batch in args.batches:
    x = jax.random.normal(jax.random.key(0), (batch, *header["image_shape"]), jnp.float32)
    try:
      analysis = forward.lower(variables, x).compile().memory_analysis()
      out["memory"][batch] = {"argument_bytes": int(analysis.argument_size_in_bytes),
                              "temp_bytes": int(analysis.temp_size_in_bytes)}
    except Exception:  # memory_analysis is not available on every backend
      pass
    jax.block_until_ready(forward(variables, x))  # compile and warm up
    times = []
    for _ in range(args.iters if batch < 16 else max(2, args.iters // 4)):
      t0 = time.perf_counter()
      jax.block_until_ready(forward(variables, x))
      times.append(time.perf_counter() - t0)
    out["latency_s"][batch] = statistics.median(times)
  out["rss_peak_mib"] = _peak_rss_mib()
  print(json.dumps(out))


def run_side(side: str, path: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--file", path,
         "--iters", str(args.iters), "--batches", *map(str, args.batches)]
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{side} process failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def export_model(arch: str, image_shape, path: str) -> None:
  import jax
  import jax.numpy as jnp

  from tgq_jax import export
  from tgq_jax.models import ModelSpec

  spec = ModelSpec(arch, 1000 if arch in ("resnet18", "resnet34", "resnet50") else 10)
  model = spec.build()
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                                           train=False)
  export.export_variables(path, variables, spec, image_shape)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="ResNet-20 at 32x32, batches 1 and 8, few iterations")
  parser.add_argument("--archs", nargs="+", default=None, help="default: resnet18 resnet50")
  parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 64")
  parser.add_argument("--iters", type=int, default=None, help="timed calls at batch < 16 (a quarter of them above)")
  parser.add_argument("--repeats", type=int, default=None, help="alternating packed/fp32 process pairs (default 2)")
  parser.add_argument("--json", help="also write the results here")
  parser.add_argument("--child", choices=("packed", "fp32"), help=argparse.SUPPRESS)
  parser.add_argument("--file", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.archs = args.archs or ["resnet20"]
    args.batches = args.batches or [1, 8]
    args.iters = args.iters or 3
    args.repeats = args.repeats or 1
  args.archs = args.archs or ["resnet18", "resnet50"]
  args.batches = args.batches or [1, 64]
  args.iters = args.iters or 12
  args.repeats = args.repeats or 2
  if args.child:
    child(args)
    return 0

  import jax
  print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs); "
        f"{args.repeats} alternating runs per side, medians")
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for arch in args.archs:
      image_shape = (32, 32, 3) if arch.startswith("resnet") and arch not in ("resnet18", "resnet34", "resnet50") \
        else (224, 224, 3)
      path = os.path.join(tmp, f"{arch}.safetensors")
      export_model(arch, image_shape, path)
      runs = {"packed": [], "fp32": []}
      for _ in range(args.repeats):
        for side in ("fp32", "packed"):
          runs[side].append(run_side(side, path, args))
      results[arch] = {"file_bytes": os.path.getsize(path), "runs": runs}
      report(arch, os.path.getsize(path), runs, args.batches)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


def report(arch: str, file_bytes: int, runs: dict, batches) -> None:
  def med(side, key, *sub):
    values = []
    for run in runs[side]:
      v = run[key]
      for s in sub:
        v = v[str(s)] if str(s) in v else v[s]
      values.append(v)
    return statistics.median(values)

  fp, pk = runs["fp32"][0], runs["packed"][0]
  print(f"\n== {arch}: file {file_bytes:,} bytes")
  print(f"{'':<34}{'fp32':>14}{'packed':>14}{'fp32/packed':>13}")
  print(f"{'resident params (bytes)':<34}{fp['param_bytes']:>14,}{pk['param_bytes']:>14,}"
        f"{fp['param_bytes'] / pk['param_bytes']:>12.1f}x")
  print(f"{'resident variables (bytes)':<34}{fp['variable_bytes']:>14,}{pk['variable_bytes']:>14,}"
        f"{fp['variable_bytes'] / pk['variable_bytes']:>12.1f}x")
  for key, label in (("rss_jax_mib", "RSS after importing jax (MiB)"), ("rss_loaded_mib", "RSS after loading (MiB)"),
                     ("rss_peak_mib", "peak RSS, load + run (MiB)")):
    a, b = med("fp32", key), med("packed", key)
    print(f"{label:<34}{a:>14.0f}{b:>14.0f}{a / b:>12.2f}x")
  for batch in batches:
    mem_f, mem_p = fp["memory"].get(str(batch)), pk["memory"].get(str(batch))
    if mem_f and mem_p:
      print(f"{'compiled, batch ' + str(batch) + ': args / temp MiB':<34}"
            f"{mem_f['argument_bytes'] / 2**20:>7.1f}/{mem_f['temp_bytes'] / 2**20:<6.1f}"
            f"{mem_p['argument_bytes'] / 2**20:>7.1f}/{mem_p['temp_bytes'] / 2**20:<6.1f}")
  for batch in batches:
    a, b = med("fp32", "latency_s", batch), med("packed", "latency_s", batch)
    print(f"{'latency, batch ' + str(batch) + ' (ms)':<34}{a * 1e3:>14.1f}{b * 1e3:>14.1f}"
          f"{'  packed/fp32 = ' + format(b / a, '.2f') + 'x':>13}")


if __name__ == "__main__":
  sys.exit(main())
