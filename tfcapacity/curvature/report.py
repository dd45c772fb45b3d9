"""The curvature measurements of the analysis tools, on a loaded model.

`python -m tfcapacity.hessian` and `python -m tfcapacity.sharpness` load a
model, fixed examples and the loss (`rundir.load`) and run one of these:

  * `hessian_report`: the top-k eigenvalues of the Hessian of the mean loss
    (power iteration with deflation, the lambda_max of papers/003 Sec. 2.3,
    or Lanczos), optionally its trace (Hutchinson 1990, or Hutch++, Meyer
    et al. 2021), its diagonal (Hutchinson's estimate, summarised per
    layer), its eigenvalue density (stochastic Lanczos quadrature,
    Ghorbani, Krishnan & Xiao 2019) and the top eigenvalue of each layer's
    diagonal block;
  * `sharpness_report`: Keskar et al.'s (2017) sharpness, Metric 2.1, the
    largest relative increase of the loss in a box around the weights.

Both work through `make_operator`, the `hvp.HessianOperator` of the mean loss
over the loaded examples; `LossObjective` adapts it to the objective that
`sharpness.sharpness` maximises (float32 inside, float64 outside).

TensorFlow is imported inside the functions (through `hvp`, `eigen`,
`blocks`), so that the tools can import this module before their flags are
checked.
"""

from __future__ import annotations

import math
import os
import time

from absl import logging
import numpy as np

from tfcapacity import curvature
from tfcapacity import objective
from tfcapacity.errors import UserError, choices_error
from tfcapacity.progress import Progress
from tfcapacity import rundir

# Trace estimators of `hessian_report` (`eigen.hutchinson_trace`,
# `eigen.hutchpp_trace`), and the fewest probes each needs.
TRACE_METHODS = ("hutchinson", "hutchpp")
MIN_TRACE_PROBES = {"hutchinson": 1, "hutchpp": 3}


def check_trace_options(trace_method: str, trace_probes: int) -> None:
  """Raises UserError for an unknown method or too few probes."""
  if trace_method not in TRACE_METHODS:
    raise choices_error("--trace_method", trace_method, TRACE_METHODS)
  least = MIN_TRACE_PROBES[trace_method]
  if trace_probes < least:
    raise UserError(f"--trace_probes={trace_probes} is too few for "
                    f"--trace_method={trace_method}: use at least {least}")


# --- The loss as an operator --------------------------------------------------


def make_operator(loaded: rundir.Loaded, *, bn_mode: str = "auto",
                  ghost_batch_size: int | None = None,
                  batch_size: int | None = None,
                  layers: list[str] | None = None,
                  include_slopes: bool = False, method: str = "reverse"):
  """The `hvp.HessianOperator` of the mean loss over the loaded examples.

  The loss is `loaded.loss` (`objective.LOSSES`).

  Args:
    loaded: from `rundir.load`.
    bn_mode: auto | inference | batch | ghost; `auto` is the mode the run
      trained with (`objective.training_bn_mode`; inference for a model
      without a run directory).
    ghost_batch_size: default the run's, when it trained with ghost batch
      norm (else the model's own).
    batch_size: examples per batch; default `objective.
      measurement_batch_size`: all of them up to `objective.MAX_BATCH_SIZE`,
      or in batch/ghost mode the run's training batch when it divides them
      (the batch-norm statistics are per batch), as the curvature callback
      measures.
    layers, include_slopes: the parameter block
      (`objective.function.select_params`).
    method: reverse | forward.

  Raises:
    UserError: a block of a SavedModel, and the operator's own errors.
  """
  from tfcapacity.curvature import hvp
  from tfcapacity.objective import function as function_lib
  n = len(loaded.y)
  cfg = loaded.config
  bn_mode = objective.resolve_bn_mode(
      bn_mode, cfg.normalization if cfg is not None else None)
  if batch_size is None:
    run_batch = (None if cfg is None or cfg.full_batch
                 else int(cfg.batch_size))
    batch_size = objective.measurement_batch_size(n, bn_mode, run_batch)
  if ghost_batch_size is None and cfg is not None and (
      cfg.normalization == "ghost"):
    ghost_batch_size = cfg.ghost_batch_size
  params = None
  if layers or include_slopes:
    if not loaded.is_keras:
      raise UserError("--layers/--include_slopes need a Keras model "
                      "(--model_dir or --keras_model); a SavedModel's "
                      "variables have no layers")
    params = function_lib.select_params(loaded.model, layers or None,
                                        include_slopes=include_slopes)
  return hvp.HessianOperator(
      loaded.model, loaded.x, loaded.y, loss=loaded.loss, bn_mode=bn_mode,
      batch_size=batch_size, params=params, method=method,
      strategy=loaded.strategy, ghost_batch_size=ghost_batch_size)


class LossObjective:
  """The mean loss of a `HessianOperator`'s examples as a sharpness objective.

  `sharpness.sharpness` works in float64 numpy; the operator in its own
  dtype (float32). Every evaluation is at explicit parameters, so a Keras
  model is never changed, and a SavedModel's variables are restored after
  each call (`HessianOperator.loss_and_gradient`).
  """

  def __init__(self, op):
    self.op = op
    self.size = int(op.size)
    self._x = np.asarray(op.parameters(), np.float64)

  def initial(self) -> np.ndarray:
    return self._x.copy()

  def loss_and_gradient(self, params: np.ndarray
                        ) -> tuple[float, np.ndarray]:
    flat = np.asarray(params, self.op.dtype.as_numpy_dtype)
    loss, grad = self.op.loss_and_gradient(flat)
    return float(loss), np.asarray(grad, np.float64)


# --- The measurements --------------------------------------------------------


def hessian_report(loaded: rundir.Loaded, *, top_k: int = 1,
                   method: str = "power", hvp_method: str = "reverse",
                   trace: bool = False,
                   trace_probes: int = 100, trace_method: str = "hutchinson",
                   diagonal: bool = False, diagonal_probes: int = 100,
                   density: bool = False,
                   density_runs: int = 4, density_steps: int = 30,
                   density_figure: str | None = None,
                   bn_mode: str = "auto",
                   ghost_batch_size: int | None = None,
                   batch_size: int | None = None,
                   layers: list[str] | None = None,
                   include_slopes: bool = False, tol: float = 1e-3,
                   max_iterations: int = 100,
                   lanczos_steps: int | None = None, seed: int = 0,
                   per_layer: bool = False,
                   progress_bar: bool = True) -> dict:
  """Top eigenvalues, and optionally trace and density, of the Hessian.

  Args:
    loaded: from `rundir.load`.
    top_k: eigenvalues wanted.
    method: power (power iteration: for top_k=1 the largest eigenvalue,
      as the curvature callback measures it; for more, with deflation, the
      largest in magnitude) | lanczos (largest algebraic); see `eigen`.
    hvp_method: reverse | forward.
    trace, trace_probes: the trace estimate with that many probes
      (matvecs).
    trace_method: hutchinson | hutchpp (same matvecs; Hutch++ needs >= 3).
    diagonal, diagonal_probes: Hutchinson's estimate of the Hessian's
      diagonal with that many probes, summarised per layer (`diagonal_
      summary`).
    density, density_runs, density_steps: stochastic Lanczos quadrature.
    density_figure: write the density's PNG here.
    bn_mode, ghost_batch_size, batch_size, layers, include_slopes: see
      `make_operator`.
    tol, max_iterations: power iteration's stopping rule and budget (per
      eigenvalue); `tol` also decides `converged` for Lanczos.
    lanczos_steps: default `eigen.default_lanczos_steps`.
    seed: seeds the starts (trace, density and diagonal use seed + 1,
      seed + 2 and seed + 3).
    per_layer: also lambda_max of every layer's diagonal block
      (`blocks.per_layer`), as `per_layer` rows.
    progress_bar: see `Progress`.

  Returns:
    A JSON-ready dict: eigenvalues, residuals, relative_residuals,
    iterations, converged (all pairs), converged_pairs, and trace,
    trace_stderr, trace_probes, trace_method, diagonal, density when asked,
    plus how it was computed and `loaded.description`.

  Raises:
    UserError: bad options.
  """
  from tfcapacity.curvature import eigen
  if method not in curvature.EIGEN_METHODS:
    raise choices_error("--method", method, curvature.EIGEN_METHODS)
  if trace:
    check_trace_options(trace_method, trace_probes)
  if diagonal and diagonal_probes < 1:
    raise UserError(f"--diagonal_probes={diagonal_probes} must be positive")
  start = time.time()
  op = make_operator(loaded, bn_mode=bn_mode,
                     ghost_batch_size=ghost_batch_size,
                     batch_size=batch_size, layers=layers,
                     include_slopes=include_slopes, method=hvp_method)
  if not 1 <= top_k <= op.size:
    raise UserError(f"--top_k={top_k} must lie in [1, {op.size}] (the "
                    f"number of parameters)")
  described = op.describe()
  out = {**loaded.description, **described, "method": method,
         "hvp_method": described["method"], "top_k": int(top_k),
         "seed": int(seed), "layers": list(layers) if layers else None}
  if method == "power" and top_k == 1:
    # lambda_max is the largest eigenvalue, as the curvature callback logs
    # it: one spectral shift when the largest in magnitude is negative.
    with Progress("power iteration", max_iterations,
                  bar=progress_bar) as report:
      one = eigen.power_iteration(op, tol=tol, max_iterations=max_iterations,
                                  seed=seed, which="LA", progress=report)
    found = eigen.TopK([one.eigenvalue], [one.eigenvector], [one.residual],
                       [one.relative_residual], one.iterations,
                       [one.converged], "power")
    out.update(tol=float(tol), max_iterations=int(max_iterations))
  elif method == "power":
    with Progress("power iteration", top_k * max_iterations,
                  bar=progress_bar) as report:
      found = eigen.top_k_power(op, top_k, tol=tol,
                                max_iterations=max_iterations, seed=seed,
                                progress=report)
    out.update(tol=float(tol), max_iterations=int(max_iterations))
  else:
    steps = min(lanczos_steps or eigen.default_lanczos_steps(op.size, top_k),
                op.size)
    with Progress("lanczos", steps, bar=progress_bar) as report:
      found = eigen.lanczos_top_k(op, top_k, num_steps=steps, seed=seed,
                                  tol=tol, progress=report)
    out.update(tol=float(tol), lanczos_steps=int(steps))
  out.update(eigenvalues=found.eigenvalues, residuals=found.residuals,
             relative_residuals=found.relative_residuals,
             iterations=int(found.iterations),
             converged=bool(all(found.converged)),
             converged_pairs=[bool(c) for c in found.converged])
  matvecs = found.iterations
  if trace:
    with Progress("trace", trace_probes, bar=progress_bar) as report:
      estimator = (eigen.hutchpp_trace if trace_method == "hutchpp"
                   else eigen.hutchinson_trace)
      estimate = estimator(op, trace_probes, seed=seed + 1, progress=report)
    out.update(trace=estimate.trace, trace_stderr=estimate.stderr,
               trace_probes=int(trace_probes), trace_method=trace_method)
    matvecs += estimate.iterations
  if diagonal:
    with Progress("diagonal", diagonal_probes, bar=progress_bar) as report:
      found_diagonal = eigen.hutchinson_diagonal(op, diagonal_probes,
                                                 seed=seed + 3,
                                                 progress=report)
    out["diagonal"] = diagonal_summary(op, found_diagonal, loaded)
    matvecs += found_diagonal.num_probes
  if density:
    with Progress("density", density_runs * min(density_steps, op.size),
                  bar=progress_bar) as report:
      spectrum = eigen.spectral_density(op, num_runs=density_runs,
                                        num_steps=density_steps,
                                        seed=seed + 2, progress=report)
    out["density"] = {
        "grid": spectrum.grid.tolist(), "values": spectrum.values.tolist(),
        "sigma": spectrum.sigma, "runs": int(density_runs),
        "steps": int(density_steps),
        "nodes": [n.tolist() for n in spectrum.nodes],
        "weights": [w.tolist() for w in spectrum.weights]}
    matvecs += spectrum.iterations
    if density_figure:
      eigen.density_figure(spectrum, density_figure)
      out["density_figure"] = os.path.abspath(density_figure)
  if per_layer:
    if not loaded.is_keras:
      raise UserError("--per_layer needs a Keras model (--model_dir or "
                      "--keras_model); a SavedModel's variables have no "
                      "layers")
    from tfcapacity.curvature import blocks
    from tfcapacity.models import layers as layers_lib
    names = layers_lib.weighted_layers(loaded.model)
    with Progress("per-layer", len(names), bar=progress_bar) as report:
      rows = blocks.per_layer(
          loaded.model, lambda name: make_operator(
              loaded, bn_mode=bn_mode, ghost_batch_size=ghost_batch_size,
              batch_size=batch_size, layers=[name], method=hvp_method),
          layers=names, tol=tol, max_iterations=max_iterations, seed=seed,
          progress=report)
    matvecs += sum(row["iterations"] for row in rows)
    out["per_layer"] = rows
  out["matvecs"] = int(matvecs)
  out["seconds"] = time.time() - start
  return out


def parameter_groups(op, loaded: rundir.Loaded) -> list[tuple[str, int]]:
  """(name, number of entries) of consecutive parts of the operator's flat
  vectors: per layer for a Keras model (the layer that owns each variable,
  nested models' layers included), per variable for a SavedModel."""
  owner = {}
  if loaded.is_keras:
    import keras  # pylint: disable=g-import-not-at-top
    from tfcapacity.models import layers as layers_lib
    for layer in layers_lib.all_layers(loaded.model):
      if isinstance(layer, keras.Model):
        continue
      for weight in layer.weights:
        owner.setdefault(id(weight), layer.name)
  groups: list[tuple[str, int]] = []
  for param, shape in zip(op.params, op.shapes):
    name = owner.get(id(param), getattr(param, "path", None) or param.name)
    count = int(np.prod(shape))
    if groups and groups[-1][0] == name:
      groups[-1] = (name, groups[-1][1] + count)
    else:
      groups.append((name, count))
  return groups


def diagonal_summary(op, found, loaded: rundir.Loaded) -> dict:
  """The JSON summary of an `eigen.DiagonalResult` of the Hessian.

  Returns:
    probes; mean (over all parameters) and sum (equal to the Hutchinson
    trace estimate from the same probes); stderr_rms, the root mean square
    of the per-entry standard errors; and per_layer, one row per
    `parameter_groups` entry: layer, num_parameters, sum, mean, stderr_rms.
    No standard error of a sum is given: the entries' errors are correlated
    (their covariance is H_ij^2), so they do not add in quadrature.
  """
  diag, stderr = found.diagonal, found.stderr

  def rms(values):
    return float(np.sqrt(np.mean(values ** 2)))

  rows, offset = [], 0
  for name, count in parameter_groups(op, loaded):
    part = slice(offset, offset + count)
    rows.append({"layer": name, "num_parameters": count,
                 "sum": float(np.sum(diag[part])),
                 "mean": float(np.mean(diag[part])),
                 "stderr_rms": rms(stderr[part])})
    offset += count
  return {"probes": int(found.num_probes), "mean": float(np.mean(diag)),
          "sum": float(np.sum(diag)), "stderr_rms": rms(stderr),
          "per_layer": rows}


def sharpness_report(loaded: rundir.Loaded, *, epsilon: float = 1e-3,
                     optimizer: str = "lbfgsb",
                     subspace_dim: int | None = None,
                     max_iterations: int = 10, bn_mode: str = "auto",
                     ghost_batch_size: int | None = None,
                     batch_size: int | None = None,
                     layers: list[str] | None = None,
                     include_slopes: bool = False, seed: int = 0,
                     progress_bar: bool = True) -> dict:
  """Keskar et al.'s sharpness of the loss over the loaded examples.

  Args:
    loaded: from `rundir.load`.
    epsilon: the box size (Keskar et al. used 1e-3 and 5e-4).
    optimizer: lbfgsb | ascent, the inner maximisation (`sharpness`).
    subspace_dim: None for the full space, else a random subspace of p dims.
    max_iterations: the optimiser's budget (10 in the paper).
    bn_mode, ghost_batch_size, batch_size, layers, include_slopes: see
      `make_operator`.
    seed: seeds the random subspace and start.
    progress_bar: see `Progress`.

  Returns:
    A JSON-ready dict: `SharpnessResult.to_json()` (sharpness, epsilon,
    max_loss, ...) with its `loss` (the value at the centre) renamed
    `loss_value`, `optimizer`, how the loss was computed, and
    `loaded.description` (whose `loss` names the loss function).
  """
  from tfcapacity.curvature import sharpness as sharpness_lib
  start = time.time()
  op = make_operator(loaded, bn_mode=bn_mode,
                     ghost_batch_size=ghost_batch_size,
                     batch_size=batch_size, layers=layers,
                     include_slopes=include_slopes)
  objective = LossObjective(op)
  with Progress(f"sharpness eps={epsilon:g}", None, bar=progress_bar,
                every=5) as report:
    result = sharpness_lib.sharpness(
        objective, epsilon, method=optimizer, subspace_dim=subspace_dim,
        max_iterations=max_iterations, seed=seed, progress=report)
  described = op.describe()
  described.pop("method")
  found = result.to_json()
  # "loss" names the loss function in every tool's JSON (as in flags.txt);
  # the sharpness result's loss value at the centre is "loss_value".
  found["loss_value"] = found.pop("loss")
  out = {**loaded.description, **described, **found,
         "optimizer": optimizer,
         "layers": list(layers) if layers else None}
  out["seconds"] = time.time() - start
  if not math.isfinite(out["sharpness"]):
    logging.warning("the sharpness is not finite (%s): the loss overflowed "
                    "inside the box", out["sharpness"])
  return out
