"""Gaussian inputs labelled by a random teacher network, or at random.

Inputs are i.i.d. x ~ N(0, I_d) with d = `--synthetic_dim`:
`--synthetic_examples` training and `--synthetic_test_examples` test
examples, drawn from separate random streams so that the test set does not
change with the training-set size.

Labels (`--synthetic_labels`):

* 'teacher': the argmax over `--synthetic_classes` outputs of a fixed
  random network with one tanh hidden layer, a multi-class version of the
  student-teacher setting (e.g. Saad & Solla 1995, "On-line learning in
  soft committee machines", Phys. Rev. E 52). The labels are a
  deterministic function of the input, so a large enough student can reach
  low test error.
* 'random': uniform random classes, independent of the inputs, so nothing
  beyond memorisation is learnable (test accuracy stays at chance; compare
  `--random_labels`, which replaces the labels of any dataset).

The teacher has `TEACHER_WIDTH` hidden units, first-layer weights N(0, 1/d)
and no biases: tanh is odd, so every logit has mean zero over the inputs
and no class is favoured on average (random hidden biases made some classes
take 40-80% of the examples and others almost none). Output weights are
drawn N(0, 1) and each output column is rescaled so that its logit has unit
standard deviation over `_REFERENCE` reference inputs drawn from the
teacher's stream; with d=20 and 10 classes this keeps every class between
roughly 7% and 15% of the examples. Every draw comes from numpy Generators
seeded by `--data_seed` and a per-stream constant; no global random state is
read or changed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcapacity import config as config_lib
from tfcapacity.data import arrays
from tfcapacity.data.base import ArrayDataset

NAME = "synthetic"
TEACHER_WIDTH = 100
_REFERENCE = 10000

# One independent stream per kind of draw.
_TEACHER, _TRAIN_X, _TEST_X, _TRAIN_Y, _TEST_Y = range(5)
_SALT = 0x5E7


def _rng(data_seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(data_seed), stream, _SALT])


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A one-hidden-layer tanh network: logits = tanh(x w1) w2."""
  w1: np.ndarray  # [dim, width]
  w2: np.ndarray  # [width, num_classes]

  def logits(self, x: np.ndarray) -> np.ndarray:
    return np.tanh(x @ self.w1) @ self.w2

  def labels(self, x: np.ndarray) -> np.ndarray:
    return np.argmax(self.logits(x), axis=1).astype(np.int64)


def teacher(dim: int, num_classes: int, data_seed: int) -> Teacher:
  """The teacher network of `data_seed` (float64 weights)."""
  rng = _rng(data_seed, _TEACHER)
  w1 = rng.standard_normal((dim, TEACHER_WIDTH)) / np.sqrt(dim)
  w2 = rng.standard_normal((TEACHER_WIDTH, num_classes))
  # Columns with larger logit variance win the argmax more often: equalise
  # the variances so that the classes come out roughly balanced.
  reference = rng.standard_normal((_REFERENCE, dim))
  w2 = w2 / (np.tanh(reference @ w1) @ w2).std(axis=0)
  return Teacher(w1, w2)


def arrays_for(cfg: config_lib.Config) -> dict:
  """Both splits for `cfg`: float32 `x_*` [n, dim], int64 `y_*` [n]."""
  d, k, seed = cfg.synthetic_dim, cfg.synthetic_classes, cfg.data_seed
  x_train = _rng(seed, _TRAIN_X).standard_normal(
      (cfg.synthetic_examples, d)).astype(np.float32)
  x_test = _rng(seed, _TEST_X).standard_normal(
      (cfg.synthetic_test_examples, d)).astype(np.float32)
  if cfg.synthetic_labels == "teacher":
    # The teacher labels the float32 inputs the student sees, so the labels
    # are exactly the teacher's function of the stored data.
    net = teacher(d, k, seed)
    y_train = net.labels(x_train.astype(np.float64))
    y_test = net.labels(x_test.astype(np.float64))
  else:
    y_train = _rng(seed, _TRAIN_Y).integers(0, k, len(x_train), np.int64)
    y_test = _rng(seed, _TEST_Y).integers(0, k, len(x_test), np.int64)
  return {"x_train": x_train, "y_train": y_train, "x_test": x_test,
          "y_test": y_test}


def load(arg, split: str, cfg: config_lib.Config) -> ArrayDataset:
  """The `split` of the synthetic dataset (`arg` is unused)."""
  del arg
  a = arrays_for(cfg)
  return arrays.make_array_split(NAME, split, a["x_train"], a["y_train"],
                                 a["x_test"], a["y_test"],
                                 cfg.synthetic_classes, cfg)
