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
"""

from __future__ import annotations

import keras

from tfcapacity.models import layers as layers_lib

TINY = dict(width=8, depth=2)


def build(input_shape, num_classes: int, width: int, depth: int,
          activation: str = "relu", kernel_init: str = "glorot_uniform",
          normalization: str = "none", ghost_batch_size: int = 50,
          bn_momentum: float = 0.9, zero_init_classifier: bool = False,
          leaky_slope: float | None = None) -> keras.Model:
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
