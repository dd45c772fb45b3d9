"""Tests of the TFDS source on mocked cifar10/mnist (offline, random images).

`tfds.testing.mock_data` yields the same deterministic random examples on
every read, so batches can be compared with the raw examples in numpy.
"""

import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfcapacity import config
from tfcapacity import data as data_lib
from tfcapacity.data import base
from tfcapacity.data import tfds_source
from tfcapacity.errors import UserError

N = 96


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=N,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def raw(name="cifar10", split="train"):
  """The stored examples as numpy (uint8 images, int64 labels)."""
  ds = tfds.builder(name).as_dataset(split=split, as_supervised=True,
                                     shuffle_files=False)
  images, labels = zip(*ds.as_numpy_iterator())
  return np.stack(images), np.array(labels)


def collect(ds):
  xs, ys = zip(*ds.as_numpy_iterator())
  return np.concatenate(xs), np.concatenate(ys)


def storage_index(images, reference):
  """Index in `reference` of each of `images` (all images are distinct)."""
  where = {r.tobytes(): i for i, r in enumerate(reference)}
  assert len(where) == len(reference)
  return np.array([where[x.tobytes()] for x in images])


def test_info_and_batches_equal_the_stored_images(mock_tfds):
  ds = data_lib.get("tfds:cifar10", "train", config.make())
  assert ds.info == base.DatasetInfo("tfds:cifar10", "train", 10,
                                     (32, 32, 3), N)
  images, labels = raw()
  x, y = collect(ds.batches(40))
  assert x.dtype == np.float32 and y.dtype == np.int64
  assert x.shape == (N, 32, 32, 3) and 0 <= x.min() and x.max() <= 1
  np.testing.assert_allclose(x, images / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y, labels)

  padded = list(ds.batches(40, pad=True).as_numpy_iterator())
  assert [b[0].shape[0] for b in padded] == [40, 40, 40]
  assert padded[-1][2].sum() == N - 80
  dropped = ds.batches(40, drop_remainder=True)
  assert dropped.element_spec[0].shape.as_list() == [40, 32, 32, 3]

  ex, ey = ds.examples([7, 2, 7])
  np.testing.assert_allclose(ex, images[[7, 2, 7]] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(ey, labels[[7, 2, 7]])


def test_mnist_info(mock_tfds):
  ds = tfds_source.load("mnist", "test", config.make())
  assert ds.info == base.DatasetInfo("tfds:mnist", "test", 10, (28, 28, 1), N)
  x, _ = next(ds.batches(8).as_numpy_iterator())
  assert x.shape == (8, 28, 28, 1)


def test_test_split_falls_back_to_validation():
  def fake(*splits):
    return types.SimpleNamespace(
        info=types.SimpleNamespace(splits={s: None for s in splits}))

  assert tfds_source._split_name(fake("train", "validation"), "in", "test"
                                 ) == "validation"
  assert tfds_source._split_name(fake("train", "test", "validation"), "c",
                                 "test") == "test"
  assert tfds_source._split_name(fake(), "mocked", "test") == "test"
  with pytest.raises(UserError, match="no test or validation split"):
    tfds_source._split_name(fake("train"), "x", "test")


def test_shuffle_is_stateless_and_start_batch_skips(mock_tfds):
  ds = tfds_source.load("cifar10", "train", config.make(shuffle_buffer=40))
  images = raw()[0] / np.float32(255.0)

  def order(seed, epoch, **kwargs):
    x, _ = collect(ds.batches(16, shuffle=True, seed=seed, epoch=epoch,
                              **kwargs))
    return storage_index(x, images.astype(np.float32))

  first = order(1, 0)
  np.testing.assert_array_equal(np.sort(first), np.arange(N))
  assert not np.array_equal(first, np.arange(N))
  # Windows of 40 examples: each window's examples stay in it.
  assert set(first[:40]) == set(range(40))
  tf.random.set_seed(1234)  # TF's global seed must not matter
  np.testing.assert_array_equal(order(1, 0), first)
  assert not np.array_equal(order(1, 1), first)
  assert not np.array_equal(order(2, 0), first)
  np.testing.assert_array_equal(order(1, 0, start_batch=2), first[32:])


def test_augmentation_crops_and_flips_reproducibly(mock_tfds):
  cfg = config.make(augment=True)
  train = tfds_source.load("cifar10", "train", cfg)
  assert train.augment
  assert not tfds_source.load("cifar10", "test", cfg).augment
  images = raw()[0] / np.float32(255.0)
  x, _ = collect(train.batches(32, seed=3, epoch=1))
  assert x.shape == images.shape and x.dtype == np.float32
  assert np.mean([np.array_equal(a, b) for a, b in zip(x, images)]) < 0.2
  np.testing.assert_array_equal(collect(train.batches(32, seed=3, epoch=1))[0],
                                x)
  assert not np.array_equal(collect(train.batches(32, seed=3, epoch=2))[0], x)
  # Shuffling does not change an example's augmentation (keyed by index).
  shuffled, _ = collect(train.batches(32, shuffle=True, seed=3, epoch=1))
  np.testing.assert_array_equal(np.sort(shuffled.reshape(N, -1), 0),
                                np.sort(x.reshape(N, -1), 0))

  padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])
  for i in range(8):
    candidates = [padded[i, dy:dy + 32, dx:dx + 32]
                  for dy in range(9) for dx in range(9)]
    candidates += [c[:, ::-1] for c in candidates]
    assert any(np.allclose(x[i], c, atol=1e-6) for c in candidates), i


def test_channel_normalize_uses_train_statistics(mock_tfds):
  cfg = config.make(channel_normalize=True)
  train = tfds_source.load("cifar10", "train", cfg)
  images = raw()[0].astype(np.float64) / 255.0
  np.testing.assert_allclose(train.mean, images.mean((0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(train.std, images.std((0, 1, 2)), rtol=1e-6)
  x, _ = collect(train.batches(64))
  np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=1e-4)
  test = tfds_source.load("cifar10", "test", cfg)
  np.testing.assert_array_equal(test.mean, train.mean)


def test_random_labels_fixed_by_index_and_train_subset(mock_tfds):
  cfg = config.make(random_labels=True, seed=5, train_subset=64,
                    shuffle_buffer=30)
  train = tfds_source.load("cifar10", "train", cfg)
  assert train.info.num_examples == 64
  images, labels = raw()
  expect = base.LabelTransform(64, 10, random_labels=True, seed=5).numpy(
      np.arange(64), labels[:64])
  assert not np.array_equal(expect, labels[:64])
  for epoch in (0, 1):
    x, y = collect(train.batches(16, shuffle=True, seed=0, epoch=epoch))
    idx = storage_index(x, (images / np.float32(255.0)).astype(np.float32))
    np.testing.assert_array_equal(np.sort(idx), np.arange(64))
    np.testing.assert_array_equal(y, expect[idx])
  test = tfds_source.load("cifar10", "test", cfg)
  assert test.info.num_examples == N
  np.testing.assert_array_equal(collect(test.batches(50))[1], labels)


def test_bad_inputs_raise_one_line_user_errors(tmp_path, monkeypatch):
  cases = [("cifarr10", {}, ["unknown tensorflow-datasets", "cifar10"]),
           ("imagenet2012", {}, ["variable size", "imagenet_resized/32x32"]),
           ("imdb_reviews", {}, ["not an (image, label)"])]

  def unreachable(self, *args, **kwargs):
    raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'\nmore")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      unreachable)
  cases.append(("cifar10", {"data_dir": str(tmp_path)},
                ["not prepared", str(tmp_path), "ConnectionError",
                 "--data_dir", "--manual_dir"]))
  for name, flags, needles in cases:
    with pytest.raises(UserError) as e:
      data_lib.get(f"tfds:{name}", "train", config.make(**flags))
    message = str(e.value)
    assert "\n" not in message, message
    for needle in needles:
      assert needle in message, (needle, message)


def test_train_subset_too_large(mock_tfds):
  with pytest.raises(UserError, match=f"exceeds the {N} training examples"):
    tfds_source.load("cifar10", "train", config.make(train_subset=N + 1))
