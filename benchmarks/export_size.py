"""Prints the packed-export size report of ResNet-18 (ImageNet) and ResNet-20 (CIFAR), TGA, all layers ternary.

    python benchmarks/export_size.py

Sizes depend on shapes only (codes take 2 bits whatever their values), so freshly
initialized weights give the same figures as trained ones.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tgq_jax import export  # noqa: E402
from tgq_jax.models import ModelSpec  # noqa: E402


def report(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> export.SizeReport:
  spec = ModelSpec(arch, num_classes)
  model = spec.build()
  variables = jax.jit(model.init, static_argnames="train")(
    jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{arch}.safetensors")
    result = export.export_variables(path, variables, spec, image_shape)
    file_bytes = os.path.getsize(path)
  print(f"== {arch} ({num_classes} classes): file {file_bytes:,} bytes")
  print(result.format())
  print()
  return result


if __name__ == "__main__":
  r18 = report("resnet18", 1000, (224, 224, 3))
  r20 = report("resnet20", 10, (32, 32, 3))
  print(f"whole-model FP32/packed: resnet18 {1 / r18.ratio:.1f}x, resnet20 {1 / r20.ratio:.1f}x; "
        f"ternary layers: resnet18 {1 / r18.ternary_ratio:.1f}x, resnet20 {1 / r20.ternary_ratio:.1f}x")
