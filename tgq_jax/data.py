"""TEMPORARY data stand-in (synthetic + Fashion-MNIST idx, no augmentation).

Implements just enough of the planned ``tgq_jax.data`` API for the trainer and
its tests; the real module (all datasets, augmentation) replaces it at merge.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Iterator

import jax
import numpy as np

DATASETS: tuple[str, ...] = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet2012", "synthetic")
_DEFAULT_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}


class DatasetNotPreparedError(ValueError):
  """The dataset's files are not where they were looked for."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int


class TrainIterator:
  """Infinite iterator over shuffled process-local training batches; the position is its state."""

  def __init__(self, images, labels, *, global_batch_size, seed, process_index, process_count):
    if global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by {process_count} processes.")
    self._images, self._labels = images, labels
    self._batch, self._seed = global_batch_size, seed
    self._local = global_batch_size // process_count
    self._offset = process_index * self._local
    self.steps_per_epoch = len(images) // global_batch_size  # drop the remainder
    self._epoch, self._index = 0, 0
    self._perm = None

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "index": self._index}

  def set_state(self, state: dict) -> None:
    self._epoch, self._index, self._perm = int(state["epoch"]), int(state["index"]), None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._index >= self.steps_per_epoch:
      self._epoch, self._index, self._perm = self._epoch + 1, 0, None
    if self._perm is None:  # every process draws the same global permutation
      self._perm = np.random.default_rng([self._seed, self._epoch]).permutation(len(self._images))
    start = self._index * self._batch + self._offset
    idx = self._perm[start:start + self._local]
    self._index += 1
    return {"image": self._images[idx], "label": self._labels[idx]}


class Dataset:
  def __init__(self, info, train, test):
    self.info, self._train, self._test = info, train, test

  def train_iterator(self, *, global_batch_size, seed, process_index=None, process_count=None):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    return TrainIterator(*self._train, global_batch_size=global_batch_size, seed=seed,
                         process_index=pi, process_count=pc)

  def eval_batches(self, *, global_batch_size, process_index=None, process_count=None) -> Iterator[dict]:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    images, labels = self._test
    local = global_batch_size // pc
    for start in range(0, len(images), global_batch_size):
      img = np.zeros((global_batch_size,) + images.shape[1:], np.float32)
      lab = np.zeros((global_batch_size,), np.int32)
      mask = np.zeros((global_batch_size,), np.float32)
      n = min(global_batch_size, len(images) - start)
      img[:n], lab[:n], mask[:n] = images[start:start + n], labels[start:start + n], 1.0
      sl = slice(pi * local, (pi + 1) * local)
      yield {"image": img[sl], "label": lab[sl], "mask": mask[sl]}


def _read_idx(path):
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_like(name, data_dir):
  data_dir = data_dir or _DEFAULT_DIRS[name]
  def load(split):
    img_path = os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz")
    lab_path = os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz")
    for p in (img_path, lab_path):
      if not os.path.exists(p):
        raise DatasetNotPreparedError(f"dataset {name!r} not found: missing {p}.")
    images = _read_idx(img_path).astype(np.float32)[..., None] / 255.0
    images = (images - 0.2860) / 0.3530  # Fashion-MNIST mean/std; fine for MNIST too
    return images.astype(np.float32), _read_idx(lab_path).astype(np.int32)
  train, test = load("train"), load("t10k")
  info = DatasetInfo(name, 10, (28, 28, 1), len(train[0]), len(test[0]))
  return Dataset(info, train, test)


def _synthetic(image_shape, num_classes, num_train, num_test):
  """Learnable synthetic data: one random template per class plus noise."""
  rng = np.random.default_rng(0)
  templates = rng.normal(size=(num_classes,) + tuple(image_shape)).astype(np.float32)
  def split(n, seed):
    r = np.random.default_rng(seed)
    labels = r.integers(0, num_classes, n).astype(np.int32)
    images = templates[labels] + r.normal(size=(n,) + tuple(image_shape)).astype(np.float32)
    return images.astype(np.float32), labels
  info = DatasetInfo("synthetic", num_classes, tuple(image_shape), num_train, num_test)
  return Dataset(info, split(num_train, 1), split(num_test, 2))


def get_dataset(name, *, data_dir=None, image_shape=None, num_classes=None, num_train=None,
                num_test=None) -> Dataset:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}.")
  if name == "synthetic":
    return _synthetic(image_shape or (28, 28, 1), num_classes or 10, num_train or 512, num_test or 128)
  if name in ("fashion_mnist", "mnist"):
    return _mnist_like(name, data_dir)
  raise DatasetNotPreparedError(f"dataset {name!r} is not supported by the temporary data stand-in.")


def make_global_batch(local_batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
