"""Datasets for training: global batches of ``{"image", "label"}`` by name.

``get_dataset(name)`` returns a :class:`Dataset` with its facts
(:class:`DatasetInfo`), an infinite, resumable train iterator and a finite,
padded evaluation pass. Every batch a process gets is its own slice of the
global batch; :func:`make_global_batch` turns the slices of all processes into
global ``jax.Array`` s.

Sources
-------
* ``fashion_mnist``: the four idx files (``.gz`` or not) from ``data_dir``
  (or a TFDS copy prepared there; a ``data_dir`` without either is an error
  naming the missing files), else from ``/usr/share/datasets/fashion-mnist``
  (Debian package ``dataset-fashion-mnist``), else TFDS. Works offline.
* ``mnist``, ``cifar10``, ``cifar100``: ``tfds.data_source`` (ArrayRecord
  files, random access, no TensorFlow at training time), decoded once into memory.
* ``imagenet2012``: the decode-once uint8 cache in ``data_dir`` if built
  (:mod:`tgq_jax.data.imagenet_cache`), else the JPEG bytes of TFDS's records,
  decoded by :mod:`tgq_jax.data.imagenet` (DCT-domain downscaling where the
  crop allows). See ``docs/data.md`` to prepare them.
* ``synthetic``: deterministic noise images generated on the fly.
* ``text``: a UTF-8 text file (default: the committed Tiny Shakespeare) as windows
  of tokens for language models, ``{"tokens"}`` batches
  (:class:`tgq_jax.data.text.TextDataset`).

Here: the splits, the datasets and their iterators. The idx format lives in
:mod:`tgq_jax.data.idx`, TFDS access in :mod:`tgq_jax.data.tfds`, augmentation in
:mod:`tgq_jax.data.augment` (pure numpy functions of images and draws), the
ImageNet crops in :mod:`tgq_jax.data.imagenet`.

Small datasets (everything but ImageNet) are held in memory as uint8 and
augmented per batch with vectorized numpy; ImageNet is read and cropped per
example. Either way a batch is a pure function of ``(seed, step)``: grain
(``MapDataset.range(...).map(...)``) only runs those functions ahead of time
(in threads; for ImageNet in worker processes, free of the GIL), and the
iterator's state is one integer, the step. grain is optional: without it (a
typical GPU image) a small thread pool does the same, with the same batches
and states.

What a batch holds
------------------
``{"image": float32 NHWC normalized, "label": int32}`` (and ``"mask"`` in
evaluation) from the small datasets. ImageNet (``normalize_on_device``, its
default) sends uint8 instead: ``{"pixels": uint8 NHWC crops, "label"}`` from
JPEGs, or ``{"pixels": uint8 canvases, "box", "flip", "label"}`` from the
cache, and :meth:`Dataset.model_input` (jittable: :meth:`Dataset.wrap_step`
puts it inside the step) turns either into ``{"image", "label"}`` on the device.

Order and randomness
--------------------
Epoch ``e`` visits the training set in the order of a permutation seeded by
``(seed, e)``; global batch ``s`` of the epoch is rows ``[s B, (s + 1) B)`` of
it (the incomplete last batch is dropped) and process ``p`` of ``P`` gets rows
``[p B/P, (p + 1) B/P)`` of that batch. The augmentation draws are made for the
whole global batch from ``(seed, step)`` and sliced the same way, so the global
batch does not depend on the number of processes and a saved state can be
restored on another topology. Evaluation has no randomness.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import weakref
from collections.abc import Iterator, Sequence
from concurrent import futures

import jax
import numpy as np

from tgq_jax.data import imagenet_cache
from tgq_jax.data.augment import (CROP_ATTEMPTS, center_crop_box, inception_crop_box,  # noqa: F401  (re-exported)
                                  normalize, pad_crop_flip)
from tgq_jax.data.imagenet import (box_rows, canvas_batch, center_crop, crop_resize_on_device, random_resized_crop,
                                   to_model_input)
from tgq_jax.data.idx import (DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_FILES, find_idx_files, load_idx_dataset,
                         missing_idx_files)
from tgq_jax.data.idx import IdxFormatError, parse_idx, read_idx  # noqa: F401  (re-exported: data.read_idx, ...)
from tgq_jax.data.tfds import DatasetNotPreparedError, read_records, open_tfds_split
from tgq_jax.data.text import TextDataset, load_text_dataset

try:  # optional: see _ordered_map
  import grain
except ImportError:  # pragma: no cover - exercised where grain is not installed
  grain = None

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet2012", "synthetic", "text")
# Room in the synthetic noise pool: image i is pool[o_i : o_i + H W C].
_SYNTHETIC_POOL_SLACK = 1 << 16
# grain threads for in-memory data: numpy holds the GIL for part of each
# batch, so threads beyond the spare cores only contend (measured on 2 cores:
# 1 thread 66k images/s, 2 threads 32k for CIFAR-shaped batches of 256).
_IN_MEMORY_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))

@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Facts the trainer needs. ``image_shape`` is (H, W, C) as fed to the model."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int


@dataclasses.dataclass(frozen=True)
class _Recipe:
  """How a dataset is read, augmented and normalized."""
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]  # per channel, of pixel / 255
  std: tuple[float, ...]
  augment: str  # "crop": pad+crop; "crop_flip": pad+crop+flip; "inception"
  pad: int = 0
  test_split: str = "test"


# Means/stds are the usual per-channel training-set statistics.
_RECIPES = {
    "fashion_mnist": _Recipe(10, (28, 28, 1), (0.2860,), (0.3530,), "crop", 2),
    "mnist": _Recipe(10, (28, 28, 1), (0.1307,), (0.3081,), "crop", 2),
    "cifar10": _Recipe(10, (32, 32, 3), (0.4914, 0.4822, 0.4465),
                       (0.2470, 0.2435, 0.2616), "crop_flip", 4),
    "cifar100": _Recipe(100, (32, 32, 3), (0.5071, 0.4865, 0.4409),
                        (0.2673, 0.2564, 0.2762), "crop_flip", 4),
    "imagenet2012": _Recipe(1000, (224, 224, 3), (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225), "inception",
                            test_split="validation"),
    # Uniform uint8 noise: mean 127.5 / 255, std ~ 1 / sqrt(12).
    "synthetic": _Recipe(10, (32, 32, 3), (0.5,), (0.2887,), "crop_flip", 4),
}


# ----------------------------------------------------------------------------
# Splits: random access to (uint8 images, int32 labels) by index.

class _ArraySplit:
  """A split held in memory."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def take(self, idx: np.ndarray):
    return self.images[idx], self.labels[idx]


class _RecordSplit:
  """A TFDS data source read per example; images keep their own sizes (and stay JPEG bytes if undecoded)."""

  def __init__(self, source: Sequence[dict], count: int):
    self.source, self.count = source, count

  def __len__(self):
    return self.count

  def take(self, idx: np.ndarray):
    records = [self.source[int(i)] for i in idx]
    return ([r["image"] if isinstance(r["image"], bytes) else np.asarray(r["image"], np.uint8) for r in records],
            np.array([r["label"] for r in records], np.int32))


class _SyntheticSplit:
  """Noise images: image i is a window of a seeded pool at a hashed offset."""

  def __init__(self, count: int, image_shape, num_classes: int, salt: int):
    self.count, self.shape, self.num_classes, self.salt = count, image_shape, num_classes, salt
    size = int(np.prod(image_shape))
    pool = np.random.default_rng(salt).integers(0, 256, size + _SYNTHETIC_POOL_SLACK, np.uint8)
    self.windows = np.lib.stride_tricks.sliding_window_view(pool, size)

  def __len__(self):
    return self.count

  def take(self, idx: np.ndarray):
    h = _hash(np.asarray(idx, np.uint64) + np.uint64(self.salt << 40))
    images = self.windows[h % np.uint64(_SYNTHETIC_POOL_SLACK)].reshape(-1, *self.shape)
    return images, ((h >> np.uint64(32)) % np.uint64(self.num_classes)).astype(np.int32)


def _hash(x: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer: a cheap, well-mixed function of uint64 indices."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


# ----------------------------------------------------------------------------
# Dataset, iterators

def _check_batch(global_batch_size: int, process_count: int, num_devices: int, n: int,
                 what: str) -> None:
  for count, desc in ((num_devices, "number of devices"), (process_count, "process count")):
    if global_batch_size % count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"{desc} {count}")
  if global_batch_size < 1 or (what == "train" and global_batch_size > n):
    raise ValueError(f"global batch size {global_batch_size} must be in [1, {n}] "
                     f"({n} {what} examples)")


def _process(process_index, process_count) -> tuple[int, int]:
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= p < count:
    raise ValueError(f"process index {p} outside [0, {count})")
  return p, count


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, 0, epoch]).permutation(n)


def _draws(seed: int, step: int, global_batch_size: int) -> np.ndarray:
  """Augmentation uniforms for a whole global batch: (B, 3 + 4 attempts)."""
  return np.random.default_rng([seed, 1, step]).random((global_batch_size, 3 + 4 * CROP_ATTEMPTS))


class _PrefetchMap:
  """``fn(k)`` for ``k = start, start + 1, ...`` (below ``stop``), computed ahead in threads, in order.

  The stand-in for grain's ``MapDataset.range(start, stop).map(fn)`` iterator
  where grain is not installed: same items, same ``{"next_index"}`` state.
  """

  def __init__(self, fn, start: int, stop: int, threads: int):
    self._fn, self._stop, self._ahead = fn, stop, 2 * threads
    self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="tgq-data")
    self._next, self._queue = start, []

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) < self._ahead and self._next + len(self._queue) < self._stop:
      self._queue.append(self._pool.submit(self._fn, self._next + len(self._queue)))
    if not self._queue:
      raise StopIteration
    self._next += 1
    return self._queue.pop(0).result()

  def get_state(self) -> dict:
    return {"next_index": self._next}

  def set_state(self, state: dict) -> None:
    for f in self._queue:
      f.cancel()
    self._next, self._queue = int(state["next_index"]), []


def _ordered_map(fn, start: int, stop: int, threads: int, processes: int = 0):
  """An iterator of ``fn(k)`` for ``k`` in ``[start, stop)`` in order.

  ``processes > 0``: ``fn`` runs in that many grain worker processes (spawned:
  ``fn`` must pickle), each computing whole items, so per-example Python work
  is not serialized by the GIL; else in ``threads`` threads.
  """
  if grain is None:
    return _PrefetchMap(fn, start, stop, threads)
  ds = grain.MapDataset.range(start, stop).map(fn)
  if processes:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a program not run by absl has their defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=processes, per_worker_buffer_size=2))
    return iter(ds)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)))


class Dataset:
  """A named dataset: facts, a train iterator and an evaluation pass."""

  def __init__(self, info: DatasetInfo, recipe: _Recipe, train, test, *,
               num_threads: int = _IN_MEMORY_THREADS, num_workers: int = 0, normalize_on_device: bool = False,
               canvas: int | None = None):
    self.info, self.recipe, self.train, self.test = info, recipe, train, test
    # Batches are computed in this many grain threads; in-memory numpy work
    # needs few (GIL). Per-example work (ImageNet) runs in num_workers processes.
    self.num_threads, self.num_workers = num_threads, num_workers
    # True: batches hold uint8 "pixels" (not "image": a step fed them without
    # model_input fails at once instead of training on unnormalized input).
    self.normalize_on_device = normalize_on_device
    self.image_key = "pixels" if normalize_on_device else "image"
    # ImageNet from the uint8 cache: batches hold whole images on a canvas x canvas
    # uint8 canvas with their crop boxes and flips; model_input crops and resizes.
    self.canvas = canvas
    self._shared_output = False  # True only in the copies sent to grain's worker processes
    if canvas is not None and not (normalize_on_device and recipe.augment == "inception"):
      raise ValueError("crops on the device (canvas) need normalize_on_device and the inception recipe")

  def _for_workers(self) -> "Dataset":
    """This dataset as the worker processes compute it (uint8 canvases in shared memory), if it uses workers."""
    if not (self.num_workers and self.canvas and grain is not None):
      return self
    copy = object.__new__(Dataset)
    copy.__dict__.update(self.__dict__, _shared_output=True)
    return copy

  def model_input(self, batch: dict) -> dict:
    """``batch`` as the model takes it, ``{"image": float32, ...}``; jittable.

    uint8 ``"pixels"`` (and, from the cache, ``"box"`` and ``"flip"``) become
    the normalized ``"image"``; a batch that has ``"image"`` already is returned as is.
    """
    if "pixels" not in batch:
      return batch
    image = batch["pixels"]
    if "box" in batch:  # whole images on a canvas: crop, resize, flip here
      image = crop_resize_on_device(image, batch["box"], batch["flip"], self.info.image_shape[:2])
    rest = {k: v for k, v in batch.items() if k not in ("pixels", "box", "flip")}
    return {**rest, "image": to_model_input(image, self.recipe.mean, self.recipe.std)}

  def wrap_step(self, step):
    """``step(state, batch, ...)`` taking this dataset's host batches: ``step(state, model_input(batch), ...)``."""
    if not self.normalize_on_device:
      return step

    @functools.wraps(step)
    def wrapped(state, batch, *args, **kwargs):
      return step(state, self.model_input(batch), *args, **kwargs)
    return wrapped

  def _finish(self, images: np.ndarray) -> np.ndarray:
    r = self.recipe
    return images if self.normalize_on_device else normalize(images, r.mean, r.std)

  def _canvases(self, images) -> np.ndarray:
    # In a grain worker the canvases are written straight into shared memory, which
    # grain then hands to the main process as it is (one pass over ~40 MB fewer per batch).
    empty = np.empty if not self._shared_output else grain.multiprocessing.SharedMemoryArray
    return canvas_batch(images, self.canvas, empty)

  def _train_images(self, images, draws, augment: bool = True) -> dict[str, np.ndarray]:
    """The image fields of a train batch: ``{"image"}`` (normalized), ``{"pixels"}`` (uint8), or
    ``{"pixels", "box", "flip"}`` (a canvas)."""
    r = self.recipe
    if not augment:  # the evaluation transform: deterministic, no randomness
      return self._eval_images(images)
    flip = draws[:, 2] < 0.5
    if r.augment == "inception" and self.canvas:
      boxes = [inception_crop_box(*im.shape[:2], d) for im, d in zip(images, draws)]
      return {"pixels": self._canvases(images), "box": box_rows(boxes, [im.shape for im in images]),
              "flip": flip}
    if r.augment == "inception":
      size = self.info.image_shape[:2]
      out = np.stack([random_resized_crop(im, d, size) for im, d in zip(images, draws)])
      out[flip] = out[flip, :, ::-1]
    else:
      out = pad_crop_flip(images, draws, r.pad, r.augment == "crop_flip")
    return {self.image_key: self._finish(out)}

  def _eval_images(self, images) -> dict[str, np.ndarray]:
    r = self.recipe
    if r.augment != "inception":
      return {self.image_key: self._finish(np.asarray(images))}
    size = self.info.image_shape[0]
    resize = int(round(size / 0.875))  # 224 -> 256
    if self.canvas:
      boxes = [center_crop_box(*im.shape[:2], size, resize) for im in images]
      return {"pixels": self._canvases(images), "box": box_rows(boxes, [im.shape for im in images]),
              "flip": np.zeros(len(images), bool)}
    return {self.image_key: self._finish(np.stack([center_crop(im, size, resize) for im in images]))}

  def train_batch(self, step: int, *, global_batch_size: int, seed: int,
                  process_index: int, process_count: int, augment: bool = True) -> dict[str, np.ndarray]:
    """Process-local slice of global train batch ``step`` (counted over all epochs)."""
    n, local = len(self.train), global_batch_size // process_count
    epoch, s = divmod(step, n // global_batch_size)
    rows = slice(s * global_batch_size + process_index * local,
                 s * global_batch_size + (process_index + 1) * local)
    images, labels = self.train.take(_permutation(seed, epoch, n)[rows])
    draws = _draws(seed, step, global_batch_size)[process_index * local:(process_index + 1) * local]
    return {**self._train_images(images, draws, augment), "label": labels}

  def eval_batch(self, index: int, *, global_batch_size: int, process_index: int,
                 process_count: int) -> dict[str, np.ndarray]:
    """Process-local slice of eval batch ``index``, zero-padded past the end."""
    local = global_batch_size // process_count
    start = index * global_batch_size + process_index * local
    idx = np.arange(start, min(start + local, len(self.test)))
    dtype = np.uint8 if self.normalize_on_device else np.float32
    shape = (self.canvas, self.canvas, 3) if self.canvas else self.info.image_shape
    out = {self.image_key: np.zeros((local, *shape), dtype),
           "label": np.zeros(local, np.int32), "mask": np.zeros(local, np.float32)}
    if self.canvas:  # padding rows crop the whole (zero) canvas: finite, and masked out
      out["box"] = np.tile(np.float32([0, 0, self.canvas, self.canvas, self.canvas, self.canvas]), (local, 1))
      out["flip"] = np.zeros(local, bool)
    if idx.size:
      images, labels = self.test.take(idx)
      for k, v in self._eval_images(images).items():
        out[k][:idx.size] = v
      out["label"][:idx.size] = labels
      out["mask"][:idx.size] = 1.0
    return out

  def train_iterator(self, *, global_batch_size: int, seed: int, process_index: int | None = None,
                     process_count: int | None = None, num_devices: int | None = None,
                     augment: bool = True) -> "TrainIterator":
    """Infinite iterator of this process's train batches (see module docstring).

    ``augment=False`` feeds training images through the evaluation transform
    (short runs, such as the demo, learn faster without augmentation).
    """
    p, count = _process(process_index, process_count)
    _check_batch(global_batch_size, count, jax.device_count() if num_devices is None else num_devices,
                 len(self.train), "train")
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")
    fn = functools.partial(self._for_workers().train_batch, global_batch_size=global_batch_size, seed=seed,
                           process_index=p, process_count=count, augment=augment)
    return TrainIterator(self, fn, global_batch_size, seed)

  def num_eval_batches(self, global_batch_size: int) -> int:
    return -(-len(self.test) // global_batch_size)

  def eval_batches(self, *, global_batch_size: int, process_index: int | None = None,
                   process_count: int | None = None, num_devices: int | None = None
                   ) -> Iterator[dict]:
    """One pass over the test split: every example once, padded, with ``mask``.

    All processes get ``ceil(num_test / global_batch_size)`` batches.
    """
    p, count = _process(process_index, process_count)
    _check_batch(global_batch_size, count, jax.device_count() if num_devices is None else num_devices,
                 len(self.test), "test")
    fn = functools.partial(self.eval_batch, global_batch_size=global_batch_size,
                           process_index=p, process_count=count)
    n = self.num_eval_batches(global_batch_size)
    # Starting worker processes (each imports jax) pays only for a long pass.
    workers = self.num_workers if n >= 4 * self.num_workers else 0
    return _closing(_ordered_map(fn, 0, n, self.num_threads, workers))


def _closing(iterator):
  """Yields from ``iterator``, then closes it (stops its worker processes, if any)."""
  try:
    yield from iterator
  finally:
    getattr(iterator, "close", lambda: None)()


class TrainIterator:
  """Infinite iterator of process-local train batches; resumable.

  ``get_state()`` is ``{"step", "seed", "global_batch_size", "dataset"}``
  (JSON-serializable); ``step`` counts batches over all epochs.
  """

  def __init__(self, dataset: Dataset, batch_fn, global_batch_size: int, seed: int):
    self.steps_per_epoch = len(dataset.train) // global_batch_size
    self._key = {"seed": seed, "global_batch_size": global_batch_size, "dataset": dataset.info.name}
    self._batch_fn, self._threads, self._workers = batch_fn, dataset.num_threads, dataset.num_workers
    self._step, self._finalizer = 0, None
    self._it = self._start(0)

  def _start(self, step: int):
    # An index range as long as any run: index k maps to batch_fn(k) (a pure
    # function of k), computed ahead in order; the state is the next index.
    it = _ordered_map(self._batch_fn, step, 1 << 62, self._threads, self._workers)
    if hasattr(it, "close"):  # worker processes: stopped when this iterator goes, or at exit
      self._finalizer = weakref.finalize(self, it.close)
    return it

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self._step += 1
    return batch

  def close(self) -> None:
    """Stops the worker processes (if any); garbage collection and interpreter exit do it too."""
    getattr(self._it, "close", lambda: None)()

  @property
  def step(self) -> int:
    return self._step

  @property
  def epoch(self) -> int:
    return self.step // self.steps_per_epoch

  def get_state(self) -> dict:
    return {"step": self.step, **self._key}

  def set_state(self, state: dict) -> None:
    mismatch = {k: (state.get(k), v) for k, v in self._key.items() if state.get(k) != v}
    if mismatch:
      raise ValueError(f"iterator state does not belong to this iterator: (saved, current) = {mismatch}")
    self.close()
    if self._finalizer is not None:
      self._finalizer.detach()
    self._step = int(state["step"])
    self._it = self._start(self._step)


def make_global_batch(local_batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Process-local batches -> global ``jax.Array`` s sharded along axis 0.

  ``sharding`` must shard only the leading (batch) axis, e.g.
  ``NamedSharding(mesh, P("data"))``; it is used for every entry.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# ----------------------------------------------------------------------------
# get_dataset

def _limit(split, n: int | None, what: str, name: str):
  if n is None:
    return split
  if not 0 < n <= len(split):
    raise ValueError(f"{name}: {what}={n} outside [1, {len(split)}]")
  if isinstance(split, _ArraySplit):
    return _ArraySplit(split.images[:n], split.labels[:n])
  split.count = n
  return split


def _load_fashion_mnist(data_dir: str | None):
  """(train, test) from idx files, or None to read TFDS.

  A ``data_dir`` the user names is the only place looked at (never silently
  the system copy instead): its idx files, else a TFDS copy prepared in it
  (``<data_dir>/fashion_mnist/``), else an error naming the missing files.
  Without one: the system copy, else TFDS's default directory.
  """
  if data_dir is None:
    directory = DEFAULT_FASHION_MNIST_DIR if find_idx_files(DEFAULT_FASHION_MNIST_DIR) else None
  elif not os.path.isdir(data_dir):
    raise DatasetNotPreparedError(f"data directory {data_dir} does not exist")
  elif missing := missing_idx_files(data_dir):
    if len(missing) == len(FASHION_MNIST_FILES) and os.path.isdir(os.path.join(data_dir, "fashion_mnist")):
      return None  # a TFDS data directory
    raise DatasetNotPreparedError(f"data directory {data_dir} lacks the Fashion-MNIST idx files "
                                  f"{', '.join(missing)} (each may be .gz)")
  else:
    directory = data_dir
  if directory is None:
    return None
  d = load_idx_dataset(directory)
  return (_ArraySplit(d["train_images"], d["train_labels"]),
          _ArraySplit(d["test_images"], d["test_labels"]))


def get_dataset(name: str, *, data_dir: str | None = None, image_shape=None, num_classes=None,
                num_train=None, num_test=None, normalize_on_device: bool | None = None,
                num_workers: int | None = None, data_file: str | None = None, vocabulary: str = "chars",
                context: int | None = None, eval_windows: int = 0) -> Dataset | TextDataset:
  """The dataset called ``name`` (one of :data:`DATASETS`).

  Args:
    name: dataset name.
    data_dir: idx directory (``fashion_mnist``) or TFDS data directory.
    image_shape: (H, W, C) of ``synthetic``; the crop size of
      ``imagenet2012`` (e.g. (160, 160, 3)); must match for the others.
    num_classes: class count of ``synthetic``; must match for the others.
    num_train, num_test: split sizes of ``synthetic`` (default 50,000 and
      10,000); for real data, use only the first ``n`` examples.
    normalize_on_device: batches hold uint8 ``"pixels"`` (a quarter of
      float32's bytes to the device) and :meth:`Dataset.model_input` makes the
      normalized ``"image"`` inside the step (:meth:`Dataset.wrap_step`);
      False: ``"image"`` float32, normalized on the host. Default: True for
      ``imagenet2012``, False for the small datasets. For ImageNet read from the decode-once cache it also moves
      the crop, resize and flip there: batches then hold each whole cached
      image on a fixed uint8 canvas plus ``"box"`` and ``"flip"``.
    num_workers: processes computing ImageNet batches (default: one per core,
      at most 16; 0: threads in this process). Other datasets use threads.
    data_file, vocabulary, context, eval_windows: ``text`` only (:func:`tgq_jax.data.text.load_text_dataset`):
      the UTF-8 file (default: Tiny Shakespeare), ``"chars"`` or ``"bytes"``, the window length (required),
      how many fixed validation windows (0: every non-overlapping one).
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
  if name == "text":
    if context is None:
      raise ValueError("the text dataset needs a context (window length in tokens)")
    return load_text_dataset(data_file, vocabulary=vocabulary, context=context, eval_windows=eval_windows)
  if data_file is not None:
    raise ValueError(f"--data-file names a text file, for --dataset text only (got --dataset {name})")
  if data_dir is not None and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DatasetNotPreparedError(f"data directory {data_dir} is a file, not a directory (--data-dir names "
                                  "the directory that holds the dataset)")
  recipe = _RECIPES[name]
  if image_shape is not None:
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or (name not in ("synthetic", "imagenet2012") and image_shape != recipe.image_shape) \
        or (name == "imagenet2012" and image_shape[2] != 3):
      raise ValueError(f"{name}: image_shape {image_shape} not supported (dataset's is {recipe.image_shape})")
    recipe = dataclasses.replace(recipe, image_shape=image_shape)
  if num_classes is not None:
    if name != "synthetic" and num_classes != recipe.num_classes:
      raise ValueError(f"{name} has {recipe.num_classes} classes, not {num_classes}")
    recipe = dataclasses.replace(recipe, num_classes=int(num_classes))
  if name == "synthetic" and len(recipe.mean) != recipe.image_shape[2]:
    c = recipe.image_shape[2]
    recipe = dataclasses.replace(recipe, mean=recipe.mean * c, std=recipe.std * c)

  threads = _IN_MEMORY_THREADS
  if name == "synthetic":
    train = _SyntheticSplit(num_train or 50_000, recipe.image_shape, recipe.num_classes, salt=1)
    test = _SyntheticSplit(num_test or 10_000, recipe.image_shape, recipe.num_classes, salt=2)
    num_train = num_test = None
  elif name == "fashion_mnist" and (splits := _load_fashion_mnist(data_dir)):
    train, test = splits
  elif name == "imagenet2012":
    train, test = _imagenet_splits(data_dir, recipe.test_split)
    threads = min(16, os.cpu_count() or 1)
  else:  # small TFDS datasets: decode once, keep in memory
    def load(split, n):
      src = open_tfds_split(name, split, data_dir)
      return _ArraySplit(*read_records(src, len(src) if n is None else min(n, len(src))))
    train, test = load("train", num_train), load(recipe.test_split, num_test)
  train = _limit(train, num_train, "num_train", name)
  test = _limit(test, num_test, "num_test", name)
  info = DatasetInfo(name, recipe.num_classes, recipe.image_shape, len(train), len(test))
  if normalize_on_device is None:
    normalize_on_device = name == "imagenet2012"
  if num_workers is None:
    num_workers = min(16, os.cpu_count() or 1) if name == "imagenet2012" else 0
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  # From the uint8 cache, with normalization on the device, crops are made there too (RESULTS.md).
  canvas = train.max_side if normalize_on_device and isinstance(train, imagenet_cache.CachedSplit) else None
  return Dataset(info, recipe, train, test, num_threads=threads, num_workers=num_workers,
                 normalize_on_device=normalize_on_device, canvas=canvas)


def _imagenet_splits(data_dir: str | None, test_split: str):
  """(train, test) of ImageNet: the decode-once cache in ``data_dir`` if built, else TFDS's JPEG records."""
  if data_dir is not None and imagenet_cache.read_meta(data_dir) is not None:
    return imagenet_cache.open_split(data_dir, "train"), imagenet_cache.open_split(data_dir, test_split)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  undecoded = {"image": tfds.decode.SkipDecoding()}  # we decode: at reduced scale where the crop allows
  train_src = open_tfds_split("imagenet2012", "train", data_dir, decoders=undecoded)
  test_src = open_tfds_split("imagenet2012", test_split, data_dir, decoders=undecoded)
  return _RecordSplit(train_src, len(train_src)), _RecordSplit(test_src, len(test_src))


def from_arrays(recipe_name: str, train_images, train_labels, test_images, test_labels) -> Dataset:
  """An in-memory dataset augmented and normalized like ``recipe_name``.

  For benchmarks and tests: e.g. random 32x32x3 arrays through exactly the
  CIFAR-10 path.
  """
  recipe = _RECIPES[recipe_name]
  train, test = _ArraySplit(np.asarray(train_images, np.uint8), np.asarray(train_labels, np.int32)), \
      _ArraySplit(np.asarray(test_images, np.uint8), np.asarray(test_labels, np.int32))
  info = DatasetInfo(recipe_name, recipe.num_classes, tuple(train.images.shape[1:]),
                     len(train), len(test))
  return Dataset(info, recipe, train, test)


class _ExampleSplit:
  """Examples held in memory as a list (JPEG bytes or uint8 arrays of any size)."""

  def __init__(self, examples: Sequence, labels):
    self.examples, self.labels = list(examples), np.asarray(labels, np.int32)
    self.count = len(self.examples)

  def __len__(self):
    return self.count

  def take(self, idx: np.ndarray):
    return [self.examples[int(i)] for i in idx], self.labels[idx]


def from_examples(recipe_name: str, train_examples: Sequence, train_labels, test_examples: Sequence, test_labels,
                  *, image_shape=None, num_workers: int = 0, normalize_on_device: bool = False) -> Dataset:
  """A dataset of per-example images (JPEG bytes or uint8 (H, W, 3) arrays of any sizes) in memory,
  read and augmented like ``recipe_name`` (``"imagenet2012"``): for benchmarks and tests."""
  recipe = _RECIPES[recipe_name]
  if image_shape is not None:
    recipe = dataclasses.replace(recipe, image_shape=tuple(int(d) for d in image_shape))
  train, test = _ExampleSplit(train_examples, train_labels), _ExampleSplit(test_examples, test_labels)
  info = DatasetInfo(recipe_name, recipe.num_classes, recipe.image_shape, len(train), len(test))
  return Dataset(info, recipe, train, test, num_threads=1, num_workers=num_workers,
                 normalize_on_device=normalize_on_device)
