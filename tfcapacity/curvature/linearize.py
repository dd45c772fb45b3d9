"""Adaptive linearisation of the rectifiers (papers/003, Sec. 2.5).

Each rectifier of a `leaky_relu` model (`resnet`, `mlp`, `fc_resnet`) is an
`AdaptiveLeakyReLU` with a slope s in [0, 1] for x < 0: s = 0 is a ReLU,
s = 1 the identity. The slopes are not trained by the optimizer. Every
`--linearize_every_steps` steps this callback:

  1. takes the Hessian of the mean training loss over fixed examples
     (`--linearize_examples`, drawn once with the run's seed) with respect
     to every trainable variable AND the slopes, as extra coordinates;
  2. finds its dominant eigenvector v by power iteration on Hessian-vector
     products (warm-started from the previous one; `--curvature_tol`,
     `--curvature_max_iterations`, `--curvature_bn_mode`, whose `auto`
     and batches follow the run as in the curvature callback);
  3. moves each layer's slope by the sign of its component v_l:
     s <- clip(s - delta_minus, 0, 1) when v_l > 0, else
     s <- clip(s + delta_plus, 0, 1) (`--delta_minus`, `--delta_plus`).

An eigenvector's sign is arbitrary, so the rule needs an orientation. We
orient v so that it points uphill, v . grad L >= 0 (grad over the same
coordinates); when v . grad L = 0 exactly, so that its largest-magnitude
component is positive. The paper leaves the orientation unstated.

Logged: `linearization/slope/<layer>`, `linearization/component/<layer>`,
`linearization/mean_slope` (the mean of the layers' slopes after the
update: how far the network as a whole has moved from ReLU, 0, towards
linear, 1), `linearization/eigenvalue`, `linearization/iterations`. Unlike the
measurement callbacks, this one changes the model, so its flags are part
of the run's identity.
"""

from __future__ import annotations

import functools

import numpy as np

from tfcapacity import objective
from tfcapacity.curvature import eigen
from tfcapacity.curvature import hvp
from tfcapacity.errors import UserError
from tfcapacity.models import layers as layers_lib
from tfcapacity.training import callbacks as callbacks_lib
from tfcapacity.objective import function as function_lib

_SALT = 0x11A2

fixed_indices = functools.partial(callbacks_lib.fixed_indices, salt=_SALT)


def orient(vector: np.ndarray, gradient: np.ndarray) -> np.ndarray:
  """`vector` or its negative: uphill (v . g > 0), else max entry positive."""
  vector = np.asarray(vector, np.float64)
  dot = float(np.dot(vector, np.asarray(gradient, np.float64)))
  if dot < 0:
    return -vector
  if dot == 0 and vector[np.argmax(np.abs(vector))] < 0:
    return -vector
  return vector


def update_slopes(slopes, components, delta_minus: float,
                  delta_plus: float) -> np.ndarray:
  """The rule of Sec. 2.5: down by delta_minus where the component is > 0,
  up by delta_plus elsewhere, clipped to [0, 1]."""
  slopes = np.asarray(slopes, np.float64)
  components = np.asarray(components, np.float64)
  moved = np.where(components > 0, slopes - delta_minus, slopes + delta_plus)
  return np.clip(moved, 0.0, 1.0)


class LinearizationCallback(callbacks_lib.Callback):
  """Moves the rectifier slopes by the dominant Hessian eigenvector."""

  name = "linearization"

  def __init__(self, cfg):
    for flag in ("delta_minus", "delta_plus"):
      value = getattr(cfg, flag)
      if not 0.0 <= value <= 1.0:
        raise UserError(f"--{flag} must be in [0, 1]; got {value}")
    if cfg.activation != "leaky_relu":
      raise UserError(
          f"--linearize_every_steps needs rectifiers with slopes: "
          f"--activation=leaky_relu (got --activation={cfg.activation})")
    self.cfg = cfg
    self.every_steps = cfg.linearize_every_steps
    self.operator = None
    self.layers = []
    self.vector = None

  def due(self, step, epoch, epoch_end):
    # After steps N, 2N, ...: never before training has moved (step 0).
    return step > 0 and step % self.every_steps == 0

  def on_train_begin(self, ctx):
    cfg = self.cfg
    self.layers = layers_lib.slope_layers(ctx.model)
    if not self.layers:
      raise UserError(f"--linearize_every_steps: the {cfg.model} model has "
                      f"no adaptive rectifiers to move; use "
                      f"--activation=leaky_relu")
    index = fixed_indices(cfg.seed, ctx.train_data.info.num_examples,
                          cfg.linearize_examples)
    x, y = ctx.train_data.examples(index)
    params = function_lib.select_params(ctx.model, None, include_slopes=True)
    # The same batch-norm mode and batches as the curvature callback.
    bn_mode = objective.resolve_bn_mode(cfg.curvature_bn_mode,
                                        cfg.normalization)
    batch_size = cfg.curvature_batch_size or objective.measurement_batch_size(
        len(y), bn_mode, ctx.global_batch_size)
    self.operator = hvp.HessianOperator(
        ctx.model, x, y, params=params, loss=cfg.loss, bn_mode=bn_mode,
        batch_size=batch_size, strategy=ctx.strategy,
        ghost_batch_size=(cfg.ghost_batch_size
                          if cfg.normalization == "ghost" else None))

  def __call__(self, ctx):
    cfg = self.cfg
    result = eigen.power_iteration(
        self.operator, v0=self.vector, tol=cfg.curvature_tol,
        max_iterations=cfg.curvature_max_iterations, seed=int(ctx.step))
    _, gradient = self.operator.loss_and_gradient()
    vector = orient(np.asarray(result.eigenvector), np.asarray(gradient))
    self.vector = vector.astype(np.float32)
    # select_params puts the slopes last, one scalar per layer, in order.
    components = vector[-len(self.layers):]
    slopes = update_slopes([float(l.slope.numpy()) for l in self.layers],
                           components, cfg.delta_minus, cfg.delta_plus)
    out = {"linearization/eigenvalue": float(result.eigenvalue),
           "linearization/iterations": float(result.iterations),
           "linearization/mean_slope": float(np.mean(slopes))}
    for layer, slope, component in zip(self.layers, slopes, components):
      layer.slope.assign(float(slope))
      out[f"linearization/slope/{layer.name}"] = float(slope)
      out[f"linearization/component/{layer.name}"] = float(component)
    return out
