"""Hand-written kernels (Pallas) with plain-JAX fallbacks.

:mod:`tgq_jax.kernels.ternary_matmul`: ``x @ (scale * T)`` from 2-bit packed
ternary codes, unpacked on chip.
"""
