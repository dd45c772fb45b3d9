"""lambda_max during training: the maxi-batch study's Figures 3 and 4.

Every `--curvature_every_epochs` epochs (or `--curvature_every_steps` steps,
and at the end of every epoch within `--curvature_around_drop` epochs of a
learning-rate drop) the callback measures the Hessian's largest eigenvalue
by power iteration on Hessian-vector products (papers/003, Sec. 2.3), the
largest algebraic eigenvalue (`which="LA"`: when the largest in magnitude is
negative, as in batch mode at initialisation, one spectral shift finds the
top one; `--curvature_top_k` > 1 ranks by magnitude):
  * on a fixed set of `--curvature_examples` training examples (m = 500 in
    the paper, "to reduce the variance of the estimate"), drawn once with the
    run's seed by `tfcapacity.data.draw_indices`, the draw of the analysis
    tools: `python -m tfcapacity.hessian --model_dir=RUN --seed=SEED
    --num_examples=N` on a checkpoint measures the same loss on the same
    examples as the callback did there;
  * on `--curvature_test_batches` test batches of the same size, averaged
    (Fig. 4: "average lambda_max over the test set"; -1 takes every batch),
    consecutive slices of one seeded permutation of the test set (the first
    is what the tools draw from the test split).
The batch-norm statistics inside the loss are those the optimiser's steps
use (`--curvature_bn_mode=auto`, the default: batch statistics over batches
of the training batch size, `objective.measurement_batch_size`), or the
moving statistics (`inference`). Each power iteration starts from the
eigenvector the previous measurement found (a warm start: between nearby
models it converges in a few products). Optionally the top-k eigenvalues
(`--curvature_top_k`, by deflation or with `--curvature_method=lanczos`)
and the trace (`--curvature_trace_probes`).

Scalars, logged to TensorBoard and to results.json's `measurements` rows
(`rundir.series` reads one over a run):
  curvature/lambda_max, curvature/relative_residual, curvature/iterations,
  curvature/eigenvalue_2 ..., curvature/trace, curvature/trace_stderr,
  curvature/lambda_max_test, curvature/lambda_max_test_std,
  curvature/stability_threshold: the largest curvature on which the
    optimiser's iteration is stable at the learning rate of the last step
    (`optim.stability_threshold`: 2(1+beta)/eta for heavy-ball momentum,
    2/eta for plain SGD; absent for Adam),
  curvature/lambda_max_over_threshold: their ratio (1 = the edge).
results.json's `callbacks.curvature` records how it measured (batch-norm
mode, batch size, examples). The loop logs the callback's wall time as
`timing/curvature_seconds`, apart from the training throughput. The
measurement never changes the model (`hvp.HessianOperator` works on
tensors).
"""

from __future__ import annotations

from absl import logging
import numpy as np

from tfcapacity import data as data_lib
from tfcapacity.errors import UserError
from tfcapacity import objective
from tfcapacity.curvature import eigen
from tfcapacity.curvature import hvp
from tfcapacity.training import callbacks as callbacks_lib
from tfcapacity.training import optim


def fixed_indices(seed: int, num_examples: int, size: int) -> np.ndarray:
  """The training examples measured throughout a run (in drawn order)."""
  return data_lib.draw_indices(seed, num_examples, size)


def test_batches(seed: int, num_examples: int, size: int, batches: int
                 ) -> list[np.ndarray]:
  """Disjoint test batches of `size` (`batches=-1`: as many as fit).

  Consecutive slices of `data.draw_indices(seed, num_examples,
  num_examples)`, so the first is the tools' draw of `size` test examples.
  """
  size = min(size, num_examples)
  available = num_examples // size
  batches = available if batches < 0 else min(batches, available)
  order = data_lib.draw_indices(seed, num_examples, num_examples)
  return [order[b * size:(b + 1) * size] for b in range(batches)]


def epochs_around_drops(drop_epochs, window: int) -> frozenset[int]:
  """Epoch counts within `window` of a drop: measured besides the schedule.

  A drop at epoch d takes effect at the first step of epoch d (0-based),
  i.e. after d epochs: the end of epoch count d is the last measurement at
  the old rate and d + 1 the first after an epoch at the new one. The
  counts returned are the last `window` before the drop and the first
  `window` after it, d - window + 1 ... d + window.
  """
  out = set()
  for drop in drop_epochs or ():
    d = int(round(float(drop)))
    out.update(range(max(d - window + 1, 0), d + window + 1))
  return frozenset(out) if window > 0 else frozenset()


class CurvatureCallback(callbacks_lib.Callback):
  """Measures lambda_max (and optionally top-k, trace) on fixed examples."""

  name = "curvature"

  def __init__(self, cfg):
    self.cfg = cfg
    self.every_epochs = cfg.curvature_every_epochs
    self.every_steps = cfg.curvature_every_steps
    self.train_op = None
    self.test_op = None
    self.train_examples = None
    self.test_examples = []
    self._holds = None  # Which examples the shared operator holds.
    self._vectors = None  # Warm starts: the last eigenvectors found.
    self._test_vectors = []
    self.bn_mode = objective.resolve_bn_mode(cfg.curvature_bn_mode,
                                             cfg.normalization)
    self.around_drop = epochs_around_drops(
        cfg.lr_drop_epochs if cfg.lr_schedule == "step" else (),
        cfg.curvature_around_drop)
    self._info = {}

  def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
    return super().due(step, epoch, epoch_end) or bool(
        epoch_end and epoch in self.around_drop)

  def _operator(self, ctx, x, y):
    cfg = self.cfg
    batch_size = cfg.curvature_batch_size or objective.measurement_batch_size(
        len(y), self.bn_mode, ctx.global_batch_size)
    return hvp.HessianOperator(
        ctx.model, x, y, loss=cfg.loss, bn_mode=self.bn_mode,
        batch_size=batch_size, strategy=ctx.strategy,
        ghost_batch_size=(cfg.ghost_batch_size
                          if cfg.normalization == "ghost" else None))

  def info(self) -> dict:
    """How lambda_max is measured (results.json's `callbacks.curvature`)."""
    return dict(self._info)

  def check(self, ctx):
    """Builds the operators on the fixed examples (before anything is
    written): a bad --curvature_bn_mode or --curvature_top_k fails here. A
    --curvature_examples above the training set's size takes all of it,
    with a logged note."""
    cfg = self.cfg
    n = ctx.train_data.info.num_examples
    if cfg.curvature_examples > n:
      logging.warning("--curvature_examples=%d exceeds the %d training "
                      "examples: lambda_max is measured on all %d.",
                      cfg.curvature_examples, n, n)
    try:
      self._build(ctx)
    except UserError as e:
      raise UserError(str(e).replace("--bn_mode", "--curvature_bn_mode")
                      ) from None
    k = cfg.curvature_top_k
    if k > self.train_op.size:
      raise UserError(
          f"--curvature_top_k={k} exceeds the {self.train_op.size} "
          f"parameters the Hessian is taken over; use at most "
          f"{self.train_op.size}")

  def on_train_begin(self, ctx):
    if self.train_op is None:
      self._build(ctx)
    m = len(self.train_examples[1])
    logging.info("curvature: lambda_max over %d training examples and %d "
                 "test batches of %d, bn_mode=%s (batches of %d), every %s%s",
                 m, len(self.test_examples), m, self.bn_mode,
                 self.train_op.batch_size,
                 f"{self.every_epochs} epochs" if self.every_epochs
                 else f"{self.every_steps} steps",
                 f" and after epochs {sorted(self.around_drop)}"
                 if self.around_drop else "")

  def _build(self, ctx):
    """The fixed examples and the operators on them."""
    cfg = self.cfg
    index = fixed_indices(cfg.seed, ctx.train_data.info.num_examples,
                          cfg.curvature_examples)
    m = len(index)
    self.train_examples = ctx.train_data.examples(index)
    self.train_op = self._operator(ctx, *self.train_examples)
    self._holds = "train"
    if cfg.curvature_test_batches and ctx.test_data is not None:
      self.test_examples = [
          ctx.test_data.examples(index) for index in test_batches(
              cfg.seed, ctx.test_data.info.num_examples, m,
              cfg.curvature_test_batches)]
      # Test batches as large as the training set share its operator (one
      # trace: tracing a ResNet's double backprop takes about a second).
      self.test_op = (self.train_op if len(self.test_examples[0][1]) == m
                      else self._operator(ctx, *self.test_examples[0]))
      self._test_vectors = [None] * len(self.test_examples)
    self._info = {
        "bn_mode": self.bn_mode, "bn_mode_flag": cfg.curvature_bn_mode,
        "batch_size": int(self.train_op.batch_size), "examples": int(m),
        "test_batches": len(self.test_examples), "seed": int(cfg.seed),
        "loss": self.train_op.loss,
        "extra_epochs": sorted(self.around_drop)}

  def _top(self, op, vectors, seed):
    """The top eigenvalues of `op` and their vectors (warm-started)."""
    cfg = self.cfg
    k = cfg.curvature_top_k
    kwargs = dict(tol=cfg.curvature_tol, seed=seed)
    if cfg.curvature_method == "lanczos":
      result = eigen.lanczos_top_k(op, k, v0=vectors[0] if vectors else None,
                                   **kwargs)
    elif k == 1:
      one = eigen.power_iteration(op, v0=vectors[0] if vectors else None,
                                  max_iterations=cfg.curvature_max_iterations,
                                  which="LA", **kwargs)
      return ([one.eigenvalue], [one.eigenvector], one.relative_residual,
              one.iterations)
    else:
      result = eigen.top_k_power(op, k, v0s=vectors,
                                 max_iterations=cfg.curvature_max_iterations,
                                 **kwargs)
    return (list(result.eigenvalues), list(result.eigenvectors),
            max(result.relative_residuals), result.iterations)

  def _hold(self, op, which, examples):
    if op is self.train_op and self._holds != which:
      op.set_examples(*examples)
      self._holds = which
    elif op is not self.train_op:
      op.set_examples(*examples)

  def __call__(self, ctx):
    seed = int(ctx.step)
    self._hold(self.train_op, "train", self.train_examples)
    values, self._vectors, residual, iterations = self._top(
        self.train_op, self._vectors, seed)
    out = {"curvature/lambda_max": values[0],
           "curvature/relative_residual": residual,
           "curvature/iterations": iterations}
    threshold = optim.threshold_from_optimizer(ctx.optimizer,
                                               ctx.learning_rate)
    if threshold is not None:
      out["curvature/stability_threshold"] = threshold
      out["curvature/lambda_max_over_threshold"] = values[0] / threshold
    for i, value in enumerate(values[1:], start=2):
      out[f"curvature/eigenvalue_{i}"] = value
    if self.cfg.curvature_trace_probes:
      trace = eigen.hutchinson_trace(self.train_op,
                                     self.cfg.curvature_trace_probes,
                                     seed=seed)
      out["curvature/trace"] = trace.trace
      out["curvature/trace_stderr"] = trace.stderr
    if self.test_examples:
      tops = []
      for j, examples in enumerate(self.test_examples):
        self._hold(self.test_op, f"test{j}", examples)
        result = eigen.power_iteration(
            self.test_op, v0=self._test_vectors[j],
            tol=self.cfg.curvature_tol,
            max_iterations=self.cfg.curvature_max_iterations, seed=seed,
            which="LA")
        self._test_vectors[j] = result.eigenvector
        tops.append(result.eigenvalue)
      out["curvature/lambda_max_test"] = float(np.mean(tops))
      out["curvature/lambda_max_test_std"] = float(np.std(tops))
    logging.info("step %d: lambda_max %.4g (train, %d products, residual "
                 "%.1e)%s", ctx.step, values[0], iterations, residual,
                 f", {out['curvature/lambda_max_test']:.4g} (test)"
                 if self.test_examples else "")
    return out
