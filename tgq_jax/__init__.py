"""tgq_jax: ternary-weight networks trained with TGA, in JAX and Flax.

``tgq_jax.core.ternarize`` is the TGA quantizer's module, and it is callable:
``ternarize(w, {"delta": d})`` is :func:`tgq_jax.core.ternarize.ternarize`, whether
it was reached by ``from tgq_jax import ternarize`` or ``import tgq_jax.core.ternarize``.
"""
from tgq_jax.core import ternarize
from tgq_jax.frontends import ternarize_model
from tgq_jax.core.policy import QuantPolicy
from tgq_jax.core.quantizers import QuantizerSpec, register_quantizer
from tgq_jax.core.ternarize import TernaryParts, dequantize, init_params, ternary_parts

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

__all__ = ["QuantPolicy", "QuantizerSpec", "TernaryParts", "dequantize", "init_params", "register_quantizer",
           "ternarize", "ternarize_model", "ternary_parts", "__version__"]
