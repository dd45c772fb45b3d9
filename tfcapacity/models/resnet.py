"""CIFAR ResNet-(6n+2) of He et al. 2016, Sec. 4.2 ("Deep residual learning").

The maxi-batch study (papers/003) trains ResNet-32 on CIFAR-10; the same
builder gives ResNet-20, -44, -56, ... A 3x3 convolution with `width` filters
(16 in the paper), three stages of n basic blocks (two 3x3 convolutions each)
with width, 2*width and 4*width filters on feature maps of 32, 16 and 8
pixels, global average pooling and a dense classifier: 6n+2 weighted layers.
The first block of stages 2 and 3 halves the feature map with stride 2; its
shortcut subsamples and appends zero channels (option A), so shortcuts add no
parameters: ResNet-20 has 269,722 trainable parameters and ResNet-32 464,154
(the paper's 0.27M and 0.46M).

Every rectifier is its own `AdaptiveLeakyReLU` (slope 0 = ReLU by default),
so adaptive linearisation (papers/003, Sec. 2.5) can move each one's slope.
Normalisation is batch norm as in the paper, ghost batch norm (papers/003,
Sec. 2.1), or none; convolutions have biases only without normalisation.

Deviations: the builder's default initializer is he_normal as in the paper,
but `from_config` passes --kernel_init, whose default is glorot_uniform; set
--kernel_init=he_normal to follow He et al. Batch norm uses momentum
--bn_momentum and epsilon 1e-3 (Keras' default). Any image size works (8x8
digits give feature maps of 8, 4 and 2 pixels).

Layers: `stem_conv`, `stem_norm`, `stem_act`; for stage s in 1..3 and block b
in 1..n, `stage{s}_block{b}_conv1`, `_norm1`, `_act1`, `_conv2`, `_norm2`,
`_shortcut` (only where the shape changes), `_add`, `_act2` (the block's
output features); `pool`; `classifier` (logits).
"""

from __future__ import annotations

import keras

from tfcapacity.errors import UserError
from tfcapacity.models import layers as layers_lib
from tfcapacity.models import mlp

TINY = dict(width=4, depth=8)

# Rectifier networks only: every nonlinearity is an AdaptiveLeakyReLU.
RESNET_ACTIVATIONS = ("relu", "leaky_relu")


def build(input_shape, num_classes: int, width: int = 16, depth: int = 32,
          activation: str = "relu", kernel_init: str = "he_normal",
          normalization: str = "batch", ghost_batch_size: int = 50,
          bn_momentum: float = 0.9, zero_init_classifier: bool = False,
          leaky_slope: float | None = None) -> keras.Model:
  """Builds ResNet-`depth` (depth = 6n+2) with `width` base filters.

  Args:
    input_shape: (height, width, channels) of one image.
    num_classes: number of logits.
    width: filters of the first convolution and stage 1 (16 in the paper).
    depth: weighted layers, 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...).
    activation: relu or leaky_relu; both are AdaptiveLeakyReLU layers.
    kernel_init: initializer of every kernel, one of `layers.KERNEL_INITS`.
    normalization: none | batch | ghost, after every convolution.
    ghost_batch_size: sub-batch size of ghost normalisation.
    bn_momentum: momentum of the moving statistics.
    zero_init_classifier: start the classifier kernel at zero.
    leaky_slope: initial slope of every rectifier, in [0, 1]; default 0
      for relu and 0.01 for leaky_relu.

  Returns:
    A functional `keras.Model` named "resnet{depth}" mapping images to
    float32 logits.

  Raises:
    UserError: an option out of range or unknown, or a non-image input shape.
  """
  layers_lib.check_options(
      width=width, depth=depth, activation=activation,
      kernel_init=kernel_init, normalization=normalization,
      ghost_batch_size=ghost_batch_size, bn_momentum=bn_momentum,
      leaky_slope=leaky_slope, activations=RESNET_ACTIVATIONS)
  if (depth - 2) % 6:
    raise UserError(f"--depth={depth} is not 6n+2; use 20, 32, 56, ...")
  if depth < 8:
    raise UserError(f"--depth={depth} leaves no residual blocks; use 20, 32, "
                    f"56, ...")
  if len(input_shape) != 3:
    raise UserError(
        f"resnet needs image inputs (height, width, channels); got input "
        f"shape {tuple(input_shape)} (for digits use --input_format=image)")
  if leaky_slope is None:
    leaky_slope = (layers_lib.DEFAULT_LEAKY_SLOPE
                   if activation == "leaky_relu" else 0.0)
  blocks_per_stage = (depth - 2) // 6

  def conv(h, filters, strides, name):
    return keras.layers.Conv2D(
        filters, 3, strides=strides, padding="same",
        use_bias=normalization == "none",
        kernel_initializer=layers_lib.kernel_initializer(kernel_init),
        bias_initializer="zeros", name=name)(h)

  def norm(h, name):
    layer = layers_lib.norm_layer(normalization,
                                  ghost_batch_size=ghost_batch_size,
                                  bn_momentum=bn_momentum, name=name)
    return h if layer is None else layer(h)

  def act(h, name):
    return layers_lib.AdaptiveLeakyReLU(leaky_slope, name=name)(h)

  inputs = keras.Input(tuple(input_shape), name="inputs")
  h = act(norm(conv(inputs, width, 1, "stem_conv"), "stem_norm"), "stem_act")
  for stage in range(1, 4):
    filters = width * 2 ** (stage - 1)
    for block in range(1, blocks_per_stage + 1):
      name = f"stage{stage}_block{block}"
      strides = 2 if stage > 1 and block == 1 else 1
      shortcut = h
      if strides != 1 or h.shape[-1] != filters:
        shortcut = layers_lib.PaddedShortcut(strides, filters,
                                             name=f"{name}_shortcut")(h)
      r = act(norm(conv(h, filters, strides, f"{name}_conv1"),
                   f"{name}_norm1"), f"{name}_act1")
      r = norm(conv(r, filters, 1, f"{name}_conv2"), f"{name}_norm2")
      h = keras.layers.Add(name=f"{name}_add")([shortcut, r])
      h = act(h, f"{name}_act2")
  h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
  logits = mlp.classifier(h, num_classes, kernel_init, zero_init_classifier)
  return keras.Model(inputs, logits, name=f"resnet{depth}")
