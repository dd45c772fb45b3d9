"""The model as a pure function of its weights, and its batch-norm policy.

A measurement differentiates logits(params, x) with respect to some of the
model's variables (`select_params`) and must never change the model:

  * a Keras model is evaluated with `model.stateless_call` on tensors that
    stand in for its variables (`KerasFunction`); the moving-statistics
    updates it returns are dropped. Calling the model with `training=True`
    inside a Hessian-vector product would update them on every call
    (TF_NOTES: "a 100-step Lanczos run silently changes the model");
  * a SavedModel (`tf_saved_model` export with a `serve` signature) runs in
    inference mode; its variables cannot be replaced by tensors, so
    derivatives are taken with respect to the variables themselves
    (`SavedModelFunction`).

The batch-norm policy is explicit and recorded with every result
(`objective.BN_MODES`):
  * `inference`: the moving statistics, the loss a model is judged by;
  * `batch`: the statistics of each batch (per replica under a strategy),
    the loss a training step sees; ghost layers use whole batches;
  * `ghost`: statistics over fixed sub-batches of `ghost_batch_size`.
Dropout and noise layers are off in every mode. Keras' own
`BatchNormalization` stops the gradient of the mean inside its variance,
which drops a second-order term in training mode (tfcapacity/models/
layers.py), so `batch` mode warns on it and `ghost` mode refuses it.

`recompute_batch_norm` sets every batch-norm layer's moving statistics to
the exact statistics of its inputs over given examples, layer by layer from
the input, so that inference mode then computes what one training-mode batch
of all those examples computes (plain batch norm).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfcapacity import objective as names
from tfcapacity.errors import UserError, choices_error
from tfcapacity.models import layers as layers_lib

_DROPOUT_TYPES = (keras.layers.Dropout, keras.layers.SpatialDropout1D,
                  keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
                  keras.layers.AlphaDropout, keras.layers.GaussianDropout)


def flatten(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """The tensors' entries as one vector, in order."""
  return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(flat: tf.Tensor, shapes: Sequence[tf.TensorShape]
              ) -> list[tf.Tensor]:
  """The inverse of `flatten` for tensors of `shapes`."""
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
  every = layers_lib.all_layers(model)
  if layers is None:
    chosen = list(model.trainable_variables)
    picked_layers = every
  else:
    layer_names = [layer.name for layer in every]
    picked_layers = []
    for name in layers:
      match = [l for l in every if l.name == name or
               l.name.startswith(name + "_")]
      if not match:
        raise UserError(f"no layer named {name!r} (or starting with "
                        f"'{name}_'); layers: {', '.join(layer_names[:20])}"
                        + (" ..." if len(layer_names) > 20 else ""))
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


# --- The batch-norm policy ----------------------------------------------------


@contextlib.contextmanager
def bn_policy(model, bn_mode: str, ghost_batch_size: int | None):
  """Sets ghost sizes and turns dropout off while a function is traced."""
  saved = []
  try:
    for layer in layers_lib.all_layers(model):
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
  if bn_mode not in names.BN_MODES:
    raise choices_error("--bn_mode", bn_mode, names.BN_MODES)
  if bn_mode == "inference":
    return None
  norms = layers_lib.batch_norm_layers(model)
  keras_bn = [l.name for l in norms
              if isinstance(l, keras.layers.BatchNormalization)]
  ours = [l for l in norms
          if isinstance(l, layers_lib.GhostBatchNormalization)]
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


def recompute_batch_norm(model, x: np.ndarray,
                         batch_size: int = names.MAX_BATCH_SIZE,
                         moments=None) -> int:
  """Sets each batch norm's moving statistics to those of its inputs on `x`.

  Layer by layer from the input, each batch-norm layer's moving mean and
  moving variance become the exact mean and biased variance (divided by the
  count) of that layer's inputs over all of `x`, per channel (over examples
  and every other axis), computed with the layers below in inference mode on
  their already recomputed statistics. By induction the model in inference
  mode then computes on `x` what it computes in training mode on one batch
  holding all of `x` (plain batch norm; ghost batch norm would use sub-batch
  statistics instead). Statistics are accumulated batch by batch and
  combined in float64 with Chan et al.'s pairwise update, so `x` may be
  larger than a batch.

  Args:
    model: a Keras model (changed: its moving statistics are assigned).
    x: the examples.
    batch_size: examples per forward pass.
    moments: optional list of traced per-layer moment functions from
      `batch_norm_moments(model)` (reused across calls to avoid retracing).

  Returns:
    The number of batch-norm layers set.
  """
  norms = layers_lib.batch_norm_layers(model)
  if moments is None:
    moments = batch_norm_moments(model)
  x = np.asarray(x, np.float32)
  for layer, fn in zip(norms, moments):
    count, mean, m2 = 0.0, 0.0, 0.0
    for start in range(0, len(x), batch_size):
      n_b, mean_b, m2_b = (np.asarray(t, np.float64) for t in
                           fn(x[start:start + batch_size]))
      total = count + n_b
      delta = mean_b - mean
      mean = mean + delta * (n_b / total)
      m2 = m2 + m2_b + delta * delta * (count * n_b / total)
      count = total
    layer.moving_mean.assign(np.asarray(mean, np.float32))
    layer.moving_variance.assign(np.asarray(m2 / count, np.float32))
  return len(norms)


def batch_norm_moments(model) -> list:
  """Per batch-norm layer, a traced x -> (count, mean, sum of squared
  deviations) of that layer's inputs, the model below in inference mode."""
  x_spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
  out = []
  for layer in layers_lib.batch_norm_layers(model):
    below = keras.Model(model.inputs, layer.input)

    @tf.function(input_signature=[x_spec])
    def moments(x, below=below):
      h = tf.cast(below(x, training=False), tf.float32)
      h = tf.reshape(h, [-1, h.shape[-1]])
      mean = tf.reduce_mean(h, axis=0)
      return (tf.cast(tf.shape(h)[0], tf.float32), mean,
              tf.reduce_sum(tf.square(h - mean), axis=0))

    out.append(moments)
  return out


# --- The model as a function of its weights ---------------------------------


class ModelFunction:
  """logits(values, x): a model's logits at given parameter values.

  Attributes:
    params: the variables whose values `values()` returns, in order.
    bn_mode: the batch-norm policy the logits are computed under.
  """

  params: list
  bn_mode: str = "inference"

  def values(self) -> list:
    """The parameters' current values (tensors, or the variables)."""
    raise NotImplementedError

  def logits(self, values, x):
    raise NotImplementedError

  @property
  def replaces_values(self) -> bool:
    """Whether `logits` reads `values` (else it reads the variables)."""
    return True


class KerasFunction(ModelFunction):
  """logits(params, x) of a Keras model, via `stateless_call`."""

  def __init__(self, model, params, bn_mode: str = "inference",
               ghost_batch_size: int | None = None):
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
    with bn_policy(self.model, self.bn_mode, self.ghost_batch_size):
      logits, _ = self.model.stateless_call(
          trainable, non_trainable, x, training=self.bn_mode != "inference")
    return logits  # The moving-statistics updates are dropped.


class SavedModelFunction(ModelFunction):
  """logits(params, x) of a restored SavedModel's `serve`, inference mode.

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

  @property
  def replaces_values(self) -> bool:
    return False


def is_keras(model) -> bool:
  return isinstance(model, keras.Model)


def model_function(model, params=None, bn_mode: str = "inference",
                   ghost_batch_size: int | None = None) -> ModelFunction:
  """The `ModelFunction` of a Keras model or a restored SavedModel.

  Raises:
    UserError: a SavedModel with a batch-norm mode other than inference, or
      an object that is neither.
  """
  if is_keras(model):
    return KerasFunction(
        model, params if params is not None else model.trainable_variables,
        bn_mode, ghost_batch_size)
  if not hasattr(model, "serve"):
    raise UserError("need a Keras model or a SavedModel with a 'serve' "
                    "function")
  if bn_mode != "inference":
    raise UserError(f"--bn_mode={bn_mode} needs a Keras model; a "
                    f"SavedModel's serve function runs in inference mode")
  return SavedModelFunction(model, params)
