# Shared by results/run_study.sh and results/run_variants.sh (sourced, from the repository root).
PY=${PYTHON:-.venv/bin/python}
export XLA_FLAGS=--xla_force_host_platform_device_count=4   # 4 host devices: ~1.3x faster here

run() {  # name, train.py flags... : runs/study/<name>/, its metrics and summary copied to results/<name>/
  local name=$1; shift
  local start=$SECONDS
  mkdir -p runs/study
  "$PY" train.py "$@" --workdir "runs/study/$name" > "runs/study/$name.log" 2>&1
  mkdir -p "results/$name"
  cp "runs/study/$name/metrics.jsonl" "runs/study/$name/summary.json" "results/$name/"
  echo "$name: $(( SECONDS - start )) s, test accuracy $("$PY" -c "import json; print(json.load(open('results/$name/summary.json'))['test_accuracy'])")"
}
