"""The neural-tangent Gram matrix of a model's outputs as an operator.

Theta is the (n C) x (n C) matrix of inner products of the output gradients,
Theta_(i,c),(j,d) = <d f_c(x_i)/d theta, d f_d(x_j)/d theta>, i.e. J J^T for
the Jacobian J of the n x C outputs. Gradient descent on the mean squared
loss (1/n) sum_i 1/2 ||f(x_i) - y_i||^2 of the model linearised at theta_0
moves the residual r = f - y by r <- (I - (eta/n) Theta) r: it is stable for
eta < 2 n / lambda_max(Theta) and no larger (Du et al.'s summed loss has no
1/n: eta < 2 / lambda_max). `learning_rate_from_gram` turns a constant c
into eta = c n / lambda_max(Theta(0)), the step of `--learning_rate_from=gram`.

Theta is never formed: `TangentOperator` applies it as J (J^T v), a
reverse-mode product (the gradient of <f, v>) then a forward-mode one
(`tf.autodiff.ForwardAccumulator`) over the model as a function of its
weights (`tfcapacity.objective.function`, inference mode, so the model never
changes), and hands it to SciPy's `eigsh` as a `LinearOperator`. Two passes
over the n examples per product, whatever the width: at width 4096 and
depth 8 Theta's (n C)^2 entries would need n C gradient rows of 10^8
parameters each.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfcapacity.errors import UserError
from tfcapacity.objective import function as function_lib

# Relative tolerance of eigsh on lambda_max (working precision in practice).
DEFAULT_TOL = 1e-10


class TangentOperator:
  """v -> Theta v for the outputs of `model` on inputs `x`.

  Attributes:
    shape: (n C, n C).
    dtype: numpy dtype of the model's weights (float32 or float64).
  """

  def __init__(self, model, x):
    x = np.asarray(x)
    if x.ndim < 2 or len(x) < 1:
      raise UserError(f"need a batch of inputs; got shape {x.shape}")
    self.function = function_lib.model_function(model)
    self.values = self.function.values()
    self.dtype = np.dtype(self.values[0].dtype.as_numpy_dtype)
    self.x = tf.constant(x, tf.float32)
    outputs = self.function.logits(self.values, self.x)
    self.num_outputs = int(outputs.shape[-1])
    self.n = int(len(x))
    self.shape = (self.n * self.num_outputs,) * 2
    self.calls = 0

    @tf.function
    def apply(v):
      v = tf.reshape(v, [self.n, self.num_outputs])
      values = list(self.values)
      with tf.GradientTape() as tape:
        tape.watch(values)
        inner = tf.reduce_sum(
            tf.cast(self.function.logits(values, self.x), v.dtype) * v)
      tangents = tape.gradient(inner, values)
      with tf.autodiff.ForwardAccumulator(values, tangents) as acc:
        out = self.function.logits(values, self.x)
      return tf.reshape(acc.jvp(out), [-1])

    self._apply = apply

  def matvec(self, v) -> np.ndarray:
    self.calls += 1
    v = tf.constant(np.asarray(v, self.dtype).reshape(-1))
    return self._apply(v).numpy().astype(np.float64)

  def linear_operator(self):
    """Theta as a `scipy.sparse.linalg.LinearOperator` (float64)."""
    from scipy.sparse import linalg  # pylint: disable=g-import-not-at-top
    return linalg.LinearOperator(self.shape, matvec=self.matvec,
                                 rmatvec=self.matvec, dtype=np.float64)


def max_eigenvalue(model, x, tol: float = DEFAULT_TOL) -> float:
  """lambda_max of Theta on the inputs `x` (Lanczos, SciPy's `eigsh`)."""
  from scipy.sparse import linalg  # pylint: disable=g-import-not-at-top
  op = TangentOperator(model, x)
  if op.shape[0] == 1:
    return float(op.matvec(np.ones(1))[0])
  # A fixed start vector: the same run gives the same step on every resume.
  start = np.random.default_rng(0).standard_normal(op.shape[0])
  value = linalg.eigsh(op.linear_operator(), k=1, which="LA", tol=tol,
                       v0=start, return_eigenvectors=False)
  return float(value[0])


def learning_rate_from_gram(model, x, c: float) -> tuple[float, float]:
  """(eta, lambda_max): eta = c n / lambda_max(Theta) on the n inputs `x`.

  Raises:
    UserError: c is not positive, or Theta is zero (the outputs do not
      depend on the weights).
  """
  if not c > 0:
    raise UserError(f"--learning_rate (the constant c of "
                    f"--learning_rate_from=gram) must be positive; got {c}")
  lam = max_eigenvalue(model, x)
  if not lam > 0 or not np.isfinite(lam):
    raise UserError(f"the neural-tangent Gram matrix at initialisation has "
                    f"lambda_max = {lam}; --learning_rate_from=gram needs "
                    f"outputs that depend on the weights")
  return c * len(x) / lam, lam
