"""Optimisers and learning-rate schedules from flags.

Schedules are functions of the optimiser step, with epochs converted through
`steps_per_epoch`: `constant`; `step`, multiplying the rate by
`--lr_drop_factor` at each epoch in `--lr_drop_epochs` (the maxi-batch
study's drop at epoch 80); `cosine`, from the base rate to 0 over the run.
`--warmup_epochs` multiplies any of them by a linear ramp from 0.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

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
