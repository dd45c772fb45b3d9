"""Fully-connected ResNet with a skip connection at every layer.

The ResNet that Du et al. 2018 analyse (Sec. 4, Theorem 4.1; papers/002 is a
summary of that paper): a first layer h_0 = act(W_0 x), then depth residual
layers h_l = h_{l-1} + residual_scale * act(W_l h_{l-1}), then a linear
output, with the skip around every single layer rather than every two as in
He et al. Deviations:
  * Du et al. draw weights from N(0, 1) and put 1/sqrt(width) factors in the
    forward pass (branch factor c_res / (H sqrt(width))); here the
    initializer (--kernel_init) carries the 1/sqrt(width) scale, as in
    standard practice, and `residual_scale` plays the part of c_res / H
    (1 by default).
  * Optional batch or ghost normalisation sits between each residual Dense and
    its activation (not in Du et al.); those Dense layers then have no bias.
  * Dense layers without a normalisation after them, the output layer
    included, have zero-initialised biases.

`parametrization="ntk"` is Du et al.'s ResNet exactly (papers/README.md):
N(0, 1) weights, no biases, x_1 = sqrt(c_sigma/width) act(W_1 x) (the input
projection), x_h = x_{h-1} + residual_scale/(H sqrt(width)) act(W_h x_{h-1})
for the `depth` residual blocks, with H = depth + 1 (Du et al. count the
first layer), and f = a^T x_H: `residual_scale` is c_res, and a grid over
depth needs no per-depth scale.

Layers: `flatten`, `input_projection` (Dense), `input_projection_act`, then
for block i `hidden_{i}` (Dense), `hidden_{i}_norm`, `hidden_{i}_act`,
`hidden_{i}_scale` (only when residual_scale != 1), `hidden_{i}_add` (the
block's output features), and `classifier` (logits).
"""

from __future__ import annotations

import math

import keras

from tfcapacity.errors import UserError
from tfcapacity.models import layers as layers_lib
from tfcapacity.models import mlp

TINY = dict(width=8, depth=2)


def build(input_shape, num_classes: int, width: int, depth: int,
          activation: str = "relu", kernel_init: str = "glorot_uniform",
          normalization: str = "none", ghost_batch_size: int = 50,
          bn_momentum: float = 0.9, zero_init_classifier: bool = False,
          leaky_slope: float | None = None,
          residual_scale: float = 1.0,
          parametrization: str = "standard") -> keras.Model:
  """Builds the input projection, `depth` residual blocks and the logits.

  Args are those of `mlp.build`, with `depth` counting residual blocks, plus
  `residual_scale`, the factor on every residual branch (c_res under
  `parametrization="ntk"`).

  Returns:
    A functional `keras.Model` named "fc_resnet" mapping inputs to float32
    logits.

  Raises:
    UserError: an option out of range or unknown.
  """
  layers_lib.check_options(
      width=width, depth=depth, activation=activation,
      kernel_init=kernel_init, normalization=normalization,
      ghost_batch_size=ghost_batch_size, bn_momentum=bn_momentum,
      leaky_slope=leaky_slope)
  if not isinstance(residual_scale, (int, float)) or not math.isfinite(
      residual_scale):
    raise UserError(f"--residual_scale must be a finite number; got "
                    f"{residual_scale}")
  inputs = keras.Input(tuple(input_shape), name="inputs")
  h = keras.layers.Flatten(name="flatten")(inputs)
  if mlp.check_parametrization(parametrization, normalization,
                               zero_init_classifier):
    return keras.Model(inputs, _ntk_body(h, num_classes, width, depth,
                                         activation, leaky_slope,
                                         residual_scale), name="fc_resnet")
  # The input projection maps to the residual width; no normalisation there,
  # as in Du et al.'s first layer.
  h = mlp.dense_unit(h, name="input_projection", width=width,
                     activation=activation, kernel_init=kernel_init,
                     normalization="none", ghost_batch_size=ghost_batch_size,
                     bn_momentum=bn_momentum, leaky_slope=leaky_slope)
  for i in range(depth):
    branch = mlp.dense_unit(
        h, name=f"hidden_{i}", width=width, activation=activation,
        kernel_init=kernel_init, normalization=normalization,
        ghost_batch_size=ghost_batch_size, bn_momentum=bn_momentum,
        leaky_slope=leaky_slope)
    if residual_scale != 1.0:
      branch = keras.layers.Rescaling(float(residual_scale),
                                      name=f"hidden_{i}_scale")(branch)
    h = keras.layers.Add(name=f"hidden_{i}_add")([h, branch])
  logits = mlp.classifier(h, num_classes, kernel_init, zero_init_classifier)
  return keras.Model(inputs, logits, name="fc_resnet")


def _ntk_body(h, num_classes, width, depth, activation, leaky_slope,
              residual_scale):
  """Du et al.'s ResNet from the flattened inputs to the output."""
  c = layers_lib.c_sigma(activation, leaky_slope)
  h = mlp.ntk_unit(h, name="input_projection", width=width,
                   activation=activation, leaky_slope=leaky_slope,
                   scale=math.sqrt(c / width))
  branch_scale = residual_scale / ((depth + 1) * math.sqrt(width))
  for i in range(depth):
    branch = mlp.ntk_unit(h, name=f"hidden_{i}", width=width,
                          activation=activation, leaky_slope=leaky_slope,
                          scale=branch_scale)
    h = keras.layers.Add(name=f"hidden_{i}_add")([h, branch])
  return mlp.ntk_output(h, num_classes)
