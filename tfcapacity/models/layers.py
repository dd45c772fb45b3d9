"""Layers that Keras 3 lacks or that the curvature studies need changed.

`GhostBatchNormalization` is batch norm with statistics from fixed sub-batches
("ghost batches") of `ghost_batch_size` examples. The maxi-batch study (Sec.
2.1 of papers/003) computes batch-norm statistics over a fixed sub-sample of 50
inputs whatever the batch size, which TF1 offered as
`BatchNormalization(virtual_batch_size=...)` and Keras 3 dropped
(keras-team/keras#19063). The paper speaks of centring with statistics of a
fixed sub-sample; we read that as ghost batch norm (mean and variance of each
consecutive sub-batch), which is what TF1's option computed. Like TF1, the
moving statistics move towards the mean over sub-batches of their statistics,
in one update per call rather than one per sub-batch.

`BatchNormalization` is the same layer with one ghost batch spanning the whole
batch. It exists because `keras.layers.BatchNormalization` computes its
variance with `tf.nn.moments`, which puts a `stop_gradient` on the mean inside
the variance. That leaves first derivatives exact (the gradient through that
path is zero) but drops a term from second derivatives: on a 6x3 batch a
nested-tape Hessian-vector product through Keras' layer differed from a finite
difference of gradients by 1.4 (entries of size 9) in float64. Forward-mode
(`ForwardAccumulator`) sees the same `stop_gradient`, so the two HVP methods
agree with each other and are both wrong. Our layers compute the moments
without it; their outputs, gradients and moving statistics equal Keras' layer
on one device. Under MirroredStrategy their moving statistics move towards
the mean of the replicas' statistics, where Keras' layer keeps one replica's.

`AdaptiveLeakyReLU` is a leaky rectifier whose negative-side slope is a
non-trainable scalar weight, so that adaptive linearisation (Sec. 2.5 of
papers/003) can move each layer's slope during training. Slope 0 is ReLU.

`PaddedShortcut` is the parameter-free shortcut of He et al. 2016 (option A):
subsample by the stride and append zero channels.

All are registered for serialisation under the package name "tfcapacity", so
`keras.saving.load_model` reads a `.keras` file without `custom_objects` once
this module is imported (importing `tfcapacity.models` does that).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfcapacity.errors import UserError, choices_error

_PACKAGE = "tfcapacity"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GhostBatchNormalization(keras.layers.Layer):
  """Batch normalisation over fixed sub-batches of `ghost_batch_size` examples.

  The last axis holds the features (channels); statistics are taken over the
  examples of a sub-batch and all other axes. In training each sub-batch is
  normalised by its own mean and (biased) variance; in inference by the moving
  statistics. A layer with `trainable=False` runs in inference mode, as Keras'
  batch norm does.

  The batch must be a multiple of `ghost_batch_size` (per replica under a
  distribution strategy): a UserError when the batch size is static, a failed
  `tf.debugging` assertion when it is only known at run time (XLA compiles the
  assertion away; its reshape then fails with a less direct message).
  Per-example gradients in training mode are not defined for this layer: an
  example's output depends on its sub-batch.
  """

  def __init__(self, ghost_batch_size: int | None, momentum: float = 0.9,
               epsilon: float = 1e-3, center: bool = True, scale: bool = True,
               **kwargs):
    super().__init__(**kwargs)
    if ghost_batch_size is not None and (
        int(ghost_batch_size) != ghost_batch_size or ghost_batch_size <= 0):
      raise UserError(f"--ghost_batch_size must be a positive integer; got "
                      f"{ghost_batch_size}")
    if not 0.0 <= momentum < 1.0:
      raise UserError(f"--bn_momentum must be in [0, 1); got {momentum}")
    self.ghost_batch_size = (None if ghost_batch_size is None
                             else int(ghost_batch_size))
    self.momentum = float(momentum)
    self.epsilon = float(epsilon)
    self.center = bool(center)
    self.scale = bool(scale)

  def build(self, input_shape):
    channels = input_shape[-1]
    if channels is None:
      raise ValueError(f"{self.name}: the last axis must have a known size; "
                       f"got input shape {input_shape}")
    shape = (channels,)
    # Not autocast: under mixed precision the weights stay float32, as in
    # Keras' batch norm.
    self.gamma = (self.add_weight(shape=shape, name="gamma",
                                  initializer="ones", autocast=False)
                  if self.scale else None)
    self.beta = (self.add_weight(shape=shape, name="beta",
                                 initializer="zeros", autocast=False)
                 if self.center else None)
    # Under MirroredStrategy each replica computes its own statistics; with
    # "mean" aggregation the moving statistics move towards their mean over
    # replicas (Keras' batch norm keeps the first replica's).
    self.moving_mean = self.add_weight(
        shape=shape, name="moving_mean", initializer="zeros", trainable=False,
        autocast=False, aggregation="mean")
    self.moving_variance = self.add_weight(
        shape=shape, name="moving_variance", initializer="ones",
        trainable=False, autocast=False, aggregation="mean")

  def compute_output_shape(self, input_shape):
    return input_shape

  def _group(self, x):
    """Reshapes [B, ...] to [B/g, g, ...] (g = B when ghost_batch_size=None)."""
    g = self.ghost_batch_size
    if g is None:
      return tf.expand_dims(x, 0)
    batch = x.shape[0]
    if batch is not None:
      if batch % g:
        raise UserError(
            f"{self.name}: a batch of {batch} examples is not divisible by "
            f"--ghost_batch_size={g}")
    else:
      check = tf.debugging.assert_equal(
          tf.math.floormod(tf.shape(x)[0], g), 0,
          message=(f"{self.name}: the batch size is not divisible by "
                   f"--ghost_batch_size={g}"))
      with tf.control_dependencies([check]):
        x = tf.identity(x)
    # Static feature dimensions where known keep static shapes downstream.
    feature_shape = x.shape[1:]
    if feature_shape.is_fully_defined():
      new_shape = [-1, g] + feature_shape.as_list()
    else:
      new_shape = tf.concat([[-1, g], tf.shape(x)[1:]], axis=0)
    return tf.reshape(x, new_shape)

  def call(self, inputs, training=None):
    # Statistics in float32 at least (float16 ones overflow), float64 when the
    # inputs are (exact checks of second derivatives use float64).
    dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
    x = tf.cast(inputs, dtype)
    gamma = tf.cast(self.gamma.value, dtype) if self.scale else None
    beta = tf.cast(self.beta.value, dtype) if self.center else None
    moving_mean = tf.cast(self.moving_mean.value, dtype)
    moving_variance = tf.cast(self.moving_variance.value, dtype)
    if training and self.trainable and self._fusable(x):
      out, batch_mean, batch_variance = self._fused(x, gamma, beta)
      self._update_moving(moving_mean, moving_variance, batch_mean,
                          batch_variance)
    elif training and self.trainable:
      grouped = self._group(x)
      # Sub-batch statistics over examples and all but the last axis.
      axes = list(range(1, grouped.shape.rank - 1))
      mean = tf.reduce_mean(grouped, axis=axes, keepdims=True)
      # No stop_gradient on `mean` (unlike tf.nn.moments): second
      # derivatives need the variance's dependence on the mean.
      variance = tf.reduce_mean(tf.square(grouped - mean), axis=axes,
                                keepdims=True)
      out = tf.nn.batch_normalization(grouped, mean, variance, beta, gamma,
                                      self.epsilon)
      out = tf.reshape(out, tf.shape(x))
      batch_mean = tf.reshape(tf.reduce_mean(mean, axis=0), [-1])
      batch_variance = tf.reshape(tf.reduce_mean(variance, axis=0), [-1])
      self._update_moving(moving_mean, moving_variance, batch_mean,
                          batch_variance)
    else:
      out = tf.nn.batch_normalization(x, moving_mean, moving_variance, beta,
                                      gamma, self.epsilon)
    return tf.cast(out, self.compute_dtype)

  def _update_moving(self, moving_mean, moving_variance, batch_mean,
                     batch_variance):
    # `assign` inside `stateless_call` is recorded in the returned
    # non-trainable variables instead of changing the layer.
    m = self.momentum
    self.moving_mean.assign(tf.cast(
        moving_mean * m + batch_mean * (1.0 - m), self.moving_mean.dtype))
    self.moving_variance.assign(tf.cast(
        moving_variance * m + batch_variance * (1.0 - m),
        self.moving_variance.dtype))

  def _fusable(self, x) -> bool:
    """Whether training statistics may come from the fused kernel.

    `FusedBatchNormV3` normalises over the whole batch, runs about 1.2x
    faster on ResNet-20 than the explicit ops, and TF registers an exact
    second-order gradient for it (values, gradients, Hessian-vector products
    and moving statistics match the explicit formula, tests/test_models.py).
    It takes float32 NHWC only, so float64 (the exact second-derivative
    checks) and sub-batches smaller than the batch keep the explicit path.
    """
    if x.dtype != tf.float32 or x.shape.rank not in (2, 4):
      return False
    g = self.ghost_batch_size
    return g is None or (x.shape[0] is not None and x.shape[0] == g)

  def _fused(self, x, gamma, beta):
    channels = x.shape[-1]
    x4 = x if x.shape.rank == 4 else tf.reshape(x, [-1, 1, 1, channels])
    gamma = gamma if gamma is not None else tf.ones([channels], x.dtype)
    beta = beta if beta is not None else tf.zeros([channels], x.dtype)
    out, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        x4, gamma, beta, epsilon=self.epsilon, is_training=True)
    # The kernel reports the Bessel-corrected variance; the moving average
    # uses the biased one, like the explicit path and Keras.
    n = tf.cast(tf.size(x4) // channels, x.dtype)
    variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
    return tf.reshape(out, tf.shape(x)), mean, variance

  def get_config(self):
    return {**super().get_config(),
            "ghost_batch_size": self.ghost_batch_size,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BatchNormalization(GhostBatchNormalization):
  """Batch normalisation over the whole batch, with exact second derivatives.

  Equals `keras.layers.BatchNormalization(momentum=..., epsilon=...)` on one
  device in its outputs, moving-statistic updates and gradients; differs in
  Hessians, and in moving statistics under MirroredStrategy (see the module
  docstring).
  """

  def __init__(self, momentum: float = 0.9, epsilon: float = 1e-3,
               center: bool = True, scale: bool = True, **kwargs):
    kwargs.pop("ghost_batch_size", None)
    super().__init__(None, momentum=momentum, epsilon=epsilon, center=center,
                     scale=scale, **kwargs)

  def get_config(self):
    config = super().get_config()
    del config["ghost_batch_size"]
    return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdaptiveLeakyReLU(keras.layers.Layer):
  """y = relu(x) + slope * min(x, 0), `slope` a non-trainable scalar weight.

  The slope is a weight rather than a constant so that it is saved with the
  model, is an input of `stateless_call`, and can be moved during training by
  assigning to `layer.slope` (Sec. 2.5 of papers/003 keeps it in [0, 1]).
  """

  def __init__(self, initial_slope: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= initial_slope <= 1.0:
      raise UserError(f"--leaky_slope must be in [0, 1]; got {initial_slope}")
    self.initial_slope = float(initial_slope)

  def build(self, input_shape):
    del input_shape  # One slope per layer, whatever the input.
    self.slope = self.add_weight(
        shape=(), name="slope",
        initializer=keras.initializers.Constant(self.initial_slope),
        trainable=False, autocast=False)

  def compute_output_shape(self, input_shape):
    return input_shape

  def call(self, inputs):
    slope = tf.cast(self.slope.value, inputs.dtype)
    # The sum form makes slope 0 give relu(x) exactly (relu(x) + 0 * ...).
    return tf.nn.relu(inputs) + slope * tf.minimum(inputs, 0.0)

  def get_config(self):
    return {**super().get_config(), "initial_slope": self.initial_slope}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PaddedShortcut(keras.layers.Layer):
  """He et al.'s option-A shortcut: x[:, ::s, ::s, :] with zero channels added.

  The new channels come after the input's, all zero; no parameters.
  """

  def __init__(self, strides: int, filters: int, **kwargs):
    super().__init__(**kwargs)
    self.strides = int(strides)
    self.filters = int(filters)

  def build(self, input_shape):
    if input_shape[-1] > self.filters:
      raise ValueError(f"{self.name}: cannot shrink {input_shape[-1]} "
                       f"channels to {self.filters}")

  def compute_output_shape(self, input_shape):
    def down(n):
      return None if n is None else -(-n // self.strides)
    return (input_shape[0], down(input_shape[1]), down(input_shape[2]),
            self.filters)

  def call(self, inputs):
    s = self.strides
    x = inputs[:, ::s, ::s, :]
    extra = self.filters - inputs.shape[-1]
    return tf.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]])

  def get_config(self):
    return {**super().get_config(), "strides": self.strides,
            "filters": self.filters}


# -- Walking a model's layers (the one walker every measurement uses) --------


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
  """Every layer of `model`, nested models' layers included, in order.

  A functional model lists its layers in topological order (inputs first),
  and a nested model's layers follow the model itself, so the result is in
  the order a forward pass reaches them: recomputing batch-norm statistics
  layer by layer relies on it.
  """
  out = []
  for layer in model.layers:
    out.append(layer)
    if isinstance(layer, keras.Model):
      out += all_layers(layer)
  return out


def batch_norm_layers(model: keras.Model) -> list[keras.layers.Layer]:
  """The layers with moving statistics (Keras' and tfcapacity's batch norm),
  in forward order."""
  return [layer for layer in all_layers(model)
          if isinstance(layer, (keras.layers.BatchNormalization,
                                GhostBatchNormalization))]


def weighted_layers(model: keras.Model) -> list[str]:
  """Names of the layers that own trainable weights, in forward order."""
  return [layer.name for layer in all_layers(model)
          if layer.trainable_weights and not isinstance(layer, keras.Model)]


def slope_layers(model: keras.Model) -> list[AdaptiveLeakyReLU]:
  """The model's adaptive rectifiers in layer order (for slope updates)."""
  return [layer for layer in all_layers(model)
          if isinstance(layer, AdaptiveLeakyReLU)]


# -- Building blocks shared by the model builders ---------------------------

ACTIVATIONS = ("sigmoid", "relu", "leaky_relu", "tanh", "softplus", "linear")
KERNEL_INITS = ("glorot_uniform", "glorot_sigmoid", "glorot_normal",
                "he_normal", "lecun_normal", "orthogonal")
# Glorot & Bengio (2010) derive U(-r, r), r = sqrt(6 / (fan_in + fan_out)),
# for tanh units; their lab's Theano-era sigmoid nets (the paper's era of
# Dauphin & Bengio 2013) used 4r, the sigmoid's slope at 0 being a quarter
# of tanh's.
# Uniform variance scaling has limit sqrt(3 * scale / fan_avg), so 4r is
# scale 16 with mode fan_avg.
GLOROT_SIGMOID_FACTOR = 4.0
NORMALIZATIONS = ("none", "batch", "ghost")
DEFAULT_LEAKY_SLOPE = 0.01


def check_options(*, width, depth, activation, kernel_init, normalization,
                  ghost_batch_size, bn_momentum, leaky_slope,
                  activations=ACTIVATIONS) -> None:
  """Raises UserError for an option that no model accepts."""
  if activation not in activations:
    raise choices_error("activation", activation, activations)
  if kernel_init not in KERNEL_INITS:
    raise choices_error("kernel_init", kernel_init, KERNEL_INITS)
  if normalization not in NORMALIZATIONS:
    raise choices_error("normalization", normalization, NORMALIZATIONS)
  for name, value in (("width", width), ("depth", depth)):
    if isinstance(value, bool) or int(value) != value or value <= 0:
      raise UserError(f"--{name} must be a positive integer; got {value}")
  if normalization == "ghost" and (
      ghost_batch_size is None or int(ghost_batch_size) != ghost_batch_size
      or ghost_batch_size <= 0):
    raise UserError(f"--ghost_batch_size must be a positive integer for "
                    f"--normalization=ghost; got {ghost_batch_size}")
  if normalization != "none" and not 0.0 <= bn_momentum < 1.0:
    raise UserError(f"--bn_momentum must be in [0, 1); got {bn_momentum}")
  if leaky_slope is not None and not 0.0 <= leaky_slope <= 1.0:
    raise UserError(f"--leaky_slope must be in [0, 1]; got {leaky_slope}")


def kernel_initializer(name: str) -> keras.initializers.Initializer:
  """A fresh initializer per layer.

  Unseeded Keras initializers draw their seed from Python's `random` when
  constructed, which `keras.utils.set_random_seed` seeds: building the same
  model after the same seed gives the same weights. One instance shared by
  several layers would give them all the same values, hence one per layer.

  `glorot_sigmoid` is Glorot uniform with its limit multiplied by
  `GLOROT_SIGMOID_FACTOR`: U(-4 sqrt(6 / (fan_in + fan_out)), +4 sqrt(...)).
  """
  if name == "glorot_sigmoid":
    return keras.initializers.VarianceScaling(
        scale=GLOROT_SIGMOID_FACTOR ** 2, mode="fan_avg",
        distribution="uniform")
  return keras.initializers.get(name)


def norm_layer(normalization: str, *, ghost_batch_size: int,
               bn_momentum: float, name: str) -> keras.layers.Layer | None:
  """The normalisation layer for `normalization` ('none' gives None)."""
  if normalization == "batch":
    return BatchNormalization(momentum=bn_momentum, name=name)
  if normalization == "ghost":
    return GhostBatchNormalization(ghost_batch_size, momentum=bn_momentum,
                                   name=name)
  return None


def activation_layer(activation: str, *, leaky_slope: float | None,
                     name: str) -> keras.layers.Layer:
  """A Keras activation layer, or an AdaptiveLeakyReLU for leaky_relu."""
  if activation == "leaky_relu":
    slope = DEFAULT_LEAKY_SLOPE if leaky_slope is None else leaky_slope
    return AdaptiveLeakyReLU(slope, name=name)
  if leaky_slope is not None:
    raise UserError(f"--leaky_slope applies to --activation=leaky_relu only; "
                    f"got --activation={activation}")
  return keras.layers.Activation(activation, name=name)


# --- Du et al.'s parametrisation (--parametrization=ntk) --------------------


def _activation_fn(activation: str):
  """The activation as a numpy function, for `c_sigma`."""
  from scipy import special  # pylint: disable=g-import-not-at-top
  fns = {"relu": lambda z: np.maximum(z, 0.0),
         "leaky_relu": lambda z: np.where(z > 0, z, DEFAULT_LEAKY_SLOPE * z),
         "sigmoid": special.expit,
         "tanh": np.tanh,
         "softplus": lambda z: np.logaddexp(0.0, z),
         "linear": lambda z: z}
  if activation not in fns:
    raise choices_error("activation", activation, ACTIVATIONS)
  return fns[activation]


def c_sigma(activation: str, leaky_slope: float | None = None) -> float:
  """c_sigma = 1 / E_{z ~ N(0, 1)}[act(z)^2], by numerical quadrature.

  Du et al.'s constant: with it, x_h = sqrt(c_sigma/m) act(W_h x_{h-1})
  keeps ||x_h|| near 1 at initialisation when W_h has N(0, 1) entries and
  ||x_{h-1}|| = 1. ReLU gives 2 and the identity 1; softplus about 1.45.
  The integral is split at 0, where ReLU-like functions have their kink.
  """
  from scipy import integrate  # pylint: disable=g-import-not-at-top
  fn = _activation_fn(activation)
  if activation == "leaky_relu" and leaky_slope is not None:
    fn = lambda z: np.where(z > 0, z, leaky_slope * z)  # noqa: E731
  density = lambda z: np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)  # noqa: E731
  second_moment = sum(
      integrate.quad(lambda z: float(fn(z)) ** 2 * density(z), a, b,
                     epsabs=1e-13, epsrel=1e-12)[0]
      for a, b in ((-np.inf, 0.0), (0.0, np.inf)))
  return 1.0 / second_moment


def ntk_dense(units: int, name: str, dtype=None) -> keras.layers.Dense:
  """A Dense layer of Du et al.: N(0, 1) weights, no bias."""
  return keras.layers.Dense(
      units, use_bias=False,
      kernel_initializer=keras.initializers.RandomNormal(0.0, 1.0),
      dtype=dtype, name=name)


def check_ntk_options(*, normalization: str, zero_init_classifier: bool
                      ) -> None:
  """Raises UserError for options Du et al.'s parametrisation cannot have."""
  if normalization != "none":
    raise UserError(f"--parametrization=ntk has no batch norm; use "
                    f"--normalization=none (got {normalization})")
  if zero_init_classifier:
    raise UserError("--parametrization=ntk draws the output weights from "
                    "N(0, 1); drop --zero_init_classifier")
