"""Hutch++ trace and Hutchinson diagonal checked against dense numpy answers."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tfcapacity.curvature import eigen
from tfcapacity.errors import UserError


def symmetric(eigenvalues, seed=0):
  """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
  eigenvalues = np.asarray(eigenvalues, np.float64)
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues),) * 2))
  a = (q * eigenvalues) @ q.T
  return (a + a.T) / 2


def decaying(n=200, seed=3):
  """A PSD matrix with eigenvalues 1 / i^2."""
  return symmetric(1.0 / np.arange(1, n + 1) ** 2, seed)


def test_dense_operator_matches_numpy_and_counts_calls():
  a = np.random.default_rng(0).standard_normal((5, 5))
  op = eigen.DenseOperator(a, tf.float32)
  v = np.arange(5.0)
  np.testing.assert_allclose(op.matvec(tf.constant(v, tf.float32)), a @ v,
                             rtol=1e-5)
  assert (op.size, op.dtype, op.calls) == (5, tf.float32, 1)
  with pytest.raises(UserError, match="square"):
    eigen.DenseOperator(np.ones((2, 3)))


def test_hutchpp_is_unbiased_and_spends_num_probes_matvecs():
  # An indefinite matrix with a flat spectrum: the sketch captures little,
  # so the seeds spread widely and a bias would show.
  a = symmetric(np.random.default_rng(1).uniform(-1.0, 2.0, 40), seed=2)
  exact = np.trace(a)
  op = eigen.DenseOperator(a)
  estimates = []
  for seed in range(100):
    result = eigen.hutchpp_trace(op, 10, seed=seed)
    assert result.iterations == 10 and len(result.samples) == 4
    assert result.trace == pytest.approx(np.mean(result.samples))
    estimates.append(result.trace)
  assert op.calls == 100 * 10
  spread = np.std(estimates, ddof=1) / math.sqrt(len(estimates))
  assert spread > 0.01  # the test has power: the estimates do vary
  assert abs(np.mean(estimates) - exact) <= 4 * spread


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
  op = eigen.DenseOperator(decaying())
  exact = np.trace(op.matrix)
  seeds = range(20)
  plus = [eigen.hutchpp_trace(op, 30, seed=s).trace for s in seeds]
  plain = [eigen.hutchinson_trace(op, 30, seed=s).trace for s in seeds]
  mse_plus = np.mean((np.array(plus) - exact) ** 2)
  mse_plain = np.mean((np.array(plain) - exact) ** 2)
  # Expected about 2 sum_i>10 i^-4 / 10 vs 2 sum_i i^-4 / 30: ~1000x.
  assert mse_plus * 50 < mse_plain, (mse_plus, mse_plain)


@pytest.mark.parametrize("dtype,tol", [(tf.float64, 1e-10),
                                       (tf.float32, 1e-4)])
def test_hutchpp_is_exact_on_a_low_rank_matrix(dtype, tol):
  rank = 4
  eigenvalues = np.zeros(50)
  eigenvalues[:rank] = [5.0, -3.0, 2.0, 0.5]
  a = symmetric(eigenvalues, seed=5)
  op = eigen.DenseOperator(a, dtype)
  for num_probes in (12, 16):  # k = 4 and 5 >= rank
    result = eigen.hutchpp_trace(op, num_probes, seed=num_probes)
    assert result.trace == pytest.approx(np.trace(a), abs=tol)
    assert result.stderr <= tol


def test_hutchpp_progress_and_a_budget_larger_than_the_operator():
  seen = []
  op = eigen.DenseOperator(np.diag([1.0, 2.0, 3.0]))
  result = eigen.hutchpp_trace(
      op, 12, progress=lambda it, info: seen.append((it, info["phase"])))
  # k is capped at the size (3): 3 sketch + 3 exact + 6 probes.
  assert [it for it, _ in seen] == list(range(1, 13))
  assert [phase for _, phase in seen] == (["sketch"] * 3 + ["exact"] * 3
                                          + ["probe"] * 6)
  assert result.iterations == 12 and op.calls == 12
  assert result.trace == pytest.approx(6.0)


def test_hutchpp_single_probe_has_no_stderr():
  op = eigen.DenseOperator(decaying(20))
  result = eigen.hutchpp_trace(op, 4)
  assert len(result.samples) == 2
  assert math.isnan(eigen.hutchpp_trace(op, 3).stderr)


def test_diagonal_converges_as_one_over_root_probes():
  a = symmetric(np.random.default_rng(7).uniform(-1.0, 3.0, 30), seed=8)
  op = eigen.DenseOperator(a)
  exact = np.diag(a)
  errors = {}
  for probes in (16, 256):
    runs = [eigen.hutchinson_diagonal(op, probes, seed=s) for s in range(3)]
    errors[probes] = np.mean([np.sqrt(np.mean((r.diagonal - exact) ** 2))
                              for r in runs])
    # The variance of entry i per probe is sum_{j != i} a_ij^2.
    expected = np.sqrt((np.sum(a ** 2, axis=1) - exact ** 2) / probes)
    np.testing.assert_allclose(runs[0].stderr, expected, rtol=0.5)
  ratio = errors[16] / errors[256]
  assert 2.5 < ratio < 6.5, errors  # sqrt(256 / 16) = 4


def test_diagonal_stderr_covers_the_error():
  a = symmetric(np.random.default_rng(9).uniform(0.0, 2.0, 60), seed=10)
  result = eigen.hutchinson_diagonal(eigen.DenseOperator(a), 200, seed=1)
  z = np.abs(result.diagonal - np.diag(a)) / result.stderr
  assert result.num_probes == 200
  assert np.mean(z <= 2) > 0.85  # ~95% for a normal error
  assert np.max(z) < 5


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32])
def test_diagonal_is_exact_for_a_diagonal_matrix(dtype):
  d = np.random.default_rng(11).uniform(-2.0, 5.0, 25)
  op = eigen.DenseOperator(np.diag(d), dtype)
  one = eigen.hutchinson_diagonal(op, 1, seed=3)
  np.testing.assert_allclose(one.diagonal, d, rtol=1e-6)
  assert np.all(np.isnan(one.stderr))
  several = eigen.hutchinson_diagonal(op, 5, seed=3)
  np.testing.assert_allclose(several.diagonal, d, rtol=1e-6)
  np.testing.assert_array_equal(several.stderr, 0.0)


def test_diagonal_progress_and_seeding():
  op = eigen.DenseOperator(decaying(20))
  seen = []
  a = eigen.hutchinson_diagonal(op, 3, seed=4,
                                progress=lambda it, info: seen.append(it))
  b = eigen.hutchinson_diagonal(op, 3, seed=4)
  assert seen == [1, 2, 3]
  np.testing.assert_array_equal(a.diagonal, b.diagonal)


@pytest.mark.parametrize("estimator,bad", [
    (eigen.hutchpp_trace, 2), (eigen.hutchpp_trace, 0),
    (eigen.hutchpp_trace, 4.5), (eigen.hutchpp_trace, True),
    (eigen.hutchinson_diagonal, 0), (eigen.hutchinson_diagonal, -1)])
def test_bad_num_probes(estimator, bad):
  op = eigen.DenseOperator(np.eye(4))
  with pytest.raises(UserError, match="num_probes") as error:
    estimator(op, bad)
  assert "\n" not in str(error.value)
  assert op.calls == 0
