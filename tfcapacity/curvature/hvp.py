"""The Hessian of a model's mean loss over fixed examples, as an operator.

`HessianOperator` is a linear operator on the flattened parameters (`size`,
`dtype`, `matvec(v)`), the interface of `tfcapacity.curvature.eigen`. It is
written over `tfcapacity.objective.Objective`, which owns everything about
the loss: the model as a function of its weights, the per-example loss
(`--loss`), the batch-norm policy (`bn_mode`), the fixed examples (padded,
resident, split over replicas) and the Hessian-vector product itself
(Pearlmutter's R-operator by double backprop, papers/003 Sec. 2.3; reverse-
over-reverse or forward-over-reverse). The parameters are all trainable
variables or a block of them (`objective.function.select_params`), and may
include non-trainable ones such as the adaptive rectifier slopes.

Computing a product never changes the model, and each operator traces its
functions once (fixed shapes, input signatures): calls with new vectors or
new parameter values do not retrace. `to_scipy()` wraps an operator for
scipy's solvers (`scipy_operator`); `tfcapacity.curvature.matrices` has the
other curvature matrices (Gauss-Newton, Fisher) over the same objective.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfcapacity.objective import objective as objective_lib


def scipy_operator(op):
  """`op` as a `scipy.sparse.linalg.LinearOperator` (size x size, float64).

  Vectors are cast to the operator's dtype on the way in and back to
  float64 numpy on the way out; the matrix is symmetric, so the adjoint
  product is the product itself.
  """
  from scipy.sparse import linalg  # Only the callers that want scipy pay.

  def matvec(v):
    v = np.asarray(v).reshape(-1)
    return np.asarray(op.matvec(tf.constant(v, op.dtype)), np.float64)

  return linalg.LinearOperator((op.size, op.size), matvec=matvec,
                               rmatvec=matvec, dtype=np.float64)


class HessianOperator:
  """H v for the mean loss of a model over a fixed set of examples.

  Attributes:
    matrix: "hessian" (the name `matrices.make_operator` knows it by).
    objective: the `Objective` whose Hessian this is.
    size: the number of parameters (length of the flat vectors).
    dtype: the parameters' dtype.
    num_examples: examples in the set.
    bn_mode, method, loss: as given.
    params: the variables differentiated against.
    shapes: their shapes, in the order of the flat vectors.
  """

  matrix = "hessian"

  def __init__(self, model, x: np.ndarray, y: np.ndarray, *,
               method: str = "reverse", **options):
    """Builds the operator (traced on first use).

    Args:
      model: a Keras model, or a SavedModel restored with
        `tf.saved_model.load` (inference mode, reverse method only).
      x, y: the examples (numpy), in the order they are batched.
      method: reverse (nested tapes) | forward (ForwardAccumulator).
      **options: the objective's: loss, bn_mode, batch_size, params,
        strategy, weight_decay, ghost_batch_size (see `Objective`).

    Raises:
      UserError: bad loss, mode, method, batch size or data.
    """
    self.objective = objective_lib.Objective(model, x, y, hvp_method=method,
                                             **options)
    obj = self.objective
    self.model = model
    self.strategy = obj.strategy
    self.params, self.shapes = obj.params, obj.shapes
    self.size, self.dtype = obj.size, obj.dtype
    self.num_examples, self.batch_size = obj.num_examples, obj.batch_size
    self.bn_mode, self.method, self.loss = obj.bn_mode, method, obj.loss

  def matvec(self, v: tf.Tensor) -> tf.Tensor:
    """H v for a flat vector `v` of length `size`."""
    return self.objective.hvp(v)

  def to_scipy(self):
    """This operator for scipy's solvers (`scipy_operator`)."""
    return scipy_operator(self)

  def loss_and_gradient(self, flat=None) -> tuple[float, tf.Tensor]:
    """The mean loss and its flat gradient at `flat` (default: the model's
    weights); the model is not changed."""
    return self.objective.value_and_gradient(flat)

  def parameters(self) -> tf.Tensor:
    """The current parameter values, flattened."""
    return self.objective.parameters()

  def set_examples(self, x: np.ndarray, y: np.ndarray) -> None:
    """Measures on other examples of the same number and shape (no retrace).

    Raises:
      UserError: a different number or shape of examples.
    """
    self.objective.set_examples(x, y)

  def dense(self) -> np.ndarray:
    """The whole Hessian (size x size) by `size` products: tiny models only."""
    eye = np.eye(self.size, dtype=self.dtype.as_numpy_dtype)
    return np.stack([self.matvec(eye[i]).numpy() for i in range(self.size)])

  @property
  def traces(self) -> int:
    """How many times the product function has been traced (tests)."""
    return self.objective.traces

  def describe(self) -> dict:
    """What every result records about how it was computed."""
    return self.objective.describe()
