"""benchmarks/ternary_matmul_gpu.py runs end to end on CPU in the Pallas interpreter (its smoke test)."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "ternary_matmul_gpu.py")


def _benchmark():
  spec = importlib.util.spec_from_file_location("ternary_matmul_gpu_benchmark", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("kernel", ["triton", "mosaic_tpu"])
def test_benchmark_checks_times_and_writes_json_in_interpret_mode(kernel, tmp_path, capsys):
  out = tmp_path / "tm.json"
  assert _benchmark().main(["--interpret", "--quick", "--kernel", kernel, "--json", str(out)]) == 0
  report = json.loads(out.read_text())
  assert report["kernel"] == kernel and report["interpret"] and report["checks_passed"]
  assert report["weight_bytes"] == {"bf16": 2 * 256 * 256, "packed": 256 * 256 // 4}
  (row,) = report["rows"]
  assert row["m"] == 1 and row["configs"][0]["relative_error"] < 1e-2 and report["float32_relative_error"] < 1e-5
  assert row["pallas_us"] >= 0 and row["dense_us"] >= 0 and "bf16 / Pallas" in capsys.readouterr().out


def test_benchmark_refuses_to_time_the_interpreter_by_accident():
  assert _benchmark().main([]) == 2  # CPU, no --interpret: nothing to time
