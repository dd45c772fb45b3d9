"""Eigenvalues, trace and spectral density of a symmetric operator.

Every routine here sees the Hessian only through an operator with `size`,
`dtype` and `matvec(v)` (for a model's loss: `hvp.HessianOperator`), and
counts its cost in matrix-vector products ("iterations" below always means
matvecs, the expensive part).

What is implemented, and from where:
  * `power_iteration`: the largest eigenpair by power iteration on Hessian-
    vector products, the lambda_max measurement of the maxi-batch study
    (papers/003, Sec. 2.3). That study does not say when to stop; we stop on
    the eigen-residual, ||Hv - lambda v|| <= tol |lambda|: for a symmetric H
    some eigenvalue then lies within tol |lambda| of lambda, and the result
    carries the residual so the claim can be checked. `which="LA"` finds the
    largest algebraic eigenvalue with one spectral shift when the largest in
    magnitude is negative; `deflate` applies Hotelling deflation.
  * `top_k_power`: the top k eigenpairs in magnitude by successive Hotelling
    deflation, finished by a Rayleigh-Ritz step on the span of the k vectors
    (ours: it removes the error that inexact deflation leaves in the later
    pairs, and costs only the matvecs the residual check needs anyway).
  * `lanczos` / `lanczos_top_k`: k-step Lanczos with full reorthogonalisation
    (classical Gram-Schmidt applied twice against the stored basis), Ritz
    pairs from the tridiagonal in float64.
  * `hutchinson_trace`: Hutchinson's estimator tr(H) ~ mean z^T H z over
    Rademacher probes z, with its standard error.
  * `hutchpp_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++:
    Optimal Stochastic Trace Estimation", Algorithm 1): the trace of a low-
    rank sketch Q^T H Q exactly, plus Hutchinson on the rest
    (I - QQ^T) H (I - QQ^T), for the same matvec budget as Hutchinson.
  * `hutchinson_diagonal`: the diagonal estimate E[z * Hz] over Rademacher
    probes (Bekas, Kokiopoulou & Saad 2007), with per-entry standard errors.
  * `DenseOperator`: the operator interface over a dense numpy matrix, for
    tests and small problems.
  * `spectral_density`: stochastic Lanczos quadrature as in Ghorbani,
    Krishnan & Xiao (2019), "An Investigation into Neural Net Optimization
    via Hessian Eigenvalue Density", Sec. 2: for each of a few Gaussian
    starts, the eigenvalues of the Lanczos tridiagonal are quadrature nodes
    and the squared first components of its eigenvectors their weights; the
    density is the average over starts of the weighted nodes smoothed by a
    Gaussian.

Where we depart from the sources, or decide what they leave open:
  * Every reported residual is a true one: `top_k_power` and `lanczos_top_k`
    spend one more matvec per eigenpair on the undeflated operator and report
    ||H u - lambda u|| for the pairs they return, so a deflated or Ritz
    estimate can be checked rather than trusted.
  * Ordering: `top_k_power` returns eigenvalues by decreasing magnitude (what
    power iteration finds); `lanczos_top_k` returns the k largest algebraic
    Ritz values, decreasing, which is what "the top of the Hessian spectrum"
    means. The two agree whenever the k largest-magnitude eigenvalues are
    positive, as they usually are for a Hessian near a minimum.
  * Eigenvectors are defined up to sign. Returned vectors point the same way
    as the warm start `v0` when one is given, and otherwise have their
    largest-magnitude entry positive, so repeated calls agree.
  * Density smoothing: Ghorbani et al.'s released code smooths with a very
    narrow Gaussian (variance 1e-5 max(1, spread)) on a 10,000-point grid
    and rescales the curve to unit sum. Here each grid value is
    the smoothed density's exact mass in that grid cell divided by the cell
    width (a cell average). For a kernel wider than the grid spacing this
    equals the point value to O((h / sigma)^2); for a narrower one it still
    integrates to one, with no rescaling. The default kernel width is 0.2%
    of the spread of the nodes (about two grid cells at the default grid of
    1000 points), wide enough to draw a readable curve, narrow enough to keep
    isolated outliers apart from the bulk; pass `sigma` to choose another.
  * Lanczos stops early when beta_j <= breakdown_tol * ||T|| (estimated by
    the largest |alpha| or beta so far): the Krylov space is then invariant
    to working precision, and the shorter tridiagonal is exact on it. The
    default tolerance is 100 machine epsilons of the operator's dtype: the
    rounding noise left in beta after an exact invariant subspace measured
    3-10 epsilons here, while a genuinely small beta (a start with little
    weight on some eigenvector) is kept; with full reorthogonalisation
    carrying on past a small beta is harmless, so erring low is safe.

Vectors stay on the operator's device as flat tensors of its dtype; inner
products and norms accumulate in float64, and the scalars that come back
(eigenvalues, alphas and betas, residuals) are Python floats or float64
numpy arrays. The vector work of one iteration runs in one small
`tf.function` that traces once per dtype, except the Lanczos step: its basis
is a preallocated `tf.Variable` [steps, size] filled row by row (a growing
basis does not retrace), and it traces once per (steps, size, dtype).
Random starts come from `tf.random.Generator.from_seed(seed)`: the same seed
on the same device gives the same result.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol, Sequence

from absl import logging
import numpy as np
import scipy.linalg
import scipy.special
import tensorflow as tf

from tfcapacity.errors import UserError, choices_error
from tfcapacity import figures

WHICH = ("LM", "LA")
# progress(iteration, info): iteration counts matvecs so far in the call.
Progress = Callable[[int, dict], None]


class Operator(Protocol):
  """A symmetric linear operator on flat vectors of length `size`."""
  size: int
  dtype: tf.DType

  def matvec(self, v: tf.Tensor) -> tf.Tensor:
    ...


class DenseOperator:
  """The `Operator` interface over a dense square numpy matrix.

  The eigen-solvers assume a symmetric matrix; the trace and diagonal
  estimators accept any square one.

  Attributes:
    matrix: the matrix, float64 numpy [size, size].
    size: its order.
    dtype: the dtype of the vectors `matvec` takes and returns.
    calls: matvecs so far (to check an estimator's cost).
  """

  def __init__(self, matrix, dtype: tf.DType = tf.float64):
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
      raise UserError(f"DenseOperator needs a square matrix, got shape "
                      f"{matrix.shape}")
    self.matrix = matrix
    self.size = int(matrix.shape[0])
    self.dtype = tf.as_dtype(dtype)
    self._matrix = tf.constant(matrix, self.dtype)
    self.calls = 0

  def matvec(self, v: tf.Tensor) -> tf.Tensor:
    self.calls += 1
    return tf.linalg.matvec(self._matrix, v)


# --- Results -----------------------------------------------------------------


@dataclasses.dataclass
class EigenResult:
  """One eigenpair from power iteration.

  Attributes:
    eigenvalue: the Rayleigh quotient v^T H v of the returned vector.
    eigenvector: unit-norm flat tensor of the operator's dtype.
    residual: ||H v - eigenvalue v|| for the returned pair, with the operator
      the iteration ran on (deflated, if `deflate` was given).
    relative_residual: residual / |eigenvalue| (inf for a zero eigenvalue
      with a nonzero residual).
    iterations: matvecs spent.
    converged: whether relative_residual <= tol was reached.
    which: "LM" or "LA".
  """
  eigenvalue: float
  eigenvector: tf.Tensor
  residual: float
  relative_residual: float
  iterations: int
  converged: bool
  which: str = "LM"


@dataclasses.dataclass
class TopK:
  """Several eigenpairs with their true residuals.

  Attributes:
    eigenvalues: decreasing magnitude for method "power-deflation",
      decreasing value for method "lanczos".
    eigenvectors: unit-norm flat tensors, in the same order.
    residuals: ||H u - lambda u|| with the undeflated operator.
    relative_residuals: residuals / |lambda|.
    iterations: total matvecs, including one per pair for the residuals.
    converged: per pair, relative residual <= tol.
    method: "power-deflation" or "lanczos".
  """
  eigenvalues: list[float]
  eigenvectors: list[tf.Tensor]
  residuals: list[float]
  relative_residuals: list[float]
  iterations: int
  converged: list[bool]
  method: str


@dataclasses.dataclass
class LanczosResult:
  """The Lanczos tridiagonal T (and optionally its basis Q, with Q H Q^T = T).

  Attributes:
    alphas: float64 [n], the diagonal of T.
    betas: float64 [n - 1], its off-diagonal.
    iterations: matvecs spent (n).
    basis: [n, P] tensor of orthonormal rows, if `keep_basis` was set.
    final_beta: the norm of the last residual vector, beta_n; the Ritz pair
      (theta_i, Q^T s_i) has residual beta_n |s_i[n-1]|.
    breakdown: whether Lanczos stopped before `num_steps` on an invariant
      subspace.
  """
  alphas: np.ndarray
  betas: np.ndarray
  iterations: int
  basis: tf.Tensor | None = None
  final_beta: float = 0.0
  breakdown: bool = False

  @property
  def steps(self) -> int:
    return len(self.alphas)

  def ritz(self) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (increasing) and eigenvectors of T, in float64."""
    return _tridiagonal_eigh(self.alphas, self.betas)


@dataclasses.dataclass
class TraceResult:
  """Hutchinson's estimate of tr(H).

  Attributes:
    trace: the mean of the samples.
    stderr: sample standard deviation (ddof=1) / sqrt(num_probes); nan for a
      single probe.
    samples: float64 [num_probes], z^T H z per probe.
    iterations: matvecs spent (num_probes).
  """
  trace: float
  stderr: float
  samples: np.ndarray
  iterations: int


@dataclasses.dataclass
class DiagonalResult:
  """Hutchinson's estimate of diag(H).

  Attributes:
    diagonal: float64 [size], the mean of z * Hz over the probes.
    stderr: float64 [size], per entry the sample standard deviation
      (ddof=1) / sqrt(num_probes); all nan for a single probe.
    num_probes: probes (= matvecs) spent.
  """
  diagonal: np.ndarray
  stderr: np.ndarray
  num_probes: int


@dataclasses.dataclass
class Density:
  """A smoothed eigenvalue density from stochastic Lanczos quadrature.

  Attributes:
    grid: float64 [grid_size], evenly spaced eigenvalue axis.
    values: float64 [grid_size], the density (integrates to one over grid).
    nodes: per run, the eigenvalues of its tridiagonal (increasing).
    weights: per run, the quadrature weights of its nodes (they sum to one).
    sigma: the standard deviation of the Gaussian kernel.
    iterations: total matvecs.
  """
  grid: np.ndarray
  values: np.ndarray
  nodes: list[np.ndarray]
  weights: list[np.ndarray]
  sigma: float
  iterations: int

  def mean(self) -> float:
    """The quadrature estimate of the mean eigenvalue, tr(H) / size."""
    return float(np.mean([np.dot(n, w) for n, w in zip(self.nodes,
                                                       self.weights)]))


# --- Small compiled vector kernels -------------------------------------------
# Inner products and norms accumulate in float64 whatever the vector dtype.


def _dot64(a, b):
  return tf.reduce_sum(tf.cast(a, tf.float64) * tf.cast(b, tf.float64))


def _norm64(a):
  a = tf.cast(a, tf.float64)
  return tf.sqrt(tf.reduce_sum(a * a))


@tf.function(reduce_retracing=True)
def _dot(a, b):
  return _dot64(a, b)


@tf.function(reduce_retracing=True)
def _prepare_start(v, directions):
  """Removes the components along the rows of `directions`; unit norm."""
  v = v - tf.linalg.matvec(directions, tf.linalg.matvec(directions, v),
                           transpose_a=True)
  norm = _norm64(v)
  return tf.cast(tf.math.divide_no_nan(tf.cast(v, tf.float64), norm),
                 v.dtype), norm


@tf.function(reduce_retracing=True)
def _power_step(v, hv, defl_vectors, defl_values, shift):
  """One power step on A = H - sum_j l_j u_j u_j^T - shift I, given hv = H v.

  Returns the Rayleigh quotient v^T A v, the residual ||A v - rq v|| and the
  next iterate A v / ||A v||.
  """
  av = hv - tf.linalg.matvec(
      defl_vectors, defl_values * tf.linalg.matvec(defl_vectors, v),
      transpose_a=True)
  av = tf.cast(av, tf.float64) - shift * tf.cast(v, tf.float64)
  v64 = tf.cast(v, tf.float64)
  rq = tf.reduce_sum(v64 * av)
  residual = _norm64(av - rq * v64)
  v_next = tf.math.divide_no_nan(av, _norm64(av))
  return rq, residual, tf.cast(v_next, v.dtype)


@tf.function(reduce_retracing=True)
def _residual(v, hv, value):
  """||H v - value v|| in float64."""
  return _norm64(tf.cast(hv, tf.float64) - value * tf.cast(v, tf.float64))


@tf.function(reduce_retracing=True)
def _orient(v, reference):
  """Flips v to point along `reference` or, if that is zero, so that its
  largest-magnitude entry is positive."""
  along = _dot64(v, reference)
  pivot = tf.cast(tf.gather(v, tf.argmax(tf.abs(v))), tf.float64)
  sign = tf.where(tf.not_equal(along, 0.0), tf.sign(along), tf.sign(pivot))
  sign = tf.where(tf.equal(sign, 0.0), tf.constant(1.0, tf.float64), sign)
  return v * tf.cast(sign, v.dtype)


# Traced once per basis shape. Not `reduce_retracing`: a trace generalised
# over variable shapes keeps the static shape of the variable it was traced
# with (tf.shape(basis) returned the old row count for a new, smaller basis
# in TF 2.21), so every basis shape gets its own exact trace.
@tf.function
def _lanczos_full_step(basis, j, w, beta_prev):
  """Lanczos step j with full reorthogonalisation, w = H q_j on entry.

  Rows 0..j of `basis` hold q_0..q_j. Subtracts the three-term recurrence,
  then projects out rows 0..j twice (classical Gram-Schmidt; a second pass
  restores orthogonality to working precision, Kahan's "twice is enough",
  analysed by Giraud, Langou & Rozloznik 2005), and stores
  q_{j+1} = w / beta_j in row j + 1 when there is one.
  """
  q = basis[j]
  q_prev = basis[tf.maximum(j - 1, 0)]
  alpha = _dot64(q, w)
  w = (w - tf.cast(alpha, w.dtype) * q
       - tf.cast(beta_prev, w.dtype) * q_prev)
  active = basis[:j + 1]
  for _ in range(2):
    w = w - tf.linalg.matvec(active, tf.linalg.matvec(active, w),
                             transpose_a=True)
  beta = _norm64(w)
  q_next = tf.cast(tf.math.divide_no_nan(tf.cast(w, tf.float64), beta),
                   w.dtype)
  if j + 1 < basis.shape[0]:
    basis[j + 1].assign(q_next)
  return alpha, beta, q_next


@tf.function(reduce_retracing=True)
def _lanczos_plain_step(q, q_prev, w, beta_prev):
  """Lanczos step without reorthogonalisation (the bare recurrence)."""
  alpha = _dot64(q, w)
  w = (w - tf.cast(alpha, w.dtype) * q
       - tf.cast(beta_prev, w.dtype) * q_prev)
  beta = _norm64(w)
  q_next = tf.cast(tf.math.divide_no_nan(tf.cast(w, tf.float64), beta),
                   w.dtype)
  return alpha, beta, q_next


# --- Helpers -----------------------------------------------------------------


def _check_int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or int(value) != value or value < minimum:
    raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _as_vector(op: Operator, v, name: str) -> tf.Tensor:
  v = tf.reshape(tf.cast(tf.convert_to_tensor(v), op.dtype), [-1])
  if v.shape[0] != op.size:
    raise UserError(f"{name} has {v.shape[0]} entries; the operator has "
                    f"size {op.size}")
  return v


def _stack(op: Operator, vectors: Sequence[tf.Tensor]) -> tf.Tensor:
  if not vectors:
    return tf.zeros([0, op.size], op.dtype)
  return tf.stack([_as_vector(op, u, "a deflation vector") for u in vectors])


def _start(op: Operator, v0, gen: tf.random.Generator,
           directions: tf.Tensor) -> tf.Tensor:
  """A unit start vector: v0, or a Gaussian draw, orthogonal to `directions`."""
  if v0 is None:
    v = gen.normal([op.size], dtype=op.dtype)
  else:
    v = _as_vector(op, v0, "v0")
  v, norm = _prepare_start(v, directions)
  if float(norm) == 0.0:
    raise UserError("the start vector v0 is zero (or lies in the span of the "
                    "deflated eigenvectors)")
  return v


def _relative(residual: float, value: float) -> float:
  if value != 0.0:
    return residual / abs(value)
  return 0.0 if residual == 0.0 else math.inf


def _tridiagonal_eigh(alphas: np.ndarray, betas: np.ndarray):
  alphas = np.asarray(alphas, np.float64)
  betas = np.asarray(betas, np.float64)
  if alphas.size == 1:
    return alphas.copy(), np.ones((1, 1))
  return scipy.linalg.eigh_tridiagonal(alphas, betas)


def _power_run(op, v, *, tol, max_iterations, defl_vectors, defl_values,
               shift, progress, offset, phase):
  """Power iteration on H (deflated) - shift I from unit v.

  Returns (v, eigenvalue of H, residual, matvecs, converged): the eigenvalue
  is shifted back, and the residual is the same for H and H - shift I.
  """
  shift_t = tf.constant(shift, tf.float64)
  value = residual = math.nan
  converged = False
  iterations = 0
  for iterations in range(1, max_iterations + 1):
    rq, res, v_next = _power_step(v, op.matvec(v), defl_vectors, defl_values,
                                  shift_t)
    value = float(rq) + shift
    residual = float(res)
    converged = residual <= tol * abs(value)
    if progress is not None:
      progress(offset + iterations, {
          "eigenvalue": value, "residual": residual,
          "relative_residual": _relative(residual, value), "phase": phase})
    if converged or iterations == max_iterations:
      break
    v = v_next
  return v, value, residual, iterations, converged


def _power_iteration(op, gen, *, v0, tol, max_iterations, which, deflate,
                     progress, offset=0, label="the eigenvalue"
                     ) -> EigenResult:
  if which not in WHICH:
    raise choices_error("eigenvalue selection", which, WHICH)
  max_iterations = _check_int("max_iterations", max_iterations)
  if not tol > 0:
    raise UserError(f"tol must be positive, got {tol!r}")
  defl_values = tf.constant([float(l) for l, _ in deflate], op.dtype)
  defl_vectors = _stack(op, [u for _, u in deflate])
  reference = (_as_vector(op, v0, "v0") if v0 is not None
               else tf.zeros([op.size], op.dtype))

  v, value, residual, spent, converged = _power_run(
      op, _start(op, v0, gen, defl_vectors), tol=tol,
      max_iterations=max_iterations, defl_vectors=defl_vectors,
      defl_values=defl_values, shift=0.0, progress=progress, offset=offset,
      phase="LM")
  if which == "LA" and value < 0:
    # If `value` approximates the most negative eigenvalue, every eigenvalue
    # is >= value - residual (the residual bound), so after that shift the
    # largest in magnitude is the largest algebraic one, moved up by -shift.
    shift = value - residual
    v, value, residual, more, converged = _power_run(
        op, _start(op, v0, gen, defl_vectors), tol=tol,
        max_iterations=max_iterations, defl_vectors=defl_vectors,
        defl_values=defl_values, shift=shift, progress=progress,
        offset=offset + spent, phase="LA")
    spent += more
  relative = _relative(residual, value)
  if not converged:
    logging.warning(
        "power iteration for %s (%s) stopped after %d matvecs without "
        "converging: relative residual %.3g > tol %.3g (value %.6g)", label,
        which, spent, relative, tol, value)
  return EigenResult(eigenvalue=value, eigenvector=_orient(v, reference),
                     residual=residual, relative_residual=relative,
                     iterations=spent, converged=converged, which=which)


# --- Power iteration ---------------------------------------------------------


def power_iteration(op: Operator, *, v0=None, tol: float = 1e-3,
                    max_iterations: int = 100, which: str = "LM",
                    deflate: Sequence[tuple[float, Any]] = (), seed: int = 0,
                    progress: Progress | None = None) -> EigenResult:
  """The dominant eigenpair of `op` by power iteration.

  Each iteration costs one matvec: with v of unit norm it forms Hv, the
  Rayleigh quotient lambda = v^T H v and the residual ||Hv - lambda v||, and
  stops once that is at most tol * |lambda|. Reaching `max_iterations`
  first is not an error: the result says converged=False and a warning is
  logged.

  Args:
    op: the operator (`size`, `dtype`, `matvec`).
    v0: warm start, e.g. the previous eigenvector during training; a
      Gaussian draw if None. A start orthogonal to the wanted eigenvector
      cannot find it, and a start at another eigenvector stops there.
    tol: relative residual at which to stop.
    max_iterations: matvec budget per phase (LA may use two phases).
    which: "LM", the largest magnitude; or "LA", the largest algebraic. LA
      first finds the LM pair; if its eigenvalue is negative, it runs again
      on H - s I with s just below that eigenvalue, where the largest
      magnitude is the largest algebraic eigenvalue minus s.
    deflate: (eigenvalue, unit eigenvector) pairs to remove: the iteration
      runs on H - sum_j lambda_j u_j u_j^T (Hotelling deflation), from a
      start orthogonal to the u_j.
    seed: seeds the random start(s).
    progress: called as progress(matvecs_so_far, info) after every matvec,
      with info keys eigenvalue, residual, relative_residual, phase.

  Returns:
    An `EigenResult`; `iterations` counts the matvecs of both LA phases.

  Raises:
    UserError: for an unknown `which`, a bad budget or tolerance, or a zero
      start vector.
  """
  gen = tf.random.Generator.from_seed(seed)
  return _power_iteration(op, gen, v0=v0, tol=tol,
                          max_iterations=max_iterations, which=which,
                          deflate=deflate, progress=progress)


def _true_residuals(op, values, vectors, tol):
  residuals = []
  for value, u in zip(values, vectors):
    residuals.append(float(_residual(u, op.matvec(u),
                                     tf.constant(value, tf.float64))))
  relative = [_relative(r, v) for r, v in zip(residuals, values)]
  return residuals, relative, [r <= tol for r in relative]


@tf.function(reduce_retracing=True)
def _row_residuals(y, hy, values):
  """||hy_i - values_i y_i|| for each row, in float64."""
  diff = tf.cast(hy, tf.float64) - values[:, None] * tf.cast(y, tf.float64)
  return tf.sqrt(tf.reduce_sum(diff * diff, axis=1))


def top_k_power(op: Operator, k: int, *, tol: float = 1e-3,
                max_iterations: int = 100, seed: int = 0,
                v0s: Sequence[Any] | None = None,
                progress: Progress | None = None) -> TopK:
  """The k largest-magnitude eigenpairs by power iteration with deflation.

  Pair i runs power iteration (LM) on H with pairs 0..i-1 deflated. Then one
  matvec per pair on the undeflated H gives H U for the k vectors U, and a
  Rayleigh-Ritz step on their span (the eigenpairs of U^T H U against
  U^T U, k x k, in float64) combines them. Deflating with a slightly wrong
  u_i leaves an error in the later pairs that lies mostly along u_i (and the
  error in u_i lies mostly along its neighbours in the spectrum, which are
  usually among the other pairs): the Rayleigh-Ritz step removes both at no
  extra matvec. The `residuals` and `converged` then come from H U and are
  true residuals of the returned pairs, not the deflated iteration's.

  Past the numerical rank of H, Hotelling deflation leaves little but the
  rounding error along the deflated vectors, and the iteration can collapse
  onto them. When the Gram matrix U^T U has an eigenvalue below 0.01 the
  Rayleigh-Ritz step is skipped (with a warning) and the pairs are returned
  as found; near-zero eigenvalues then show as not converged.

  Args:
    op: the operator.
    k: number of pairs, 1 <= k <= op.size.
    tol: relative residual at which each power iteration stops, and the
      threshold for `converged`.
    max_iterations: matvec budget per pair.
    seed: seeds the random starts.
    v0s: warm starts, e.g. the previous call's eigenvectors; may be shorter
      than k (random starts for the rest) and may hold None.
    progress: called as progress(matvecs_so_far, info) with info as in
      `power_iteration` plus "index", the pair being computed.

  Returns:
    A `TopK` with eigenvalues by decreasing magnitude.

  Raises:
    UserError: for k out of range and the errors of `power_iteration`.
  """
  k = _check_int("k", k)
  if k > op.size:
    raise UserError(f"k={k} exceeds the operator size {op.size}")
  v0s = list(v0s or [])
  gen = tf.random.Generator.from_seed(seed)
  found: list[tuple[float, tf.Tensor]] = []
  spent = 0
  for i in range(k):
    report = None
    if progress is not None:
      report = lambda it, info, i=i: progress(it, {**info, "index": i})
    result = _power_iteration(
        op, gen, v0=v0s[i] if i < len(v0s) else None, tol=tol,
        max_iterations=max_iterations, which="LM", deflate=found,
        progress=report, offset=spent,
        label=f"eigenvalue_{i + 1} (the top {i + 1} of {k} by magnitude)")
    spent += result.iterations
    found.append((result.eigenvalue, result.eigenvector))

  u = tf.stack([vector for _, vector in found])
  hu = tf.stack([op.matvec(vector) for _, vector in found])
  u64, hu64 = tf.cast(u, tf.float64), tf.cast(hu, tf.float64)
  projected = tf.matmul(u64, hu64, transpose_b=True).numpy()
  gram = tf.matmul(u64, u64, transpose_b=True).numpy()
  if np.linalg.eigvalsh(gram)[0] >= 1e-2:
    theta, s = scipy.linalg.eigh((projected + projected.T) / 2, gram)
  else:
    # Nearly dependent vectors (a failed deflation): combining them would
    # amplify rounding, so keep them as they are.
    logging.warning("top_k_power: the %d vectors are far from orthogonal; "
                    "skipping the Rayleigh-Ritz step.", k)
    theta, s = np.array([value for value, _ in found]), np.eye(k)
  order = np.argsort(-np.abs(theta), kind="stable")
  theta, s = theta[order], s[:, order]
  # Keep each vector's sign: follow the found vector it is mostly made of.
  s = s * np.where(s[np.argmax(np.abs(s), axis=0), np.arange(k)] < 0, -1, 1)
  coefficients = tf.constant(s.T, op.dtype)
  y, hy = tf.matmul(coefficients, u), tf.matmul(coefficients, hu)
  residuals = _row_residuals(y, hy, tf.constant(theta, tf.float64)).numpy()
  values = [float(t) for t in theta]
  residuals = [float(r) for r in residuals]
  relative = [_relative(r, v) for r, v in zip(residuals, values)]
  return TopK(eigenvalues=values, eigenvectors=list(tf.unstack(y)),
              residuals=residuals, relative_residuals=relative,
              iterations=spent + k, converged=[r <= tol for r in relative],
              method="power-deflation")


# --- Lanczos -----------------------------------------------------------------


def lanczos(op: Operator, num_steps: int, *, v0=None, seed: int = 0,
            reorthogonalize: bool = True, keep_basis: bool = False,
            breakdown_tol: float | None = None,
            progress: Progress | None = None) -> LanczosResult:
  """Runs Lanczos tridiagonalisation for up to `num_steps` steps.

  With `reorthogonalize` (the default) every new vector is orthogonalised
  against all earlier ones, twice, so the basis stays orthonormal to
  working precision and T has no spurious copies of converged eigenvalues.
  This keeps a [num_steps, size] basis in the operator's dtype on its
  device: 100 steps on a million float32 parameters is 400 MB.

  Args:
    op: the operator.
    num_steps: number of steps (matvecs); capped at op.size.
    v0: start vector (normalised here); a Gaussian draw if None.
    seed: seeds the random start.
    reorthogonalize: full reorthogonalisation; without it, the bare three-
      term recurrence, which loses orthogonality once Ritz values converge.
    keep_basis: return the basis Q ([steps, size]) in the result.
    breakdown_tol: stop when beta_j <= breakdown_tol * ||T||; default 100
      machine epsilons of op.dtype.
    progress: called as progress(step, {"alpha": ..., "beta": ...}) after
      every step.

  Returns:
    A `LanczosResult`; fewer than num_steps steps after a breakdown.

  Raises:
    UserError: for num_steps < 1 or a zero v0.
  """
  steps = min(_check_int("num_steps", num_steps), op.size)
  if breakdown_tol is None:
    breakdown_tol = 100 * float(np.finfo(op.dtype.as_numpy_dtype).eps)
  gen = tf.random.Generator.from_seed(seed)
  q = _start(op, v0, gen, tf.zeros([0, op.size], op.dtype))
  basis = None
  if reorthogonalize:
    basis = tf.Variable(tf.zeros([steps, op.size], op.dtype),
                        trainable=False, name="lanczos_basis")
    basis[0].assign(q)
  kept = [q] if keep_basis and not reorthogonalize else None

  alphas, betas = [], []
  beta_prev = tf.constant(0.0, tf.float64)
  q_prev = tf.zeros_like(q)
  scale = 0.0
  final_beta, breakdown = 0.0, False
  for j in range(steps):
    w = op.matvec(q)
    if reorthogonalize:
      alpha, beta, q_next = _lanczos_full_step(basis, tf.constant(j), w,
                                               beta_prev)
    else:
      alpha, beta, q_next = _lanczos_plain_step(q, q_prev, w, beta_prev)
    alpha_f, beta_f = float(alpha), float(beta)
    alphas.append(alpha_f)
    scale = max(scale, abs(alpha_f), beta_f)
    if progress is not None:
      progress(j + 1, {"alpha": alpha_f, "beta": beta_f})
    final_beta = beta_f
    if j == steps - 1:
      break
    if beta_f <= breakdown_tol * scale:
      breakdown = True
      logging.info("Lanczos found an invariant subspace after %d steps "
                   "(beta %.3g).", j + 1, beta_f)
      break
    betas.append(beta_f)
    beta_prev = beta
    q_prev, q = q, q_next
    if kept is not None:
      kept.append(q)

  n = len(alphas)
  kept_basis = None
  if keep_basis:
    kept_basis = (tf.convert_to_tensor(basis[:n]) if reorthogonalize
                  else tf.stack(kept))
  return LanczosResult(alphas=np.array(alphas, np.float64),
                       betas=np.array(betas, np.float64), iterations=n,
                       basis=kept_basis, final_beta=final_beta,
                       breakdown=breakdown)


def default_lanczos_steps(size: int, k: int) -> int:
  """Steps `lanczos_top_k` takes by default: min(size, max(2k + 20, 30)).

  Twenty-odd steps beyond the pairs wanted let the top Ritz values settle
  on a spectrum with well-separated outliers; a clustered top may need more.
  """
  return min(size, max(2 * k + 20, 30))


def lanczos_top_k(op: Operator, k: int, *, num_steps: int | None = None,
                  seed: int = 0, v0=None, tol: float = 1e-3,
                  progress: Progress | None = None) -> TopK:
  """The k largest eigenvalues (algebraic) and their Ritz vectors by Lanczos.

  Runs `lanczos` with full reorthogonalisation, takes the k largest Ritz
  values of its tridiagonal (scipy's eigh_tridiagonal, float64) and forms
  their Ritz vectors from the basis. Each pair is then checked with one
  matvec: `residuals` are true ||H y - theta y||, not the beta_n |s_n|
  estimate.

  Args:
    op: the operator.
    k: number of pairs, 1 <= k <= op.size.
    num_steps: Lanczos steps; `default_lanczos_steps(op.size, k)` if None.
    seed: seeds the random start.
    v0: start vector instead of a random one.
    tol: relative residual below which a pair counts as converged.
    progress: passed to `lanczos`.

  Returns:
    A `TopK` with eigenvalues in decreasing order (method "lanczos"). If
    Lanczos breaks down with fewer than k Ritz values, all of them are
    returned and a warning is logged.

  Raises:
    UserError: for k out of range and the errors of `lanczos`.
  """
  k = _check_int("k", k)
  if k > op.size:
    raise UserError(f"k={k} exceeds the operator size {op.size}")
  if num_steps is None:
    num_steps = default_lanczos_steps(op.size, k)
  result = lanczos(op, num_steps, v0=v0, seed=seed, keep_basis=True,
                   progress=progress)
  theta, s = result.ritz()
  order = np.argsort(-theta, kind="stable")[:k]
  if len(order) < k:
    logging.warning("Lanczos stopped after %d steps on an invariant subspace; "
                    "returning %d Ritz pairs instead of %d.", result.steps,
                    len(order), k)
  values = [float(theta[i]) for i in order]
  coefficients = tf.constant(s[:, order].T, op.dtype)
  ritz = tf.matmul(coefficients, result.basis)
  zero = tf.zeros([op.size], op.dtype)
  vectors = []
  for i in range(len(order)):
    y, _ = _prepare_start(ritz[i], tf.zeros([0, op.size], op.dtype))
    vectors.append(_orient(y, zero))
  residuals, relative, converged = _true_residuals(op, values, vectors, tol)
  return TopK(eigenvalues=values, eigenvectors=vectors, residuals=residuals,
              relative_residuals=relative,
              iterations=result.iterations + len(vectors),
              converged=converged, method="lanczos")


# --- Trace -------------------------------------------------------------------


def hutchinson_trace(op: Operator, num_probes: int, *, seed: int = 0,
                     progress: Progress | None = None) -> TraceResult:
  """Hutchinson's estimate of tr(H) from Rademacher probes.

  E[z^T H z] = tr(H) for z with independent +-1 entries, and the variance
  of one sample is 2 (||H||_F^2 - sum_i H_ii^2), so the standard error
  reported (from the samples) shrinks as 1 / sqrt(num_probes).

  Args:
    op: the operator.
    num_probes: number of probes (matvecs).
    seed: seeds the probes.
    progress: called as progress(probe, {"trace": running mean,
      "stderr": running standard error}) after every probe.

  Returns:
    A `TraceResult`.

  Raises:
    UserError: for num_probes < 1.
  """
  num_probes = _check_int("num_probes", num_probes)
  gen = tf.random.Generator.from_seed(seed)
  samples = np.empty(num_probes, np.float64)
  for i in range(num_probes):
    bits = gen.uniform([op.size], minval=0, maxval=2, dtype=tf.int32)
    z = tf.cast(2 * bits - 1, op.dtype)
    samples[i] = float(_dot(z, op.matvec(z)))
    if progress is not None:
      progress(i + 1, {"trace": float(np.mean(samples[:i + 1])),
                       "stderr": _stderr(samples[:i + 1])})
  return TraceResult(trace=float(np.mean(samples)), stderr=_stderr(samples),
                     samples=samples, iterations=num_probes)


def _stderr(samples: np.ndarray) -> float:
  if len(samples) < 2:
    return math.nan
  return float(np.std(samples, ddof=1) / math.sqrt(len(samples)))


def _rademacher(op: Operator, gen: tf.random.Generator) -> tf.Tensor:
  bits = gen.uniform([op.size], minval=0, maxval=2, dtype=tf.int32)
  return tf.cast(2 * bits - 1, op.dtype)


@tf.function(reduce_retracing=True)
def _project_out(basis, v):
  """v - Q Q^T v for the orthonormal columns Q of `basis` ([size, k])."""
  return v - tf.linalg.matvec(basis, tf.linalg.matvec(basis, v,
                                                      transpose_a=True))


def hutchpp_trace(op: Operator, num_probes: int, *, seed: int = 0,
                  progress: Progress | None = None) -> TraceResult:
  """The Hutch++ estimate of tr(H) (Meyer, Musco, Musco & Woodruff 2021).

  With m = num_probes and k = m // 3: k Rademacher columns S give the
  sketch Q = orth(H S) (k matvecs, a reduced QR in the operator's dtype);
  tr(Q^T H Q) is computed exactly (k matvecs); the remaining m - 2k
  Rademacher probes g are projected, p = (I - QQ^T) g, and Hutchinson's
  estimator runs on the deflated operator, p^T H p (one matvec each). For
  any orthonormal Q, tr(H) = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T)), so
  the estimate is unbiased. The matvec count is exactly num_probes, as for
  `hutchinson_trace` with the same num_probes. On a positive semi-definite
  H the error falls as 1 / m rather than Hutchinson's 1 / sqrt(m), and
  when H has rank <= k the sketch captures all of it and the result is
  exact up to round-off. (If k > op.size, k = op.size and the rest of the
  budget goes to probes.)

  Each of the m - 2k samples is tr(Q^T H Q) + p^T H p, an unbiased estimate
  of tr(H) given Q, and `trace` is their mean, as in `hutchinson_trace`.
  The standard error comes from these samples only: the exact part adds
  none. It is the error given the sketch Q; the spread of the sketch itself
  over seeds is not in it (one run cannot measure it). With a single probe
  left (num_probes 3, 4) it is nan.

  Args:
    op: the operator (square; H need not be PSD for unbiasedness).
    num_probes: total matvec budget, >= 3.
    seed: seeds the sketch and the probes.
    progress: called as progress(matvecs_so_far, info) after every matvec,
      info["phase"] being "sketch", "exact" or "probe"; during the probes
      info also holds the running "trace" and "stderr".

  Returns:
    A `TraceResult` with num_probes - 2k samples and iterations=num_probes.

  Raises:
    UserError: for num_probes < 3.
  """
  num_probes = _check_int("num_probes", num_probes, 3)
  k = min(num_probes // 3, op.size)
  remaining = num_probes - 2 * k
  gen = tf.random.Generator.from_seed(seed)
  spent = 0

  def report(phase, **info):
    if progress is not None:
      progress(spent, {"phase": phase, **info})

  sketch = []
  for _ in range(k):
    sketch.append(op.matvec(_rademacher(op, gen)))
    spent += 1
    report("sketch")
  basis, _ = tf.linalg.qr(tf.stack(sketch, axis=1))  # [size, k]
  del sketch
  exact = 0.0
  for j in range(k):
    q = basis[:, j]
    exact += float(_dot(q, op.matvec(q)))
    spent += 1
    report("exact")
  samples = np.empty(remaining, np.float64)
  for i in range(remaining):
    p = _project_out(basis, _rademacher(op, gen))
    samples[i] = exact + float(_dot(p, op.matvec(p)))
    spent += 1
    report("probe", trace=float(np.mean(samples[:i + 1])),
           stderr=_stderr(samples[:i + 1]))
  return TraceResult(trace=float(np.mean(samples)), stderr=_stderr(samples),
                     samples=samples, iterations=num_probes)


@tf.function(reduce_retracing=True)
def _welford_step(mean, m2, count, z, hz):
  """Adds the sample z * hz to a running mean and sum of squared deviations
  (Welford's update, float64; count is the number of samples after it)."""
  x = tf.cast(z, tf.float64) * tf.cast(hz, tf.float64)
  delta = x - mean
  mean = mean + delta / count
  return mean, m2 + delta * (x - mean)


def hutchinson_diagonal(op: Operator, num_probes: int, *, seed: int = 0,
                        progress: Progress | None = None) -> DiagonalResult:
  """Hutchinson's estimate of diag(H) from Rademacher probes.

  For z with independent +-1 entries, (z * Hz)_i = H_ii + sum_{j != i}
  H_ij z_i z_j, so E[z * Hz] = diag(H), and entry i has variance
  sum_{j != i} H_ij^2 per probe: the error shrinks as 1 / sqrt(num_probes),
  and a diagonal H is recovered exactly by a single probe. The running
  mean and variance stay on the operator's device in float64 (Welford's
  update, so identical samples give a standard error of exactly zero).

  Args:
    op: the operator.
    num_probes: number of probes (matvecs).
    seed: seeds the probes.
    progress: called as progress(probe, {"diagonal_mean": mean over entries
      of the running estimate}) after every probe.

  Returns:
    A `DiagonalResult`.

  Raises:
    UserError: for num_probes < 1.
  """
  num_probes = _check_int("num_probes", num_probes)
  gen = tf.random.Generator.from_seed(seed)
  mean = tf.zeros([op.size], tf.float64)
  m2 = tf.zeros([op.size], tf.float64)
  for i in range(num_probes):
    z = _rademacher(op, gen)
    mean, m2 = _welford_step(mean, m2, tf.constant(i + 1, tf.float64), z,
                             op.matvec(z))
    if progress is not None:
      progress(i + 1, {"diagonal_mean": float(tf.reduce_mean(mean))})
  diagonal = mean.numpy()
  if num_probes < 2:
    stderr = np.full(op.size, math.nan)
  else:
    stderr = np.sqrt(m2.numpy() / (num_probes - 1) / num_probes)
  return DiagonalResult(diagonal=diagonal, stderr=stderr,
                        num_probes=num_probes)


# --- Spectral density --------------------------------------------------------


def smooth_density(grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray,
                   sigma: float) -> np.ndarray:
  """Cell averages of sum_i w_i N(t; nodes_i, sigma^2) on an even grid.

  Each value is the mass of the smoothed density in the grid cell around
  that point (edges halfway between points, the end cells as wide as the
  others) divided by the cell width, computed from the normal CDF.
  """
  grid = np.asarray(grid, np.float64)
  h = grid[1] - grid[0]
  edges = np.concatenate([[grid[0] - h / 2], (grid[:-1] + grid[1:]) / 2,
                          [grid[-1] + h / 2]])
  cdf = np.zeros_like(edges)
  nodes = np.asarray(nodes, np.float64)
  weights = np.asarray(weights, np.float64)
  for start in range(0, len(nodes), 256):  # bounds memory for long runs
    block = slice(start, start + 256)
    z = (edges[None, :] - nodes[block, None]) / sigma
    cdf += weights[block] @ scipy.special.ndtr(z)
  return np.diff(cdf) / h


def spectral_density(op: Operator, *, num_runs: int = 4, num_steps: int = 30,
                     grid_size: int = 1000, sigma: float | None = None,
                     seed: int = 0,
                     progress: Progress | None = None) -> Density:
  """The eigenvalue density of `op` by stochastic Lanczos quadrature.

  Each run starts Lanczos (full reorthogonalisation) from a Gaussian vector
  of unit norm. With T = S diag(theta) S^T, the nodes theta_i and weights
  S[0, i]^2 define a quadrature rule for v^T f(H) v, whose expectation over
  v is (1/size) sum_j f(lambda_j); the density is the average of the runs'
  rules smoothed by a Gaussian of standard deviation sigma (see the module
  docstring for how grid values are computed).

  Args:
    op: the operator.
    num_runs: independent starts (Ghorbani et al.'s draws).
    num_steps: Lanczos steps per run, capped at op.size. With
      num_steps = size the nodes are the eigenvalues of H.
    grid_size: grid points.
    sigma: kernel standard deviation; default 0.002 * (largest node -
      smallest node), or 0.002 * max(1, |node|) when all nodes coincide.
    seed: seeds the starts.
    progress: called as progress(matvecs_so_far, {"run": r, "step": j,
      "alpha": ..., "beta": ...}).

  Returns:
    A `Density` over [min node - pad, max node + pad], pad = max(5 sigma,
    1% of the node spread), so the tails of the kernel fit on the grid.

  Raises:
    UserError: for non-positive counts or sigma.
  """
  num_runs = _check_int("num_runs", num_runs)
  grid_size = _check_int("grid_size", grid_size, 2)
  if sigma is not None and not sigma > 0:
    raise UserError(f"sigma must be positive, got {sigma!r}")
  gen = tf.random.Generator.from_seed(seed)
  nodes, weights = [], []
  spent = 0
  for run in range(num_runs):
    report = None
    if progress is not None:
      report = lambda step, info, run=run, offset=spent: progress(
          offset + step, {"run": run, "step": step, **info})
    result = lanczos(op, num_steps, v0=gen.normal([op.size], dtype=op.dtype),
                     progress=report)
    spent += result.iterations
    theta, s = result.ritz()
    nodes.append(theta)
    weights.append(s[0] ** 2)

  lo = min(float(n[0]) for n in nodes)
  hi = max(float(n[-1]) for n in nodes)
  spread = hi - lo
  if sigma is None:
    sigma = 2e-3 * (spread if spread > 0 else max(1.0, abs(hi)))
  pad = max(5 * sigma, 0.01 * spread)
  grid = np.linspace(lo - pad, hi + pad, grid_size)
  values = smooth_density(grid, np.concatenate(nodes),
                          np.concatenate(weights) / num_runs, sigma)
  return Density(grid=grid, values=values, nodes=nodes, weights=weights,
                 sigma=float(sigma), iterations=spent)


def density_figure(density: Density, path: str, title: str | None = None,
                   floor: float = 1e-6) -> str:
  """Writes the density as a PNG: linear eigenvalue axis, log density axis.

  Args:
    density: from `spectral_density`.
    path: the PNG to write (atomically: temp file and rename).
    title: figure title.
    floor: values below floor * max(values) are drawn at that level, so the
      log axis shows the gaps between bulk and outliers without plunging to
      the underflow of the Gaussian tails.

  Returns:
    path.
  """
  plt = figures.pyplot()
  level = floor * float(np.max(density.values))
  fig, ax = plt.subplots(figsize=(6, 4.2))
  ax.semilogy(density.grid, np.maximum(density.values, level), color="C0")
  ax.set_ylim(bottom=level)
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density (log scale)")
  ax.set_title(title or f"Hessian eigenvalue density (SLQ, {len(density.nodes)}"
               f" runs, sigma={density.sigma:.3g})")
  ax.grid(alpha=0.3)
  return figures.save_png(fig, path)


# --- Serialisation -----------------------------------------------------------


def to_json(obj) -> Any:
  """A JSON-ready copy of a result: tensors (eigenvectors, bases) dropped,
  numpy arrays and scalars turned into lists and Python numbers."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    out = {}
    for field in dataclasses.fields(obj):
      value = getattr(obj, field.name)
      if _holds_tensors(value):
        continue
      out[field.name] = to_json(value)
    return out
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def _holds_tensors(value) -> bool:
  if isinstance(value, (tf.Tensor, tf.Variable)):
    return True
  return (isinstance(value, (list, tuple)) and bool(value)
          and all(isinstance(v, (tf.Tensor, tf.Variable)) for v in value))
