"""Statistics of per-example gradients, computed from their Gram matrix.

Every statistic here needs only the n x n inner-product matrix G = M M^T of
the per-example gradients g_i (the rows of the n x P matrix M), so a caller
may pass either `gram=G` or `gradients=M`. Everything is plain numpy in
float64; nothing touches TensorFlow.

Statistics and where they come from:
  * Gradient confusion: Sankararaman, De, Xu, Huang & Goldstein (2020), "The
    impact of neural network overparameterization on gradient confusion and
    stochastic gradient descent", Def. 2.1: a set of gradients is
    eta-confused when <g_i, g_j> >= -eta for all i != j. We report the
    smallest such eta >= 0, `gradient_confusion = max(0, -min_{i != j} G_ij)`.
  * Pairwise inner products and cosine similarities G_ij / sqrt(G_ii G_jj)
    over the n(n-1)/2 pairs i < j (their minimum, mean and quantiles). The
    cosine of a pair with a zero-norm gradient (G_ii <= 0) is undefined:
    such pairs are left out and counted in `excluded_pairs`. Quantiles use
    numpy's default (linear) interpolation and are NaN when no pair is left.
  * Gradient diversity: Yin, Pananjady, Lam, Papailiopoulos, Ramchandran &
    Bartlett (2018), "Gradient diversity: a key ingredient for scalable
    distributed learning", Def. 1:
    Delta = sum_i ||g_i||^2 / ||sum_i g_i||^2 = trace(G) / sum(G).
    It is 1/n for identical gradients and 1 for mutually orthogonal ones.
    When sum(G) <= 0 (the gradients sum to zero) it is inf, or NaN when
    every gradient is zero.
  * Simple gradient noise scale: McCandlish, Kaplan, Amodei & OpenAI Dota
    Team (2018), "An empirical model of large-batch training", Sec. 2.2,
    Eq. 2.8: B_simple = tr(Sigma) / |G|^2, with G the mean gradient and Sigma
    the per-example covariance. From the Gram matrix:
      ||g||^2 = sum(G) / n^2,
      tr(Sigma) = (trace(G) / n - ||g||^2) * n / (n - 1).
    Our choice: Sigma is the unbiased (n - 1) sample covariance of the n
    gradients at hand (the paper estimates both quantities from batch
    gradients of two sizes instead, App. A.1). tr(Sigma) is clipped at 0
    against rounding. The squared norm of the mean is the plain (biased)
    one; it is not debiased with tr(Sigma)/n as in the paper's App. A.1.
    inf when ||g||^2 <= 0 < tr(Sigma); NaN when both are 0.
  * Gram matrices as in Du, Lee, Li, Wang & Zhai (2019), "Gradient descent
    finds global minima of deep neural networks", whose convergence rate is
    governed by the least eigenvalue of a Gram matrix: `gram_spectrum` gives
    the extreme eigenvalues (numpy.linalg.eigvalsh of (K + K^T) / 2), the
    condition number max / min and whether they are resolved: a least
    eigenvalue at or below the round-off n eps |max| of the precision K was
    computed in (float32 by default) is not, and its condition number is
    NaN, never inf or a ratio of noise (`spectrum_resolved`).
    `feature_gram` is the kernel of a layer's outputs, F F^T / width: Du et
    al. put the 1/sqrt(width) into the features themselves (their x^(h)
    carries a sqrt(c_sigma / m) factor); we take raw features and divide by
    width, and leave out c_sigma. `ntk_gram` is the empirical neural tangent
    kernel of per-example logit Jacobians.

`summarize` returns the scalar statistics in one flat dict; `per_layer`
repeats it for each layer's own Gram matrix (the per-layer G_l sum to G, as
the per-layer column blocks of M partition its columns).
"""

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from tfcapacity.errors import UserError

DEFAULT_QUANTILES = (0.01, 0.5, 0.99)

# Relative tolerance for the symmetry check of a Gram matrix.
_SYMMETRY_RTOL = 1e-6


def quantile_key(level: float) -> str:
  """Formats a quantile level as a dict key: 0.01 -> "0.01", 0.5 -> "0.5"."""
  return f"{float(level):g}"


def gram_from_gradients(gradients) -> np.ndarray:
  """Returns G = M M^T (float64) for per-example gradients M.

  Args:
    gradients: array [n, ...]; each example's gradient is flattened to a row.

  Raises:
    UserError: fewer than 2 examples or non-finite entries.
  """
  m = np.asarray(gradients, dtype=np.float64)
  if m.ndim < 2:
    raise UserError(
        f"gradients must have shape [n, P]; got shape {m.shape}")
  m = m.reshape(m.shape[0], -1)
  if m.shape[0] < 2:
    raise UserError(f"need at least 2 examples; got {m.shape[0]}")
  if not np.all(np.isfinite(m)):
    raise UserError("gradients contain NaN or inf")
  return m @ m.T


def validate_gram(gram) -> np.ndarray:
  """Returns `gram` as a float64 array after checking it is a Gram matrix.

  Checks: square, n >= 2, finite, symmetric to 1e-6 relative to its largest
  entry. The returned matrix is symmetrised, (G + G^T) / 2.

  Raises:
    UserError: with a one-line message naming the failed check.
  """
  g = np.asarray(gram, dtype=np.float64)
  if g.ndim != 2 or g.shape[0] != g.shape[1]:
    raise UserError(f"gram must be a square n x n matrix; got shape {g.shape}")
  if g.shape[0] < 2:
    raise UserError(f"need at least 2 examples; got {g.shape[0]}")
  if not np.all(np.isfinite(g)):
    raise UserError("gram contains NaN or inf")
  scale = np.max(np.abs(g))
  if np.max(np.abs(g - g.T)) > _SYMMETRY_RTOL * scale:
    raise UserError("gram is not symmetric (to 1e-6 relative)")
  return (g + g.T) / 2


def _resolve(gram, gradients) -> np.ndarray:
  if (gram is None) == (gradients is None):
    raise UserError("pass exactly one of gram= or gradients=")
  if gram is None:
    gram = gram_from_gradients(gradients)
  return validate_gram(gram)


def _pairs(n: int) -> Tuple[np.ndarray, np.ndarray]:
  return np.triu_indices(n, k=1)


def _cosines(g: np.ndarray, i, j) -> Tuple[np.ndarray, int]:
  norms_sq = np.diag(g)
  if np.all(norms_sq > 0):  # The usual case: every pair is defined.
    norms = np.sqrt(norms_sq)
    cos = (g / norms[:, None] / norms[None, :])[i, j]
    return np.clip(cos, -1.0, 1.0), 0
  defined = (norms_sq[i] > 0) & (norms_sq[j] > 0)
  i, j = i[defined], j[defined]
  cos = g[i, j] / np.sqrt(norms_sq[i] * norms_sq[j])
  return np.clip(cos, -1.0, 1.0), int(np.count_nonzero(~defined))


def _diversity(g: np.ndarray) -> float:
  trace, total = float(np.trace(g)), float(np.sum(g))
  if total <= 0:
    return float("inf") if trace > 0 else float("nan")
  return trace / total


def _noise_scale(g: np.ndarray) -> float:
  n = g.shape[0]
  mean_sq = float(np.sum(g)) / n**2
  trace_sigma = max(0.0, (float(np.trace(g)) / n - mean_sq) * n / (n - 1))
  if mean_sq <= 0:
    return float("inf") if trace_sigma > 0 else float("nan")
  return trace_sigma / mean_sq


def pairwise_inner_products(gram=None, *, gradients=None) -> np.ndarray:
  """Returns the n(n-1)/2 inner products G_ij, i < j (row-major order)."""
  g = _resolve(gram, gradients)
  return g[_pairs(g.shape[0])]


def pairwise_cosines(gram=None, *,
                     gradients=None) -> Tuple[np.ndarray, int]:
  """Returns (cosines over pairs i < j, number of pairs left out).

  A pair is left out when either gradient has zero norm (G_ii <= 0), where
  the cosine is undefined. Cosines are clipped to [-1, 1] against rounding.
  """
  g = _resolve(gram, gradients)
  return _cosines(g, *_pairs(g.shape[0]))


def gradient_confusion(gram=None, *, gradients=None) -> float:
  """Sankararaman et al.'s confusion: max(0, -min_{i != j} <g_i, g_j>)."""
  return max(0.0, -float(np.min(pairwise_inner_products(
      gram, gradients=gradients))))


def gradient_diversity(gram=None, *, gradients=None) -> float:
  """Yin et al.'s diversity: trace(G) / sum(G); inf if sum(G) <= 0 < trace."""
  return _diversity(_resolve(gram, gradients))


def noise_scale_simple(gram=None, *, gradients=None) -> float:
  """McCandlish et al.'s B_simple = tr(Sigma) / ||mean gradient||^2.

  Sigma is the unbiased sample covariance (see the module docstring).
  """
  return _noise_scale(_resolve(gram, gradients))


def histogram(values, bins=50) -> Tuple[np.ndarray, np.ndarray]:
  """Returns (edges, counts) of `values`, as numpy.histogram.

  Args:
    values: 1-D array of values (e.g. pairwise inner products or cosines).
    bins: number of bins or an array of bin edges.

  Returns:
    edges: float64 array of len(counts) + 1 bin edges.
    counts: int64 array of counts per bin.
  """
  counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
  return edges, counts.astype(np.int64)


def inner_product_histogram(gram=None, *, gradients=None,
                            bins=50) -> Tuple[np.ndarray, np.ndarray]:
  """Histogram (edges, counts) of the pairwise inner products G_ij, i < j."""
  return histogram(pairwise_inner_products(gram, gradients=gradients), bins)


def cosine_histogram(gram=None, *, gradients=None,
                     bins=50) -> Tuple[np.ndarray, np.ndarray]:
  """Histogram (edges, counts) of the defined pairwise cosines, i < j.

  With an integer `bins` the range is [-1, 1], so histograms from different
  steps share their edges.
  """
  cos, _ = pairwise_cosines(gram, gradients=gradients)
  if np.ndim(bins) == 0:
    bins = np.linspace(-1.0, 1.0, int(bins) + 1)
  return histogram(cos, bins)


def _check_quantiles(quantiles) -> Tuple[float, ...]:
  levels = tuple(float(q) for q in quantiles)
  for q in levels:
    if not 0.0 <= q <= 1.0:
      raise UserError(f"quantile levels must be in [0, 1]; got {q}")
  return levels


def summarize(gram=None, *, gradients=None,
              quantiles: Sequence[float] = DEFAULT_QUANTILES) -> Dict:
  """All scalar statistics of one set of per-example gradients.

  Args:
    gram: the n x n matrix G = M M^T; or
    gradients: the per-example gradients M, shape [n, P] (or [n, ...]).
    quantiles: levels in [0, 1] for `cosine_quantiles`.

  Returns:
    A dict with keys gradient_confusion, min_inner_product,
    mean_inner_product, min_cosine, mean_cosine, cosine_quantiles (a dict
    keyed by `quantile_key(level)`), gradient_diversity, noise_scale_simple,
    num_examples and excluded_pairs. Cosine statistics are NaN when every
    pair was excluded.

  Raises:
    UserError: invalid input (see `validate_gram`) or quantile levels.
  """
  levels = _check_quantiles(quantiles)
  g = _resolve(gram, gradients)  # Checked once; the rest reuse it.
  i, j = _pairs(g.shape[0])
  inner = g[i, j]
  cos, excluded = _cosines(g, i, j)
  nan = float("nan")
  if cos.size:
    qs = np.quantile(cos, levels) if levels else []
    cos_quantiles = {quantile_key(q): float(v) for q, v in zip(levels, qs)}
  else:
    cos_quantiles = {quantile_key(q): nan for q in levels}
  return {
      "gradient_confusion": max(0.0, -float(np.min(inner))),
      "min_inner_product": float(np.min(inner)),
      "mean_inner_product": float(np.mean(inner)),
      "min_cosine": float(np.min(cos)) if cos.size else nan,
      "mean_cosine": float(np.mean(cos)) if cos.size else nan,
      "cosine_quantiles": cos_quantiles,
      "gradient_diversity": _diversity(g),
      "noise_scale_simple": _noise_scale(g),
      "num_examples": int(g.shape[0]),
      "excluded_pairs": excluded,
  }


def layer_grams(gradients: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Per-layer Gram matrices M_l M_l^T from per-layer gradients [n, ...]."""
  return {name: gram_from_gradients(m) for name, m in gradients.items()}


def per_layer(grams: Mapping[str, np.ndarray], *,
              quantiles: Sequence[float] = DEFAULT_QUANTILES
              ) -> Dict[str, Dict]:
  """`summarize` for each layer's own Gram matrix G_l (which sum to G).

  Args:
    grams: layer name -> n x n Gram matrix of that layer's gradient block.
    quantiles: as in `summarize`.

  Returns:
    layer name -> the dict `summarize` returns for that layer.

  Raises:
    UserError: a layer's matrix is invalid (the message names the layer), or
      the layers disagree on n.
  """
  out = {}
  sizes = set()
  for name, g in grams.items():
    try:
      out[name] = summarize(gram=g, quantiles=quantiles)
    except UserError as e:
      raise UserError(f"layer {name!r}: {e}") from None
    sizes.add(out[name]["num_examples"])
  if len(sizes) > 1:
    raise UserError(
        f"per-layer grams disagree on the number of examples: {sorted(sizes)}")
  return out


def gram_spectrum(kernel, *, dtype: str = "float32") -> Dict[str, float]:
  """Extreme eigenvalues and condition number of a Gram matrix.

  Uses numpy.linalg.eigvalsh on (K + K^T) / 2 (in float64). Whether the
  least eigenvalue is resolved depends on the precision the entries of K
  were computed in (`dtype`; `spectrum_resolved`): when it is not, the least
  eigenvalue is round-off and the condition number is NaN rather than a
  ratio of noise (or inf for a least eigenvalue <= 0, where Du et al.'s rate
  bound is vacuous).

  Args:
    kernel: the n x n matrix K.
    dtype: "float32" (the default: a float32 model's Gram matrices) or
      "float64" (`--dtype=float64`), the precision of K's products.

  Returns:
    min_eigenvalue and max_eigenvalue (always the computed values);
    condition_number, max / min when resolved, else NaN; min_below_float32,
    1.0 when the least eigenvalue is below float32 resolution
    (`below_float32_resolution`), else 0.0, whatever `dtype`; resolved, 1.0
    when the least eigenvalue and the condition number are resolved in
    `dtype`, else 0.0.

  Raises:
    UserError: K is not square or not finite, or an unknown `dtype`.
  """
  k = np.asarray(kernel, dtype=np.float64)
  if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 1:
    raise UserError(f"kernel must be a square matrix; got shape {k.shape}")
  if not np.all(np.isfinite(k)):
    raise UserError("kernel contains NaN or inf")
  eig = np.linalg.eigvalsh((k + k.T) / 2)
  lo, hi = float(eig[0]), float(eig[-1])
  resolved = spectrum_resolved(lo, hi, len(k), dtype)
  return {
      "min_eigenvalue": lo,
      "max_eigenvalue": hi,
      "condition_number": hi / lo if resolved else float("nan"),
      "min_below_float32": float(below_float32_resolution(lo, hi, len(k))),
      "resolved": float(resolved),
  }


def resolution(largest: float, n: int, dtype: str = "float32") -> float:
  """n eps |largest|: the round-off in the eigenvalues of an n x n Gram
  matrix whose products were computed in `dtype` ("float32" or "float64").

  Its entries carry relative errors of about n eps (eps = 2^-23 for
  float32, 2^-52 for float64), so by Weyl's bound its eigenvalues carry
  errors of about n eps |largest|.

  Raises:
    UserError: an unknown `dtype`.
  """
  if dtype not in ("float32", "float64"):
    raise UserError(f"dtype must be float32 or float64; got {dtype!r}")
  return n * float(np.finfo(dtype).eps) * abs(largest)


def below_float32_resolution(least: float, largest: float, n: int) -> bool:
  """Whether `least` is lost in float32 round-off next to `largest`.

  A Gram matrix of n examples summed in float32 carries errors of about
  n eps_32 |largest| (eps_32 = 2^-23 ~ 1.2e-7) in its eigenvalues (Weyl's
  bound on entrywise relative errors): an eigenvalue below that is not
  resolved by a float32 computation, whatever its printed value, and needs
  `--dtype=float64`.
  """
  return abs(least) < resolution(largest, n, "float32")


def spectrum_resolved(least: float, largest: float, n: int,
                      dtype: str = "float32") -> bool:
  """Whether the least eigenvalue of an n x n Gram matrix computed in
  `dtype`, and with it the condition number largest / least, is resolved:
  positive and at least `resolution(largest, n, dtype)`.

  In float32 that caps a resolved condition number at 1 / (n eps_32), about
  8e6 / n: 3e4 for 256 examples. A least eigenvalue at or below 0 (a
  singular matrix, e.g. two equal gradients) is never resolved.
  """
  return least > 0 and least >= resolution(largest, n, dtype)


def named_spectrum(kernel, prefix: str, *,
                   dtype: str = "float32") -> Dict[str, float]:
  """`gram_spectrum` keyed `{prefix}_min_eigenvalue`, `_max_eigenvalue`,
  `_condition_number`, `_min_below_float32` and `_resolved`."""
  return {f"{prefix}_{key}": value
          for key, value in gram_spectrum(kernel, dtype=dtype).items()}


def feature_gram(features) -> np.ndarray:
  """Kernel of a layer's outputs, F F^T / width (float64).

  Args:
    features: array [n, ...]; each example's features are flattened, and
      width is the flattened size.

  Raises:
    UserError: fewer than 1 example or feature, or non-finite entries.
  """
  f = np.asarray(features, dtype=np.float64)
  if f.ndim < 2 or f.shape[0] < 1 or f[0].size < 1:
    raise UserError(f"features must have shape [n, width]; got {f.shape}")
  f = f.reshape(f.shape[0], -1)
  if not np.all(np.isfinite(f)):
    raise UserError("features contain NaN or inf")
  return f @ f.T / f.shape[1]


def ntk_gram(jacobian, *, full: bool = False) -> np.ndarray:
  """Empirical neural tangent kernel from per-example logit Jacobians.

  Args:
    jacobian: array [n, C, P], J[i, c] = d logit_c(x_i) / d theta; an
      [n, P] array is taken as C = 1.
    full: False gives the n x n kernel summed over outputs,
      K_ij = sum_c J_ic . J_jc; True gives the nC x nC kernel
      K_(ic),(jd) = J_ic . J_jd, rows ordered example-major (i * C + c).

  Raises:
    UserError: wrong rank or non-finite entries.
  """
  j = np.asarray(jacobian, dtype=np.float64)
  if j.ndim == 2:
    j = j[:, None, :]
  if j.ndim != 3 or j.shape[0] < 1:
    raise UserError(f"jacobian must have shape [n, C, P]; got {j.shape}")
  if not np.all(np.isfinite(j)):
    raise UserError("jacobian contains NaN or inf")
  if full:
    flat = j.reshape(-1, j.shape[2])
    return flat @ flat.T
  return np.einsum("icp,jcp->ij", j, j)
