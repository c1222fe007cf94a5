"""torchvision ResNet state dicts without torch: key -> shape from torchvision's resnet.py, and fakes.

Written out here independently of our flax modules, so that a naming or layout slip on either
side shows up as a mismatch.
"""
from __future__ import annotations

import numpy as np

_TV_LAYERS = {"resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False),
              "resnet50": ((3, 4, 6, 3), True)}


def torchvision_resnet_shapes(arch: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  """Key -> shape of ``torchvision.models.<arch>().state_dict()``, from torchvision's resnet.py."""
  layers, bottleneck = _TV_LAYERS[arch]
  expansion = 4 if bottleneck else 1
  shapes = {}

  def bn(prefix, c):
    for name in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{name}"] = (c,)
    shapes[f"{prefix}.num_batches_tracked"] = ()

  shapes["conv1.weight"] = (64, 3, 7, 7)
  bn("bn1", 64)
  inplanes = 64
  for i, blocks in enumerate(layers):
    planes = 64 * 2**i
    for j in range(blocks):
      stride = 2 if i > 0 and j == 0 else 1
      p = f"layer{i + 1}.{j}"
      if bottleneck:
        shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
        bn(f"{p}.bn1", planes)
        shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
        bn(f"{p}.bn2", planes)
        shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
        bn(f"{p}.bn3", planes * 4)
      else:
        shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
        bn(f"{p}.bn1", planes)
        shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
        bn(f"{p}.bn2", planes)
      if stride != 1 or inplanes != planes * expansion:
        shapes[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
        bn(f"{p}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  shapes["fc.weight"] = (num_classes, 512 * expansion)
  shapes["fc.bias"] = (num_classes,)
  return shapes


def fake_state_dict(arch: str, seed: int = 0, num_classes: int = 1000) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in torchvision_resnet_shapes(arch, num_classes).items():
    if key.endswith("num_batches_tracked"):
      sd[key] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      sd[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)  # positive, as variances are
    else:
      sd[key] = rng.standard_normal(shape, dtype=np.float32) * 0.1
  return sd
