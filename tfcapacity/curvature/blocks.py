"""The curvature of each layer's block of the Hessian.

The diagonal block H_ll of layer l (the second derivatives with respect to
that layer's weights alone) says where the curvature lives: which layers a
large lambda_max comes from, and how it changes with depth or batch norm.
Each block's largest eigenvalue is found by power iteration on products with
that block only (`objective.function.select_params`); by Cauchy interlacing
it is at most the whole Hessian's largest eigenvalue in magnitude, which a
test checks.
"""

from __future__ import annotations

from typing import Callable

from tfcapacity.curvature import eigen
from tfcapacity.curvature import hvp
from tfcapacity.models import layers as layers_lib


def per_layer(model, operator_for: Callable[[str], "hvp.HessianOperator"], *,
              layers: list[str] | None = None, tol: float = 1e-3,
              max_iterations: int = 100, seed: int = 0,
              progress: Callable[[int, dict], None] | None = None
              ) -> list[dict]:
  """lambda_max of each layer's diagonal Hessian block.

  Args:
    model: the Keras model (for its layer names,
      `models.layers.weighted_layers`).
    operator_for: builds the operator of one layer's block, e.g.
      `lambda name: hvp.HessianOperator(model, x, y,
      params=function_lib.select_params(model, [name]))`.
    layers: layer names (default: every layer with trainable weights).
    tol, max_iterations, seed: power-iteration settings.
    progress: called as `progress(layers_done, {"layer": name})`.

  Returns:
    One dict per layer: layer, num_parameters, lambda_max,
    relative_residual, iterations, converged.
  """
  rows = []
  for name in layers or layers_lib.weighted_layers(model):
    op = operator_for(name)
    result = eigen.power_iteration(op, tol=tol,
                                   max_iterations=max_iterations, seed=seed)
    rows.append({"layer": name, "num_parameters": op.size,
                 "lambda_max": result.eigenvalue,
                 "relative_residual": result.relative_residual,
                 "iterations": result.iterations,
                 "converged": result.converged})
    if progress is not None:
      progress(len(rows), {"layer": name})
  return rows
