"""Stability thresholds of SGD, heavy ball and Nesterov on a quadratic."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity.errors import UserError
from tfcapacity.training import optim

ETA = 0.1
# (momentum, nesterov): plain SGD, heavy ball twice, Keras' Nesterov.
CASES = [(0.0, False), (0.9, False), (0.5, False), (0.9, True)]


def keras_run(curvature: float, beta: float, nesterov: bool,
              steps: int = 1500) -> float:
  """|x| after `steps` of the real Keras SGD on curvature x^2 / 2 from 1."""
  x = keras.Variable(1.0, dtype="float64")
  opt = keras.optimizers.SGD(learning_rate=ETA, momentum=beta,
                             nesterov=nesterov)
  opt.build([x])

  @tf.function
  def loop():
    for _ in tf.range(steps):
      with tf.GradientTape() as tape:
        loss = 0.5 * curvature * tf.square(x.value)
      opt.apply_gradients([(tape.gradient(loss, x.value), x)])

  loop()
  return abs(float(x.numpy()))


@pytest.mark.parametrize("beta, nesterov", CASES)
def test_keras_sgd_diverges_just_above_and_converges_just_below(
    beta, nesterov):
  threshold = optim.stability_threshold("sgd", ETA, beta, nesterov)
  # 1500 steps: the slowest case needs ~350 at a 2% margin.
  assert keras_run(threshold * 1.02, beta, nesterov) > 1e6
  assert keras_run(threshold * 0.98, beta, nesterov) < 1e-6


def test_closed_forms():
  assert optim.stability_threshold("sgd", ETA) == 2 / ETA
  for beta in (0.5, 0.9):
    assert optim.stability_threshold("sgd", ETA, beta) == pytest.approx(
        2 * (1 + beta) / ETA, rel=1e-15)
  # Nesterov without momentum is plain SGD in Keras.
  assert optim.stability_threshold("sgd", ETA, 0.0, True) == 2 / ETA
  # Nesterov tolerates less curvature than the heavy ball at beta > 0.
  assert (optim.stability_threshold("sgd", ETA, 0.9, True)
          < optim.stability_threshold("sgd", ETA, 0.9, False))


def keras_step_numpy(state, h, beta, nesterov):
  """One step of Keras' SGD rules on (x, v) with eta * curvature = h."""
  x, v = state
  g = h * x  # eta * gradient.
  v = beta * v - g
  x = x + (beta * v - g if nesterov else v)
  return np.array([x, v])


def spectral_radius(h, beta, nesterov):
  # The iteration is linear: its matrix has the images of e_1, e_2 as
  # columns.
  m = np.stack([keras_step_numpy(e, h, beta, nesterov)
                for e in np.eye(2)], axis=1)
  return np.max(np.abs(np.linalg.eigvals(m)))


@pytest.mark.parametrize("beta, nesterov", CASES + [(0.3, True)])
def test_spectral_radius_crosses_one_at_the_threshold(beta, nesterov):
  threshold = optim.stability_threshold("sgd", ETA, beta, nesterov)
  # The stable set is an interval (0, threshold): bisect for its end.
  lo, hi = 0.5 * threshold, 2.0 * threshold
  assert spectral_radius(ETA * lo, beta, nesterov) < 1
  assert spectral_radius(ETA * hi, beta, nesterov) > 1
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if spectral_radius(ETA * mid, beta, nesterov) < 1:
      lo = mid
    else:
      hi = mid
  assert lo == pytest.approx(threshold, rel=1e-9)


def test_no_threshold_and_bad_input():
  assert optim.stability_threshold("adam", ETA) is None
  assert optim.stability_threshold("sgd", 0.0, 0.9) is None
  with pytest.raises(UserError, match="learning rate"):
    optim.stability_threshold("sgd", -0.1)
  with pytest.raises(UserError, match="momentum"):
    optim.stability_threshold("sgd", ETA, 1.5)
  with pytest.raises(UserError, match="unknown optimizer"):
    optim.stability_threshold("rmsprop", ETA)


def test_threshold_from_optimizer():
  sgd = keras.optimizers.SGD(learning_rate=ETA, momentum=0.9, nesterov=True)
  assert optim.threshold_from_optimizer(sgd, 0.2) == pytest.approx(
      optim.stability_threshold("sgd", 0.2, 0.9, True))
  # Without a rate: the schedule's, at the optimiser's step.
  schedule = optim.Schedule(ETA, "step", steps_per_epoch=10,
                            total_steps=100, drop_epochs=(1,),
                            drop_factor=0.1)
  sgd = keras.optimizers.SGD(learning_rate=schedule, momentum=0.5)
  sgd.build([keras.Variable(1.0)])
  sgd.iterations.assign(15)
  assert optim.threshold_from_optimizer(sgd) == pytest.approx(
      2 * 1.5 / (ETA * 0.1), rel=1e-6)
  assert optim.threshold_from_optimizer(keras.optimizers.Adam()) is None
  assert optim.threshold_from_optimizer(keras.optimizers.RMSprop()) is None
  assert optim.threshold_from_optimizer(
      keras.optimizers.SGD(weight_decay=1e-4)) is None
