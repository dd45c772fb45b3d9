r"""Gradient confusion of a model: `python -m tfcapacity.confusion`.

Measures the statistics of the per-example gradients g_i = grad f_i(w) of
each example's own loss (`--loss`: the run's own by default, cross_entropy
or squared), over fixed examples, and writes them to a JSON file:

  python -m tfcapacity.confusion --model_dir=runs/w256 --num_examples=500 \
      --output=runs/w256/confusion.json

  * gradient confusion, max(0, -min_{i != j} <g_i, g_j>) (Sankararaman, De,
    Xu, Huang & Goldstein 2020, Def. 2.1), the minimum and mean pairwise
    inner product and cosine, and cosine quantiles 0.01, 0.5, 0.99;
  * gradient diversity (Yin et al. 2018, Def. 1) and the simple noise scale
    (McCandlish et al. 2018, Eq. 2.8);
  * `gram_min_eigenvalue`, `gram_max_eigenvalue`, `gram_condition_number`:
    the spectrum of G = M M^T, the Gram matrix of the per-example loss
    gradients;
  * with `--ntk`, `ntk_min_eigenvalue`, `ntk_max_eigenvalue`,
    `ntk_condition_number`: the spectrum of the empirical neural-tangent
    Gram matrix of the logits, K_ij = sum_c <d z_c(x_i), d z_c(x_j)>, the
    matrix whose least eigenvalue governs gradient descent in Du, Lee, Li,
    Wang & Zhai (2019);
  * with `--feature_layer=LAYER` (or `penultimate`, the classifier's input),
    `features_*`: the spectrum of that layer's feature kernel F F^T / width.

Each spectrum says whether its least eigenvalue, and so its condition
number, is resolved in the model's precision (`gram_resolved` etc., true or
false; `statistics.spectrum_resolved`): in float32 a least eigenvalue below
n eps_32 times the largest is round-off, and the condition number is then
null (JSON has no NaN), named in `non_finite`, never a ratio of noise or
inf. `--dtype=float64` runs resolve far smaller eigenvalues.

All of them are functions of G (`tfcapacity.gradients.statistics`), which
`tfcapacity.gradients.per_example` computes chunk by chunk, exactly or after
a Johnson-Lindenstrauss projection (`--projection_dim`). `--per_layer` adds
the same statistics of each variable's own block G_l (they sum to G).

The model and the examples come from `tfcapacity.rundir`
(`--model_dir`/`--checkpoint`, `--keras_model`, `--dataset`, `--split`,
`--num_examples`, `--seed`/`--noshuffle`), so with
`--dataset=hdf5:FILE --noshuffle --num_examples=<rows>` the statistics are
over exactly the file's rows, each with its own label. A SavedModel
(`--saved_model`) is differentiated through its `serve` function and
restored variables (no per-layer parameter choice, no `--feature_layer`).
Per-example gradients need batch norm's moving statistics (a single
example's batch statistics are ill-defined): `--bn_mode` takes only
`inference` and `auto` (the default), which means `inference` here.

Beside the JSON, `<output stem>_cosines.png` shows the histogram of the
n(n-1)/2 pairwise cosines with their mean and minimum (`--nofigure`: none;
the JSON's `cosines_figure` names it).
`--logdir=DIR` also writes TensorBoard events to DIR at the checkpoint's
step (0 for a model file or `--at_init`): the statistics as the scalars the
training run's gradient callback logs (`gradients/gradient_confusion`,
`gradients/min_cosine`, `gradients/mean_cosine`, ...), the cosines as the
histogram `gradients/cosines` and the figure as the image
`figures/gradient_cosines`, so that a run directory given as DIR shows them
beside the run's own curves.

`--at_init` measures the run's model as training initialised it: rebuilt
from the run's flags.txt with its seed, no checkpoint restored, so a run
directory holding only flags.txt will do (`rundir.load`).

The JSON (with `"loss"`, the loss differentiated) is written once,
atomically, at the end. Exit status: 0 done, 2 bad
input (one line on stderr).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import time  # noqa: E402

from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from tfcapacity import cli  # noqa: E402
from tfcapacity import figures  # noqa: E402
from tfcapacity import gradients  # noqa: E402
from tfcapacity.errors import UserError  # noqa: E402
from tfcapacity import rundir  # noqa: E402

PROG = "tfcapacity.confusion"
FLAGS = flags.FLAGS
# The curvature tools' flags this tool does not have, and why; its parser
# names them in its refusal.
NOT_HERE = {
    "ghost_batch_size": "per-example gradients use batch norm's moving "
                        "statistics (--bn_mode=inference)",
    "batch_size": "the per-example gradients are computed --chunk_size "
                  "examples at a time",
}


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (idempotent per `fv`); see `tfcapacity.hessian`."""
  cli.define_analysis_flags(
      fv,
      seed="the Johnson-Lindenstrauss projection (--projection_dim)",
      num_examples=(None, f"Examples whose gradients are compared, pair "
                    f"by pair (default {rundir.DEFAULT_NUM_EXAMPLES}, or the "
                    f"whole split if smaller; -1 or 0: the whole split)."),
      bn_modes=("auto", "inference"),
      bn_mode="Batch-norm statistics of the per-example gradients: batch "
      "norm's moving statistics (inference); auto, the default, means "
      "inference here.",
      bn_mode_refused="per-example gradients need --bn_mode=inference: the "
      "batch statistics of a single example are ill-defined",
      per_layer="Also the statistics of each variable's own Gram block G_l "
      "(they sum to G; exact gradients only).",
      figure="Draw the histogram of the pairwise gradient cosines, with "
      "their mean and minimum, to <output stem>_cosines.png.",
      logdir="the statistics as gradients/... scalars (the names the "
      "training run's gradient callback uses), the cosines as the "
      "histogram gradients/cosines and their figure as the image "
      "figures/gradient_cosines.")
  # --help lists the shared flags with the tool's own.
  flags.adopt_module_key_flags(cli, flag_values=fv)
  if "projection_dim" in fv:
    return
  flags.DEFINE_integer(
      "projection_dim", None,
      "Project each gradient to this many dimensions (Gaussian "
      "Johnson-Lindenstrauss, seeded by --seed); default exact.",
      flag_values=fv)
  flags.DEFINE_integer("chunk_size", gradients.DEFAULT_CHUNK_SIZE,
                       "Examples per traced gradient computation (bounds "
                       "memory).", flag_values=fv)
  flags.DEFINE_bool(
      "ntk", False,
      "Also the spectrum of the empirical neural-tangent Gram matrix of the "
      "logits (ntk_*).", flag_values=fv)
  flags.DEFINE_string(
      "feature_layer", None,
      "Also the spectrum of this layer's feature kernel F F^T / width "
      "(features_*); 'penultimate' = the classifier's input.",
      flag_values=fv)
  for name in ("projection_dim", "chunk_size"):
    flags.register_validator(name, lambda v: v is None or v > 0,
                             f"--{name} must be positive", flag_values=fv)


def check_flags(fv: flags.FlagValues = flags.FLAGS):
  """The `rundir.Request`, after the checks that need no TensorFlow.

  Raises:
    UserError: bad input.
  """
  request = cli.request_from_flags(fv)
  # --bn_mode takes auto and inference only: its parser refuses the rest.
  if request.saved_model and (fv.layers or fv.include_slopes):
    raise UserError("--layers/--include_slopes need a Keras model; a "
                    "SavedModel's variables are used whole")
  if request.saved_model and fv.feature_layer:
    raise UserError("--feature_layer needs a Keras model (a SavedModel does "
                    "not expose its layers); give --keras_model or "
                    "--model_dir")
  if fv.per_layer and fv.projection_dim:
    raise UserError("--per_layer needs exact gradients; drop "
                    "--projection_dim")
  return request


def confusion_report(loaded: rundir.Loaded, *, chunk_size: int = 128,
                     projection_dim: int | None = None, seed: int = 0,
                     per_layer: bool = False,
                     layers: list[str] | None = None,
                     include_slopes: bool = False, ntk: bool = False,
                     feature_layer: str | None = None) -> dict:
  """Per-example gradient statistics of the loaded model and examples.

  Args:
    loaded: from `rundir.load` (a Keras model or a SavedModel); its
      `loss` is the per-example loss differentiated.
    chunk_size, projection_dim, seed, per_layer: see
      `per_example.gradient_inner_products`.
    layers, include_slopes: the parameter block
      (`objective.function.select_params`).
    ntk: also the spectrum of the logits' neural-tangent Gram matrix.
    feature_layer: also the spectrum of this layer's feature kernel.

  Returns:
    A JSON-ready dict: `statistics.summarize` of G, the Gram spectrum
    (gram_min_eigenvalue, gram_max_eigenvalue, gram_condition_number, NaN
    when gram_resolved is False, gram_min_below_float32),
    ntk_* and features_* when asked, num_parameters, how it was computed,
    `loaded.description`, and per_layer {variable path: summarize of G_l}
    when asked.

  Raises:
    UserError: bad options.
  """
  return measure_confusion(
      loaded, chunk_size=chunk_size, projection_dim=projection_dim,
      seed=seed, per_layer=per_layer, layers=layers,
      include_slopes=include_slopes, ntk=ntk,
      feature_layer=feature_layer)[0]


def measure_confusion(loaded: rundir.Loaded, *, chunk_size: int = 128,
                      projection_dim: int | None = None, seed: int = 0,
                      per_layer: bool = False,
                      layers: list[str] | None = None,
                      include_slopes: bool = False, ntk: bool = False,
                      feature_layer: str | None = None
                      ) -> tuple[dict, np.ndarray]:
  """`confusion_report`, and the defined pairwise cosines it summarises.

  Returns:
    (the report, the cosines of the pairs i < j, float64, without the pairs
    of a zero gradient: `statistics.pairwise_cosines`).
  """
  from tfcapacity.gradients import measure  # pylint: disable=g-import-not-at-top
  from tfcapacity.gradients import statistics  # pylint: disable=g-import-not-at-top
  from tfcapacity.objective import function as function_lib  # pylint: disable=g-import-not-at-top
  if len(loaded.y) < 2:
    raise UserError("--num_examples must be at least 2: the statistics are "
                    "over pairs of examples")
  start = time.time()
  params = None
  if layers or include_slopes:
    params = function_lib.select_params(loaded.model, layers or None,
                                        include_slopes=include_slopes)
  chosen = params if params is not None else loaded.model.trainable_variables
  found = measure.measure(
      loaded.model, loaded.x, loaded.y, params=params, chunk_size=chunk_size,
      projection_dim=projection_dim, seed=seed, strategy=loaded.strategy,
      per_layer=per_layer, ntk=ntk, feature_layer=feature_layer,
      loss=loaded.loss)
  out = {**loaded.description, **found.values}
  for key in found.values:
    if key.endswith("_resolved"):  # A JSON true/false beside the spectrum.
      out[key] = bool(found.values[key])
  out.update({
      "bn_mode": "inference",
      "num_parameters": int(sum(int(v.numpy().size) for v in chosen)),
      "projection_dim": projection_dim, "projection_seed": int(seed),
      "chunk_size": int(chunk_size),
      "layers": list(layers) if layers else None,
      "feature_layer": feature_layer})
  if per_layer:
    out["per_layer"] = statistics.per_layer(found.layer_grams)
  cosines, _ = statistics.pairwise_cosines(found.gram)
  out["seconds"] = time.time() - start
  return out, cosines


def measure_from_flags(fv: flags.FlagValues = flags.FLAGS, strategy=None
                       ) -> tuple[dict, np.ndarray]:
  """(the JSON-ready result, the pairwise cosines) the flags ask for.

  Raises:
    UserError: bad input.
  """
  loaded = rundir.load(check_flags(fv), strategy)
  return measure_confusion(
      loaded, chunk_size=fv.chunk_size, projection_dim=fv.projection_dim,
      seed=fv.seed, per_layer=fv.per_layer, layers=fv.layers,
      include_slopes=fv.include_slopes, ntk=fv.ntk,
      feature_layer=fv.feature_layer)


def compute(fv: flags.FlagValues = flags.FLAGS, strategy=None) -> dict:
  """The JSON-ready result the flags in `fv` ask for (nothing is written).

  Raises:
    UserError: bad input.
  """
  return measure_from_flags(fv, strategy)[0]


def cosines_path(output: str) -> str:
  """`<output stem>_cosines.png` next to the JSON."""
  return os.path.splitext(output)[0] + "_cosines.png"


def cosines_figure(cosines: np.ndarray, result: dict) -> bytes:
  """The histogram of the pairwise cosines as PNG bytes.

  Args:
    cosines: the defined pairwise cosines (`measure_confusion`).
    result: the tool's result: its mean_cosine and min_cosine are marked,
      its model and examples (`figures.subject`) named in the title.
  """
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  pairs = len(cosines)
  if pairs:
    low, high = float(np.min(cosines)), float(np.max(cosines))
    counts, _, _ = ax.hist(
        cosines, bins=int(np.clip(np.sqrt(pairs), 10, 60)),
        range=(low, high) if high > low else (low - 0.01, high + 0.01),
        color="C0", alpha=0.8)
    ax.set_ylim(0, 1.3 * float(np.max(counts)))  # Room for the legend.
    if low < 0 < high:
      ax.axvline(0.0, color="gray", lw=0.8)
    ax.axvline(result["mean_cosine"], color="C3", lw=1.8,
               label=f"mean {result['mean_cosine']:.3g}")
    ax.axvline(result["min_cosine"], color="k", ls="--", lw=1.4,
               label=f"minimum {result['min_cosine']:.3g}")
    ax.legend(loc="best", framealpha=0.9)
  ax.yaxis.get_major_locator().set_params(integer=True)  # Counts.
  ax.set_xlabel("cosine of two examples' loss gradients, cos(g_i, g_j)")
  ax.set_ylabel(f"pairs i < j (of {pairs})")
  projected = (f", gradients projected to {result['projection_dim']} "
               f"dimensions" if result.get("projection_dim") else "")
  ax.set_title(f"Pairwise cosines of per-example gradients{projected}\n"
               f"{figures.subject(result)}", fontsize=10)
  ax.grid(alpha=0.3)
  return figures.png(fig)


def tensorboard_scalars(result: dict) -> dict[str, float]:
  """The result's scalars under the tags the training run's gradient
  callback logs: gradients/<statistic>, gradients/cosine_q<level>, the
  Gram spectra gradients/gram_* (ntk_*, features_*), and per layer
  gradients/<variable>/<statistic>."""
  from tfcapacity.gradients import callback  # pylint: disable=g-import-not-at-top
  out = callback.scalars(result, "gradients")
  out.update({f"gradients/{key}": float(value)
              for key, value in result.items()
              if key.startswith(("gram_", "ntk_", "features_"))
              and isinstance(value, (int, float))})
  for path, summary in (result.get("per_layer") or {}).items():
    out.update(callback.scalars(summary, f"gradients/{path}"))
  return out


def publish(fv: flags.FlagValues, result: dict, cosines: np.ndarray) -> None:
  """The figure (--figure) and the TensorBoard summaries (--logdir) of a
  result; their paths join the result."""
  if not (fv.figure or fv.logdir):
    return
  png = cosines_figure(cosines, result)
  if fv.figure:
    path = cosines_path(fv.output)
    rundir.atomic_write(path, png)
    result["cosines_figure"] = os.path.abspath(path)
  if fv.logdir:
    cli.write_summaries(
        fv.logdir, cli.summary_step(result),
        scalars=tensorboard_scalars(result),
        images={"figures/gradient_cosines": png},
        histograms={"gradients/cosines": cosines} if len(cosines) else None)
    result["logdir"] = os.path.abspath(fv.logdir)


def produce(fv: flags.FlagValues = flags.FLAGS, strategy=None) -> dict:
  """`compute`, then (on the chief) the figure and TensorBoard summaries
  the flags ask for: the tool's work before its JSON is written."""
  from tfcapacity import distribute  # pylint: disable=g-import-not-at-top
  result, cosines = measure_from_flags(fv, strategy)
  if distribute.is_chief(strategy):
    publish(fv, result, cosines)
  return result


def _summary(result: dict) -> str:
  return (f"Gradient confusion {result['gradient_confusion']:.6g}, min "
          f"cosine {result['min_cosine']:.4g}, diversity "
          f"{result['gradient_diversity']:.4g} over {result['num_examples']} "
          f"examples ({result['seconds']:.1f}s)")


def run():
  """Console-script entry point (tfcapacity-confusion)."""
  cli.tool_main(PROG, define_flags, produce, _summary, check=check_flags,
                unknown=NOT_HERE)


if __name__ == "__main__":
  run()
