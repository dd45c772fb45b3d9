"""What the maxi-batch study adds to a training step (papers/003).

Three pieces the training loop wires into its steps when their flags ask:

  * `DistanceTracker` (`--track_distance`, Fig. 5 of the study): the
    distance ||theta_t - theta_0|| of the parameters from their initial
    values, per layer and in total, the norm ||theta_t|| of all of them,
    and the path length sum_t ||theta_{t+1} - theta_t||, accumulated after
    every step inside the training graph. A layer is the set of variables
    whose paths share a prefix (`hidden_0/kernel` and `hidden_0/bias` form
    `hidden_0`).
  * `GradientNoise` (`--grad_noise`, Sec. 2.4): Gaussian noise added to
    the gradients before the optimizer sees them:
      - `fixed`: N(0, s^2) per coordinate with s = `--grad_noise_std`;
      - `annealed`: variance eta / (1 + t)^gamma at step t (Neelakantan et
        al. 2015, "Adding gradient noise improves learning for very deep
        networks"; `--grad_noise_eta`, `--grad_noise_gamma`);
      - `empirical`: each variable gets the variance that a reference run
        (`--grad_noise_reference=RUN`) recorded for it in the same epoch
        (the last recorded epoch after the reference ends).
    `--grad_noise_scope` picks the variables that get it. The study adds
    noise to the gradients entering each convolutional layer; `conv` (the
    default) takes the kernels of the convolution and dense layers
    (`noise_indices`), not the batch-norm scales and offsets, the biases or
    the rectifier slopes; `all` takes every trainable variable. The noise of
    step t and the l-th of the L chosen variables (in the order of the
    model's trainable variables) is `tf.random.stateless_normal` with seed
    (zlib.crc32(b"<seed>:28161"), t * L + l), <seed> the run's `--seed`:
    the same on every replica (each adds 1/R of it to its share of the
    gradient the optimizer sums) and after a resume. It is added to the
    gradient, L2 term included, that the optimizer applies.
  * `GradientVarianceRecorder` (`--record_grad_variance`): for each
    variable, the variance over an epoch's steps of its mini-batch
    gradients, averaged over its coordinates (the unbiased variance over
    the steps; 0 with one step per epoch). A small-batch run that records
    it is the reference of `--grad_noise=empirical`.

Each is a `tfcapacity.training.hooks.StepHook`: the loop calls it in every
step through that interface and knows none of them; `hooks_from_config`
builds the ones the flags ask for. Their accumulators are variables of the
run's checkpoint, so a resumed run continues them. Their scalars are logged
at step 0 and at the end of every epoch (results.json's `measurements`):
`distance/total`, `distance/norm`, `distance/<layer>`, `path_length/total`,
`path_length/<layer>`, `grad_noise/std` (or `grad_noise/std/<variable>`
for `empirical`, one per noised variable) and `grad_variance/<variable>`.
"""

from __future__ import annotations

import collections
import json
import os
import zlib

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfcapacity import training
from tfcapacity.errors import UserError
from tfcapacity.models import layers as layers_lib
from tfcapacity.training import hooks as hooks_lib
from tfcapacity import rundir

_NOISE_SALT = 0x6E01  # 28161, as the module docstring writes it.

# The layers whose kernels get noise under --grad_noise_scope=conv.
_KERNEL_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D,
                  keras.layers.Conv3D, keras.layers.Dense)


def layer_of(path: str) -> str:
  """The layer a variable path belongs to: its path without the last part."""
  return path.rsplit("/", 1)[0] if "/" in path else path


def _groups(variables):
  """Layer name -> indices of `variables`, in first-seen order."""
  out = collections.OrderedDict()
  for i, v in enumerate(variables):
    out.setdefault(layer_of(v.path), []).append(i)
  return out


class DistanceTracker(hooks_lib.StepHook):
  """||theta_t - theta_0|| and the path length, per layer and in total,
  ||theta_t|| in total, and per layer the relative change
  ||W_t - W_0||_F / ||W_0||_F (`relative_distance/<layer>`, for layers that
  do not start at zero; Du et al.'s weights stay close to their start).

  Build it under the strategy's scope right after the model, so that its
  copy of the initial values is theta_0.
  """

  name = "distance"

  def __init__(self, variables):
    self.variables = list(variables)
    self.groups = _groups(self.variables)
    self.initial = [tf.Variable(v.value, trainable=False,
                                name="initial_value")
                    for v in self.variables]
    self.path = tf.Variable(tf.zeros([len(self.groups) + 1], tf.float64),
                            trainable=False, name="path_length")

  def trackables(self) -> dict:
    return {"initial": self.initial, "path": self.path}

  def before_step(self):
    """The current values (before a step, in the cross-replica graph)."""
    return [tf.identity(v.value) for v in self.variables]

  def after_step(self, state) -> None:
    """Adds the step's per-layer and total update norms to the path
    (`state`: the values `before_step` returned)."""
    sq = [tf.reduce_sum(tf.square(tf.cast(v.value - b, tf.float64)))
          for v, b in zip(self.variables, state)]
    per_layer = [tf.add_n([sq[i] for i in idx])
                 for idx in self.groups.values()]
    total = tf.add_n(per_layer)
    self.path.assign_add(tf.sqrt(tf.stack(per_layer + [total])))

  def scalars(self, step: int) -> dict[str, float]:
    del step  # The distance of the variables as they are.
    sq = [float(np.sum(np.square(
        v.numpy().astype(np.float64) - i.numpy().astype(np.float64))))
          for v, i in zip(self.variables, self.initial)]
    path = self.path.numpy()
    norm_sq = sum(float(np.sum(np.square(v.numpy().astype(np.float64))))
                  for v in self.variables)
    start_sq = [float(np.sum(np.square(i.numpy().astype(np.float64))))
                for i in self.initial]
    out = {"distance/total": float(np.sqrt(sum(sq))),
           "distance/norm": float(np.sqrt(norm_sq)),
           "path_length/total": float(path[-1])}
    for k, (layer, idx) in enumerate(self.groups.items()):
      out[f"distance/{layer}"] = float(np.sqrt(sum(sq[i] for i in idx)))
      out[f"path_length/{layer}"] = float(path[k])
      start = sum(start_sq[i] for i in idx)
      if start > 0:
        out[f"relative_distance/{layer}"] = float(
            np.sqrt(sum(sq[i] for i in idx) / start))
    return out


def read_reference_variances(run_dir: str) -> dict[int, dict[str, float]]:
  """epoch -> {variable path: variance} recorded by a reference run.

  Raises:
    UserError: no results.json, or it holds no `grad_variance/` values.
  """
  path = os.path.join(run_dir, rundir.RESULTS_FILE)
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"--grad_noise_reference={run_dir}: cannot read {path} "
                    f"({e.__class__.__name__}); name a finished run that "
                    f"used --record_grad_variance") from None
  table = {}
  for key in rundir.keys_with_prefix(results, "grad_variance/"):
    for _, epoch, value in rundir.series(results, key):
      table.setdefault(epoch, {})[key[len("grad_variance/"):]] = value
  if not table:
    raise UserError(f"--grad_noise_reference={run_dir} recorded no gradient "
                    f"variances; rerun it with --record_grad_variance")
  return table


def noise_indices(variables, scope: str, model=None) -> list[int]:
  """Indices of the `variables` that `--grad_noise_scope=scope` noises.

  `all`: every variable. `conv`: the kernels of the convolution (Conv1D,
  Conv2D, Conv3D) and dense layers. With `model`, those are its layers'
  `kernel` weights, found by walking its layers; without, they are the
  variables of rank 2 or more, the same set in tfcapacity's models, where
  the other trainable variables (batch-norm scales and offsets, biases) are
  vectors and the rectifier slopes are not trainable (tested on every
  registered model).

  Raises:
    UserError: an unknown scope.
  """
  variables = list(variables)
  if scope not in training.NOISE_SCOPES:
    raise UserError(f"--grad_noise_scope={scope}: choose one of "
                    f"{', '.join(training.NOISE_SCOPES)}")
  if scope == "all":
    return list(range(len(variables)))
  if model is None:
    return [i for i, v in enumerate(variables) if len(v.shape) >= 2]
  kernels = {id(layer.kernel) for layer in layers_lib.all_layers(model)
             if isinstance(layer, _KERNEL_LAYERS)}
  return [i for i, v in enumerate(variables) if id(v) in kernels]


class GradientNoise(hooks_lib.StepHook):
  """Seeded Gaussian gradient noise of a fixed, annealed or recorded scale.

  Attributes:
    variables: the variables whose gradients `add` receives, in order.
    noised: the indices of those that get noise (`noise_indices`).
  """

  name = "grad_noise"

  def __init__(self, cfg, variables, steps_per_epoch: int, num_replicas: int,
               model=None):
    """Checks the flags and picks the noised variables.

    Args:
      cfg: the run's `config.Config`.
      variables: the model's trainable variables, in the order of the
        gradients the step passes.
      steps_per_epoch: steps in an epoch (the `empirical` schedule's).
      num_replicas: the strategy's replicas; each adds 1/R of the noise.
      model: the model owning `variables`, if known: its layers then say
        which variables are convolution and dense kernels.

    Raises:
      UserError: bad noise flags, an unusable `--grad_noise_reference`, or
        no variable in scope.
    """
    if cfg.grad_noise not in training.NOISE_KINDS:
      raise UserError(f"--grad_noise={cfg.grad_noise}: choose one of "
                      f"{', '.join(training.NOISE_KINDS)}")
    self.kind = cfg.grad_noise
    self.scope = cfg.grad_noise_scope
    self.variables = list(variables)
    self.noised = noise_indices(self.variables, self.scope, model)
    if not self.noised:
      raise UserError(f"--grad_noise_scope={self.scope} selects no variable "
                      f"of this model (it has no convolution or dense "
                      f"kernel); use --grad_noise_scope=all")
    self.steps_per_epoch = int(steps_per_epoch)
    self.num_replicas = int(num_replicas)
    self.base_seed = zlib.crc32(f"{cfg.seed}:{_NOISE_SALT}".encode())
    self.std = float(cfg.grad_noise_std)
    self.eta = float(cfg.grad_noise_eta)
    self.gamma = float(cfg.grad_noise_gamma)
    for name, value in (("grad_noise_std", self.std),
                        ("grad_noise_eta", self.eta),
                        ("grad_noise_gamma", self.gamma)):
      if not np.isfinite(value) or value < 0:
        raise UserError(f"--{name} must be a finite number >= 0; got {value}")
    self.table = None
    if self.kind == "empirical":
      self.table = self._variance_table(cfg.grad_noise_reference)
    sizes = [int(np.prod(v.shape)) for v in self.variables]
    logging.info(
        "Gradient noise (%s, --grad_noise_scope=%s) on %d of %d variables, "
        "%d of %d parameters.", self.kind, self.scope, len(self.noised),
        len(self.variables), sum(sizes[i] for i in self.noised), sum(sizes))

  def _variance_table(self, reference):
    if not reference:
      raise UserError("--grad_noise=empirical needs --grad_noise_reference="
                      "RUN (a run trained with --record_grad_variance)")
    recorded = read_reference_variances(reference)
    paths = [self.variables[i].path for i in self.noised]
    epochs = sorted(recorded)
    missing = [p for p in paths if p not in recorded[epochs[-1]]]
    if missing:
      raise UserError(
          f"--grad_noise_reference={reference} has no gradient variance of "
          f"{missing[0]}; the reference must train the same model")
    # Row k serves the steps of epoch k (0-based): the variances recorded
    # at the end of that epoch, k + 1, or else the latest recorded before
    # it (the first recorded one before any); the last row after the end.
    rows = []
    for k in range(epochs[-1]):
      known = [e for e in epochs if e <= k + 1] or epochs[:1]
      rows.append([recorded[known[-1]][p] for p in paths])
    return np.asarray(rows, np.float32)

  # -- the scale -------------------------------------------------------------

  def stddevs(self, step):
    """Standard deviations at `step` (a tensor or a number), one per noised
    variable."""
    if self.kind == "fixed":
      return tf.fill([len(self.noised)], tf.constant(self.std, tf.float32))
    if self.kind == "annealed":
      t = tf.cast(step, tf.float32)
      sd = tf.sqrt(self.eta / tf.pow(1.0 + t, self.gamma))
      return tf.fill([len(self.noised)], sd)
    epoch = tf.cast(step, tf.int64) // self.steps_per_epoch
    row = tf.minimum(epoch, len(self.table) - 1)
    return tf.sqrt(tf.gather(tf.constant(self.table), row))

  def add(self, grads, step):
    """`grads` + this replica's 1/R share of step `step`'s noise (the
    gradients of variables out of scope pass unchanged)."""
    sds = self.stddevs(step)
    count = len(self.noised)
    step = tf.cast(step, tf.int64)
    out = list(grads)
    for l, i in enumerate(self.noised):
      seed = tf.stack([tf.constant(self.base_seed, tf.int64),
                       step * count + l])
      noise = tf.random.stateless_normal(self.variables[i].shape, seed=seed,
                                         dtype=tf.float32) * sds[l]
      if self.num_replicas > 1:
        noise = noise / self.num_replicas
      out[i] = out[i] + tf.cast(noise, out[i].dtype)
    return out

  def adjust_gradients(self, grads, step):
    return self.add(grads, step)

  def scalars(self, step: int) -> dict[str, float]:
    sds = self.stddevs(step).numpy()
    if self.kind != "empirical":
      return {"grad_noise/std": float(sds[0])}
    return {f"grad_noise/std/{self.variables[i].path}": float(s)
            for i, s in zip(self.noised, sds)}


class GradientVarianceRecorder(hooks_lib.StepHook):
  """Per variable, the variance of its mini-batch gradients over an epoch."""

  name = "grad_variance"

  def __init__(self, variables, num_replicas: int = 1):
    self.variables = list(variables)
    self.num_replicas = int(num_replicas)
    agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
    self.sums = [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                             aggregation=agg, name="grad_sum")
                 for v in self.variables]
    self.squares = [tf.Variable(tf.zeros(v.shape, tf.float32),
                                trainable=False, aggregation=agg,
                                name="grad_square_sum")
                    for v in self.variables]
    self.count = tf.Variable(0, dtype=tf.int64, trainable=False,
                             aggregation=agg, name="grad_count")

  def trackables(self) -> dict:
    return {"sums": self.sums, "squares": self.squares, "count": self.count}

  def accumulate(self, grads, num_replicas: int) -> None:
    """Adds one step's gradients (a replica's shares, summed over replicas)."""
    if num_replicas > 1:
      grads = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, list(grads))
    for s, q, g in zip(self.sums, self.squares, grads):
      g = tf.cast(g, tf.float32)
      s.assign_add(g)
      q.assign_add(tf.square(g))
    self.count.assign_add(1)

  def adjust_gradients(self, grads, step):
    """Records the gradients and leaves them alone."""
    del step
    self.accumulate(grads, self.num_replicas)
    return grads

  def scalars(self, step: int) -> dict[str, float]:
    # Nothing is recorded before the first step.
    return self.scalars_and_reset() if step > 0 else {}

  def scalars_and_reset(self) -> dict[str, float]:
    n = int(self.count.numpy())
    out = {}
    for v, s, q in zip(self.variables, self.sums, self.squares):
      if n < 2:
        var = 0.0
      else:
        mean = s.numpy().astype(np.float64) / n
        sq = q.numpy().astype(np.float64) / n
        var = float(np.mean(np.maximum(sq - mean ** 2, 0.0)) * n / (n - 1))
      out[f"grad_variance/{v.path}"] = var
      s.assign(tf.zeros_like(s))
      q.assign(tf.zeros_like(q))
    self.count.assign(0)
    return out


def hooks_from_config(cfg, variables, steps_per_epoch: int,
                      num_replicas: int,
                      model=None) -> list[hooks_lib.StepHook]:
  """The step hooks the flags in `cfg` ask for, in the order they act.

  Build them under the strategy's scope right after the model. The variance
  is recorded before noise is added: it is the mini-batch gradients'.
  `model`, the owner of `variables`, lets the noise find the convolution
  and dense kernels from its layers (`noise_indices`).

  Raises:
    UserError: bad noise flags, or an unusable `--grad_noise_reference`.
  """
  variables = list(variables)
  out = []
  if cfg.track_distance:
    out.append(DistanceTracker(variables))
  if cfg.record_grad_variance:
    out.append(GradientVarianceRecorder(variables, num_replicas))
  if cfg.grad_noise != "none":
    out.append(GradientNoise(cfg, variables, steps_per_epoch, num_replicas,
                             model=model))
  return out
