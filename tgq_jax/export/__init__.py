"""2-bit packed export of a trained model, and inference from the packed file.

    python -m tgq_jax.export --workdir W --out model.safetensors

One container, one layout, one format version: **safetensors** (the ecosystem's
container) holding exactly the variables of the packed inference model
(``spec.build(packed=True)``), named ``"<collection>/<module path>/<leaf>"``:

* a ternary layer ``P`` has ``params/P/codes`` (``uint8 (ceil(K/4), N)``: its
  kernel's codes in the planar 2-bit layout of :mod:`tgq_jax.kernels.ternary_matmul`,
  the one its Pallas kernel reads; ``K`` the product of the kernel's leading axes,
  ``N`` its last), ``params/P/scale`` (float32: a scalar, or one per output
  feature, of shape :func:`tgq_jax.core.ternarize.stat_shape`: e.g. ``(heads, head_dim)``
  for an attention projection; the value of a +1 code) and, for TTQ,
  ``params/P/neg_scale`` (the magnitude of a -1 code);
* every other leaf (BatchNorm, biases, kernels of full-precision layers) as it is.

The metadata (``__metadata__``, strings) holds ``format`` (``"tgq_jax.packed"``),
``format_version`` (``"3"``), ``tgq_jax_version``, ``model`` (JSON: ``{"spec":
ModelSpec.to_dict(), "image_shape": [H, W, C]}``), ``ternary`` (JSON: each ternary
layer's kernel shape), ``extra`` (JSON: dataset, test accuracy, ...) and ``sha256``:
the SHA-256 of the whole file with these 64 hex digits written as ``0``. Every byte
of the file is covered: any change, any truncation is a :class:`PackedFormatError`.
Any safetensors reader (``safetensors.numpy.load_file``) reads the tensors.

Quantizer-only leaves (TGA's ``delta``, TTQ's trainable scales) are not stored:
the scales carry all that inference needs. A ternary layer of N weights takes
``ceil(K / 4) * N`` bytes plus 4 bytes per scale: at most 1/15 of its FP32 bytes
once ``N >= 480`` per scale. :func:`tgq_jax.export.sizes.size_report` counts it (the
export's :class:`SizeReport`, and the trainer's end-of-run table). A model with a
non-finite value is refused.

**A file is data, never code.** :func:`load_packed` (and the command line, for a
workdir's ``config.json``) never imports or calls anything a file names: the
model is a registered architecture (:func:`tgq_jax.models.register`) or a user's
module the caller passes (``load_packed(path, model=MyNet)``); constructor options
are JSON values checked against the constructor's fields; the header's size,
nesting, dtypes, shapes and byte ranges are checked against the model before a
tensor is read. The SHA-256 proves the file is intact, not where it came from.

**For llama.cpp**: ``--out model.gguf`` writes the decoder LM as a GGUF file instead (ternary kernels as
TQ2_0, the vocabulary as its tokenizer): :mod:`~tgq_jax.export.gguf`, :func:`export_gguf`.

Modules: :mod:`~tgq_jax.export.container` (the container, its checks),
:mod:`~tgq_jax.export.packing` (writing), :mod:`~tgq_jax.export.loading` (reading),
:mod:`~tgq_jax.export.files` (atomic writes), :mod:`~tgq_jax.export.sizes`, :mod:`~tgq_jax.export.gguf`,
:mod:`~tgq_jax.export.cli`.
"""
from tgq_jax.export.container import FORMAT, FORMAT_VERSION, PackedFormatError  # noqa: F401
from tgq_jax.export.loading import load_packed  # noqa: F401
from tgq_jax.export.packing import export_variables, pack_variables  # noqa: F401
from tgq_jax.export.sizes import LayerSize, SizeReport, size_report  # noqa: F401
from tgq_jax.export.gguf import GGUFReport, export_gguf  # noqa: F401
from tgq_jax.export.cli import export_workdir, export_workdir_gguf, main  # noqa: F401

__all__ = ["FORMAT", "FORMAT_VERSION", "GGUFReport", "LayerSize", "PackedFormatError", "SizeReport", "export_gguf",
           "export_variables", "export_workdir", "export_workdir_gguf", "load_packed", "main", "pack_variables",
           "size_report"]
