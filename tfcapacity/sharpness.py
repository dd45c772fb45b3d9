r"""Keskar et al.'s sharpness of a model: `python -m tfcapacity.sharpness`.

Keskar, Mudigere, Nocedal, Smelyanskiy & Tang (2017), Sec. 2.2.2, Metric
2.1: the largest relative increase of the loss, in percent, within a box of
size `--epsilon` around the parameters (they used 1e-3 and 5e-4), found by
`--max_iterations` iterations of L-BFGS-B (their choice) or of projected
sign ascent, in the full space or a random `--subspace_dim`-dimensional one:

  python -m tfcapacity.sharpness --model_dir=runs/w256 --epsilon=5e-4 \
      --output=runs/w256/sharpness.json

The loss is the mean `--loss` (the run's own by default: cross_entropy or
squared) over fixed examples, chosen as for `tfcapacity.hessian` (see
`tfcapacity.rundir`), with the batch-norm statistics the run trained with
(`--bn_mode=auto`, the default: per batch for a batch-norm run) unless
`--bn_mode` says otherwise. The model is never changed: a Keras model is evaluated on
tensors, a SavedModel's variables are put back after each evaluation. The
JSON (`sharpness`, `"loss"` the loss function, `loss_value` and `max_loss`
its values at the centre and the box's worst point, ...) is written once,
atomically, at the end.

Exit status: 0 done, 2 bad input (one line on stderr).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from tfcapacity import cli  # noqa: E402
from tfcapacity.curvature import report  # noqa: E402
from tfcapacity.curvature import sharpness as sharpness_lib  # noqa: E402
from tfcapacity import objective  # noqa: E402
from tfcapacity import rundir  # noqa: E402

PROG = "tfcapacity.sharpness"
FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (idempotent per `fv`); see `tfcapacity.hessian`."""
  cli.define_analysis_flags(
      fv,
      seed="the random subspace (--subspace_dim) and the search's random "
      "start",
      batch_size=f"batch of the loss and gradient evaluations (default: "
      f"all the examples, at "
      f"most {objective.MAX_BATCH_SIZE}, or, with batch-norm statistics per "
      f"batch (--bn_mode=auto on a batch-norm run, batch, ghost), the run's "
      f"training batch if it divides --num_examples, as the curvature "
      f"callback measures)",
      max_iterations=(10, "Iterations of the inner maximisation's "
                      "optimiser (10 in the paper)."))
  # --help lists the shared flags with the tool's own.
  flags.adopt_module_key_flags(cli, flag_values=fv)
  if "epsilon" in fv:
    return
  flags.DEFINE_float("epsilon", 1e-3,
                     "Box size (Keskar et al.: 1e-3 and 5e-4).",
                     flag_values=fv)
  flags.DEFINE_enum(
      "optimizer", "lbfgsb", list(sharpness_lib.METHODS),
      "The inner maximisation of the loss in the box: L-BFGS-B (the "
      "paper's) or projected sign ascent. Not the run's training "
      "--optimizer.", flag_values=fv)
  flags.DEFINE_integer(
      "subspace_dim", None,
      "Dimension of a random subspace (default: the full space).",
      flag_values=fv)
  flags.register_validator("epsilon", lambda v: v > 0,
                           "--epsilon must be positive", flag_values=fv)
  flags.register_validator("subspace_dim", lambda v: v is None or v > 0,
                           "--subspace_dim must be positive", flag_values=fv)


def compute(fv: flags.FlagValues = flags.FLAGS, strategy=None) -> dict:
  """The JSON-ready result the flags in `fv` ask for (nothing is written).

  Raises:
    UserError: bad input.
  """
  loaded = rundir.load(cli.request_from_flags(fv), strategy)
  return report.sharpness_report(
      loaded, epsilon=fv.epsilon, optimizer=fv.optimizer,
      subspace_dim=fv.subspace_dim, max_iterations=fv.max_iterations,
      bn_mode=fv.bn_mode, ghost_batch_size=fv.ghost_batch_size,
      batch_size=fv.batch_size, layers=fv.layers,
      include_slopes=fv.include_slopes, seed=fv.seed,
      progress_bar=fv.progress_bar)


def _summary(result: dict) -> str:
  return (f"Sharpness {result['sharpness']:.6g}% at epsilon "
          f"{result['epsilon']:g} ({result['loss']} loss "
          f"{result['loss_value']:.6g}, max {result['max_loss']:.6g}; "
          f"{result['seconds']:.1f}s)")


def run():
  """Console-script entry point (tfcapacity-sharpness)."""
  cli.tool_main(PROG, define_flags, compute, _summary)


if __name__ == "__main__":
  run()
