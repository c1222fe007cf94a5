#!/usr/bin/env bash
# What was tried when TGA missed the goal of RESULTS.md: the threshold's learning rate (10x up, and
# 100x down: thresholds nearly frozen at their init), from scratch, same budget and settings as
# results/run_study.sh (run that first). The gradient clip is not varied: with Adam as the
# threshold optimizer a clip rescales every gradient alike and barely changes the steps.
#   bash results/run_variants.sh [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-1}
PY=${PYTHON:-.venv/bin/python}
export XLA_FLAGS=--xla_force_host_platform_device_count=4
COMMON=(--arch resnet20 --dataset fashion_mnist --epochs "$EPOCHS" --batch-size 128 --no-augment
        --optimizer adam --lr 2e-3 --lr-schedule cosine --log-every 50 --quantizer tga --seed 0)

run() {  # name, extra flags...
  local name=$1; shift
  local start=$SECONDS
  "$PY" train.py "${COMMON[@]}" --workdir "runs/study/$name" "$@" > "runs/study/$name.log" 2>&1
  mkdir -p "results/$name"
  cp "runs/study/$name/metrics.jsonl" "runs/study/$name/summary.json" "results/$name/"
  echo "$name: $(( SECONDS - start )) s, test accuracy $("$PY" -c "import json; print(json.load(open('results/$name/summary.json'))['test_accuracy'])")"
}

mkdir -p runs/study
run tga_seq_thrlr1e-3_s0 --update sequential --threshold-lr 1e-3
run tga_seq_thrlr1e-6_s0 --update sequential --threshold-lr 1e-6
