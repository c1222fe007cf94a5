"""The notebooks run top to bottom (CI budget: parameters overridden to a tiny run)."""
import os
import pathlib
import sys

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
from build_notebooks import NOTEBOOKS as BUILDERS  # noqa: E402
from run_notebooks import execute  # noqa: E402

# Papermill-style: a cell injected after the one tagged "parameters".
CI_PARAMETERS = {
  "02_train.ipynb": 'EPOCHS = 1\nNUM_TRAIN = 2048\nBATCH_SIZE = 128\nWORKDIR = {workdir!r}\n',
  "03_your_model.ipynb": 'STEPS = 3\n',
  "04_ternary_lm.ipynb": 'STEPS = 4\nEVAL_EVERY = 2\nEVAL_WINDOWS = 8\nSAMPLE_TOKENS = 20\nWORKDIR = {workdir!r}\n',
}


def _with_parameters(notebook, source):
  for i, cell in enumerate(notebook.cells):
    if "parameters" in cell.get("metadata", {}).get("tags", []):
      notebook.cells.insert(i + 1, nbformat.v4.new_code_cell(source))
      return notebook
  raise AssertionError("the notebook has no cell tagged 'parameters'")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_train.ipynb", "03_your_model.ipynb",
                                  "04_ternary_lm.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
  # The kernel must import this checkout's tgq_jax, and see one CPU device like a reader's machine.
  root = str(NOTEBOOKS.parent)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  if name in CI_PARAMETERS:
    notebook = _with_parameters(notebook, CI_PARAMETERS[name].format(workdir=str(tmp_path / "runs")))
  execute(notebook, timeout=600)
  outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
  if name == "02_train.ipynb":
    assert "tga: test accuracy" in outputs and "identical logits: True" in outputs
  elif name == "04_ternary_lm.ipynb":
    assert "validation loss: " in outputs and "bits/char" in outputs and "--- temperature 0.0\nROMEO:" in outputs
  elif name == "03_your_model.ipynb":
    assert "tga: test accuracy" in outputs and "NNX, TGA" in outputs and "head has a delta: False" in outputs
  else:
    assert "distinct effective kernel values: 3" in outputs


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_committed_notebooks_are_what_build_notebooks_writes(name):
  """Cell for cell (type and source): the .ipynb files are outputs of notebooks/build_notebooks.py."""
  committed = nbformat.read(NOTEBOOKS / name, as_version=4)
  built = BUILDERS[name]()
  cells = lambda nb: [(c.cell_type, c.source) for c in nb.cells]
  assert cells(committed) == cells(built), f"re-run python notebooks/build_notebooks.py ({name} is stale)"
