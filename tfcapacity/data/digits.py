"""scikit-learn's handwritten digits: 1797 8x8 grey images of 10 classes.

The data ship with scikit-learn (`sklearn.datasets.load_digits`, the test
part of the UCI "Optical Recognition of Handwritten Digits" set, Alpaydin &
Kaynak 1998), so nothing is downloaded. Pixels are counts in 0..16 and are
divided by 16 into [0, 1].

The train/test split is fixed: a stratified 80/20 split with
`random_state=0`, independent of `--seed` and `--data_seed`, so that every
run, whatever its seed, is evaluated on the same 360 test images.

`--input_format`: 'flat' gives 64-vectors, 'image' gives 8x8x1 images
(channels last), 'auto' gives images for the convolutional model
(`--model=resnet`) and vectors otherwise.
"""

from __future__ import annotations

import functools

import numpy as np

from tfcapacity import config as config_lib
from tfcapacity.data import arrays
from tfcapacity.data.base import ArrayDataset

NAME = "digits"
NUM_CLASSES = 10
TEST_SIZE = 0.2
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _splits():
  """(x_train, y_train, x_test, y_test) as 8x8 float32 images in [0, 1]."""
  from sklearn import datasets, model_selection
  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)
  y = digits.target.astype(np.int64)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=TEST_SIZE, stratify=y, random_state=SPLIT_SEED)
  # The cache hands out the same arrays to every caller: make them read-only
  # so that no caller can change another's data.
  for a in (x_train, y_train, x_test, y_test):
    a.setflags(write=False)
  return x_train, y_train, x_test, y_test


def input_format(cfg: config_lib.Config) -> str:
  """'flat' or 'image': `--input_format` with 'auto' resolved."""
  if cfg.input_format == "auto":
    return "image" if cfg.model == "resnet" else "flat"
  return cfg.input_format


def load(arg, split: str, cfg: config_lib.Config) -> ArrayDataset:
  """The `split` of digits (`arg` is unused: the name takes no argument)."""
  del arg
  x_train, y_train, x_test, y_test = _splits()
  shape = (8, 8, 1) if input_format(cfg) == "image" else (64,)
  x_train = x_train.reshape((-1,) + shape)
  x_test = x_test.reshape((-1,) + shape)
  return arrays.make_array_split(NAME, split, x_train, y_train, x_test,
                                 y_test, NUM_CLASSES, cfg)
