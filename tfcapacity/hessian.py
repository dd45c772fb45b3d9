r"""Hessian spectrum of a trained model: `python -m tfcapacity.hessian`.

Measures, on the mean loss over fixed examples (`--loss`: the run's own by
default, or cross_entropy or squared), the top-k eigenvalues of the Hessian
(power iteration with deflation, the lambda_max measurement of papers/003
Sec. 2.3, or Lanczos), optionally its trace (Hutchinson 1990) and its
eigenvalue density (stochastic Lanczos quadrature, Ghorbani, Krishnan & Xiao
2019), and writes them to a JSON file:

  python -m tfcapacity.hessian --model_dir=runs/w256 --top_k=5 --trace \
      --density --output=runs/w256/hessian.json

The model comes from a run directory (`--model_dir`, `--checkpoint`), a
SavedModel or a .keras file, and the examples from `--dataset`, `--split`,
`--num_examples`, `--seed`/`--noshuffle`: `tfcapacity.rundir` loads them,
`tfcapacity.curvature.report` measures, and `tfcapacity.cli` holds the flags
and program the analysis tools share. With `--density` the figure is written
next to the JSON as `<output stem>_density.png`. The JSON (with `"loss"`,
the loss measured) is written once, atomically, at the end: a failed or
interrupted run leaves an earlier file intact.

Exit status: 0 done, 2 bad input (one line on stderr).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from tfcapacity import cli  # noqa: E402
from tfcapacity import curvature  # noqa: E402
from tfcapacity.curvature import report  # noqa: E402
from tfcapacity import objective  # noqa: E402
from tfcapacity import rundir  # noqa: E402

PROG = "tfcapacity.hessian"
FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (idempotent per `fv`).

  Defined by `run()` rather than at import, so that this module and
  tfcapacity.train, whose flags share names, can be imported together.
  """
  cli.define_analysis_flags(
      fv,
      seed="the random starts of the eigen-solvers (--trace probes use "
      "seed + 1, --density seed + 2)",
      batch_size=f"Hessian-vector-product batch (default: all the examples, at "
      f"most {objective.MAX_BATCH_SIZE}, or, with batch-norm statistics per "
      f"batch (--bn_mode=auto on a batch-norm run, batch, ghost), the run's "
      f"training batch if it divides --num_examples, as the curvature "
      f"callback measures)",
      per_layer="Also lambda_max of each layer's diagonal Hessian block "
      "(where the curvature lives).",
      max_iterations=(100, "Power-iteration products per eigenvalue, at "
                      "most."))
  # --help lists the shared flags with the tool's own.
  flags.adopt_module_key_flags(cli, flag_values=fv)
  if "top_k" in fv:
    return
  flags.DEFINE_integer("top_k", 1, "Eigenvalues to compute.",
                       flag_values=fv)
  flags.DEFINE_enum(
      "method", "power", list(curvature.EIGEN_METHODS),
      "Eigen-solver: power iteration (--top_k=1: the largest eigenvalue, "
      "as the curvature callback logs it; more: with deflation, the largest "
      "in magnitude) or Lanczos (largest algebraic).", flag_values=fv)
  flags.DEFINE_enum(
      "hvp_method", "reverse", list(objective.HVP_METHODS),
      "Hessian-vector products by reverse-over-reverse or "
      "forward-over-reverse differentiation.", flag_values=fv)
  flags.DEFINE_bool("trace", False, "Estimate the trace (Hutchinson).",
                    flag_values=fv)
  flags.DEFINE_integer("trace_probes", 100, "Rademacher probes of --trace.",
                       flag_values=fv)
  flags.DEFINE_bool(
      "density", False,
      "Estimate the eigenvalue density (stochastic Lanczos quadrature) and "
      "draw it to <output stem>_density.png.", flag_values=fv)
  flags.DEFINE_integer("density_runs", 4, "Lanczos runs of --density.",
                       flag_values=fv)
  flags.DEFINE_integer("density_steps", 30, "Lanczos steps per run.",
                       flag_values=fv)
  flags.DEFINE_float(
      "tol", 1e-3,
      "Power iteration stops at ||Hv - lambda v|| <= tol |lambda|.",
      flag_values=fv)
  flags.DEFINE_integer(
      "lanczos_steps", None,
      "Lanczos steps of --method=lanczos (default max(2k + 20, 30)).",
      flag_values=fv)
  for name in ("top_k", "trace_probes", "density_runs", "density_steps",
               "lanczos_steps"):
    flags.register_validator(name, lambda v: v is None or v > 0,
                             f"--{name} must be positive", flag_values=fv)
  flags.register_validator("tol", lambda v: v > 0, "--tol must be positive",
                           flag_values=fv)


def density_path(output: str) -> str:
  """`<output stem>_density.png` next to the JSON."""
  return os.path.splitext(output)[0] + "_density.png"


def compute(fv: flags.FlagValues = flags.FLAGS, strategy=None) -> dict:
  """The JSON-ready result the flags in `fv` ask for (nothing is written).

  Raises:
    UserError: bad input.
  """
  loaded = rundir.load(cli.request_from_flags(fv), strategy)
  return report.hessian_report(
      loaded, top_k=fv.top_k, method=fv.method, hvp_method=fv.hvp_method,
      trace=fv.trace, trace_probes=fv.trace_probes, density=fv.density,
      density_runs=fv.density_runs, density_steps=fv.density_steps,
      density_figure=density_path(fv.output) if fv.density else None,
      bn_mode=fv.bn_mode, ghost_batch_size=fv.ghost_batch_size,
      batch_size=fv.batch_size, layers=fv.layers,
      include_slopes=fv.include_slopes, tol=fv.tol,
      max_iterations=fv.max_iterations, lanczos_steps=fv.lanczos_steps,
      seed=fv.seed, per_layer=fv.per_layer, progress_bar=fv.progress_bar)


def _summary(result: dict) -> str:
  trace = (f", trace {result['trace']:.6g} +- {result['trace_stderr']:.2g}"
           if "trace" in result else "")
  return (f"Top eigenvalues of the {result['loss']} Hessian "
          f"{', '.join(f'{v:.6g}' for v in result['eigenvalues'])} "
          f"({result['matvecs']} products, {result['seconds']:.1f}s){trace}")


def run():
  """Console-script entry point (tfcapacity-hessian)."""
  cli.tool_main(PROG, define_flags, compute, _summary)


if __name__ == "__main__":
  run()
