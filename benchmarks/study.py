"""Runs an accuracy study: several ``train.py`` runs side by side within a time budget, then a table.

    python benchmarks/study.py --out DIR [--quantizers fp tga twn absmean] [--seeds 0]
        [--max-epochs 30] [--budget-s 240] [--concurrent 4] [--dry-run] -- TRAIN.PY FLAGS...

Every run is ``train.py FLAGS --quantizer Q --seed S --epochs E --workdir DIR/runs/Q_sS``
(TGA with the sequential update). ``E`` is ``--max-epochs`` or, when the budget
is smaller, what fits: a probe (TGA-sequential, the slowest variant, for a few
hundred steps) measures the step rate, and ``E`` is the whole number of epochs
that the runs, ``--concurrent`` at a time, finish within ``--budget-s``. Every
run gets the same ``E`` (the same budget in epochs), and a ``--schedule``
given as fractions of the run (``--schedule-fractions 0.4 0.6 0.8``) is turned
into epochs. A run still going at the deadline gets SIGTERM (it saves and
exits) and is reported with the epochs it completed. Writes ``DIR/study.json``
and ``DIR/study.md`` (the table) and prints the table.

``--dry-run``: 3 steps per run, no probe (checks the whole path on a CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROBE_STEPS = 150


def _rows(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train(flags: list[str], workdir: pathlib.Path, env: dict) -> subprocess.Popen:
  workdir.mkdir(parents=True, exist_ok=True)
  log = open(workdir.with_suffix(".log"), "w")
  return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags, "--workdir", str(workdir)],
                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def probe_epoch_seconds(common: list[str], out: pathlib.Path, env: dict, num_train: int) -> float:
  """Seconds per epoch of TGA-sequential (the slowest variant), from its logged images/s."""
  workdir = out / "probe"
  proc = _train([*common, "--quantizer", "tga", "--update", "sequential", "--max-steps", str(PROBE_STEPS),
                 "--log-every", "50"], workdir, env)
  if proc.wait() != 0:
    raise SystemExit(f"probe failed: see {workdir.with_suffix('.log')}")
  rates = [r["img_per_sec"] for r in _rows(workdir) if r["split"] == "train"][1:]  # first: compile
  return num_train / (sum(rates) / len(rates))


def summarize(name: str, workdir: pathlib.Path, wall: float, rc: int) -> dict:
  rows = _rows(workdir)
  tests = [r for r in rows if r["split"] == "test"]
  last = tests[-1] if tests else {}
  layers = [l for l in last.get("layers", []) if l.get("scale") is not None]
  return {"run": name, "rc": rc, "wall_s": round(wall, 1),
          "epochs_done": round(last.get("epoch", 0.0), 2),
          "test_accuracy": last.get("accuracy"), "best_test_accuracy": max((t["accuracy"] for t in tests),
                                                                           default=None),
          "mean_sparsity": (sum(l["sparsity"] for l in layers) / len(layers)) if layers else None}


def table(results: list[dict], epochs: int) -> str:
  lines = [f"| run | epochs (of {epochs}) | test acc. (%) | best (%) | mean sparsity | wall (s) |",
           "|---|---|---|---|---|---|"]
  for r in results:
    acc = "-" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}"
    best = "-" if r["best_test_accuracy"] is None else f"{100 * r['best_test_accuracy']:.2f}"
    sp = "-" if r["mean_sparsity"] is None else f"{r['mean_sparsity']:.3f}"
    lines.append(f"| {r['run']} | {r['epochs_done']} | {acc} | {best} | {sp} | {r['wall_s']:.0f} |")
  return "\n".join(lines)


def main() -> None:
  argv = sys.argv[1:]
  common = argv[argv.index("--") + 1:] if "--" in argv else []
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--quantizers", nargs="*", default=["fp", "tga", "twn", "absmean"])
  parser.add_argument("--seeds", nargs="*", type=int, default=[0])
  parser.add_argument("--max-epochs", type=int, default=30)
  parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of all runs")
  parser.add_argument("--concurrent", type=int, default=4)
  parser.add_argument("--num-train", type=int, default=60000, help="training set size (for the probe)")
  parser.add_argument("--schedule-fractions", nargs="*", type=float, default=None)
  parser.add_argument("--dry-run", action="store_true")
  args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  if args.concurrent > 1:  # several processes share one accelerator's memory
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  start = time.time()

  epochs, extra = args.max_epochs, []
  if args.dry_run:
    epochs, extra = 1, ["--max-steps", "3"]
  elif args.budget_s:
    epoch_s = probe_epoch_seconds(common, out, env, args.num_train)
    waves = math.ceil(len(args.quantizers) * len(args.seeds) / args.concurrent)
    left = args.budget_s - (time.time() - start) - 45 * waves  # start-up and compilation per run
    # Runs side by side share the device: assume they slow each other by half.
    epochs = max(1, min(args.max_epochs, int(left / waves / (1.5 * epoch_s))))
    print(f"probe: {epoch_s:.1f} s/epoch (TGA-sequential); {epochs} epochs per run", flush=True)
  if args.schedule_fractions:
    extra += ["--schedule", *(str(max(1, round(f * epochs))) for f in args.schedule_fractions)]

  jobs = [(f"{q}_s{s}", q, s) for s in args.seeds for q in args.quantizers]
  deadline = None if args.budget_s is None or args.dry_run else start + args.budget_s
  running, results = [], []
  while jobs or running:
    while jobs and len(running) < args.concurrent:
      name, q, s = jobs.pop(0)
      flags = [*common, "--quantizer", q, "--seed", str(s), "--epochs", str(epochs), *extra]
      if q == "tga":
        flags += ["--update", "sequential"]
      running.append((name, _train(flags, out / "runs" / name, env), time.time()))
    time.sleep(1)
    for item in list(running):
      name, proc, t0 = item
      if deadline and time.time() > deadline and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # train.py saves and exits
      if proc.poll() is not None:
        running.remove(item)
        results.append(summarize(name, out / "runs" / name, time.time() - t0, proc.returncode))
        print(f"{name}: rc {proc.returncode}, {results[-1]}", flush=True)
  results.sort(key=lambda r: r["run"])
  text = table(results, epochs)
  (out / "study.json").write_text(json.dumps({"epochs": epochs, "flags": common, "results": results}, indent=2))
  (out / "study.md").write_text(text + "\n")
  print(text)
  if any(r["rc"] != 0 for r in results):
    sys.exit(1)


if __name__ == "__main__":
  main()
