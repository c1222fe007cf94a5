"""Test-wide setup: 4 forced CPU devices (multi-device code runs on CPU) and fast compiles."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
