"""The loss of a model over examples, written once.

Every measurement in tfcapacity is a function of the weights: the mean loss
of a model over some examples. This package owns that idea:

  * `losses`: the per-example losses by name (`cross_entropy`, `squared`),
    top-k correctness and the L2 penalty;
  * `function`: the model as a pure function of its weights (a Keras
    model's `stateless_call`, or a SavedModel's `serve`), the parameter
    blocks, the batch-norm policy and the recomputation of its statistics;
  * `examples`: fixed examples, validated, padded with zero-weight rows,
    held on the device, sliced over replicas and chunked;
  * `objective`: `Objective`, which gives the value, gradient, Hessian-vector
    product and metrics of the mean loss at given weights.

Curvature, per-example gradients, the loss landscape and the training loop's
evaluation are written over it. The names below load no TensorFlow, so flag
definitions can offer them as choices.
"""

import importlib

# The per-example losses (`losses.LOSSES` maps each name to its function).
LOSSES = ("cross_entropy", "squared")
# Batch-norm statistics inside a measured loss: the moving statistics, those
# of each batch, or those of fixed sub-batches ("ghost" batches).
BN_MODES = ("inference", "batch", "ghost")
# `auto` follows the run: the mode its training steps use (`training_bn_mode`).
BN_MODE_CHOICES = ("auto", *BN_MODES)
# Examples per batch of a measured loss when none is named: the whole set in
# one batch up to this many (memory; m = 500 in papers/003), else several.
MAX_BATCH_SIZE = 500
# Hessian-vector products: nested tapes, or forward-over-reverse.
HVP_METHODS = ("reverse", "forward")



def training_bn_mode(normalization: str | None) -> str:
  """The batch-norm mode a run's training steps use (what `auto` means).

  `--normalization=batch` trains on the statistics of each batch, `ghost`
  on those of its ghost sub-batches; without batch norm (or with no run to
  follow, `None`) the mode is `inference`, which then changes nothing.
  """
  return {"batch": "batch", "ghost": "ghost"}.get(normalization or "",
                                                  "inference")


def resolve_bn_mode(bn_mode: str, normalization: str | None) -> str:
  """`bn_mode`, with `auto` replaced by `training_bn_mode(normalization)`."""
  return training_bn_mode(normalization) if bn_mode == "auto" else bn_mode


def measurement_batch_size(num_examples: int, bn_mode: str,
                           train_batch: int | None) -> int:
  """Examples per batch of a measured loss when none is named.

  Inference mode: all the examples in one batch, up to `MAX_BATCH_SIZE`.
  Batch/ghost mode follows the optimiser: the run's global training batch
  `train_batch` when it divides `num_examples` (the loss is then the mean
  over training-sized batches, each with its own statistics); otherwise
  (no run, a training batch larger than the set, or no divisor) the same
  as inference mode. The curvature callback and the analysis tools both
  use this rule, so they measure the same loss.
  """
  size = min(num_examples, MAX_BATCH_SIZE)
  if bn_mode != "inference" and train_batch and (
      train_batch <= num_examples and num_examples % train_batch == 0):
    size = train_batch
  return size


_LAZY = {"Objective": "objective", "FixedExamples": "examples",
         "ModelFunction": "function"}


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(f"tfcapacity.objective.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(name)
