"""Eigen-solvers on real Hessians: power, Lanczos, trace vs eigvalsh."""

import keras
import numpy as np
import pytest

from tfcapacity import models
from tfcapacity.curvature import eigen
from tfcapacity.curvature import hvp

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
                           params=hvp.select_params(model, block))
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
