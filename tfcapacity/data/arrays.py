"""The train-split flags shared by every source, and in-memory splits.

Sources that produce whole numpy arrays (digits, mnist1d, synthetic) hand
both splits to `make_array_split`, which returns the requested one as an
`ArrayDataset`. The training split alone is changed by the data flags, in
this order:

1. `--train_subset=N` keeps the first N training examples in storage order,
   so a subset is a prefix of the full split and larger subsets contain
   smaller ones.
2. `--random_labels` / `--label_noise` replace labels of that subset by a
   `LabelTransform` seeded by `--seed` (Zhang et al. 2017, "Understanding
   deep learning requires rethinking generalization", Sec. 2).

The test split is always returned as the source produced it, so test
accuracy keeps measuring the true labels, with two exceptions that change
both splits: `--unit_norm_inputs` scales every input to norm 1, and
`--task=random_sign` replaces every label of both splits by a fixed random
sign (Du et al.'s setting), stored as 0 (y = -1) or 1 (y = +1), with
`num_classes` 1: the model has one output. `subset_size` and
`train_label_transform` are the two steps on their own, for sources that
stream their examples instead of holding them in memory.
"""

from __future__ import annotations

import numpy as np

from tfcapacity import config as config_lib
from tfcapacity.data.base import ArrayDataset, DatasetInfo, LabelTransform
from tfcapacity.errors import UserError


def subset_size(name: str, num_examples: int, cfg: config_lib.Config) -> int:
  """Training examples kept after `--train_subset`.

  Args:
    name: the dataset name, for the error message.
    num_examples: size of the full training split.
    cfg: flag values; reads `train_subset`.

  Returns:
    `cfg.train_subset` if set, else `num_examples`.

  Raises:
    UserError: `--train_subset` is larger than the training split.
  """
  n = cfg.train_subset
  if n is None:
    return num_examples
  if n > num_examples:
    raise UserError(
        f"--train_subset={n} exceeds the {num_examples} training examples of "
        f"dataset {name!r}; use --train_subset<={num_examples}")
  return int(n)


def train_label_transform(num_examples: int, num_classes: int,
                          cfg: config_lib.Config) -> LabelTransform | None:
  """The label transform of a training split of `num_examples`, or None.

  None when neither `--random_labels` nor `--label_noise` is set, so that
  sources can skip the work entirely.
  """
  if not cfg.random_labels and not cfg.label_noise:
    return None
  return LabelTransform(num_examples, num_classes,
                        random_labels=cfg.random_labels,
                        label_noise=cfg.label_noise, seed=cfg.seed)


def make_array_split(name: str, split: str, x_train: np.ndarray,
                     y_train: np.ndarray, x_test: np.ndarray,
                     y_test: np.ndarray, num_classes: int,
                     cfg: config_lib.Config) -> ArrayDataset:
  """One split of an in-memory source, with the train-split flags applied.

  Args:
    name: dataset name recorded in `DatasetInfo`.
    split: 'train' or 'test'.
    x_train, y_train: the full training split, examples along axis 0.
    x_test, y_test: the test split.
    num_classes: number of classes; labels must lie in [0, num_classes).
    cfg: flag values (`train_subset`, `random_labels`, `label_noise`, `seed`).

  Returns:
    An `ArrayDataset` of `split`; its input shape is `x.shape[1:]`.

  Raises:
    UserError: `--train_subset` too large, labels out of range, or
      non-finite features.
  """
  if split == "train":
    n = subset_size(name, len(y_train), cfg)
    x, y = x_train[:n], y_train[:n]
    transform = train_label_transform(n, num_classes, cfg)
  elif split == "test":
    x, y, transform = x_test, y_test, None
  else:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if len(x) != len(y):
    raise ValueError(f"{name} ({split}): {len(x)} inputs but {len(y)} labels")
  if getattr(cfg, "unit_norm_inputs", False):
    x = unit_norm(x, f"dataset {name!r} ({split})")
  if getattr(cfg, "task", "classes") == "random_sign":
    y = random_signs(len(y), cfg.seed, split)
    num_classes, transform = 1, None
  info = DatasetInfo(name=name, split=split, num_classes=int(num_classes),
                     input_shape=tuple(int(d) for d in x.shape[1:]),
                     num_examples=int(len(y)))
  return ArrayDataset(info, x, y, label_transform=transform)


def unit_norm(x: np.ndarray, where: str) -> np.ndarray:
  """Every example (flattened) scaled to Euclidean norm 1.

  Raises:
    UserError: an example is all zeros (it has no direction).
  """
  x = np.asarray(x, dtype=np.float64)
  norms = np.linalg.norm(x.reshape(len(x), -1), axis=1)
  if len(x) and not np.all(norms > 0):
    raise UserError(f"{where}: example {int(np.argmin(norms))} is all zeros "
                    f"and has no unit-norm version; drop "
                    f"--unit_norm_inputs or the example")
  return (x / norms.reshape((-1,) + (1,) * (x.ndim - 1))).astype(np.float32)


def random_signs(num_examples: int, seed: int, split: str) -> np.ndarray:
  """The fixed labels of `--task=random_sign`: 0 (y = -1) or 1 (y = +1),
  each with probability 1/2, drawn from (seed, split)."""
  salt = {"train": 0x5167, "test": 0x5168}[split]
  rng = np.random.default_rng([int(seed), salt])
  return rng.integers(0, 2, size=int(num_examples), dtype=np.int64)
