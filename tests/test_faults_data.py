"""Fault injection: data files a user hands over fail with one line.

HDF5 files are written with gzip-compressed chunks and damaged in place: the
bytes of one chunk, located with h5py's own chunk index
(`dset.id.get_chunk_info`), are overwritten so that the chunk no longer
decompresses. The rows the error must name are those of that chunk, read
from the same index. Files that are not HDF5 at all (text, random bytes, a
truncated copy, a directory) must fail at load. A UserError raised while
tf.data runs the reader's generator reaches the caller as a TensorFlow error;
`errors.user_error_from` must recover its one line. TFDS lookups of unknown
names must log nothing before their one-line error.
"""

import logging

from absl import logging as absl_logging
import conftest
import h5py
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfcapacity import config
from tfcapacity import data as data_lib
from tfcapacity import errors
from tfcapacity.data import hdf5
from tfcapacity.errors import UserError

CHUNK = 32
N = 256
DAMAGED = "regenerate or re-copy it"


def write_h5(path, *, n=N, dtype=np.float32, features="features",
             labels="labels", prefix="", mode="w", seed=0):
  """Features [n, 6] and labels in [0, 3), chunked by CHUNK rows, gzip."""
  rng = np.random.default_rng(seed)
  if np.dtype(dtype).kind == "f":
    x = rng.normal(size=(n, 6)).astype(dtype)
  else:
    x = rng.integers(0, 200, size=(n, 6)).astype(dtype)
  y = rng.integers(0, 3, size=n)
  with h5py.File(path, mode) as f:
    f.create_dataset(prefix + features, data=x, chunks=(CHUNK, 6),
                     compression="gzip")
    f.create_dataset(prefix + labels, data=y, chunks=(CHUNK,),
                     compression="gzip")
  return str(path), x, y


def corrupt_chunk(path, name, index):
  """Overwrites the middle of chunk `index` of dataset `name`; returns the
  (first, last) rows it held, by h5py's chunk index."""
  with h5py.File(path, "r") as f:
    dset = f[name]
    info = dset.id.get_chunk_info(index)
    first = info.chunk_offset[0]
    last = min(first + dset.chunks[0], dset.shape[0]) - 1
  assert info.size > 8
  with open(path, "r+b") as fh:
    fh.seek(info.byte_offset + 4)
    fh.write(b"\xff" * (info.size - 8))
  # The damage is real: h5py fails on these rows and only on these.
  with h5py.File(path, "r") as f:
    with pytest.raises(OSError):
      f[name][first:last + 1]
    f[name][:first]
    f[name][last + 1:]
  return first, last


def assert_one_line(message, *fragments):
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


def rows_text(rows):
  return f"rows {rows[0]}-{rows[1]}"


# -- corrupted chunks, read at load ------------------------------------------


@pytest.mark.parametrize("flags", [
    {},
    {"standardize": True},
    {"holdout_fraction": 0.25},
])
def test_corrupt_features_chunk_fails_at_load(tmp_path, flags):
  path, _, _ = write_h5(tmp_path / "d.h5")
  rows = corrupt_chunk(path, "features", 5)
  with pytest.raises(UserError) as e:
    data_lib.get(f"hdf5:{path}", "train", config.make(**flags))
  assert_one_line(str(e.value), path, "'/features'", rows_text(rows), DAMAGED)


def test_corrupt_chunk_in_named_group_datasets(tmp_path):
  """--hdf5_features/--hdf5_labels names inside train/ and test/ groups:
  the error names the test group's dataset that is damaged."""
  names = dict(features="inputs", labels="targets")
  path, _, _ = write_h5(tmp_path / "g.h5", prefix="train/", **names)
  write_h5(path, prefix="test/", mode="a", seed=1, n=96, **names)
  rows = corrupt_chunk(path, "test/inputs", 2)
  cfg = config.make(hdf5_features="inputs", hdf5_labels="targets")
  data_lib.get(f"hdf5:{path}", "train", cfg)  # The train group is intact.
  with pytest.raises(UserError) as e:
    data_lib.get(f"hdf5:{path}", "test", cfg)
  assert_one_line(str(e.value), path, "'/test/inputs'", rows_text(rows),
                  DAMAGED)


def test_corrupt_test_dataset_file(tmp_path):
  train, _, _ = write_h5(tmp_path / "train.h5")
  test, _, _ = write_h5(tmp_path / "test.h5", seed=1)
  rows = corrupt_chunk(test, "features", 0)
  with pytest.raises(UserError) as e:
    data_lib.get(f"hdf5:{train}", "test",
                 config.make(test_dataset=f"hdf5:{test}"))
  assert_one_line(str(e.value), test, "'/features'", rows_text(rows), DAMAGED)


def test_corrupt_labels_chunk_fails_at_load(tmp_path):
  path, _, _ = write_h5(tmp_path / "d.h5", dtype=np.uint8)
  rows = corrupt_chunk(path, "labels", 3)
  with pytest.raises(UserError) as e:
    data_lib.get(f"hdf5:{path}", "train", config.make())
  assert_one_line(str(e.value), path, "'/labels'", rows_text(rows), DAMAGED)


# -- corrupted chunks, read during an epoch ---------------------------------


@pytest.fixture
def chunk_blocks(monkeypatch):
  """One chunk per read, so that the rows before the damage are delivered."""
  monkeypatch.setattr(hdf5, "BLOCK_ROWS", CHUNK)


def test_corrupt_chunk_mid_epoch(tmp_path, chunk_blocks):
  # Integer features are not scanned at load: the damage is met mid-epoch.
  path, x, y = write_h5(tmp_path / "d.h5", dtype=np.uint8)
  rows = corrupt_chunk(path, "features", 4)
  ds = data_lib.get(f"hdf5:{path}", "train", config.make())
  got = []
  with pytest.raises(tf.errors.OpError) as e:
    for xb, yb in ds.batches(16).as_numpy_iterator():
      got.append((xb, yb))
  user = errors.user_error_from(e.value)
  assert user is not None, e.value
  assert_one_line(str(user), path, "'/features'", rows_text(rows), DAMAGED)
  # Every row before the damaged chunk was delivered, unchanged.
  np.testing.assert_array_equal(np.concatenate([b[0] for b in got]),
                                x[:rows[0]].astype(np.float32))
  np.testing.assert_array_equal(np.concatenate([b[1] for b in got]),
                                y[:rows[0]])
  # Direct reads raise the UserError itself; intact rows still read.
  with pytest.raises(UserError) as direct:
    ds.examples([0, rows[0] + 1])
  assert str(direct.value) == str(user)
  xe, _ = ds.examples(np.arange(rows[0]))
  np.testing.assert_array_equal(xe, x[:rows[0]].astype(np.float32))


def test_corrupt_chunk_mid_epoch_in_tf_function(tmp_path, chunk_blocks):
  path, _, _ = write_h5(tmp_path / "d.h5", dtype=np.uint8)
  rows = corrupt_chunk(path, "features", 6)
  ds = data_lib.get(f"hdf5:{path}", "train", config.make()).batches(
      16, shuffle=True, seed=3, pad=True)

  @tf.function
  def total(batches):
    s = tf.constant(0.0)
    for xb, _, w in batches:
      s += tf.reduce_sum(xb * w[:, None])
    return s

  with pytest.raises(tf.errors.OpError) as e:
    total(ds)
  user = errors.user_error_from(e.value)
  assert user is not None, e.value
  assert_one_line(str(user), path, "'/features'", rows_text(rows), DAMAGED)


# -- files that are not HDF5 -------------------------------------------------


def _not_hdf5(tmp_path, kind):
  good, _, _ = write_h5(tmp_path / "good.h5")
  with open(good, "rb") as f:
    content = f.read()
  path = tmp_path / f"{kind}.h5"
  if kind == "directory":
    path.mkdir()
  elif kind == "text":
    path.write_text("features,labels\n1.0,2\n")
  elif kind == "random":
    path.write_bytes(np.random.default_rng(0).bytes(4096))
  elif kind == "empty":
    path.write_bytes(b"")
  elif kind == "five_bytes":
    path.write_bytes(content[:5])
  elif kind == "half":
    path.write_bytes(content[:len(content) // 2])
  return good, str(path)


NOT_HDF5 = ["directory", "text", "random", "empty", "five_bytes", "half"]


@pytest.mark.parametrize("kind", NOT_HDF5)
def test_not_hdf5_fails_at_load(tmp_path, kind):
  good, path = _not_hdf5(tmp_path, kind)
  before = conftest.snapshot(tmp_path)
  with pytest.raises(UserError) as e:
    data_lib.get(f"hdf5:{path}", "train", config.make())
  what = "is a directory" if kind == "directory" else "not a readable HDF5"
  assert_one_line(str(e.value), path, what, "--dataset")
  # As the test split's file, the error names that file and flag.
  with pytest.raises(UserError) as e:
    data_lib.get(f"hdf5:{good}", "test",
                 config.make(test_dataset=f"hdf5:{path}"))
  assert_one_line(str(e.value), path, what, "--test_dataset")
  assert conftest.snapshot(tmp_path) == before


# -- errors.user_error_from --------------------------------------------------

MESSAGE = "x.h5: cannot read rows 64-95 of dataset '/features'; fix: it"


def _failing_dataset(raise_error):
  """from_generator over a generator that yields twice, then raises."""

  def generate():
    yield np.zeros([4, 2], np.float32)
    yield np.ones([4, 2], np.float32)
    raise_error()

  return tf.data.Dataset.from_generator(
      generate, output_signature=tf.TensorSpec([4, 2], tf.float32))


def _user_error():
  raise UserError(MESSAGE)


def _user_error_from_os_error():
  try:
    raise OSError("Can't synchronously read data")
  except OSError as e:
    raise UserError(MESSAGE) from e


def _user_error_while_handling():
  try:
    raise OSError("Can't synchronously read data")
  except OSError:
    raise UserError(MESSAGE)  # pylint: disable=raise-missing-from


def _bug_while_handling_user_error():
  try:
    raise UserError(MESSAGE)
  except UserError:
    # pylint: disable-next=raise-missing-from
    raise KeyError("a bug in an except clause")


def _os_error():
  raise OSError("Can't synchronously read data")


def _eager(ds):
  for _ in ds:
    pass


@tf.function
def _graph(ds):
  s = tf.constant(0.0)
  for x in ds:
    s += tf.reduce_sum(x)
  return s


def _distributed(ds):
  strategy = conftest.two_replicas()
  dist = strategy.experimental_distribute_dataset(ds)

  @tf.function
  def run(iterator):
    s = tf.constant(0.0)
    for x in iterator:
      s += strategy.reduce("SUM", strategy.run(tf.reduce_sum, (x,)),
                           axis=None)
    return s

  run(dist)


ITERATE = {"eager": _eager, "tf_function": _graph,
           "mirrored": _distributed}


@pytest.mark.parametrize("iterate", list(ITERATE))
@pytest.mark.parametrize("raise_error", [
    _user_error, _user_error_from_os_error, _user_error_while_handling])
def test_user_error_from_recovers_the_line(iterate, raise_error):
  with pytest.raises(tf.errors.OpError) as e:
    ITERATE[iterate](_failing_dataset(raise_error))
  assert not isinstance(e.value, UserError)
  user = errors.user_error_from(e.value)
  assert isinstance(user, UserError), e.value.message
  assert str(user) == MESSAGE
  assert user.__cause__ is e.value


@pytest.mark.parametrize("iterate", ["eager", "tf_function"])
@pytest.mark.parametrize("raise_error", [
    _os_error, _bug_while_handling_user_error])
def test_user_error_from_leaves_other_errors(iterate, raise_error):
  with pytest.raises(tf.errors.OpError) as e:
    ITERATE[iterate](_failing_dataset(raise_error))
  assert errors.user_error_from(e.value) is None, e.value.message


def test_user_error_from_plain_exceptions():
  user = UserError(MESSAGE)
  assert errors.user_error_from(user) is user
  assert errors.user_error_from(ValueError(MESSAGE)) is None
  assert errors.user_error_from(KeyError("UserError")) is None
  assert errors.user_error_from(RuntimeError("NotAUserError: x")) is None
  assert errors.user_error_from(KeyboardInterrupt()) is None

  class Unprintable(Exception):

    def __str__(self):
      raise RuntimeError("no text")

  assert errors.user_error_from(Unprintable()) is None


# -- tensorflow-datasets names -----------------------------------------------


@pytest.fixture
def absl_info():
  """absl (and so TFDS) logging at INFO, as under a CLI's app.run."""
  before = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  yield
  absl_logging.set_verbosity(before)


def test_unknown_tfds_name_logs_nothing(absl_info, caplog):
  caplog.set_level(logging.DEBUG)
  # Control: TFDS itself logs why the name did not load, then raises.
  with pytest.raises(tfds.core.registered.DatasetNotFoundError):
    tfds.builder("nosuch")
  assert any("nosuch" in r.getMessage() for r in caplog.records)
  caplog.clear()
  for name, fragments in [
      ("nosuch", ["unknown tensorflow-datasets dataset 'nosuch'"]),
      ("cifar10:99.0.0", ["tfds:cifar10:99.0.0", "version 99.0.0",
                          "choose a config and version"]),
      ("cifar10/nosuch", ["tfds:cifar10/nosuch", "BuilderConfig nosuch",
                          "choose a config and version"])]:
    with pytest.raises(UserError) as e:
      data_lib.get(f"tfds:{name}", "train", config.make())
    assert_one_line(str(e.value), *fragments)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_tfds_lookup_logs_are_kept_when_it_succeeds(absl_info, caplog,
                                                    monkeypatch):
  caplog.set_level(logging.DEBUG)
  real = tfds.builder

  def builder(name, data_dir=None):
    absl_logging.info("probe lookup of %s", name)
    return real("imdb_reviews", data_dir=data_dir)

  monkeypatch.setattr(tfds, "builder", builder)
  # imdb_reviews is found, then refused as not (image, label) data: the
  # lookup's log line is passed on before that error.
  with pytest.raises(UserError, match="not an \\(image, label\\)"):
    data_lib.get("tfds:probe", "train", config.make())
  assert "probe lookup of probe" in [r.getMessage() for r in caplog.records]


# -- the train CLI -----------------------------------------------------------


def _train(data_file, model_dir, *extra):
  return conftest.run_cli(
      "-m", "tfcapacity.train", f"--dataset={data_file}",
      f"--model_dir={model_dir}", "--width=8", "--depth=1", "--epochs=1",
      "--batch_size=16", "--noexport", "--noprogress_bar", *extra)


def test_train_cli_corrupt_chunk_at_load(tmp_path):
  path, _, _ = write_h5(tmp_path / "d.h5")
  rows = corrupt_chunk(path, "features", 2)
  before = conftest.snapshot(path)
  proc = _train(f"hdf5:{path}", tmp_path / "run")
  conftest.assert_one_line_error(proc, path, "'/features'", rows_text(rows),
                                 DAMAGED, prog="tfcapacity.train")
  assert conftest.snapshot(path) == before


def test_train_cli_corrupt_chunk_mid_epoch(tmp_path):
  path, _, _ = write_h5(tmp_path / "d.h5", dtype=np.uint8)
  rows = corrupt_chunk(path, "features", 7)
  before = conftest.snapshot(path)
  proc = _train(f"hdf5:{path}", tmp_path / "run")
  assert conftest.snapshot(path) == before
  conftest.assert_one_line_error(proc, path, "'/features'", rows_text(rows),
                                 DAMAGED, prog="tfcapacity.train")


def test_train_cli_not_hdf5(tmp_path):
  _, path = _not_hdf5(tmp_path, "random")
  proc = _train(f"hdf5:{path}", tmp_path / "run")
  conftest.assert_one_line_error(proc, path, "not a readable HDF5",
                                 prog="tfcapacity.train")


def test_train_cli_unknown_tfds_name(tmp_path):
  proc = _train("tfds:nosuch", tmp_path / "run")
  conftest.assert_one_line_error(
      proc, "unknown tensorflow-datasets dataset 'nosuch'",
      prog="tfcapacity.train")
