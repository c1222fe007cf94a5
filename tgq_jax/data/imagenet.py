"""ImageNet examples to uint8 crops on the host; normalization on the device.

An example is either the JPEG bytes of a TFDS record (read undecoded) or a
uint8 (H, W, 3) array from the decode-once cache (:mod:`tgq_jax.data.imagenet_cache`).

From JPEG bytes the host decodes, crops, resizes and flips, and ships uint8
224x224 crops (a quarter of float32's bytes). From the cache it does not even
resize: it copies each image into a fixed uint8 canvas (:func:`canvas_batch`)
and ships it with its crop box and flip bit; :func:`crop_resize_on_device` does
the rest on the accelerator. :func:`to_model_input` is the jittable last step
either way: uint8 -> float32 ``(x / 255 - mean) / std``, run where the model runs.

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


def canvas_batch(images, canvas: int, empty=np.empty) -> np.ndarray:
  """uint8 (N, canvas, canvas, 3) with each (h, w, 3) image at the top left; the rest is left undefined
  (:func:`crop_resize_on_device` gives it zero weight). ``empty(shape, dtype)`` allocates it."""
  out = empty((len(images), canvas, canvas, 3), np.uint8)
  for o, image in zip(out, images):
    h, w = image.shape[:2]
    if h > canvas or w > canvas:
      raise ValueError(f"image {h}x{w} does not fit the {canvas}x{canvas} canvas")
    o[:h, :w] = image
  return out


def box_rows(boxes, shapes) -> np.ndarray:
  """(left, top, right, bottom) boxes of images of ``shapes`` (H, W, ...) -> float32 (N, 6) rows
  (top, left, height, width, image height, image width): the ``"box"`` of a canvas batch."""
  b = np.asarray(boxes, np.float32).reshape(-1, 4)
  hw = np.array([s[:2] for s in shapes], np.float32).reshape(-1, 2)
  return np.concatenate([b[:, 1:2], b[:, 0:1], b[:, 3:4] - b[:, 1:2], b[:, 2:3] - b[:, 0:1], hw], axis=1)


def _bilinear_weights(start, length, valid, out_size: int, in_size: int):
  """(out_size, in_size) resampling matrix of Pillow's BILINEAR ``resize(box=...)`` along one axis.

  Output pixel ``o`` takes input pixel ``i`` with weight tri((i + 0.5 - c_o) / f),
  c_o = start + (o + 0.5) * length / out_size, f = max(length / out_size, 1)
  (the filter widens when shrinking), over the ``valid`` pixels of the image only,
  normalized to sum 1 (as Pillow clips to the image).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  scale = length / out_size
  center = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixel = jnp.arange(in_size, dtype=jnp.float32)
  w = jnp.maximum(0.0, 1.0 - jnp.abs(pixel[None, :] + 0.5 - center[:, None]) / jnp.maximum(scale, 1.0))
  w = jnp.where(pixel[None, :] < valid, w, 0.0)
  return w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def crop_resize_on_device(canvases, boxes, flips, size: tuple[int, int]):
  """Crop, resize to ``size`` (H, W) and flip a canvas batch (:func:`canvas_batch`, :func:`box_rows`); jittable.

  The resampling is Pillow's bilinear ``resize(..., box=...)`` (the host path)
  as two matrix products per image; float32 in [0, 255] out (not rounded).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  out_h, out_w = (int(d) for d in size)

  def one(canvas, box, flip):
    rows = _bilinear_weights(box[0], box[2], box[4], out_h, canvas.shape[0])
    cols = _bilinear_weights(box[1], box[3], box[5], out_w, canvas.shape[1])
    cols = jnp.where(flip, cols[::-1], cols)
    image = canvas.astype(jnp.float32)
    # Default precision: the pixels are exact in any float format, and TF32/bf16 weights err by < 1 level.
    return jnp.einsum("oh,hwc,pw->opc", rows, image, cols)

  return jax.vmap(one)(canvases, jnp.asarray(boxes, jnp.float32), jnp.asarray(flips, bool))


def to_model_input(images, mean, std):
  """uint8 NHWC (host batch) -> float32 ``(x / 255 - mean) / std`` per channel; jittable, for the device.

  The same arithmetic as :func:`tgq_jax.data.augment.normalize` on the host.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  std = jnp.asarray(std, jnp.float32)
  return images.astype(jnp.float32) * (jnp.float32(1 / 255) / std) - jnp.asarray(mean, jnp.float32) / std
