#!/usr/bin/env bash
# The accelerator check (one call, under 9 minutes on one GPU): quantizer reference tests on the
# device, training throughput FP vs TGA-joint vs TGA-sequential (ResNet-18/50, bf16, 224x224), and
# the Fashion-MNIST ResNet-20 study (FP, TGA-sequential, TWN, absmean) in the minutes left.
#
#   bash benchmarks/accelerator_check.sh [--dry-run]
#
# Needs python3 with jax (CUDA or TPU), flax, optax, orbax, chex, pytest and hypothesis; no grain,
# TFDS or network. Fashion-MNIST's four idx files come from $FMNIST_DIR (default: .fmnist/ in the
# repository, an ignored folder carried to the machine; else Debian's /usr/share/datasets/fashion-mnist).
# Everything goes to $OUT (default runs/accelerator_check): the log, tests.log, throughput.json,
# study.md / study.json and study.tgz (each run's metrics.jsonl, summary.json and log).
# --dry-run: every stage for a few steps on whatever jax finds (the CPU check of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-runs/accelerator_check}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
STUDY_BUDGET_S=${STUDY_BUDGET_S:-210}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/accelerator_check.log") 2>&1
FMNIST=${FMNIST_DIR:-.fmnist}; [ -d "$FMNIST" ] || FMNIST=/usr/share/datasets/fashion-mnist
stage() { echo; echo "=== $(date -u +%T) $*"; }

stage "set-up"
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv) || true
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
  || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # the package imports from the checkout either way
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" || exit 1
if [ $DRY = 1 ]; then
  TP=(--archs resnet18 --batches 4 --image-size 32 --steps 1 --rounds 1)
  STUDY=(--dry-run --concurrent 2)
  DATA=(--num-test 1000)
else
  TP=(--archs resnet18 resnet50 --batches 256 128 --steps 10 --rounds 2)
  STUDY=(--budget-s "$STUDY_BUDGET_S" --max-epochs 30 --concurrent 4)
  DATA=()
fi

stage "1. quantizer reference tests on $("$PY" -c 'import jax; print(jax.devices()[0].platform)')"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/core/test_ternarize.py \
  2>&1 | tee "$OUT/tests.log" | tail -5

stage "2. training throughput (bf16 activations)"
timeout 300 "$PY" benchmarks/throughput.py "${TP[@]}" --bf16 --json "$OUT/throughput.json"

stage "3. Fashion-MNIST ResNet-20 study (every layer ternary; the authors' CIFAR recipe, schedule scaled)"
"$PY" benchmarks/study.py --out "$OUT/study" --quantizers fp tga twn absmean "${STUDY[@]}" \
  --schedule-fractions 0.4 0.6 0.8 -- --config cifar10_resnet20 --dataset fashion_mnist \
  --data-dir "$FMNIST" --log-every 100 "${DATA[@]}"
cp "$OUT/study/study.md" "$OUT/study/study.json" "$OUT/" 2>/dev/null
(cd "$OUT/study" && tar czf "$OUT/study.tgz" --exclude=checkpoints --exclude=tensorboard runs probe 2>/dev/null \
  || tar czf "$OUT/study.tgz" --exclude=checkpoints --exclude=tensorboard runs)
rm -rf "$OUT/study"
stage "done"
