"""Packaging facts: the version is written once (tgq_jax.__version__) and pyproject.toml reads it."""
import importlib.metadata
import pathlib

import pytest

import tgq_jax

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_the_version_is_declared_once():
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  config = tomllib.loads(PYPROJECT.read_text())
  assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
  assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tgq_jax.__version__"}
  setuptools_config = pytest.importorskip("setuptools.config.pyprojecttoml")
  assert setuptools_config.read_configuration(PYPROJECT)["project"]["version"] == tgq_jax.__version__


def test_installed_metadata_matches_when_installed():
  try:
    installed = importlib.metadata.version("tgq_jax")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("tgq_jax is not installed (imported from the checkout)")
  assert installed == tgq_jax.__version__
