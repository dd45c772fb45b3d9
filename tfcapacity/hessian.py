r"""Hessian spectrum of a trained model: `python -m tfcapacity.hessian`.

Measures, on the mean loss over fixed examples (`--loss`: the run's own by
default, or cross_entropy or squared), the top-k eigenvalues of the Hessian
(power iteration with deflation, the lambda_max measurement of papers/003
Sec. 2.3, or Lanczos), optionally its trace (Hutchinson 1990, or Hutch++
with `--trace_method=hutchpp`), its diagonal summarised per layer
(`--diagonal`) and its eigenvalue density (stochastic Lanczos quadrature,
Ghorbani, Krishnan & Xiao 2019), and writes them to a JSON file:

  python -m tfcapacity.hessian --model_dir=runs/w256 --top_k=5 --trace \
      --density --output=runs/w256/hessian.json

The model comes from a run directory (`--model_dir`, `--checkpoint`), a
SavedModel or a .keras file, and the examples from `--dataset`, `--split`,
`--num_examples`, `--seed`/`--noshuffle`: `tfcapacity.rundir` loads them,
`tfcapacity.curvature.report` measures, and `tfcapacity.cli` holds the flags
and program the analysis tools share. With `--density` the figure is written
next to the JSON as `<output stem>_density.png`. `--logdir=DIR` also writes
TensorBoard events to DIR at the checkpoint's step (0 for a model file or
`--at_init`): the eigenvalues as `hessian/eigenvalue_1` ...
`hessian/eigenvalue_k`, `hessian/trace` with `--trace`,
`hessian/diagonal_mean` and `hessian/diagonal_sum/<layer>` with
`--diagonal`, and the density figure as the image
`figures/hessian_density`. The JSON (with `"loss"`, the
loss measured) is written once, atomically, at the end: a failed or
interrupted run leaves an earlier file intact.

Exit status: 0 done, 2 bad input (one line on stderr).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from tfcapacity import cli  # noqa: E402
from tfcapacity import curvature  # noqa: E402
from tfcapacity import figures  # noqa: E402
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
      "seed + 1, --density seed + 2, --diagonal seed + 3)",
      batch_size=f"Hessian-vector-product batch (default: all the examples, at "
      f"most {objective.MAX_BATCH_SIZE}, or, with batch-norm statistics per "
      f"batch (--bn_mode=auto on a batch-norm run, batch, ghost), the run's "
      f"training batch if it divides --num_examples, as the curvature "
      f"callback measures)",
      per_layer="Also lambda_max of each layer's diagonal Hessian block "
      "(where the curvature lives).",
      max_iterations=(100, "Power-iteration products per eigenvalue, at "
                      "most."),
      logdir="hessian/eigenvalue_1 ... hessian/eigenvalue_k, with --trace "
      "hessian/trace and hessian/trace_stderr, with --per_layer "
      "hessian/lambda_max/<layer>, with --diagonal hessian/diagonal_mean "
      "and hessian/diagonal_sum/<layer>, and with --density the figure as "
      "the image figures/hessian_density.")
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
  flags.DEFINE_integer("trace_probes", 100,
                       "Hessian-vector products of --trace (Hutchinson: one "
                       "probe each; Hutch++: a third each for the sketch, "
                       "its trace and the probes).", flag_values=fv)
  flags.DEFINE_enum(
      "trace_method", "hutchinson", list(report.TRACE_METHODS),
      "Trace estimator of --trace: Hutchinson, or Hutch++ (a low-rank "
      "sketch traced exactly plus Hutchinson on the rest; far smaller error "
      "for the same products when a few eigenvalues dominate).",
      flag_values=fv)
  flags.DEFINE_bool(
      "diagonal", False,
      "Estimate the Hessian's diagonal (Hutchinson) and write its mean and "
      "per-layer sums and means as \"diagonal\" in the JSON.",
      flag_values=fv)
  flags.DEFINE_integer("diagonal_probes", 100,
                       "Rademacher probes of --diagonal.", flag_values=fv)
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
  for name in ("top_k", "trace_probes", "diagonal_probes", "density_runs",
               "density_steps", "lanczos_steps"):
    flags.register_validator(name, lambda v: v is None or v > 0,
                             f"--{name} must be positive", flag_values=fv)
  flags.register_validator("tol", lambda v: v > 0, "--tol must be positive",
                           flag_values=fv)
  flags.register_multi_flags_validator(
      ["trace_method", "trace_probes"],
      lambda v: v["trace_probes"] >= report.MIN_TRACE_PROBES.get(
          v["trace_method"], 1),
      "--trace_method=hutchpp needs --trace_probes >= 3 (a third each for "
      "the sketch, its trace and the probes)", flag_values=fv)


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
      trace=fv.trace, trace_probes=fv.trace_probes,
      trace_method=fv.trace_method, diagonal=fv.diagonal,
      diagonal_probes=fv.diagonal_probes, density=fv.density,
      density_runs=fv.density_runs, density_steps=fv.density_steps,
      bn_mode=fv.bn_mode, ghost_batch_size=fv.ghost_batch_size,
      batch_size=fv.batch_size, layers=fv.layers,
      include_slopes=fv.include_slopes, tol=fv.tol,
      max_iterations=fv.max_iterations, lanczos_steps=fv.lanczos_steps,
      seed=fv.seed, per_layer=fv.per_layer, progress_bar=fv.progress_bar)


def density_figure(result: dict, path: str) -> str:
  """Draws the result's eigenvalue density (`eigen.density_figure`), titled
  with the model and examples, to `path`."""
  from tfcapacity.curvature import eigen  # pylint: disable=g-import-not-at-top
  found = result["density"]
  density = eigen.Density(
      grid=np.asarray(found["grid"]), values=np.asarray(found["values"]),
      nodes=[np.asarray(n) for n in found["nodes"]],
      weights=[np.asarray(w) for w in found["weights"]],
      sigma=found["sigma"], iterations=0)
  return eigen.density_figure(
      density, path, title=f"Hessian eigenvalue density (SLQ, "
      f"{found['runs']} runs, sigma={found['sigma']:.3g})\n"
      f"{figures.subject(result)}")


def tensorboard_scalars(result: dict) -> dict[str, float]:
  """hessian/eigenvalue_<i> (i from 1), hessian/trace, hessian/trace_stderr,
  hessian/lambda_max/<layer>, hessian/diagonal_mean and
  hessian/diagonal_sum/<layer>, as far as the result has them."""
  out = {f"hessian/eigenvalue_{i}": value
         for i, value in enumerate(result["eigenvalues"], 1)}
  for key in ("trace", "trace_stderr"):
    if key in result:
      out[f"hessian/{key}"] = result[key]
  for row in result.get("per_layer") or []:
    out[f"hessian/lambda_max/{row['layer']}"] = row["lambda_max"]
  if "diagonal" in result:
    out["hessian/diagonal_mean"] = result["diagonal"]["mean"]
    for row in result["diagonal"]["per_layer"]:
      out[f"hessian/diagonal_sum/{row['layer']}"] = row["sum"]
  return out


def publish(fv: flags.FlagValues, result: dict) -> None:
  """The density figure (--density) and the TensorBoard summaries
  (--logdir) of a result; their paths join the result."""
  images = {}
  if "density" in result:
    path = density_figure(result, density_path(fv.output))
    result["density_figure"] = os.path.abspath(path)
    with open(path, "rb") as f:
      images["figures/hessian_density"] = f.read()
  if fv.logdir:
    cli.write_summaries(fv.logdir, cli.summary_step(result),
                        scalars=tensorboard_scalars(result), images=images)
    result["logdir"] = os.path.abspath(fv.logdir)


def produce(fv: flags.FlagValues = flags.FLAGS, strategy=None) -> dict:
  """`compute`, then (on the chief) the figure and TensorBoard summaries
  the flags ask for: the tool's work before its JSON is written."""
  from tfcapacity import distribute  # pylint: disable=g-import-not-at-top
  result = compute(fv, strategy)
  if distribute.is_chief(strategy):
    publish(fv, result)
  return result


def _summary(result: dict) -> str:
  trace = (f", trace {result['trace']:.6g} +- {result['trace_stderr']:.2g}"
           if "trace" in result else "")
  return (f"Top eigenvalues of the {result['loss']} Hessian "
          f"{', '.join(f'{v:.6g}' for v in result['eigenvalues'])} "
          f"({result['matvecs']} products, {result['seconds']:.1f}s){trace}")


def run():
  """Console-script entry point (tfcapacity-hessian)."""
  cli.tool_main(PROG, define_flags, produce, _summary)


if __name__ == "__main__":
  run()
