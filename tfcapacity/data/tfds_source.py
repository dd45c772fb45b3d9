"""Image classification sets from TensorFlow Datasets (`tfds:<name>`).

Any registered builder whose supervised keys are an `Image` of fixed shape
and a `ClassLabel` works, e.g. `tfds:cifar10`, `tfds:mnist`,
`tfds:imagenet_resized/32x32`. The builder reads `--data_dir` and is
prepared (downloaded, or built from archives in `--manual_dir`) only when it
is not prepared yet. The test split is TFDS's `test`, or `validation` for
builders without one (imagenet2012 and its variants).

Images become float32 in [0, 1]. `--channel_normalize` then standardises
each channel with the mean and std of the whole train split, found by one
streaming pass per process (kept in memory, never written: statistics of
mocked or partial data must not leak into a real data_dir). On the train
split `--augment` applies the standard CIFAR augmentation of He et al.
(2016, Sec. 4.2): pad 4 zero pixels on each side, crop a random window of
the original size, flip horizontally with probability 1/2. Padding happens
before normalisation, so padded pixels are black, as in torchvision's
`RandomCrop(32, padding=4)` pipelines.

Reproducibility: examples are read in storage order (`shuffle_files=False`)
and numbered, and every random choice is a stateless op keyed by
`(seed, epoch)` and, for augmentation, the example's number. A shuffled epoch
cuts the stream into windows of `--shuffle_buffer` examples and permutes each
window. We avoid `tf.data.Dataset.shuffle` because its order also depends on
TensorFlow's global seed (`tf.random.set_seed` changes it even when the
operation seed is given), whereas a resumed run must see the batches of the
original run from `(seed, epoch, start_batch)` alone. TFDS writes examples in
a shuffled order at preparation time, so windows of a few thousand examples
already mix classes.

An unknown name, config or version fails with one line; what TFDS logs while
it looks the name up is dropped then (and passed on when the lookup works).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfcapacity.data import arrays
from tfcapacity.data import base
from tfcapacity.errors import UserError, first_line

# Per-channel (mean, std) of train splits, by builder, data_dir and size.
_CHANNEL_STATS: dict = {}
_STATS_BATCH = 1024


@contextlib.contextmanager
def _held_logs():
  """Holds back the log records of a block; drops them if it raises UserError.

  `tfds.builder` logs at INFO why a name could not be loaded from files
  before it raises; the UserError raised then says all that matters, and a
  user error is one line. Records of a block that succeeds (or fails with
  anything else) are passed on to the root logger's handlers afterwards, in
  order. Only the root logger's handlers are held: absl and TFDS log
  through it.
  """
  root = logging.getLogger()
  saved, held = root.handlers[:], []

  class Hold(logging.Handler):

    def emit(self, record):
      held.append(record)

  root.handlers = [Hold()]
  try:
    yield
  except UserError:
    held.clear()
    raise
  finally:
    root.handlers = saved
    for record in held:
      for handler in saved:
        if record.levelno >= handler.level:
          handler.handle(record)


def _builder(name: str, cfg):
  with _held_logs():
    return _find_builder(name, cfg)


def _find_builder(name: str, cfg):
  try:
    return tfds.builder(name, data_dir=cfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    family = name.split("/")[0].split(":")[0]
    close = difflib.get_close_matches(
        family, tfds.list_builders(with_community_datasets=False), n=4)
    hint = (f"close names: {', '.join(close)}" if close else
            "list them with python -c 'import tensorflow_datasets as tfds; "
            "print(tfds.list_builders())'")
    raise UserError(f"unknown tensorflow-datasets dataset {name!r}; {hint}"
                    ) from None
  # An unknown config (ValueError) or version (AssertionError) after the name.
  except (ValueError, AssertionError) as e:
    raise UserError(f"tfds:{name}: {_one_line(e)}; choose a config and "
                    f"version the builder has: tfds:<name>[/<config>]"
                    f"[:<version>]") from None


def _one_line(e: BaseException) -> str:
  """TFDS's multi-line message (configs one per line) as one line."""
  text = ", ".join(line.strip() for line in str(e).splitlines()
                   if line.strip())
  # TFDS's lead-in to a list of close config names, when the list is empty.
  text = re.sub(r"\s*Here are \d+ BuilderConfigs whose name closely "
                r"match:\s*$", "", text)
  return text[:400].rstrip(" .") or type(e).__name__


def _prepare(builder, name: str, cfg) -> None:
  if builder.is_prepared():
    return
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=cfg.manual_dir))
  # Preparation fails in many ways (no network, archives missing from the
  # manual directory, a full disk); each is fixed by pointing at prepared
  # data or archives, so all become the same one-line UserError.
  except Exception as e:  # pylint: disable=broad-except
    where = cfg.data_dir or "the default data_dir (~/tensorflow_datasets)"
    raise UserError(
        f"tfds:{name} is not prepared in {where} and could not be prepared "
        f"({type(e).__name__}: {first_line(e)[:200]}); pass --data_dir=<dir "
        f"with the prepared dataset> or --manual_dir=<dir with its downloaded "
        f"archives>") from None


def _supervised_features(builder, name: str):
  """The (Image, ClassLabel) features behind `as_supervised`."""
  keys = builder.info.supervised_keys
  features = builder.info.features
  if (not isinstance(keys, tuple) or len(keys) != 2
      or not all(isinstance(k, str) for k in keys)
      or not isinstance(features[keys[0]], tfds.features.Image)
      or not isinstance(features[keys[1]], tfds.features.ClassLabel)):
    raise UserError(
        f"tfds:{name} is not an (image, label) classification dataset "
        f"(supervised keys {keys!r}); use an image classification dataset "
        f"such as tfds:cifar10")
  image, label = features[keys[0]], features[keys[1]]
  if any(d is None for d in image.shape):
    raise UserError(
        f"tfds:{name} has images of variable size {image.shape}; use a "
        f"fixed-size variant such as tfds:imagenet_resized/32x32")
  return image, label


def _split_name(builder, name: str, split: str) -> str:
  """The TFDS split behind our `split`: 'test' falls back to 'validation'."""
  wanted = ("train",) if split == "train" else ("test", "validation")
  # Mocked or not-yet-described builders have no split metadata; any name
  # is then accepted.
  available = list(builder.info.splits)
  if not available:
    return wanted[0]
  for candidate in wanted:
    if candidate in available:
      return candidate
  raise UserError(
      f"tfds:{name} has no {' or '.join(wanted)} split (it has "
      f"{', '.join(sorted(available))}); choose another dataset")


def _num_examples(builder, tfds_split: str) -> int:
  splits = builder.info.splits
  if tfds_split in splits and splits[tfds_split].num_examples:
    return int(splits[tfds_split].num_examples)
  ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
  n = int(ds.cardinality())
  if n < 0:
    n = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
  return n


def _to_unit(images: tf.Tensor, dtype, out=tf.float32) -> tf.Tensor:
  """Integer images scaled to [0, 1] in dtype `out`."""
  dtype = tf.as_dtype(dtype)
  x = tf.cast(images, out)
  return x / tf.constant(dtype.max, out) if dtype.is_integer else x


def channel_stats(builder, tfds_split: str, image_dtype):
  """Per-channel mean and std (float64) of `tfds_split`, one pass."""
  ds = builder.as_dataset(split=tfds_split, as_supervised=True,
                          shuffle_files=False)
  ds = ds.map(lambda x, y: x).batch(_STATS_BATCH)
  channels = builder.info.features[builder.info.supervised_keys[0]].shape[-1]

  def add(state, images):
    count, total, squares = state
    x = _to_unit(images, image_dtype, tf.float64)
    pixels = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float64)
    # Values lie in [0, 1], so float64 sums of squares lose nothing that
    # matters at ImageNet scale.
    return (count + pixels, total + tf.reduce_sum(x, [0, 1, 2]),
            squares + tf.reduce_sum(tf.square(x), [0, 1, 2]))

  zeros = tf.zeros([channels], tf.float64)
  count, total, squares = ds.reduce(
      (tf.constant(0.0, tf.float64), zeros, zeros), add)
  mean = (total / count).numpy()
  std = np.sqrt(np.maximum((squares / count).numpy() - mean**2, 0.0))
  return mean, np.where(std > 0, std, 1.0)


def _window_shuffle(ds: tf.data.Dataset, window: int,
                    key: tf.Tensor) -> tf.data.Dataset:
  """Permutes consecutive windows of `window` elements, statelessly."""

  def permute(number, elements):
    window_key = tf.random.experimental.stateless_fold_in(key, number)
    size = tf.shape(elements[0])[:1]
    perm = tf.argsort(tf.random.stateless_uniform(size, seed=window_key))
    return tuple(tf.gather(e, perm) for e in elements)

  return ds.batch(window).enumerate().map(permute).unbatch()


class TFDSDataset(base.Dataset):
  """One split of a TFDS image classification builder.

  Attributes:
    info: the split's `DatasetInfo`.
    tfds_split: the TFDS split read ('train', 'test' or 'validation').
    augment: whether batches are augmented (train split with --augment).
    mean, std: per-channel float64 statistics of --channel_normalize, or None.
  """

  def __init__(self, name: str, split: str, cfg):
    builder = _builder(name, cfg)
    image, label = _supervised_features(builder, name)
    _prepare(builder, name, cfg)
    self.tfds_split = _split_name(builder, name, split)
    n = _num_examples(builder, self.tfds_split)
    train = split == "train"
    if train:
      n = arrays.subset_size(f"tfds:{name}", n, cfg)
    self.info = base.DatasetInfo(
        name=f"tfds:{name}", split=split, num_classes=int(label.num_classes),
        input_shape=tuple(int(d) for d in image.shape), num_examples=n)
    self.augment = bool(cfg.augment and train)
    self.shuffle_buffer = cfg.shuffle_buffer
    self._image_dtype = image.dtype
    self._transform = (arrays.train_label_transform(
        n, self.info.num_classes, cfg) if train else None)
    self.mean = self.std = None
    if cfg.channel_normalize:
      train_split = _split_name(builder, name, "train")
      key = (builder.info.full_name, str(builder.data_dir), train_split,
             _num_examples(builder, train_split))
      if key not in _CHANNEL_STATS:
        _CHANNEL_STATS[key] = channel_stats(builder, train_split,
                                            self._image_dtype)
      self.mean, self.std = _CHANNEL_STATS[key]
    # Built once so that TFDS's in-memory cache of small datasets serves
    # every epoch.
    ds = builder.as_dataset(split=self.tfds_split, as_supervised=True,
                            shuffle_files=False)
    if train and cfg.train_subset:
      ds = ds.take(n)
    self._indexed = ds.enumerate().map(lambda i, xy: (i, xy[0], xy[1]))

  def _preprocess(self, seed: int, epoch: int, augment: bool):
    """The per-example map: scaling, augmentation, normalisation, labels."""
    height, width, channels = self.info.input_shape
    epoch_key = tf.constant([seed, epoch], tf.int64)
    mean = None if self.mean is None else tf.constant(self.mean, tf.float32)
    std = None if self.std is None else tf.constant(self.std, tf.float32)

    def fn(index, image, label):
      x = _to_unit(image, self._image_dtype)
      if augment:
        key = tf.random.experimental.stateless_fold_in(epoch_key, index)
        crop_key, flip_key = tf.unstack(
            tf.random.experimental.stateless_split(key, 2))
        x = tf.pad(x, [[4, 4], [4, 4], [0, 0]])
        x = tf.image.stateless_random_crop(x, [height, width, channels],
                                           seed=crop_key)
        x = tf.image.stateless_random_flip_left_right(x, seed=flip_key)
      if mean is not None:
        x = (x - mean) / std
      label = tf.cast(label, tf.int64)
      if self._transform is not None:
        label = self._transform.tf(index, label)
      return x, label

    return fn

  def batches(self, batch_size, *, shuffle=False, seed=0, epoch=0,
              start_batch=0, drop_remainder=False, pad=False):
    ds = self._indexed
    if shuffle:
      key = base.epoch_rng(seed, epoch, salt=1).integers(0, 2**62, size=2)
      ds = _window_shuffle(ds, self.shuffle_buffer,
                           tf.constant(key, tf.int64))
    if start_batch:
      ds = ds.skip(start_batch * batch_size)
    ds = ds.map(self._preprocess(seed, epoch, self.augment),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if pad:
      ds = base.pad_batches(ds, batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)

  def examples(self, indices):
    """The examples at `indices`, without augmentation (one pass at most)."""
    indices = base.check_indices(indices, self.info.num_examples)
    wanted = np.unique(indices)
    found_x, found_i, found_y = [], [], []
    if wanted.size:
      stop = int(wanted[-1]) + 1
      ds = self._indexed.take(stop)
      prep = self._preprocess(0, 0, augment=False)
      ds = ds.map(lambda i, x, y: (i,) + prep(i, x, y)).batch(_STATS_BATCH)
      for i, x, y in ds.as_numpy_iterator():
        keep = np.isin(i, wanted)
        found_i.append(i[keep])
        found_x.append(x[keep])
        found_y.append(y[keep])
    shape = (0,) + self.info.input_shape
    x = np.concatenate(found_x) if found_x else np.zeros(shape, np.float32)
    y = np.concatenate(found_y) if found_y else np.zeros([0], np.int64)
    pos = np.searchsorted(np.concatenate(found_i) if found_i else wanted,
                          indices)
    return x[pos], y[pos]


def load(name: str, split: str, cfg) -> TFDSDataset:
  """The `split` ('train' or 'test') of TFDS builder `name`."""
  return TFDSDataset(name, split, cfg)
