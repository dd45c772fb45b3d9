"""`Objective`: the mean loss of a model over fixed examples, at any weights.

    L(theta) = 1/n sum_i loss(z(theta, x_i), y_i)  [+ weight_decay/2 ||K||^2]

where z is the model as a function of the chosen parameters theta
(`function.ModelFunction`, batch-norm policy included), the sum runs over a
`examples.FixedExamples` set batch by batch (memory bounded by one batch),
and `loss` is one of `losses.LOSSES`. The regulariser, when asked for, is
the L2 penalty training adds (kernels only).

One object gives everything a measurement needs at given weights, each a
traced function with a fixed input signature (calls with new values do not
retrace):
  * `value_and_gradient(theta)`: L and its flat gradient;
  * `hvp(v)`: the Hessian-vector product H v by Pearlmutter's R-operator
    (papers/003, Sec. 2.3), Hv = d/dr grad L(theta + r v) at r = 0, with
    `hvp_method="reverse"` (a gradient of <grad L, v> with nested
    `GradientTape`s) or `"forward"` (forward-over-reverse,
    `tf.autodiff.ForwardAccumulator`);
  * `metrics(theta)`: the mean loss and top-1/top-5 errors (errors from the
    logits, whatever the loss).
Under a `tf.distribute` strategy each replica computes its slice of every
batch and the sums are reduced across replicas. Nothing here changes the
model: a Keras model is evaluated on tensors; a SavedModel's variables are
set for a call at other weights and restored after it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfcapacity import objective as names
from tfcapacity.errors import UserError, choices_error
from tfcapacity.objective import examples as examples_lib
from tfcapacity.objective import function as function_lib
from tfcapacity.objective import losses


class Objective:
  """The mean loss of a model over fixed examples, as a function of weights.

  Attributes:
    function: the `function.ModelFunction` (model, parameters, bn policy).
    examples: the `examples.FixedExamples`.
    loss: the loss's name; `loss_fn` the per-example function.
    params: the variables differentiated against; `shapes` their shapes in
      the order of the flat vectors; `size` their number of entries;
      `dtype` their dtype.
    bn_mode, hvp_method, weight_decay, num_examples, batch_size: as given.
    strategy: the strategy whose replicas share the batches.
  """

  def __init__(self, model, x: np.ndarray, y: np.ndarray, *,
               loss: str = "cross_entropy", bn_mode: str = "inference",
               batch_size: int | None = None, params=None,
               hvp_method: str = "reverse",
               strategy: tf.distribute.Strategy | None = None,
               weight_decay: float = 0.0,
               ghost_batch_size: int | None = None):
    """Builds the objective (its functions are traced on first use).

    Args:
      model: a Keras model, or a SavedModel restored with
        `tf.saved_model.load` (inference mode, reverse method only).
      x, y: the examples (numpy), in the order they are batched.
      loss: a name of `losses.LOSSES`.
      bn_mode: inference | batch | ghost (`objective.BN_MODES`).
      batch_size: global examples per batch (default: all, at most
        `objective.MAX_BATCH_SIZE`).
        With `batch` or `ghost` statistics it must divide the examples
        (padding rows would enter the statistics).
      params: the variables (default: every trainable variable); see
        `function.select_params`.
      hvp_method: reverse (nested tapes) | forward (ForwardAccumulator).
      strategy: the strategy the model was built under (default: current).
      weight_decay: add weight_decay / 2 * sum ||kernel||^2.
      ghost_batch_size: the sub-batch of `ghost` mode (default: the model's).

    Raises:
      UserError: a bad loss, mode, method, batch size or data.
    """
    if hvp_method not in names.HVP_METHODS:
      raise choices_error("--method", hvp_method, names.HVP_METHODS)
    self.loss = loss
    self.loss_fn = losses.get(loss)
    self.examples = examples_lib.FixedExamples(
        x, y, batch_size=batch_size, strategy=strategy,
        full_batches=None if bn_mode == "inference"
        else f"--bn_mode={bn_mode}")
    self.strategy = self.examples.strategy
    if function_lib.is_keras(model):
      ghost = function_lib.check_bn_mode(model, bn_mode, ghost_batch_size,
                                         self.examples.per_replica_batch)
    else:
      ghost = None
      if hvp_method != "reverse":
        raise UserError("--method=forward needs a Keras model; use "
                        "--method=reverse for a SavedModel")
    self.function = function_lib.model_function(model, params, bn_mode,
                                                ghost)
    self.model = model
    self.bn_mode = bn_mode
    self.hvp_method = hvp_method
    self.params = self.function.params
    self.shapes = [tf.TensorShape(p.shape) for p in self.params]
    self.size = int(sum(np.prod(s) for s in self.shapes))
    self.dtype = tf.as_dtype(self.params[0].dtype)
    self.num_examples = self.examples.num_examples
    self.batch_size = self.examples.batch_size
    self.weight_decay = float(weight_decay)
    self._decay_mask = None
    if self.weight_decay:
      self._decay_mask = function_lib.flatten([
          tf.fill(p.shape, tf.constant(1.0 if losses.is_decayed(p) else 0.0,
                                       self.dtype))
          for p in self.params])
    self._build()

  # -- the per-replica computations -----------------------------------------

  def _batch_loss(self, values, x, y, w):
    """This replica's share of the mean loss: sum of w * loss / n."""
    per_example = self.loss_fn(y, self.function.logits(values, x))
    return tf.reduce_sum(tf.cast(w, per_example.dtype) * per_example) / float(
        self.num_examples)

  def _replica_hvp(self, i, vector):
    x, y, w = self.examples.replica_batch(i)
    values = self.function.values()
    if self.hvp_method == "forward":
      with tf.autodiff.ForwardAccumulator(values, vector) as acc:
        with tf.GradientTape() as tape:
          tape.watch(values)
          loss = self._batch_loss(values, x, y, w)
        grads = tape.gradient(loss, values)
      return [acc.jvp(g) for g in grads]
    with tf.GradientTape() as outer:
      outer.watch(values)
      with tf.GradientTape() as inner:
        inner.watch(values)
        loss = self._batch_loss(values, x, y, w)
      grads = inner.gradient(loss, values)
      dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vector)])
    return outer.gradient(dot, values)

  def _replica_value_and_gradient(self, i, values):
    x, y, w = self.examples.replica_batch(i)
    if not self.function.replaces_values:
      values = self.function.values()  # Assigned by `_at`.
    with tf.GradientTape() as tape:
      tape.watch(values)
      loss = self._batch_loss(values, x, y, w)
    return loss, tape.gradient(loss, values)

  def _replica_metrics(self, i, values):
    x, y, w = self.examples.replica_batch(i)
    logits = self.function.logits(values, x)
    return losses.metric_sums(self.loss_fn, y, logits, w,
                              tf.minimum(5, tf.shape(logits)[-1]))

  def _build(self):
    strategy = self.strategy
    spec = tf.TensorSpec([self.size], self.dtype)
    sum_op = tf.distribute.ReduceOp.SUM

    def reduce(per_replica):
      return tf.nest.map_structure(
          lambda t: strategy.reduce(sum_op, t, axis=None), per_replica)

    @tf.function(input_signature=[spec])
    def hvp(flat):
      vector = function_lib.unflatten(flat, self.shapes)
      total = tf.zeros_like(flat)
      for i in self.examples.batch_indices():
        hv = reduce(strategy.run(self._replica_hvp, args=(i, vector)))
        total += function_lib.flatten(hv)
      if self._decay_mask is not None:
        total += self.weight_decay * self._decay_mask * flat
      return total

    @tf.function(input_signature=[spec])
    def value_and_gradient(flat):
      values = function_lib.unflatten(flat, self.shapes)
      loss = tf.zeros([], self.dtype)
      grad = tf.zeros([self.size], self.dtype)
      for i in self.examples.batch_indices():
        l, g = reduce(strategy.run(self._replica_value_and_gradient,
                                   args=(i, values)))
        loss += l
        grad += function_lib.flatten(g)
      if self._decay_mask is not None:
        loss += 0.5 * self.weight_decay * tf.reduce_sum(
            self._decay_mask * tf.square(flat))
        grad += self.weight_decay * self._decay_mask * flat
      return loss, grad

    @tf.function(input_signature=[spec])
    def metric_sums(flat):
      values = function_lib.unflatten(flat, self.shapes)
      sums = tf.zeros([4])
      for i in self.examples.batch_indices():
        sums += reduce(strategy.run(self._replica_metrics, args=(i, values)))
      return sums

    self._hvp = hvp
    self._value_and_gradient = value_and_gradient
    self._metric_sums = metric_sums

  # -- the interface ----------------------------------------------------------

  def parameters(self) -> tf.Tensor:
    """The current parameter values, flattened."""
    return function_lib.flatten([tf.convert_to_tensor(p)
                                 for p in self.params])

  def _at(self, flat, fn):
    """fn(flat) at weights `flat` (default: the model's own), model unchanged.

    A Keras model is evaluated on tensors; a SavedModel's variables are set
    for the call and restored after it.
    """
    if flat is None:
      return fn(self.parameters())
    flat = tf.convert_to_tensor(flat, self.dtype)
    if self.function.replaces_values:
      return fn(flat)
    current = self.parameters()  # Restored after the call.
    self._assign(flat)
    try:
      return fn(flat)
    finally:
      self._assign(current)

  def _assign(self, flat):
    for var, value in zip(self.params,
                          function_lib.unflatten(flat, self.shapes)):
      var.assign(value)

  def hvp(self, v) -> tf.Tensor:
    """H v for a flat vector `v` of length `size`, at the model's weights."""
    return self._hvp(tf.convert_to_tensor(v, self.dtype))

  def value_and_gradient(self, flat=None) -> tuple[float, tf.Tensor]:
    """The mean loss over the examples and its flat gradient.

    Args:
      flat: parameter values to evaluate at (default: the model's own).
    """
    loss, grad = self._at(flat, self._value_and_gradient)
    return float(loss), grad

  def metrics(self, flat=None) -> dict[str, float]:
    """{"loss", "top1_error", "top5_error"} over the examples at `flat`."""
    loss, top1, top5, count = self._at(flat, self._metric_sums).numpy()
    return {"loss": float(loss / count), "top1_error": float(1 - top1 / count),
            "top5_error": float(1 - top5 / count)}

  def set_examples(self, x: np.ndarray, y: np.ndarray) -> None:
    """Measures on other examples of the same number and shape.

    The traced functions are reused (a training callback alternates between
    training examples and test batches with one trace).
    """
    self.examples.assign(x, y)

  @property
  def traces(self) -> int:
    """How many times the product function has been traced (tests)."""
    return self._hvp.experimental_get_tracing_count()

  def trace_counts(self) -> dict[str, int]:
    """How many times each traced function has been traced (tests)."""
    return {name: fn.experimental_get_tracing_count() for name, fn in (
        ("hvp", self._hvp), ("value_and_gradient", self._value_and_gradient),
        ("metrics", self._metric_sums))}

  def describe(self) -> dict:
    """What every result records about how it was computed."""
    return {"num_examples": self.num_examples, "loss": self.loss,
            "bn_mode": self.bn_mode, "method": self.hvp_method,
            "num_parameters": self.size, "batch_size": self.batch_size,
            "num_replicas": self.strategy.num_replicas_in_sync}
