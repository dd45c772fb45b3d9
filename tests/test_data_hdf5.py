"""Tests of the streamed HDF5 source against the arrays written to the file.

Feature column 0 holds each row's index in the file, so the order and split
membership of delivered examples can be read off the batches.
"""

import h5py
import numpy as np
import pytest

from tfcapacity import config
from tfcapacity import data as data_lib
from tfcapacity.data import base
from tfcapacity.data import hdf5
from tfcapacity.errors import UserError


def make_arrays(n, dim=5, num_classes=10, sort_by_class=False, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim)).astype(np.float32)
  y = rng.integers(0, num_classes, size=n)
  if sort_by_class:
    y = np.sort(y)
  x[:, 0] = np.arange(n)
  return x, y


def write(path, x, y, chunks=None, prefix="", mode="w", **attrs):
  with h5py.File(path, mode) as f:
    f.create_dataset(prefix + "features", data=x, chunks=chunks)
    f.create_dataset(prefix + "labels", data=y)
    f.attrs.update(attrs)
  return str(path)


def collect(ds):
  xs, ys = [], []
  for x, y in ds.as_numpy_iterator():
    xs.append(x)
    ys.append(y)
  return np.concatenate(xs), np.concatenate(ys)


def row_ids(x):
  return x[:, 0].astype(np.int64)


class ReadLog:
  """Records the number of rows of every read of a dataset named `name`."""

  def __init__(self, monkeypatch, name="/features"):
    self.rows = []
    original = h5py.Dataset.__getitem__

    def getitem(dset, key):
      out = original(dset, key)
      if dset.name == name:
        self.rows.append(len(out) if np.ndim(out) else 1)
      return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)


@pytest.fixture
def small_blocks(monkeypatch):
  """Blocks of one chunk (or 64 rows), so that small files have several."""
  monkeypatch.setattr(hdf5, "BLOCK_ROWS", 64)


def test_unshuffled_batches_equal_the_file(tmp_path, small_blocks):
  x, y = make_arrays(103)
  path = write(tmp_path / "d.h5", x, y, chunks=(16, 5))
  ds = data_lib.get(f"hdf5:{path}", "train", config.make())
  assert ds.info == base.DatasetInfo(f"hdf5:{path}", "train",
                                     int(y.max()) + 1, (5,), 103)
  got_x, got_y = collect(ds.batches(10))
  np.testing.assert_array_equal(got_x, x)
  np.testing.assert_array_equal(got_y, y)

  batches = list(ds.batches(10, pad=True).as_numpy_iterator())
  assert len(batches) == 11
  bx, by, bw = batches[-1]
  assert bx.shape == (10, 5) and bw.tolist() == [1] * 3 + [0] * 7
  np.testing.assert_array_equal(bx[:3], x[100:])
  np.testing.assert_array_equal(bx[3:], 0)

  dropped = ds.batches(10, drop_remainder=True)
  assert dropped.element_spec[0].shape.as_list() == [10, 5]
  assert sum(1 for _ in dropped) == 10


def test_integer_images_are_used_as_stored(tmp_path, monkeypatch):
  x = np.random.default_rng(0).integers(0, 256, (70, 4, 4, 1), np.uint8)
  y = np.arange(70) % 2
  path = write(tmp_path / "img.h5", x, y, chunks=(8, 4, 4, 1))
  log = ReadLog(monkeypatch)
  ds = hdf5.load(path, "train", config.make())
  assert not log.rows  # integer features need no finiteness scan
  assert ds.info.input_shape == (4, 4, 1) and ds.info.num_classes == 2
  got_x, got_y = collect(ds.batches(32))
  assert got_x.dtype == np.float32
  np.testing.assert_array_equal(got_x, x.astype(np.float32))
  np.testing.assert_array_equal(got_y, y)


def test_shuffle_is_a_permutation_fixed_by_seed_and_epoch(tmp_path,
                                                          small_blocks):
  x, y = make_arrays(1000)
  path = write(tmp_path / "d.h5", x, y, chunks=(64, 5))
  ds = hdf5.load(path, "train", config.make(shuffle_buffer=200))
  assert ds.block_rows == 64

  def order(seed, epoch):
    got_x, got_y = collect(ds.batches(32, shuffle=True, seed=seed,
                                      epoch=epoch))
    ids = row_ids(got_x)
    np.testing.assert_array_equal(got_y, y[ids])  # rows stay whole
    np.testing.assert_array_equal(got_x, x[ids])
    return ids

  first = order(1, 0)
  np.testing.assert_array_equal(np.sort(first), np.arange(1000))
  np.testing.assert_array_equal(order(1, 0), first)
  assert not np.array_equal(order(1, 1), first)
  assert not np.array_equal(order(2, 0), first)
  # Blocks are visited in a random order and mixed within windows.
  assert not np.array_equal(first, np.arange(1000))
  assert len(np.unique(first[:200] // ds.block_rows)) > 1
  assert np.mean(np.diff(first) == 1) < 0.1


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_start_batch_gives_the_tail_of_the_epoch(tmp_path, small_blocks,
                                                 shuffle, drop_remainder):
  x, y = make_arrays(250)
  path = write(tmp_path / "d.h5", x, y, chunks=(32, 5))
  ds = hdf5.load(path, "train", config.make(shuffle_buffer=50))
  kwargs = dict(shuffle=shuffle, seed=3, epoch=2,
                drop_remainder=drop_remainder)
  full = [b for b in ds.batches(16, **kwargs).as_numpy_iterator()]
  tail = [b for b in ds.batches(16, start_batch=5, **kwargs)
          .as_numpy_iterator()]
  assert len(full) == (15 if drop_remainder else 16)
  assert len(tail) == len(full) - 5
  for (fx, fy), (tx, ty) in zip(full[5:], tail):
    np.testing.assert_array_equal(fx, tx)
    np.testing.assert_array_equal(fy, ty)


def test_start_batch_skips_reading(tmp_path, monkeypatch, small_blocks):
  x, y = make_arrays(4000)
  path = write(tmp_path / "d.h5", x, y, chunks=(100, 5))
  ds = hdf5.load(path, "train", config.make(shuffle_buffer=500))
  log = ReadLog(monkeypatch)
  got_x, _ = collect(ds.batches(100, shuffle=True, seed=0, start_batch=35))
  assert len(got_x) == 500
  assert sum(log.rows) <= 1000  # the last window or so, not the epoch


@pytest.mark.parametrize("chunks", [(500, 40), None])
def test_reads_are_bounded_by_the_block(tmp_path, monkeypatch, chunks):
  x, y = make_arrays(20000, dim=40)
  path = write(tmp_path / "big.h5", x, y, chunks=chunks)
  ds = hdf5.load(path, "train", config.make(shuffle_buffer=5000))
  assert ds.block_rows == (4000 if chunks else hdf5.BLOCK_ROWS)
  log = ReadLog(monkeypatch)
  for shuffle in (False, True):
    log.rows.clear()
    got_x, got_y = collect(ds.batches(256, shuffle=shuffle, seed=5))
    ids = row_ids(got_x)
    np.testing.assert_array_equal(np.sort(ids), np.arange(20000))
    np.testing.assert_array_equal(got_x, x[ids])
    np.testing.assert_array_equal(got_y, y[ids])
    assert log.rows and max(log.rows) <= ds.block_rows < 20000
    assert sum(log.rows) == 20000  # each row read once per epoch


def test_load_reads_the_file_once(tmp_path, monkeypatch):
  x, y = make_arrays(9000, dim=40)
  path = write(tmp_path / "d.h5", x, y, chunks=(1000, 40))
  log = ReadLog(monkeypatch)
  cfg = config.make(holdout_fraction=0.1, standardize=True)
  hdf5.load(path, "train", cfg)
  hdf5.load(path, "test", cfg)
  assert sum(log.rows) == 9000 and max(log.rows) <= 4000


def test_group_layout(tmp_path):
  x, y = make_arrays(60, num_classes=8)
  tx, ty = make_arrays(30, num_classes=8, seed=1)
  ty[4] = 9
  path = write(tmp_path / "g.h5", x, y, prefix="train/")
  write(path, tx, ty, prefix="test/", mode="a")
  cfg = config.make()
  train = hdf5.load(path, "train", cfg)
  test = hdf5.load(path, "test", cfg)
  np.testing.assert_array_equal(collect(train.batches(7))[0], x)
  got_x, got_y = collect(test.batches(7))
  np.testing.assert_array_equal(got_x, tx)
  np.testing.assert_array_equal(got_y, ty)
  assert train.info.num_classes == test.info.num_classes == 10
  assert (train.info.num_examples, test.info.num_examples) == (60, 30)


def test_test_dataset_file(tmp_path):
  x, y = make_arrays(40)
  tx, ty = make_arrays(25, seed=2)
  path = write(tmp_path / "train.h5", x, y)
  test_path = write(tmp_path / "test.h5", tx, ty)
  for flag in (test_path, f"hdf5:{test_path}"):
    cfg = config.make(test_dataset=flag)
    got_x, got_y = collect(hdf5.load(path, "test", cfg).batches(8))
    np.testing.assert_array_equal(got_x, tx)
    np.testing.assert_array_equal(got_y, ty)
    np.testing.assert_array_equal(
        collect(hdf5.load(path, "train", cfg).batches(8))[0], x)


def test_holdout_is_a_fixed_random_subset(tmp_path, small_blocks):
  x, y = make_arrays(1000, sort_by_class=True)
  path = write(tmp_path / "sorted.h5", x, y, chunks=(100, 5))

  def split_ids(split, **flags):
    ds = hdf5.load(path, split, config.make(holdout_fraction=0.25, **flags))
    got_x, got_y = collect(ds.batches(64))
    ids = row_ids(got_x)
    np.testing.assert_array_equal(got_y, y[ids])
    assert ds.info.num_examples == len(ids)
    return ids

  train, test = split_ids("train"), split_ids("test")
  assert len(test) == 250 and len(train) == 750
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.r_[train, test]), np.arange(1000))
  np.testing.assert_array_equal(train, np.sort(train))  # file order
  assert len(np.unique(y[test])) == 10  # not the last (sorted) rows
  np.testing.assert_array_equal(split_ids("test", seed=7), test)
  assert not np.array_equal(split_ids("test", data_seed=1), test)

  ds = hdf5.load(path, "train", config.make(holdout_fraction=0.25,
                                            shuffle_buffer=100))
  got = row_ids(collect(ds.batches(64, shuffle=True, seed=1))[0])
  np.testing.assert_array_equal(np.sort(got), train)


def test_flat_file_serves_both_splits(tmp_path):
  x, y = make_arrays(30)
  path = write(tmp_path / "flat.h5", x, y)
  for split in ("train", "test"):
    got_x, got_y = collect(hdf5.load(path, split, config.make()).batches(8))
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)


def test_standardize_with_train_statistics(tmp_path):
  rng = np.random.default_rng(0)
  x = (1000.0 + 5.0 * rng.normal(size=(600, 6)) * np.arange(1, 7)).astype(
      np.float32)
  x[:, 5] = 3.0  # a constant feature
  y = np.arange(600) % 3
  path = write(tmp_path / "d.h5", x, y, chunks=(64, 6))
  cfg = config.make(holdout_fraction=0.3, standardize=True)
  train = hdf5.load(path, "train", cfg)
  test = hdf5.load(path, "test", cfg)
  mask = hdf5.holdout_mask(600, 0.3, 0)
  x64 = x.astype(np.float64)
  mean, std = x64[~mask].mean(0), x64[~mask].std(0)
  np.testing.assert_allclose(train.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(train.std[:5], std[:5], rtol=1e-9)
  assert train.std[5] == 1.0 and test.mean is not None
  std[5] = 1.0
  got_test = collect(test.batches(50))[0]
  np.testing.assert_allclose(got_test, (x64[mask] - mean) / std, atol=1e-4)
  got_train = collect(train.batches(50))[0]
  np.testing.assert_allclose(got_train.mean(0)[:5], 0, atol=1e-4)
  np.testing.assert_allclose(got_train.std(0)[:5], 1, atol=1e-4)
  ex, _ = test.examples([3, 0])
  np.testing.assert_allclose(ex, got_test[[3, 0]], atol=1e-6)


def test_standardize_groups_uses_the_train_group(tmp_path):
  x, y = make_arrays(80)
  tx, ty = make_arrays(20, seed=3)
  tx += 50.0
  path = write(tmp_path / "g.h5", x, y, prefix="train/")
  write(path, tx, ty, prefix="test/", mode="a")
  test = hdf5.load(path, "test", config.make(standardize=True))
  x64 = x.astype(np.float64)
  expect = (tx - x64.mean(0)) / x64.std(0)
  np.testing.assert_allclose(collect(test.batches(8))[0], expect, rtol=1e-5,
                             atol=1e-4)


def test_num_classes_attribute(tmp_path):
  x, y = make_arrays(20, num_classes=3)
  path = write(tmp_path / "root.h5", x, y, num_classes=12)
  assert hdf5.load(path, "train", config.make()).info.num_classes == 12
  path = write(tmp_path / "labels.h5", x, y)
  with h5py.File(path, "a") as f:
    f["labels"].attrs["num_classes"] = 7
  assert hdf5.load(path, "test", config.make()).info.num_classes == 7


def test_train_subset_and_label_transforms(tmp_path):
  x, y = make_arrays(200, num_classes=4)
  path = write(tmp_path / "d.h5", x, y, chunks=(32, 5))
  cfg = config.make(train_subset=50, random_labels=True, seed=4)
  train = hdf5.load(path, "train", cfg)
  assert train.info.num_examples == 50
  expect = base.LabelTransform(50, 4, random_labels=True, seed=4).numpy(
      np.arange(50), y[:50])
  assert not np.array_equal(expect, y[:50])
  for epoch in (0, 1):
    got_x, got_y = collect(train.batches(16, shuffle=True, seed=1,
                                         epoch=epoch))
    ids = row_ids(got_x)
    np.testing.assert_array_equal(np.sort(ids), np.arange(50))
    np.testing.assert_array_equal(got_y, expect[ids])
  test = hdf5.load(path, "test", cfg)
  assert test.info.num_examples == 200
  np.testing.assert_array_equal(collect(test.batches(64))[1], y)

  noisy = hdf5.load(path, "train", config.make(label_noise=0.5, seed=2))
  expect = base.LabelTransform(200, 4, label_noise=0.5, seed=2).numpy(
      np.arange(200), y)
  np.testing.assert_array_equal(collect(noisy.batches(64))[1], expect)


def test_examples_by_index(tmp_path, small_blocks):
  x, y = make_arrays(500)
  path = write(tmp_path / "d.h5", x, y, chunks=(40, 5))
  cfg = config.make(holdout_fraction=0.5)
  test = hdf5.load(path, "test", cfg)
  rows = np.flatnonzero(hdf5.holdout_mask(500, 0.5, 0))
  idx = np.array([200, 3, 3, 0, 249, 120])
  ex, ey = test.examples(idx)
  np.testing.assert_array_equal(ex, x[rows[idx]])
  np.testing.assert_array_equal(ey, y[rows[idx]])
  with pytest.raises(IndexError):
    test.examples([250])


def _bad_files(tmp_path):
  """(name, path, flag overrides, expected message parts) of bad inputs."""
  x, y = make_arrays(300, num_classes=3)
  cases = []

  def add(name, xs, ys, needles, chunks=None, **flags):
    path = write(tmp_path / f"{name}.h5", xs, ys, chunks=chunks)
    cases.append((path, flags, needles))
    return path

  cases.append((str(tmp_path / "absent.h5"), {},
                ["not found", "absent.h5"]))
  add("names", x, y, ["no dataset 'feats'", "features, labels",
                      "--hdf5_features"], hdf5_features="feats")
  add("length", x, y[:-1], ["300 feature rows but 299 labels"])
  add("float_labels", x, y + 0.5, ["must be integers"])
  add("negative", x, y - 1, ["must be >= 0", "-1"])
  add("onehot", x, np.eye(3)[y], ["shape [examples]", "one-hot"])
  path = add("attr", x, y, ["must lie in [0, 2)", "num_classes attribute"])
  with h5py.File(path, "a") as f:
    f.attrs["num_classes"] = 2
  nan = x.copy()
  nan[257, 2] = np.nan
  add("nan", nan, y, ["NaN or Inf", "row 257"], chunks=(64, 5))
  inf = x.copy()
  inf[3, 1] = -np.inf
  add("inf", inf, y, ["NaN or Inf", "row 3"])
  add("flat_features", x[:, 0], y, ["rank >= 2", "(300,)"])
  add("strings", np.array([b"a"] * 300), y, ["numeric array"])
  add("subset", x, y, ["--train_subset=301 exceeds the 300"],
      train_subset=301)
  add("holdout_tiny", x, y, ["holds out 0 of 300"], holdout_fraction=0.001)
  add("missing_test", x, y, ["not found", "nowhere.h5", "--test_dataset"],
      test_dataset=f"hdf5:{tmp_path / 'nowhere.h5'}")
  add("both_tests", x, y, ["drop one of them"], holdout_fraction=0.5,
      test_dataset=cases[-1][0])
  path = write(tmp_path / "groups.h5", x, y, prefix="train/")
  write(path, x, y, prefix="test/", mode="a")
  cases.append((path, {"holdout_fraction": 0.2},
                ["train/ and test/ groups", "drop --holdout_fraction"]))
  path = write(tmp_path / "half_groups.h5", x, y, prefix="train/")
  write(path, x, y, prefix="test/", mode="a")
  with h5py.File(path, "a") as f:
    del f["test/labels"]
  cases.append((path, {}, ["no dataset 'test/labels'",
                           "train/features"]))
  (tmp_path / "text.h5").write_text("not hdf5")
  cases.append((str(tmp_path / "text.h5"), {}, ["not a readable HDF5"]))
  return cases


def test_bad_inputs_raise_one_line_user_errors(tmp_path):
  for path, flags, needles in _bad_files(tmp_path):
    with pytest.raises(UserError) as e:
      data_lib.get(f"hdf5:{path}", "train", config.make(**flags))
    message = str(e.value)
    assert "\n" not in message, message
    for needle in needles:
      assert needle in message, (needle, message)
