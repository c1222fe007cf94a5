"""tgq_jax: ternary-weight networks trained with TGA, in JAX and Flax.

``tgq_jax.ternarize`` is the TGA quantizer (a function); ``import tgq_jax.ternarize``
works too, and the module's helpers are reachable from the function
(``tgq_jax.ternarize.init_params``, ``.ternary_parts``, ...) whichever way it
was imported.
"""
from tgq_jax import ternarize as _ternarize_module
from tgq_jax.ternarize import TernaryParts, dequantize, init_params, ternary_parts

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

ternarize = _ternarize_module.ternarize
# `import tgq_jax.ternarize as T` binds the function (the package attribute), so
# expose the module's public names on it too.
for _name in _ternarize_module.__all__:
  if _name != "ternarize":
    setattr(ternarize, _name, getattr(_ternarize_module, _name))
ternarize.CLIP_SIGMAS = _ternarize_module.CLIP_SIGMAS
ternarize.INIT_FRACTION = _ternarize_module.INIT_FRACTION
del _name

__all__ = ["TernaryParts", "dequantize", "init_params", "ternarize", "ternary_parts", "__version__"]
