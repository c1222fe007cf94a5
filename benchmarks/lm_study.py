"""The ternary LM study (issue 24, item 7): FP, TGA, absmean, TWN and BitNet's W1.58A8 at one budget, two seeds.

    python benchmarks/lm_study.py --root runs/lm_study --steps 2000 --out results/lm_study
        [--seeds 0 1] [--methods fp tga absmean twn absmean_a8] [--config shakespeare_char]
        [--report-only] [-- EXTRA TRAIN.PY FLAGS]

Every run is ``train.py --config shakespeare_char --max-steps STEPS --seed S
--workdir ROOT/<method>_s<S>`` plus the method's flags:

    fp           --quantizer fp
    tga          --quantizer tga --update sequential      (TGA, trainable thresholds)
    absmean      --quantizer absmean                      (BitNet b1.58's ternary weights)
    twn          --quantizer twn
    absmean_a8   --quantizer absmean --activation-bits 8  (BitNet b1.58 as trained: W1.58A8)

The runs go one after another (two cores: side by side they only slow each
other). A finished run (its ``summary.json`` exists and is not marked
``interrupted``) is skipped, so the study resumes where it stopped: rerun the
same command; a run stopped midway resumes from its own checkpoint (train.py
does that in an existing workdir). Then the report,
from every finished run under ``--root`` (``--report-only``: only the report):
``OUT/lm_study.md`` (per method: each seed's validation loss and their mean, in
nats per character, the gap to FP, bits per character, the mean sparsity of the
ternary layers weighted by their number of weights, one generated sample),
``OUT/lm_study.json`` (the same numbers), ``OUT/val_loss.png`` (validation loss
against step, one line per run) and ``OUT/sparsity.png`` (final sparsity per
layer, mean over seeds, per ternary method).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# method -> (label, train.py flags)
METHODS: dict[str, tuple[str, list[str]]] = {
  "fp": ("FP", ["--quantizer", "fp"]),
  "tga": ("TGA (sequential)", ["--quantizer", "tga", "--update", "sequential"]),
  "absmean": ("absmean", ["--quantizer", "absmean"]),
  "twn": ("TWN", ["--quantizer", "twn"]),
  "absmean_a8": ("absmean W1.58A8", ["--quantizer", "absmean", "--activation-bits", "8"]),
}
SAMPLE_CHARS = 400  # of each method's sample shown in the markdown


def run_name(method: str, seed: int) -> str:
  return f"{method}_s{seed}"


def train_command(train_py: pathlib.Path, method: str, seed: int, steps: int, config: str,
                  workdir: pathlib.Path, extra: list[str]) -> list[str]:
  """The train.py command line of one run of the study."""
  return [sys.executable, str(train_py), "--config", config, *METHODS[method][1], "--max-steps", str(steps),
          "--seed", str(seed), "--workdir", str(workdir), *extra]


def is_finished(workdir: pathlib.Path) -> bool:
  """Whether the run in ``workdir`` ended: a summary.json not marked interrupted (a stopped run writes one too)."""
  path = workdir / "summary.json"
  return path.is_file() and not json.loads(path.read_text()).get("interrupted", False)


def load_run(workdir: pathlib.Path) -> tuple[dict, list[dict]]:
  """(summary.json, metrics.jsonl rows) of a finished run."""
  summary = json.loads((workdir / "summary.json").read_text())
  path = workdir / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
  return summary, rows


def val_rows(rows: list[dict]) -> list[dict]:
  return [r for r in rows if r.get("split") == "val"]


def ternary_layers(layers: list[dict]) -> list[dict]:
  """The layers a ternary quantizer acts on (full-precision ones: quantizer "fp", no sparsity)."""
  return [l for l in layers if l.get("quantizer") not in (None, "fp") and l.get("sparsity") is not None]


def weighted_sparsity(layers: list[dict]) -> float | None:
  """Fraction of zero codes over all ternary layers together (each layer weighted by its weight count)."""
  sizes = [(l["sparsity"], _size(l["shape"])) for l in ternary_layers(layers)]
  total = sum(n for _, n in sizes)
  return sum(s * n for s, n in sizes) / total if total else None


def _size(shape: list[int]) -> int:
  n = 1
  for d in shape:
    n *= d
  return n


def final_layers(rows: list[dict]) -> list[dict]:
  """The per-layer table of the last validation row (empty when there is none)."""
  vals = val_rows(rows)
  return vals[-1].get("layers", []) if vals else []


def summarize(runs: dict[str, tuple[dict, list[dict]]], methods: list[str], seeds: list[int]) -> dict:
  """Per method: each seed's val loss, means, the gap to FP, weighted sparsity, one sample, missing seeds."""
  out = {}
  for m in methods:
    done = [(s, runs[run_name(m, s)]) for s in seeds if run_name(m, s) in runs]
    losses = {s: summary["val_loss"] for s, (summary, _) in done}
    sparsities = [weighted_sparsity(final_layers(rows)) for _, (_, rows) in done]
    out[m] = {"label": METHODS[m][0], "val_loss": losses,
              "mean_val_loss": statistics.mean(losses.values()) if losses else None,
              "mean_val_bpc": _mean([summary.get("val_bpc") for _, (summary, _) in done]),
              "mean_sparsity": _mean(sparsities),
              "mean_wall_s": _mean([s.get("wall_seconds") for _, (s, _) in done]),
              "steps": [s.get("steps") for _, (s, _) in done],
              "sample": done[0][1][0].get("sample") if done else None,
              "missing_seeds": [s for s in seeds if s not in losses]}
  fp = out.get("fp", {}).get("mean_val_loss")
  for m, r in out.items():
    r["gap_to_fp"] = None if fp is None or r["mean_val_loss"] is None else r["mean_val_loss"] - fp
  return out


def _mean(xs: list[float | None]) -> float | None:
  """Mean of the values that are there (None when none is)."""
  xs = [x for x in xs if x is not None]
  return statistics.mean(xs) if xs else None


def _num(x: float | None, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def markdown(table: dict, seeds: list[int], steps: int | None, config: str) -> str:
  """The study's table and samples as markdown."""
  budget = f"{steps} steps" if steps else "the runs' budget"
  lines = [f"`--config {config}`, {budget}, seeds {', '.join(map(str, seeds))}. Validation loss in nats per "
           "character (last 10% of the text); sparsity: fraction of zero weights over all ternary layers.", "",
           f"| method | val loss (seed {' / '.join(map(str, seeds))}) | mean | gap to FP | bits/char | "
           "sparsity | wall (s) |", "|---|---|---|---|---|---|---|"]
  for r in table.values():
    per_seed = " / ".join(_num(r["val_loss"].get(s), ".4f") for s in seeds)
    gap = "-" if r["gap_to_fp"] is None else f"{r['gap_to_fp']:+.4f}"
    lines.append(f"| {r['label']} | {per_seed} | {_num(r['mean_val_loss'], '.4f')} | {gap} | "
                 f"{_num(r['mean_val_bpc'], '.3f')} | {_num(r['mean_sparsity'], '.3f')} | "
                 f"{_num(r['mean_wall_s'], '.0f')} |")
  missing = [f"{r['label']} (seed {', '.join(map(str, r['missing_seeds']))})" for r in table.values()
             if r["missing_seeds"]]
  if missing:
    lines += ["", f"Not finished: {'; '.join(missing)}."]
  lines += ["", "Samples (first seed of each method):"]
  for r in table.values():
    if r["sample"]:
      text = r["sample"][:SAMPLE_CHARS].replace("```", "'''")
      lines += ["", f"**{r['label']}**", "", "```", text, "```"]
  return "\n".join(lines) + "\n"


def plot_val_loss(runs: dict[str, tuple[dict, list[dict]]], methods: list[str], seeds: list[int],
                  path: pathlib.Path) -> None:
  """Validation loss against step, one line per run (colour: method; line style: seed).

  Left: the whole run; right: its second half, where the methods separate.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (whole, late) = plt.subplots(1, 2, figsize=(12, 4.5))
  styles = ["-", "--", ":", "-."]
  last = max((r["step"] for _, rows in runs.values() for r in val_rows(rows)), default=0)
  for i, m in enumerate(methods):
    for j, s in enumerate(seeds):
      if run_name(m, s) not in runs:
        continue
      vals = val_rows(runs[run_name(m, s)][1])
      for ax, part in ((whole, vals), (late, [r for r in vals if r["step"] >= last / 2])):
        ax.plot([r["step"] for r in part], [r["loss"] for r in part], styles[j % len(styles)], color=f"C{i}",
                marker="o", ms=3, label=f"{METHODS[m][0]}, seed {s}")
  whole.set_title("whole run", fontsize=9); late.set_title("second half", fontsize=9)
  for ax in (whole, late):
    ax.set_xlabel("step"); ax.set_ylabel("validation loss (nats/char)")
  late.legend(fontsize=7, ncol=2)
  fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def plot_sparsity(runs: dict[str, tuple[dict, list[dict]]], methods: list[str], seeds: list[int],
                  path: pathlib.Path) -> None:
  """Final sparsity of each ternary layer, mean over seeds, one bar per ternary method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  per_method: dict[str, dict[str, list[float]]] = {}
  names: list[str] = []
  for m in methods:
    for s in seeds:
      if run_name(m, s) in runs:
        for layer in ternary_layers(final_layers(runs[run_name(m, s)][1])):
          per_method.setdefault(m, {}).setdefault(layer["name"], []).append(layer["sparsity"])
          if layer["name"] not in names:
            names.append(layer["name"])
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4.5))
  width = 0.8 / max(len(per_method), 1)
  for i, (m, layers) in enumerate(per_method.items()):
    xs = [k + i * width for k, n in enumerate(names) if n in layers]
    ax.bar(xs, [statistics.mean(layers[n]) for n in names if n in layers], width, label=METHODS[m][0],
           color=f"C{methods.index(m)}")
  ax.set_xticks([k + 0.4 - width / 2 for k in range(len(names))], names, rotation=90, fontsize=7)
  ax.set_ylabel("final sparsity (fraction of zeros)"); ax.legend(fontsize=7)
  fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def report(root: pathlib.Path, out: pathlib.Path, methods: list[str], seeds: list[int], steps: int | None,
           config: str) -> dict:
  """Writes lm_study.md, lm_study.json, val_loss.png and sparsity.png from the finished runs under root."""
  runs = {run_name(m, s): load_run(root / run_name(m, s)) for m in methods for s in seeds
          if is_finished(root / run_name(m, s))}
  if not runs:
    raise ValueError(f"no finished run under {root} (no <method>_s<seed>/summary.json of a completed run)")
  table = summarize(runs, methods, seeds)
  out.mkdir(parents=True, exist_ok=True)
  (out / "lm_study.md").write_text(markdown(table, seeds, steps, config))
  (out / "lm_study.json").write_text(json.dumps({"config": config, "steps": steps, "seeds": seeds,
                                                 "methods": table}, indent=2) + "\n")
  plot_val_loss(runs, methods, seeds, out / "val_loss.png")
  plot_sparsity(runs, methods, seeds, out / "sparsity.png")
  return table


def run_all(args: argparse.Namespace, extra: list[str]) -> list[str]:
  """Runs every unfinished run in turn; returns the names of those that failed."""
  root = pathlib.Path(args.root).resolve()
  root.mkdir(parents=True, exist_ok=True)
  failed = []
  for s in args.seeds:
    for m in args.methods:
      workdir = root / run_name(m, s)
      if is_finished(workdir):
        print(f"{run_name(m, s)}: finished before, skipped", flush=True)
        continue
      cmd = train_command(pathlib.Path(args.train_py).resolve(), m, s, args.steps, args.config, workdir, extra)
      with open(root / f"{run_name(m, s)}.log", "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
      ok = rc == 0 and is_finished(workdir)
      print(f"{run_name(m, s)}: {'done' if ok else f'FAILED (exit {rc}), see {root / run_name(m, s)}.log'}",
            flush=True)
      if not ok:
        failed.append(run_name(m, s))
  return failed


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="the runs' workdirs: ROOT/<method>_s<seed>")
  parser.add_argument("--out", required=True, help="where lm_study.md/.json and the plots go")
  parser.add_argument("--steps", type=int, default=None, help="the budget of every run (required unless --report-only)")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
  parser.add_argument("--config", default="shakespeare_char")
  parser.add_argument("--train-py", default=str(ROOT / "train.py"))
  parser.add_argument("--report-only", action="store_true", help="only the report, from the finished runs")
  args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  if not args.report_only and (args.steps is None or args.steps < 1):
    print(f"error: --steps must be an integer >= 1 (got {args.steps})", file=sys.stderr)
    return 2
  failed = [] if args.report_only else run_all(args, extra)
  try:
    report(pathlib.Path(args.root).resolve(), pathlib.Path(args.out), args.methods, args.seeds, args.steps,
           args.config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print((pathlib.Path(args.out) / "lm_study.md").read_text())
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
