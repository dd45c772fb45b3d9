"""Gradient statistics from Gram matrices against brute-force loops."""

import numpy as np
import pytest

from tfcapacity.errors import UserError
from tfcapacity.gradients import statistics as st

SEEDS = [0, 1, 2, 3]


def _brute_force(m, quantiles=(0.01, 0.5, 0.99)):
  """Every statistic by explicit loops over the gradients themselves."""
  n = m.shape[0]
  inner, cos, excluded = [], [], 0
  for i in range(n):
    for j in range(i + 1, n):
      inner.append(float(np.dot(m[i], m[j])))
      ni, nj = np.linalg.norm(m[i]), np.linalg.norm(m[j])
      if ni == 0 or nj == 0:
        excluded += 1
      else:
        cos.append(float(np.dot(m[i], m[j]) / (ni * nj)))
  total = m.sum(axis=0)
  mean = m.mean(axis=0)
  trace_sigma = sum(np.sum((m[i] - mean)**2) for i in range(n)) / (n - 1)
  return {
      "gradient_confusion": max(0.0, -min(inner)),
      "min_inner_product": min(inner),
      "mean_inner_product": np.mean(inner),
      "min_cosine": min(cos),
      "mean_cosine": np.mean(cos),
      "cosine_quantiles": {
          st.quantile_key(q): np.quantile(cos, q) for q in quantiles},
      "gradient_diversity": sum(np.sum(g**2) for g in m) / np.sum(total**2),
      "noise_scale_simple": trace_sigma / np.sum(mean**2),
      "num_examples": n,
      "excluded_pairs": excluded,
  }


def _assert_summary_close(got, want):
  assert set(got) == set(want)
  for key, value in want.items():
    if isinstance(value, dict):
      assert set(got[key]) == set(value)
      for q in value:
        np.testing.assert_allclose(got[key][q], value[q], rtol=1e-10,
                                   err_msg=f"{key}[{q}]")
    else:
      np.testing.assert_allclose(got[key], value, rtol=1e-10, atol=1e-12,
                                 err_msg=key)


def _gradients(seed, n=7, p=11):
  rng = np.random.default_rng(seed)
  # A shared component keeps the mean gradient away from zero.
  return rng.normal(size=(n, p)) + 0.3 * rng.normal(size=p)


@pytest.mark.parametrize("seed", SEEDS)
def test_summary_matches_brute_force(seed):
  m = _gradients(seed)
  want = _brute_force(m)
  _assert_summary_close(st.summarize(gram=m @ m.T), want)
  _assert_summary_close(st.summarize(gradients=m), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_single_statistics_match_summary(seed):
  m = _gradients(seed)
  g = m @ m.T
  s = st.summarize(gram=g)
  assert st.gradient_confusion(g) == pytest.approx(s["gradient_confusion"])
  assert st.gradient_diversity(gradients=m) == pytest.approx(
      s["gradient_diversity"])
  assert st.noise_scale_simple(g) == pytest.approx(s["noise_scale_simple"])
  inner = st.pairwise_inner_products(g)
  assert inner.shape == (21,)
  cos, excluded = st.pairwise_cosines(gradients=m)
  assert cos.shape == (21,) and excluded == 0


def test_custom_quantile_keys():
  m = _gradients(0)
  s = st.summarize(gradients=m, quantiles=[0.1, 0.25, 1.0])
  assert list(s["cosine_quantiles"]) == ["0.1", "0.25", "1"]
  assert s["cosine_quantiles"]["1"] == pytest.approx(
      np.max(st.pairwise_cosines(gradients=m)[0]))
  assert list(st.summarize(gradients=m)["cosine_quantiles"]) == [
      "0.01", "0.5", "0.99"]


@pytest.mark.parametrize("seed", SEEDS)
def test_diversity_one_for_orthogonal_equal_norms(seed):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(11, 7)))
  m = 2.5 * q.T  # 7 orthonormal rows of length 11, scaled
  assert st.gradient_diversity(gradients=m) == pytest.approx(1.0, rel=1e-12)
  assert st.gradient_diversity(gram=3.0 * np.eye(5)) == 1.0
  s = st.summarize(gradients=m)
  assert s["gradient_confusion"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [2, 7])
def test_identical_gradients(n):
  row = np.random.default_rng(n).normal(size=11)
  m = np.tile(row, (n, 1))
  s = st.summarize(gradients=m)
  assert s["gradient_diversity"] == pytest.approx(1.0 / n, rel=1e-12)
  assert s["noise_scale_simple"] == pytest.approx(0.0, abs=1e-12)
  assert s["min_cosine"] == pytest.approx(1.0)
  assert s["gradient_confusion"] == 0.0


def test_confusion_zero_when_inner_products_nonnegative():
  m = np.abs(np.random.default_rng(0).normal(size=(7, 11)))
  assert np.all(m @ m.T >= 0)
  assert st.gradient_confusion(gradients=m) == 0.0


def test_confusion_is_minus_min_inner_product():
  g = np.array([[4.0, -1.5, 0.5], [-1.5, 3.0, -0.25], [0.5, -0.25, 2.0]])
  assert st.gradient_confusion(g) == 1.5
  assert st.summarize(gram=g)["min_inner_product"] == -1.5


def test_zero_norm_rows_are_excluded_and_counted():
  m = _gradients(5)
  m[2] = 0.0
  m[4] = 0.0
  s = st.summarize(gradients=m)
  # Pairs touching row 2 or 4: 6 + 6 - 1.
  assert s["excluded_pairs"] == 11
  _assert_summary_close(s, _brute_force(m))
  cos, excluded = st.pairwise_cosines(gradients=m)
  assert cos.size == 21 - 11 and excluded == 11


def test_all_rows_zero():
  s = st.summarize(gram=np.zeros((3, 3)))
  assert s["excluded_pairs"] == 3
  assert np.isnan(s["min_cosine"]) and np.isnan(s["mean_cosine"])
  assert all(np.isnan(v) for v in s["cosine_quantiles"].values())
  assert np.isnan(s["gradient_diversity"])
  assert np.isnan(s["noise_scale_simple"])
  assert s["gradient_confusion"] == 0.0


def test_gradients_summing_to_zero():
  m = np.array([[1.0, 2.0], [-1.0, -2.0]])
  assert st.gradient_diversity(gradients=m) == float("inf")
  assert st.noise_scale_simple(gradients=m) == float("inf")


def test_histograms():
  m = _gradients(3)
  inner = st.pairwise_inner_products(gradients=m)
  edges, counts = st.inner_product_histogram(gradients=m, bins=5)
  want_counts, want_edges = np.histogram(inner, bins=5)
  np.testing.assert_array_equal(counts, want_counts)
  np.testing.assert_allclose(edges, want_edges)
  edges, counts = st.cosine_histogram(gradients=m, bins=4)
  np.testing.assert_allclose(edges, [-1.0, -0.5, 0.0, 0.5, 1.0])
  assert counts.sum() == 21
  edges, counts = st.histogram([0.0, 0.1, 0.9], bins=[0.0, 0.5, 1.0])
  np.testing.assert_array_equal(counts, [2, 1])


@pytest.mark.parametrize("seed", SEEDS)
def test_per_layer_matches_column_blocks(seed):
  m = _gradients(seed, p=11)
  blocks = {"dense": m[:, :4], "dense_1": m[:, 4:9], "out": m[:, 9:]}
  grams = st.layer_grams(blocks)
  np.testing.assert_allclose(sum(grams.values()), m @ m.T, rtol=1e-12)
  got = st.per_layer(grams)
  assert list(got) == list(blocks)
  for name, block in blocks.items():
    _assert_summary_close(got[name], _brute_force(block))


def test_per_layer_errors_name_the_layer():
  with pytest.raises(UserError, match="layer 'b'"):
    st.per_layer({"a": np.eye(3), "b": np.ones((2, 3))})
  with pytest.raises(UserError, match="disagree"):
    st.per_layer({"a": np.eye(3), "b": np.eye(4)})


@pytest.mark.parametrize("seed", SEEDS)
def test_gram_spectrum_matches_eigvalsh(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(6, 9))
  k = a @ a.T
  eig = np.linalg.eigvalsh(k)
  s = st.gram_spectrum(k)
  assert s["min_eigenvalue"] == pytest.approx(eig[0])
  assert s["max_eigenvalue"] == pytest.approx(eig[-1])
  assert s["condition_number"] == pytest.approx(eig[-1] / eig[0])
  assert s["resolved"] == 1.0
  # Rank-deficient (6 examples, 3 features): singular, so not resolved and
  # its condition number NaN, never inf.
  b = a[:, :3]
  singular = st.gram_spectrum(b @ b.T)
  assert singular["resolved"] == 0.0
  assert np.isnan(singular["condition_number"])
  # A non-symmetric input is symmetrised.
  skew = rng.normal(size=(6, 6))
  s = st.gram_spectrum(k + skew - skew.T)
  assert s["min_eigenvalue"] == pytest.approx(eig[0])


def test_feature_gram():
  f = np.random.default_rng(0).normal(size=(5, 2, 3))
  want = np.array([[np.dot(f[i].ravel(), f[j].ravel()) / 6 for j in range(5)]
                   for i in range(5)])
  np.testing.assert_allclose(st.feature_gram(f), want, rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_ntk_gram_matches_loop(seed):
  n, c, p = 4, 3, 8
  j = np.random.default_rng(seed).normal(size=(n, c, p))
  want = np.zeros((n, n))
  want_full = np.zeros((n * c, n * c))
  for a in range(n):
    for b in range(n):
      for ca in range(c):
        want[a, b] += np.dot(j[a, ca], j[b, ca])
        for cb in range(c):
          want_full[a * c + ca, b * c + cb] = np.dot(j[a, ca], j[b, cb])
  np.testing.assert_allclose(st.ntk_gram(j), want, rtol=1e-12)
  np.testing.assert_allclose(st.ntk_gram(j, full=True), want_full,
                             rtol=1e-12)
  np.testing.assert_allclose(st.ntk_gram(j[:, 0, :]),
                             j[:, 0, :] @ j[:, 0, :].T, rtol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gram=np.ones((2, 3))), "square"),
    (dict(gram=np.ones((1, 1))), "at least 2"),
    (dict(gram=np.array([[1.0, np.nan], [np.nan, 1.0]])), "NaN or inf"),
    (dict(gram=np.array([[1.0, 0.5], [0.4, 1.0]])), "not symmetric"),
    (dict(gradients=np.ones((1, 4))), "at least 2"),
    (dict(gradients=np.ones(4)), "shape"),
    (dict(gradients=np.array([[1.0, np.inf], [0.0, 1.0]])), "NaN or inf"),
    (dict(), "exactly one"),
    (dict(gram=np.eye(2), gradients=np.eye(2)), "exactly one"),
    (dict(gram=np.eye(3), quantiles=[1.5]), r"\[0, 1\]"),
])
def test_bad_inputs_raise_user_error(kwargs, match):
  with pytest.raises(UserError, match=match) as info:
    st.summarize(**kwargs)
  assert "\n" not in str(info.value)


def test_tiny_asymmetry_is_tolerated():
  g = np.array([[1.0, 0.5], [0.5 + 1e-9, 1.0]])
  assert st.summarize(gram=g)["min_inner_product"] == pytest.approx(0.5)


def test_bad_kernel_inputs():
  with pytest.raises(UserError, match="square"):
    st.gram_spectrum(np.ones((2, 3)))
  with pytest.raises(UserError, match="NaN or inf"):
    st.gram_spectrum(np.full((2, 2), np.inf))
  with pytest.raises(UserError, match="shape"):
    st.ntk_gram(np.ones(3))
  with pytest.raises(UserError, match="shape"):
    st.feature_gram(np.ones(3))
