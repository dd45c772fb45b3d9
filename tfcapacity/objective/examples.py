"""Fixed examples of a measured loss: validated, padded, resident, sliced.

A measurement's examples are numpy arrays fixed for its lifetime (training
examples drawn once, a test batch, a split chosen by a tool). They are

  * validated once (`check_examples`: matching, non-empty, finite inputs,
    non-negative integer labels);
  * cut into batches of a fixed global size, the last one padded with rows
    of weight 0, so every batch has a static shape and sums over padded
    batches are exact (`FixedExamples`);
  * held on the device in variables, and read by an in-graph loop over batch
    indices: iterating a `tf.data` pipeline inside a traced function cost
    ~140 ms per Hessian-vector product on a tiny ResNet (iterator set-up on
    every call), 100x a gradient. Held in variables, the examples can be
    replaced by others of the same shape (`FixedExamples.assign`) without
    retracing;
  * sliced over replicas: under a `tf.distribute` strategy each replica takes
    its slice of every batch, the same slice whatever the number of replicas
    (as in training);
  * or cut into padded chunks of a fixed size for computations that return
    one row per example (`padded_chunk`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfcapacity import objective as names
from tfcapacity.errors import UserError


def check_examples(x, y, input_shape=None) -> tuple[np.ndarray, np.ndarray]:
  """The examples as float32 inputs and int64 labels, validated.

  Raises:
    UserError: empty or mismatched arrays, NaN/Inf inputs, negative labels,
      or inputs whose shape differs from `input_shape`.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int64)
  if len(y) == 0 or len(x) != len(y):
    raise UserError(f"need matching, non-empty examples; got {len(x)} "
                    f"inputs and {len(y)} labels")
  if input_shape is not None and x.shape[1:] != tuple(input_shape):
    raise UserError(f"examples of shape {x.shape[1:]} given to a "
                    f"computation built for {tuple(input_shape)}")
  if not np.isfinite(x).all():
    raise UserError("the examples hold NaN or Inf values; clean the data")
  if y.min() < 0:
    raise UserError("labels must be non-negative class indices")
  return x, y


def padded_chunk(x: np.ndarray, y: np.ndarray, index: int, size: int):
  """Chunk `index` of `size` examples as tensors, zero rows padding the last.

  Returns:
    (x, y, rows): the chunk and how many of its rows are real examples.
  """
  xs, ys = x[index * size:(index + 1) * size], y[index * size:(index + 1) *
                                                  size]
  rows = len(ys)
  if rows < size:  # Padded rows are computed and dropped.
    xs = np.concatenate([xs, np.zeros((size - rows, *xs.shape[1:]),
                                      np.float32)])
    ys = np.concatenate([ys, np.zeros(size - rows, np.int64)])
  return tf.constant(xs), tf.constant(ys), rows


class FixedExamples:
  """A fixed set of examples in padded batches, resident on the device.

  Attributes:
    num_examples: the real examples.
    batch_size: global examples per batch (a multiple of the replicas).
    num_batches: batches, the last one padded with zero-weight rows.
    input_shape: the shape of one input.
    strategy: the strategy whose replicas share each batch.
  """

  def __init__(self, x, y, *, batch_size: int | None = None,
               strategy: tf.distribute.Strategy | None = None,
               full_batches: str | None = None):
    """Validates and stores the examples.

    Args:
      x, y: inputs and integer labels (numpy), in the order they are batched.
      batch_size: global examples per batch (default: all, at most
        `objective.MAX_BATCH_SIZE`),
        rounded down to a multiple of the replicas.
      strategy: default the current one.
      full_batches: when set, the batch size must divide the examples (no
        padding: padding rows would enter batch statistics); the string
        names the reason in the error, e.g. "--bn_mode=batch".

    Raises:
      UserError: bad examples, or padding where `full_batches` forbids it.
    """
    x, y = check_examples(x, y)
    self.strategy = strategy or tf.distribute.get_strategy()
    replicas = self.strategy.num_replicas_in_sync
    n = len(y)
    batch_size = int(batch_size or min(n, names.MAX_BATCH_SIZE))
    self.batch_size = max(replicas, batch_size - batch_size % replicas)
    if full_batches and n % self.batch_size:
      raise UserError(
          f"{full_batches}: the batch size {self.batch_size} must divide "
          f"the {n} examples (padding rows would enter the batch "
          f"statistics); choose a divisor")
    self.num_examples = n
    self.num_batches = -(-n // self.batch_size)
    self.input_shape = tuple(x.shape[1:])
    with self.strategy.scope():
      self.data = tuple(tf.Variable(a, trainable=False)
                        for a in self._padded(x, y))

  @property
  def per_replica_batch(self) -> int:
    return self.batch_size // self.strategy.num_replicas_in_sync

  def _padded(self, x, y):
    """The set as [batches, batch, ...] arrays, the last batch zero-weighted."""
    n, b = len(y), self.batch_size
    total = self.num_batches * b
    w = np.zeros(total, np.float32)
    w[:n] = 1.0
    x = np.concatenate([x, np.zeros((total - n, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(total - n, y.dtype)])
    shape = (self.num_batches, b)
    return x.reshape(shape + x.shape[1:]), y.reshape(shape), w.reshape(shape)

  def assign(self, x, y) -> None:
    """Holds other examples of the same number and shape (no retracing).

    Raises:
      UserError: a different number or shape of examples, or bad values.
    """
    x = np.asarray(x, np.float32)
    if len(x) != self.num_examples or x.shape[1:] != self.input_shape:
      raise UserError(f"set_examples needs {self.num_examples} examples of "
                      f"shape {self.input_shape}; got {x.shape}: build "
                      f"another operator")
    x, y = check_examples(x, y)
    for var, value in zip(self.data, self._padded(x, y)):
      var.assign(value)

  def batch_indices(self):
    """The batches to loop over inside a traced function.

    A few batches are unrolled (3-8% faster on a small MLP: no loop
    machinery); many run in an in-graph loop (bounded graph size).
    """
    if self.num_batches <= 4:
      return range(self.num_batches)
    return tf.range(self.num_batches)

  def batched(self, array: np.ndarray) -> np.ndarray:
    """Per-example `array` [n, ...] laid out as the examples are:
    [num_batches, batch_size, ...], zero rows padding the last batch."""
    array = np.asarray(array)
    if len(array) != self.num_examples:
      raise UserError(f"need one row per example ({self.num_examples}); got "
                      f"{len(array)}")
    total = self.num_batches * self.batch_size
    array = np.concatenate(
        [array, np.zeros((total - len(array), *array.shape[1:]),
                         array.dtype)])
    return array.reshape((self.num_batches, self.batch_size)
                         + array.shape[1:])

  def replica_rows(self, data, i):
    """This replica's rows of batch `i` of `data` [num_batches, batch_size,
    ...] (in a replica context): the rows `replica_batch` takes."""
    replicas = self.strategy.num_replicas_in_sync
    if replicas == 1:
      return data[i]
    per = self.batch_size // replicas
    lo = tf.distribute.get_replica_context().replica_id_in_sync_group * per
    return data[i, lo:lo + per]

  def replica_batch(self, i):
    """(x, y, w): this replica's part of batch `i` (in a replica context)."""
    return tuple(self.replica_rows(a, i) for a in self.data)
