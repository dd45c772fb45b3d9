r"""Loss between two models, or around one: `python -m tfcapacity.interpolate`.

1-D interpolation (Goodfellow et al. 2015; papers/003 Sec. 2.2): loss and
top-1 error, train and test, at (1 - alpha) theta_A + alpha theta_B, the
loss being `--loss` (default RUN_B's own, cross_entropy or squared):

  python -m tfcapacity.interpolate --from=runs/b128 --to=runs/b4096 \
      --num_points=25 --alpha_range=-0.5,1.5 --output=interp.json

  python -m tfcapacity.interpolate --from_init --to=runs/b4096 \
      --output=from_init.json      # A = the run's own initial model

2-D plane of two filter-normalised random directions around the --to model
(Li et al. 2018), a num_points x num_points grid:

  python -m tfcapacity.interpolate --plane --to=runs/b4096 --num_points=21 \
      --alpha_range=-1,1 --output=plane.json

Models: `--from=RUN_A` and `--to=RUN_B` are run directories, each at
`--from_checkpoint`/`--to_checkpoint` (latest | STEP | final = model.keras;
default latest). `--from_init` takes RUN_B's model as training initialised
it (its flags.txt and seed, `rundir.load_run_model`). The model evaluated
is RUN_B's, with A's weights interpolated in; the two must have the same
variables (layer class, name and shape, in order), else exit 2.

Data: RUN_B's, rebuilt as `tfcapacity.rundir.load` does (the run's data
flags, no augmentation; `--dataset` and the other shared data flags of
`tfcapacity.cli` override as there). By default the whole train and test splits;
`--num_examples=N` takes N examples of each split (drawn with `--seed`, or
the first N with `--noshuffle`), a smaller split whole. When RUN_A trained
on different data (dataset or label flags), a warning is logged and
`from_data_differs` is true: the train loss is always on RUN_B's data.

Batch-norm statistics (`--bn_stats`, see `tfcapacity.landscape`):
`recompute` (default) sets each layer's moving mean and variance at every
point to the exact mean and biased variance of its inputs over the
training examples evaluated, layer by layer from the input, the layers
below in inference mode with their recomputed statistics: the network then
computes what it computes in training mode with one batch of all those
examples. `interpolate` interpolates the moving statistics like the weights
(1-D only); `keep` keeps the centre's (plane only, as Li et al.).

Output: the JSON `{"alphas", "train_loss", "train_top1_error", "test_loss",
"test_top1_error", ...}` with provenance (from, to, loss, bn_stats, dataset,
example counts, distance ||theta_B - theta_A||, seconds); for the plane also
"betas", the grids as rows [i][j] at (alphas[i], betas[j]) and the
directions' norms. A PNG with the same stem sits next to it (loss and error
against alpha; contours of log loss for the plane). The JSON is written
once, atomically, at the end. Exit status: 0 done, 2 bad input (one line on
stderr, nothing written).
"""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import time  # noqa: E402

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

from tfcapacity import cli  # noqa: E402
from tfcapacity import landscape  # noqa: E402
from tfcapacity.errors import UserError  # noqa: E402
from tfcapacity.progress import Progress  # noqa: E402
from tfcapacity import rundir  # noqa: E402

PROG = "tfcapacity.interpolate"
FLAGS = flags.FLAGS
# The other analysis tools' flags (tfcapacity.cli) that this tool does not
# have, and what to give instead; its parser names them in its refusal.
NOT_HERE = {name: "name the models with --from/--to (and --from_checkpoint/"
            "--to_checkpoint), the data with --dataset"
            for name in ("model_dir", "checkpoint", "at_init", "saved_model",
                         "keras_model", "split")}
NOT_HERE["dtype"] = "the models are evaluated in the dtype they were saved in"
NOT_HERE.update({name: "the losses are of the whole model at each point, "
                 "with the batch-norm statistics --bn_stats says"
                 for name in ("bn_mode", "ghost_batch_size", "layers",
                              "include_slopes")})
# Run flags whose difference means the two runs trained on different data.
DATA_KEYS = ("dataset", "random_labels", "label_noise", "train_subset",
             "data_seed", "test_dataset", "holdout_fraction", "standardize")
DEFAULT_BATCH_SIZE = 500


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (idempotent per `fv`)."""
  cli.define_analysis_flags(
      fv,
      seed="the two random directions of --plane",
      models=False, parameters=False, bn_modes=None,
      num_examples=(-1, "Examples of each split, train and test (default "
                    "-1 or 0: the whole splits; a smaller split whole)."),
      loss_default="the --to run's own --loss (its flags.txt)",
      batch_size=f"evaluation batch of the losses, errors and recomputed "
      f"batch-norm statistics (default {DEFAULT_BATCH_SIZE}; the results do "
      f"not depend on it, only memory and speed)",
      figure="Draw the losses and errors to <output stem>.png (lines "
      "against alpha, or contours over the plane).")
  # --help lists the shared flags with the tool's own.
  flags.adopt_module_key_flags(cli, flag_values=fv)
  if "plane" in fv:
    return
  flags.DEFINE_string("from", None, "Run directory of end point A "
                      "(alpha = 0).", flag_values=fv)
  flags.DEFINE_string("to", None, "Run directory of end point B (alpha = 1); "
                      "the centre of --plane.", flag_values=fv)
  flags.DEFINE_string("from_checkpoint", None,
                      "A's checkpoint: latest (default) | STEP | final.",
                      flag_values=fv)
  flags.DEFINE_string("to_checkpoint", None,
                      "B's checkpoint: latest (default) | STEP | final.",
                      flag_values=fv)
  flags.DEFINE_bool("from_init", False,
                    "A = B's run as training initialised it (its flags and "
                    "seed) instead of --from.", flag_values=fv)
  flags.DEFINE_bool("plane", False,
                    "The plane of two filter-normalised random directions "
                    "around B (Li et al. 2018) instead of a line.",
                    flag_values=fv)
  flags.DEFINE_integer("num_points", 25,
                       "Points on the line (per axis for --plane).",
                       flag_values=fv)
  flags.DEFINE_list("alpha_range", None,
                    "LOW,HIGH (default -0.5,1.5; -1,1 for --plane, both "
                    "axes).", flag_values=fv)
  flags.DEFINE_enum("bn_stats", "recompute", list(landscape.BN_STATS),
                    "Batch-norm statistics at each point: recomputed on the "
                    "training examples, interpolated (line), or the "
                    "centre's (keep, plane).", flag_values=fv)
  flags.register_validator("num_points", lambda v: v >= 2,
                           "--num_points must be at least 2", flag_values=fv)
  cli.require("to", "the run directory of end point B (alpha = 1; the "
              "centre of --plane), whose training examples give the "
              "losses; e.g. --to=runs/quickstart", fv)


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the flags ask for, checked without TensorFlow."""
  to: rundir.Request  # B's train examples (test: split="test").
  from_dir: str | None
  from_checkpoint: str | None
  from_init: bool
  plane: bool
  alphas: tuple
  bn_stats: str


def parse_range(values, plane: bool) -> tuple[float, float]:
  """LOW,HIGH of --alpha_range (default by mode).

  Raises:
    UserError: not two finite numbers with LOW < HIGH.
  """
  if not values:
    return (-1.0, 1.0) if plane else (-0.5, 1.5)
  text = ",".join(values)
  try:
    low, high = (float(v) for v in values)
  except ValueError:
    raise UserError(f"--alpha_range={text}: give two numbers LOW,HIGH, e.g. "
                    f"-0.5,1.5") from None
  if not (np.isfinite(low) and np.isfinite(high) and low < high):
    raise UserError(f"--alpha_range={text}: need finite LOW < HIGH, e.g. "
                    f"-0.5,1.5")
  return low, high


def check_flags(fv: flags.FlagValues = flags.FLAGS) -> Spec:
  """The `Spec` of the flags, after every check that needs no TensorFlow.

  Raises:
    UserError: bad input.
  """
  source = fv["from"].value
  if fv.plane:
    if source or fv.from_init or fv.from_checkpoint:
      raise UserError("--plane is centred on --to alone; drop --from, "
                      "--from_init and --from_checkpoint")
    if fv.bn_stats == "interpolate":
      raise UserError("--bn_stats=interpolate needs two end points; the "
                      "plane takes recompute or keep (the centre's)")
  else:
    if bool(source) == fv.from_init:
      raise UserError("name end point A with --from=RUN_DIR or --from_init "
                      "(exactly one)")
    if fv.from_init and fv.from_checkpoint:
      raise UserError("--from_init is the run's initial model, not a "
                      "checkpoint; drop --from_checkpoint")
    if fv.bn_stats == "keep":
      raise UserError("--bn_stats=keep is for --plane; a line takes "
                      "recompute or interpolate")
  for name in ("from_checkpoint", "to_checkpoint"):
    rundir.check_checkpoint_name(f"--{name}", fv[name].value)
  low, high = parse_range(fv.alpha_range, fv.plane)
  alphas = tuple(float(a) for a in
                 np.round(np.linspace(low, high, fv.num_points), 12))
  to = rundir.Request(
      model_dir=fv.to, checkpoint=fv.to_checkpoint, dataset=fv.dataset,
      split="train", num_examples=fv.num_examples, shuffle=fv.shuffle,
      seed=fv.seed, at_most=True, data_flags=cli.data_flags(fv),
      loss=fv.loss, model_flag="--to", checkpoint_flag="--to_checkpoint")
  to.validate()
  if source:
    rundir.Request(model_dir=source, checkpoint=fv.from_checkpoint,
                   model_flag="--from",
                   checkpoint_flag="--from_checkpoint").validate()
  elif fv.from_init:
    rundir.Request(model_dir=fv.to, at_init=True,
                   model_flag="--to").validate()
  return Spec(to=to, from_dir=source or (fv.to if fv.from_init else None),
              from_checkpoint=fv.from_checkpoint, from_init=fv.from_init,
              plane=fv.plane, alphas=alphas, bn_stats=fv.bn_stats)


def figure_path(output: str) -> str:
  """`<output stem>.png` next to the JSON."""
  return os.path.splitext(output)[0] + ".png"


def _end_point(description: dict) -> dict:
  return {k: description[k] for k in ("path", "checkpoint", "step",
                                      "at_init")}


def _data_differs(dir_a: str, dir_b: str) -> list[str]:
  a, b = rundir.load_config(dir_a), rundir.load_config(dir_b)
  return [k for k in DATA_KEYS
          if k in a.values and a.values.get(k) != b.values.get(k)]


def compute(fv: flags.FlagValues = flags.FLAGS, strategy=None) -> dict:
  """The JSON-ready result the flags in `fv` ask for (the PNG is written
  when --figure; the JSON is not).

  Raises:
    UserError: bad input.
  """
  from tfcapacity import landscape  # pylint: disable=g-import-not-at-top
  spec = check_flags(fv)
  start = time.time()
  train = rundir.load(spec.to, strategy)
  test = rundir.load(dataclasses.replace(spec.to, split="test"),
                     train.strategy)
  model = train.model
  if not train.is_keras:
    raise UserError("--to must give a Keras model")
  theta_b = landscape.snapshot(model)
  evaluator = landscape.Evaluator(model, fv.batch_size or DEFAULT_BATCH_SIZE,
                                  loss=train.loss)
  out = {"mode": "plane" if spec.plane else "line",
         "to": _end_point(train.description)}
  n = len(spec.alphas) ** (2 if spec.plane else 1)
  with Progress("plane" if spec.plane else "interpolation", n,
                bar=fv.progress_bar, every=max(1, n // 20)) as progress:
    if spec.plane:
      found = landscape.plane(
          evaluator, theta_b, spec.alphas, spec.alphas,
          (train.x, train.y), (test.x, test.y), bn_stats=spec.bn_stats,
          seed=fv.seed, progress=progress)
      found.pop("directions")
      out["direction_seed"] = int(fv.seed)
    else:
      model_a, path_a, step_a = rundir.load_run_model(
          spec.from_dir, spec.from_checkpoint, at_init=spec.from_init,
          strategy=train.strategy, model_flag="--from",
          checkpoint_flag="--from_checkpoint")
      landscape.check_compatible(
          model_a, model, f"--from={spec.from_dir}" if not spec.from_init
          else "the initial model", f"--to={fv.to}")
      theta_a = landscape.snapshot(model_a)
      del model_a
      if step_a is None:
        step_a = (rundir.read_results(spec.from_dir) or {}).get("steps")
      differs = [] if spec.from_init else _data_differs(spec.from_dir, fv.to)
      if differs:
        logging.warning("--from and --to trained on different data (%s); "
                        "the losses are on --to's", ", ".join(differs))
      out["from"] = {"path": os.path.abspath(spec.from_dir),
                     "checkpoint": path_a and os.path.abspath(path_a),
                     "step": step_a, "at_init": bool(spec.from_init)}
      out["from_data_differs"] = bool(differs)
      out["distance"] = landscape.distance(model, theta_a, theta_b)
      found = landscape.line(evaluator, theta_a, theta_b, spec.alphas,
                             (train.x, train.y), (test.x, test.y),
                             bn_stats=spec.bn_stats, progress=progress)
  out.update(found)
  described = train.description
  out.update({
      "loss": train.loss,
      "bn_stats": spec.bn_stats,
      "batch_norm_layers": evaluator.num_batch_norm_layers,
      "dataset": described["dataset"],
      "num_train_examples": int(len(train.y)),
      "num_test_examples": int(len(test.y)),
      "shuffle": described["shuffle"],
      "selection_seed": described["selection_seed"],
      "batch_size": evaluator.batch_size,
      "num_parameters": int(sum(int(np.prod(v.shape))
                                for v in model.trainable_weights)),
  })
  out["seconds"] = time.time() - start
  if fv.figure:
    path = figure_path(fv.output)
    if spec.plane:
      landscape.plane_figure(out, path)
    else:
      landscape.line_figure(out, path)
    out["figure"] = os.path.abspath(path)
  return out


def _summary(result: dict) -> str:
  if result["mode"] == "plane":
    loss = np.asarray(result["train_loss"], np.float64)
    return (f"Plane of {loss.shape[0]}x{loss.shape[1]} points, train loss "
            f"{np.nanmin(loss):.4g}..{np.nanmax(loss):.4g} "
            f"({result['seconds']:.1f}s)")
  loss = result["train_loss"]
  return (f"{len(loss)} points, train loss {loss[0]:.4g} -> {loss[-1]:.4g}, "
          f"max {max(loss):.4g}, distance {result['distance']:.4g} "
          f"({result['seconds']:.1f}s)")


def run():
  """Console-script entry point (tfcapacity-interpolate)."""
  cli.tool_main(PROG, define_flags, compute, _summary, check=check_flags,
                unknown=NOT_HERE)


if __name__ == "__main__":
  run()
