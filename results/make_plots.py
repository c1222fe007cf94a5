"""Plots and the table of RESULTS.md from results/<run>/{metrics.jsonl,summary.json}.

    python results/make_plots.py      (writes results/*.png, prints the markdown table)
"""
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
  runs = {p.name: load(p) for p in sorted(HERE.iterdir()) if (p / "summary.json").exists()}
  print("| run | quantizer | update | init | seed | epochs | test acc. (%) | best (%) | wall (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, (_, s) in runs.items():
    c = s["config"]
    init = "FP checkpoint" if c.get("init_from") else "scratch"
    update = c["update"] if c["quantizer"] == "tga" else "-"
    print(f"| {name} | {c['quantizer']} | {update} | {init} | {c['seed']} | {c['epochs']} | "
          f"{100 * s['test_accuracy']:.2f} | {100 * s['best_test_accuracy']:.2f} | {s['wall_seconds']:.0f} |")

  # Test accuracy per epoch (one point per epoch) and the train accuracy between them.
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
  for name, (rows, _) in runs.items():
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    line, = a1.plot([r["epoch"] for r in train], [100 * r["accuracy"] for r in train], lw=0.8, label=name)
    a2.plot([r["epoch"] for r in test], [100 * r["accuracy"] for r in test], "o-", color=line.get_color(),
            label=name)
  a1.set_xlabel("epoch"); a1.set_ylabel("train accuracy (%, last 50 steps)"); a1.set_ylim(70, 95)
  a2.set_xlabel("epoch"); a2.set_ylabel("test accuracy (%)"); a2.legend(fontsize=7, ncol=2)
  fig.suptitle("Fashion-MNIST, ResNet-20, every layer ternary")
  fig.tight_layout(); fig.savefig(HERE / "accuracy.png", dpi=90)

  ternary = {n: r for n, r in runs.items() if r[1]["config"]["quantizer"] != "fp"}
  fig, ax = plt.subplots(figsize=(10, 4))
  width = 0.8 / max(len(ternary), 1)
  for i, (name, (rows, _)) in enumerate(ternary.items()):
    layers = [r for r in rows if r["split"] == "test"][-1]["layers"]
    ax.bar([j + i * width for j in range(len(layers))], [l["sparsity"] for l in layers], width, label=name)
  ax.set_xticks(range(len(layers)), [l["name"] for l in layers], rotation=90, fontsize=7)
  ax.set_ylabel("final sparsity"); ax.legend(fontsize=7, ncol=3)
  fig.tight_layout(); fig.savefig(HERE / "sparsity.png", dpi=90)

  tga = {n: r for n, r in ternary.items() if r[1]["config"]["quantizer"] == "tga"}
  fig, axes = plt.subplots(1, len(tga), figsize=(4 * len(tga), 3.5), squeeze=False)
  for ax, (name, (rows, _)) in zip(axes[0], tga.items()):
    train = [r for r in rows if r["split"] == "train" and "delta" in r]
    for layer in train[-1]["delta"]:
      ax.plot([r["step"] for r in train], [r["delta"][layer] for r in train], lw=0.8)
    ax.set_title(name, fontsize=9); ax.set_xlabel("step"); ax.set_ylabel("delta")
  fig.suptitle("threshold trajectories (one line per layer)")
  fig.tight_layout(); fig.savefig(HERE / "thresholds.png", dpi=90)


if __name__ == "__main__":
  main()
