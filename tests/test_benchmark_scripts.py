"""benchmarks/vs_nanogpt.py and benchmarks/lm_study.py, against fake trainers that record how they were called.

The fakes stand in for nanoGPT's scripts and for our train.py: they write what the
real ones print or write (nanoGPT's ``step N: ... val loss`` lines, our summary.json
and metrics.jsonl), so the orchestration, parsing, tables and plots are checked here
without training anything.
"""
import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import textwrap

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"

# Our fake train.py: logs its argv (one JSON line per call to $FAKE_LOG), fails for the quantizers in
# $FAKE_FAIL, otherwise writes metrics.jsonl (val rows at steps 0 and --max-steps) and summary.json.
FAKE_OURS = textwrap.dedent("""
  import json, os, pathlib, sys
  argv = sys.argv[1:]
  flag = lambda name, default=None: argv[argv.index(name) + 1] if name in argv else default
  with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": argv, "omp": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
  q, seed, steps = flag("--quantizer"), int(flag("--seed", 0)), int(flag("--max-steps", 2000))
  if q in os.environ.get("FAKE_FAIL", "").split(","):
    sys.exit(1)
  loss = {"fp": 1.50, "tga": 1.58, "absmean": 1.62, "twn": 1.61}[q] + 0.02 * seed
  if "--activation-bits" in argv:
    loss += 0.05
  ternary = q != "fp"
  layers = [{"name": "embed", "shape": [65, 128], "quantizer": "fp", "sparsity": None, "threshold": None,
             "scale": None},
            {"name": "block0/attn/qkv", "shape": [128, 256], "quantizer": q, "sparsity": 0.5 if ternary else None,
             "threshold": 0.01, "scale": 0.02},
            {"name": "block0/mlp/down", "shape": [256, 64], "quantizer": q, "sparsity": 0.2 if ternary else None,
             "threshold": 0.01, "scale": 0.02}]
  wd = pathlib.Path(flag("--workdir"))
  wd.mkdir(parents=True, exist_ok=True)
  rows = [{"step": 1, "split": "train", "loss": 4.0},
          {"step": 0, "split": "val", "loss": 4.17, "bpc": 6.0, "layers": layers},
          {"step": steps, "split": "val", "loss": loss, "bpc": loss / 0.6931471805599453, "layers": layers}]
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
  (wd / "summary.json").write_text(json.dumps({
    "val_loss": loss, "val_bpc": loss / 0.6931471805599453, "steps": steps, "wall_seconds": 10.0 + seed,
    "sample": f"ROMEO:\\n{q} speaks, seed {seed}", "config": {"quantizer": q, "seed": seed}}))
""")

# nanoGPT's scripts, faked: prepare.py checks input.txt and writes train.bin; train.py logs its argv and
# environment to $FAKE_LOG and prints what nanoGPT prints.
FAKE_PREPARE = textwrap.dedent("""
  import os
  here = os.path.dirname(__file__)
  text = open(os.path.join(here, "input.txt")).read()
  open(os.path.join(here, "train.bin"), "wb").write(text.encode()[: int(0.9 * len(text))])
""")
FAKE_NANOGPT_TRAIN = textwrap.dedent("""
  import json, os, sys
  with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"nanogpt": sys.argv[1:], "cwd": os.getcwd(), "omp": os.environ.get("OMP_NUM_THREADS"),
                        "prepared": os.path.exists("data/shakespeare_char/train.bin")}) + "\\n")
  print("step 0: train loss 4.1676, val loss 4.1649")
  print("iter 0: loss 4.1700, time 900.00ms, mfu -100.00%")
  print("iter 1: loss 4.0000, time 20.00ms, mfu -100.00%")
  print("iter 2: loss 3.9000, time 30.00ms, mfu -100.00%")
  print("iter 3: loss 3.8000, time 24.00ms, mfu -100.00%")
  print("step 20: train loss 3.5494, val loss 1.5400")
""")


def _load(name):
  spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def vs():
  return _load("vs_nanogpt")


@pytest.fixture
def study():
  return _load("lm_study")


@pytest.fixture
def fake_log(tmp_path, monkeypatch):
  log = tmp_path / "calls.jsonl"
  monkeypatch.setenv("FAKE_LOG", str(log))
  return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _fake_nanogpt(root: pathlib.Path) -> pathlib.Path:
  (root / "config").mkdir(parents=True)
  (root / "data" / "shakespeare_char").mkdir(parents=True)
  (root / "train.py").write_text(FAKE_NANOGPT_TRAIN)
  (root / "model.py").write_text("")
  (root / "configurator.py").write_text("")
  (root / "config" / "train_shakespeare_char.py").write_text("")
  (root / "data" / "shakespeare_char" / "prepare.py").write_text(FAKE_PREPARE)
  return root


# --- vs_nanogpt ----------------------------------------------------------------------------------------


def test_nanogpt_command_is_the_readme_cpu_command(vs):
  readme = ("train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 "
            "--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 "
            "--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0").split()
  assert vs.nanogpt_command(2000, "/tmp/o")[1:] == readme + ["--out_dir=/tmp/o"]
  short = vs.nanogpt_command(20, "/tmp/o")
  assert "--max_iters=20" in short and "--lr_decay_iters=20" in short and short[-1] == "--eval_interval=20"
  assert vs.nanogpt_command(500, "/tmp/o")[-1] == "--out_dir=/tmp/o"  # 500 is a multiple of its 250
  with pytest.raises(ValueError, match="="):
    vs.nanogpt_command(20, "/tmp/a=b")


def test_parse_nanogpt_log_takes_the_last_evaluation_and_steady_iteration_times(vs):
  parsed = vs.parse_nanogpt_log(FAKE_NANOGPT_TRAIN.replace('print("', "").replace('")', ""))
  assert parsed["step"] == 20 and parsed["val_loss"] == 1.54 and parsed["train_loss"] == 3.5494
  assert parsed["val_curve"] == [[0, 4.1649], [20, 1.54]]
  assert parsed["median_iter_ms"] == 24.0  # iterations 1-3; iteration 0 includes start-up
  with pytest.raises(ValueError, match="no 'step N"):
    vs.parse_nanogpt_log("Traceback (most recent call last):\n")


def test_compare_computes_ratios_gaps_and_goals(vs):
  theirs = {"wall_s": 100.0, "val_loss": 1.88}
  c = vs.compare(theirs, {"fp": {"wall_s": 80.0, "val_loss": 1.90}, "tga": {"wall_s": 150.0, "val_loss": 2.05}})
  assert c["time_ratio_fp"] == pytest.approx(0.8) and c["time_ratio_tga"] == pytest.approx(1.5)
  assert c["fp_loss_gap"] == pytest.approx(0.02) and c["tga_loss_gap"] == pytest.approx(0.15)
  assert c["goal_time"] and c["goal_fp_loss"] and not c["goal_tga_loss"]
  c = vs.compare(theirs, {"fp": {"wall_s": 120.0, "val_loss": 1.95}})
  assert not c["goal_time"] and not c["goal_fp_loss"] and "goal_tga_loss" not in c


def test_default_text_is_the_committed_tiny_shakespeare(vs):
  text = vs.TEXT.read_text()
  assert text.startswith("First Citizen:") and len(text) == 1115394  # the length nanoGPT's prepare.py notes


def test_missing_nanogpt_clone_is_one_line_error(vs, tmp_path, capsys):
  (tmp_path / "train.py").write_text("")
  assert vs.main(["--nanogpt-dir", str(tmp_path), "--text", __file__]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "model.py" in err and "not a nanoGPT clone" in err
  assert "train.py," not in err  # it is there


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
def test_vs_nanogpt_end_to_end_with_fakes(vs, tmp_path, fake_log, capsys):
  nanogpt = _fake_nanogpt(tmp_path / "nanoGPT")
  ours = tmp_path / "ours_train.py"
  ours.write_text(FAKE_OURS)
  text = tmp_path / "shakespeare.txt"
  text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
  core = min(os.sched_getaffinity(0))
  out = tmp_path / "res" / "vs.json"
  assert vs.main(["--nanogpt-dir", str(nanogpt), "--text", str(text), "--iters", "20", "--cores", str(core),
                  "--train-py", str(ours), "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
  assert (nanogpt / "data" / "shakespeare_char" / "input.txt").read_text() == text.read_text()
  theirs_call, fp_call, tga_call = fake_log()
  assert theirs_call["prepared"] and pathlib.Path(theirs_call["cwd"]) == nanogpt.resolve()
  assert theirs_call["nanogpt"] == vs.nanogpt_command(20, str(tmp_path / "work" / "nanogpt_out"))[2:]
  assert theirs_call["omp"] == fp_call["omp"] == tga_call["omp"] == "1"  # one core pinned: one thread
  assert fp_call["argv"][fp_call["argv"].index("--quantizer") + 1] == "fp"
  assert "--max-steps" in fp_call["argv"] and fp_call["argv"][fp_call["argv"].index("--max-steps") + 1] == "20"
  assert "shakespeare_char_baby" in tga_call["argv"] and "sequential" in tga_call["argv"]
  report = json.loads(out.read_text())
  assert report["nanogpt"]["val_loss"] == 1.54 and report["ours"]["fp"]["val_loss"] == 1.50
  assert report["ours"]["tga"]["val_loss"] == 1.58 and report["threads"] == 1
  c = report["comparison"]
  assert c["fp_loss_gap"] == pytest.approx(1.50 - 1.54) and c["goal_fp_loss"]
  assert c["tga_loss_gap"] == pytest.approx(0.08) and c["goal_tga_loss"]
  assert c["time_ratio_fp"] == pytest.approx(report["ours"]["fp"]["wall_s"] / report["nanogpt"]["wall_s"])
  printed = capsys.readouterr().out
  assert "| nanoGPT (PyTorch) |" in printed and "| ours, tga |" in printed and "1.5400" in printed
  # A second run into the same workdir would resume our runs, not time them: refused.
  assert vs.main(["--nanogpt-dir", str(nanogpt), "--text", str(text), "--iters", "20", "--train-py", str(ours),
                  "--out", str(out), "--workdir", str(tmp_path / "work")]) == 2
  assert "already holds" in capsys.readouterr().err


def test_failed_run_names_its_log(vs, tmp_path, fake_log, capsys, monkeypatch):
  nanogpt = _fake_nanogpt(tmp_path / "nanoGPT")
  ours = tmp_path / "ours_train.py"
  ours.write_text(FAKE_OURS)
  monkeypatch.setenv("FAKE_FAIL", "tga")
  assert vs.main(["--nanogpt-dir", str(nanogpt), "--text", __file__, "--iters", "20", "--train-py", str(ours),
                  "--out", str(tmp_path / "vs.json"), "--workdir", str(tmp_path / "w")]) == 1
  assert "tga.log" in capsys.readouterr().err and not (tmp_path / "vs.json").exists()


# --- lm_study --------------------------------------------------------------------------------------------


def test_weighted_sparsity_weights_layers_by_size_and_skips_fp_layers(study):
  layers = [{"name": "a", "shape": [128, 256], "quantizer": "tga", "sparsity": 0.5},
            {"name": "b", "shape": [256, 64], "quantizer": "tga", "sparsity": 0.2},
            {"name": "head", "shape": [128, 65], "quantizer": "fp", "sparsity": None}]
  # (0.5 * 32768 + 0.2 * 16384) / 49152 = 0.4 (the unweighted mean would be 0.35)
  assert study.weighted_sparsity(layers) == pytest.approx(0.4)
  assert study.weighted_sparsity(layers[2:]) is None


def test_lm_study_methods_are_options_our_trainer_accepts(study):
  from tgq_jax.training import configs
  if "activation_bits" not in {f.name for f in dataclasses.fields(configs.Config)}:
    pytest.skip("--activation-bits is not in this checkout's trainer yet")
  for name, (_, flags) in study.METHODS.items():
    cfg = configs.from_args(["--config", "demo", *flags, "--max-steps", "3"])
    assert cfg.quantizer == flags[flags.index("--quantizer") + 1] and cfg.max_steps == 3
    assert cfg.activation_bits == (8 if name == "absmean_a8" else None)
    assert cfg.update == "sequential"  # TGA's sequential update, named explicitly for "tga"


def _run_study(study, tmp_path, *extra):
  ours = tmp_path / "ours_train.py"
  ours.write_text(FAKE_OURS)
  return study.main(["--root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--steps", "3",
                     "--train-py", str(ours), *extra])


def test_lm_study_runs_every_method_and_seed_then_reports(study, tmp_path, fake_log, capsys):
  assert _run_study(study, tmp_path) == 0
  calls = [c["argv"] for c in fake_log()]
  assert len(calls) == 10 and all(c[:2] == ["--config", "shakespeare_char"] for c in calls)
  assert all(c[c.index("--max-steps") + 1] == "3" for c in calls)
  a8 = [c for c in calls if "--activation-bits" in c]
  assert len(a8) == 2 and all(c[c.index("--quantizer") + 1] == "absmean" for c in a8)
  assert sum("sequential" in c for c in calls) == 2
  table = json.loads((tmp_path / "out" / "lm_study.json").read_text())["methods"]
  assert table["fp"]["val_loss"] == pytest.approx({"0": 1.50, "1": 1.52})
  assert table["tga"]["mean_val_loss"] == pytest.approx(1.59)
  assert table["tga"]["gap_to_fp"] == pytest.approx(0.08)
  assert table["absmean_a8"]["gap_to_fp"] == pytest.approx(0.17)
  assert table["twn"]["mean_sparsity"] == pytest.approx(0.4) and table["fp"]["mean_sparsity"] is None
  md = (tmp_path / "out" / "lm_study.md").read_text()
  assert "| TGA (sequential) | 1.5800 / 1.6000 | 1.5900 | +0.0800 | 2.294 | 0.400 | 10 |" in md
  assert "| FP | 1.5000 / 1.5200 | 1.5100 | +0.0000 | 2.178 | - | 10 |" in md
  assert "twn speaks, seed 0" in md and "Not finished" not in md
  for png in ("val_loss.png", "sparsity.png"):
    data = (tmp_path / "out" / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  # Resumable: a second call runs nothing and reports the same.
  assert _run_study(study, tmp_path) == 0 and len(fake_log()) == 10
  assert (tmp_path / "out" / "lm_study.md").read_text() == md


def test_lm_study_reports_failed_and_missing_runs(study, tmp_path, fake_log, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_FAIL", "twn")
  assert _run_study(study, tmp_path, "--seeds", "0", "--methods", "fp", "twn", "tga", "--", "--log-every", "1") == 1
  calls = [c["argv"] for c in fake_log()]
  assert len(calls) == 3 and all(c[-2:] == ["--log-every", "1"] for c in calls)
  assert "twn_s0: FAILED" in capsys.readouterr().out
  md = (tmp_path / "out" / "lm_study.md").read_text()
  assert "Not finished: TWN (seed 0)." in md and "| TWN | - | - | - | - | - | - |" in md
  # A run stopped midway writes a summary marked interrupted: it counts as not finished.
  tga_summary = tmp_path / "runs" / "tga_s0" / "summary.json"
  tga_summary.write_text(json.dumps({**json.loads(tga_summary.read_text()), "interrupted": True}))
  monkeypatch.delenv("FAKE_FAIL")
  assert _run_study(study, tmp_path, "--seeds", "0", "--methods", "fp", "twn", "tga") == 0
  rerun = [c["argv"][c["argv"].index("--quantizer") + 1] for c in fake_log()[3:]]
  assert rerun == ["twn", "tga"]  # the failed and the interrupted one, not the finished FP run


def test_lm_study_bad_input_is_one_line(study, tmp_path, capsys):
  assert study.main(["--root", str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 2
  assert capsys.readouterr().err.strip() == "error: --steps must be an integer >= 1 (got None)"
  assert study.main(["--root", str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--report-only"]) == 1
  assert "no finished run" in capsys.readouterr().err
