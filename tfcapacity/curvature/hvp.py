"""Hessian-vector products of a model's mean data loss over fixed examples.

Pearlmutter's R-operator by double backprop, the method of the maxi-batch
study (papers/003, Sec. 2.3): Hv = d/dr grad L(theta + r v) at r = 0, with
  * `method="reverse"` (default): reverse-over-reverse, a gradient of
    <grad L, v> taken with nested `GradientTape`s;
  * `method="forward"`: forward-over-reverse, the directional derivative of
    the gradient with `tf.autodiff.ForwardAccumulator`.

`HessianOperator` is a linear operator on the flattened parameters
(`size`, `dtype`, `matvec(v)`), the interface of `tfcapacity.curvature.eigen`.
L is the mean cross-entropy over a fixed set of examples, accumulated batch
by batch (so memory is bounded by one batch, not by the set), with no
regularisation unless `weight_decay` is given. The parameters are all
trainable variables, a block of them (`select_params`: some layers), and may
include non-trainable ones such as the adaptive rectifier slopes.

Computing an HVP never changes the model. A Keras model is evaluated with
`model.stateless_call` on tensors that stand in for its variables; the batch-
norm moving statistics it would update are dropped. The batch-norm policy is
explicit and recorded with every result (`bn_mode`):
  * `inference` (default): moving statistics; the loss the model is judged by.
  * `batch`: statistics of each batch (per replica under a strategy), the
    loss a training step sees; ghost layers use whole batches.
  * `ghost`: statistics over fixed sub-batches of `ghost_batch_size`.
Dropout and noise layers are off in every mode. Keras' own
`BatchNormalization` drops a second-order term in training mode (see
tfcapacity/models/layers.py), so `batch` mode warns on it and `ghost` mode
refuses it; tfcapacity's models use exact layers.

Under a `tf.distribute` strategy every replica takes its slice of each batch
(the slice is the same whatever the number of replicas, as in training) and
the products are summed across replicas. A SavedModel (`tf_saved_model`
export, `serve` signature) is differentiated through its restored variables,
in inference mode, by the reverse method.

Each operator traces its functions once (fixed shapes, input signatures):
calls with new vectors or new parameter values do not retrace.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfcapacity.errors import UserError, choices_error
from tfcapacity.models import layers as layers_lib
from tfcapacity.objective import losses

BN_MODES = ("inference", "batch", "ghost")
METHODS = ("reverse", "forward")
_DROPOUT_TYPES = (keras.layers.Dropout, keras.layers.SpatialDropout1D,
                  keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
                  keras.layers.AlphaDropout, keras.layers.GaussianDropout)


def flatten(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(flat: tf.Tensor, shapes: Sequence[tf.TensorShape]
              ) -> list[tf.Tensor]:
  sizes = [int(np.prod(s)) for s in shapes]
  return [tf.reshape(part, s) for part, s in
          zip(tf.split(flat, sizes), shapes)]


def select_params(model, layers: Sequence[str] | None = None, *,
                  include_slopes: bool = False) -> list:
  """The variables to differentiate with respect to.

  Args:
    model: a Keras model.
    layers: names of layers whose trainable weights form the block (None:
      every trainable weight). A name matches a layer or, as a prefix, the
      layers under it (`stage1` takes `stage1_block0_conv1`, ...).
    include_slopes: add the adaptive rectifier slopes (non-trainable) of the
      chosen layers (papers/003 Sec. 2.5).

  Raises:
    UserError: a name matches no layer, or the block is empty.
  """
  chosen = []
  if layers is None:
    chosen = list(model.trainable_variables)
    picked_layers = model.layers
  else:
    names = [layer.name for layer in _all_layers(model)]
    picked_layers = []
    for name in layers:
      match = [l for l in _all_layers(model) if l.name == name or
               l.name.startswith(name + "_")]
      if not match:
        raise UserError(f"no layer named {name!r} (or starting with "
                        f"'{name}_'); layers: {', '.join(names[:20])}"
                        + (" ..." if len(names) > 20 else ""))
      picked_layers += match
    for layer in picked_layers:
      for var in layer.trainable_weights:
        if not any(var is c for c in chosen):
          chosen.append(var)
  if include_slopes:
    for layer in layers_lib.slope_layers(model):
      if layers is None or any(layer is l for l in picked_layers):
        chosen.append(layer.slope)
  if not chosen:
    raise UserError("the chosen parameter block is empty; name layers with "
                    "weights")
  return chosen


def _all_layers(model):
  out = []
  for layer in model.layers:
    out.append(layer)
    if isinstance(layer, keras.Model):
      out += _all_layers(layer)
  return out


@contextlib.contextmanager
def _bn_policy(model, bn_mode: str, ghost_batch_size: int | None):
  """Sets ghost sizes and turns dropout off while a function is traced."""
  saved = []
  try:
    for layer in _all_layers(model):
      if isinstance(layer, layers_lib.GhostBatchNormalization):
        saved.append((layer, "ghost_batch_size", layer.ghost_batch_size))
        if bn_mode == "batch":
          layer.ghost_batch_size = None
        elif bn_mode == "ghost":
          layer.ghost_batch_size = ghost_batch_size or layer.ghost_batch_size
      elif isinstance(layer, _DROPOUT_TYPES):
        saved.append((layer, "rate", layer.rate))
        layer.rate = 0.0
      elif isinstance(layer, keras.layers.GaussianNoise):
        saved.append((layer, "stddev", layer.stddev))
        layer.stddev = 0.0
    yield
  finally:
    for layer, attr, value in saved:
      setattr(layer, attr, value)


def check_bn_mode(model, bn_mode: str, ghost_batch_size: int | None,
                  per_replica_batch: int) -> int | None:
  """Validates the batch-norm policy for `model`; returns the ghost size.

  Raises:
    UserError: an unknown mode; `ghost` without a ghost size or with Keras'
      batch norm; a ghost size that does not divide the per-replica batch.
  """
  if bn_mode not in BN_MODES:
    raise choices_error("--bn_mode", bn_mode, BN_MODES)
  all_layers = _all_layers(model)
  keras_bn = [l.name for l in all_layers
              if isinstance(l, keras.layers.BatchNormalization)]
  ours = [l for l in all_layers
          if isinstance(l, layers_lib.GhostBatchNormalization)]
  if bn_mode == "inference":
    return None
  if keras_bn:
    if bn_mode == "ghost":
      raise UserError(
          f"--bn_mode=ghost needs tfcapacity's batch-norm layers; "
          f"{keras_bn[0]} is keras.layers.BatchNormalization; use "
          f"--bn_mode=inference or batch")
    logging.warning(
        "--bn_mode=batch with keras.layers.BatchNormalization (%s): its "
        "variance stops the gradient of the mean, so second derivatives "
        "miss a term; tfcapacity's BatchNormalization is exact.", keras_bn[0])
  if bn_mode == "ghost":
    sizes = {l.ghost_batch_size for l in ours} - {None}
    g = ghost_batch_size or (sizes.pop() if len(sizes) == 1 else None)
    if not ours:
      raise UserError("--bn_mode=ghost: the model has no batch norm; use "
                      "--bn_mode=inference")
    if g is None:
      raise UserError("--bn_mode=ghost needs --ghost_batch_size (the model's "
                      "batch norm has no ghost size of its own)")
    if per_replica_batch % g:
      raise UserError(
          f"--ghost_batch_size={g} does not divide the per-replica batch of "
          f"{per_replica_batch} examples; choose a divisor")
    return g
  return None


def _check_examples(x, y):
  if not np.isfinite(x).all():
    raise UserError("the examples hold NaN or Inf values; clean the data")
  if y.min() < 0:
    raise UserError("labels must be non-negative class indices")


class _KerasFunction:
  """logits(params, x) for a Keras model, via `stateless_call`."""

  def __init__(self, model, params, bn_mode, ghost_batch_size):
    self.model = model
    self.params = list(params)
    self.bn_mode = bn_mode
    self.ghost_batch_size = ghost_batch_size
    slots = {}
    for i, var in enumerate(model.trainable_variables):
      slots[id(var)] = ("t", i)
    for i, var in enumerate(model.non_trainable_variables):
      slots[id(var)] = ("n", i)
    try:
      self.slots = [slots[id(p)] for p in self.params]
    except KeyError:
      raise UserError("a chosen parameter is not a variable of the model"
                      ) from None

  def values(self):
    return [tf.convert_to_tensor(p.value) for p in self.params]

  def logits(self, values, x):
    trainable = [v.value for v in self.model.trainable_variables]
    non_trainable = [v.value for v in self.model.non_trainable_variables]
    for (kind, i), value in zip(self.slots, values):
      (trainable if kind == "t" else non_trainable)[i] = value
    with _bn_policy(self.model, self.bn_mode, self.ghost_batch_size):
      logits, _ = self.model.stateless_call(
          trainable, non_trainable, x, training=self.bn_mode != "inference")
    return logits  # The moving-statistics updates are dropped.


class _SavedModelFunction:
  """logits(params, x) of a restored SavedModel's `serve`, in inference mode.

  Its variables cannot be replaced by tensors: derivatives are taken with
  respect to the variables themselves, and `values()` returns them.
  """

  def __init__(self, loaded, params=None):
    self.serve = getattr(loaded, "serve", None)
    if self.serve is None:
      raise UserError("the SavedModel has no 'serve' function; export it "
                      "with model.export(..., format='tf_saved_model')")
    self.params = list(params if params is not None else
                       loaded.trainable_variables)
    if not self.params:
      raise UserError("the SavedModel has no trainable variables")
    self.bn_mode = "inference"

  def values(self):
    return self.params

  def logits(self, values, x):
    del values  # The variables are read by `serve` itself.
    return self.serve(x)


class HessianOperator:
  """H v for the mean loss of a model over a fixed set of examples.

  Attributes:
    size: the number of parameters (length of the flat vectors).
    dtype: the parameters' dtype.
    num_examples: examples in the set.
    bn_mode, method: as given.
    params: the variables differentiated against.
    shapes: their shapes, in the order of the flat vectors.
  """

  def __init__(self, model, x: np.ndarray, y: np.ndarray, *,
               bn_mode: str = "inference", batch_size: int | None = None,
               params=None, method: str = "reverse",
               strategy: tf.distribute.Strategy | None = None,
               weight_decay: float = 0.0,
               ghost_batch_size: int | None = None):
    """Builds the operator (traced on first use).

    Args:
      model: a Keras model, or a SavedModel restored with
        `tf.saved_model.load` (inference mode, reverse method only).
      x, y: the examples (numpy), in the order they are batched.
      bn_mode: inference | batch | ghost.
      batch_size: global examples per batch (default: all, at most 512).
        With `batch` or `ghost` statistics it must divide the examples
        (padding rows would enter the statistics).
      params: the variables (default: every trainable variable); see
        `select_params`.
      method: reverse (nested tapes) | forward (ForwardAccumulator).
      strategy: the distribution strategy the model was built under
        (default: the current one).
      weight_decay: add the Hessian of weight_decay / 2 * sum ||kernel||^2.
      ghost_batch_size: the sub-batch of `ghost` mode (default: the model's).

    Raises:
      UserError: bad mode, method, batch size or data.
    """
    if method not in METHODS:
      raise choices_error("--method", method, METHODS)
    self.strategy = strategy or tf.distribute.get_strategy()
    replicas = self.strategy.num_replicas_in_sync
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    n = len(y)
    if n == 0 or len(x) != n:
      raise UserError(f"need matching, non-empty examples; got {len(x)} "
                      f"inputs and {n} labels")
    _check_examples(x, y)
    batch_size = int(batch_size or min(n, 512))
    batch_size = max(replicas, batch_size - batch_size % replicas)
    saved_model = not isinstance(model, keras.Model)
    if saved_model:
      if bn_mode != "inference":
        raise UserError(f"--bn_mode={bn_mode} needs a Keras model; a "
                        f"SavedModel's serve function runs in inference mode")
      if method != "reverse":
        raise UserError("--method=forward needs a Keras model; use "
                        "--method=reverse for a SavedModel")
      self.function = _SavedModelFunction(model, params)
    else:
      ghost = check_bn_mode(model, bn_mode, ghost_batch_size,
                            batch_size // replicas)
      if bn_mode != "inference" and n % batch_size:
        raise UserError(
            f"--bn_mode={bn_mode}: the batch size {batch_size} must divide "
            f"the {n} examples (padding rows would enter the batch "
            f"statistics); choose a divisor")
      self.function = _KerasFunction(
          model, params if params is not None else model.trainable_variables,
          bn_mode, ghost)
    self.model = model
    self.bn_mode = bn_mode
    self.method = method
    self.params = self.function.params
    self.shapes = [tf.TensorShape(p.shape) for p in self.params]
    self.size = int(sum(np.prod(s) for s in self.shapes))
    self.dtype = tf.as_dtype(self.params[0].dtype)
    self.num_examples = n
    self.batch_size = batch_size
    self.weight_decay = float(weight_decay)
    self._decay_mask = None
    if self.weight_decay:
      self._decay_mask = flatten([
          tf.fill(p.shape, 1.0 if losses.is_decayed(p) else 0.0)
          for p in self.params])
    self._data = self._resident_batches(x, y, batch_size)
    self._build()

  def _padded(self, x, y):
    """The set as [batches, batch, ...] arrays, the last batch zero-weighted."""
    n, b = len(y), self.batch_size
    total = self.num_batches * b
    w = np.zeros(total, np.float32)
    w[:n] = 1.0
    x = np.concatenate([x, np.zeros((total - n, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(total - n, y.dtype)])
    shape = (self.num_batches, b)
    return x.reshape(shape + x.shape[1:]), y.reshape(shape), w.reshape(shape)

  def _resident_batches(self, x, y, batch_size):
    """Variables holding the set; each replica reads its slice of a batch.

    Resident data and an in-graph loop over batch indices: iterating a
    `tf.data` pipeline inside the function cost ~140 ms per product on a tiny
    ResNet (iterator set-up on every call), 100x a gradient. Each replica
    takes its slice of every batch, the same slice whatever the number of
    replicas (as in training). Held in variables, the examples can be
    replaced by others of the same shape (`set_examples`) without retracing.
    """
    self.batch_size = batch_size
    self.num_batches = -(-len(y) // batch_size)
    with self.strategy.scope():
      return tuple(tf.Variable(a, trainable=False)
                   for a in self._padded(x, y))

  def set_examples(self, x: np.ndarray, y: np.ndarray) -> None:
    """Measures on other examples of the same number and shape.

    The traced functions are reused (a training callback alternates between
    training examples and test batches with one trace).

    Raises:
      UserError: a different number or shape of examples.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    if len(y) != self.num_examples or x.shape[1:] != tuple(
        self._data[0].shape[2:]):
      raise UserError(f"set_examples needs {self.num_examples} examples of "
                      f"shape {tuple(self._data[0].shape[2:])}; got "
                      f"{x.shape}: build another operator")
    _check_examples(x, y)
    for var, value in zip(self._data, self._padded(x, y)):
      var.assign(value)

  # -- the per-replica computations -------------------------------------------

  def _batch_loss(self, values, x, y, w):
    """This replica's share of the mean loss: sum of w * loss / n."""
    logits = self.function.logits(values, x)
    return tf.reduce_sum(w * losses.cross_entropy(y, logits)) / float(
        self.num_examples)

  def _slice(self, data, i):
    """This replica's part of batch `i`."""
    replicas = self.strategy.num_replicas_in_sync
    if replicas == 1:
      return tuple(a[i] for a in data)
    per = self.batch_size // replicas
    lo = tf.distribute.get_replica_context().replica_id_in_sync_group * per
    return tuple(a[i, lo:lo + per] for a in data)

  def _replica_hvp(self, data, i, vector):
    x, y, w = self._slice(data, i)
    values = self.function.values()
    if self.method == "forward":
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

  def _replica_loss_grad(self, data, i, values):
    x, y, w = self._slice(data, i)
    if isinstance(self.function, _SavedModelFunction):
      values = self.function.values()  # Assigned by `loss_and_gradient`.
    with tf.GradientTape() as tape:
      tape.watch(values)
      loss = self._batch_loss(values, x, y, w)
    return loss, tape.gradient(loss, values)

  def _batch_indices(self):
    # A few batches are unrolled (3-8% faster on a small MLP: no loop
    # machinery); many run in an in-graph loop (bounded graph size).
    if self.num_batches <= 4:
      return range(self.num_batches)
    return tf.range(self.num_batches)

  def _build(self):
    strategy = self.strategy
    spec = tf.TensorSpec([self.size], self.dtype)
    sum_op = tf.distribute.ReduceOp.SUM

    def reduce(per_replica):
      return tf.nest.map_structure(
          lambda t: strategy.reduce(sum_op, t, axis=None), per_replica)

    @tf.function(input_signature=[spec])
    def matvec(flat):
      vector = unflatten(flat, self.shapes)
      total = tf.zeros_like(flat)
      for i in self._batch_indices():
        hv = reduce(strategy.run(self._replica_hvp,
                                 args=(self._data, i, vector)))
        total += flatten(hv)
      if self._decay_mask is not None:
        total += self.weight_decay * self._decay_mask * flat
      return total

    @tf.function(input_signature=[spec])
    def loss_and_gradient(flat):
      values = unflatten(flat, self.shapes)
      loss = tf.constant(0.0)
      grad = tf.zeros([self.size], self.dtype)
      for i in self._batch_indices():
        l, g = reduce(strategy.run(self._replica_loss_grad,
                                   args=(self._data, i, values)))
        loss += l
        grad += flatten(g)
      if self._decay_mask is not None:
        loss += 0.5 * self.weight_decay * tf.reduce_sum(
            self._decay_mask * tf.square(flat))
        grad += self.weight_decay * self._decay_mask * flat
      return loss, grad

    self._matvec = matvec
    self._loss_and_gradient = loss_and_gradient

  # -- the operator interface -------------------------------------------------

  def matvec(self, v: tf.Tensor) -> tf.Tensor:
    """H v for a flat vector `v` of length `size`."""
    return self._matvec(tf.convert_to_tensor(v, self.dtype))

  def loss_and_gradient(self, flat=None) -> tuple[float, tf.Tensor]:
    """The mean loss over the set and its flat gradient.

    Args:
      flat: parameter values to evaluate at (default: the model's own). The
        model is not changed: a Keras model is evaluated on tensors; a
        SavedModel's variables are set for the call and restored after it.
    """
    current = self.parameters()
    flat = current if flat is None else tf.convert_to_tensor(flat,
                                                             self.dtype)
    if not isinstance(self.function, _SavedModelFunction):
      loss, grad = self._loss_and_gradient(flat)
      return float(loss), grad
    self._assign(flat)
    try:
      loss, grad = self._loss_and_gradient(flat)
    finally:
      self._assign(current)
    return float(loss), grad

  def _assign(self, flat):
    for var, value in zip(self.params, unflatten(flat, self.shapes)):
      var.assign(value)

  def parameters(self) -> tf.Tensor:
    """The current parameter values, flattened."""
    return flatten([tf.convert_to_tensor(p) for p in self.params])

  def dense(self) -> np.ndarray:
    """The whole Hessian (size x size) by `size` products: tiny models only."""
    eye = np.eye(self.size, dtype=self.dtype.as_numpy_dtype)
    return np.stack([self.matvec(eye[i]).numpy() for i in range(self.size)])

  @property
  def traces(self) -> int:
    """How many times the product function has been traced (tests)."""
    return self._matvec.experimental_get_tracing_count()

  def describe(self) -> dict:
    """What every result records about how it was computed."""
    return {"num_examples": self.num_examples, "bn_mode": self.bn_mode,
            "method": self.method, "num_parameters": self.size,
            "batch_size": self.batch_size,
            "num_replicas": self.strategy.num_replicas_in_sync}
