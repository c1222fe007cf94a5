"""The model zoo: one entry point, :func:`create_model`.

Every model is a plain ``flax.linen`` module (``nn.Conv``, ``nn.Dense``,
``nn.MultiHeadDotProductAttention``) called as
``model.apply(variables, images, train=...)`` on NHWC images, with BatchNorm
statistics (if any) in the ``batch_stats`` collection (the flax examples'
convention). :func:`create_model` makes it ternary the way any user model is
made ternary: :func:`tgq_jax.ternarize_model` with one
:class:`tgq_jax.QuantPolicy` (which quantizer, per-channel statistics, which
layers: ``ternary_first`` / ``ternary_last`` keep the stem / the classifier
in full precision when False, the paper's "ff_lf" setting). With
``QuantPolicy("fp")`` the model is its full-precision twin.

Adding an architecture is one file (a Linen module taking ``num_classes`` and
``dtype``) and one :func:`register` line. A :class:`ModelSpec` names a model by data
(registry name, classes, policy, dtype, JSON options): run records and exported files
hold one, and loading them builds registered names only, or a user's module from the
constructor the caller passes in code (:mod:`tgq_jax.models.spec`).

torchvision ImageNet checkpoints load through :mod:`tgq_jax.models.torchvision`
(:func:`load_torchvision_weights`, :func:`convert_state_dict`), and
:func:`init_ternary_from_fp` starts a ternary model from its FP twin.
"""
from __future__ import annotations

from tgq_jax.core.policy import QuantPolicy  # noqa: F401  (re-exported: models' users need it)
from tgq_jax.frontends.linen import ternarize_model  # noqa: F401
from tgq_jax.frontends.linen_layers import init_ternary_from_fp  # noqa: F401
from tgq_jax.models.registry import (archs, constructor_arguments, create_model, data_options,  # noqa: F401
                                     example_input, register, registered)
from tgq_jax.models.spec import DTYPES, ModelSpec, model_name  # noqa: F401
# torchvision.py imports create_model lazily (inside a function), so this is no cycle.
from tgq_jax.models.torchvision import convert_state_dict, load_torchvision_weights  # noqa: F401
