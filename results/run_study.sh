#!/usr/bin/env bash
# The Fashion-MNIST accuracy study of RESULTS.md: ResNet-20, every layer ternary, equal budgets.
#   bash results/run_study.sh [EPOCHS]      (from the repository root; ~40 min on 2 cores at 2 epochs)
# Runs go to runs/study/<name>/; their metrics.jsonl and summary.json are copied to results/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-2}
PY=${PYTHON:-.venv/bin/python}
export XLA_FLAGS=--xla_force_host_platform_device_count=4   # 4 host devices: ~1.3x faster here
COMMON=(--arch resnet20 --dataset fashion_mnist --epochs "$EPOCHS" --batch-size 128 --no-augment
        --optimizer adam --lr 2e-3 --lr-schedule cosine --threshold-lr 1e-4 --log-every 50)

run() {  # name, extra flags...
  local name=$1; shift
  local start=$SECONDS
  "$PY" train.py "${COMMON[@]}" --workdir "runs/study/$name" "$@" > "runs/study/$name.log" 2>&1
  mkdir -p "results/$name"
  cp "runs/study/$name/metrics.jsonl" "runs/study/$name/summary.json" "results/$name/"
  echo "$name: $(( SECONDS - start )) s, test accuracy $("$PY" -c "import json,sys; print(json.load(open('results/$name/summary.json'))['test_accuracy'])")"
}

mkdir -p runs/study
# From scratch, equal budgets.
for seed in 0 1; do
  run "fp_s$seed" --quantizer fp --seed "$seed"
  run "tga_seq_s$seed" --quantizer tga --update sequential --seed "$seed"
done
run tga_joint_s0 --quantizer tga --update joint --seed 0
run twn_s0 --quantizer twn --seed 0
run ttq_s0 --quantizer ttq --seed 0
# The paper's flow: fine-tune ternary from the full-precision run (same budget again).
for q in "tga --update sequential" "tga --update joint" twn ttq; do
  set -- $q
  name="ft_${1}${2:+_${3}}"
  run "$name" --quantizer $q --init-from runs/study/fp_s0 --seed 0
done
