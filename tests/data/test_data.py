"""Tests of tgq_jax.data: idx files, TFDS (mocked), order, resume, shards, eval padding."""
import gzip
import json
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tgq_jax import data

FASHION_DIR = pathlib.Path(data.DEFAULT_FASHION_MNIST_DIR)
IMAGENET_FIXTURE = str(pathlib.Path(__file__).parent / "imagenet2012_tfds")
ONE = dict(process_index=0, process_count=1)


def idx_bytes(array: np.ndarray) -> bytes:
  """Independent idx writer: 0 0 0x08 rank, big-endian uint32 dims, bytes."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_fashion(directory: pathlib.Path, n_train=20, n_test=10, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
      "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
  }
  for name, a in arrays.items():
    raw = idx_bytes(a)
    (directory / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
  return arrays


def ids_dataset(recipe="cifar10", n_train=70, n_test=23, shape=(32, 32, 3), seed=0):
  """In-memory dataset whose labels are the example ids, so batches can be traced."""
  rng = np.random.default_rng(seed)
  return data.from_arrays(recipe, rng.integers(0, 256, (n_train, *shape)), np.arange(n_train),
                          rng.integers(0, 256, (n_test, *shape)), np.arange(n_test))


# ----------------------------------------------------------------------------
# idx files

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
  a = np.random.default_rng(0).integers(0, 256, (5, 4, 3)).astype(np.uint8)
  raw = idx_bytes(a)
  path = tmp_path / "x.idx"
  path.write_bytes(gzip.compress(raw) if gz else raw)
  np.testing.assert_array_equal(data.read_idx(path, rank=3), a)


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw[:-7], r"truncated: the header promises 5 x 4 x 3 = 60 bytes of data, the file has 53"),
    (lambda raw: raw + b"\0", r"too long: .* 60 bytes of data, the file has 61"),
    (lambda raw: b"\x12\x34" + raw[2:], r"bad magic number 0x12340803"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], r"type code 0x0d"),
    (lambda raw: raw[:3] + b"\x01" + raw[4:], r"says rank 1, expected 3"),
    (lambda raw: raw[:9], r"truncated header"),
    (lambda raw: raw[:2], r"too short for an idx header"),
])
def test_read_idx_errors_name_file_and_problem(tmp_path, mutate, message):
  raw = idx_bytes(np.zeros((5, 4, 3), np.uint8))
  path = tmp_path / "bad-images-idx3-ubyte"
  path.write_bytes(mutate(raw))
  with pytest.raises(data.IdxFormatError, match=message) as err:
    data.read_idx(path, rank=3)
  assert str(path) in str(err.value)


def test_read_idx_truncated_gzip(tmp_path):
  path = tmp_path / "x.gz"
  path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:-20])
  with pytest.raises(data.IdxFormatError, match="truncated gzip"):
    data.read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_data_dir(tmp_path, gz):
  arrays = write_fashion(tmp_path, gz=gz)
  ds = data.get_dataset("fashion_mnist", data_dir=str(tmp_path))
  assert ds.info == data.DatasetInfo("fashion_mnist", 10, (28, 28, 1), 20, 10)
  batches = list(ds.eval_batches(global_batch_size=4, **ONE))
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, arrays["t10k-labels-idx1-ubyte"])
  raw = np.concatenate([b["image"][b["mask"] > 0] for b in batches])[..., 0] * 0.3530 + 0.2860
  np.testing.assert_allclose(raw * 255, arrays["t10k-images-idx3-ubyte"], atol=1e-3)


def test_read_idx_garbled_gzip_is_an_idx_error(tmp_path):
  """A gzip header followed by garbage: zlib's own error, not a traceback."""
  path = tmp_path / "train-images-idx3-ubyte.gz"
  raw = bytearray(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8))))
  raw[12:40] = b"garbage!" * 3 + b"junk"
  path.write_bytes(bytes(raw))
  with pytest.raises(data.IdxFormatError, match=f"{path}: broken or truncated gzip stream"):
    data.read_idx(path)


@pytest.mark.parametrize("present, missing", [
    ((), ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
          "t10k-labels-idx1-ubyte"]),
    (("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"), ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"]),
])
def test_a_named_data_dir_without_the_files_is_an_error_not_the_system_copy(tmp_path, present, missing):
  for name in present:
    (tmp_path / name).write_bytes(b"")
  with pytest.raises(data.DatasetNotPreparedError) as err:
    data.get_dataset("fashion_mnist", data_dir=str(tmp_path))
  assert str(err.value) == (f"data directory {tmp_path} lacks the Fashion-MNIST idx files {', '.join(missing)} "
                            "(each may be .gz)")
  with pytest.raises(data.DatasetNotPreparedError, match="does not exist"):
    data.get_dataset("fashion_mnist", data_dir=str(tmp_path / "nope"))


def test_fashion_mnist_count_mismatch(tmp_path):
  write_fashion(tmp_path, gz=False)
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9)))
  with pytest.raises(data.IdxFormatError, match="has 10 images but .* has 9 labels"):
    data.get_dataset("fashion_mnist", data_dir=str(tmp_path))


@pytest.mark.skipif(not data.find_idx_files(FASHION_DIR),
                    reason=f"Fashion-MNIST idx files not in {FASHION_DIR} "
                           "(Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist():
  ds = data.get_dataset("fashion_mnist")
  assert ds.info == data.DatasetInfo("fashion_mnist", 10, (28, 28, 1), 60_000, 10_000)
  np.testing.assert_array_equal(np.bincount(ds.train.labels), [6000] * 10)
  n = mask = 0
  for b in ds.eval_batches(global_batch_size=4096, **ONE):
    n += 1
    mask += b["mask"].sum()
  assert (n, mask) == (3, 10_000)


# ----------------------------------------------------------------------------
# TFDS through tfds.data_source (mocked ArrayRecord reader, same code path)

def test_cifar10_mock_data_source(tmp_path):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.get_dataset("cifar10", data_dir=str(tmp_path))
    source = tfds.data_source("cifar10", split="test", data_dir=str(tmp_path), download=False)
    expected = np.stack([source[i]["image"] for i in range(40)])
    expected_labels = np.array([source[i]["label"] for i in range(40)])
  assert ds.info == data.DatasetInfo("cifar10", 10, (32, 32, 3), 40, 40)
  b = next(iter(ds.eval_batches(global_batch_size=40, num_devices=1, **ONE)))
  mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
  np.testing.assert_allclose(b["image"], (expected / 255 - mean) / std, atol=1e-5)
  np.testing.assert_array_equal(b["label"], expected_labels)
  t = next(ds.train_iterator(global_batch_size=8, seed=0, num_devices=1, **ONE))
  assert t["image"].shape == (8, 32, 32, 3) and t["image"].dtype == np.float32
  assert t["label"].dtype == np.int32


def test_imagenet_prepared_by_tfds_reads_without_tensorflow():
  """A fake ImageNet prepared by TFDS's real imagenet2012 builder (tests/data/imagenet2012_tfds, see
  test_imagenet.py), read through tfds.data_source as JPEG bytes: no TensorFlow at training time."""
  ds = data.get_dataset("imagenet2012", data_dir=IMAGENET_FIXTURE, image_shape=(64, 64, 3), num_workers=0,
                        normalize_on_device=False)
  assert ds.info == data.DatasetInfo("imagenet2012", 1000, (64, 64, 3), 24, 10)
  it = ds.train_iterator(global_batch_size=4, seed=3, num_devices=1, **ONE)
  train = [next(it) for _ in range(3)]
  evals = list(ds.eval_batches(global_batch_size=4, num_devices=1, **ONE))
  assert all(b["image"].shape == (4, 64, 64, 3) and np.isfinite(b["image"]).all() for b in train)
  assert [b["mask"].sum() for b in evals] == [4, 4, 2]
  assert np.all(evals[-1]["image"][2:] == 0)


@pytest.mark.parametrize("name, extra", [("cifar10", ""), ("imagenet2012", "--manual_dir")])
def test_not_prepared_error(tmp_path, name, extra):
  with pytest.raises(data.DatasetNotPreparedError, match=f"tfds build {name} --file_format=array_record") as err:
    data.get_dataset(name, data_dir=str(tmp_path))
  assert isinstance(err.value, ValueError)
  assert "pip install -e '.[prepare]'" in str(err.value) and extra in str(err.value)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="valid names: fashion_mnist, mnist, cifar10, cifar100, imagenet2012, synthetic"):
    data.get_dataset("svhn")


# ----------------------------------------------------------------------------
# Augmentation

def test_pad_crop_flip_matches_loop():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 6, 5, 3), dtype=np.uint8)
  draws = rng.random((16, 3))
  out = data.pad_crop_flip(images, draws, pad=2, flip=True)
  for im, d, o in zip(images, draws, out):
    padded = np.pad(im, ((2, 2), (2, 2), (0, 0)))
    dy, dx = int(d[0] * 5), int(d[1] * 5)
    crop = padded[dy:dy + 6, dx:dx + 5]
    np.testing.assert_array_equal(o, crop[:, ::-1] if d[2] < 0.5 else crop)


def test_fashion_train_is_two_pixel_crop_without_flip():
  ds = ids_dataset("fashion_mnist", n_train=32, shape=(28, 28, 1))
  b = next(ds.train_iterator(global_batch_size=32, seed=1, num_devices=1, **ONE))
  raw = np.rint((b["image"] * 0.3530 + 0.2860) * 255).astype(int)
  shifts = set()
  for img, i in zip(raw, b["label"]):
    padded = np.pad(ds.train.images[i], ((2, 2), (2, 2), (0, 0)))
    hits = [(dy, dx) for dy in range(5) for dx in range(5)
            if np.array_equal(padded[dy:dy + 28, dx:dx + 28], img)]
    assert len(hits) == 1
    shifts.add(hits[0])
  assert len(shifts) > 5  # the offsets do vary


def test_no_augment_gives_the_raw_training_images():
  ds = ids_dataset("fashion_mnist", n_train=32, shape=(28, 28, 1))
  b = next(ds.train_iterator(global_batch_size=32, seed=1, num_devices=1, augment=False, **ONE))
  raw = np.rint((b["image"] * 0.3530 + 0.2860) * 255).astype(int)
  for img, i in zip(raw, b["label"]):
    np.testing.assert_array_equal(img, ds.train.images[i])


def test_center_crop_box():
  assert data.center_crop_box(480, 640, 224, 256) == (110.0, 30.0, 530.0, 450.0)


def test_inception_crop_box_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = rng.integers(20, 500, 2)
    l, t, r, b = data.inception_crop_box(h, w, rng.random(43))
    assert 0 <= l < r <= w and 0 <= t < b <= h
  # No attempt fits a 10x1000 image: center crop clipped to aspect 4/3.
  assert data.inception_crop_box(10, 1000, np.full(43, 0.99)) == (493, 0, 506, 10)


# ----------------------------------------------------------------------------
# Order, determinism, resume, shards

def take(it, k):
  return [next(it) for _ in range(k)]


def test_epochs_are_permutations_and_reshuffle():
  ds = ids_dataset(n_train=70)
  it = ds.train_iterator(global_batch_size=16, seed=5, num_devices=1, **ONE)
  assert it.steps_per_epoch == 4
  epochs = [np.concatenate([b["label"] for b in take(it, 4)]) for _ in range(3)]
  for e in epochs:  # 64 distinct examples, 6 dropped
    assert len(set(e.tolist())) == 64
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert it.epoch == 3


def test_deterministic_for_seed():
  ds = ids_dataset()
  a, b, c = (take(ds.train_iterator(global_batch_size=8, seed=s, num_devices=1, **ONE), 10)
             for s in (1, 1, 2))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["label"], z["label"]) for x, z in zip(a, c))


def test_resume_continues_the_epoch():
  ds = ids_dataset()
  it = ds.train_iterator(global_batch_size=8, seed=0, num_devices=1, **ONE)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 5
  expected = take(it, 12)  # crosses into the next epochs (8 steps per epoch)
  resumed = ds.train_iterator(global_batch_size=8, seed=0, num_devices=1, **ONE)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 12)):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_set_state_rejects_other_iterator():
  ds = ids_dataset()
  state = ds.train_iterator(global_batch_size=8, seed=0, num_devices=1, **ONE).get_state()
  other = ds.train_iterator(global_batch_size=16, seed=0, num_devices=1, **ONE)
  with pytest.raises(ValueError, match="global_batch_size"):
    other.set_state(state)


def test_process_shards_are_disjoint_slices_of_the_global_batch():
  ds = ids_dataset()
  whole = take(ds.train_iterator(global_batch_size=16, seed=0, num_devices=1, **ONE), 6)
  parts = [take(ds.train_iterator(global_batch_size=16, seed=0, num_devices=1, process_index=p,
                                  process_count=2), 6) for p in range(2)]
  for step in range(6):
    a, b = parts[0][step], parts[1][step]
    assert not set(a["label"].tolist()) & set(b["label"].tolist())
    np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), whole[step]["image"])
    np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]), whole[step]["label"])


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_counts_every_example_once(process_count):
  ds = ids_dataset(n_test=103)
  per_process = [list(ds.eval_batches(global_batch_size=8, process_index=p, process_count=process_count))
                 for p in range(process_count)]
  assert {len(b) for b in per_process} == {13}
  ids, mask_total = [], 0.0
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (8 // process_count, 32, 32, 3)
      ids += b["label"][b["mask"] == 1].tolist()
      mask_total += b["mask"].sum()
      assert np.all(b["image"][b["mask"] == 0] == 0)
  assert sorted(ids) == list(range(103)) and mask_total == 103
  again = list(ds.eval_batches(global_batch_size=8, process_index=0, process_count=process_count))
  for x, y in zip(per_process[0], again):  # no randomness
    np.testing.assert_array_equal(x["image"], y["image"])


def test_batch_divisibility_errors():
  ds = ids_dataset()
  with pytest.raises(ValueError, match="global batch size 6 is not divisible by the number of devices 4"):
    ds.train_iterator(global_batch_size=6, seed=0, **ONE)  # conftest: 4 CPU devices
  with pytest.raises(ValueError, match="global batch size 4 is not divisible by the process count 3"):
    ds.train_iterator(global_batch_size=4, seed=0, process_index=0, process_count=3, num_devices=1)
  with pytest.raises(ValueError, match="global batch size 12 is not divisible by the number of devices 8"):
    list(ds.eval_batches(global_batch_size=12, num_devices=8, **ONE))
  with pytest.raises(ValueError, match=r"must be in \[1, 70\]"):
    ds.train_iterator(global_batch_size=128, seed=0, num_devices=1, **ONE)


def test_make_global_batch():
  assert jax.device_count() == 4
  ds = ids_dataset()
  local = next(ds.train_iterator(global_batch_size=8, seed=0))  # process index/count from jax
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  batch = data.make_global_batch(local, sharding)
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].sharding == sharding
  assert len(batch["label"].addressable_shards) == 4
  np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])


# ----------------------------------------------------------------------------
# Synthetic

def test_synthetic_defaults_and_options():
  ds = data.get_dataset("synthetic")
  assert ds.info == data.DatasetInfo("synthetic", 10, (32, 32, 3), 50_000, 10_000)
  big = data.get_dataset("synthetic", image_shape=(224, 224, 3), num_classes=1000, num_train=64, num_test=8)
  assert big.info == data.DatasetInfo("synthetic", 1000, (224, 224, 3), 64, 8)
  b = next(big.train_iterator(global_batch_size=8, seed=0, num_devices=1, **ONE))
  assert b["image"].shape == (8, 224, 224, 3) and 0 <= b["label"].min() and b["label"].max() < 1000
  images, labels = big.train.take(np.arange(64))
  again, _ = big.train.take(np.arange(64))
  np.testing.assert_array_equal(images, again)  # an example is a function of its index
  assert len({im.tobytes() for im in images}) == 64 and len(set(labels.tolist())) > 30


def test_options_rejected_for_fixed_datasets(tmp_path):
  write_fashion(tmp_path)
  with pytest.raises(ValueError, match="has 10 classes, not 100"):
    data.get_dataset("fashion_mnist", data_dir=str(tmp_path), num_classes=100)
  with pytest.raises(ValueError, match="image_shape"):
    data.get_dataset("fashion_mnist", data_dir=str(tmp_path), image_shape=(32, 32, 3))
