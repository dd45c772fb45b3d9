"""Optimisers and learning-rate schedules from flags.

Schedules are functions of the optimiser step, with epochs converted through
`steps_per_epoch`: `constant`; `step`, multiplying the rate by
`--lr_drop_factor` at each epoch in `--lr_drop_epochs` (the maxi-batch
study's drop at epoch 80); `cosine`, from the base rate to 0 over the run.
`--warmup_epochs` multiplies any of them by a linear ramp from 0.

`stability_threshold` gives the largest curvature an optimiser's iteration
tolerates on a quadratic (2/eta for plain SGD); `threshold_from_optimizer`
reads it off a Keras optimiser, for comparison with a measured lambda_max.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tfcapacity.errors import UserError
from tfcapacity.errors import choices_error

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")


@keras.saving.register_keras_serializable(package="tfcapacity")
class Schedule(keras.optimizers.schedules.LearningRateSchedule):
  """The learning rate at an optimiser step."""

  def __init__(self, base: float, kind: str, steps_per_epoch: int,
               total_steps: int, drop_epochs=(), drop_factor: float = 0.1,
               warmup_epochs: float = 0.0):
    if kind not in SCHEDULES:
      raise choices_error("learning-rate schedule", kind, SCHEDULES)
    self.base = float(base)
    self.kind = kind
    self.steps_per_epoch = int(steps_per_epoch)
    self.total_steps = max(int(total_steps), 1)
    self.drop_epochs = tuple(float(e) for e in drop_epochs)
    self.drop_factor = float(drop_factor)
    self.warmup_epochs = float(warmup_epochs)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    lr = tf.constant(self.base, tf.float32)
    if self.kind == "step" and self.drop_epochs:
      # Drops take effect at the first step of the named epoch.
      epoch = tf.floor(step / self.steps_per_epoch)
      drops = tf.reduce_sum(tf.cast(
          epoch >= tf.constant(self.drop_epochs, tf.float32), tf.float32))
      lr = lr * tf.pow(self.drop_factor, drops)
    elif self.kind == "cosine":
      progress = tf.minimum(step / self.total_steps, 1.0)
      lr = lr * 0.5 * (1.0 + tf.cos(math.pi * progress))
    if self.warmup_epochs > 0:
      warmup_steps = self.warmup_epochs * self.steps_per_epoch
      lr = lr * tf.minimum(1.0, (step + 1.0) / warmup_steps)
    return lr

  def get_config(self):
    return dict(base=self.base, kind=self.kind,
                steps_per_epoch=self.steps_per_epoch,
                total_steps=self.total_steps, drop_epochs=self.drop_epochs,
                drop_factor=self.drop_factor,
                warmup_epochs=self.warmup_epochs)


def make_schedule(cfg, steps_per_epoch: int, total_steps: int) -> Schedule:
  return Schedule(cfg.learning_rate, cfg.lr_schedule, steps_per_epoch,
                  total_steps, cfg.lr_drop_epochs, cfg.lr_drop_factor,
                  cfg.warmup_epochs)


def make_optimizer(cfg, schedule) -> keras.optimizers.Optimizer:
  """SGD (momentum, Nesterov) or Adam, with the learning rate `schedule`.

  Weight decay is not the optimiser's business here: the loop adds an L2
  term to the loss, so that SGD and Adam see the same objective.
  """
  if cfg.optimizer == "sgd":
    return keras.optimizers.SGD(learning_rate=schedule,
                                momentum=cfg.momentum, nesterov=cfg.nesterov)
  if cfg.optimizer == "adam":
    return keras.optimizers.Adam(learning_rate=schedule)
  raise choices_error("optimizer", cfg.optimizer, OPTIMIZERS)


def stability_threshold(optimizer: str, learning_rate: float,
                        momentum: float = 0.0,
                        nesterov: bool = False) -> float | None:
  """The largest curvature the optimiser's iteration tolerates.

  On the quadratic f(x) = lambda x^2 / 2 (so g = lambda x) the iteration of
  `keras.optimizers.SGD` is linear in (x, v); with h = eta * lambda it is
  stable (both roots of its characteristic polynomial inside the unit
  circle) exactly for 0 < lambda < threshold:

  * plain SGD, x <- x - eta g: x <- (1 - h) x, stable for |1 - h| < 1,
    threshold 2 / eta.
  * heavy ball (momentum beta, nesterov=False), v <- beta v - eta g;
    x <- x + v. The matrix [[1 - h, beta], [-h, beta]] on (x, v) has
    z^2 - (1 + beta - h) z + beta. By the Jury conditions (for
    z^2 + a1 z + a0: |a0| < 1, 1 + a1 + a0 > 0, 1 - a1 + a0 > 0) it is
    stable for beta < 1, h > 0 and h < 2 (1 + beta): threshold
    2 (1 + beta) / eta.
  * Nesterov (nesterov=True), as Keras writes it: v <- beta v - eta g;
    x <- x + beta v - eta g, with the new v and the gradient at the old x.
    Then x <- (1 - h (1 + beta)) x + beta^2 v; the matrix
    [[1 - h (1 + beta), beta^2], [-h, beta]] has trace (1 + beta)(1 - h)
    and determinant beta (1 - h), so
    z^2 - (1 + beta)(1 - h) z + beta (1 - h): the polynomial of the
    textbook form y = x + beta (x - x_prev); x <- y - eta grad(y).
    Jury: 1 + a1 + a0 = h > 0; 1 - a1 + a0 = 1 + (1 + 2 beta)(1 - h) > 0,
    i.e. h < 2 (1 + beta) / (1 + 2 beta); and |a0| = beta |1 - h| < 1 holds
    in that range. Threshold 2 (1 + beta) / (eta (1 + 2 beta)).

  At beta = 0 both momentum forms reduce to 2 / eta. At beta = 1 the heavy
  ball's determinant is 1: below 4 / eta it oscillates without decaying,
  above it diverges; 4 / eta is returned as that boundary. Negative
  curvature diverges under every rate. Adam has no such threshold (its
  step is normalised by the gradient's running scale): None.

  Args:
    optimizer: `sgd` or `adam` (the values of --optimizer).
    learning_rate: eta, the current rate. 0 moves nothing, so no curvature
      is unstable: None.
    momentum: beta in [0, 1], as `keras.optimizers.SGD` takes it.
    nesterov: Keras' Nesterov form (see above).

  Returns:
    The threshold in units of curvature, or None when there is none.

  Raises:
    UserError: an unknown optimiser, a negative or non-finite rate, or a
      momentum outside [0, 1].
  """
  if optimizer not in OPTIMIZERS:
    raise choices_error("optimizer", optimizer, OPTIMIZERS)
  eta, beta = float(learning_rate), float(momentum)
  if not math.isfinite(eta) or eta < 0:
    raise UserError(f"learning rate must be finite and >= 0 for a stability "
                    f"threshold; got {learning_rate}")
  if not 0.0 <= beta <= 1.0:
    raise UserError(f"momentum must be in [0, 1]; got {momentum}")
  if optimizer == "adam" or eta == 0:
    return None
  if nesterov:
    return 2.0 * (1.0 + beta) / (eta * (1.0 + 2.0 * beta))
  return 2.0 * (1.0 + beta) / eta


def threshold_from_optimizer(optimizer: keras.optimizers.Optimizer,
                             learning_rate: float | None = None
                             ) -> float | None:
  """`stability_threshold` of a Keras optimiser, or None if unknown.

  Knows `keras.optimizers.SGD` (its `momentum` and `nesterov`) and
  `keras.optimizers.Adam`. Anything else, or an SGD with decoupled
  `weight_decay` (a different iteration; tfcapacity puts the L2 term in the
  loss instead), gives None.

  Args:
    optimizer: a Keras optimiser.
    learning_rate: eta; by default the optimiser's current rate (its
      schedule at `optimizer.iterations`).
  """
  if (not isinstance(optimizer, keras.optimizers.SGD)
      or optimizer.weight_decay):
    return None  # Adam included: it has no threshold.
  if learning_rate is None:
    learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
  return stability_threshold("sgd", learning_rate,
                             momentum=float(optimizer.momentum),
                             nesterov=bool(optimizer.nesterov))
