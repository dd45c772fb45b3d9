"""The dataset contract every source implements, and the in-memory source.

A `Dataset` is one split of one source. It knows its `DatasetInfo` and makes
`tf.data` pipelines of batches whose order depends only on `(seed, epoch)`, so
a resumed run sees exactly the batches an uninterrupted run would have seen:
the training loop stores `(epoch, batch index)` in its checkpoints and asks
for `batches(..., epoch=e, start_batch=k)` on resume.

Elements are `(x, y)` with `x` float32 `[b, *input_shape]` and `y` int64
`[b]`; with `pad=True` the last batch is padded to full size with zero rows
and the elements are `(x, y, w)`, `w` float32 1 for real rows and 0 for
padding, so that every batch has a static shape (evaluation and full-batch
gradients sum `w * loss` and divide by the true example count).
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np
import tensorflow as tf

from tfcapacity.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  split: str
  num_classes: int
  input_shape: tuple
  num_examples: int


def epoch_rng(seed: int, epoch: int, salt: int = 0) -> np.random.Generator:
  """The generator of one epoch's data order: a function of its arguments."""
  return np.random.default_rng([int(seed), int(epoch), int(salt), 0x7FC4])


class LabelTransform:
  """Random labels (Zhang et al. 2017) and label noise, by example index.

  Both are fixed draws seeded by `seed`: example `i` gets the same label in
  every epoch and every resumed run. With `random_labels` every label is
  replaced by a uniform random class; with `label_noise=p` each label is,
  with probability p, replaced by a uniform random class (which may equal
  the true one, as in Zhang et al.).
  """

  def __init__(self, num_examples: int, num_classes: int, *,
               random_labels: bool = False, label_noise: float = 0.0,
               seed: int = 0):
    rng = np.random.default_rng([int(seed), 0x1ABE1])
    self.random = rng.integers(0, num_classes, size=num_examples,
                               dtype=np.int64)
    if random_labels:
      self.replace = np.ones(num_examples, dtype=bool)
    else:
      self.replace = rng.random(num_examples) < label_noise
    self.active = bool(self.replace.any())

  def numpy(self, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    if not self.active:
      return labels
    return np.where(self.replace[indices], self.random[indices], labels)

  def tf(self, indices: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    if not self.active:
      return labels
    replace = tf.gather(tf.constant(self.replace), indices)
    return tf.where(replace, tf.gather(tf.constant(self.random), indices),
                    labels)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises UserError unless all labels are integers in [0, num_classes)."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise UserError(
        f"{where}: labels must lie in [0, {num_classes}), found "
        f"[{labels.min()}, {labels.max()}]; fix the labels or the number of "
        f"classes")


def check_finite(x: np.ndarray, where: str) -> None:
  """Raises UserError if `x` holds NaN or Inf."""
  if not np.all(np.isfinite(x)):
    bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0])
    raise UserError(
        f"{where}: features contain NaN or Inf (first at example {bad}); "
        f"clean the data before training")


def check_indices(indices, num_examples: int) -> np.ndarray:
  """`indices` as a flat int64 array; IndexError outside [0, num_examples)."""
  indices = np.asarray(indices, dtype=np.int64).reshape(-1)
  if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
    raise IndexError(f"example indices must lie in [0, {num_examples})")
  return indices


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool):
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


class Dataset(abc.ABC):
  """One split of one data source."""

  info: DatasetInfo

  @abc.abstractmethod
  def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
              epoch: int = 0, start_batch: int = 0,
              drop_remainder: bool = False, pad: bool = False
              ) -> tf.data.Dataset:
    """Batches of this split in the order given by `(shuffle, seed, epoch)`.

    Args:
      batch_size: examples per batch.
      shuffle: shuffle the examples (else they come in storage order).
      seed, epoch: the order is a function of these alone.
      start_batch: skip this many batches of the epoch (resume).
      drop_remainder: drop a final partial batch.
      pad: pad the final partial batch and add the weight component.
    """

  @abc.abstractmethod
  def examples(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """The examples at `indices` (storage order) as numpy `(x, y)`."""

  def num_batches(self, batch_size: int, drop_remainder: bool) -> int:
    return num_batches(self.info.num_examples, batch_size, drop_remainder)


def pad_batches(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Adds the weight component and pads a partial batch with zero rows."""

  def pad(x, y):
    n = tf.shape(y)[0]
    extra = batch_size - n
    w = tf.concat([tf.ones([n], tf.float32), tf.zeros([extra], tf.float32)],
                  0)
    x = tf.concat([x, tf.zeros(tf.concat([[extra], tf.shape(x)[1:]], 0),
                               x.dtype)], 0)
    y = tf.concat([y, tf.zeros([extra], y.dtype)], 0)
    shape = [batch_size] + x.shape[1:].as_list()
    return (tf.ensure_shape(x, shape), tf.ensure_shape(y, [batch_size]),
            tf.ensure_shape(w, [batch_size]))

  return ds.map(pad)


class ArrayDataset(Dataset):
  """A split held in memory as numpy arrays.

  Each epoch permutes the arrays once in numpy and slices batches from the
  copy: on a small model this feeds ~1.3x more examples/s than gathering
  each batch by index inside tf.data (benchmarks/train_throughput.py).
  """

  def __init__(self, info: DatasetInfo, x: np.ndarray, y: np.ndarray,
               label_transform: LabelTransform | None = None):
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    check_finite(x, f"dataset {info.name!r} ({info.split})")
    if label_transform is not None:
      y = label_transform.numpy(np.arange(len(y)), y)
    # One output (num_classes 1) is a sign model: labels 0 and 1 mean -1, +1.
    check_labels(y, max(2, info.num_classes),
                 f"dataset {info.name!r} ({info.split})")
    self.info = info
    self.x, self.y = x, y

  def _order(self, shuffle, seed, epoch):
    n = len(self.y)
    return epoch_rng(seed, epoch).permutation(n) if shuffle else np.arange(n)

  def epoch_arrays(self, batch_size, *, shuffle=False, seed=0, epoch=0):
    """The epoch's full batches stacked, in the order of `batches()`.

    Returns:
      `x` of shape [num_batches, batch_size, *input_shape] and `y` of shape
      [num_batches, batch_size]: batch k equals the k-th element of
      `batches(batch_size, ..., drop_remainder=True)`.
    """
    order = self._order(shuffle, seed, epoch)
    k = len(order) // batch_size
    order = order[:k * batch_size]
    return (self.x[order].reshape((k, batch_size) + self.x.shape[1:]),
            self.y[order].reshape(k, batch_size))

  def batches(self, batch_size, *, shuffle=False, seed=0, epoch=0,
              start_batch=0, drop_remainder=False, pad=False):
    order = self._order(shuffle, seed, epoch)
    n = len(order)
    if drop_remainder:
      order = order[:n - n % batch_size]
    order = order[start_batch * batch_size:]
    ds = tf.data.Dataset.from_tensor_slices(
        (self.x[order], self.y[order])).batch(
            batch_size, drop_remainder=drop_remainder)
    if pad:
      ds = pad_batches(ds, batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)

  def examples(self, indices):
    indices = np.asarray(indices)
    return self.x[indices], self.y[indices]
