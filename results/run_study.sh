#!/usr/bin/env bash
# The Fashion-MNIST accuracy study of RESULTS.md: ResNet-20, every layer ternary, equal budgets.
#   bash results/run_study.sh [EPOCHS]      (from the repository root; about 45 min on 2 cores at 1 epoch, as in RESULTS.md)
# Runs go to runs/study/<name>/; their metrics.jsonl and summary.json are copied to results/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
source results/study_lib.sh
EPOCHS=${1:-1}
COMMON=(--arch resnet20 --dataset fashion_mnist --epochs "$EPOCHS" --batch-size 128 --no-augment
        --optimizer adam --lr 2e-3 --lr-schedule cosine --threshold-lr 1e-4 --log-every 50)

# From scratch, equal budgets.
for seed in 0 1; do
  run "fp_s$seed" "${COMMON[@]}" --quantizer fp --seed "$seed"
  run "tga_seq_s$seed" "${COMMON[@]}" --quantizer tga --update sequential --seed "$seed"
done
run tga_joint_s0 "${COMMON[@]}" --quantizer tga --update joint --seed 0
run twn_s0 "${COMMON[@]}" --quantizer twn --seed 0
run ttq_s0 "${COMMON[@]}" --quantizer ttq --seed 0
# The paper's flow: fine-tune ternary from the full-precision run (same budget again).
for q in "tga --update sequential" "tga --update joint" twn ttq; do
  set -- $q
  name="ft_${1}${2:+_${3}}"
  run "$name" "${COMMON[@]}" --quantizer $q --init-from runs/study/fp_s0 --seed 0
done
