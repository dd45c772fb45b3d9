"""Curvature of the loss: Hessian-vector products, eigenvalues, trace, density, sharpness.

The names below load no TensorFlow, so flag definitions can offer them.
"""

# Eigen-solvers of `eigen`: power iteration (with deflation) and Lanczos.
EIGEN_METHODS = ("power", "lanczos")
# The Hessian-vector-product methods are the objective's:
# `tfcapacity.objective.HVP_METHODS`.
