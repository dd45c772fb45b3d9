r"""Keskar et al.'s sharpness of a model: `python -m tfcapacity.sharpness`.

Keskar, Mudigere, Nocedal, Smelyanskiy & Tang (2017), Sec. 2.2.2, Metric
2.1: the largest relative increase of the loss, in percent, within a box of
size `--epsilon` around the parameters (they used 1e-3 and 5e-4), found by
`--max_iterations` iterations of L-BFGS-B (their choice) or of projected
sign ascent, in the full space or a random `--subspace_dim`-dimensional one:

  python -m tfcapacity.sharpness --model_dir=runs/w256 --epsilon=5e-4 \
      --output=runs/w256/sharpness.json

The loss is the mean cross-entropy over fixed examples, chosen as for
`tfcapacity.hessian` (see `tfcapacity.curvature.analysis`), with batch norm
in inference mode unless `--bn_mode` says otherwise. The model is never
changed: a Keras model is evaluated on tensors, a SavedModel's variables are
put back after each evaluation. The JSON is written once, atomically, at the
end.

Exit status: 0 done, 2 bad input (one line on stderr).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from tfcapacity.curvature import analysis  # noqa: E402

PROG = "tfcapacity.sharpness"
FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (idempotent per `fv`); see `tfcapacity.hessian`."""
  analysis.define_flags(fv)
  # --help lists the shared flags with the tool's own.
  flags.adopt_module_key_flags(analysis, flag_values=fv)
  if "epsilon" in fv:
    return
  flags.DEFINE_float("epsilon", 1e-3,
                     "Box size (Keskar et al.: 1e-3 and 5e-4).",
                     flag_values=fv)
  flags.DEFINE_enum(
      "optimizer", "lbfgsb", ["lbfgsb", "ascent"],
      "The inner maximisation: L-BFGS-B (the paper's) or projected sign "
      "ascent.", flag_values=fv)
  flags.DEFINE_integer(
      "subspace_dim", None,
      "Dimension of a random subspace (default: the full space).",
      flag_values=fv)
  flags.DEFINE_integer("max_iterations", 10,
                       "Optimiser iterations (10 in the paper).",
                       flag_values=fv)
  flags.register_validator("epsilon", lambda v: v > 0,
                           "--epsilon must be positive", flag_values=fv)
  for name in ("subspace_dim", "max_iterations"):
    flags.register_validator(name, lambda v: v is None or v > 0,
                             f"--{name} must be positive", flag_values=fv)
  flags.mark_flag_as_required("output", flag_values=fv)


def compute(fv: flags.FlagValues = flags.FLAGS, strategy=None) -> dict:
  """The JSON-ready result the flags in `fv` ask for (nothing is written).

  Raises:
    UserError: bad input.
  """
  loaded = analysis.load(analysis.request_from_flags(fv), strategy)
  return analysis.sharpness_report(
      loaded, epsilon=fv.epsilon, optimizer=fv.optimizer,
      subspace_dim=fv.subspace_dim, max_iterations=fv.max_iterations,
      bn_mode=fv.bn_mode, ghost_batch_size=fv.ghost_batch_size,
      batch_size=fv.batch_size, layers=fv.layers,
      include_slopes=fv.include_slopes, seed=fv.seed,
      progress_bar=fv.progress_bar)


def _summary(result: dict) -> str:
  return (f"Sharpness {result['sharpness']:.6g}% at epsilon "
          f"{result['epsilon']:g} (loss {result['loss']:.6g}, max "
          f"{result['max_loss']:.6g}; {result['seconds']:.1f}s)")


def run():
  """Console-script entry point (tfcapacity-sharpness)."""
  analysis.tool_main(PROG, define_flags, compute, _summary)


if __name__ == "__main__":
  run()
