"""ImageNet examples to uint8 crops on the host; normalization on the device.

An example is either the JPEG bytes of a TFDS record (read undecoded) or a
uint8 (H, W, 3) array from the decode-once cache (:mod:`tgq_jax.data.imagenet_cache`).
The host does only what must happen per example: decode (JPEG), crop, resize
and flip, and ships uint8 (a quarter of float32's bytes). :func:`to_model_input`
is the jittable rest: uint8 -> float32 ``(x / 255 - mean) / std``, run where the
model runs.

JPEG decoding uses libjpeg's DCT-domain downscaling (``PIL.Image.draft``:
1/2, 1/4, 1/8 scale) whenever the crop, at the reduced scale, is still at
least as large as its output: a random-resized crop that covers a large part
of a big photo is shrunk anyway, and decoding it smaller costs a fraction.
"""
from __future__ import annotations

import io
import math

import numpy as np

from tgq_jax.data.augment import center_crop_box, inception_crop_box


def _open(example):
  """A PIL image of ``example`` (JPEG/PNG bytes: opened lazily, header only; array: wrapped)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(example, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(example))
  image = np.asarray(example, np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image)


def _decode_for_box(image, box, size: tuple[int, int]):
  """``(image, box)`` with ``image`` decoded, at a DCT-reduced scale if the crop stays >= ``size`` (H, W).

  ``box`` (left, top, right, bottom) is in full-size pixels and is returned in
  the decoded image's pixels.
  """
  if image.format == "JPEG":
    full_w, full_h = image.size
    # The smallest scale at which the box still covers `size`: the decoder may reduce down to it.
    scale = max(size[1] / (box[2] - box[0]), size[0] / (box[3] - box[1]))
    if scale < 0.5:
      image.draft("RGB", (math.ceil(full_w * scale), math.ceil(full_h * scale)))
      sx, sy = image.size[0] / full_w, image.size[1] / full_h
      box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
  if image.mode != "RGB":
    image = image.convert("RGB")
  return image, box


def crop_resize(example, box_fn, size: tuple[int, int]) -> np.ndarray:
  """``box_fn(height, width)`` of ``example`` resized to ``size`` (H, W): uint8 (H, W, 3), one bilinear pass."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _open(example)
  box = box_fn(image.size[1], image.size[0])
  image, box = _decode_for_box(image, box, size)
  return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR, box=box))


def random_resized_crop(example, draws: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """The Inception-style training crop of ``example`` (box from ``draws``, see ``inception_crop_box``)."""
  return crop_resize(example, lambda h, w: inception_crop_box(h, w, draws), size)


def center_crop(example, size: int, resize: int) -> np.ndarray:
  """The evaluation crop: "shorter side to ``resize``, center ``size`` x ``size``", in one resampling."""
  return crop_resize(example, lambda h, w: center_crop_box(h, w, size, resize), (size, size))


def to_model_input(images, mean, std):
  """uint8 NHWC (host batch) -> float32 ``(x / 255 - mean) / std`` per channel; jittable, for the device.

  The same arithmetic as :func:`tgq_jax.data.augment.normalize` on the host.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  std = jnp.asarray(std, jnp.float32)
  return images.astype(jnp.float32) * (jnp.float32(1 / 255) / std) - jnp.asarray(mean, jnp.float32) / std
