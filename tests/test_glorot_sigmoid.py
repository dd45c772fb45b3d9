"""--kernel_init=glorot_sigmoid: Glorot uniform with its limit times 4.

The expected law is computed here from the formula, U(-r, r) with
r = 4 sqrt(6 / (fan_in + fan_out)), and compared with the weights of a
large layer: the extreme values approach +-r and the variance is r^2 / 3.
"""

import math

import numpy as np
import keras

from tfcapacity import config
from tfcapacity import models
from tfcapacity.models import layers

FAN_IN, WIDTH, NUM_CLASSES = 400, 600, 10


def hidden_kernel(kernel_init, seed=0):
  keras.utils.set_random_seed(seed)
  model = models.get("mlp", input_shape=(FAN_IN,), num_classes=NUM_CLASSES,
                     width=WIDTH, depth=1, activation="sigmoid",
                     kernel_init=kernel_init)
  kernels = [v.numpy() for v in model.trainable_variables
             if tuple(v.shape) == (FAN_IN, WIDTH)]
  assert len(kernels) == 1
  return kernels[0]


def test_limits_and_variance_follow_the_formula():
  w = hidden_kernel("glorot_sigmoid")
  r = 4.0 * math.sqrt(6.0 / (FAN_IN + WIDTH))
  n = w.size
  assert np.abs(w).max() <= r * (1 + 1e-6)
  # With n = 240000 uniform draws the extremes lie within r * 20 / n of +-r
  # with probability 1 - 2 exp(-20).
  assert w.max() > r * (1 - 20 / n) and w.min() < -r * (1 - 20 / n)
  # Sample variance of U(-r, r): r^2/3, standard error r^2 sqrt(4/45 / n).
  se = r ** 2 * math.sqrt(4 / 45 / n)
  assert abs(w.var() - r ** 2 / 3) < 5 * se
  assert abs(w.mean()) < 5 * r / math.sqrt(3 * n)
  # Uniform: a quarter of the mass in each quarter of [-r, r].
  counts, _ = np.histogram(w, bins=4, range=(-r, r))
  assert np.all(np.abs(counts / n - 0.25) < 0.01)


def test_four_times_glorot_uniform():
  sigmoid = hidden_kernel("glorot_sigmoid")
  plain = hidden_kernel("glorot_uniform")
  r = math.sqrt(6.0 / (FAN_IN + WIDTH))
  assert plain.max() <= r * (1 + 1e-6) and sigmoid.max() > 3.9 * r
  ratio = sigmoid.std() / plain.std()
  assert abs(ratio - layers.GLOROT_SIGMOID_FACTOR) < 0.05


def test_seeded_and_fresh_per_layer():
  a, b = hidden_kernel("glorot_sigmoid", 3), hidden_kernel("glorot_sigmoid", 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, hidden_kernel("glorot_sigmoid", 4))


def test_the_flag_accepts_it():
  cfg = config.parse_args(["--model=mlp", "--kernel_init=glorot_sigmoid"])
  assert cfg.kernel_init == "glorot_sigmoid"
