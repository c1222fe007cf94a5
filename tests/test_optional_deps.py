"""The trainer runs without the optional pieces it does not use (grain, TFDS, tensorboardX).

A typical GPU image has jax, flax, optax, orbax and chex but none of those three.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tgq_jax import data

OPTIONAL = ("grain", "tensorflow_datasets", "tensorboardX")


def test_prefetch_map_matches_grain_batches_and_state(monkeypatch):
  ds = data.get_dataset("synthetic", image_shape=(8, 8, 1), num_train=64, num_test=10)
  with_grain = ds.train_iterator(global_batch_size=16, seed=3)
  a = [next(with_grain) for _ in range(5)]
  monkeypatch.setattr(data, "grain", None)
  without = ds.train_iterator(global_batch_size=16, seed=3)
  assert isinstance(without._it, data._PrefetchMap)
  b = [next(without) for _ in range(5)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert without.get_state() == with_grain.get_state()
  resumed = ds.train_iterator(global_batch_size=16, seed=3)
  resumed.set_state({**without.get_state(), "step": 2})
  np.testing.assert_array_equal(next(resumed)["image"], a[2]["image"])
  evals = list(ds.eval_batches(global_batch_size=4))
  assert len(evals) == 3 and float(sum(e["mask"].sum() for e in evals)) == 10


@pytest.mark.slow
def test_train_runs_without_grain_tfds_and_tensorboardx(tmp_path):
  script = textwrap.dedent(f"""
    import sys
    class Block:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
          raise ImportError(f"{{name}} is blocked for this test")
    sys.meta_path.insert(0, Block())
    import train
    sys.exit(train.main(sys.argv[1:]))
  """)
  args = ["--dataset", "synthetic", "--image-shape", "16", "16", "1", "--num-train", "256",
          "--num-test", "64", "--arch", "small_cnn", "--batch-size", "64", "--eval-batch-size", "64",
          "--epochs", "1", "--workdir", str(tmp_path / "w")]
  proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "w" / "summary.json") as f:
    assert json.load(f)["steps"] == 4
  assert not (tmp_path / "w" / "tensorboard").exists()
