"""A small ImageNet in the exact layout TFDS's ``imagenet2012`` builder reads, and photo-like JPEGs.

``write_imagenet_tars(manual_dir, ...)`` writes ``ILSVRC2012_img_train.tar``
(one ``<synset>.tar`` per class inside, holding ``<synset>_<i>.JPEG``) and
``ILSVRC2012_img_val.tar`` (``ILSVRC2012_val_<8 digits>.JPEG``; TFDS labels
the sorted validation names with the first lines of its own
``validation_labels.txt``), so that

  tfds build imagenet2012 --file_format=array_record --manual_dir=DIR --data_dir=...

prepares it exactly as it prepares the real one. The images are synthetic
"photos" (a smooth colour field, shapes, texture and sensor-like noise) whose
JPEG sizes are realistic (about 100 KB at 500x375), for tests, for the input
benchmark and on machines without the data (the GPU check generates them there).
"""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np

# The first synsets of TFDS's labels.txt (label ids 0, 1, 2, ...): tench, goldfish, white shark, ...
FIRST_SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
                 "n01496331", "n01498041", "n01514668", "n01514859", "n01518878")
# Common ImageNet sizes (H, W): 500x375 and 500x333 landscape, 375x500 portrait.
PHOTO_SHAPES = ((375, 500), (333, 500), (500, 375), (375, 500), (400, 500))


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A (height, width, 3) uint8 image with photo-like statistics (not noise: it compresses like a photo)."""
  from PIL import Image, ImageDraw, ImageFilter  # pylint: disable=g-import-not-at-top
  coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
  image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(8, 20))):
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    box = [x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))]
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), np.float32)
  # Mid-frequency luminance texture plus fine noise: what makes real photos ~100 KB as JPEG.
  texture = rng.normal(128, 40, (height // 4, width // 4)).clip(0, 255).astype(np.uint8)
  texture = np.asarray(Image.fromarray(texture).resize((width, height), Image.BILINEAR), np.float32) - 128
  pixels += 0.8 * texture[..., None] + rng.normal(0, 17, pixels.shape)
  return pixels.clip(0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.fromarray(image).save(out, "JPEG", quality=quality)
  return out.getvalue()


def _photo_jpeg(rng: np.random.Generator, shape) -> bytes:
  h, w = shape if shape is not None else PHOTO_SHAPES[int(rng.integers(len(PHOTO_SHAPES)))]
  return jpeg_bytes(photo(rng, h, w))


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_imagenet_tars(manual_dir: str, *, num_classes: int = 3, train_per_class: int = 8,
                        num_validation: int = 6, image_shape: tuple[int, int] | None = (64, 80),
                        seed: int = 0) -> dict[str, int]:
  """Writes the two ILSVRC2012 tars TFDS's ``imagenet2012`` builder reads into ``manual_dir``.

  Args:
    manual_dir: directory for ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``.
    num_classes: synsets in the train tar (the first of :data:`FIRST_SYNSETS`: labels 0, 1, ...).
    train_per_class: JPEGs per synset.
    num_validation: validation JPEGs (TFDS gives them the first labels of its validation list).
    image_shape: (H, W) of every image; None: realistic ImageNet sizes (:data:`PHOTO_SHAPES`).
    seed: the images are a function of it.

  Returns:
    ``{"train": count, "validation": count}``.
  """
  if not 1 <= num_classes <= len(FIRST_SYNSETS):
    raise ValueError(f"num_classes must be in [1, {len(FIRST_SYNSETS)}], got {num_classes}")
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
    for synset in FIRST_SYNSETS[:num_classes]:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(train_per_class):
          _add(tar, f"{synset}_{i + 1}.JPEG", _photo_jpeg(rng, image_shape))
      _add(outer, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
    for i in range(num_validation):
      _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _photo_jpeg(rng, image_shape))
  return {"train": num_classes * train_per_class, "validation": num_validation}
