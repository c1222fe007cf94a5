"""XLA:CPU settings for convolutional training, applied by the harness before JAX starts.

jaxlib 0.10 sends every convolution XLA:CPU can to YNNPACK, which runs it on
one thread here; XLA's own Eigen convolution uses the intra-op thread pool. On
2 cores, with ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
(YNNPACK keeps its other fusions: reductions, dots), a 3x3 64->64 convolution at
8x56x56 takes 8.4 ms forward instead of 14.8, its gradients 32 ms instead of 82,
and ResNet-18's TGA-sequential step ~1.05 s instead of ~1.45 s (see
``benchmarks/vs_pytorch.py`` and RESULTS.md). The flag only concerns XLA:CPU;
GPU and TPU compilations ignore it.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so :func:`configure`
must run before the first JAX computation (``train.py`` and the benchmarks call
it first thing). It never overrides a setting of the same flag already in
``XLA_FLAGS``: ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_convolution``
(or any other value) keeps yours. It only adds the flag for jaxlib versions known
to have it, because XLA aborts on an unknown flag.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CONV_ON_EIGEN = f"{FLAG}=-individual_convolution"
# Versions with the flag and with YNNPACK convolutions on one thread (0.10: measured here; 0.11: the flag
# exists). A newer jaxlib is left at its defaults rather than risk an unknown-flag abort.
KNOWN_JAXLIB = ((0, 10), (0, 11))


def _jaxlib_version() -> tuple[int, int] | None:
  try:
    import jaxlib
    major, minor = jaxlib.__version__.split(".")[:2]
    return int(major), int(minor)
  except (ImportError, ValueError, AttributeError):
    return None


def backend_started() -> bool:
  """Whether a JAX backend has started (after which XLA_FLAGS is no longer read)."""
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # private API moved: assume the worst, change nothing
    return True


def configure(environ: MutableMapping[str, str] | None = None) -> str | None:
  """Adds :data:`CONV_ON_EIGEN` to ``XLA_FLAGS`` when it can still take effect.

  Returns the flag added, or None when nothing changed: the user set the flag
  already, the jaxlib version is not one known to have it, or a backend has
  started (then the process keeps the flags it started with).
  """
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if FLAG in flags or _jaxlib_version() not in KNOWN_JAXLIB or backend_started():
    return None
  environ["XLA_FLAGS"] = f"{flags} {CONV_ON_EIGEN}".strip()
  return CONV_ON_EIGEN
