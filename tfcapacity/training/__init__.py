"""Training: the loop, optimisers and schedules, callbacks and step hooks.

  * `loop`: `Trainer` and `train`, the multi-step training loop;
  * `optim`: optimisers and learning-rate schedules;
  * `callbacks`: `Callback` and `Context`, the interface of measurements
    run between steps;
  * `hooks`: `StepHook`, the interface of what runs inside every step;
  * `dynamics`: the maxi-batch study's step hooks (distance travelled,
    gradient noise, recorded gradient variance).

Training knows no measurement: `tfcapacity.measurements` maps measurement
flags to callbacks and trains with them. The run directory is
`tfcapacity.rundir`. The loop, callbacks and hooks import TensorFlow; they
load on first use, so light tools (the sweep runner, reports) can import
this package without TensorFlow.
"""

import importlib

# Noise added to the gradients a step applies (`dynamics.GradientNoise`).
NOISE_KINDS = ("none", "fixed", "annealed", "empirical")
# Where the step size comes from: --learning_rate, or the NTK Gram matrix at
# initialisation (--learning_rate_from).
LEARNING_RATE_SOURCES = ("flag", "gram")
# The variables that get it: convolution and dense kernels, or all.
NOISE_SCOPES = ("conv", "all")

_LAZY = {"Callback": "callbacks", "Context": "callbacks", "StepHook": "hooks",
         "Trainer": "loop", "train": "loop"}


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(f"tfcapacity.training.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(name)
