#!/usr/bin/env bash
# What was tried when TGA missed the goal of RESULTS.md: the threshold's learning rate (10x up, and
# 100x down: thresholds nearly frozen at their init), from scratch, same budget and settings as
# results/run_study.sh (run that first). The gradient clip is not varied: with Adam as the
# threshold optimizer a clip rescales every gradient alike and barely changes the steps.
#   bash results/run_variants.sh [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
source results/study_lib.sh
EPOCHS=${1:-1}
COMMON=(--arch resnet20 --dataset fashion_mnist --epochs "$EPOCHS" --batch-size 128 --no-augment
        --optimizer adam --lr 2e-3 --lr-schedule cosine --log-every 50 --quantizer tga --seed 0)

run tga_seq_thrlr1e-3_s0 "${COMMON[@]}" --update sequential --threshold-lr 1e-3
run tga_seq_thrlr1e-6_s0 "${COMMON[@]}" --update sequential --threshold-lr 1e-6
