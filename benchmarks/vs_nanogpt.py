"""nanoGPT's CPU "baby" run beside ours on the same text, threads and iterations: whole-run time and val loss.

    pip install -e '.[bench]'                    # torch (nanoGPT's only heavy dependency), requests
    git clone https://github.com/karpathy/nanoGPT ~/nanoGPT
    python benchmarks/vs_nanogpt.py --nanogpt-dir ~/nanoGPT [--cores 0,1] [--iters 2000]
        [--out results/vs_nanogpt.json] [--workdir DIR] [--text FILE]

nanoGPT is run unmodified, as its README's "I only have a macbook" section says:
our committed Tiny Shakespeare is copied to ``DIR/data/shakespeare_char/input.txt``
(its ``prepare.py`` downloads the file only when it is missing), ``prepare.py``
writes ``train.bin``/``val.bin`` (first 90% / last 10% of the characters), then

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --out_dir=<temporary>

(4 layers, 4 heads, width 128, context 64, batch 12, AdamW 1e-3 with 100 warm-up
iterations then cosine to 1e-4, beta2 0.99, weight decay 0.1, clip 1.0; it
evaluates every 250 iterations on 20 random batches per split and prints
``step N: train loss X, val loss Y``; its published figure is val loss ~1.88).
Then, back to back, ``train.py --config shakespeare_char_baby --quantizer fp``
and ``--quantizer tga`` (same data split, batch, context, iterations). Every run
is pinned with ``taskset`` to ``--cores`` (default: all cores, no pinning) and
torch gets ``OMP_NUM_THREADS`` = that many threads; XLA:CPU sizes its pool from
the cores it may run on. The whole-run time is the wall clock of each
``train.py`` process from start to exit (interpreter start, imports, data,
compilation, training, evaluation, the end-of-run report); nanoGPT's
one-off ``prepare.py`` is timed separately and not counted.

Goals (issue 24): ours FP / nanoGPT whole-run time <= 1.0; our FP val loss <=
nanoGPT's + 0.03; TGA within 0.1 nats of our FP. nanoGPT's val loss is a
20-batch random estimate (about 15k tokens, noise ~0.01), ours is over a fixed
set of validation windows. ``--iters N`` shortens every run (a smoke test;
nanoGPT then evaluates at N, and our runs get ``--max-steps N``).
Writes the numbers to ``--out`` (JSON) and prints a table; figures for
RESULTS.md are copied from it by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = ROOT / "tgq_jax" / "data" / "corpora" / "tinyshakespeare.txt"
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                 "data/shakespeare_char/prepare.py")
BABY_ITERS = 2000
EVAL_INTERVAL = 250  # config/train_shakespeare_char.py's
# Goals of issue 24, item 6.
TIME_RATIO_GOAL = 1.0
FP_LOSS_MARGIN = 0.03
TGA_LOSS_MARGIN = 0.1

_STEP_LINE = re.compile(r"^step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)", re.M)
_ITER_LINE = re.compile(r"^iter (\d+): loss ([0-9.]+), time ([0-9.]+)ms", re.M)


def check_nanogpt_dir(path: pathlib.Path) -> None:
  """Raises ValueError (one line) unless ``path`` holds the nanoGPT files this benchmark runs."""
  missing = [f for f in NANOGPT_FILES if not (path / f).is_file()]
  if missing:
    raise ValueError(f"--nanogpt-dir {path} is not a nanoGPT clone: it lacks {', '.join(missing)} "
                     "(git clone https://github.com/karpathy/nanoGPT)")


def nanogpt_command(iters: int, out_dir: str) -> list[str]:
  """nanoGPT's README CPU command for ``iters`` iterations (evaluating at ``iters`` too), run from its root."""
  if "=" in out_dir:  # its configurator splits --key=value on "="
    raise ValueError(f"nanoGPT's out_dir cannot contain '=' (got {out_dir})")
  cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
         "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
         "--n_head=4", "--n_embd=128", f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dropout=0.0",
         f"--out_dir={out_dir}"]
  if iters % EVAL_INTERVAL:  # otherwise the last evaluation would fall before the end
    cmd.append(f"--eval_interval={iters}")
  return cmd


def our_command(train_py: pathlib.Path, quantizer: str, iters: int, workdir: pathlib.Path, seed: int) -> list[str]:
  """Our trainer on the baby configuration with one quantizer."""
  flags = ["--config", "shakespeare_char_baby", "--quantizer", quantizer, "--seed", str(seed),
           "--workdir", str(workdir)]
  if quantizer == "tga":
    flags += ["--update", "sequential"]
  if iters != BABY_ITERS:
    flags += ["--max-steps", str(iters)]
  return [sys.executable, str(train_py), *flags]


def pinned(cmd: list[str], cores: list[int] | None) -> list[str]:
  """``cmd`` under ``taskset -c cores`` (unchanged when cores is None)."""
  if cores is None:
    return cmd
  return ["taskset", "-c", ",".join(map(str, cores)), *cmd]


def thread_env(cores: list[int] | None) -> dict[str, str]:
  """The environment of every run: torch's intra-op threads = the number of cores the run may use."""
  env = dict(os.environ)
  n = len(cores) if cores is not None else len(os.sched_getaffinity(0))
  env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(n)
  return env


def parse_nanogpt_log(text: str) -> dict:
  """nanoGPT's printed evaluations and iteration times -> {val_loss, train_loss, step, val_curve, median_iter_ms}.

  Raises ValueError when the log has no evaluation line (the run failed or printed nothing).
  """
  evals = [(int(s), float(tr), float(va)) for s, tr, va in _STEP_LINE.findall(text)]
  if not evals:
    raise ValueError("nanoGPT printed no 'step N: train loss X, val loss Y' line")
  step, train_loss, val_loss = evals[-1]
  times = [float(ms) for it, _, ms in _ITER_LINE.findall(text) if int(it) > 0]  # iteration 0 includes start-up
  return {"step": step, "train_loss": train_loss, "val_loss": val_loss,
          "val_curve": [[s, va] for s, _, va in evals],
          "median_iter_ms": statistics.median(times) if times else None}


def read_our_summary(workdir: pathlib.Path) -> dict:
  """The numbers this benchmark reports from one of our runs' ``summary.json``."""
  path = workdir / "summary.json"
  if not path.is_file():
    raise ValueError(f"{path} is missing (the run did not finish)")
  s = json.loads(path.read_text())
  if s.get("interrupted"):
    raise ValueError(f"{path}: the run was interrupted at step {s.get('steps')}")
  return {"val_loss": s["val_loss"], "val_bpc": s.get("val_bpc"), "steps": s.get("steps"),
          "train_wall_s": s.get("wall_seconds"), "sample": s.get("sample")}


def compare(theirs: dict, ours: dict[str, dict]) -> dict:
  """Ratios and the issue's goals from nanoGPT's and our runs' numbers (each with wall_s and val_loss)."""
  out: dict = {}
  if "fp" in ours:
    fp = ours["fp"]
    out["time_ratio_fp"] = fp["wall_s"] / theirs["wall_s"]
    out["fp_loss_gap"] = fp["val_loss"] - theirs["val_loss"]
    out["goal_time"] = out["time_ratio_fp"] <= TIME_RATIO_GOAL
    out["goal_fp_loss"] = out["fp_loss_gap"] <= FP_LOSS_MARGIN
    if "tga" in ours:
      out["tga_loss_gap"] = ours["tga"]["val_loss"] - fp["val_loss"]
      out["goal_tga_loss"] = abs(out["tga_loss_gap"]) <= TGA_LOSS_MARGIN
  for name, run in ours.items():
    out[f"time_ratio_{name}"] = run["wall_s"] / theirs["wall_s"]
  return out


def format_table(report: dict) -> str:
  """A markdown table of the runs and the goals' verdicts."""
  theirs, ours, c = report["nanogpt"], report["ours"], report["comparison"]
  lines = [f"{report['iters']} iterations, batch 12, context 64, {report['threads']} threads"
           f"{' on cores ' + report['cores'] if report['cores'] else ''}", "",
           "| run | whole run (s) | / nanoGPT | val loss (nats/char) |", "|---|---|---|---|",
           f"| nanoGPT (PyTorch) | {theirs['wall_s']:.1f} | 1.00 | {theirs['val_loss']:.4f} |"]
  for name, run in ours.items():
    lines.append(f"| ours, {name} | {run['wall_s']:.1f} | {c[f'time_ratio_{name}']:.2f} | {run['val_loss']:.4f} |")
  verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
  lines.append("")
  if "goal_time" in c:
    lines.append(f"- time ours FP / nanoGPT = {c['time_ratio_fp']:.2f} (goal <= {TIME_RATIO_GOAL}): "
                 f"{verdict(c['goal_time'])}")
    lines.append(f"- val loss ours FP - nanoGPT = {c['fp_loss_gap']:+.4f} (goal <= +{FP_LOSS_MARGIN}): "
                 f"{verdict(c['goal_fp_loss'])}")
  if "goal_tga_loss" in c:
    lines.append(f"- val loss TGA - ours FP = {c['tga_loss_gap']:+.4f} (goal within {TGA_LOSS_MARGIN}): "
                 f"{verdict(c['goal_tga_loss'])}")
  return "\n".join(lines)


def timed_run(cmd: list[str], cwd: pathlib.Path, log: pathlib.Path, env: dict) -> float:
  """Runs ``cmd`` to completion with its output in ``log``; returns its wall seconds.

  Raises RuntimeError naming the log (and printing its tail) when the run fails.
  """
  start = time.perf_counter()
  with open(log, "w") as f:
    rc = subprocess.call(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
  wall = time.perf_counter() - start
  if rc != 0:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {rc}; log {log}:\n{tail}")
  return wall


def place_text(text: pathlib.Path, nanogpt_dir: pathlib.Path) -> pathlib.Path:
  """Copies ``text`` to nanoGPT's ``data/shakespeare_char/input.txt`` (unless identical already)."""
  target = nanogpt_dir / "data" / "shakespeare_char" / "input.txt"
  if not target.is_file() or target.read_bytes() != text.read_bytes():
    shutil.copyfile(text, target)
  return target


def parse_cores(spec: str | None) -> list[int] | None:
  """``"0,1"`` -> [0, 1]; None/"all" -> None (no pinning)."""
  if spec is None or spec == "all":
    return None
  try:
    cores = sorted({int(c) for c in spec.split(",") if c.strip()})
  except ValueError:
    raise ValueError(f"--cores must be comma-separated core numbers like 0,1 (got {spec!r})") from None
  allowed = os.sched_getaffinity(0)
  if not cores or not set(cores) <= allowed:
    raise ValueError(f"--cores {spec}: this process may run on cores {sorted(allowed)} only")
  if shutil.which("taskset") is None:
    raise ValueError("--cores needs the taskset command (util-linux)")
  return cores


def run_benchmark(args: argparse.Namespace) -> dict:
  """Runs nanoGPT and ours back to back; returns the report (also written to --out)."""
  nanogpt_dir = pathlib.Path(args.nanogpt_dir).expanduser().resolve()
  check_nanogpt_dir(nanogpt_dir)
  text = pathlib.Path(args.text).expanduser()
  if not text.is_file():
    raise ValueError(f"--text {text} does not exist")
  if args.iters < 1:
    raise ValueError(f"--iters must be >= 1 (got {args.iters})")
  cores = parse_cores(args.cores)
  env = thread_env(cores)
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="vs_nanogpt_")).resolve()
  work.mkdir(parents=True, exist_ok=True)
  stale = [p.name for p in (work / "nanogpt_out", *(work / q for q in args.quantizers)) if p.exists()]
  if stale:  # our trainer would resume from them, and the timing would be meaningless
    raise ValueError(f"--workdir {work} already holds {', '.join(stale)}: give an empty or new one")

  place_text(text, nanogpt_dir)
  prepare_s = timed_run(pinned([sys.executable, "data/shakespeare_char/prepare.py"], cores), nanogpt_dir,
                        work / "nanogpt_prepare.log", env)
  print(f"nanoGPT: {args.iters} iterations ...", flush=True)
  wall = timed_run(pinned(nanogpt_command(args.iters, str(work / "nanogpt_out")), cores), nanogpt_dir,
                   work / "nanogpt.log", env)
  theirs = {"wall_s": wall, "prepare_s": prepare_s, **parse_nanogpt_log((work / "nanogpt.log").read_text())}
  print(f"nanoGPT: {wall:.1f} s, val loss {theirs['val_loss']:.4f}", flush=True)
  ours = {}
  for q in args.quantizers:
    print(f"ours, {q}: {args.iters} iterations ...", flush=True)
    cmd = our_command(pathlib.Path(args.train_py).resolve(), q, args.iters, work / q, args.seed)
    wall = timed_run(pinned(cmd, cores), ROOT, work / f"{q}.log", env)
    ours[q] = {"wall_s": wall, **read_our_summary(work / q)}
    print(f"ours, {q}: {wall:.1f} s, val loss {ours[q]['val_loss']:.4f}", flush=True)

  report = {"iters": args.iters, "cores": args.cores, "threads": int(env["OMP_NUM_THREADS"]),
            "machine": {"platform": platform.platform(), "cpus_allowed": len(os.sched_getaffinity(0)),
                        "xla_flags": os.environ.get("XLA_FLAGS", "")},
            "nanogpt": theirs, "ours": ours, "comparison": compare(theirs, ours), "workdir": str(work)}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  if args.workdir is None:
    shutil.rmtree(work, ignore_errors=True)
  return report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--nanogpt-dir", required=True, help="a clone of karpathy/nanoGPT")
  parser.add_argument("--cores", default=None, help="pin every run to these cores, e.g. 0,1 (default: all)")
  parser.add_argument("--iters", type=int, default=BABY_ITERS, help="iterations of every run (smoke: e.g. 20)")
  parser.add_argument("--out", default=str(ROOT / "results" / "vs_nanogpt.json"))
  parser.add_argument("--workdir", default=None, help="keep logs and runs here (default: a temporary one, removed)")
  parser.add_argument("--text", default=str(TEXT), help="the training text (default: our Tiny Shakespeare)")
  parser.add_argument("--train-py", default=str(ROOT / "train.py"), help="our trainer (default: this checkout's)")
  parser.add_argument("--quantizers", nargs="*", default=["fp", "tga"], help="ours to run (none: nanoGPT only)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    report = run_benchmark(args)
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, ValueError) else 1
  print(format_table(report))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
