"""Curvature of the loss: Hessian-vector products, eigenvalues, trace, density, sharpness.

The names below load no TensorFlow, so flag definitions can offer them.
"""

# Eigen-solvers of `eigen`: power iteration (with deflation) and Lanczos.
EIGEN_METHODS = ("power", "lanczos")
# The Hessian-vector-product methods are the objective's:
# `tfcapacity.objective.HVP_METHODS`.
# Curvature matrices of `matrices.make_operator`: the Hessian, the
# generalised Gauss-Newton matrix, the Monte-Carlo Fisher and the empirical
# Fisher (uncentred second moment of the per-example gradients).
MATRICES = ("hessian", "ggn", "fisher", "empirical_fisher")
