"""Executes notebooks in place (outputs saved), from the notebooks/ folder, as a reader would run them.

    python notebooks/run_notebooks.py [NAME.ipynb ...]

tests/test_notebooks.py runs them the same way with a smaller budget.
"""
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).parent


def execute(notebook: nbformat.NotebookNode, timeout: int = 1200) -> nbformat.NotebookNode:
  """Runs every cell (in notebooks/, with the python3 kernel); a failing cell raises."""
  NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": str(HERE)}}).execute()
  return notebook


if __name__ == "__main__":
  names = sys.argv[1:] or sorted(p.name for p in HERE.glob("*.ipynb"))
  for name in names:
    start = time.time()
    notebook = execute(nbformat.read(HERE / name, as_version=4))
    nbformat.write(notebook, HERE / name)
    print(f"{name}: {time.time() - start:.0f} s")
