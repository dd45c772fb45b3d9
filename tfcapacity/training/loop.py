"""The training loop: many steps per `tf.function` call under any strategy.

One cross-replica `tf.function` runs up to `--steps_per_loop` SGD steps with
an in-graph `tf.range` loop, each `strategy.run(replica_step)` (the pattern of
uncertainty-baselines' CIFAR baselines). On a small CPU model per-step Python
dispatch, not arithmetic, limits the speed, so this matters: see
benchmarks/train_throughput.py. Each replica's loss is scaled by the global
batch size (`tf.nn.compute_average_loss`) because the Keras 3 optimizer sums
gradients over replicas.

Data order is a function of `(seed, epoch)` (tfcapacity.data.base), so the
checkpoint's `(step, epoch, batch in epoch)` is the whole data-order state: a
resumed run asks for the same epoch from the same batch and, with
`--deterministic`, ends bitwise equal to an uninterrupted run. Every replica's
share of a global batch is the same slice whatever the number of replicas or
workers, so 1 and 2 replicas agree to float tolerance.

"Training error" is measured on the whole training set at evaluation time, in
inference mode and without augmentation (Dauphin & Bengio's Fig. 1 and 3), not
averaged over the epoch's mini-batches. Top-k errors break ties by class
index, as argmax does, so that a network with equal logits (zero-initialised
classifier) is counted as wrong for all but one class.

The loop knows no measurement: it runs the callbacks it is given
(`tfcapacity.training.callbacks`) at its stops and the step hooks its flags
ask for (`tfcapacity.training.hooks`, built by `dynamics.hooks_from_config`)
inside every step. `tfcapacity.measurements` adds the callbacks that
measurement flags ask for.

With batch norm and `--eval_recompute_bn` (the default), every evaluation
also runs with the batch-norm statistics recomputed exactly over the
training set (`objective.function.recompute_batch_norm`: inference mode then
computes what one training-mode batch of the whole training set computes).
The moving statistics a run trains with are an exponential average over
past batches and past weights, so the two evaluations can differ much early
in training or with a large learning rate. The recomputation changes only
the moving statistics, which are saved before it and restored exactly after
it, so training is bitwise the same with and without the flag.

results.json holds:
  * `history`: one row per evaluation: the loss and top-1/top-5 errors of
    the train and test sets (`train_loss`, `test_top1_error`, ...), with the
    recomputed statistics the same keys ending in `_recomputed_bn` (batch
    norm and `--eval_recompute_bn` only), the learning rate and wall time;
  * `final`: the last row of `history`;
  * `measurements`: one row per stop at which a callback ran;
  * `callbacks`: per callback name, how it measures (`Callback.info()`), for
    the callbacks that say;
  * the flags, the loss, throughput, the number of parameters, replicas and
    steps, and the run's status.

TensorBoard (`training.summaries` describes the layout): the `train` and
`test` runs hold each set's evaluations under the same tags (`loss`,
`top1_error`, `top5_error`), so that one chart overlays them, and
`train_recomputed_bn`/`test_recomputed_bn` those with recomputed statistics;
the optimiser's scalars and the measurements are in the `train` run (the
test set's in the `test` run).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Any

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfcapacity import data as data_lib
from tfcapacity import distribute
from tfcapacity import models as models_lib
from tfcapacity import progress
from tfcapacity import errors
from tfcapacity.errors import UserError
from tfcapacity.models import layers as layers_lib
from tfcapacity.objective import function as function_lib
from tfcapacity.objective import losses
from tfcapacity.training import callbacks as callbacks_lib
from tfcapacity.training import dynamics
from tfcapacity.training import hooks as hooks_lib
from tfcapacity.training import optim
from tfcapacity.training import scalars as scalars_lib
from tfcapacity.training import summaries
from tfcapacity import rundir

EVAL_KEYS = ("train_loss", "train_top1_error", "train_top5_error",
             "test_loss", "test_top1_error", "test_top5_error")
# The suffix of the evaluation keys (and TensorBoard runs) with recomputed
# batch-norm statistics.
RECOMPUTED_BN_SUFFIX = summaries.RECOMPUTED_BN_SUFFIX
# Examples of the per-layer gradient norms logged at each evaluation.
_NORM_EXAMPLES = 256


def distribute_batches(strategy, dataset, global_batch_size, **batch_kwargs):
  """`dataset.batches(global_batch_size, ...)` split over replicas.

  Every input pipeline builds the same global batches and keeps its slice,
  so a replica's examples do not depend on how many workers there are. With
  a single replica the plain `tf.data` pipeline is returned: a distributed
  iterator costs about a quarter of the throughput of a small model on CPU
  (benchmarks/train_throughput.py), and `strategy.run` takes plain tensors.
  """

  def dataset_fn(ctx: tf.distribute.InputContext):
    ds = dataset.batches(global_batch_size, **batch_kwargs)
    pipelines = ctx.num_input_pipelines
    per_pipeline = global_batch_size // pipelines
    if pipelines > 1:
      lo = ctx.input_pipeline_id * per_pipeline
      ds = ds.map(lambda *t: tuple(a[lo:lo + per_pipeline] for a in t))
    per_replica = ctx.get_per_replica_batch_size(global_batch_size)
    if per_replica != per_pipeline:
      ds = ds.rebatch(per_replica, drop_remainder=True)
    return ds

  if strategy.num_replicas_in_sync == 1:
    return dataset_fn(tf.distribute.InputContext())
  return strategy.distribute_datasets_from_function(dataset_fn)


# --learning_rate_from=gram holds the training inputs in one batch.
MAX_GRAM_EXAMPLES = 4096


class Trainer:
  """Builds data, model and optimizer from a Config and trains.

  The Trainer runs the callbacks it is given and the step hooks its flags
  ask for (`dynamics.hooks_from_config`); it knows no measurement. The
  measurements that flags ask for are added by `tfcapacity.measurements`.

  Attributes after construction: `strategy`, `train_data`, `test_data`,
  `model`, `optimizer`, `hooks`, `callbacks`, `global_batch_size`,
  `steps_per_epoch`, `total_steps`, `num_replicas`, `recompute_bn` (whether
  evaluations also run with recomputed batch-norm statistics).
  """

  def __init__(self, cfg, strategy: tf.distribute.Strategy | None = None,
               callbacks=(), model_dir: str | None = None, datasets=None,
               learning_rate_fn=None):
    """Builds everything; see `train` for the arguments.

    Everything that can be wrong with the input is found here, before the
    run directory is touched.

    Args:
      datasets: optional `(train, test)` `tfcapacity.data.Dataset`s used
        instead of `--dataset` (notebooks, benchmarks).
      learning_rate_fn: for `--learning_rate_from=gram`, a function of
        (the model at initialisation, the training inputs, c) returning
        (eta, lambda_max); the measurement layer supplies it
        (`tfcapacity.measurements.trainer`).
    """
    self.cfg = cfg
    self.model_dir = model_dir if model_dir is not None else cfg.model_dir
    if self.model_dir is None:
      raise UserError("--model_dir is required; name a run directory")
    if cfg.deterministic:
      tf.config.experimental.enable_op_determinism()
    self.strategy = strategy or distribute.make_strategy(
        cfg.strategy, cfg.cpu_replicas)
    self.num_replicas = self.strategy.num_replicas_in_sync
    self.chief = distribute.is_chief(self.strategy)
    self.callbacks = list(callbacks)
    self._loss_fn = losses.get(cfg.loss)
    self._learning_rate_fn = learning_rate_fn
    self._load_data(datasets)
    self._check_task()
    # Per-layer gradient norms at each evaluation: on a fixed draw of
    # training examples, in inference mode.
    n = self.train_data.info.num_examples
    self._norm_examples = self.eval_train_data.examples(
        data_lib.draw_indices(cfg.seed, n, min(_NORM_EXAMPLES, n)))
    self._build_state()
    if self.hooks:
      self.callbacks.append(hooks_lib.HookScalars(
          self.hooks, getattr(cfg, "track_distance_every_epochs", 1)))
    self._build_train_steps()
    self._build_evaluation()
    self.recompute_bn = bool(
        cfg.eval_recompute_bn and layers_lib.batch_norm_layers(self.model))
    if self.accumulate:
      self._build_full_batch_step()
    # Measurement flags are checked against the built model here, before
    # `run` touches the run directory.
    for cb in self.callbacks:
      cb.check(self.context(0))
    self._lock = None

  # -- set-up -------------------------------------------------------------

  def _load_data(self, datasets):
    """The datasets, the batch and the number of steps."""
    cfg = self.cfg
    if datasets is not None:
      self.train_data, self.test_data = datasets
      self.eval_train_data = self.train_data
    else:
      self.train_data = data_lib.get(cfg.dataset, "train", cfg)
      self.test_data = data_lib.get(cfg.dataset, "test", cfg)
      self.eval_train_data = (data_lib.get(cfg.dataset, "train",
                                           cfg.replace(augment=False))
                              if cfg.augment else self.train_data)
    n = self.train_data.info.num_examples
    self.global_batch_size = cfg.global_batch_size(n)
    # Full-batch GD accumulates the gradient over chunks, unless the whole
    # training set is one chunk that the replicas split evenly: then a step
    # is an ordinary step on one batch of all n examples, several per
    # tf.function call (8x faster per step on a small MLP than a call that
    # iterates a dataset of one chunk).
    self.accumulate = cfg.full_batch and not (
        n <= cfg.full_batch_chunk and n % self.num_replicas == 0)
    self._check_batch(n)
    if cfg.full_batch:
      self.steps_per_epoch = 1
    else:
      self.steps_per_epoch = n // self.global_batch_size
    self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch

  def _check_task(self):
    """One output needs the squared loss; a step from the Gram matrix needs
    the squared loss and a function that computes it."""
    cfg = self.cfg
    if self.train_data.info.num_classes == 1 and cfg.loss != "squared":
      raise UserError(f"a model with one output (--task=random_sign) trains "
                      f"on 1/2 (f - y)^2; use --loss=squared, not "
                      f"--loss={cfg.loss}")
    if getattr(cfg, "learning_rate_from", "flag") == "gram":
      if cfg.loss != "squared":
        raise UserError(f"--learning_rate_from=gram sets the step for the "
                        f"squared loss; use --loss=squared, not "
                        f"--loss={cfg.loss}")
      if self._learning_rate_fn is None:
        raise UserError("--learning_rate_from=gram needs the measurement "
                        "layer: train with tfcapacity.measurements.train")
      n = self.train_data.info.num_examples
      if n > MAX_GRAM_EXAMPLES:
        raise UserError(f"--learning_rate_from=gram takes lambda_max of the "
                        f"NTK Gram matrix over all {n} training examples; "
                        f"use --train_subset<={MAX_GRAM_EXAMPLES}")

  def _check_batch(self, n):
    cfg, r = self.cfg, self.num_replicas
    b = self.global_batch_size
    if b > n:
      raise UserError(
          f"--batch_size={b} exceeds the {n} training examples; use at most "
          f"{n} or --batch_size=full")
    if self.accumulate:
      chunk = min(cfg.full_batch_chunk, n)
      self.chunk_size = max(r, chunk - chunk % r)
      if cfg.normalization != "none" and n % self.chunk_size:
        raise UserError(
            f"--batch_size=full with --normalization={cfg.normalization} "
            f"needs --full_batch_chunk to divide the {n} training examples "
            f"(padding would enter the batch statistics); pick a divisor")
      per_replica = self.chunk_size // r
    else:
      if b % r:
        raise UserError(
            f"--batch_size={b} is not divisible by the {r} replicas; use a "
            f"multiple of {r}")
      per_replica = b // r
    if cfg.normalization == "ghost" and per_replica % cfg.ghost_batch_size:
      raise UserError(
          f"--ghost_batch_size={cfg.ghost_batch_size} does not divide the "
          f"per-replica batch of {per_replica} examples (global batch over "
          f"{r} replicas); choose a divisor of {per_replica}")
    self.eval_batch_size = -(-cfg.eval_batch_size // r) * r

  def _build_state(self):
    """Model, optimizer, counters and step hooks, and their checkpoint."""
    cfg, info = self.cfg, self.train_data.info
    with self.strategy.scope():
      keras.utils.set_random_seed(cfg.seed)
      self.model = models_lib.from_config(cfg, info.input_shape,
                                          info.num_classes)
      self.learning_rate, self.gram_max_eigenvalue = cfg.learning_rate, None
      if getattr(cfg, "learning_rate_from", "flag") == "gram":
        # A function of the seed: a resumed run computes the same step.
        x, _ = self.train_data.examples(
            np.arange(self.train_data.info.num_examples))
        self.learning_rate, self.gram_max_eigenvalue = (
            self._learning_rate_fn(self.model, x, cfg.learning_rate))
        logging.info("--learning_rate_from=gram: lambda_max(Theta(0)) = %.6g "
                     "on %d examples, step %.6g", self.gram_max_eigenvalue,
                     len(x), self.learning_rate)
      self.schedule = optim.make_schedule(
          cfg.replace(learning_rate=self.learning_rate),
          self.steps_per_epoch, self.total_steps)
      self.optimizer = optim.make_optimizer(cfg, self.schedule)
      # Slot variables must exist before the first distributed step
      # (keras-team/keras#23085).
      self.optimizer.build(self.model.trainable_variables)
      self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.position_var = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.elapsed_var = tf.Variable(0.0, dtype=tf.float64, trainable=False)
      # Right after the model: a distance hook copies theta_0.
      self.hooks = dynamics.hooks_from_config(
          cfg, self.model.trainable_variables, self.steps_per_epoch,
          self.num_replicas, model=self.model)
      if self.accumulate:
        self._accumulators = [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.SUM)
            for v in self.model.trainable_variables]
    self.num_parameters = int(sum(
        np.prod(v.shape) for v in self.model.trainable_variables))
    extra = {hook.name: hook.trackables() for hook in self.hooks
             if hook.trackables()}
    self.checkpoint = tf.train.Checkpoint(
        model=self.model, optimizer=self.optimizer, step=self.step_var,
        epoch=self.epoch_var, data_position=self.position_var,
        elapsed=self.elapsed_var, **extra)

  # -- the training step --------------------------------------------------

  def _replica_step(self, x, y):
    """One step on this replica's share of a batch; its share of the loss."""
    model, tvars = self.model, self.model.trainable_variables
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      data_loss = tf.nn.compute_average_loss(
          self._loss_fn(y, logits), global_batch_size=self.global_batch_size)
      loss = data_loss + tf.cast(tf.nn.scale_regularization_loss(
          losses.l2_penalty(model, self.cfg.weight_decay)), data_loss.dtype)
    grads = tape.gradient(loss, tvars)
    grads = hooks_lib.adjust_gradients(self.hooks, grads,
                                       self.optimizer.iterations)
    self.optimizer.apply_gradients(zip(grads, tvars))
    return tf.cast(data_loss, tf.float32)

  def _hooked(self, step_fn):
    """`step_fn()` (one step, cross-replica) between the hooks' before and
    after calls."""
    states = hooks_lib.before_step(self.hooks)
    out = step_fn()
    hooks_lib.after_step(self.hooks, states)
    return out

  def _steps(self, fetch, num_steps):
    """Up to `num_steps` steps on `fetch(i)`: (loss sum, steps, finite)."""
    strategy = self.strategy
    # Stops after the first non-finite loss. The test sits in the loop's
    # condition rather than in a `tf.cond` in its body: on small models a
    # conditional per step costs a measurable share of the step.
    total = tf.constant(0.0)
    done = tf.constant(0)
    finite = tf.constant(True)
    while done < num_steps and finite:
      loss = self._hooked(lambda: strategy.reduce(
          tf.distribute.ReduceOp.SUM,
          strategy.run(self._replica_step, args=fetch(done)), axis=None))
      total += loss
      done += 1
      finite = tf.math.is_finite(loss)
    return total, done, finite

  def _build_train_steps(self):
    """The multi-step `tf.function`s: fed by an iterator, or resident."""

    @tf.function
    def train_steps(iterator, num_steps):
      return self._steps(lambda _: next(iterator), num_steps)

    @tf.function
    def train_steps_resident(x, y, start, num_steps):
      return self._steps(lambda i: (x[start + i], y[start + i]), num_steps)

    self.train_steps = train_steps
    self.train_steps_resident = train_steps_resident

  def _replica_accumulate(self, x, y, w):
    """Adds this replica's chunk's gradient of the mean loss."""
    n = self.train_data.info.num_examples
    with tf.GradientTape() as tape:
      logits = self.model(x, training=True)
      per_example = self._loss_fn(y, logits)
      loss = tf.reduce_sum(tf.cast(w, per_example.dtype) * per_example) / n
    grads = tape.gradient(loss, self.model.trainable_variables)
    for a, g in zip(self._accumulators, grads):
      a.assign_add(g)
    return tf.cast(loss, tf.float32)

  def _replica_apply(self):
    """Applies the accumulated gradient plus this replica's share of the
    L2 term's (the optimizer sums the replicas' gradients)."""
    wd, tvars = self.cfg.weight_decay, self.model.trainable_variables
    decay = wd / self.strategy.num_replicas_in_sync
    grads = [a.read_value() + decay * v if wd and losses.is_decayed(v)
             else a.read_value() for a, v in zip(self._accumulators, tvars)]
    grads = hooks_lib.adjust_gradients(self.hooks, grads,
                                       self.optimizer.iterations)
    self.optimizer.apply_gradients(zip(grads, tvars))
    for a in self._accumulators:
      a.assign(tf.zeros_like(a))

  def _build_full_batch_step(self):
    """One full-batch step accumulated over chunks (`self.accumulate`)."""
    strategy = self.strategy

    @tf.function
    def full_batch_step(dist_dataset):
      total = tf.constant(0.0)
      for batch in dist_dataset:
        total += strategy.reduce(
            tf.distribute.ReduceOp.SUM,
            strategy.run(self._replica_accumulate, args=batch), axis=None)
      self._hooked(lambda: strategy.run(self._replica_apply))
      return total

    self.full_batch_step = full_batch_step

  @property
  def resident(self) -> bool:
    """Whether training batches are sliced in-graph from the epoch's arrays.

    With one replica and an in-memory dataset, indexing a tensor that holds
    the epoch feeds ~1.2x more examples/s to a small model than a tf.data
    iterator's per-step `IteratorGetNext`; the batches are the same.
    """
    return (self.num_replicas == 1 and not self.accumulate
            and isinstance(self.train_data, data_lib.base.ArrayDataset))

  def train_iterator(self, epoch: int, start_batch: int = 0):
    """The feed of epoch `epoch`'s training batches, from a batch on.

    Pass it to `run_steps`: an iterator, or the resident epoch (`resident`).
    """
    if self.resident:
      x, y = self.train_data.epoch_arrays(
          self.global_batch_size, shuffle=self.cfg.shuffle,
          seed=self.cfg.seed, epoch=epoch)
      return _ResidentEpoch(tf.constant(x), tf.constant(y), start_batch)
    return iter(distribute_batches(
        self.strategy, self.train_data, self.global_batch_size,
        shuffle=self.cfg.shuffle, seed=self.cfg.seed, epoch=epoch,
        start_batch=start_batch, drop_remainder=True))

  def run_steps(self, feed, num_steps: int) -> tuple[float, int, bool]:
    """Runs up to `num_steps` steps; returns (loss sum, steps, finite)."""
    n = tf.constant(num_steps, tf.int32)
    if isinstance(feed, _ResidentEpoch):
      total, done, finite = self.train_steps_resident(
          feed.x, feed.y, tf.constant(feed.position, tf.int32), n)
      feed.position += int(done)
    else:
      total, done, finite = self.train_steps(feed, n)
    return float(total), int(done), bool(finite)

  # -- evaluation ----------------------------------------------------------

  def _replica_eval(self, x, y, w):
    return losses.metric_sums(self._loss_fn, y, self.model(x, training=False),
                              w, min(5, self.train_data.info.num_classes))

  def _build_evaluation(self):
    strategy = self.strategy

    @tf.function
    def eval_sums(dist_dataset):
      sums = tf.zeros([4])
      for batch in dist_dataset:
        sums += strategy.reduce(tf.distribute.ReduceOp.SUM,
                                strategy.run(self._replica_eval, args=batch),
                                axis=None)
      return sums

    self.eval_sums = eval_sums

  def evaluate(self) -> dict[str, float]:
    """Loss and top-1/top-5 error over the whole train and test sets.

    With `recompute_bn`, also the same with the batch-norm statistics
    recomputed over the training set (keys ending in `_recomputed_bn`); the
    model's moving statistics are restored exactly afterwards.
    """
    if not hasattr(self, "_eval_sets"):
      self._eval_sets = {
          split: distribute_batches(self.strategy, ds, self.eval_batch_size,
                                    pad=True)
          for split, ds in (("train", self.eval_train_data),
                            ("test", self.test_data))}
    metrics = self._evaluate_sets()
    if self.recompute_bn:
      recomputed = self._evaluate_recomputed_bn()
      metrics.update({key + RECOMPUTED_BN_SUFFIX: value
                      for key, value in recomputed.items()})
    return metrics

  def _evaluate_sets(self) -> dict[str, float]:
    metrics = {}
    for split, dist in self._eval_sets.items():
      loss, top1, top5, count = self.eval_sums(dist).numpy().tolist()
      metrics[f"{split}_loss"] = loss / count
      metrics[f"{split}_top1_error"] = 1.0 - top1 / count
      metrics[f"{split}_top5_error"] = 1.0 - top5 / count
    return metrics

  def _evaluate_recomputed_bn(self) -> dict[str, float]:
    """The evaluation with batch-norm statistics recomputed over the
    training set as the evaluation sees it (no augmentation).

    The recomputation assigns the statistics from cross-replica context,
    which sets every replica's copy under a strategy. Every replica's copy
    is saved before and assigned back after, each on its own, so the model
    leaves bitwise as it came, whatever the recomputation gives (NaN
    included).
    """
    norms = layers_lib.batch_norm_layers(self.model)
    if not hasattr(self, "_bn_moments"):  # Traced once, reused.
      self._bn_moments = function_lib.batch_norm_moments(self.model)
    copies = [self.strategy.experimental_local_results(v.value)
              for layer in norms
              for v in (layer.moving_mean, layer.moving_variance)]
    saved = [[c.numpy() for c in local] for local in copies]
    try:
      n = self.eval_train_data.info.num_examples
      x, _ = self.eval_train_data.examples(np.arange(n))
      function_lib.recompute_batch_norm(self.model, x,
                                        moments=self._bn_moments)
      return self._evaluate_sets()
    finally:
      for local, values in zip(copies, saved):
        for copy, value in zip(local, values):
          copy.assign(value)

  # -- callbacks -----------------------------------------------------------

  def context(self, step: int) -> callbacks_lib.Context:
    """What a callback sees at `step`."""
    return callbacks_lib.Context(
        model=self.model, optimizer=self.optimizer, strategy=self.strategy,
        cfg=self.cfg, train_data=self.train_data, test_data=self.test_data,
        model_dir=self.model_dir, step=step,
        epoch=step // self.steps_per_epoch,
        global_batch_size=self.global_batch_size,
        steps_per_epoch=self.steps_per_epoch,
        learning_rate=float(self.schedule(max(step - 1, 0))))

  def run_callbacks(self, step: int, epoch_end: bool) -> dict[str, float]:
    """The scalars of the callbacks due at `step`, each timed."""
    scalars = {}
    ctx = self.context(step)
    for cb in self.callbacks:
      if not cb.due(step, ctx.epoch, epoch_end):
        continue
      start = time.time()
      values = cb(ctx) or {}
      values = {k: float(v) for k, v in values.items()}
      seconds = time.time() - start
      shown = [k for k in (values if cb.log_keys is None else cb.log_keys)
               if k in values]
      if shown:
        logging.info("step %d: %s: %s (%.1fs)", step, cb.name, ", ".join(
            f"{k.removeprefix(cb.name + '/')} {values[k]:.4g}"
            for k in shown), seconds)
      values[f"timing/{cb.name}_seconds"] = seconds
      scalars.update(values)
    return scalars

  def _next_stop(self, step, batch_in_epoch):
    """The step at which the current chunk of in-graph steps must end."""
    stops = [step + self.cfg.steps_per_loop,
             step + self.steps_per_epoch - batch_in_epoch, self.total_steps]
    every = [cb.every_steps for cb in self.callbacks if cb.every_steps]
    if self.cfg.checkpoint_every_steps:
      every.append(self.cfg.checkpoint_every_steps)
    stops += [(step // e + 1) * e for e in every]
    return min(stops)

  # -- the run ------------------------------------------------------------
  #
  # Training proceeds from stop to stop: a stop is an epoch end, a step at
  # which a callback or a checkpoint is due, or every --steps_per_loop
  # steps. At each stop (and once at step 0) `_record_stop` evaluates when
  # an evaluation is due, runs the callbacks that are due, and checkpoints
  # after an evaluation or every --checkpoint_every_steps steps.

  def run(self) -> dict:
    """Trains to the end (or resumes there) and returns results.json.

    A run directory that already holds this run, completed, is only read:
    its results are returned and nothing is written (unless its export is
    missing, which is then written under the lock).
    """
    try:
      return self._run()
    finally:  # The run directory is free again once `run` returns.
      if self._lock is not None:
        self._lock.release()
        self._lock = None

  def _run(self) -> dict:
    previous = self._finished_run()
    if previous is not None:
      return previous
    run, previous = self._restore()
    for cb in self.callbacks:
      cb.on_train_begin(self.context(run.step))
    if run.step == 0 and not run.history:
      if not self._record_stop(run, epoch_end=True, evaluate=True):
        return self._diverged(run, "the initial loss",
                              run.history[-1]["train_loss"])
    while run.step < self.total_steps:
      if not self._train_until_next_stop(run):
        return self._diverged(run, "the training loss", run.batch_loss)
      epoch_end = run.step % self.steps_per_epoch == 0
      if not self._record_stop(run, epoch_end,
                               self._evaluation_due(run.step, epoch_end)):
        return self._diverged(run, "the evaluation loss",
                              run.history[-1]["train_loss"])
    return self._finish(run)

  def _evaluation_due(self, step: int, epoch_end: bool) -> bool:
    """After the last step, and every --eval_every epochs."""
    epochs_done = step // self.steps_per_epoch
    return step >= self.total_steps or (
        epoch_end and epochs_done % self.cfg.eval_every == 0)

  def _finished_run(self) -> dict | None:
    """The results of this run if `model_dir` holds it completed, else None.

    Reads only (a finished run is never rewritten); a missing export is
    written under the lock from the final checkpoint.
    """
    cfg, model_dir = self.cfg, self.model_dir
    if cfg.resume_from is not None or not rundir.check_resumable(model_dir,
                                                                 cfg):
      return None
    previous = rundir.read_results(model_dir) or {}
    if not (previous.get("status") == "completed" and previous.get("history")
            and int(previous.get("steps", 0)) >= self.total_steps):
      return None
    logging.info("%s already holds this run, completed: nothing to do.",
                 model_dir)
    try:  # The trainer's model is the run's final one (library callers).
      self._restore_checkpoint(rundir.checkpoint_to_resume(model_dir))
      restored = True
    except UserError as e:
      logging.warning("The trainer's model stays at initialisation: %s", e)
      restored = False
    if restored and self.chief and cfg.export and not os.path.exists(
        os.path.join(model_dir, rundir.SAVED_MODEL_DIR)):
      self._lock = rundir.lock(model_dir)
      rundir.export_model(self.model, model_dir)
    return previous

  def _restore_checkpoint(self, prefix: str | None) -> None:
    if prefix is None:
      return
    try:
      with self.strategy.scope():
        self.checkpoint.restore(prefix).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      # The half-restored checkpoint warns when collected: the line above
      # says all there is.
      tf.get_logger().setLevel("ERROR")
      raise UserError(
          f"checkpoint {prefix} does not match the model that "
          f"{rundir.FLAGS_FILE} describes ({errors.first_line(e)}); restore "
          f"the run's {rundir.FLAGS_FILE}, or pass --overwrite to start "
          f"afresh") from None

  def _inspect(self) -> tuple[bool, dict, str | None]:
    """(whether the run resumes, its results.json, the checkpoint to
    restore), or UserError for a run of other flags or a damaged one."""
    cfg, model_dir = self.cfg, self.model_dir
    resumable = rundir.check_run(model_dir, cfg)
    previous = (rundir.read_results(model_dir) if resumable else None) or {}
    latest = (rundir.checkpoint_to_resume(model_dir, cfg.resume_from)
              if resumable else None)
    return resumable, previous, latest

  def _restore(self) -> tuple[_Run, dict]:
    """Takes the run directory and resumes from its latest checkpoint.

    Everything is checked before anything is written: the flags against
    flags.txt, the checkpoint state and the checkpoint itself (read whole
    and restored). Only then, holding the directory's lock, does the chief
    move an earlier run aside (`--overwrite`), write flags.txt and open the
    event files.

    Returns:
      (the run's state, the results.json it had (or {})).
    """
    cfg, model_dir = self.cfg, self.model_dir
    # Every check reads only, so a refusal leaves the directory as it was.
    # Then the chief takes the one-writer lock for the rest of the process
    # (workers write nothing there) and makes sure no other writer changed
    # the run meanwhile.
    seen = rundir.state_key(model_dir)
    resumable, previous, latest = self._inspect()
    self._restore_checkpoint(latest)
    self._lock = rundir.lock(model_dir) if self.chief else None
    if rundir.state_key(model_dir) != seen:
      raise UserError(f"{model_dir} changed while this trainer was starting "
                      f"(another process wrote it and has ended); rerun the "
                      f"command")
    if latest:
      logging.info("Resumed %s at step %d.", latest, int(self.step_var))
    if self.chief:
      moved = rundir.start(model_dir, cfg, resumable)
      if moved:
        logging.info("Moved the earlier run in %s to %s.", model_dir, moved)
      if cfg.resume_from is not None:
        aside = rundir.start_from_checkpoint(model_dir, cfg.resume_from)
        if aside:
          logging.info("Moved the checkpoints after step %d to %s.",
                       cfg.resume_from, aside)
    ckpt_dir = os.path.join(model_dir, rundir.CHECKPOINT_DIR)
    save_dir = ckpt_dir if self.chief else tempfile.mkdtemp(
        prefix="tfcapacity-worker-")
    manager = tf.train.CheckpointManager(
        self.checkpoint, save_dir, max_to_keep=cfg.keep_checkpoints,
        step_counter=self.step_var)
    step = int(self.step_var.numpy())
    run = _Run(
        step=step, writers=self._summary_writers(), manager=manager,
        save_dir=save_dir,
        throughput=_Throughput(previous.get("examples_per_second")),
        elapsed_before=float(self.elapsed_var.numpy()),
        history=[r for r in previous.get("history", []) if r["step"] <= step],
        measurements=[r for r in previous.get("measurements", [])
                      if r["step"] <= step])
    if step == 0 and self.chief:
      self._write_run_summaries(run.writers[summaries.TRAIN_RUN])
    self._log_start(step)
    if self.chief and progress.TrainingBar.wanted(cfg.progress_bar):
      run.progbar = progress.TrainingBar(self.total_steps, step)
    if self.accumulate:
      run.feed = distribute_batches(self.strategy, self.train_data,
                                    self.chunk_size, pad=True)
    return run, previous

  def _summary_writers(self) -> dict:
    """TensorBoard writers of the train/ and test/ runs and (with
    `recompute_bn`) train_recomputed_bn/ and test_recomputed_bn/ (the
    chief's; `summaries` describes the layout)."""
    names = list(summaries.RUNS) + (
        [r + RECOMPUTED_BN_SUFFIX for r in summaries.RUNS]
        if self.recompute_bn else [])
    if not self.chief:
      return {name: tf.summary.create_noop_writer() for name in names}
    return {name: tf.summary.create_file_writer(
        os.path.join(self.model_dir, name)) for name in names}

  def _train_until_next_stop(self, run: _Run) -> bool:
    """Trains up to the next stop; False if the loss became non-finite.

    Throughput counts everything but evaluation, callbacks and checkpoints:
    iterator creation, the steps, summaries, progress.
    """
    start = time.time()
    if self.accumulate:  # One step per stop; the feed is the chunked set.
      loss_sum = self.full_batch_step(run.feed)
      done, finite = 1, bool(tf.math.is_finite(loss_sum))
      loss_sum = float(loss_sum)
    else:
      epoch, batch_in_epoch = divmod(run.step, self.steps_per_epoch)
      if run.feed is None:
        run.feed = self.train_iterator(epoch, batch_in_epoch)
      stop = self._next_stop(run.step, batch_in_epoch)
      loss_sum, done, finite = self.run_steps(run.feed, stop - run.step)
      if (batch_in_epoch + done) >= self.steps_per_epoch:
        run.feed = None  # The next stop starts a new epoch.
    run.step += done
    run.batch_loss = loss_sum / max(done, 1)
    if not finite:
      return False
    with run.writers["train"].as_default(step=run.step):
      tf.summary.scalar("batch/loss", run.batch_loss)
      tf.summary.scalar("batch/learning_rate",
                        float(self.schedule(run.step - 1)))
      if run.throughput.last_rate:
        tf.summary.scalar("batch/examples_per_second",
                          run.throughput.last_rate)
    if run.progbar is not None:
      run.progbar.update(run.step, loss=run.batch_loss)
    run.throughput.add(done * self.global_batch_size, time.time() - start)
    return True

  def _record_stop(self, run: _Run, epoch_end: bool, evaluate: bool) -> bool:
    """Evaluates (if `evaluate`), runs the callbacks due and checkpoints.

    An evaluation goes to `history`, the callbacks' scalars to
    `measurements` (at evaluation steps too). A checkpoint, with
    results.json, follows an evaluation and every --checkpoint_every_steps
    steps. Returns False if the evaluation is not finite (the run
    diverged); the last good checkpoint is then kept.
    """
    step, epoch = run.step, run.step // self.steps_per_epoch
    if evaluate:
      row = self._evaluation_row(run)
      run.history.append(row)
      if not all(math.isfinite(row[k]) for k in EVAL_KEYS):
        return False
    # Inside the train run's scope: a callback's histograms land there.
    with run.writers["train"].as_default(step=step):
      scalars = self.run_callbacks(step, epoch_end)
    if scalars:
      self._write_scalars(run, step, scalars)
      run.measurements.append({"epoch": epoch, "step": step, **scalars})
    every = self.cfg.checkpoint_every_steps
    if evaluate or (every and step % every == 0):
      self._checkpoint(run)
      self._save_results(run, "completed" if step >= self.total_steps
                         else "running")
    if evaluate:
      self._log_epoch(row)
    elif epoch_end:
      logging.info("epoch %d step %d: batch loss %.4f", epoch, step,
                   run.batch_loss)
    return True

  def _evaluation_row(self, run: _Run) -> dict:
    """The evaluation at `run.step` as a history row, also to TensorBoard.

    Each set's evaluation goes to its run (`train`, `test`; with
    recomputed batch-norm statistics `train_recomputed_bn`,
    `test_recomputed_bn`) under the same tags; the train run also gets the
    test set's values for HParams, the weight histograms and the per-layer
    weight and gradient norms.
    """
    metrics = self.evaluate()
    for split in data_lib.SPLITS:
      for suffix in ("", RECOMPUTED_BN_SUFFIX):
        writer = run.writers.get(split + suffix)
        if writer is None:
          continue
        with writer.as_default(step=run.step):
          for tag in summaries.EVAL_TAGS:
            key = f"{split}_{tag}{suffix}"
            if key in metrics and math.isfinite(metrics[key]):
              tf.summary.scalar(tag, metrics[key])
    with run.writers["train"].as_default(step=run.step):
      for tag in summaries.EVAL_TAGS:  # HParams reads the train run only.
        if math.isfinite(metrics[f"test_{tag}"]):
          tf.summary.scalar(summaries.FINAL_TEST_PREFIX + tag,
                            metrics[f"test_{tag}"])
      summaries.weight_histograms(self.model)
      if self._norm_examples is not None:
        for key, value in summaries.layer_norms(
            self.model, *self._norm_examples, self._loss_fn).items():
          if math.isfinite(value):
            tf.summary.scalar(key, value)
    return {"epoch": run.step // self.steps_per_epoch, "step": run.step,
            **metrics,
            "learning_rate": float(self.schedule(max(run.step - 1, 0))),
            "wall_seconds": run.wall()}

  def _checkpoint(self, run: _Run) -> None:
    self.step_var.assign(run.step)
    self.epoch_var.assign(run.step // self.steps_per_epoch)
    self.position_var.assign(run.step % self.steps_per_epoch)
    self.elapsed_var.assign(run.wall())
    run.manager.save(checkpoint_number=run.step)

  def _results(self, run: _Run, status: str) -> dict:
    """The contents of results.json (the module docstring lists them)."""
    infos = {cb.name: cb.info() for cb in self.callbacks}
    return {
        "status": status, "flags": self.cfg.to_dict(), "loss": self.cfg.loss,
        "history": run.history,
        "final": run.history[-1] if run.history else {},
        "measurements": run.measurements,
        "examples_per_second": run.throughput.rate(),
        "num_parameters": self.num_parameters,
        "num_replicas": self.num_replicas, "steps": run.step,
        "learning_rate_used": self.learning_rate,
        "gram_max_eigenvalue_at_init": self.gram_max_eigenvalue,
        "total_steps": self.total_steps,
        "steps_per_epoch": self.steps_per_epoch,
        "global_batch_size": self.global_batch_size,
        "callbacks": {name: info for name, info in infos.items() if info},
        # Steps at which a callback scalar was non-finite or unresolved.
        "not_plotted": dict(run.dropped),
    }

  def _save_results(self, run: _Run, status: str, **extra) -> dict:
    results = {**self._results(run, status), **extra}
    if self.chief:
      rundir.write_json(os.path.join(self.model_dir, rundir.RESULTS_FILE),
                        results)
    return results

  def _diverged(self, run: _Run, where: str, value: float) -> dict:
    if run.progbar is not None:
      run.progbar.close()
    logging.error("Run diverged at step %d (%s is %s); the last good "
                  "checkpoint is kept.", run.step, where, value)
    return self._save_results(run, "diverged", diverged_at_step=run.step)

  def _finish(self, run: _Run) -> dict:
    for cb in self.callbacks:
      cb.on_train_end(self.context(run.step))
    if run.progbar is not None:
      run.progbar.close()
    if self.chief:
      self._write_experiment(run)
    for w in run.writers.values():
      w.flush()
    if self.chief and self.cfg.export:
      rundir.export_model(self.model, self.model_dir)
    results = self._save_results(run, "completed")
    if not self.chief:
      shutil.rmtree(run.save_dir, ignore_errors=True)
    return results

  def _log_epoch(self, row):
    recomputed = ""
    train, test = (f"{split}_top1_error{RECOMPUTED_BN_SUFFIX}"
                   for split in ("train", "test"))
    if train in row:
      recomputed = (f" | recomputed BN top1 train {row[train]:.4f} test "
                    f"{row[test]:.4f}")
    logging.info(
        "epoch %d step %d: train loss %.4f top1 %.4f top5 %.4f | test loss "
        "%.4f top1 %.4f top5 %.4f%s | lr %.4g | %.0fs", row["epoch"],
        row["step"], row["train_loss"], row["train_top1_error"],
        row["train_top5_error"], row["test_loss"], row["test_top1_error"],
        row["test_top5_error"], recomputed, row["learning_rate"],
        row["wall_seconds"])

  def _session(self) -> tuple[dict, str]:
    """The run's HParams session: (hparams, trial id)."""
    from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
    keys = list(getattr(self.cfg, "hparams_keys", None) or ())
    hparams = summaries.session_hparams(self.cfg, keys, config_lib.make())
    return hparams, summaries.trial_id(hparams)

  def _write_run_summaries(self, writer):
    """Into the train run: the HParams session (a sweep's cell: its swept
    flags; a lone run: the flags that differ from the defaults), the flags
    as text and the custom-scalars layout."""
    from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
    hparams, trial = self._session()
    summaries.write_session(writer, hparams, trial)
    with writer.as_default(step=0):
      tf.summary.text("flags", "```\n" + config_lib.to_flagfile(self.cfg)
                      + "```")
    summaries.write_layout(writer)
    writer.flush()

  def _write_experiment(self, run: _Run) -> None:
    """A lone run's HParams experiment, at its end: its session's flags
    and, as metrics, the final evaluations and every measured scalar.
    A sweep's cells leave the experiment to the sweep."""
    if getattr(self.cfg, "hparams_keys", None):
      return
    hparams, _ = self._session()
    keys = {k for row in run.measurements for k in row
            if k not in ("epoch", "step")}
    with run.writers[summaries.TRAIN_RUN].as_default(step=run.step):
      summaries.write_experiment({k: [v] for k, v in hparams.items()},
                                 summaries.metric_tags(keys))

  def _write_scalars(self, run: _Run, step: int, scalars: dict) -> None:
    """Callback scalars to their runs (`summaries.route`); non-finite or
    unresolved ones are not written but logged once per tag, with the
    reason, to the console and as text."""
    finite, dropped = scalars_lib.finite_scalars(scalars, self.cfg.dtype)
    for key, reason in dropped.items():
      run.dropped[key] = run.dropped.get(key, 0) + 1
      if run.dropped[key] == 1:
        note = (f"{key} is {reason} at step {step}: not plotted (the "
                f"count of such steps is in results.json)")
        logging.warning("%s", note)
        with run.writers[summaries.TRAIN_RUN].as_default(step=step):
          tf.summary.text("non_finite", note)
    for name, values in summaries.route(finite).items():
      with run.writers[name].as_default(step=step):
        for key, value in values.items():
          tf.summary.scalar(key, value)

  def _log_start(self, step: int) -> None:
    """One line: model, parameters, data, batch, replicas, run directory."""
    cfg = self.cfg
    logging.info(
        "%s %s: %s %s, %d parameters; %s: %d train / %d test examples; "
        "batch %d, %d steps (%d per epoch); %d replica%s; run directory %s",
        "resuming at step %d of" % step if step else "training",
        cfg.model, f"depth {cfg.depth}", f"width {cfg.width}",
        self.num_parameters, self.train_data.info.name,
        self.train_data.info.num_examples,
        self.test_data.info.num_examples if self.test_data else 0,
        self.global_batch_size, self.total_steps, self.steps_per_epoch,
        self.num_replicas, "" if self.num_replicas == 1 else "s",
        self.model_dir)


@dataclasses.dataclass
class _Run:
  """What one call of `Trainer.run` carries from stop to stop."""
  step: int
  writers: dict            # "train", "test" (, "*_recomputed_bn")
  manager: tf.train.CheckpointManager
  save_dir: str            # where `manager` writes
  throughput: _Throughput
  elapsed_before: float    # wall seconds of earlier sessions of the run
  history: list            # evaluation rows
  measurements: list       # callback rows
  feed: Any = None         # this epoch's batches (or the chunked set)
  progbar: Any = None
  # Steps at which each callback tag was non-finite (not plotted).
  dropped: dict = dataclasses.field(default_factory=dict)
  batch_loss: float = math.nan  # mean loss of the last chunk of steps
  started: float = dataclasses.field(default_factory=time.time)

  def wall(self) -> float:
    """Wall seconds of the run, earlier sessions included."""
    return self.elapsed_before + time.time() - self.started


class _ResidentEpoch:
  """One epoch's batches as tensors [num_batches, batch, ...] and a cursor."""

  def __init__(self, x, y, position):
    self.x, self.y, self.position = x, y, position


class _Throughput:
  """Examples per second of training steps, the first (tracing) call out."""

  def __init__(self, previous=None):
    self.previous = previous
    self.last_rate = 0.0
    self.calls = 0
    self.examples = 0
    self.seconds = 0.0
    self.first = None

  def add(self, examples, seconds):
    self.last_rate = examples / seconds if seconds > 0 else 0.0
    self.calls += 1
    if self.calls == 1:
      self.first = (examples, seconds)
      return
    self.examples += examples
    self.seconds += seconds

  def rate(self):
    if self.seconds > 0:
      return self.examples / self.seconds
    if self.first and self.first[1] > 0:
      return self.first[0] / self.first[1]
    return self.previous or 0.0


def train(cfg, strategy=None, callbacks=(), model_dir=None,
          datasets=None) -> dict:
  """Builds and runs a `Trainer`; returns the results.json contents.

  Runs only the given callbacks: `tfcapacity.measurements.train` adds those
  that the measurement flags of `cfg` ask for.

  Args:
    cfg: a `tfcapacity.config.Config`.
    strategy: a `tf.distribute.Strategy`; default from `--strategy`.
    callbacks: `tfcapacity.training.Callback`s (measurements).
    model_dir: the run directory; default `cfg.model_dir`.
    datasets: optional `(train, test)` Datasets replacing `--dataset`.
  """
  return Trainer(cfg, strategy, callbacks, model_dir, datasets).run()
