"""The loss landscape: lines between minimisers, planes around one.

`surface` holds the computations (it loads TensorFlow); they are reached as
`landscape.<name>` on first use, so that flag definitions can read
`BN_STATS` without loading TensorFlow.
"""

import importlib

# Batch-norm statistics at each point of a line or plane: recomputed on the
# training examples, interpolated like the weights (lines), or the centre's
# (planes).
BN_STATS = ("recompute", "interpolate", "keep")


def __getattr__(name):
  module = importlib.import_module("tfcapacity.landscape.surface")
  try:
    return getattr(module, name)
  except AttributeError:
    raise AttributeError(name) from None
