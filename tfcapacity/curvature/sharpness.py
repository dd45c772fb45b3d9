"""Keskar et al.'s sharpness: the largest loss increase in a small box.

Keskar, Mudigere, Nocedal, Smelyanskiy & Tang (2017), "On Large-Batch
Training for Deep Learning: Generalization Gap and Sharp Minima", Sec. 2.2.2,
Metric 2.1. The maxi-batch study (papers/003, Sec. 2.3) quotes it as the
measure its Hessian eigenvalues are compared with, and notes that it changes
when a constant is added to f (the 1 + f(x) denominator).

For flat parameters x in R^n, a loss f, epsilon > 0 and an n x p matrix A,

  C_eps = {z in R^p : |z_i| <= eps (|(A^+ x)_i| + 1)},
  phi_{x,f}(eps, A) = 100 (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)),

with A^+ the pseudo-inverse of A. `subspace_dim=None` gives the full space
(A = I, p = n, never built as a matrix); an integer p gives a random
subspace. Each coordinate's interval grows with that coordinate's magnitude,
plus one so that coordinates at zero still get room to move.

The inner maximisation is solved inexactly, as in the paper:
  * `method="lbfgsb"` (the paper's choice): scipy's L-BFGS-B on -f(x + A y),
    gradient -A^T grad f, box bounds, `max_iterations` iterations (the paper
    used 10) from y = 0.
  * `method="ascent"`: projected sign-gradient ascent, ours. The box is an
    l_inf ball, and for an l_inf ball the steepest-ascent direction is the
    sign of the gradient, so a step moves every coordinate by a fixed fraction
    of its own half-width: y <- clip(y + s_k h * sign(g_y), -h, h) with
    s_k = step_size / sqrt(k) (step_size defaults to 1). The first step from
    y = 0 lands on a vertex of the box, which is the exact maximiser when f
    is linear; the shrinking steps then refine it. Stops early when a step
    leaves y unchanged (every coordinate pinned against the box).

Deviations from the paper, and choices it leaves open:
  * Zero gradient at y = 0 (x at an exact stationary point, or a flat loss):
    both methods would stay at y = 0 and report 0. When the first-order
    estimate of phi, 100 sum_i |(A^T g)_i| h_i / (1 + f(x)), is below 1e-8,
    the search starts instead from a random point inside the box, each
    coordinate uniform in [-h_i/10, h_i/10] (seeded), and the result says so
    (`start="random"`). A tenth of the box is small enough to stay near x
    and large enough that the gradient there is not lost in rounding.
  * L-BFGS-B runs with `gtol=0`: a network's gradient has no natural scale,
    and scipy's default projected-gradient tolerance (1e-5) can end the
    search at its first point. It still stops on the iteration budget, on
    scipy's relative-decrease test (`ftol`) and at an exact constrained
    stationary point (e.g. a vertex whose gradient points outwards).
  * The reported maximum is the best value seen at any evaluation, and never
    below f(x) (y = 0 is feasible), so phi >= 0 whatever the optimiser does.
  * The random A has i.i.d. standard normal entries (seeded). A^+ x is
    computed as (A^T A)^{-1} A^T x with a p x p solve, which costs O(n p^2)
    and never forms an n x n matrix; A itself takes 8 n p bytes.
  * f(x) must exceed -1, or the denominator is not positive.

The objective is anything with `size`, `initial()` and
`loss_and_gradient(params)` (see `Objective`); every evaluation is at an
explicit parameter vector, so the objective's own state is never changed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Optional, Protocol

import numpy as np
import scipy.optimize

from tfcapacity.errors import UserError

METHODS = ("lbfgsb", "ascent")

# Below this first-order estimate of phi (in percent), the gradient at y = 0
# counts as zero and the search starts from a random point.
_ZERO_GRADIENT_PHI = 1e-8
# The random start's extent, as a fraction of each half-width.
_RANDOM_START_FRACTION = 0.1


class Objective(Protocol):
  """A loss over fixed data, evaluated at arbitrary flat parameters."""

  size: int

  def initial(self) -> np.ndarray:
    """Returns the parameters x at which sharpness is measured, float64 [n]."""

  def loss_and_gradient(self, params: np.ndarray) -> tuple[float, np.ndarray]:
    """Returns f(params) and grad f(params) (float64 [n])."""


@dataclasses.dataclass(frozen=True)
class SharpnessResult:
  """The outcome of one sharpness measurement.

  Attributes:
    sharpness: phi in percent, >= 0.
    epsilon: the box size.
    loss: f(x).
    max_loss: the largest f(x + A y) found (>= f(x)).
    iterations: optimiser iterations (L-BFGS-B's `nit`; ascent steps taken).
    evaluations: calls of `loss_and_gradient`, including the one at x.
    method: "lbfgsb" or "ascent".
    subspace_dim: None for the full space, else p.
    start: "zero" (y = 0) or "random" (the gradient at y = 0 was zero).
    seed: the seed of the random subspace and the random start.
    max_iterations: the iteration budget.
    message: why the optimiser stopped.
  """

  sharpness: float
  epsilon: float
  loss: float
  max_loss: float
  iterations: int
  evaluations: int
  method: str
  subspace_dim: Optional[int]
  start: str
  seed: int
  max_iterations: int
  message: str

  def to_json(self) -> dict:
    """Returns the fields as a dict of plain Python numbers and strings."""
    return {
        "sharpness": float(self.sharpness),
        "epsilon": float(self.epsilon),
        "loss": float(self.loss),
        "max_loss": float(self.max_loss),
        "iterations": int(self.iterations),
        "evaluations": int(self.evaluations),
        "method": str(self.method),
        "subspace_dim": (None if self.subspace_dim is None
                         else int(self.subspace_dim)),
        "start": str(self.start),
        "seed": int(self.seed),
        "max_iterations": int(self.max_iterations),
        "message": str(self.message),
    }


def random_subspace(n: int, p: int, seed: int = 0) -> np.ndarray:
  """Returns the n x p Gaussian matrix A that `sharpness` uses for `seed`.

  The random start draws from a separate stream, so A depends only on
  (n, p, seed).
  """
  return np.random.default_rng([seed, 0]).standard_normal((n, p))


def pinv_apply(a: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Returns A^+ v = (A^T A)^{-1} A^T v for a full-column-rank n x p `a`.

  `v` may be a vector [n] or a matrix [n, k]; only p x p systems are solved.
  """
  return np.linalg.solve(a.T @ a, a.T @ v)


def pseudo_inverse(a: np.ndarray) -> np.ndarray:
  """Returns the p x n pseudo-inverse of a full-column-rank n x p `a`."""
  return np.linalg.solve(a.T @ a, a.T)


def box(x: np.ndarray, epsilon: float,
        A_pinv: Optional[np.ndarray] = None) -> np.ndarray:  # noqa: N803
  """Returns the half-widths h of C_eps: eps (|A^+ x| + 1), or eps (|x| + 1).

  Args:
    x: the flat parameters [n].
    epsilon: the box size, > 0.
    A_pinv: the p x n pseudo-inverse of A; None for the full space (A = I).

  Returns:
    float64 [p] (or [n]) half-widths; the box is [-h, h].
  """
  x = np.asarray(x, dtype=np.float64)
  coords = x if A_pinv is None else np.asarray(A_pinv, np.float64) @ x
  return _half_widths(coords, epsilon)


def _half_widths(coords: np.ndarray, epsilon: float) -> np.ndarray:
  return epsilon * (np.abs(coords) + 1.0)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_args(objective, epsilon, method, subspace_dim, max_iterations,
                step_size, seed) -> int:
  """Validates the arguments; returns n."""
  n = int(objective.size)
  if not _is_real(epsilon) or not math.isfinite(epsilon) or epsilon <= 0:
    raise UserError(
        f"epsilon must be a finite number > 0 (got {epsilon!r}); Keskar et "
        "al. used 1e-3 and 5e-4")
  if method not in METHODS:
    raise UserError(f"unknown sharpness method {method!r}; choose one of: "
                    f"{', '.join(METHODS)}")
  if subspace_dim is not None and (
      not _is_int(subspace_dim) or not 1 <= subspace_dim <= n):
    raise UserError(
        f"subspace_dim must be an integer in [1, {n}] (the number of "
        f"parameters), or None for the full space (got {subspace_dim!r})")
  if not _is_int(max_iterations) or max_iterations < 1:
    raise UserError(f"max_iterations must be an integer >= 1 (got "
                    f"{max_iterations!r}); Keskar et al. used 10")
  if step_size is not None:
    if method != "ascent":
      raise UserError(
          f"step_size applies only to method='ascent' (got method="
          f"{method!r}); drop step_size or use method='ascent'")
    if not _is_real(step_size) or not math.isfinite(step_size) or (
        step_size <= 0):
      raise UserError(f"step_size must be a finite number > 0, a fraction of "
                      f"the box half-width (got {step_size!r}); default 1")
  if not _is_int(seed) or seed < 0:
    raise UserError(f"seed must be an integer >= 0 (got {seed!r})")
  return n


class _Search:
  """Evaluates f(x + A y), keeps the best value seen and reports progress."""

  def __init__(self, objective, x, a, progress):
    self._objective = objective
    self._x = x
    self._a = a
    self._progress = progress
    self.evaluations = 0
    self.f0 = None
    self.best = -math.inf
    self._zero = None  # (f, g_y) at y = 0, so L-BFGS-B does not redo it.

  def _lift(self, y):
    return self._x + (y if self._a is None else self._a @ y)

  def _project(self, g):
    return g if self._a is None else self._a.T @ g

  def __call__(self, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Returns f(x + A y) and its gradient in y."""
    if self._zero is not None and not np.any(y):
      return self._zero
    params = self._lift(np.asarray(y, dtype=np.float64))
    f, g = self._objective.loss_and_gradient(params)
    f = float(f)
    g_y = self._project(np.asarray(g, dtype=np.float64).reshape(-1))
    self.evaluations += 1
    if self.f0 is None:
      self.f0 = f
      self._zero = (f, g_y)
    if f > self.best:  # NaN never wins; +inf does, and phi is then inf.
      self.best = f
    if self._progress is not None:
      self._progress(self.evaluations, {
          "sharpness": self.phi(), "loss": f,
          "max_loss": max(self.best, self.f0)})
    return f, g_y

  def phi(self) -> float:
    return 100.0 * (max(self.best, self.f0) - self.f0) / (1.0 + self.f0)


def sharpness(objective: Objective, epsilon: float, *, method: str = "lbfgsb",
              subspace_dim: Optional[int] = None, max_iterations: int = 10,
              step_size: Optional[float] = None, seed: int = 0,
              progress: Optional[Callable[[int, dict], None]] = None
              ) -> SharpnessResult:
  """Measures phi_{x,f}(epsilon, A) at x = objective.initial().

  Args:
    objective: the loss; see `Objective`. Never modified.
    epsilon: the box size, > 0 (Keskar et al. used 1e-3 and 5e-4).
    method: "lbfgsb" (the paper's) or "ascent" (projected sign ascent).
    subspace_dim: None for the full space; p in [1, n] for a random Gaussian
      n x p subspace.
    max_iterations: L-BFGS-B iterations, or ascent steps.
    step_size: ascent only: the first step as a fraction of each half-width
      (default 1, which reaches a vertex from y = 0); step k is
      step_size / sqrt(k).
    seed: seeds the random subspace and the random start.
    progress: called as progress(evaluation, info) after every evaluation of
      f, with info = {"sharpness": best phi so far, "loss": f at this point,
      "max_loss": best f so far}.

  Returns:
    A `SharpnessResult`.

  Raises:
    UserError: for a bad argument, or if f(x) <= -1.
  """
  n = _check_args(objective, epsilon, method, subspace_dim, max_iterations,
                  step_size, seed)
  epsilon = float(epsilon)
  max_iterations = int(max_iterations)
  seed = int(seed)
  x = np.array(objective.initial(), dtype=np.float64).reshape(-1)
  if x.shape != (n,):
    raise ValueError(f"objective.initial() has {x.size} entries but "
                     f"objective.size is {n}")

  if subspace_dim is None:
    a = None
    half = _half_widths(x, epsilon)
  else:
    a = random_subspace(n, int(subspace_dim), seed)
    half = _half_widths(pinv_apply(a, x), epsilon)

  search = _Search(objective, x, a, progress)
  zeros = np.zeros_like(half)
  f0, g0 = search(zeros)
  if not 1.0 + f0 > 0.0:
    raise UserError(f"sharpness divides by 1 + f(x), but f(x) = {f0!r}; use a "
                    "loss that is > -1 (e.g. a non-negative one)")

  first_order = 100.0 * float(np.sum(np.abs(g0) * half)) / (1.0 + f0)
  if first_order < _ZERO_GRADIENT_PHI:
    start = "random"
    rng = np.random.default_rng([seed, 1])
    y0 = _RANDOM_START_FRACTION * half * rng.uniform(-1.0, 1.0, half.shape)
  else:
    start = "zero"
    y0 = zeros

  if method == "lbfgsb":
    iterations, message = _lbfgsb(search, y0, half, max_iterations)
  else:
    iterations, message = _ascent(
        search, y0, half, max_iterations, 1.0 if step_size is None
        else float(step_size))

  return SharpnessResult(
      sharpness=search.phi(), epsilon=epsilon, loss=f0,
      max_loss=max(search.best, f0), iterations=iterations,
      evaluations=search.evaluations, method=method,
      subspace_dim=None if subspace_dim is None else int(subspace_dim),
      start=start, seed=seed, max_iterations=max_iterations, message=message)


def _lbfgsb(search: _Search, y0, half, max_iterations) -> tuple[int, str]:
  """Maximises f(x + A y) over [-half, half] with L-BFGS-B."""
  def negated(y):
    f, g = search(y)
    return -f, -g

  res = scipy.optimize.minimize(
      negated, y0, jac=True, method="L-BFGS-B",
      bounds=scipy.optimize.Bounds(-half, half),
      options={"maxiter": max_iterations, "gtol": 0.0})
  return int(res.nit), str(res.message)


def _ascent(search: _Search, y0, half, max_iterations, step_size
            ) -> tuple[int, str]:
  """Projected sign-gradient ascent, keeping the best value seen."""
  y = y0
  _, g = search(y)
  for k in range(1, max_iterations + 1):
    step = (step_size / math.sqrt(k)) * half
    # A NaN gradient entry gives no direction: leave that coordinate.
    direction = np.sign(np.nan_to_num(g, nan=0.0))
    y_next = np.clip(y + step * direction, -half, half)
    if np.array_equal(y_next, y):
      return k - 1, "stationary: the step left y unchanged"
    y = y_next
    _, g = search(y)
  return max_iterations, "max_iterations reached"
