"""Fully-connected networks (multilayer perceptrons).

The capacity study (Dauphin & Bengio 2013, papers/000, Sec. 2) trains a
one-hidden-layer sigmoid network whose hidden layer has a Glorot
initialisation and whose classifier weights and all biases start at zero:
`build(..., depth=1, activation="sigmoid", kernel_init="glorot_uniform",
zero_init_classifier=True)`. The gradient-confusion study (papers/001) varies
width, depth, activation and initialisation (including orthogonal) of the same
family.

Layers, for picking features later: `flatten`, then for hidden layer i
`hidden_{i}` (Dense), `hidden_{i}_norm` (if any), `hidden_{i}_act` (the
layer's features), and `classifier` (logits; the model has no softmax, the
loss applies it). Dense layers before a normalisation have no bias: the
normalisation subtracts it again, so its gradient would be identically zero.

`parametrization="ntk"` is Du et al.'s network (papers/README.md, "Du et
al.: the definitions"): every weight N(0, 1), no biases, and each hidden
layer x_h = sqrt(c_sigma/width) act(W_h x_{h-1}), its scale a Rescaling
layer `hidden_{i}_scale` after `hidden_{i}_act`; the output is a^T x_H.
"""

from __future__ import annotations

import math

import keras

from tfcapacity import config
from tfcapacity.errors import choices_error
from tfcapacity.models import layers as layers_lib

PARAMETRIZATIONS = config.PARAMETRIZATIONS

TINY = dict(width=8, depth=2)


def build(input_shape, num_classes: int, width: int, depth: int,
          activation: str = "relu", kernel_init: str = "glorot_uniform",
          normalization: str = "none", ghost_batch_size: int = 50,
          bn_momentum: float = 0.9, zero_init_classifier: bool = False,
          leaky_slope: float | None = None,
          parametrization: str = "standard") -> keras.Model:
  """Builds Flatten -> depth x [Dense -> norm -> activation] -> Dense logits.

  Args:
    input_shape: shape of one example (flattened first).
    num_classes: number of logits.
    width: units per hidden layer.
    depth: number of hidden layers.
    activation: one of `layers.ACTIVATIONS`; leaky_relu is an
      `AdaptiveLeakyReLU` with initial slope `leaky_slope` (default 0.01).
    kernel_init: initializer of every kernel, one of `layers.KERNEL_INITS`.
    normalization: none | batch | ghost (after each hidden Dense).
    ghost_batch_size: sub-batch size of ghost normalisation.
    bn_momentum: momentum of the moving statistics.
    zero_init_classifier: start the classifier kernel at zero (biases always
      start at zero).
    leaky_slope: initial slope of leaky_relu; an error for other activations.
    parametrization: standard, or ntk (Du et al.; `kernel_init` unused).

  Returns:
    A functional `keras.Model` named "mlp" mapping inputs to float32 logits.

  Raises:
    UserError: an option out of range or unknown.
  """
  layers_lib.check_options(
      width=width, depth=depth, activation=activation,
      kernel_init=kernel_init, normalization=normalization,
      ghost_batch_size=ghost_batch_size, bn_momentum=bn_momentum,
      leaky_slope=leaky_slope)
  inputs = keras.Input(tuple(input_shape), name="inputs")
  h = keras.layers.Flatten(name="flatten")(inputs)
  if check_parametrization(parametrization, normalization,
                           zero_init_classifier):
    scale = math.sqrt(layers_lib.c_sigma(activation, leaky_slope) / width)
    for i in range(depth):
      h = ntk_unit(h, name=f"hidden_{i}", width=width, activation=activation,
                   leaky_slope=leaky_slope, scale=scale)
    return keras.Model(inputs, ntk_output(h, num_classes), name="mlp")
  for i in range(depth):
    h = dense_unit(h, name=f"hidden_{i}", width=width, activation=activation,
                   kernel_init=kernel_init, normalization=normalization,
                   ghost_batch_size=ghost_batch_size, bn_momentum=bn_momentum,
                   leaky_slope=leaky_slope)
  logits = classifier(h, num_classes, kernel_init, zero_init_classifier)
  return keras.Model(inputs, logits, name="mlp")


def dense_unit(h, *, name: str, width: int, activation: str, kernel_init: str,
               normalization: str, ghost_batch_size: int, bn_momentum: float,
               leaky_slope: float | None):
  """Dense(width) -> optional normalisation -> activation, named `name*`."""
  norm = layers_lib.norm_layer(normalization,
                               ghost_batch_size=ghost_batch_size,
                               bn_momentum=bn_momentum, name=f"{name}_norm")
  h = keras.layers.Dense(
      width, use_bias=norm is None,
      kernel_initializer=layers_lib.kernel_initializer(kernel_init),
      bias_initializer="zeros", name=name)(h)
  if norm is not None:
    h = norm(h)
  return layers_lib.activation_layer(activation, leaky_slope=leaky_slope,
                                     name=f"{name}_act")(h)


def check_parametrization(parametrization: str, normalization: str,
                          zero_init_classifier: bool) -> bool:
  """True for Du et al.'s parametrisation; UserError for an unknown one or
  options it cannot have."""
  if parametrization not in PARAMETRIZATIONS:
    raise choices_error("parametrization", parametrization, PARAMETRIZATIONS)
  if parametrization == "standard":
    return False
  layers_lib.check_ntk_options(normalization=normalization,
                               zero_init_classifier=zero_init_classifier)
  return True


def ntk_unit(h, *, name: str, width: int, activation: str,
             leaky_slope: float | None, scale: float):
  """scale * act(W h) with W ~ N(0, 1) and no bias, named `name*`."""
  h = layers_lib.ntk_dense(width, name)(h)
  h = layers_lib.activation_layer(activation, leaky_slope=leaky_slope,
                                  name=f"{name}_act")(h)
  return keras.layers.Rescaling(scale, name=f"{name}_scale")(h)


def ntk_output(h, num_classes: int):
  """f = a^T h with a ~ N(0, 1), in the policy's variable dtype."""
  return layers_lib.ntk_dense(
      num_classes, "classifier",
      dtype=keras.config.dtype_policy().variable_dtype)(h)


def classifier(h, num_classes: int, kernel_init: str,
               zero_init_classifier: bool):
  """The logits layer.

  It computes in the policy's variable dtype: float32 logits under the
  float32 and mixed-precision policies, float64 under a float64 policy.
  """
  init = ("zeros" if zero_init_classifier
          else layers_lib.kernel_initializer(kernel_init))
  return keras.layers.Dense(
      num_classes, kernel_initializer=init, bias_initializer="zeros",
      dtype=keras.config.dtype_policy().variable_dtype, name="classifier")(h)
