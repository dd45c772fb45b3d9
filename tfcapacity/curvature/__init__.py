"""Curvature of the loss: Hessian-vector products, eigenvalues, trace, density, sharpness.

The names below load no TensorFlow, so flag definitions can offer them.
"""

# Eigen-solvers of `eigen`: power iteration (with deflation) and Lanczos.
EIGEN_METHODS = ("power", "lanczos")
# Hessian-vector products (`hvp`): nested tapes, or forward-over-reverse.
HVP_METHODS = ("reverse", "forward")
