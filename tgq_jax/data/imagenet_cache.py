"""The decode-once ImageNet cache: resized uint8 images in ArrayRecord files (as FFCV does).

Decoding a ~100 KB ImageNet JPEG costs more host time than everything else the
input pipeline does per example (RESULTS.md, "ImageNet input pipeline"). This
module decodes every image once, shrinks it so its longer side is at most
``max_side`` (aspect kept; smaller images are kept as they are), and stores the
pixels raw, so that training only crops and resizes. Build it once, after
``tfds build imagenet2012``:

  python -m tgq_jax.data.imagenet_cache --data_dir $DATA [--max_side 320] [--workers N]

It is written next to the TFDS files, ``$DATA/tgq_imagenet2012_uint8/``;
``get_dataset("imagenet2012", data_dir=$DATA)`` then reads it instead of the
JPEGs. Shards are written under a temporary name and renamed when complete, and
``meta.json`` (written last) marks the cache complete: an interrupted build
resumes where it stopped, and an incomplete cache is never read.

Record layout: little-endian int32 ``height, width, label``, then
``height * width * 3`` uint8 RGB bytes (row-major).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import sys

import numpy as np

CACHE_DIRNAME = "tgq_imagenet2012_uint8"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
_HEADER = np.dtype("<i4")
_HEADER_BYTES = 3 * _HEADER.itemsize
# Random access needs one record per ArrayRecord chunk group (TFDS writes its files the same way).
_WRITER_OPTIONS = "group_size:1,uncompressed"  # (raw pixels: reading is a copy, not a decompression)


class CacheError(ValueError):
  """The cache is incomplete, inconsistent or damaged."""


def cache_dir(data_dir: str) -> str:
  return os.path.join(data_dir, CACHE_DIRNAME)


def fitted_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
  """(H, W) with the longer side at most ``max_side``, aspect kept (rounded); never enlarged."""
  scale = max_side / max(height, width)
  if scale >= 1:
    return height, width
  return max(1, round(height * scale)), max(1, round(width * scale))


def encode_record(image: np.ndarray, label: int) -> bytes:
  height, width, channels = image.shape
  if channels != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
  return np.array([height, width, label], _HEADER).tobytes() + np.ascontiguousarray(image).tobytes()


def decode_record(record: bytes, where: str = "record") -> tuple[np.ndarray, int]:
  """(uint8 (H, W, 3) view of ``record``, label); :class:`CacheError` naming ``where`` if malformed."""
  if len(record) < _HEADER_BYTES:
    raise CacheError(f"{where}: {len(record)} bytes, shorter than the {_HEADER_BYTES}-byte header")
  height, width, label = (int(v) for v in np.frombuffer(record, _HEADER, 3))
  if height <= 0 or width <= 0 or len(record) != _HEADER_BYTES + height * width * 3:
    raise CacheError(f"{where}: header says {height}x{width}x3 pixels, the record holds "
                     f"{len(record) - _HEADER_BYTES} bytes")
  return np.frombuffer(record, np.uint8, offset=_HEADER_BYTES).reshape(height, width, 3), label


def shrink_jpeg(data: bytes, max_side: int) -> np.ndarray:
  """Decodes ``data`` (JPEG/PNG) to uint8 RGB fitted into ``max_side`` (DCT-domain downscaling first)."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.open(io.BytesIO(data))
  height, width = fitted_shape(image.size[1], image.size[0], max_side)
  if (height, width) != (image.size[1], image.size[0]):
    image.draft("RGB", (width, height))  # only reduces by 1/2, 1/4, 1/8 while still >= the target
  image = image.convert("RGB")
  if image.size != (width, height):
    image = image.resize((width, height), Image.BICUBIC)
  return np.asarray(image)


def _encode_batch(items: list[tuple[bytes, int]], max_side: int) -> list[bytes]:
  return [encode_record(shrink_jpeg(data, max_side), label) for data, label in items]


class CachedSplit:
  """One split of the cache: ``take(idx)`` -> (list of uint8 (H, W, 3) arrays, int32 labels)."""

  def __init__(self, paths: list[str], count: int, name: str, max_side: int):
    from array_record.python.array_record_data_source import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
    self.paths, self.count, self.name = paths, count, name
    self.max_side = max_side  # no stored image is larger in either dimension
    self.source = ArrayRecordDataSource(paths)
    if len(self.source) != count:
      raise CacheError(f"{name}: {len(self.source)} records in {len(paths)} shard(s), meta.json says {count}")

  def __len__(self):
    return self.count

  def take(self, idx: np.ndarray):
    records = [self.source[int(i)] for i in idx]  # (__getitems__ starts a thread pool per call)
    pairs = [decode_record(r, f"{self.name} record {int(i)}") for r, i in zip(records, idx)]
    return [p[0] for p in pairs], np.array([p[1] for p in pairs], np.int32)


def read_meta(data_dir: str) -> dict | None:
  """The cache's meta.json (None: no complete cache in ``data_dir``)."""
  path = os.path.join(cache_dir(data_dir), "meta.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT_VERSION:
    raise CacheError(f"{path}: cache format {meta.get('format')!r}, this version reads {FORMAT_VERSION}; "
                     f"delete {cache_dir(data_dir)} and rebuild it (python -m tgq_jax.data.imagenet_cache)")
  return meta


def open_split(data_dir: str, split: str) -> CachedSplit | None:
  """The cached ``split`` of ImageNet in ``data_dir``, or None if there is no complete cache."""
  meta = read_meta(data_dir)
  if meta is None:
    return None
  entry = meta["splits"][split]
  paths = [os.path.join(cache_dir(data_dir), name) for name in entry["shards"]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise CacheError(f"the ImageNet cache in {cache_dir(data_dir)} lacks {len(missing)} shard(s), "
                     f"e.g. {missing[0]}; rebuild it (python -m tgq_jax.data.imagenet_cache)")
  return CachedSplit(paths, int(entry["count"]), f"{cache_dir(data_dir)} {split}", int(meta["max_side"]))


def _write_shard(path: str, records) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  partial = path + ".partial"
  writer = ArrayRecordWriter(partial, _WRITER_OPTIONS)
  for record in records:
    writer.write(record)
  writer.close()
  os.replace(partial, path)


def write_cache(out: str, sources, *, max_side: int = 320, workers: int | None = None,
                records_per_shard: int = 10_000, chunk: int = 64, log=print) -> dict:
  """Writes the cache of ``sources`` (``{split: sequence of {"image": JPEG bytes, "label": int}}``) into ``out``.

  Decoding runs in ``workers`` processes (default: all cores; 0: in this process). Completed
  shards of an interrupted build with the same settings are kept. Returns
  meta.json's dict.
  """
  if max_side < 32:
    raise ValueError(f"max_side must be >= 32, got {max_side}")
  os.makedirs(out, exist_ok=True)
  settings_path = os.path.join(out, "settings.json")
  settings = {"format": FORMAT_VERSION, "max_side": max_side, "records_per_shard": records_per_shard}
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      previous = json.load(f)
    if previous != settings:
      raise CacheError(f"{out} holds a cache built with {previous}, not {settings}; delete it to rebuild")
  else:
    with open(settings_path, "w") as f:
      json.dump(settings, f)
  meta = {**settings, "splits": {}}
  workers = (os.cpu_count() or 1) if workers is None else workers
  with contextlib.ExitStack() as stack:
    pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"))) if workers else None
    run = pool.map if pool else map
    for split, source in sources.items():
      n = len(source)
      shards = []
      for s, start in enumerate(range(0, n, records_per_shard)):
        stop = min(n, start + records_per_shard)
        name = f"{split}.array_record-{s:05d}-of-{math.ceil(n / records_per_shard):05d}"
        shards.append(name)
        if os.path.exists(os.path.join(out, name)):
          continue
        chunks = [[(source[i]["image"], int(source[i]["label"])) for i in range(a, min(stop, a + chunk))]
                  for a in range(start, stop, chunk)]
        records = (r for batch in run(_encode_batch, chunks, [max_side] * len(chunks)) for r in batch)
        _write_shard(os.path.join(out, name), records)
        log(f"{split}: {stop}/{n} images")
      meta["splits"][split] = {"count": n, "shards": shards}
  with open(os.path.join(out, "meta.json.partial"), "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(os.path.join(out, "meta.json.partial"), os.path.join(out, "meta.json"))
  return meta


def build(data_dir: str, **kwargs) -> dict:
  """Builds the cache from the TFDS ``imagenet2012`` ArrayRecord files in ``data_dir`` (kwargs: :func:`write_cache`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tgq_jax.data.tfds import open_tfds_split  # pylint: disable=g-import-not-at-top
  undecoded = {"image": tfds.decode.SkipDecoding()}
  sources = {split: open_tfds_split("imagenet2012", split, data_dir, decoders=undecoded) for split in SPLITS}
  return write_cache(cache_dir(data_dir), sources, **kwargs)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="TFDS data directory holding the prepared imagenet2012")
  parser.add_argument("--max_side", type=int, default=320, help="longer side of the stored images (pixels)")
  parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
  args = parser.parse_args(argv)
  try:
    meta = build(args.data_dir, max_side=args.max_side, workers=args.workers)
  except ValueError as e:  # includes DatasetNotPreparedError, CacheError
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"cache complete in {cache_dir(args.data_dir)}: "
        + ", ".join(f"{k} {v['count']}" for k, v in meta["splits"].items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
