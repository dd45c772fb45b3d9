"""Training: the loop, optimisers and schedules, callbacks, run directory.

The loop and callbacks import TensorFlow; they load on first use, so light
tools (the sweep runner, reports) can import it without TensorFlow.
"""

import importlib

# Noise added to the gradients a step applies (`dynamics.GradientNoise`).
NOISE_KINDS = ("none", "fixed", "annealed", "empirical")

_LAZY = {"Callback": "callbacks", "Context": "callbacks", "Trainer": "loop",
         "train": "loop"}


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(f"tfcapacity.training.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(name)
