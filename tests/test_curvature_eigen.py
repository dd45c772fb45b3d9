"""Eigen-solvers, trace and density checked against dense numpy answers."""

import json
import logging

import numpy as np
import pytest
import tensorflow as tf

from tfcapacity.curvature import eigen
from tfcapacity.errors import UserError

N = 60


class DenseOperator:
  """The `Operator` protocol over a dense symmetric matrix; counts matvecs."""

  def __init__(self, matrix, dtype=tf.float64):
    self.matrix = np.asarray(matrix, np.float64)
    self.size = self.matrix.shape[0]
    self.dtype = dtype
    self._matrix = tf.constant(self.matrix, dtype)
    self.calls = 0

  def matvec(self, v):
    self.calls += 1
    return tf.linalg.matvec(self._matrix, v)


def symmetric(eigenvalues, seed=0):
  """Q diag(eigenvalues) Q^T with a random orthogonal Q; also returns Q."""
  eigenvalues = np.asarray(eigenvalues, np.float64)
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues),) * 2))
  a = (q * eigenvalues) @ q.T
  return (a + a.T) / 2, q


def bulk(n, lo, hi, seed=1):
  return np.random.default_rng(seed).uniform(lo, hi, n)


# The most negative eigenvalue has the largest magnitude.
MIXED = np.concatenate([[-12.0, 10.0, 9.5, 9.0], bulk(N - 4, -2.0, 3.0)])
# A clustered top over a bulk with a few negative eigenvalues.
CLUSTERED = np.concatenate([[10.0, 9.9, 9.8], bulk(N - 3, -1.0, 2.0)])
DTYPES = [tf.float64, tf.float32]


def operator(eigenvalues, dtype=tf.float64, seed=0):
  a, q = symmetric(eigenvalues, seed)
  return DenseOperator(a, dtype), q


def as_numpy(v):
  return np.asarray(v, np.float64)


def true_residual(op, value, vector):
  y = as_numpy(vector)
  return np.linalg.norm(op.matrix @ y - value * y)


def cosine(u, v):
  u, v = as_numpy(u), as_numpy(v)
  return abs(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))


def top_by_value(eigenvalues, k):
  return np.sort(eigenvalues)[::-1][:k]


# --- Power iteration ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_power_largest_magnitude_is_the_negative_one(dtype):
  op, q = operator(MIXED, dtype)
  tol = 1e-6 if dtype == tf.float64 else 1e-4
  result = eigen.power_iteration(op, tol=tol, max_iterations=2000)
  assert result.converged
  assert result.eigenvalue == pytest.approx(-12.0, rel=1e-4)
  assert cosine(result.eigenvector, q[:, 0]) > 0.999
  assert np.linalg.norm(as_numpy(result.eigenvector)) == pytest.approx(
      1.0, abs=1e-5)
  assert result.residual <= tol * abs(result.eigenvalue)
  assert result.residual == pytest.approx(
      true_residual(op, result.eigenvalue, result.eigenvector),
      rel=1e-3, abs=1e-5)
  assert result.relative_residual == pytest.approx(
      result.residual / abs(result.eigenvalue))
  assert result.iterations == op.calls


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_power_largest_algebraic_by_shift(dtype):
  op, q = operator(MIXED, dtype)
  tol = 1e-6 if dtype == tf.float64 else 1e-4
  phases = []
  result = eigen.power_iteration(
      op, which="LA", tol=tol, max_iterations=3000,
      progress=lambda it, info: phases.append((it, info["phase"])))
  assert result.converged and result.which == "LA"
  assert result.eigenvalue == pytest.approx(10.0, rel=1e-4)
  assert cosine(result.eigenvector, q[:, 1]) > 0.999
  assert result.residual <= tol * abs(result.eigenvalue)
  # Both phases are counted, and progress saw every matvec of both.
  assert result.iterations == op.calls
  assert [it for it, _ in phases] == list(range(1, op.calls + 1))
  assert {p for _, p in phases} == {"LM", "LA"}


def test_power_largest_algebraic_when_largest_magnitude_is_positive():
  op, _ = operator(CLUSTERED)
  lm = eigen.power_iteration(op, tol=1e-3, max_iterations=3000)
  calls = op.calls
  la = eigen.power_iteration(op, which="LA", tol=1e-3, max_iterations=3000)
  assert la.eigenvalue == lm.eigenvalue
  assert la.iterations == op.calls - calls == lm.iterations


def test_power_warm_start_from_the_eigenvector_stops_at_once():
  op, q = operator(MIXED)
  result = eigen.power_iteration(op, v0=q[:, 0], tol=1e-6)
  assert result.converged and result.iterations <= 2
  assert result.eigenvalue == pytest.approx(-12.0, rel=1e-10)
  # A warm start also fixes the sign: the result points along v0.
  assert as_numpy(result.eigenvector) @ q[:, 0] > 0.999
  flipped = eigen.power_iteration(op, v0=-q[:, 0], tol=1e-6)
  assert as_numpy(flipped.eigenvector) @ q[:, 0] < -0.999


def test_power_reports_non_convergence(caplog):
  op, _ = operator(CLUSTERED)
  with caplog.at_level(logging.WARNING):
    result = eigen.power_iteration(op, tol=1e-6, max_iterations=2)
  assert not result.converged
  assert result.iterations == 2 == op.calls
  assert result.relative_residual > 1e-6
  assert np.isfinite(result.eigenvalue)
  assert "without converging" in caplog.text


def test_power_deflation_finds_the_next_eigenvalue():
  op, q = operator(CLUSTERED)
  result = eigen.power_iteration(op, tol=1e-7, max_iterations=5000,
                                 deflate=[(10.0, q[:, 0])])
  assert result.eigenvalue == pytest.approx(9.9, rel=1e-5)
  assert cosine(result.eigenvector, q[:, 1]) > 0.999


def test_power_progress_and_validation():
  op, _ = operator(MIXED)
  seen = []
  eigen.power_iteration(op, max_iterations=5,
                        progress=lambda it, info: seen.append((it, info)))
  assert [it for it, _ in seen] == list(range(1, len(seen) + 1))
  assert {"eigenvalue", "relative_residual"} <= set(seen[0][1])
  with pytest.raises(UserError, match="LA, LM"):
    eigen.power_iteration(op, which="SA")
  with pytest.raises(UserError, match="max_iterations"):
    eigen.power_iteration(op, max_iterations=0)
  with pytest.raises(UserError, match="size 60"):
    eigen.power_iteration(op, v0=np.ones(5))
  with pytest.raises(UserError, match="zero"):
    eigen.power_iteration(op, v0=np.zeros(N))


# --- Top k -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_top_k_power_and_lanczos_agree_with_eigvalsh(dtype):
  op, _ = operator(CLUSTERED, dtype)
  exact = top_by_value(np.linalg.eigvalsh(op.matrix), 3)
  tol = 1e-6 if dtype == tf.float64 else 1e-4
  power = eigen.top_k_power(op, 3, tol=tol, max_iterations=5000)
  assert power.iterations == op.calls
  calls = op.calls
  krylov = eigen.lanczos_top_k(op, 3)
  assert krylov.iterations == op.calls - calls == 30 + 3
  for result in (power, krylov):
    np.testing.assert_allclose(result.eigenvalues, exact, rtol=1e-4)
    assert all(result.converged)
    for value, vector, residual, relative in zip(
        result.eigenvalues, result.eigenvectors, result.residuals,
        result.relative_residuals):
      # The reported residuals are true ones, with the undeflated matrix.
      independent = true_residual(op, value, vector)
      assert residual == pytest.approx(independent, rel=1e-3, abs=1e-6)
      assert relative == pytest.approx(residual / abs(value))
  assert power.method == "power-deflation" and krylov.method == "lanczos"


def test_top_k_orderings_on_a_mixed_spectrum():
  op, q = operator(MIXED)
  power = eigen.top_k_power(op, 3, tol=1e-7, max_iterations=5000)
  np.testing.assert_allclose(power.eigenvalues, [-12.0, 10.0, 9.5], rtol=1e-5)
  for i, vector in zip((0, 1, 2), power.eigenvectors):
    assert cosine(vector, q[:, i]) > 0.999
  krylov = eigen.lanczos_top_k(op, 3, num_steps=40)
  np.testing.assert_allclose(krylov.eigenvalues, [10.0, 9.5, 9.0], rtol=1e-5)
  for i, vector in zip((1, 2, 3), krylov.eigenvectors):
    assert cosine(vector, q[:, i]) > 0.999


def test_top_k_power_warm_starts_are_cheap():
  op, q = operator(MIXED)
  cold = eigen.top_k_power(op, 2, tol=1e-6, max_iterations=5000)
  warm = eigen.top_k_power(op, 2, tol=1e-6, v0s=cold.eigenvectors)
  assert warm.iterations <= 2 * 2 + 2
  np.testing.assert_allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-8)


def test_top_k_power_beyond_the_rank_reports_honestly(caplog):
  op, _ = operator(np.concatenate([[5.0, 3.0, -2.0], np.zeros(N - 3)]))
  with caplog.at_level(logging.WARNING):
    result = eigen.top_k_power(op, 5, tol=1e-6, max_iterations=200)
  np.testing.assert_allclose(result.eigenvalues[:3], [5.0, 3.0, -2.0],
                             rtol=1e-8)
  np.testing.assert_allclose(result.eigenvalues[3:], 0.0, atol=1e-6)
  assert max(result.relative_residuals[:3]) < 1e-5
  # Past the rank, Hotelling deflation leaves only the rounding error along
  # the deflated vectors, and the last two iterations collapse onto them:
  # the Rayleigh-Ritz step is skipped, and no residual is small relative to
  # a zero eigenvalue.
  assert "skipping the Rayleigh-Ritz step" in caplog.text
  assert result.converged[3:] == [False, False]
  assert all(np.isfinite(result.residuals))
  for value, vector, residual in zip(result.eigenvalues, result.eigenvectors,
                                     result.residuals):
    assert residual == pytest.approx(true_residual(op, value, vector),
                                     rel=1e-6)


def test_top_k_validation():
  op, _ = operator(MIXED)
  with pytest.raises(UserError, match="exceeds"):
    eigen.top_k_power(op, N + 1)
  with pytest.raises(UserError, match="k must be"):
    eigen.lanczos_top_k(op, 0)


# --- Lanczos -----------------------------------------------------------------


@pytest.mark.parametrize("dtype,orth_tol,value_tol",
                         [(tf.float64, 1e-5, 1e-9), (tf.float32, 1e-3, 1e-4)],
                         ids=["f64", "f32"])
def test_lanczos_full_basis_is_orthonormal_and_exact(dtype, orth_tol,
                                                     value_tol):
  op, _ = operator(MIXED, dtype)
  result = eigen.lanczos(op, N + 10, keep_basis=True)  # capped at N
  assert result.steps == result.iterations == N == op.calls
  assert not result.breakdown
  assert result.alphas.dtype == np.float64 and len(result.betas) == N - 1
  basis = as_numpy(result.basis)
  assert basis.shape == (N, N)
  assert np.linalg.norm(basis @ basis.T - np.eye(N)) < orth_tol
  # Q A Q^T is the tridiagonal.
  t = (np.diag(result.alphas) + np.diag(result.betas, 1)
       + np.diag(result.betas, -1))
  assert np.abs(basis @ op.matrix @ basis.T - t).max() < 10 * value_tol * 12
  theta, _ = result.ritz()
  np.testing.assert_allclose(theta, np.sort(MIXED), atol=value_tol * 12)


def test_lanczos_plain_recurrence_matches_early_steps():
  op, _ = operator(MIXED)
  full = eigen.lanczos(op, 8, seed=3)
  plain = eigen.lanczos(op, 8, seed=3, reorthogonalize=False, keep_basis=True)
  np.testing.assert_allclose(plain.alphas, full.alphas, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(plain.betas, full.betas, rtol=1e-8)
  assert plain.basis.shape == (8, N)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_lanczos_breaks_down_cleanly_on_an_invariant_subspace(dtype):
  # Rank 3: from a random start the Krylov space has dimension 4 (three
  # eigenvectors plus the start's component in the null space).
  op, _ = operator(np.concatenate([[5.0, 3.0, -2.0], np.zeros(N - 3)]), dtype)
  result = eigen.lanczos(op, 20, keep_basis=True)
  assert result.breakdown and result.steps == 4 == op.calls
  assert np.all(np.isfinite(result.alphas)) and np.all(np.isfinite(
      result.betas))
  assert np.all(np.isfinite(as_numpy(result.basis)))
  theta, _ = result.ritz()
  atol = 1e-9 if dtype == tf.float64 else 1e-4
  np.testing.assert_allclose(theta, [-2.0, 0.0, 3.0, 5.0], atol=atol)
  # Asking for more pairs than the subspace holds returns what there is.
  top = eigen.lanczos_top_k(op, 6, num_steps=20)
  np.testing.assert_allclose(top.eigenvalues, [5.0, 3.0, 0.0, -2.0],
                             atol=atol)
  # A multiple of the identity breaks down after one step.
  scaled = DenseOperator(2.5 * np.eye(N), dtype)
  one = eigen.lanczos(scaled, 10)
  assert one.breakdown and one.steps == 1 and one.alphas[0] == pytest.approx(
      2.5)


def test_repeated_calls_do_not_retrace():
  op, _ = operator(MIXED)
  eigen.lanczos(op, 10)
  eigen.power_iteration(op, max_iterations=3)
  eigen.power_iteration(op, max_iterations=3, deflate=[(1.0, np.eye(N)[0])])
  counts = (eigen._lanczos_full_step.experimental_get_tracing_count(),
            eigen._power_step.experimental_get_tracing_count())
  # New starts, new basis variables of the same shape, more deflated pairs.
  eigen.lanczos(op, 10, seed=1)
  eigen.lanczos(op, 10, v0=np.ones(N))
  eigen.power_iteration(op, max_iterations=3, deflate=[
      (1.0, np.eye(N)[0]), (2.0, np.eye(N)[1])])
  assert (eigen._lanczos_full_step.experimental_get_tracing_count(),
          eigen._power_step.experimental_get_tracing_count()) == counts


def test_lanczos_bases_of_different_shapes_do_not_share_a_trace():
  # Regression: a trace generalised over variable shapes kept the first
  # basis's row count, writing rows past the end of a smaller basis.
  op, _ = operator(MIXED)
  for steps in (12, 8, 5, 9, 3):
    result = eigen.lanczos(op, steps, keep_basis=True)
    basis = as_numpy(result.basis)
    assert result.steps == steps
    assert np.linalg.norm(basis @ basis.T - np.eye(steps)) < 1e-10


# --- Trace -------------------------------------------------------------------


def test_hutchinson_trace_is_unbiased_with_honest_error_bars():
  op, _ = operator(MIXED)
  exact = np.trace(op.matrix)
  for seed in range(5):
    result = eigen.hutchinson_trace(op, 100, seed=seed)
    assert abs(result.trace - exact) <= 4 * result.stderr
    assert result.samples.dtype == np.float64 and len(result.samples) == 100
  assert op.calls == 500
  # Var(z^T A z) = 2 (||A||_F^2 - sum_i A_ii^2) for Rademacher z.
  variance = 2 * (np.sum(op.matrix ** 2) - np.sum(np.diag(op.matrix) ** 2))
  few = eigen.hutchinson_trace(op, 100, seed=7)
  many = eigen.hutchinson_trace(op, 400, seed=7)
  assert few.stderr ** 2 * 100 == pytest.approx(variance, rel=0.4)
  assert 0.35 < many.stderr / few.stderr < 0.65


def test_hutchinson_progress_and_single_probe():
  op, _ = operator(MIXED)
  seen = []
  result = eigen.hutchinson_trace(
      op, 3, progress=lambda it, info: seen.append((it, info["trace"])))
  assert [it for it, _ in seen] == [1, 2, 3]
  assert seen[-1][1] == pytest.approx(result.trace)
  assert np.isnan(eigen.hutchinson_trace(op, 1).stderr)


# --- Spectral density --------------------------------------------------------


def trapezoid(y, x):
  return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def test_density_integrates_to_one_and_has_the_right_mean():
  eigenvalues = np.concatenate([[40.0, 25.0], bulk(198, -1.0, 3.0)])
  op, _ = operator(eigenvalues, seed=2)
  density = eigen.spectral_density(op, num_runs=10, num_steps=30)
  assert density.iterations == op.calls == 300
  assert len(density.nodes) == len(density.weights) == 10
  for weights in density.weights:
    assert np.sum(weights) == pytest.approx(1.0, abs=1e-10)
  assert density.values.dtype == np.float64 and density.grid.shape == (1000,)
  assert np.all(density.values >= 0)
  assert trapezoid(density.values, density.grid) == pytest.approx(1.0,
                                                                  abs=0.01)
  mean = trapezoid(density.grid * density.values, density.grid)
  assert mean == pytest.approx(np.trace(op.matrix) / op.size, rel=0.05)
  assert mean == pytest.approx(density.mean(), rel=1e-3)
  # The outliers stand apart from the bulk: the density between is tiny.
  gap = (density.grid > 10) & (density.grid < 20)
  assert density.values[gap].max() < 1e-3 * density.values.max()
  # A kernel narrower than the grid spacing still integrates to one.
  fine = eigen.spectral_density(op, num_runs=2, num_steps=30, sigma=1e-4)
  assert trapezoid(fine.values, fine.grid) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_density_with_full_lanczos_has_the_exact_nodes(dtype):
  op, _ = operator(MIXED, dtype)
  density = eigen.spectral_density(op, num_runs=2, num_steps=N)
  atol = 1e-8 if dtype == tf.float64 else 1e-3
  for nodes in density.nodes:
    np.testing.assert_allclose(nodes, np.sort(MIXED), atol=atol)
  assert trapezoid(density.values, density.grid) == pytest.approx(1.0,
                                                                  abs=0.01)


def test_density_figure_is_written(tmp_path):
  op, _ = operator(MIXED)
  density = eigen.spectral_density(op, num_runs=2, num_steps=20)
  path = eigen.density_figure(density, str(tmp_path / "density.png"),
                              title="test")
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  pixels = image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 100
  assert pixels[..., :3].std() > 0.05
  assert [p.name for p in tmp_path.iterdir()] == ["density.png"]


# --- Reproducibility and serialisation ---------------------------------------


def test_same_seed_same_results():
  op, _ = operator(CLUSTERED, tf.float32)

  def run(seed):
    power = eigen.power_iteration(op, seed=seed, max_iterations=20)
    top = eigen.lanczos_top_k(op, 2, seed=seed)
    trace = eigen.hutchinson_trace(op, 5, seed=seed)
    density = eigen.spectral_density(op, num_runs=2, num_steps=10, seed=seed)
    return (power.eigenvalue, as_numpy(power.eigenvector), top.eigenvalues,
            trace.samples, density.values)

  first, again, other = run(5), run(5), run(6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[3], other[3])
  assert first[0] != other[0]


def test_to_json_drops_vectors():
  op, _ = operator(MIXED)
  results = [eigen.power_iteration(op, max_iterations=5),
             eigen.top_k_power(op, 2, max_iterations=5),
             eigen.lanczos(op, 5, keep_basis=True),
             eigen.hutchinson_trace(op, 3),
             eigen.spectral_density(op, num_runs=1, num_steps=5,
                                    grid_size=50)]
  for result in results:
    data = json.loads(json.dumps(eigen.to_json(result)))
    assert "eigenvector" not in data and "eigenvectors" not in data
    assert "basis" not in data
  assert set(eigen.to_json(results[0])) == {
      "eigenvalue", "residual", "relative_residual", "iterations",
      "converged", "which"}
  assert len(eigen.to_json(results[4])["values"]) == 50
