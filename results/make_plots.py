"""Plots and the tables of RESULTS.md from results/<run>/{metrics.jsonl,summary.json}.

    python results/make_plots.py              (the ResNet-20 study: results/{accuracy,sparsity,thresholds}.png)
    python results/make_plots.py --vit        (the ViT study: results/vit_*.png, per-quantizer means)
"""
import argparse
import statistics
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = pathlib.Path(__file__).parent


def load(run: pathlib.Path):
  rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
  return rows, json.loads((run / "summary.json").read_text())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--vit", action="store_true", help="the ViT study (runs named vit_*)")
  vit = parser.parse_args().vit
  runs = {p.name: load(p) for p in sorted(HERE.iterdir()) if (p / "summary.json").exists()
          and p.name.startswith("vit_") == vit}
  prefix, title = ("vit_", "Fashion-MNIST, vit_tiny, every linear layer ternary") if vit else (
    "", "Fashion-MNIST, ResNet-20, every layer ternary")
  print("| run | quantizer | update | init | seed | epochs | test acc. (%) | best (%) | wall (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, (_, s) in runs.items():
    c = s["config"]
    init = "FP checkpoint" if c.get("init_from") else "scratch"
    update = c["update"] if c["quantizer"] == "tga" else "-"
    print(f"| {name} | {c['quantizer']} | {update} | {init} | {c['seed']} | {c['epochs']} | "
          f"{100 * s['test_accuracy']:.2f} | {100 * s['best_test_accuracy']:.2f} | {s['wall_seconds']:.0f} |")
  if vit:  # per quantizer: mean over seeds, the seed-to-seed spread, mean sparsity of the ternary layers
    print("\n| quantizer | seeds | test acc. (%) per seed | mean (%) | spread (max - min) | mean sparsity |")
    print("|---|---|---|---|---|---|")
    by_q: dict[str, list] = {}
    for rows, s in runs.values():
      by_q.setdefault(s["config"]["quantizer"], []).append((rows, s))
    for q, group in by_q.items():
      accs = [100 * s["test_accuracy"] for _, s in group]
      layers = [l for rows, _ in group for l in [r for r in rows if r["split"] == "test"][-1]["layers"]
                if l["quantizer"] != "fp"]
      sparsity = statistics.mean(l["sparsity"] for l in layers) if layers else 0.0
      print(f"| {q} | {len(group)} | {' / '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} | "
            f"{max(accs) - min(accs):.2f} | {sparsity:.3f} |")

  # Test accuracy per epoch (one point per epoch) and the train accuracy between them.
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
  for name, (rows, _) in runs.items():
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    line, = a1.plot([r["epoch"] for r in train], [100 * r["accuracy"] for r in train], lw=0.8, label=name)
    a2.plot([r["epoch"] for r in test], [100 * r["accuracy"] for r in test], "o-", color=line.get_color(),
            label=name)
  a1.set_xlabel("epoch"); a1.set_ylabel("train accuracy (%, last 50 steps)"); a1.set_ylim(60 if vit else 70, 95)
  a2.set_xlabel("epoch"); a2.set_ylabel("test accuracy (%)"); a2.legend(fontsize=7, ncol=2)
  fig.suptitle(title)
  fig.tight_layout(); fig.savefig(HERE / f"{prefix}accuracy.png", dpi=90)

  ternary = {n: r for n, r in runs.items() if r[1]["config"]["quantizer"] != "fp"}
  fig, ax = plt.subplots(figsize=(16 if vit else 10, 4.5))
  width = 0.8 / max(len(ternary), 1)
  for i, (name, (rows, _)) in enumerate(ternary.items()):
    layers = [r for r in rows if r["split"] == "test"][-1]["layers"]
    ax.bar([j + i * width for j in range(len(layers))], [l["sparsity"] for l in layers], width, label=name)
  ax.set_xticks(range(len(layers)), [l["name"] for l in layers], rotation=90, fontsize=6 if vit else 7)
  ax.set_ylabel("final sparsity"); ax.legend(fontsize=7, ncol=3)
  fig.tight_layout(); fig.savefig(HERE / f"{prefix}sparsity.png", dpi=90)

  tga = {n: r for n, r in ternary.items() if r[1]["config"]["quantizer"] == "tga"}
  fig, axes = plt.subplots(1, len(tga), figsize=(4 * len(tga), 3.5), squeeze=False)
  for ax, (name, (rows, _)) in zip(axes[0], tga.items()):
    train = [r for r in rows if r["split"] == "train" and "delta" in r]
    for layer in train[-1]["delta"]:
      ax.plot([r["step"] for r in train], [r["delta"][layer] for r in train], lw=0.8)
    ax.set_title(name, fontsize=9); ax.set_xlabel("step"); ax.set_ylabel("delta")
  fig.suptitle("threshold trajectories (one line per layer)")
  fig.tight_layout(); fig.savefig(HERE / f"{prefix}thresholds.png", dpi=90)


if __name__ == "__main__":
  main()
