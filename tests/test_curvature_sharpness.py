"""Keskar et al.'s sharpness on numpy objectives with known maxima."""

import itertools

import numpy as np
import pytest

from tfcapacity.curvature import sharpness as sharpness_lib
from tfcapacity.curvature.sharpness import box
from tfcapacity.curvature.sharpness import sharpness
from tfcapacity.errors import UserError

METHODS = ("lbfgsb", "ascent")


class Linear:
  """f(p) = a.p + c, with c chosen so that f(x) = 1."""

  def __init__(self, n, seed=0):
    rng = np.random.default_rng(seed)
    self.size = n
    self.a = rng.standard_normal(n)
    self.x = rng.standard_normal(n)
    self.c = 1.0 - self.a @ self.x
    self.calls = 0

  def initial(self):
    return self.x.copy()

  def loss_and_gradient(self, params):
    self.calls += 1
    return float(self.a @ params + self.c), self.a.copy()


class Quadratic:
  """f(p) = 0.5 (p - m)^T H (p - m), measured at its minimum x = m."""

  def __init__(self, h, seed=0):
    self.size = h.shape[0]
    self.h = h
    self.m = np.random.default_rng(seed).standard_normal(self.size)

  def initial(self):
    return self.m.copy()

  def loss_and_gradient(self, params):
    d = params - self.m
    return float(0.5 * d @ self.h @ d), self.h @ d


class Constant:
  """A flat loss."""

  def __init__(self, n, value=0.7):
    self.size = n
    self.value = value

  def initial(self):
    return np.linspace(-1.0, 1.0, self.size)

  def loss_and_gradient(self, params):
    return self.value, np.zeros(self.size)


class Logistic:
  """Mean logistic loss of a linear classifier on random data, at random w."""

  def __init__(self, n=6, examples=40, seed=0):
    rng = np.random.default_rng(seed)
    self.size = n
    self.features = rng.standard_normal((examples, n))
    self.labels = np.where(rng.standard_normal(examples) > 0, 1.0, -1.0)
    self.w = rng.standard_normal(n)

  def initial(self):
    return self.w.copy()

  def loss_and_gradient(self, params):
    margins = self.labels * (self.features @ params)
    loss = np.mean(np.logaddexp(0.0, -margins))
    weights = -self.labels / (1.0 + np.exp(margins))
    return float(loss), self.features.T @ weights / len(margins)


def linear_phi(objective, epsilon):
  half = epsilon * (np.abs(objective.x) + 1.0)
  return 100.0 * np.sum(np.abs(objective.a) * half) / 2.0  # 1 + f(x) = 2.


def vertex_max(objective, epsilon):
  """The largest f over the box's vertices (the max, for convex f)."""
  x = objective.initial()
  half = box(x, epsilon)
  f0 = objective.loss_and_gradient(x)[0]
  best = max(objective.loss_and_gradient(x + np.array(s) * half)[0]
             for s in itertools.product((-1.0, 1.0), repeat=len(x)))
  return 100.0 * (best - f0) / (1.0 + f0)


def test_box_half_widths():
  x = np.array([0.0, -2.0, 3.0])
  np.testing.assert_allclose(box(x, 0.1), [0.1, 0.3, 0.4])
  a = np.eye(3) * 2.0
  np.testing.assert_allclose(box(x, 0.1, np.linalg.pinv(a)),
                             [0.1, 0.2, 0.25])


def test_linear_lbfgsb_reaches_the_vertex():
  objective = Linear(20)
  result = sharpness(objective, 1e-2, max_iterations=10)
  assert result.start == "zero"
  assert result.sharpness == pytest.approx(linear_phi(objective, 1e-2),
                                           rel=1e-6)
  assert result.loss == pytest.approx(1.0)
  assert result.max_loss > result.loss
  assert result.evaluations >= result.iterations >= 1


def test_linear_ascent_reaches_the_vertex_in_one_step():
  objective = Linear(20)
  result = sharpness(objective, 1e-2, method="ascent", max_iterations=5)
  assert result.sharpness == pytest.approx(linear_phi(objective, 1e-2),
                                           rel=1e-12)
  # One step to the vertex; the next step is clipped back onto it.
  assert result.iterations == 1
  assert result.evaluations == 2
  assert result.message.startswith("stationary")


def well_posed_h():
  # Strong positive coupling: the two all-equal-sign vertices are the only
  # local maxima of the quadratic over a box, so L-BFGS-B cannot stop at a
  # worse vertex.
  v = np.array([1.0, 0.8, 1.3])
  return np.outer(v, v) + 0.1 * np.eye(3)


def test_quadratic_at_minimum_starts_randomly_and_finds_the_max_vertex():
  objective = Quadratic(well_posed_h())
  result = sharpness(objective, 0.1, max_iterations=100)
  assert result.start == "random"
  assert result.loss == 0.0
  assert result.sharpness > 0.0
  assert result.sharpness == pytest.approx(vertex_max(objective, 0.1),
                                           rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(5))
def test_quadratic_never_exceeds_the_vertex_max(method, seed):
  rng = np.random.default_rng(100 + seed)
  b = rng.standard_normal((3, 3))
  objective = Quadratic(b @ b.T, seed=seed)
  result = sharpness(objective, 0.1, method=method, max_iterations=50,
                     seed=seed)
  assert result.start == "random"
  assert 0.0 < result.sharpness <= vertex_max(objective, 0.1) * (1 + 1e-9)


def test_quadratic_ascent_finds_the_max_vertex():
  objective = Quadratic(well_posed_h())
  result = sharpness(objective, 0.1, method="ascent", max_iterations=20)
  assert result.start == "random"
  assert result.sharpness == pytest.approx(vertex_max(objective, 0.1),
                                           rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_flat_loss_has_zero_sharpness(method):
  result = sharpness(Constant(5), 1e-3, method=method)
  assert result.sharpness == 0.0
  assert result.max_loss == result.loss == 0.7
  assert result.start == "random"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("subspace_dim", [None, 3])
@pytest.mark.parametrize("make", [Logistic, lambda: Quadratic(well_posed_h())],
                         ids=["logistic", "quadratic"])
def test_nonnegative_and_nondecreasing_in_epsilon(method, subspace_dim, make):
  objective = make()
  values = [sharpness(objective, eps, method=method, seed=3,
                      subspace_dim=subspace_dim).sharpness
            for eps in (1e-4, 1e-3, 1e-2, 1e-1, 0.5)]
  assert values[0] >= 0.0
  assert all(b >= a for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("method", METHODS)
def test_zero_at_a_local_maximum(method):
  # x is the top of a concave bump: every point of the box is lower, so the
  # search only finds worse points and phi falls back to y = 0.
  class Bump:
    size = 4

    def initial(self):
      return np.ones(4)

    def loss_and_gradient(self, params):
      d = params - 1.0
      return float(2.0 - 100.0 * d @ d), -200.0 * d

  result = sharpness(Bump(), 0.5, method=method, seed=1)
  assert result.start == "random"
  assert result.sharpness == 0.0
  assert result.max_loss == result.loss == 2.0


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_random_subspace_linear(method):
  n = 5
  objective = Linear(n, seed=4)
  a = sharpness_lib.random_subspace(n, n, seed=7)
  a_pinv = np.linalg.pinv(a)
  half = box(objective.x, 1e-2, a_pinv)
  expected = 100.0 * np.sum(np.abs(a.T @ objective.a) * half) / 2.0
  result = sharpness(objective, 1e-2, method=method, subspace_dim=n, seed=7)
  assert result.subspace_dim == n
  assert result.sharpness >= 0.0
  assert result.sharpness == pytest.approx(expected, rel=1e-6)
  # The box differs from the full-space one.
  assert result.sharpness != pytest.approx(linear_phi(objective, 1e-2))


def test_thin_random_subspace_linear():
  objective = Linear(50, seed=2)
  p = 4
  a = sharpness_lib.random_subspace(50, p, seed=0)
  half = box(objective.x, 1e-3, sharpness_lib.pseudo_inverse(a))
  np.testing.assert_allclose(half, box(objective.x, 1e-3, np.linalg.pinv(a)),
                             rtol=1e-10)
  expected = 100.0 * np.sum(np.abs(a.T @ objective.a) * half) / 2.0
  result = sharpness(objective, 1e-3, subspace_dim=p)
  assert result.sharpness == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("subspace_dim", [None, 3])
def test_same_seed_same_result(method, subspace_dim):
  objective = Quadratic(well_posed_h() + np.diag([0.0, 0.5, 0.0]))
  runs = [sharpness(objective, 0.05, method=method, seed=11,
                    subspace_dim=subspace_dim).to_json() for _ in range(2)]
  assert runs[0] == runs[1]


def test_objective_is_only_read():
  objective = Linear(8)
  x_before = objective.x.copy()
  seen = []
  original = objective.loss_and_gradient

  def recording(params):
    seen.append(params)
    params_copy = params.copy()
    out = original(params)
    np.testing.assert_array_equal(params, params_copy)
    return out

  objective.loss_and_gradient = recording
  result = sharpness(objective, 1e-2)
  np.testing.assert_array_equal(objective.x, x_before)
  assert all(p is not objective.x for p in seen)
  assert all(p.dtype == np.float64 and p.shape == (8,) for p in seen)
  assert len(seen) == result.evaluations


def test_progress_reports_every_evaluation():
  calls = []
  result = sharpness(Logistic(), 1e-2,
                     progress=lambda k, info: calls.append((k, dict(info))))
  assert [k for k, _ in calls] == list(range(1, result.evaluations + 1))
  best = [info["sharpness"] for _, info in calls]
  assert best == sorted(best)
  assert best[0] == 0.0
  assert best[-1] == result.sharpness
  assert calls[-1][1]["max_loss"] == result.max_loss


def test_to_json_is_plain():
  result = sharpness(Linear(4), np.float64(1e-3), subspace_dim=np.int64(2),
                     max_iterations=np.int32(3))
  data = result.to_json()
  assert set(data) >= {"sharpness", "epsilon", "loss", "max_loss",
                       "iterations", "evaluations", "method", "subspace_dim",
                       "start"}
  for value in data.values():
    assert type(value) in (float, int, str)
  assert data["method"] == "lbfgsb" and data["subspace_dim"] == 2
  assert sharpness(Linear(4), 1e-3).to_json()["subspace_dim"] is None


@pytest.mark.parametrize("kwargs, name", [
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=-1e-3), "epsilon"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(method="adam"), "method"),
    (dict(subspace_dim=0), "subspace_dim"),
    (dict(subspace_dim=7), "subspace_dim"),
    (dict(subspace_dim=2.5), "subspace_dim"),
    (dict(max_iterations=0), "max_iterations"),
    (dict(step_size=0.5), "step_size"),
    (dict(method="ascent", step_size=-1.0), "step_size"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments(kwargs, name):
  kwargs = dict(dict(epsilon=1e-3), **kwargs)
  with pytest.raises(UserError) as info:
    sharpness(Linear(6), **kwargs)
  message = str(info.value)
  assert "\n" not in message
  assert name in message


def test_loss_below_minus_one_is_refused():
  objective = Linear(3)
  objective.c -= 5.0
  with pytest.raises(UserError, match="1 \\+ f\\(x\\)"):
    sharpness(objective, 1e-3)
