"""Features/labels HDF5 files, streamed from disk in blocks (`hdf5:<path>`).

A file holds a features dataset `[n, ...]` (any numeric type) and an integer
labels dataset `[n]`, named by `--hdf5_features` and `--hdf5_labels`. Splits
come from the first of these that applies:

1. groups `train/` and `test/` in the file, each holding both datasets;
2. `--test_dataset=<path>`: a second file serves as the test split;
3. `--holdout_fraction=f > 0`: a fixed random subset of the rows, drawn with
   `--data_seed`, is the test split and the rest the train split (random,
   not the last rows, because such files are often sorted by class);
4. otherwise the whole file serves as whichever split is asked for.

Features are never loaded whole. They are read in blocks aligned with the
HDF5 chunks of the features dataset (a multiple of the chunk rows, about
4096 rows or 16 MiB; 4096 rows when unchunked), one slice per block, because
h5py serialises every call behind a global lock: batch slices ran ~60x faster
than per-example reads here (shared/TF_NOTES.md). Labels are small and held
in memory, with `--random_labels`/`--label_noise` applied by example index.

A shuffled epoch permutes the blocks with `epoch_rng(seed, epoch)` and then
shuffles examples within windows of consecutive (permuted) blocks holding at
least `--shuffle_buffer` examples: the order is a function of `(seed, epoch)`
alone and is computed before any data is read, so `start_batch` skips whole
windows without reading them. Memory is bounded by about one window plus one
block, whatever the file size.

At load the split's features are scanned once, block by block, for NaN and
Inf; with `--standardize` the same pass accumulates per-feature mean and
variance of the train split in float64 (Chan et al.'s pairwise update, so
large offsets do not cancel), and both splits are standardised with them.
The statistics cover the whole train split, before `--train_subset`, so that
runs on nested subsets see identically preprocessed inputs. Scan results are
kept per process, keyed by file path, size and mtime, so that loading the
test split after the train split does not read the file again.

Damaged files fail with one line. A path that is not an HDF5 file (a
directory, text, a truncated copy) fails at load. A read that h5py cannot
complete (a chunk that no longer decompresses, a broken chunk index) raises
a UserError naming the file, the dataset and the rows of the first chunk
that cannot be read, at load (labels, the finiteness and statistics scan) or
during an epoch; in the latter case the error reaches the caller through
`tf.data` as a TensorFlow error, from which `errors.user_error_from`
recovers the one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import h5py
import numpy as np
import tensorflow as tf

from tfcapacity import data as data_lib
from tfcapacity.data import arrays
from tfcapacity.data import base
from tfcapacity.errors import UserError, first_line

# Rows per block of an unchunked features dataset, and the target size of a
# block made of several small chunks.
BLOCK_ROWS = 4096
# Blocks of wide rows (images) are capped near this many bytes.
BLOCK_BYTES = 16 << 20

# (file id, features path) of scanned datasets, and train statistics by
# (file id, features path, rows selector).
_FINITE_CHECKED: set = set()
_STATS: dict = {}


@dataclasses.dataclass(frozen=True)
class _Part:
  """A features/labels pair inside one HDF5 file."""
  path: str
  features: str
  labels: str
  # 'train' or 'test' rows of a held-out file; None for all rows.
  holdout: str | None = None


def block_rows(dset: h5py.Dataset) -> int:
  """Rows per read of `dset`: whole chunks, about BLOCK_ROWS or BLOCK_BYTES."""
  row_bytes = max(1, math.prod(dset.shape[1:]) * dset.dtype.itemsize)
  target = max(1, min(BLOCK_ROWS, BLOCK_BYTES // row_bytes))
  if dset.chunks:
    chunk = dset.chunks[0]
    return chunk * max(1, target // chunk)
  return target


# The fix for a file whose bytes are wrong.
_DAMAGED = "the file is damaged; regenerate or re-copy it"
# What h5py raises when the HDF5 library fails to read metadata or data
# (OSError), to walk a damaged group (RuntimeError), to find a damaged
# object (KeyError) or to decode a damaged name (UnicodeDecodeError).
_H5_ERRORS = (OSError, RuntimeError, KeyError, UnicodeDecodeError)


def _open(path: str, what: str) -> h5py.File:
  data_lib.check_file(path, what)
  try:
    return h5py.File(path, "r")
  except OSError as e:
    raise UserError(f"{path} is not a readable HDF5 file ({first_line(e)}); "
                    f"check {what}, or regenerate or re-copy the file if it "
                    f"is damaged") from None


@contextlib.contextmanager
def _damaged_as_user_error(path: str, what: str):
  """Turns h5py's failures inside the block into one-line UserErrors.

  For the file's structure (names, shapes, attributes); row reads go through
  `_read_rows`, which names the rows.
  """
  try:
    yield
  except UserError:
    raise
  except _H5_ERRORS as e:
    raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: "
                    f"{first_line(e)}); {_DAMAGED}") from e


def _first_bad_chunk(dset: h5py.Dataset, lo: int, hi: int):
  """(rows, error): the first chunk overlapping rows [lo, hi) whose rows
  there fail to read, and all its rows [first, end); or None."""
  if not dset.chunks:
    return None
  step = dset.chunks[0]
  for first in range(lo - lo % step, hi, step):
    end = min(first + step, dset.shape[0])
    try:
      dset[max(first, lo):min(end, hi)]
    except OSError as e:
      return (first, end), e
  return None


def _read_rows(dset: h5py.Dataset, lo: int, hi: int,
               path: str) -> np.ndarray:
  """`dset[lo:hi]`; a failed read raises a UserError naming the rows.

  The rows named are all those of the first chunk that cannot be read,
  found by reading [lo, hi) chunk by chunk after a failure (else [lo, hi)):
  the same rows whichever part of a damaged chunk was asked for.

  Raises:
    UserError: h5py could not read the rows (e.g. a corrupted chunk).
  """
  try:
    return dset[lo:hi]
  except OSError as e:
    found = _first_bad_chunk(dset, lo, hi)
    (a, b), cause = found if found else ((lo, hi), e)
    raise UserError(
        f"{path}: cannot read rows {a}-{b - 1} of dataset {dset.name!r} "
        f"({first_line(cause)}); {_DAMAGED}") from e


def _contents(f: h5py.File) -> str:
  names = []
  f.visititems(lambda name, obj: names.append(name)
               if isinstance(obj, h5py.Dataset) else None)
  if not names:
    return "no datasets"
  more = f", ... ({len(names)} in all)" if len(names) > 10 else ""
  return ", ".join(names[:10]) + more


def _has_pair(f: h5py.File, prefix: str, cfg) -> bool:
  return all(isinstance(f.get(prefix + name), h5py.Dataset)
             for name in (cfg.hdf5_features, cfg.hdf5_labels))


def _missing_error(f: h5py.File, path: str, prefix: str, cfg) -> UserError:
  missing = [prefix + n for n in (cfg.hdf5_features, cfg.hdf5_labels)
             if not isinstance(f.get(prefix + n), h5py.Dataset)]
  return UserError(
      f"{path} has no dataset {' or '.join(repr(m) for m in missing)} "
      f"(it holds: {_contents(f)}); name the datasets with "
      f"--hdf5_features/--hdf5_labels")


def _resolve(path: str, cfg) -> tuple[_Part, _Part]:
  """The train and test parts of `path` under the split rules above."""
  feats, labs = cfg.hdf5_features, cfg.hdf5_labels
  test_path = (data_lib.hdf5_path(cfg.test_dataset) if cfg.test_dataset
               else None)
  with _open(path, "--dataset=hdf5:<path>") as f, _damaged_as_user_error(
      path, "its list of datasets"):
    grouped = all(isinstance(f.get(g), h5py.Group) for g in ("train", "test"))
    if grouped:
      for prefix in ("train/", "test/"):
        if not _has_pair(f, prefix, cfg):
          raise _missing_error(f, path, prefix, cfg)
      if test_path:
        raise UserError(
            f"{path} has train/ and test/ groups, so --test_dataset would be "
            f"ignored; drop --test_dataset")
      if cfg.holdout_fraction > 0:
        raise UserError(
            f"{path} has train/ and test/ groups, so --holdout_fraction would "
            f"be ignored; drop --holdout_fraction")
      return (_Part(path, "train/" + feats, "train/" + labs),
              _Part(path, "test/" + feats, "test/" + labs))
    if not _has_pair(f, "", cfg):
      raise _missing_error(f, path, "", cfg)
  flat = _Part(path, feats, labs)
  if test_path:
    if cfg.holdout_fraction > 0:
      raise UserError("--test_dataset and --holdout_fraction both define a "
                      "test split; drop one of them")
    with _open(test_path, "--test_dataset") as f, _damaged_as_user_error(
        test_path, "its list of datasets"):
      if not _has_pair(f, "", cfg):
        raise _missing_error(f, test_path, "", cfg)
    return flat, _Part(test_path, feats, labs)
  if cfg.holdout_fraction > 0:
    return (dataclasses.replace(flat, holdout="train"),
            dataclasses.replace(flat, holdout="test"))
  return flat, flat


def holdout_mask(num_rows: int, fraction: float, data_seed: int) -> np.ndarray:
  """Boolean mask of the held-out (test) rows: a fixed random subset."""
  num_test = int(round(fraction * num_rows))
  if not 0 < num_test < num_rows:
    raise UserError(
        f"--holdout_fraction={fraction} holds out {num_test} of {num_rows} "
        f"examples; choose a fraction that leaves both splits non-empty")
  rng = np.random.default_rng([int(data_seed), 0x401D])
  mask = np.zeros(num_rows, dtype=bool)
  mask[rng.choice(num_rows, size=num_test, replace=False)] = True
  return mask


def _check_features(dset: h5py.Dataset, path: str) -> None:
  if dset.ndim < 2 or dset.dtype.kind not in "biuf":
    raise UserError(
        f"{path}: features {dset.name!r} must be a numeric array [examples, "
        f"...] of rank >= 2, found shape {dset.shape} and dtype {dset.dtype}; "
        f"store one row per example")
  if dset.shape[0] == 0:
    raise UserError(f"{path}: features {dset.name!r} hold no examples")


def _read_labels(f: h5py.File, part: _Part) -> np.ndarray:
  """All labels of `part`, validated as non-negative integers."""
  feats, labs = f[part.features], f[part.labels]
  _check_features(feats, part.path)
  shape = labs.shape
  if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
    raise UserError(
        f"{part.path}: labels {labs.name!r} must be class indices of shape "
        f"[examples], found shape {shape}; store integer labels, not one-hot")
  if shape[0] != feats.shape[0]:
    raise UserError(
        f"{part.path}: {feats.shape[0]} feature rows but {shape[0]} labels in "
        f"{labs.name!r}; the two datasets must have one row per example")
  raw = np.asarray(_read_rows(labs, 0, shape[0], part.path)).reshape(-1)
  if raw.dtype.kind == "f" and np.all(np.isfinite(raw)) and np.all(
      raw == np.round(raw)):
    raw = raw.astype(np.int64)
  if raw.dtype.kind not in "biu":
    raise UserError(
        f"{part.path}: labels {labs.name!r} must be integers, found dtype "
        f"{raw.dtype} with non-integer values; store class indices")
  labels = raw.astype(np.int64)
  if labels.size and labels.min() < 0:
    raise UserError(
        f"{part.path}: labels {labs.name!r} must be >= 0, found "
        f"{labels.min()} at example {int(np.argmin(labels))}; store class "
        f"indices 0..num_classes-1")
  return labels


def _num_classes_attr(f: h5py.File, part: _Part) -> int | None:
  """The `num_classes` attribute of the labels, their group or the file."""
  labs = f[part.labels]
  for obj in (labs, labs.parent, f):
    if "num_classes" in obj.attrs:
      return int(np.asarray(obj.attrs["num_classes"]).reshape(-1)[0])
  return None


def _same_data(a: _Part, b: _Part) -> bool:
  return (a.path, a.features) == (b.path, b.features)


def _describe(part: _Part) -> tuple[np.ndarray, int | None, tuple]:
  """Labels, `num_classes` attribute and per-example shape of `part`."""
  with _open(part.path, "--dataset/--test_dataset") as f, \
      _damaged_as_user_error(part.path, f"datasets {part.features!r} and "
                             f"{part.labels!r}"):
    labels = _read_labels(f, part)
    shape = tuple(int(d) for d in f[part.features].shape[1:])
    return labels, _num_classes_attr(f, part), shape


def _file_id(path: str) -> tuple:
  st = os.stat(path)
  return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def _scan(part: _Part, rows_mask: np.ndarray | None, want_stats: bool,
          selector=None):
  """One streaming pass: raises on NaN/Inf; returns (mean, std) if wanted.

  Finiteness is checked on every row of the dataset; statistics cover the
  rows where `rows_mask` (over file rows) is True, or all rows. `selector`
  is a hashable description of `rows_mask` for the cache.
  """
  fid = (_file_id(part.path), part.features)
  stats_key = fid + (selector,)
  if want_stats and stats_key in _STATS:
    return _STATS[stats_key]
  if not want_stats and fid in _FINITE_CHECKED:
    return None
  with _open(part.path, "--dataset/--test_dataset") as f:
    with _damaged_as_user_error(part.path, f"dataset {part.features!r}"):
      dset = f[part.features]
    is_float = dset.dtype.kind == "f"
    step = block_rows(dset)
    count, mean, m2 = 0, None, None
    # Integer features are finite: without statistics there is nothing to
    # read.
    stop = dset.shape[0] if is_float or want_stats else 0
    for lo in range(0, stop, step):
      block = np.asarray(_read_rows(dset, lo, min(lo + step, stop),
                                    part.path))
      if is_float and not np.all(np.isfinite(block)):
        bad = lo + int(np.argwhere(
            ~np.isfinite(block.reshape(len(block), -1)))[0, 0])
        raise UserError(
            f"{part.path}: features {dset.name!r} contain NaN or Inf (first "
            f"at row {bad}); clean the data before training")
      if not want_stats:
        continue
      if rows_mask is not None:
        block = block[rows_mask[lo:lo + step]]
      if not len(block):
        continue
      block = block.astype(np.float64)
      n_b = len(block)
      mean_b = block.mean(axis=0)
      m2_b = np.square(block - mean_b).sum(axis=0)
      if mean is None:
        count, mean, m2 = n_b, mean_b, m2_b
      else:
        # Chan, Golub & LeVeque's pairwise combination of two partitions.
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + np.square(delta) * (count * n_b / total)
        count = total
  _FINITE_CHECKED.add(fid)
  if not want_stats:
    return None
  std = np.sqrt(m2 / count)
  # Constant features stay centred at zero instead of dividing by zero.
  std = np.where(std > 0, std, 1.0)
  _STATS[stats_key] = (mean, std)
  return mean, std


class HDF5Dataset(base.Dataset):
  """One split of an HDF5 file, read lazily in blocks.

  Attributes:
    info: the split's `DatasetInfo`.
    path, features: the file and features dataset that this split reads.
    block_rows: rows per read; no read of the features is larger.
    mean, std: float64 standardisation statistics, or None.
  """

  def __init__(self, path: str, split: str, cfg):
    train_part, test_part = _resolve(path, cfg)
    part = train_part if split == "train" else test_part
    train_labels, num_classes, input_shape = _describe(train_part)
    num_rows = len(train_labels)
    if _same_data(train_part, test_part):
      test_labels = train_labels
    else:
      test_labels, test_classes, test_shape = _describe(test_part)
      if num_classes is None:
        num_classes = test_classes
      if test_shape != input_shape:
        raise UserError(
            f"{test_part.path}: test features {test_part.features!r} have "
            f"shape {test_shape} per example but train features "
            f"{input_shape}; the splits must match")

    mask = None
    if part.holdout is not None:
      mask = holdout_mask(num_rows, cfg.holdout_fraction, cfg.data_seed)
      test_labels = train_labels[mask]
      train_labels = train_labels[~mask]
    if num_classes is None:
      num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    for labels, p in ((train_labels, train_part), (test_labels, test_part)):
      if labels.max() >= num_classes:
        raise UserError(
            f"{p.path}: labels {p.labels!r} must lie in [0, {num_classes}) "
            f"by the file's num_classes attribute, found {labels.max()}; fix "
            f"the labels or the attribute")
    if num_classes < 2:
      raise UserError(f"{path}: all labels are 0; a classifier needs at least "
                      f"2 classes (or set the num_classes attribute)")

    # The load-time pass: finiteness of this split's dataset and, with
    # --standardize, the train statistics (one pass when they coincide).
    stats = None
    if cfg.standardize:
      selector = (None if mask is None
                  else (cfg.holdout_fraction, cfg.data_seed))
      stats = _scan(train_part, None if mask is None else ~mask,
                    want_stats=True, selector=selector)
    if not (cfg.standardize and _same_data(part, train_part)):
      _scan(part, None, want_stats=False)

    labels = train_labels if split == "train" else test_labels
    rows = None
    if mask is not None:
      rows = np.flatnonzero(mask if split == "test" else ~mask)
    if split == "train":
      n = arrays.subset_size(f"hdf5:{path}", len(labels), cfg)
      labels = labels[:n]
      if rows is not None:
        rows = rows[:n]
      transform = arrays.train_label_transform(n, num_classes, cfg)
      if transform is not None:
        labels = transform.numpy(np.arange(n), labels)

    self.info = base.DatasetInfo(
        name=f"hdf5:{path}", split=split, num_classes=num_classes,
        input_shape=input_shape, num_examples=len(labels))
    self.path, self.features = part.path, part.features
    self.shuffle_buffer = cfg.shuffle_buffer
    self.mean, self.std = stats if stats is not None else (None, None)
    if stats is not None:
      self._shift = stats[0].astype(np.float32)
      self._scale = (1.0 / stats[1]).astype(np.float32)
    self._labels = labels
    self._rows = rows
    with _open(part.path, "--dataset/--test_dataset") as f, \
        _damaged_as_user_error(part.path, f"dataset {part.features!r}"):
      self.block_rows = block_rows(f[part.features])
    # Split-index boundaries of the file's blocks: block b holds the split's
    # examples [starts[b], starts[b + 1]).
    n = len(labels)
    last_row = n if rows is None else int(rows[-1]) + 1
    edges = np.arange(0, last_row + self.block_rows, self.block_rows)
    if rows is None:
      self._block_starts = np.minimum(edges, n)
    else:
      self._block_starts = np.searchsorted(rows, edges)

  # -- reading ----------------------------------------------------------

  @contextlib.contextmanager
  def _open_features(self):
    """The features dataset, in a file opened for the block."""
    what = "that it was not moved or changed since the data were loaded"
    with _open(self.path, what) as f:
      with _damaged_as_user_error(self.path, f"dataset {self.features!r}"):
        dset = f[self.features]
      yield dset

  def _read(self, dset: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
    """Features of split examples `idx` (unique), one slice per block."""
    sorter = np.argsort(idx, kind="stable")
    rows = idx[sorter] if self._rows is None else self._rows[idx[sorter]]
    out = np.empty((len(idx),) + self.info.input_shape, np.float32)
    cuts = np.flatnonzero(np.diff(rows // self.block_rows)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
      r = rows[lo:hi]
      first, last = int(r[0]), int(r[-1])
      data = _read_rows(dset, first, last + 1, self.path)
      if last - first + 1 != len(r):
        data = data[r - first]
      out[sorter[lo:hi]] = data
    if self.mean is not None:
      out -= self._shift
      out *= self._scale
    return out

  def _epoch_order(self, shuffle: bool, seed: int, epoch: int):
    """The epoch's order of split indices and the ends of its windows."""
    starts = self._block_starts
    sizes = np.diff(starts)
    if not shuffle:
      ends = np.unique(starts[1:])
      return np.arange(self.info.num_examples), ends[ends > 0]
    rng = base.epoch_rng(seed, epoch)
    blocks = rng.permutation(len(sizes))
    blocks = blocks[sizes[blocks] > 0]
    order = np.concatenate(
        [np.arange(starts[b], starts[b + 1]) for b in blocks])
    ends, pending, pos = [], 0, 0
    for b in blocks:
      pending += sizes[b]
      pos += sizes[b]
      if pending >= self.shuffle_buffer:
        ends.append(pos)
        pending = 0
    if pending:
      ends.append(pos)
    lo = 0
    for hi in ends:
      rng.shuffle(order[lo:hi])
      lo = hi
    return order, ends

  def _generate(self, batch_size, shuffle, seed, epoch, start_batch,
                drop_remainder):
    order, ends = self._epoch_order(shuffle, seed, epoch)
    n = len(order)
    stop = n - n % batch_size if drop_remainder else n
    start = min(start_batch * batch_size, stop)
    with self._open_features() as dset:
      xs, ys, have, lo = [], [], 0, 0
      for hi in ends:
        a, b = max(lo, start), min(hi, stop)
        lo = hi
        if a >= b:
          continue
        idx = order[a:b]
        xs.append(self._read(dset, idx))
        ys.append(self._labels[idx])
        have += b - a
        if have >= batch_size:
          x, y = np.concatenate(xs), np.concatenate(ys)
          full = have - have % batch_size
          for i in range(0, full, batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
          xs, ys, have = [x[full:]], [y[full:]], have - full
      if have:
        yield np.concatenate(xs), np.concatenate(ys)

  # -- the Dataset contract ----------------------------------------------

  def batches(self, batch_size, *, shuffle=False, seed=0, epoch=0,
              start_batch=0, drop_remainder=False, pad=False):
    size = batch_size if drop_remainder else None
    signature = (
        tf.TensorSpec((size,) + self.info.input_shape, tf.float32),
        tf.TensorSpec((size,), tf.int64))
    ds = tf.data.Dataset.from_generator(
        lambda: self._generate(batch_size, shuffle, seed, epoch, start_batch,
                               drop_remainder),
        output_signature=signature)
    if pad:
      ds = base.pad_batches(ds, batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)

  def examples(self, indices):
    indices = base.check_indices(indices, self.info.num_examples)
    unique, inverse = np.unique(indices, return_inverse=True)
    x = np.empty((0,) + self.info.input_shape, np.float32)
    if unique.size:
      with self._open_features() as dset:
        x = self._read(dset, unique)
    return x[inverse], self._labels[indices]


def load(path: str, split: str, cfg) -> HDF5Dataset:
  """The `split` ('train' or 'test') of the HDF5 file at `path`."""
  return HDF5Dataset(path, split, cfg)
