"""Hand-written kernels (Pallas) with plain-JAX fallbacks.

:mod:`tgq_jax.kernels.ternary_matmul`: ``x @ (scale * T)`` from 2-bit packed
ternary codes, unpacked on chip (the layout, the dispatch and the mode);
:mod:`~tgq_jax.kernels.ternary_matmul_tpu` (Mosaic) and
:mod:`~tgq_jax.kernels.ternary_matmul_gpu` (Triton) are the kernels,
:mod:`~tgq_jax.kernels.per_platform` picks one for the platform being lowered,
:mod:`~tgq_jax.kernels.blocks` pads operands to whole blocks.
"""
