"""In-memory sources (digits, mnist1d, synthetic) and the ArrayDataset contract.

Expected values are recomputed with numpy / scikit-learn / the mnist1d
package directly, so the tests check numbers, not just that calls succeed.
"""

import logging
import os
import random

import mnist1d.data as mnist1d_data
import mnist1d.utils as mnist1d_utils
import numpy as np
import pytest
from sklearn import datasets as sk_datasets
from sklearn import linear_model

from tfcapacity import data
from tfcapacity.data import arrays
from tfcapacity.data import base
from tfcapacity.data import mnist1d
from tfcapacity.data import synthetic
from tfcapacity.errors import UserError

DIGITS_TOTAL = 1797
M1D = 500  # mnist1d examples in these tests: 400 train, 100 test.


@pytest.fixture
def cfg(tiny_cfg, tmp_path):
  """Small data flags; mnist1d caches into the test's own directory."""
  return tiny_cfg.replace(mnist1d_examples=M1D,
                          cache_dir=str(tmp_path / "cache"),
                          synthetic_examples=300, synthetic_test_examples=100,
                          synthetic_dim=8, synthetic_classes=4)


@pytest.fixture
def count_make_dataset(monkeypatch):
  """Counts calls of mnist1d's generator (which still runs for real)."""
  calls = []
  real = mnist1d_data.make_dataset

  def counting(args, *a, **kw):
    calls.append(dict(vars(args)))
    return real(args, *a, **kw)

  monkeypatch.setattr(mnist1d_data, "make_dataset", counting)
  return calls


def collect(ds):
  """All elements of a tf.data pipeline, concatenated per component."""
  parts = list(ds.as_numpy_iterator())
  return tuple(np.concatenate([p[i] for p in parts])
               for i in range(len(parts[0])))


def package_mnist1d(n, test_fraction, seed):
  """mnist1d's own output for these arguments, global state preserved."""
  args = mnist1d_data.get_dataset_args(as_dict=True)
  args.update(num_samples=n, train_split=1 - test_fraction, seed=seed)
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    return mnist1d_data.make_dataset(mnist1d_utils.ObjectView(args))
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)


# ---------------------------------------------------------------- all sources

EXPECTED = {  # name -> (num_classes, flat input shape, train, test)
    "digits": (10, (64,), 1437, 360),
    "mnist1d": (10, (40,), 400, 100),
    "synthetic": (4, (8,), 300, 100),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_source_info_and_values(name, cfg):
  classes, shape, n_train, n_test = EXPECTED[name]
  for split, n in (("train", n_train), ("test", n_test)):
    ds = data.get(name, split, cfg)
    assert ds.info == base.DatasetInfo(name, split, classes, shape, n)
    assert ds.x.shape == (n,) + shape and ds.x.dtype == np.float32
    assert ds.y.shape == (n,) and ds.y.dtype == np.int64
    assert np.all(np.isfinite(ds.x))
    assert set(np.unique(ds.y)) == set(range(classes))
    x, y = collect(ds.batches(64))
    np.testing.assert_array_equal(x, ds.x)
    np.testing.assert_array_equal(y, ds.y)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_train_subset_is_a_prefix(name, cfg):
  full = data.get(name, "train", cfg)
  sub = data.get(name, "train", cfg, train_subset=37)
  assert sub.info.num_examples == 37
  np.testing.assert_array_equal(sub.x, full.x[:37])
  np.testing.assert_array_equal(sub.y, full.y[:37])
  n_test = EXPECTED[name][3]
  assert data.get(name, "test", cfg,
                  train_subset=37).info.num_examples == n_test
  too_many = EXPECTED[name][2] + 1
  with pytest.raises(UserError, match=rf"{too_many}.*{too_many - 1}"):
    data.get(name, "train", cfg, train_subset=too_many)


def test_unknown_dataset_lists_choices(cfg):
  with pytest.raises(UserError) as e:
    data.get("cifar", "train", cfg)
  for choice in ("digits", "mnist1d", "synthetic", "hdf5:", "tfds:"):
    assert choice in str(e.value)
  assert "cifar" in str(e.value)
  with pytest.raises(UserError, match="validation"):
    data.get("digits", "validation", cfg)


# --------------------------------------------------------------------- digits

def test_digits_split_is_fixed_stratified_and_complete(cfg):
  bunch = sk_datasets.load_digits()
  train = data.get("digits", "train", cfg)
  test = data.get("digits", "test", cfg)
  assert train.info.num_examples + test.info.num_examples == DIGITS_TOTAL
  # Stratified: each class's test count is 20% of the class, to 1 example.
  per_class = np.bincount(bunch.target, minlength=10)
  test_counts = np.bincount(test.y, minlength=10)
  assert np.all(np.abs(test_counts - 0.2 * per_class) <= 1), test_counts
  np.testing.assert_array_equal(
      np.bincount(train.y, minlength=10) + test_counts, per_class)
  # Every example appears exactly once, scaled from 0..16 into [0, 1].
  ours = np.concatenate([np.c_[train.x, train.y], np.c_[test.x, test.y]])
  ref = np.c_[bunch.data / 16.0, bunch.target].astype(np.float32)
  np.testing.assert_array_equal(np.unique(ours, axis=0),
                                np.unique(ref, axis=0))
  assert train.x.min() == 0.0 and train.x.max() == 1.0
  # The split ignores --seed and --data_seed.
  other = data.get("digits", "test", cfg, seed=7, data_seed=7)
  np.testing.assert_array_equal(other.x, test.x)
  np.testing.assert_array_equal(other.y, test.y)


@pytest.mark.parametrize("fmt,model,shape", [
    ("flat", "mlp", (64,)), ("image", "mlp", (8, 8, 1)),
    ("auto", "mlp", (64,)), ("auto", "fc_resnet", (64,)),
    ("auto", "resnet", (8, 8, 1)), ("flat", "resnet", (64,)),
])
def test_digits_input_format(cfg, fmt, model, shape):
  ds = data.get("digits", "train", cfg, input_format=fmt, model=model)
  assert ds.info.input_shape == shape and ds.x.shape[1:] == shape
  flat = data.get("digits", "train", cfg, input_format="flat")
  np.testing.assert_array_equal(ds.x.reshape(len(ds.x), 64), flat.x)
  if shape == (8, 8, 1):
    # Row-major 8x8 images: pixel (r, c) is feature 8r + c.
    np.testing.assert_array_equal(ds.x[:, 2, 5, 0], flat.x[:, 2 * 8 + 5])


# ------------------------------------------------------------------- mnist1d

def test_mnist1d_matches_package_with_train_statistics(cfg):
  train = data.get("mnist1d", "train", cfg)
  test = data.get("mnist1d", "test", cfg)
  ref = package_mnist1d(M1D, 0.2, 0)
  np.testing.assert_array_equal(train.y, ref["y"])
  np.testing.assert_array_equal(test.y, ref["y_test"])
  mean, std = ref["x"].mean(), ref["x"].std()
  np.testing.assert_allclose(train.x, (ref["x"] - mean) / std, atol=1e-5)
  np.testing.assert_allclose(test.x, (ref["x_test"] - mean) / std,
                             atol=1e-5)
  # Train statistics are exactly standard; the package's joint ones are not.
  assert abs(train.x.astype(np.float64).mean()) < 1e-6
  assert abs(train.x.astype(np.float64).std() - 1) < 1e-5
  assert abs(ref["x"].mean()) > 1e-4 or abs(ref["x"].std() - 1) > 1e-4
  assert not np.allclose(train.x, ref["x"], atol=1e-5)


def test_mnist1d_arguments(cfg, count_make_dataset):
  ds = data.get("mnist1d", "test", cfg, mnist1d_test_fraction=0.3,
                data_seed=3)
  (args,) = count_make_dataset
  defaults = mnist1d_data.get_dataset_args(as_dict=True)
  assert args["num_samples"] == M1D and args["seed"] == 3
  assert args["train_split"] == pytest.approx(0.7)
  for key in ("template_len", "padding", "scale_coeff", "max_translation",
              "corr_noise_scale", "iid_noise_scale", "shear_scale",
              "shuffle_seq", "final_seq_length"):
    assert args[key] == defaults[key], key
  assert ds.info.num_examples == 150


def test_mnist1d_generated_once_and_cached_by_arguments(cfg, caplog,
                                                        count_make_dataset):
  caplog.set_level(logging.INFO, logger="absl")
  cache = cfg.cache_dir
  first = data.get("mnist1d", "train", cfg)
  assert len(count_make_dataset) == 1
  generating = [r for r in caplog.records if "Generating MNIST-1D" in
                r.getMessage()]
  assert len(generating) == 1 and cache in generating[0].getMessage()
  files = sorted(os.listdir(cache))
  assert len(files) == 1 and files[0].startswith("mnist1d-")
  assert files[0].endswith(".npz")
  again = data.get("mnist1d", "train", cfg)
  data.get("mnist1d", "test", cfg)
  data.get("mnist1d", "train", cfg, seed=5, random_labels=True)
  assert len(count_make_dataset) == 1
  np.testing.assert_array_equal(again.x, first.x)
  np.testing.assert_array_equal(again.y, first.y)
  # Any generation argument changes the key.
  smaller = data.get("mnist1d", "train", cfg, mnist1d_examples=300)
  assert len(count_make_dataset) == 2 and smaller.info.num_examples == 240
  other_seed = data.get("mnist1d", "train", cfg, data_seed=1)
  assert len(count_make_dataset) == 3
  assert not np.array_equal(other_seed.x, first.x)
  data.get("mnist1d", "train", cfg, mnist1d_test_fraction=0.5)
  assert len(count_make_dataset) == 4
  assert len(os.listdir(cache)) == 4  # and no temporary files left


def test_mnist1d_cache_location(cfg, tmp_path, monkeypatch, count_make_dataset):
  monkeypatch.setenv("TFCAPACITY_CACHE", str(tmp_path / "env"))
  data.get("mnist1d", "train", cfg, cache_dir=None)
  assert len(os.listdir(tmp_path / "env")) == 1
  monkeypatch.delenv("TFCAPACITY_CACHE")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert mnist1d.cache_dir(cfg.replace(cache_dir=None)) == str(
      tmp_path / "home" / ".cache" / "tfcapacity")
  assert mnist1d.cache_dir(cfg) == cfg.cache_dir


def test_mnist1d_leaves_global_random_state_alone(cfg, count_make_dataset):
  np.random.seed(123)
  random.seed(123)
  expected = (np.random.random(3), random.random())
  np.random.seed(123)
  random.seed(123)
  data.get("mnist1d", "train", cfg)
  assert len(count_make_dataset) == 1  # it really generated
  np.testing.assert_array_equal(np.random.random(3), expected[0])
  assert random.random() == expected[1]


def test_mnist1d_failed_write_leaves_no_file(cfg, monkeypatch,
                                             count_make_dataset):
  real_savez = np.savez

  def savez_then_fail(f, **kw):
    real_savez(f, **kw)
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", savez_then_fail)
  ds = data.get("mnist1d", "train", cfg)
  assert ds.info.num_examples == 400  # data still served from memory
  assert os.listdir(cfg.cache_dir) == []
  monkeypatch.setattr(np, "savez", real_savez)
  data.get("mnist1d", "train", cfg)
  assert len(count_make_dataset) == 2
  (path,) = [os.path.join(cfg.cache_dir, f) for f in os.listdir(cfg.cache_dir)]
  # A damaged cache file is regenerated and replaced, not trusted.
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 truncated")
  again = data.get("mnist1d", "train", cfg)
  assert len(count_make_dataset) == 3
  np.testing.assert_array_equal(again.x, ds.x)
  with np.load(path) as f:
    np.testing.assert_array_equal(f["x_train"], ds.x)


def test_mnist1d_too_few_examples(cfg):
  with pytest.raises(UserError, match="--mnist1d_examples"):
    data.get("mnist1d", "train", cfg, mnist1d_examples=9)


# ----------------------------------------------------------------- synthetic

def test_synthetic_inputs(cfg):
  train = data.get("synthetic", "train", cfg.replace(synthetic_examples=4000))
  test = data.get("synthetic", "test", cfg)
  # N(0, I): per-coordinate mean ~0, covariance ~identity.
  assert np.all(np.abs(train.x.mean(0)) < 0.08)
  np.testing.assert_allclose(np.cov(train.x.T), np.eye(8), atol=0.1)
  # Disjoint draws; the test set does not depend on the training-set size.
  assert not np.isin(test.x[:, 0], train.x[:, 0]).any()
  np.testing.assert_array_equal(
      data.get("synthetic", "test", cfg, synthetic_examples=50).x, test.x)


def test_synthetic_teacher_labels(cfg):
  train = data.get("synthetic", "train", cfg)
  test = data.get("synthetic", "test", cfg)
  net = synthetic.teacher(8, 4, cfg.data_seed)
  hidden = np.tanh(train.x.astype(np.float64) @ net.w1)
  np.testing.assert_array_equal(train.y, np.argmax(hidden @ net.w2, 1))
  np.testing.assert_array_equal(test.y, net.labels(test.x.astype(np.float64)))
  # No class is starved (each near 1/4 of the examples).
  assert np.bincount(train.y, minlength=4).min() > 0.1 * 300
  # Deterministic per --data_seed, independent of --seed.
  same = data.get("synthetic", "train", cfg, seed=9)
  np.testing.assert_array_equal(same.x, train.x)
  np.testing.assert_array_equal(same.y, train.y)
  other = data.get("synthetic", "train", cfg, data_seed=1)
  assert not np.array_equal(other.x, train.x)
  assert np.mean(synthetic.teacher(8, 4, 1).labels(
      train.x.astype(np.float64)) == train.y) < 0.6


def test_synthetic_teacher_learnable_random_not(cfg):
  big = cfg.replace(synthetic_examples=2000, synthetic_test_examples=500,
                    synthetic_dim=20, synthetic_classes=10)

  def test_accuracy(c):
    tr, te = data.get("synthetic", "train", c), data.get("synthetic", "test",
                                                         c)
    clf = linear_model.LogisticRegression(max_iter=500).fit(tr.x, tr.y)
    return clf.score(te.x, te.y), tr

  acc_teacher, teacher_train = test_accuracy(big)
  acc_random, random_train = test_accuracy(
      big.replace(synthetic_labels="random"))
  assert acc_teacher > 0.5, acc_teacher
  assert acc_random < 0.2, acc_random
  np.testing.assert_array_equal(random_train.x, teacher_train.x)
  counts = np.bincount(random_train.y, minlength=10)
  assert np.all(np.abs(counts - 200) < 60), counts


def test_synthetic_uses_no_global_state(cfg):
  np.random.seed(5)
  expected = np.random.random()
  np.random.seed(5)
  data.get("synthetic", "train", cfg)
  assert np.random.random() == expected


# ------------------------------------------------------- label transforms

def test_random_labels(cfg):
  clean = data.get("digits", "train", cfg)
  noisy = data.get("digits", "train", cfg, random_labels=True)
  n = clean.info.num_examples
  expected = base.LabelTransform(n, 10, random_labels=True, seed=cfg.seed)
  np.testing.assert_array_equal(noisy.y, expected.random)
  np.testing.assert_array_equal(noisy.x, clean.x)
  # About 1 - 1/K = 90% of labels change; each class is drawn ~n/10 times.
  changed = np.mean(noisy.y != clean.y)
  assert abs(changed - 0.9) < 0.04, changed
  counts = np.bincount(noisy.y, minlength=10)
  assert np.all(np.abs(counts - n / 10) < 50), counts
  # Fixed across loads and epochs; a function of --seed.
  np.testing.assert_array_equal(
      data.get("digits", "train", cfg, random_labels=True).y, noisy.y)
  for epoch in (0, 1, 2):
    idx_x, y = collect(noisy.batches(100, shuffle=True, seed=3, epoch=epoch))
    order = _match_rows(idx_x, noisy.x)
    np.testing.assert_array_equal(y, noisy.y[order])
  reseeded = data.get("digits", "train", cfg, random_labels=True, seed=1)
  assert np.mean(reseeded.y != noisy.y) > 0.8
  # The test split keeps its true labels.
  np.testing.assert_array_equal(
      data.get("digits", "test", cfg, random_labels=True).y,
      data.get("digits", "test", cfg).y)


def _match_rows(rows, table):
  """Index into `table` of each row of `rows` (rows of `rows` are unique)."""
  keys = {r.tobytes(): i for i, r in enumerate(table)}
  return np.array([keys[r.tobytes()] for r in rows])


@pytest.mark.parametrize("p", [0.1, 0.3, 0.6])
def test_label_noise_rate(cfg, p):
  big = cfg.replace(synthetic_examples=5000, synthetic_classes=10,
                    synthetic_dim=20)
  clean = data.get("synthetic", "train", big)
  noisy = data.get("synthetic", "train", big, label_noise=p)
  changed = np.mean(noisy.y != clean.y)
  # A replaced label equals the true one with probability 1/K.
  assert abs(changed - p * 0.9) < 0.03, changed
  transform = base.LabelTransform(5000, 10, label_noise=p, seed=cfg.seed)
  np.testing.assert_array_equal(
      noisy.y, np.where(transform.replace, transform.random, clean.y))
  np.testing.assert_array_equal(
      data.get("synthetic", "test", big, label_noise=p).y,
      data.get("synthetic", "test", big).y)


def test_subset_then_labels(cfg):
  full = data.get("synthetic", "train", cfg)
  sub = data.get("synthetic", "train", cfg, train_subset=50,
                 random_labels=True, seed=4)
  expected = base.LabelTransform(50, 4, random_labels=True, seed=4).random
  np.testing.assert_array_equal(sub.y, expected)
  np.testing.assert_array_equal(sub.x, full.x[:50])


def test_make_array_split_directly(cfg):
  x = np.arange(20, dtype=np.float32).reshape(10, 2)
  y = np.arange(10) % 3
  train = arrays.make_array_split("toy", "train", x, y, x[:4], y[:4], 3,
                                  cfg.replace(train_subset=6))
  test = arrays.make_array_split("toy", "test", x, y, x[:4], y[:4], 3, cfg)
  assert train.info == base.DatasetInfo("toy", "train", 3, (2,), 6)
  assert test.info == base.DatasetInfo("toy", "test", 3, (2,), 4)
  assert arrays.train_label_transform(10, 3, cfg) is None
  with pytest.raises(UserError, match=r"labels must lie in \[0, 2\)"):
    arrays.make_array_split("toy", "train", x, y, x, y, 2, cfg)


# ------------------------------------------------- ArrayDataset.batches

def _indexed(n=103, classes=5):
  """An ArrayDataset whose feature 0 is the example's storage index."""
  x = np.stack([np.arange(n), -np.arange(n)], 1).astype(np.float32)
  y = np.arange(n) % classes
  info = base.DatasetInfo("indexed", "train", classes, (2,), n)
  return base.ArrayDataset(info, x, y)


def _order(ds, batch_size, **kw):
  x, y = collect(ds.batches(batch_size, **kw))
  idx = x[:, 0].astype(np.int64)
  np.testing.assert_array_equal(y, idx % 5)  # labels travel with inputs
  np.testing.assert_array_equal(x[:, 1], -x[:, 0])
  return idx


def test_batches_unshuffled_is_storage_order():
  ds = _indexed()
  np.testing.assert_array_equal(_order(ds, 10), np.arange(103))
  sizes = [len(b[1]) for b in ds.batches(10).as_numpy_iterator()]
  assert sizes == [10] * 10 + [3] and ds.num_batches(10, False) == 11


def test_batches_shuffle_is_a_function_of_seed_and_epoch():
  a, b = _indexed(), _indexed()
  o = _order(a, 16, shuffle=True, seed=1, epoch=2)
  assert sorted(o) == list(range(103))
  assert not np.array_equal(o, np.arange(103))
  np.testing.assert_array_equal(o, _order(b, 16, shuffle=True, seed=1,
                                          epoch=2))
  # Batch size does not change the permutation, only how it is cut.
  np.testing.assert_array_equal(o, _order(b, 7, shuffle=True, seed=1,
                                          epoch=2))
  for other in (dict(seed=1, epoch=3), dict(seed=2, epoch=2)):
    p = _order(a, 16, shuffle=True, **other)
    assert np.mean(p != o) > 0.9


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_batches_start_batch_is_the_tail(shuffle, drop):
  ds = _indexed()
  kw = dict(shuffle=shuffle, seed=4, epoch=1, drop_remainder=drop)
  full = _order(ds, 10, **kw)
  batches = list(ds.batches(10, **kw).as_numpy_iterator())
  for k in (1, 4, len(batches) - 1):
    tail = _order(ds, 10, start_batch=k, **kw)
    np.testing.assert_array_equal(tail, full[10 * k:])
    rest = list(ds.batches(10, start_batch=k, **kw).as_numpy_iterator())
    assert len(rest) == len(batches) - k


def test_batches_drop_remainder():
  ds = _indexed()
  batches = list(ds.batches(10, shuffle=True, seed=0, epoch=0,
                            drop_remainder=True).as_numpy_iterator())
  assert [len(b[1]) for b in batches] == [10] * 10
  assert ds.num_batches(10, True) == 10
  kept = _order(ds, 10, shuffle=True, seed=0, epoch=0, drop_remainder=True)
  full = _order(ds, 10, shuffle=True, seed=0, epoch=0)
  np.testing.assert_array_equal(kept, full[:100])
  spec = ds.batches(10, drop_remainder=True).element_spec
  assert spec[0].shape.as_list() == [10, 2]


def test_batches_pad(cfg):
  ds = _indexed()
  padded = ds.batches(10, shuffle=True, seed=2, epoch=0, pad=True)
  assert [s.shape.as_list() for s in padded.element_spec] == [
      [10, 2], [10], [10]]
  parts = list(padded.as_numpy_iterator())
  assert len(parts) == 11
  x, y, w = (np.concatenate([p[i] for p in parts]) for i in range(3))
  assert w.sum() == 103 and set(np.unique(w)) == {0.0, 1.0}
  np.testing.assert_array_equal(w, np.r_[np.ones(103), np.zeros(7)])
  np.testing.assert_array_equal(x[103:], 0)
  np.testing.assert_array_equal(y[103:], 0)
  real = _order(ds, 10, shuffle=True, seed=2, epoch=0)
  np.testing.assert_array_equal(x[:103, 0].astype(np.int64), real)
  # Same on a real source with image inputs.
  digits = data.get("digits", "test", cfg, input_format="image")
  spec = digits.batches(128, pad=True).element_spec
  assert spec[0].shape.as_list() == [128, 8, 8, 1]
  total = sum(b[2].sum() for b in digits.batches(128, pad=True)
              .as_numpy_iterator())
  assert total == 360


def test_examples_by_index(cfg):
  ds = data.get("synthetic", "train", cfg)
  x, y = ds.examples([5, 0, 5])
  np.testing.assert_array_equal(x, ds.x[[5, 0, 5]])
  np.testing.assert_array_equal(y, ds.y[[5, 0, 5]])
