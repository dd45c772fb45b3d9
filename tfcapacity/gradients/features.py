"""A layer's features and their Gram matrix (Du et al. 2019).

Du, Lee, Li, Wang & Zhai, "Gradient descent finds global minima of deep
neural networks", bound the rate of gradient descent by the least eigenvalue
of Gram matrices; the one of the last hidden layer is the kernel of its
features, K_ij = <x_i^(H), x_j^(H)>. `layer_features` reads a layer's output
for given inputs and `statistics.feature_gram` turns it into F F^T / width.

The layer is named as in the model's docstrings (`hidden_3_act`, `block2_add`,
...), or `penultimate`: the input of the `classifier` layer, i.e. the
features the logits are a linear function of, in every registered model.
The model runs in inference mode (moving batch-norm statistics) and is not
changed.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np

from tfcapacity.errors import UserError

PENULTIMATE = "penultimate"

# Built once per (model, layer): a training callback reads the same layer at
# every measurement.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def feature_model(model, layer: str = PENULTIMATE) -> keras.Model:
  """A Keras model from the inputs of `model` to the named layer's output.

  It shares the model's variables and is built once per (model, layer).

  Raises:
    UserError: not a functional Keras model, or no such layer (the message
      lists the layer names).
  """
  if not isinstance(model, keras.Model) or not hasattr(model, "inputs"):
    raise UserError("layer features need a Keras model (a SavedModel does "
                    "not expose its layers); give --keras_model or "
                    "--model_dir")
  built = _CACHE.setdefault(model, {})
  if layer in built:
    return built[layer]
  names = [lay.name for lay in model.layers]
  try:
    if layer == PENULTIMATE:
      output = model.get_layer("classifier").input
    else:
      output = model.get_layer(layer).output
  except ValueError:
    wanted = "a 'classifier' layer" if layer == PENULTIMATE else repr(layer)
    raise UserError(
        f"the model has no {wanted}; name one of its layers: "
        f"{', '.join(names)}") from None
  inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
  built[layer] = keras.Model(inputs, output)
  return built[layer]


def layer_features(model, x, layer: str = PENULTIMATE,
                   batch_size: int = 256) -> np.ndarray:
  """The layer's outputs for inputs `x`, float64 [n, ...] (inference mode)."""
  sub = feature_model(model, layer)
  x = np.asarray(x, np.float32)
  out = [np.asarray(sub(x[i:i + batch_size], training=False), np.float64)
         for i in range(0, len(x), batch_size)]
  return np.concatenate(out)
