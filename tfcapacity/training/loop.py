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
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfcapacity import data as data_lib
from tfcapacity import distribute
from tfcapacity import models as models_lib
from tfcapacity.errors import UserError
from tfcapacity.objective import losses
from tfcapacity.training import callbacks as callbacks_lib
from tfcapacity.training import dynamics
from tfcapacity.training import optim
from tfcapacity import rundir

EVAL_KEYS = ("train_loss", "train_top1_error", "train_top5_error",
             "test_loss", "test_top1_error", "test_top5_error")


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


class Trainer:
  """Builds data, model and optimizer from a Config and trains.

  Attributes after construction: `strategy`, `train_data`, `test_data`,
  `model`, `optimizer`, `global_batch_size`, `steps_per_epoch`,
  `total_steps`, `num_replicas`.
  """

  def __init__(self, cfg, strategy: tf.distribute.Strategy | None = None,
               callbacks=(), model_dir: str | None = None, datasets=None):
    """Builds everything; see `train` for the arguments.

    Args:
      datasets: optional `(train, test)` `tfcapacity.data.Dataset`s used
        instead of `--dataset` (notebooks, benchmarks).
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
    self.callbacks = list(callbacks) + callbacks_lib.from_config(cfg)

    # Everything that can be wrong with the input is found before the run
    # directory is touched.
    if datasets is not None:
      self.train_data, self.test_data = datasets
      self.eval_train_data = self.train_data
    else:
      self.train_data = data_lib.get(cfg.dataset, "train", cfg)
      self.test_data = data_lib.get(cfg.dataset, "test", cfg)
      self.eval_train_data = (data_lib.get(cfg.dataset, "train",
                                           cfg.replace(augment=False))
                              if cfg.augment else self.train_data)
    info = self.train_data.info
    n = info.num_examples
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

    with self.strategy.scope():
      keras.utils.set_random_seed(cfg.seed)
      self.model = models_lib.from_config(cfg, info.input_shape,
                                          info.num_classes)
      self.schedule = optim.make_schedule(cfg, self.steps_per_epoch,
                                          self.total_steps)
      self.optimizer = optim.make_optimizer(cfg, self.schedule)
      # Slot variables must exist before the first distributed step
      # (keras-team/keras#23085).
      self.optimizer.build(self.model.trainable_variables)
      self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.position_var = tf.Variable(0, dtype=tf.int64, trainable=False)
      self.elapsed_var = tf.Variable(0.0, dtype=tf.float64, trainable=False)
      tvars = self.model.trainable_variables
      self.distance = (dynamics.DistanceTracker(tvars)
                       if cfg.track_distance else None)
      self.noise = (dynamics.GradientNoise(cfg, tvars, self.steps_per_epoch,
                                           self.num_replicas)
                    if cfg.grad_noise != "none" else None)
      self.variance = (dynamics.GradientVarianceRecorder(tvars)
                       if cfg.record_grad_variance else None)
      if self.accumulate:
        self._accumulators = [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.SUM)
            for v in self.model.trainable_variables]
    self.num_parameters = int(sum(
        np.prod(v.shape) for v in self.model.trainable_variables))
    extra = {}
    if self.distance is not None:
      extra["distance"] = self.distance.trackables()
    if self.variance is not None:
      extra["grad_variance"] = self.variance.trackables()
    self.checkpoint = tf.train.Checkpoint(
        model=self.model, optimizer=self.optimizer, step=self.step_var,
        epoch=self.epoch_var, data_position=self.position_var,
        elapsed=self.elapsed_var, **extra)
    if self.distance or self.noise or self.variance:
      self.callbacks.append(dynamics.DynamicsCallback(
          self.distance, self.noise, self.variance))
    self._build_functions()

  # -- set-up -------------------------------------------------------------

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

  def _build_functions(self):
    strategy, model, optimizer = self.strategy, self.model, self.optimizer
    tvars = model.trainable_variables
    b = self.global_batch_size
    wd = self.cfg.weight_decay
    loss_fn = losses.get(self.cfg.loss)

    def replica_step(x, y):
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
        data_loss = tf.nn.compute_average_loss(loss_fn(y, logits),
                                               global_batch_size=b)
        loss = data_loss + tf.nn.scale_regularization_loss(
            losses.l2_penalty(model, wd))
      grads = tape.gradient(loss, tvars)
      grads = adjust(grads)
      optimizer.apply_gradients(zip(grads, tvars))
      return data_loss

    def adjust(grads):
      """Records the step's gradients and adds noise, as the flags ask."""
      if self.variance is not None:
        self.variance.accumulate(grads, strategy.num_replicas_in_sync)
      if self.noise is not None:
        grads = self.noise.add(grads, optimizer.iterations)
      return grads

    def tracked(step_fn):
      """`step_fn()` (one step, cross-replica) with the distance updated."""
      if self.distance is None:
        return step_fn()
      before = self.distance.snapshot()
      out = step_fn()
      self.distance.update(before)
      return out

    def steps(fetch, num_steps):
      # Stops after the first non-finite loss. The test sits in the loop's
      # condition rather than in a `tf.cond` in its body: on small models a
      # conditional per step costs a measurable share of the step.
      total = tf.constant(0.0)
      done = tf.constant(0)
      finite = tf.constant(True)
      while done < num_steps and finite:
        loss = tracked(lambda: strategy.reduce(
            tf.distribute.ReduceOp.SUM,
            strategy.run(replica_step, args=fetch(done)), axis=None))
        total += loss
        done += 1
        finite = tf.math.is_finite(loss)
      return total, done, finite

    @tf.function
    def train_steps(iterator, num_steps):
      return steps(lambda _: next(iterator), num_steps)

    @tf.function
    def train_steps_resident(x, y, start, num_steps):
      return steps(lambda i: (x[start + i], y[start + i]), num_steps)

    self.train_steps = train_steps
    self.train_steps_resident = train_steps_resident

    k5 = min(5, self.train_data.info.num_classes)

    def replica_eval(x, y, w):
      return losses.metric_sums(loss_fn, y, model(x, training=False), w, k5)

    @tf.function
    def eval_sums(dist_dataset):
      sums = tf.zeros([4])
      for batch in dist_dataset:
        sums += strategy.reduce(tf.distribute.ReduceOp.SUM,
                                strategy.run(replica_eval, args=batch),
                                axis=None)
      return sums

    self.eval_sums = eval_sums

    if self.accumulate:
      n = self.train_data.info.num_examples
      accumulators = self._accumulators

      def replica_accumulate(x, y, w):
        with tf.GradientTape() as tape:
          logits = model(x, training=True)
          loss = tf.reduce_sum(w * loss_fn(y, logits)) / n
        grads = tape.gradient(loss, tvars)
        for a, g in zip(accumulators, grads):
          a.assign_add(g)
        return loss

      def replica_apply():
        # The gradient of the L2 term, split over the replicas whose
        # gradients the optimizer sums.
        decay = wd / strategy.num_replicas_in_sync
        grads = [a.read_value() + decay * v if wd and losses.is_decayed(v)
                 else a.read_value() for a, v in zip(accumulators, tvars)]
        optimizer.apply_gradients(zip(adjust(grads), tvars))
        for a in accumulators:
          a.assign(tf.zeros_like(a))

      @tf.function
      def full_batch_step(dist_dataset):
        total = tf.constant(0.0)
        for batch in dist_dataset:
          total += strategy.reduce(
              tf.distribute.ReduceOp.SUM,
              strategy.run(replica_accumulate, args=batch), axis=None)
        tracked(lambda: strategy.run(replica_apply))
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

  def evaluate(self) -> dict[str, float]:
    """Loss and top-1/top-5 error over the whole train and test sets."""
    if not hasattr(self, "_eval_sets"):
      self._eval_sets = {
          split: distribute_batches(self.strategy, ds, self.eval_batch_size,
                                    pad=True)
          for split, ds in (("train", self.eval_train_data),
                            ("test", self.test_data))}
    metrics = {}
    for split, dist in self._eval_sets.items():
      loss, top1, top5, count = self.eval_sums(dist).numpy().tolist()
      metrics[f"{split}_loss"] = loss / count
      metrics[f"{split}_top1_error"] = 1.0 - top1 / count
      metrics[f"{split}_top5_error"] = 1.0 - top5 / count
    return metrics

  # -- the run ------------------------------------------------------------

  def _context(self, step):
    return callbacks_lib.Context(
        model=self.model, optimizer=self.optimizer, strategy=self.strategy,
        cfg=self.cfg, train_data=self.train_data, test_data=self.test_data,
        model_dir=self.model_dir, step=step,
        epoch=step // self.steps_per_epoch,
        global_batch_size=self.global_batch_size,
        steps_per_epoch=self.steps_per_epoch)

  def _run_callbacks(self, step, epoch_end, writer):
    scalars = {}
    ctx = self._context(step)
    for cb in self.callbacks:
      if not cb.due(step, ctx.epoch, epoch_end):
        continue
      start = time.time()
      values = cb(ctx) or {}
      values = {k: float(v) for k, v in values.items()}
      values[f"timing/{cb.name}_seconds"] = time.time() - start
      scalars.update(values)
    if scalars:
      with writer.as_default(step=step):
        for k, v in scalars.items():
          tf.summary.scalar(k, v)
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

  def run(self) -> dict:
    """Trains to the end (or resumes there) and returns results.json."""
    cfg, model_dir = self.cfg, self.model_dir
    resumable = rundir.prepare(model_dir, cfg, chief=self.chief)
    ckpt_dir = os.path.join(model_dir, rundir.CHECKPOINT_DIR)
    save_dir = ckpt_dir if self.chief else tempfile.mkdtemp(
        prefix="tfcapacity-worker-")
    manager = tf.train.CheckpointManager(
        self.checkpoint, save_dir, max_to_keep=cfg.keep_checkpoints,
        step_counter=self.step_var)
    latest = tf.train.latest_checkpoint(ckpt_dir) if resumable else None
    results = (rundir.read_results(model_dir) if resumable else None) or {}
    if latest:
      with self.strategy.scope():
        self.checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info("Resumed %s at step %d.", latest, int(self.step_var))
    step = int(self.step_var.numpy())
    history = [r for r in results.get("history", []) if r["step"] <= step]
    measurements = [r for r in results.get("measurements", [])
                    if r["step"] <= step]

    if self.chief:
      writers = {name: tf.summary.create_file_writer(
          os.path.join(model_dir, name)) for name in ("train", "eval")}
    else:
      writers = {name: tf.summary.create_noop_writer()
                 for name in ("train", "eval")}
    if step == 0 and self.chief:
      self._write_run_summaries(model_dir)

    session_start = time.time()
    elapsed_before = float(self.elapsed_var.numpy())

    def wall():
      return elapsed_before + time.time() - session_start

    def summary(status):
      out = {
          "status": status, "flags": self.cfg.to_dict(), "history": history,
          "final": history[-1] if history else {},
          "examples_per_second": throughput.rate(),
          "num_parameters": self.num_parameters,
          "num_replicas": self.num_replicas, "steps": step,
          "total_steps": self.total_steps,
          "steps_per_epoch": self.steps_per_epoch,
          "global_batch_size": self.global_batch_size,
      }
      if measurements:
        out["measurements"] = measurements
      return out

    def save_results(status):
      if self.chief:
        rundir.write_json(os.path.join(model_dir, rundir.RESULTS_FILE),
                          summary(status))

    def save_checkpoint():
      self.step_var.assign(step)
      self.epoch_var.assign(step // self.steps_per_epoch)
      self.position_var.assign(step % self.steps_per_epoch)
      self.elapsed_var.assign(wall())
      manager.save(checkpoint_number=step)

    throughput = _Throughput(results.get("examples_per_second"))
    for cb in self.callbacks:
      cb.on_train_begin(self._context(step))

    if (results.get("status") == "completed" and step >= self.total_steps
        and history):
      logging.info("%s already holds a completed run.", model_dir)
      if self.chief and cfg.export and not os.path.exists(
          os.path.join(model_dir, "saved_model")):
        rundir.export_model(self.model, model_dir)
      return results

    def evaluation_row(epoch_end):
      metrics = self.evaluate()
      row = {"epoch": step // self.steps_per_epoch, "step": step, **metrics,
             "learning_rate": float(self.schedule(max(step - 1, 0))),
             "wall_seconds": wall()}
      with writers["eval"].as_default(step=step):
        for key, value in metrics.items():
          split, name = key.split("_", 1)
          tf.summary.scalar(f"{split}/{name}", value)
      row.update(self._run_callbacks(step, epoch_end, writers["train"]))
      return row

    def diverged(where, value):
      logging.error("Run diverged at step %d (%s is %s); the last good "
                    "checkpoint is kept.", step, where, value)
      save_results("diverged")
      out = summary("diverged")
      out["diverged_at_step"] = step
      return out

    if step == 0 and not history:
      row = evaluation_row(epoch_end=True)
      history.append(row)
      if not all(math.isfinite(row[k]) for k in EVAL_KEYS):
        return diverged("the initial loss", row["train_loss"])
      save_checkpoint()
      save_results("running")
      self._log_epoch(row)

    progbar = None
    if cfg.progress_bar and sys.stdout.isatty() and self.chief:
      progbar = keras.utils.Progbar(self.total_steps,
                                    stateful_metrics=["loss"])
      progbar.update(step)
    if self.accumulate:
      full_batch_data = distribute_batches(
          self.strategy, self.train_data, self.chunk_size, pad=True)

    while step < self.total_steps:
      epoch = step // self.steps_per_epoch
      batch_in_epoch = step % self.steps_per_epoch
      # Throughput counts everything but evaluation, callbacks and
      # checkpoints: iterator creation, the steps, summaries, progress.
      start = time.time()
      iterator = (None if self.accumulate
                  else self.train_iterator(epoch, batch_in_epoch))
      while True:
        stop = self._next_stop(step, batch_in_epoch)
        if self.accumulate:
          loss_sum = self.full_batch_step(full_batch_data)
          done, finite = 1, bool(tf.math.is_finite(loss_sum))
          loss_sum = float(loss_sum)
        else:
          loss_sum, done, finite = self.run_steps(iterator, stop - step)
        step += done
        batch_in_epoch += done
        if not finite:
          return diverged("the training loss", loss_sum / max(done, 1))
        with writers["train"].as_default(step=step):
          tf.summary.scalar("train/batch_loss", loss_sum / done)
          tf.summary.scalar("train/learning_rate",
                            float(self.schedule(step - 1)))
          if throughput.last_rate:
            tf.summary.scalar("train/examples_per_second",
                              throughput.last_rate)
        if progbar is not None:
          progbar.update(step, [("loss", loss_sum / done)])
        throughput.add(done * self.global_batch_size, time.time() - start)
        if batch_in_epoch >= self.steps_per_epoch or step >= self.total_steps:
          break
        scalars = self._run_callbacks(step, False, writers["train"])
        if scalars:
          measurements.append({"epoch": epoch, "step": step, **scalars})
        if (cfg.checkpoint_every_steps
            and step % cfg.checkpoint_every_steps == 0):
          save_checkpoint()
          save_results("running")
        start = time.time()

      epoch_end = batch_in_epoch >= self.steps_per_epoch
      epochs_done = step // self.steps_per_epoch
      final = step >= self.total_steps
      if final or (epoch_end and epochs_done % cfg.eval_every == 0):
        row = evaluation_row(epoch_end)
        if not all(math.isfinite(row[k]) for k in EVAL_KEYS):
          history.append(row)
          return diverged("the evaluation loss", row["train_loss"])
        history.append(row)
        save_checkpoint()
        save_results("completed" if final else "running")
        self._log_epoch(row)
      else:
        scalars = self._run_callbacks(step, epoch_end, writers["train"])
        if scalars:
          measurements.append({"epoch": epochs_done, "step": step,
                               **scalars})
        logging.info("epoch %d step %d: batch loss %.4f", epochs_done, step,
                     loss_sum / done)
        if cfg.checkpoint_every_steps and (
            step % cfg.checkpoint_every_steps == 0):
          save_checkpoint()
          save_results("running")

    for cb in self.callbacks:
      cb.on_train_end(self._context(step))
    for w in writers.values():
      w.flush()
    if self.chief and cfg.export:
      rundir.export_model(self.model, model_dir)
    save_results("completed")
    if not self.chief:
      shutil.rmtree(save_dir, ignore_errors=True)
    return summary("completed")

  def _log_epoch(self, row):
    logging.info(
        "epoch %d step %d: train loss %.4f top1 %.4f top5 %.4f | test loss "
        "%.4f top1 %.4f top5 %.4f | lr %.4g | %.0fs", row["epoch"],
        row["step"], row["train_loss"], row["train_top1_error"],
        row["train_top5_error"], row["test_loss"], row["test_top1_error"],
        row["test_top5_error"], row["learning_rate"], row["wall_seconds"])

  def _write_run_summaries(self, model_dir):
    """HParams (so sweeps compare in its dashboard) and the flags as text."""
    from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
    from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
    hparams = {}
    for key, value in self.cfg.semantic_dict().items():
      if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
      hparams[key] = "" if value is None else value
    metrics = [hp.Metric(f"{split}/{name}", group="eval")
               for split in ("train", "test")
               for name in ("loss", "top1_error", "top5_error")]
    writer = tf.summary.create_file_writer(model_dir)
    with writer.as_default(step=0):
      hp.hparams_config(hparams=[hp.HParam(k) for k in hparams],
                        metrics=metrics)
      hp.hparams(hparams, trial_id=os.path.basename(
          os.path.abspath(model_dir)))
      tf.summary.text("flags", "```\n" + config_lib.to_flagfile(self.cfg)
                      + "```")
    writer.close()


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

  Args:
    cfg: a `tfcapacity.config.Config`.
    strategy: a `tf.distribute.Strategy`; default from `--strategy`.
    callbacks: `tfcapacity.training.Callback`s (measurements).
    model_dir: the run directory; default `cfg.model_dir`.
    datasets: optional `(train, test)` Datasets replacing `--dataset`.
  """
  return Trainer(cfg, strategy, callbacks, model_dir, datasets).run()
