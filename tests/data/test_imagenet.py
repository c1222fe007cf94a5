"""ImageNet: preparation through TFDS's real builder, crops (statistics, decoding, device), cache, workers, resume.

``imagenet2012_tfds/`` (next to this file) is a fake ImageNet prepared by TFDS's real
``imagenet2012`` builder (3 synsets x 8 train JPEGs of 36x48, 10 validation JPEGs), made with

  python -c "from tgq_jax.data import fake_imagenet as f; f.write_imagenet_tars('M', num_classes=3,
             train_per_class=8, num_validation=10, image_shape=(36, 48))"
  tfds build imagenet2012 --file_format=array_record --manual_dir=M --data_dir=tests/data/imagenet2012_tfds

so that training on it needs no TensorFlow (CI); building it again needs the ``prepare`` extra
(:func:`test_tfds_builds_the_fake_imagenet_and_train_runs_on_it`, skipped without it).
"""
import importlib.util
import io
import json
import math
import os
import pathlib
import random
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tgq_jax import data
from tgq_jax.data import fake_imagenet, imagenet, imagenet_cache

FIXTURE = pathlib.Path(__file__).parent / "imagenet2012_tfds"
REPO = pathlib.Path(__file__).parents[2]
ONE = dict(process_index=0, process_count=1, num_devices=1)
PREPARE = ("tensorflow", "apache_beam", "mlcroissant", "importlib_resources")
MISSING_PREPARE = [m for m in PREPARE if importlib.util.find_spec(m) is None]


# ----------------------------------------------------------------------------
# The random-resized crop: statistics of the boxes against the reference algorithm

def reference_box(height, width, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params, transcribed with Python's own RNG: (left, top, right, bottom)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      i = rng.randint(0, height - h)
      j = rng.randint(0, width - w)
      return j, i, j + w, i + h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  i, j = (height - h) // 2, (width - w) // 2
  return j, i, j + w, i + h


def box_features(boxes, height, width):
  b = np.asarray(boxes, np.float64)
  w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
  return {"area": w * h / (height * width), "log_aspect": np.log(w / h),
          "center_x": (b[:, 0] + b[:, 2]) / 2 / width, "center_y": (b[:, 1] + b[:, 3]) / 2 / height}


def ks_statistic(a, b):
  """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
  grid = np.sort(np.concatenate([a, b]))
  cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)
  return np.abs(cdf(a) - cdf(b)).max()


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (60, 900)])  # last: mostly fallbacks
def test_crop_box_statistics_match_the_reference_algorithm(height, width):
  n = 6000
  draws = np.random.default_rng(0).random((n, 3 + 4 * data.CROP_ATTEMPTS))
  ours = box_features([data.inception_crop_box(height, width, d) for d in draws], height, width)
  rng = random.Random(1)
  ref = box_features([reference_box(height, width, rng) for _ in range(n)], height, width)
  critical = 1.95 * math.sqrt(2 / n)  # KS at the 0.1% level
  for key in ours:
    assert ks_statistic(ours[key], ref[key]) < critical, key
  if width / height < 4:  # the area follows U(0.08, 1) where the box fits
    assert abs(np.median(ours["area"]) - np.median(ref["area"])) < 0.03


def test_the_ks_check_does_detect_a_different_crop():
  """The statistic above is sharp enough: scale (0.2, 1) instead of (0.08, 1) fails it."""
  n, (height, width) = 6000, (375, 500)
  draws = np.random.default_rng(0).random((n, 3 + 4 * data.CROP_ATTEMPTS))
  ours = box_features([data.inception_crop_box(height, width, d) for d in draws], height, width)
  rng = random.Random(1)
  other = box_features([reference_box(height, width, rng, scale=(0.2, 1.0)) for _ in range(n)], height, width)
  assert ks_statistic(ours["area"], other["area"]) > 1.95 * math.sqrt(2 / n)


# ----------------------------------------------------------------------------
# Decoding and the device crop

def test_jpeg_decoding_at_reduced_scale_only_where_the_crop_stays_large():
  rng = np.random.default_rng(0)
  pixels = fake_imagenet.photo(rng, 480, 640)
  jpeg = fake_imagenet.jpeg_bytes(pixels)
  decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
  # A small crop (upscaled to 224): full decode, the same pixels as cropping the decoded array.
  small = lambda h, w: (100, 50, 200, 150)
  np.testing.assert_array_equal(imagenet.crop_resize(jpeg, small, (224, 224)),
                                imagenet.crop_resize(decoded, small, (224, 224)))
  # The whole photo to 64x64: libjpeg decodes at 1/4 scale (160x120 >= 64), close to the full decode.
  whole = lambda h, w: (0, 0, w, h)
  image, box = imagenet._decode_for_box(Image.open(io.BytesIO(jpeg)), whole(480, 640), (64, 64))  # noqa: SLF001
  assert image.size == (160, 120) and box == (0, 0, 160, 120)
  fast = imagenet.crop_resize(jpeg, whole, (64, 64)).astype(float)
  assert np.abs(fast - imagenet.crop_resize(decoded, whole, (64, 64))).mean() < 2.0


@pytest.mark.parametrize("flip", [False, True])
def test_device_crop_matches_pillow(flip):
  rng = np.random.default_rng(1)
  images = [fake_imagenet.photo(rng, 60, 80), fake_imagenet.photo(rng, 80, 53), fake_imagenet.photo(rng, 40, 40)]
  boxes = [(0.0, 0.0, 80.0, 60.0),  # the whole image, shrunk (filter widened, touches every edge)
           (5.0, 20.0, 25.0, 44.0),  # a small crop, enlarged
           (13.0, 0.0, 40.0, 31.0)]  # touching the top and right edges
  size = (32, 24)
  want = [np.asarray(Image.fromarray(im).resize(size[::-1], Image.BILINEAR, box=b), float)
          for im, b in zip(images, boxes)]
  canvas = imagenet.canvas_batch(images, 80)
  got = jax.jit(imagenet.crop_resize_on_device, static_argnums=3)(
      canvas, imagenet.box_rows(boxes, [im.shape for im in images]), np.full(3, flip), size)
  for g, w in zip(np.asarray(got), want):
    np.testing.assert_allclose(g, w[:, ::-1] if flip else w, atol=1.0)  # Pillow rounds to uint8


# ----------------------------------------------------------------------------
# Normalization on the device

def test_model_input_is_the_host_normalization_and_a_step_without_it_fails():
  kw = dict(data_dir=str(FIXTURE), image_shape=(32, 32, 3), num_workers=0)
  host = data.get_dataset("imagenet2012", normalize_on_device=False, **kw)
  device = data.get_dataset("imagenet2012", **kw)  # the default for ImageNet
  for make in (lambda ds: ds.train_iterator(global_batch_size=8, seed=4, **ONE),
               lambda ds: ds.eval_batches(global_batch_size=8, **ONE)):
    a, b = next(iter(make(host))), next(iter(make(device)))
    assert b["pixels"].dtype == np.uint8 and "image" not in b
    np.testing.assert_allclose(np.asarray(jax.jit(device.model_input)(b)["image"]), a["image"], atol=2e-5)
  with pytest.raises(KeyError, match="image"):  # a step fed the host batch as it is
    device.wrap_step(lambda state, batch: batch["image"])(None, {"label": b["label"]})
  assert device.wrap_step(lambda state, batch: batch["image"].dtype)(None, b) == np.float32


# ----------------------------------------------------------------------------
# Worker processes, determinism, resume

def test_worker_processes_give_the_same_batches_and_resume_exactly():
  kw = dict(data_dir=str(FIXTURE), image_shape=(32, 32, 3))
  in_process = data.get_dataset("imagenet2012", num_workers=0, **kw).train_iterator(global_batch_size=8, seed=2, **ONE)
  expected = [next(in_process) for _ in range(5)]  # crosses an epoch (3 steps per epoch)
  workers = data.get_dataset("imagenet2012", num_workers=2, **kw)
  it = workers.train_iterator(global_batch_size=8, seed=2, **ONE)
  got = [next(it) for _ in range(2)]
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  resumed = workers.train_iterator(global_batch_size=8, seed=2, **ONE)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(3)]
  resumed.close()
  assert state["step"] == 2
  for x, y in zip(expected, got):
    np.testing.assert_array_equal(x["pixels"], y["pixels"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(expected[0]["pixels"], expected[1]["pixels"])


# ----------------------------------------------------------------------------
# The decode-once cache

@pytest.fixture
def cached(tmp_path):
  """A copy of the TFDS fixture with the cache built in it (longer side 40: most images shrink)."""
  shutil.copytree(FIXTURE, tmp_path / "tfds")
  imagenet_cache.build(str(tmp_path / "tfds"), max_side=40, workers=0, log=lambda _: None)
  return tmp_path / "tfds"


def test_cache_holds_the_shrunk_images_and_labels(cached):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source("imagenet2012", split="validation", data_dir=str(cached), download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
  split = imagenet_cache.open_split(str(cached), "validation")
  images, labels = split.take(np.arange(10))
  for i, (image, label) in enumerate(zip(images, labels)):
    original = Image.open(io.BytesIO(source[i]["image"]))
    assert image.shape == (30, 40, 3) and original.size == (48, 36)  # 36x48 -> longer side 40
    want = np.asarray(original.convert("RGB").resize((40, 30), Image.BICUBIC))
    np.testing.assert_array_equal(image, want)
    assert label == source[i]["label"]


def test_cache_batches_crop_on_the_device_as_the_host_would(cached):
  ds = data.get_dataset("imagenet2012", data_dir=str(cached), image_shape=(32, 32, 3), num_workers=0)
  assert isinstance(ds.train, imagenet_cache.CachedSplit) and ds.canvas == 40
  host_crop = data.Dataset(ds.info, ds.recipe, ds.train, ds.test, num_workers=0, normalize_on_device=True)
  for make in (lambda d: d.train_iterator(global_batch_size=8, seed=1, **ONE),
               lambda d: d.eval_batches(global_batch_size=4, **ONE)):
    for a, b in zip(make(ds), make(host_crop)):
      assert a["pixels"].shape[1:] == (40, 40, 3) and set(a) - set(b) == {"box", "flip"}
      x, y = (np.asarray(jax.jit(ds.model_input)(batch)["image"]) for batch in (a, b))
      assert x.shape == y.shape == (len(a["label"]), 32, 32, 3) and np.isfinite(x).all()
      np.testing.assert_allclose(x, y, atol=1.01 / 255 / 0.224)  # Pillow rounds to uint8 on the host
      np.testing.assert_array_equal(a["label"], b["label"])
      if "mask" in a:
        np.testing.assert_array_equal(a["mask"], b["mask"])
      break


def test_cache_batches_from_worker_processes_equal_in_process(cached):
  """Workers write the canvases into shared memory; the batches are the same, and none is left behind."""
  kw = dict(data_dir=str(cached), image_shape=(32, 32, 3))
  expected = data.get_dataset("imagenet2012", num_workers=0, **kw).train_iterator(global_batch_size=8, seed=5, **ONE)
  it = data.get_dataset("imagenet2012", num_workers=2, **kw).train_iterator(global_batch_size=8, seed=5, **ONE)
  for _ in range(4):
    a, b = next(expected), next(it)
    assert set(a) == set(b) == {"pixels", "box", "flip", "label"}
    for key in ("box", "flip", "label"):
      np.testing.assert_array_equal(a[key], b[key])
    for x, y, box in zip(a["pixels"], b["pixels"], a["box"]):  # (outside the image the canvas is undefined)
      h, w = int(box[4]), int(box[5])
      np.testing.assert_array_equal(x[:h, :w], y[:h, :w])
  it.close()


def test_cache_errors(cached):
  out = imagenet_cache.cache_dir(str(cached))
  with pytest.raises(imagenet_cache.CacheError, match="built with .*'max_side': 40.*not.*'max_side': 64"):
    imagenet_cache.build(str(cached), max_side=64, workers=0, log=lambda _: None)
  with pytest.raises(imagenet_cache.CacheError, match=r"train record 7: header says 4x5x3 pixels, the record holds 59"):
    imagenet_cache.decode_record(np.array([4, 5, 3], "<i4").tobytes() + bytes(59), "train record 7")
  meta = json.loads((pathlib.Path(out) / "meta.json").read_text())
  os.remove(os.path.join(out, meta["splits"]["train"]["shards"][0]))
  with pytest.raises(imagenet_cache.CacheError, match="lacks 1 shard"):
    data.get_dataset("imagenet2012", data_dir=str(cached), num_workers=0)
  os.remove(os.path.join(out, "meta.json"))  # an unfinished cache is not read: back to the JPEG records
  assert isinstance(data.get_dataset("imagenet2012", data_dir=str(cached), num_workers=0).train, data._RecordSplit)  # noqa: SLF001


# ----------------------------------------------------------------------------
# Training on it, end to end

def run_train(*args, timeout=600):
  proc = subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, timeout=timeout,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


TRAIN_ARGS = ("--config", "imagenet_resnet18", "--arch", "small_cnn", "--image-shape", "32", "32", "3",
              "--batch-size", "8", "--eval-batch-size", "8", "--max-steps", "2")


@pytest.mark.slow
def test_train_runs_two_steps_on_the_fake_imagenet_prepared_by_tfds(tmp_path):
  """The documented path after ``tfds build``: JPEG records, crops in worker processes, uint8 to the device."""
  run_train(*TRAIN_ARGS, "--data-dir", str(FIXTURE), "--workdir", str(tmp_path / "w"))
  summary = json.loads((tmp_path / "w" / "summary.json").read_text())
  assert summary["steps"] == 2 and 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_train_runs_two_steps_on_the_cache(cached, tmp_path):
  run_train(*TRAIN_ARGS, "--data-dir", str(cached), "--workdir", str(tmp_path / "w"))
  assert json.loads((tmp_path / "w" / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING_PREPARE), reason=f"needs the prepare extra (pip install -e '.[prepare]'): "
                                                  f"{', '.join(MISSING_PREPARE)} not installed")
def test_tfds_builds_the_fake_imagenet_and_train_runs_on_it(tmp_path):
  """docs/data.md's ImageNet steps, on tars in the real layout, through TFDS's real imagenet2012 builder."""
  counts = fake_imagenet.write_imagenet_tars(str(tmp_path / "manual"), num_classes=3, train_per_class=8,
                                             num_validation=10, image_shape=(36, 48))
  tfds_cli = [os.path.join(os.path.dirname(sys.executable), "tfds")]
  if not os.path.exists(tfds_cli[0]):
    tfds_cli = [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main"]
  proc = subprocess.run([*tfds_cli, "build", "imagenet2012", "--file_format=array_record",
                         f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'tfds'}"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  labels_dir = pathlib.Path(tfds.__file__).parent / "datasets" / "imagenet2012"
  synsets = (labels_dir / "labels.txt").read_text().split()
  val_synsets = (labels_dir / "validation_labels.txt").read_text().split()[:10]
  for split, n in counts.items():
    source = tfds.data_source("imagenet2012", split=split, data_dir=str(tmp_path / "tfds"), download=False)
    assert len(source) == n
    got = sorted(int(source[i]["label"]) for i in range(n))
    want = sorted([0, 1, 2] * 8) if split == "train" else sorted(synsets.index(s) for s in val_synsets)
    assert got == want
  run_train(*TRAIN_ARGS, "--data-dir", str(tmp_path / "tfds"), "--workdir", str(tmp_path / "w"))
  assert json.loads((tmp_path / "w" / "summary.json").read_text())["steps"] == 2
