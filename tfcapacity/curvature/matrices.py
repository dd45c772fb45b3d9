"""Curvature matrices beyond the Hessian, as matrix-free operators.

Over the same `tfcapacity.objective.Objective` as `hvp.HessianOperator`
(model as a function of its weights, per-example loss, batch-norm policy,
fixed padded examples split over replicas), each operator here is

    M v = 1/n sum_i J_i^T Q_i J_i v,

with J_i the Jacobian of example i's logits z_i in the parameters and Q_i a
C x C matrix in the logits (C classes), chosen by the matrix:

  * `GGNOperator`, the generalised Gauss-Newton matrix: Q_i = H_i, the
    Hessian of the per-example loss in the logits (diag(p) - p p^T for the
    softmax cross-entropy, I for the squared loss; Schraudolph 2002,
    Martens 2020 "New insights and perspectives on the natural gradient
    method", Sec. 8). The Hessian minus the terms with the model's second
    derivatives; positive semi-definite.
  * `FisherOperator`, the Monte-Carlo Fisher: Q_i = 1/S sum_s r_is r_is^T,
    with r_is the loss gradient in the logits at a label y_is drawn from the
    model's predictive distribution (softmax of the logits for the
    cross-entropy; a unit-variance Gaussian around the logits for the
    squared loss). Its expectation over the draws is the GGN (Martens 2020,
    Sec. 9.2). The draws are fixed when the operator is built (`seed`,
    `mc_samples`), so it is one symmetric matrix, as the solvers need.
  * `EmpiricalFisherOperator`: Q_i = r_i r_i^T at the true labels, i.e.
    1/n sum_i g_i g_i^T with g_i = J_i^T r_i the per-example gradients
    (Kunstner et al. 2019 on why it is not the Fisher).

None forms J: a product is one Jacobian-vector product J v (forward mode,
`tf.autodiff.ForwardAccumulator`, `method="forward"`; or the double-VJP
trick, J v = d/du <J^T u, v>, `method="reverse"`, the only one for
SavedModels), a C x C product per example, and one vector-Jacobian product
J^T u. In `batch`/`ghost` mode the logits of a batch depend on each other
through the batch statistics; J_i is then the Jacobian of z_i with the rest
of the batch moving too, and M stays J^T Q J of the batch as composed with
the loss. As for the Hessian, computing a product never changes the model.

`make_operator(matrix, ...)` builds any of these or the Hessian by name
(`MATRICES`); every operator has `size`, `dtype`, `matvec` (the interface of
`eigen`), `dense()`, `to_scipy()` and `describe()`, and the three here have
`exact_diagonal()` from per-example output Jacobians.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfcapacity.curvature import MATRICES
from tfcapacity.curvature import hvp
from tfcapacity.errors import UserError, choices_error
from tfcapacity.objective import function as function_lib
from tfcapacity.objective import losses
from tfcapacity.objective import objective as objective_lib

# Default bound on n * C * size, the entries of all per-example output
# Jacobians `exact_diagonal` goes through (2^27: 1 GiB of float64).
MAX_DIAGONAL_ENTRIES = 2**27


class LogitCurvatureOperator:
  """1/n sum_i J_i^T Q_i J_i v over fixed examples (see the module doc).

  Subclasses say what Q_i is by `_logit_product` (Q u for u [b, C]) and
  `_logit_matrix` (Q itself, [b, C, C]).

  Attributes:
    matrix: the matrix's name in `MATRICES`.
    objective: the `Objective` (loss, examples, model function).
    size, dtype: the number of parameters and their dtype.
    num_classes: the logits per example (C).
    num_examples, batch_size, bn_mode, method, loss: as given.
    params, shapes: the variables and their shapes, in flat order.
    strategy: the strategy whose replicas share the batches.
  """

  matrix = ""

  def __init__(self, model, x: np.ndarray, y: np.ndarray, *,
               method: str = "reverse", **options):
    """Builds the operator (traced on first use).

    Args:
      model: a Keras model, or a SavedModel restored with
        `tf.saved_model.load` (inference mode, reverse method only).
      x, y: the examples (numpy), in the order they are batched.
      method: how J v is computed: reverse (double VJP) | forward
        (ForwardAccumulator, Keras models only).
      **options: the objective's: loss, bn_mode, batch_size, params,
        strategy, weight_decay (GGN only), ghost_batch_size.

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
    self.weight_decay = obj.weight_decay
    x1, _, _ = (a[0, :1] for a in obj.examples.data)
    self.num_classes = int(obj.function.logits(obj.function.values(),
                                               x1).shape[-1])
    self._decay = None
    if self.weight_decay:
      self._decay = self.weight_decay * function_lib.flatten([
          tf.fill(p.shape, tf.constant(1.0 if losses.is_decayed(p) else 0.0,
                                       self.dtype)) for p in self.params])
    self._build()

  # -- what the matrix is in the logits ---------------------------------------

  def _replica_extra(self, i):
    """Per-example data the matrix needs beyond (x, y, w) (e.g. noise)."""
    del i
    return None

  def _logit_product(self, logits, y, extra, u):
    """Q u per example, [b, C]."""
    raise NotImplementedError

  def _logit_matrix(self, logits, y, extra):
    """Q per example, [b, C, C]."""
    raise NotImplementedError

  # -- the per-replica computations -----------------------------------------

  def _jvp(self, values, vector, x):
    """(z, J v, tape): the logits, their directional derivative along
    `vector`, and a tape that recorded z from `values`."""
    fn = self.objective.function
    if self.method == "forward":
      with tf.GradientTape() as tape:
        tape.watch(values)
        with tf.autodiff.ForwardAccumulator(values, vector) as acc:
          logits = fn.logits(values, x)
      jv = acc.jvp(logits, unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return logits, jv, tape
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(values)
      logits = fn.logits(values, x)
    with tf.GradientTape() as outer:
      u = tf.zeros_like(logits)
      outer.watch(u)
      vjp = tape.gradient(logits, values, output_gradients=u,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
      dot = tf.add_n([tf.reduce_sum(g * tf.cast(v, g.dtype))
                      for g, v in zip(vjp, vector)])
    jv = outer.gradient(dot, u,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return logits, jv, tape

  def _replica_matvec(self, i, vector):
    x, y, w = self.objective.examples.replica_batch(i)
    values = self.objective.function.values()
    logits, jv, tape = self._jvp(values, vector, x)
    qu = self._logit_product(logits, y, self._replica_extra(i), jv)
    scale = tf.cast(w, qu.dtype)[:, None] / float(self.num_examples)
    out = tape.gradient(logits, values,
                        output_gradients=tf.cast(qu * scale, logits.dtype),
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [tf.cast(g, self.dtype) for g in out]

  def _replica_diagonal(self, i):
    x, y, w = self.objective.examples.replica_batch(i)
    values = self.objective.function.values()
    with tf.GradientTape() as tape:
      tape.watch(values)
      logits = self.objective.function.logits(values, x)
    jac = tape.jacobian(logits, values,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    b = tf.shape(logits)[0]
    jac = tf.concat([tf.reshape(j, [b, self.num_classes, -1]) for j in jac],
                    axis=-1)
    q = self._logit_matrix(logits, y, self._replica_extra(i))
    jac = tf.cast(jac, q.dtype)
    q *= tf.cast(w, q.dtype)[:, None, None] / float(self.num_examples)
    return tf.cast(tf.einsum("bcp,bcd,bdp->p", jac, q, jac), self.dtype)

  def _build(self):
    strategy = self.strategy
    spec = tf.TensorSpec([self.size], self.dtype)
    sum_op = tf.distribute.ReduceOp.SUM
    examples = self.objective.examples

    def reduce(per_replica):
      return tf.nest.map_structure(
          lambda t: strategy.reduce(sum_op, t, axis=None), per_replica)

    @tf.function(input_signature=[spec])
    def matvec(flat):
      vector = function_lib.unflatten(flat, self.shapes)
      total = tf.zeros_like(flat)
      for i in examples.batch_indices():
        mv = reduce(strategy.run(self._replica_matvec, args=(i, vector)))
        total += function_lib.flatten(mv)
      if self._decay is not None:
        total += self._decay * flat
      return total

    @tf.function(input_signature=[])
    def diagonal():
      total = tf.zeros([self.size], self.dtype)
      for i in examples.batch_indices():
        total += reduce(strategy.run(self._replica_diagonal, args=(i,)))
      if self._decay is not None:
        total += self._decay
      return total

    self._matvec = matvec
    self._diagonal = diagonal

  # -- the interface ----------------------------------------------------------

  def matvec(self, v) -> tf.Tensor:
    """M v for a flat vector `v` of length `size`, at the model's weights."""
    return self._matvec(tf.convert_to_tensor(v, self.dtype))

  def exact_diagonal(self, max_entries: int = MAX_DIAGONAL_ENTRIES
                     ) -> tf.Tensor:
    """diag(M) from per-example output Jacobians (J_i, C x size each).

    Args:
      max_entries: refuse when n * C * size exceeds this (the Jacobian
        entries computed; memory holds one batch of them at a time).

    Raises:
      UserError: the Jacobians are larger than `max_entries`.
    """
    entries = self.num_examples * self.num_classes * self.size
    if entries > max_entries:
      raise UserError(
          f"the exact diagonal needs {entries:,} Jacobian entries "
          f"({self.num_examples} examples x {self.num_classes} classes x "
          f"{self.size} parameters), above the limit of {max_entries:,}; "
          f"use fewer examples or a parameter block (params=...)")
    return self._diagonal()

  def dense(self) -> np.ndarray:
    """The whole matrix (size x size) by `size` products: tiny models only."""
    eye = np.eye(self.size, dtype=self.dtype.as_numpy_dtype)
    return np.stack([self.matvec(eye[i]).numpy() for i in range(self.size)])

  def to_scipy(self):
    """This operator for scipy's solvers (`hvp.scipy_operator`)."""
    return hvp.scipy_operator(self)

  def parameters(self) -> tf.Tensor:
    """The current parameter values, flattened."""
    return self.objective.parameters()

  def loss_and_gradient(self, flat=None) -> tuple[float, tf.Tensor]:
    """The mean loss and its flat gradient (model unchanged)."""
    return self.objective.value_and_gradient(flat)

  def set_examples(self, x: np.ndarray, y: np.ndarray) -> None:
    """Measures on other examples of the same number and shape (no retrace).

    Raises:
      UserError: a different number or shape of examples.
    """
    self.objective.set_examples(x, y)

  @property
  def traces(self) -> int:
    """How many times the product function has been traced (tests)."""
    return self._matvec.experimental_get_tracing_count()

  def describe(self) -> dict:
    """What every result records about how it was computed."""
    return {**self.objective.describe(), "matrix": self.matrix}


class GGNOperator(LogitCurvatureOperator):
  """G v = 1/n sum_i J_i^T H_i J_i v, H_i the loss Hessian in the logits.

  With `weight_decay` the penalty's Hessian is added (it is its own GGN).
  """

  matrix = "ggn"

  def _logit_product(self, logits, y, extra, u):
    return losses.logit_hessian_product(self.loss, logits, u)

  def _logit_matrix(self, logits, y, extra):
    return losses.logit_hessian(self.loss, logits)


class _DataFitOperator(LogitCurvatureOperator):
  """A Fisher: of the likelihood alone, so no weight decay."""

  def __init__(self, model, x, y, **options):
    if options.get("weight_decay"):
      raise UserError(f"--matrix={self.matrix} is the Fisher of the "
                      f"likelihood and takes no weight decay; use "
                      f"--weight_decay=0 or --matrix=ggn")
    super().__init__(model, x, y, **options)


class EmpiricalFisherOperator(_DataFitOperator):
  """F_emp v = 1/n sum_i g_i g_i^T v, g_i = J_i^T r_i at the true labels."""

  matrix = "empirical_fisher"

  def _logit_product(self, logits, y, extra, u):
    r = losses.logit_gradient(self.loss, y, logits)
    u = tf.cast(u, r.dtype)
    return r * tf.reduce_sum(r * u, axis=-1, keepdims=True)

  def _logit_matrix(self, logits, y, extra):
    r = losses.logit_gradient(self.loss, y, logits)
    return r[:, :, None] * r[:, None, :]


class FisherOperator(_DataFitOperator):
  """F v = 1/(n S) sum_i sum_s J_i^T r_is r_is^T J_i v, labels drawn from
  the model's predictive distribution with fixed, seeded randomness.

  Attributes (beyond the base's):
    mc_samples: S, the labels drawn per example.
    seed: seeds the draws; the same seed gives the same matrix, whatever
      the batch size or number of replicas (the draws belong to examples).
  """

  matrix = "fisher"

  def __init__(self, model, x, y, *, mc_samples: int = 1, seed: int = 0,
               **options):
    """As the base, plus:

    Args:
      mc_samples: labels drawn per example (S >= 1).
      seed: seeds the draws (numpy's default generator).

    Raises:
      UserError: mc_samples < 1, weight decay, and the base's errors.
    """
    if int(mc_samples) != mc_samples or mc_samples < 1:
      raise UserError(f"--mc_samples must be a positive integer; got "
                      f"{mc_samples}")
    self.mc_samples, self.seed = int(mc_samples), int(seed)
    self._noise = None
    super().__init__(model, x, y, **options)

  def _build(self):
    obj = self.objective
    noise = losses.predictive_noise(
        self.loss, np.random.default_rng(self.seed), self.num_examples,
        self.mc_samples, self.num_classes)
    dtype = (tf.float64 if self.dtype == tf.float64 else tf.float32)
    with self.strategy.scope():
      self._noise = tf.Variable(
          obj.examples.batched(noise.astype(dtype.as_numpy_dtype)),
          trainable=False)
    super()._build()

  def _replica_extra(self, i):
    return self.objective.examples.replica_rows(self._noise, i)

  def _logit_product(self, logits, y, extra, u):
    r = losses.sampled_logit_gradients(self.loss, logits, extra)  # [b, S, C]
    u = tf.cast(u, r.dtype)
    coefficients = tf.einsum("bsc,bc->bs", r, u)
    return tf.einsum("bsc,bs->bc", r, coefficients) / float(self.mc_samples)

  def _logit_matrix(self, logits, y, extra):
    r = losses.sampled_logit_gradients(self.loss, logits, extra)
    return tf.einsum("bsc,bsd->bcd", r, r) / float(self.mc_samples)

  def describe(self) -> dict:
    return {**super().describe(), "mc_samples": self.mc_samples,
            "seed": self.seed}


_CLASSES = {"hessian": hvp.HessianOperator, "ggn": GGNOperator,
            "fisher": FisherOperator,
            "empirical_fisher": EmpiricalFisherOperator}
assert tuple(_CLASSES) == MATRICES


def make_operator(matrix: str, model, x: np.ndarray, y: np.ndarray,
                  **options):
  """The curvature matrix `matrix` (one of `MATRICES`) as an operator.

  Args:
    matrix: hessian | ggn | fisher | empirical_fisher.
    model, x, y: the model and the examples.
    **options: the operator's (method, loss, bn_mode, batch_size, params,
      strategy, weight_decay, ghost_batch_size; mc_samples and seed for the
      Fisher).

  Returns:
    An operator with `.matrix` set to `matrix`.

  Raises:
    UserError: an unknown matrix, an option it does not take, and the
      operator's own errors.
  """
  if matrix not in _CLASSES:
    raise choices_error("--matrix", matrix, MATRICES)
  if matrix != "fisher":
    for name in ("mc_samples", "seed"):
      if name in options:
        raise UserError(f"{name} applies to --matrix=fisher only; drop it "
                        f"for --matrix={matrix}")
  return _CLASSES[matrix](model, x, y, **options)
