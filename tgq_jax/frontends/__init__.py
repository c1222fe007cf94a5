"""The Flax front ends: thin adapters that say how a layer is reached (Linen by interception and the
explicit ``Ternary*`` layers, NNX by swapping a layer's class) over :mod:`tgq_jax.core`."""
