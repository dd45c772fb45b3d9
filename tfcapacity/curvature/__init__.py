"""Curvature of the loss: Hessian-vector products, eigenvalues, trace, density, sharpness."""
