"""TFDS access for training: ``tfds.data_source`` over prepared ArrayRecord files, never a download.

tensorflow-datasets is imported only when a TFDS dataset is opened, so the
trainer runs without it on the datasets that do not need it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent import futures

import numpy as np

from tgq_jax.data.idx import DEFAULT_FASHION_MNIST_DIR


class DatasetNotPreparedError(ValueError):
  """The data directory lacks the dataset (no idx files, no prepared TFDS ArrayRecord files)."""


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = f"--data_dir={data_dir}" if data_dir else "(default data_dir ~/tensorflow_datasets or $TFDS_DATA_DIR)"
  manual = " --manual_dir=DIR_WITH_ILSVRC2012_img_{train,val}.tar" if name == "imagenet2012" else ""
  idx = (f"Or put the four idx files in --data_dir (or {DEFAULT_FASHION_MNIST_DIR}: "
         "apt-get install dataset-fashion-mnist).\n") if name == "fashion_mnist" else ""
  return (f"{idx}Prepare it once (needs TensorFlow):\n  pip install -e '.[prepare]'\n"
          f"  tfds build {name} --file_format=array_record {where}{manual}\n"
          "See docs/data.md.")


def open_tfds_split(name: str, split: str, data_dir: str | None, decoders=None) -> Sequence[dict]:
  """``tfds.data_source`` for a prepared split; never downloads or prepares.

  ``decoders``: TFDS's per-feature decoders, e.g. ``{"image": tfds.decode.SkipDecoding()}``
  for the encoded JPEG bytes.

  Raises:
    DatasetNotPreparedError: with the command to prepare it, if the dataset
      is absent or was prepared as TFRecord (no random access).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False,
                            decoders=decoders)
  except Exception as e:  # TFDS says "TFRECORD is not supported" when absent.
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise DatasetNotPreparedError(
          f"TFDS dataset {name!r} is not prepared in {builder.data_dir}.\n"
          + _prepare_hint(name, data_dir)) from e
    if str(builder.info.file_format) != str(tfds.core.FileFormat.ARRAY_RECORD):
      raise DatasetNotPreparedError(
          f"TFDS dataset {name!r} in {builder.data_dir} is {builder.info.file_format}, "
          "which has no random access; rebuild it as ArrayRecord.\n"
          + _prepare_hint(name, data_dir)) from e
    raise


def read_records(source: Sequence[dict], count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``count`` records as stacked uint8 images and int32 labels."""
  with futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    records = list(pool.map(source.__getitem__, range(count), chunksize=256))
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  return images, np.array([r["label"] for r in records], np.int32)
