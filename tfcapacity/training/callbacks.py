"""The measurement interface: callbacks that return dicts of scalars.

A measurement (lambda_max, gradient confusion, distance from init, ...) is a
`Callback` that the loop calls every `every_steps` steps or `every_epochs`
epochs with a `Context`; it returns `{'group/name': float}` and the loop logs
those scalars to TensorBoard and to results.json's `measurements` (one row
per step at which any callback ran, evaluation steps included). The loop
never changes for a new measurement (the pattern of init2winit's callbacks),
and knows none: the measurements live with what they measure
(tfcapacity.curvature, tfcapacity.gradients) and `tfcapacity.measurements`
builds those that the flags ask for.

The loop times each callback and logs `timing/<name>_seconds`, so training
throughput stays honest when measurements are expensive. A callback may also
say how it measures (`Callback.info()`: its batch-norm mode, batch, number of
examples, ...); the loop writes that to results.json's `callbacks`, keyed by
the callback's name, so that a result carries its method.

Measurements leave the model alone, which is why their flags may change when
a run resumes. The one intervention, adaptive linearisation
(`tfcapacity.curvature.linearize`), uses the same interface but moves the
rectifier slopes; its flags belong to the run's identity.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class Context:
  """What a callback may look at. Measurements must not change the model."""
  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  strategy: tf.distribute.Strategy
  cfg: Any                   # tfcapacity.config.Config
  train_data: Any            # tfcapacity.data.Dataset, train split
  test_data: Any             # tfcapacity.data.Dataset, test split
  model_dir: str | None
  step: int = 0
  epoch: int = 0
  global_batch_size: int = 0
  steps_per_epoch: int = 0
  # The learning rate of the last step taken (of the first step at step 0):
  # the rate the model at `step` was moving with.
  learning_rate: float = 0.0


class Callback:
  """Base class: override `__call__`, set a frequency.

  Attributes:
    name: used for the timing scalar and in log lines.
    log_keys: the scalars of the console line the loop prints after each
      call ((): none, the callback logs its own; None: all).
    every_steps: call every this many optimiser steps (0: never by steps).
    every_epochs: call at the end of every this many epochs (0: never).
  """

  name = "callback"
  every_steps = 0
  every_epochs = 0
  # Scalars the loop prints in one console line after each call (a
  # callback that logs its own line leaves it empty); None: all of them.
  log_keys: tuple[str, ...] | None = ()

  def check(self, ctx: Context) -> None:
    """Checks the callback's flags against the built model and data.

    Called when the trainer is built, before the run directory is touched
    (the model is not restored yet). Raises UserError for flags that cannot
    work (a missing layer, too many examples, ...).
    """

  def on_train_begin(self, ctx: Context) -> None:
    """Called once, after the model is built or restored."""

  def info(self) -> dict:
    """How the callback measures, for results.json's `callbacks` ({}: none).

    Called after `on_train_begin`, whenever results.json is written. The
    values must be JSON-ready (str, bool, int, float, None, lists, dicts).
    """
    return {}

  def __call__(self, ctx: Context) -> dict[str, float]:
    raise NotImplementedError

  def on_train_end(self, ctx: Context) -> None:
    """Called once after the last step."""

  def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
    """Whether the callback runs at `step` (after it) / `epoch` end."""
    if self.every_steps and step % self.every_steps == 0:
      return True
    return bool(epoch_end and self.every_epochs
                and epoch % self.every_epochs == 0)


def fixed_indices(seed: int, num_examples: int, size: int, *,
                  salt: int) -> np.ndarray:
  """Examples a measurement uses throughout a run (sorted indices).

  Drawn once from `(seed, salt)`: each measurement has its own salt, so its
  draw differs from the data order and from other measurements'.
  """
  rng = np.random.default_rng([seed, salt])
  return np.sort(rng.choice(num_examples, min(size, num_examples),
                            replace=False))
