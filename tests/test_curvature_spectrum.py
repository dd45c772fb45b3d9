"""Eigen-solvers on real Hessians: power, Lanczos, trace vs eigvalsh."""

import keras
import numpy as np
import pytest

from tfcapacity import models
from tfcapacity.curvature import eigen
from tfcapacity.curvature import hvp
from tfcapacity.objective import function as function_lib

CASES = [
    ("mlp", dict(width=6, depth=1, activation="tanh"), (5,), "inference",
     None),
    ("mlp", dict(width=6, depth=1, activation="softplus",
                 normalization="batch"), (5,), "batch", None),
    ("fc_resnet", dict(width=4, depth=2, activation="tanh"), (5,),
     "inference", None),
    ("resnet", dict(width=4, depth=8, normalization="ghost",
                    ghost_batch_size=4), (6, 6, 1), "ghost",
     ["stage3_block1_norm2", "classifier"]),
]


@pytest.mark.parametrize("name,options,shape,bn_mode,block", CASES)
def test_solvers_agree_with_eigvalsh(name, options, shape, bn_mode, block):
  keras.utils.set_random_seed(0)
  model = models.get(name, input_shape=shape, num_classes=3, **options)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, *shape)).astype(np.float32)
  y = rng.integers(0, 3, size=16)
  op = hvp.HessianOperator(model, x, y, bn_mode=bn_mode, batch_size=8,
                           params=function_lib.select_params(model, block))
  dense = op.dense().astype(np.float64)
  exact = np.linalg.eigvalsh((dense + dense.T) / 2)
  by_magnitude = exact[np.argsort(-np.abs(exact))]

  power = eigen.power_iteration(op, tol=1e-6, max_iterations=20000)
  assert power.converged
  assert power.eigenvalue == pytest.approx(by_magnitude[0], rel=1e-4)

  top = eigen.lanczos_top_k(op, 3, num_steps=op.size)
  np.testing.assert_allclose(top.eigenvalues, exact[::-1][:3], rtol=1e-4,
                             atol=1e-6 * np.abs(exact).max())

  trace = eigen.hutchinson_trace(op, 300, seed=1)
  assert abs(trace.trace - np.trace(dense)) <= 3 * trace.stderr


def test_per_layer_blocks_are_the_dense_diagonal_blocks():
  from tfcapacity.curvature import blocks  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(1)
  model = models.get("mlp", input_shape=(5,), num_classes=3, width=6,
                     depth=2, activation="tanh")
  rng = np.random.default_rng(1)
  x = rng.normal(size=(12, 5)).astype(np.float32)
  y = rng.integers(0, 3, size=12)
  full = hvp.HessianOperator(model, x, y).dense().astype(np.float64)
  whole = np.abs(np.linalg.eigvalsh((full + full.T) / 2)).max()
  rows = blocks.per_layer(
      model, lambda name: hvp.HessianOperator(
          model, x, y, params=function_lib.select_params(model, [name])),
      tol=1e-6, max_iterations=20000)
  assert [r["layer"] for r in rows] == ["hidden_0", "hidden_1", "classifier"]
  start = 0
  for row in rows:
    end = start + row["num_parameters"]
    block = full[start:end, start:end]
    exact = np.linalg.eigvalsh((block + block.T) / 2)
    assert row["lambda_max"] == pytest.approx(
        exact[np.argmax(np.abs(exact))], rel=1e-4)
    assert abs(row["lambda_max"]) <= whole * (1 + 1e-6)  # Interlacing.
    start = end
  assert start == full.shape[0]
