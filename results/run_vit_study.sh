#!/usr/bin/env bash
# The ternary-transformer study of RESULTS.md: vit_tiny on Fashion-MNIST, every linear layer
# (patch embedding, q/k/v/out, MLP, classifier) ternary, FP twin / TGA (sequential) / absmean
# (BitNet b1.58) / TWN, two seeds each, equal budgets; plus ResNet-20 absmean at the budget of
# the ResNet-20 study (run_study.sh, whose TGA runs it is compared with).
#   bash results/run_vit_study.sh [EPOCHS]   (from the repository root; ~70 min on 2 cores at 2 epochs;
#   the ResNet-20 runs always get 1 epoch, the budget of run_study.sh)
# Runs go to runs/study/<name>/; metrics.jsonl and summary.json are copied to results/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
source results/study_lib.sh
EPOCHS=${1:-2}
VIT=(--config fmnist_vit_tiny --epochs "$EPOCHS" --warmup-epochs 0.1 --log-every 50)
for seed in 0 1; do
  for q in fp tga absmean twn; do
    run "vit_${q}_s$seed" "${VIT[@]}" --quantizer "$q" --seed "$seed"
  done
done
# ResNet-20: the recipe of run_study.sh.
RESNET=(--arch resnet20 --dataset fashion_mnist --epochs 1 --batch-size 128 --no-augment
        --optimizer adam --lr 2e-3 --lr-schedule cosine --threshold-lr 1e-4 --log-every 50)
for seed in 0 1; do
  run "absmean_s$seed" "${RESNET[@]}" --quantizer absmean --seed "$seed"
done
