"""tgq_jax.training.xla_cpu: the harness's XLA:CPU flag, added only where it can take effect, never over the user's."""
import os
import subprocess
import sys

import pytest

from tgq_jax.training import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def fresh_process(monkeypatch):
  monkeypatch.setattr(xla_cpu, "backend_started", lambda: False)
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10))


def test_adds_the_flag_to_the_users_flags(fresh_process):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert xla_cpu.configure(env) == xla_cpu.CONV_ON_EIGEN
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", xla_cpu.CONV_ON_EIGEN]
  empty = {}
  xla_cpu.configure(empty)
  assert empty["XLA_FLAGS"] == xla_cpu.CONV_ON_EIGEN


def test_a_users_own_setting_of_the_flag_is_kept(fresh_process):
  env = {"XLA_FLAGS": f"{xla_cpu.FLAG}=individual_convolution"}
  assert xla_cpu.configure(env) is None
  assert env["XLA_FLAGS"] == f"{xla_cpu.FLAG}=individual_convolution"


def test_nothing_changes_for_an_unknown_jaxlib_or_a_started_backend(monkeypatch):
  monkeypatch.setattr(xla_cpu, "backend_started", lambda: False)
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (9, 0))  # might not know the flag: XLA would abort
  env = {}
  assert xla_cpu.configure(env) is None and env == {}
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (0, 10))
  monkeypatch.setattr(xla_cpu, "backend_started", lambda: True)
  assert xla_cpu.configure(env) is None and env == {}


PROBE = """
import sys
from tgq_jax.training import xla_cpu
added = xla_cpu.configure() if sys.argv[1] == "configure" else None
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
hlo = jax.jit(conv).lower(jnp.zeros((8, 56, 56, 64)), jnp.zeros((3, 3, 64, 64))).compile().as_text()
print(added is not None, "__ynn_fusion" in hlo)
"""


@pytest.mark.skipif(xla_cpu._jaxlib_version() not in xla_cpu.KNOWN_JAXLIB, reason="flag applies to known jaxlibs")
def test_in_a_fresh_process_convolutions_leave_ynnpack():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  run = lambda mode: subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True,  # noqa: E731
                                    text=True, check=True, timeout=120).stdout.split()
  assert run("default") == ["False", "True"]  # the premise: jaxlib's default sends it to YNNPACK
  assert run("configure") == ["True", "False"]  # configured: XLA's (multi-threaded) Eigen convolution
