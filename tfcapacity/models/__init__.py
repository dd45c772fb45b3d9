"""Model registry: one builder per family, selected by --model.

A registry is a dict plus `get()`, after init2winit's `model_lib/models.py`.
Every builder takes `input_shape` and `num_classes` plus its own keyword
options and returns a functional `keras.Model` from `keras.Input(input_shape)`
to float32 logits (no softmax). Each family's module also has `TINY`, small
options for tests.

Importing this package registers the custom layers of `layers`, which
`keras.saving.load_model` needs to read our `.keras` files.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from typing import Callable

import keras

from tfcapacity.errors import UserError, choices_error
from tfcapacity.models import fc_resnet
from tfcapacity.models import layers
from tfcapacity.models import mlp
from tfcapacity.models import resnet

_MODULES = {"mlp": mlp, "fc_resnet": fc_resnet, "resnet": resnet}
_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    name: module.build for name, module in _MODULES.items()}

# The flags each model reads, by the builder keyword of the same name.
_COMMON_FLAGS = ("width", "depth", "activation", "kernel_init",
                 "normalization", "ghost_batch_size", "bn_momentum",
                 "zero_init_classifier", "leaky_slope")
_FLAGS = {"mlp": _COMMON_FLAGS + ("parametrization",),
          "fc_resnet": _COMMON_FLAGS + ("residual_scale", "parametrization"),
          "resnet": _COMMON_FLAGS}


def names() -> list[str]:
  """The registered model names, sorted."""
  return sorted(_BUILDERS)


def tiny_kwargs(name: str) -> dict:
  """A copy of the small options the model's tests use."""
  _check_name(name)
  return dict(_MODULES[name].TINY)


def get(name: str, *, input_shape, num_classes: int,
        **kwargs) -> keras.Model:
  """Builds the registered model `name` with options `kwargs`.

  Raises:
    UserError: an unknown model name or option, or a bad option value.
  """
  _check_name(name)
  builder = _BUILDERS[name]
  options = [p for p in inspect.signature(builder).parameters
             if p not in ("input_shape", "num_classes")]
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise UserError(f"model {name!r} has no option {unknown[0]!r}; its "
                    f"options are: {', '.join(options)}")
  input_shape = tuple(input_shape)
  if not input_shape or not all(
      isinstance(d, numbers.Integral) and d > 0 for d in input_shape):
    raise UserError(f"input shape must be positive integers; got "
                    f"{input_shape}")
  input_shape = tuple(int(d) for d in input_shape)
  if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
    raise UserError(f"num_classes must be a positive integer; got "
                    f"{num_classes}")
  return builder(input_shape, int(num_classes), **kwargs)


def from_config(cfg, input_shape, num_classes: int) -> keras.Model:
  """Builds the model that the flags in `cfg` (a `config.Config`) describe.

  Call `keras.utils.set_random_seed(seed)` first for a reproducible
  initialisation.
  """
  _check_name(cfg.model)
  kwargs = {flag: getattr(cfg, flag) for flag in _FLAGS[cfg.model]}
  parametrization = getattr(cfg, "parametrization", "standard")
  dtype = getattr(cfg, "dtype", "float32")
  for flag, value, default in (("parametrization", parametrization,
                                "standard"), ("dtype", dtype, "float32")):
    if value != default and cfg.model not in ("mlp", "fc_resnet"):
      raise UserError(f"--{flag}={value} applies to mlp and fc_resnet; use "
                      f"--{flag}={default} with --model={cfg.model}")
  with dtype_policy(dtype):
    return get(cfg.model, input_shape=input_shape, num_classes=num_classes,
               **kwargs)


def forward_flops(model: keras.Model) -> int:
  """FLOPs of one example's forward pass through the Dense and Conv2D
  layers (2 per multiply-add; normalisation, activations and pooling are
  not counted)."""
  total = 0
  for layer in layers.all_layers(model):
    if isinstance(layer, keras.layers.Dense):
      total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    elif isinstance(layer, keras.layers.Conv2D):
      kh, kw, cin, cout = layer.kernel.shape
      _, h, w, _ = layer.output.shape
      total += 2 * kh * kw * cin * cout * h * w
  return int(total)


@contextlib.contextmanager
def dtype_policy(dtype: str):
  """Keras' global dtype policy set to `dtype` inside, restored after.

  Layers take the policy when they are constructed: a model built inside
  keeps `dtype` weights and computation; the optimizer's slots follow its
  variables.
  """
  previous = keras.config.dtype_policy()
  if previous.name == dtype:
    yield
    return
  keras.config.set_dtype_policy(dtype)
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


def _check_name(name: str) -> None:
  if name not in _BUILDERS:
    raise choices_error("model", name, names())


__all__ = ["get", "names", "from_config", "tiny_kwargs", "layers", "mlp",
           "fc_resnet", "resnet"]
