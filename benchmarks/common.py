"""Timing helpers shared by the benchmarks (scripts in this directory).

This 2-core machine's speed drifts by +-25% over minutes, so contenders are
timed in interleaved rounds and compared by the median of per-round ratios.
"""

import time

import numpy as np
import tensorflow as tf

from tfcapacity.objective import losses
from tfcapacity.objective import function as function_lib


def sync(out):
  """Waits for `out` (a tensor's value) so that timings are complete."""
  return out.numpy() if hasattr(out, "numpy") else out


def time_per_call(fn, calls):
  """Seconds per call of `fn` over `calls` calls, synchronised at the end."""
  start = time.perf_counter()
  for _ in range(calls):
    out = fn()
  sync(out)
  return (time.perf_counter() - start) / calls


def rounds(contenders, num_rounds, calls):
  """Per-round seconds per call of each contender, in rotating order.

  Args:
    contenders: name -> zero-argument callable.
    num_rounds: rounds; each round times every contender once.
    calls: calls per timing, one int for all or a dict by name.
  """
  times = {k: [] for k in contenders}
  keys = list(contenders)
  for r in range(num_rounds):
    for key in keys[r % len(keys):] + keys[:r % len(keys)]:
      n = calls[key] if isinstance(calls, dict) else calls
      times[key].append(time_per_call(contenders[key], n))
  return {k: np.array(v) for k, v in times.items()}


def median_ratio(a, b):
  return float(np.median(a / b))


def ratio_quartiles(a, b):
  """Median and quartiles of the per-round ratios a / b."""
  r = a / b
  return float(np.median(r)), tuple(np.percentile(r, [25, 75]))


def flat_gradient(model, x, y):
  """The fair baseline: a `tf.function` returning the flat gradient of the
  mean cross-entropy over `x` in inference mode (the examples held as
  constants, as the curvature and gradient operators hold theirs)."""
  x, y = tf.constant(x), tf.constant(y)

  @tf.function
  def gradient():
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(losses.cross_entropy(y, model(x, training=False)))
    return function_lib.flatten(tape.gradient(loss, model.trainable_variables))

  return gradient
