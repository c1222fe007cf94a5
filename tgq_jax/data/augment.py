"""Augmentation and normalization: pure numpy functions of uint8 images and uniform draws.

The draws come from :mod:`tgq_jax.data` (a function of ``(seed, step)``), so a
batch is reproducible on any topology.
"""
from __future__ import annotations

import numpy as np

# Attempts of the Inception-style random-resized crop before the fallback.
CROP_ATTEMPTS = 10


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 NHWC -> float32 ``(x / 255 - mean) / std`` per channel."""
  std = np.asarray(std, np.float32)
  out = np.multiply(images, np.float32(1 / 255) / std, dtype=np.float32)  # one pass, no uint8->f32 copy
  out -= np.asarray(mean, np.float32) / std
  return out


def pad_crop_flip(images: np.ndarray, draws: np.ndarray, pad: int, flip: bool) -> np.ndarray:
  """Zero-pads by ``pad``, crops back at random offsets, optionally flips.

  ``draws`` (N, >=3) uniform in [0, 1): columns 0 and 1 choose the row and
  column offset in [0, 2 pad] of the padded image, column 2 < 0.5 flips
  horizontally.
  """
  n, h, w, _ = images.shape
  out = np.zeros_like(images)
  # Shift in [-pad, pad]; copying the overlap per example is ~3x faster than
  # padding and gathering with fancy indices.
  dy = (draws[:, 0] * (2 * pad + 1)).astype(np.int64) - pad
  dx = (draws[:, 1] * (2 * pad + 1)).astype(np.int64) - pad
  for i, (y, x) in enumerate(zip(dy.tolist(), dx.tolist())):
    out[i, max(0, -y):h - max(0, y), max(0, -x):w - max(0, x)] = \
        images[i, max(0, y):h + min(0, y), max(0, x):w + min(0, x)]
  if flip:
    flipped = draws[:, 2] < 0.5
    out[flipped] = out[flipped, :, ::-1]
  return out


def inception_crop_box(height: int, width: int, draws: np.ndarray,
                       scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box ``(left, top, right, bottom)``.

  ``draws`` holds 4 uniforms per attempt (area, log-aspect, top, left) from
  column 3 on; after ``CROP_ATTEMPTS`` misses, a center crop clipped to
  ``ratio``.
  """
  area = height * width
  for a in range(CROP_ATTEMPTS):
    u = draws[3 + 4 * a: 7 + 4 * a]
    target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
    aspect = np.exp(np.log(ratio[0]) + u[1] * (np.log(ratio[1]) - np.log(ratio[0])))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(u[2] * (height - h + 1))
      left = int(u[3] * (width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def center_crop_box(height: int, width: int, size: int, resize: int) -> tuple[float, ...]:
  """Box equal to "resize shorter side to ``resize``, center-crop ``size``"."""
  side = min(height, width) * size / resize
  top, left = (height - side) / 2, (width - side) / 2
  return left, top, left + side, top + side
