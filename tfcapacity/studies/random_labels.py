"""Random labels, depth and width: Du et al. (2019) on a small scale.

Du, Lee, Li, Wang and Zhai, "Gradient descent finds global minima of deep
neural networks" (papers/002 summarises it), prove that gradient descent
drives the training loss of a wide enough network to zero at a linear rate,
whatever the labels, provided the least eigenvalue of a Gram matrix stays
away from zero; the width they need grows exponentially with depth for
fully-connected nets (Theorem 3.1) and only polynomially for ResNets with a
skip connection around every layer and branches scaled by c_res/H (Theorem
4.1). This module turns a grid of training runs (model x depth x width x
learning rate, run by `tfcapacity.studies.sweep`) into:
  * per run: the final training loss after the fixed budget of steps, the
    number of steps to reach a training loss below a threshold (1e-3; None
    when not reached), and the Gram matrices' least eigenvalues over
    training (`gradients/ntk_min_eigenvalue`,
    `gradients/features_min_eigenvalue`, `gradients/gram_min_eigenvalue`
    from the gradients callback);
  * per (model, depth, width): the run of the best learning rate;
  * a CSV of each, a markdown table and figures.

Deviations from the paper: softmax cross-entropy on 10 classes rather than
the squared loss on a scalar output; the initialiser carries the
1/sqrt(width) factor (see `tfcapacity.models.fc_resnet`); the learning rate
is picked from a small grid per setting rather than from the theorem's
bound.

Steps to the threshold are read per step from the `batch/loss`
TensorBoard scalars: with the whole training set as the batch and no batch
norm, the value logged at step s is the training loss of the parameters
after s - 1 steps. The evaluation rows of results.json (the loss after
exactly `step` steps) fill in any step the events lack.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Iterable, Sequence

import numpy as np

from tfcapacity import figures as figures_lib
from tfcapacity.errors import UserError
from tfcapacity.studies import common
from tfcapacity.studies import sweep
from tfcapacity import rundir

THRESHOLD = 1e-3
# The per-step loss in the train run (`train/batch_loss` in runs written
# before the tags of `training.summaries`).
LOSS_TAGS = ("batch/loss", "train/batch_loss")
# Least eigenvalues of the Gram matrices the gradients callback logs.
GRAM_KEYS = {
    "ntk": "gradients/ntk_min_eigenvalue",
    "features": "gradients/features_min_eigenvalue",
    "gram": "gradients/gram_min_eigenvalue",
}
# Their condition numbers (largest / least eigenvalue): a least eigenvalue
# within a few float32 round-offs of the largest (condition number near 1e7)
# is numerically zero, whatever its printed value.
CONDITION_KEYS = {short: key.replace("_min_eigenvalue", "_condition_number")
                  for short, key in GRAM_KEYS.items()}
GRAM_LABELS = {
    "ntk": "neural-tangent Gram of the logits",
    "features": "penultimate features' Gram F F^T/width",
    "gram": "loss-gradient Gram",
}
MODELS = ("mlp", "fc_resnet")
# Least eigenvalues at or below this are numerically zero (a singular Gram
# matrix, e.g. F F^T of 32 examples at width 16): left out of log plots.
SINGULAR = 1e-9


# --- Cells -------------------------------------------------------------------


def residual_scale(depth: int, c_res: float) -> str:
  """fc_resnet's branch scale c_res/H as a flag value."""
  return format(c_res / depth, ".12g")


def study_cells(grid: Sequence[tuple[str, Sequence[str]]],
                c_res: float, base_depth: int | None = None
                ) -> list[sweep.Cell]:
  """The grid's cells; fc_resnet cells also get --residual_scale=c_res/depth.

  Args:
    grid: parsed `# sweep.grid:` lines (`sweep.parse_grid`).
    c_res: Du et al.'s c_res; 0 leaves --residual_scale as the flags say.
    base_depth: the base flags' --depth, for grids that do not vary depth.

  Raises:
    UserError: the grid sets --residual_scale itself while c_res != 0, or a
      depth is not a positive integer.
  """
  keys = [key for key, _ in grid]
  if c_res and "residual_scale" in keys:
    raise UserError("the grid sets --residual_scale and --residual_scale_c "
                    "would override it; drop one (--residual_scale_c=0 keeps "
                    "the grid's)")
  out = []
  for cell in sweep.cells(grid):
    values = dict(cell.overrides)
    model = values.get("model")
    if c_res and model == "fc_resnet":
      try:
        depth = int(values.get("depth", base_depth))
      except (TypeError, ValueError):
        raise UserError(f"--depth={values.get('depth')} of cell {cell.name} "
                        f"is not an integer") from None
      if depth < 1:
        raise UserError(f"--depth must be positive; cell {cell.name} has "
                        f"{depth}")
      cell = sweep.Cell(cell.index, cell.overrides + (
          ("residual_scale", residual_scale(depth, c_res)),))
    out.append(cell)
  return out


# --- One run -----------------------------------------------------------------


def read_scalar_events(logdir: str, tags) -> dict[int, float]:
  """{step: value} of a scalar tag (or the first found of several names of
  it, `tags`) in `logdir`'s event files.

  A step logged twice (a resumed run repeats the steps after its last
  checkpoint) keeps the value written last.
  """
  # TensorBoard's reader: several times faster than a tf.data pass here, and
  # a file cut short by a killed run ends its iteration quietly.
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  tags = (tags,) if isinstance(tags, str) else tuple(tags)
  latest = {}
  for path in sorted(glob.glob(os.path.join(logdir,
                                            "events.out.tfevents.*"))):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        if value.tag not in tags:
          continue
        number = (float(tensor_util.make_ndarray(value.tensor))
                  if value.HasField("tensor") else float(value.simple_value))
        old = latest.get(event.step)
        if old is None or event.wall_time >= old[0]:
          latest[event.step] = (event.wall_time, number)
  return {step: value for step, (_, value) in latest.items()}


def loss_curve(history: Sequence[dict], batch_losses: dict[int, float]
               ) -> tuple[np.ndarray, np.ndarray]:
  """The training loss after t steps, for every t known: (t, loss).

  `batch_losses[s]` (full batch) is the loss after s - 1 steps; history rows
  give the loss after `row["step"]` steps where the events have none.
  """
  curve = {int(row["step"]): rundir.row_number(row, "train_loss")
           for row in history if "train_loss" in row}
  for step, value in batch_losses.items():
    if step >= 1:
      curve[int(step) - 1] = float(value)
  steps = np.array(sorted(curve), dtype=np.int64)
  return steps, np.array([curve[s] for s in steps], dtype=np.float64)


def steps_to_threshold(steps: Sequence[int], losses: Sequence[float],
                       threshold: float = THRESHOLD) -> int | None:
  """The first t with loss(t) < threshold, or None if it never gets there.

  Raises:
    UserError: a threshold that is not a positive number.
  """
  if not threshold > 0 or not math.isfinite(threshold):
    raise UserError(f"--threshold must be a positive number; got {threshold}")
  for step, loss in sorted(zip(steps, losses)):
    if loss < threshold:
      return int(step)
  return None


def measurement_series(results: dict, key: str) -> list[tuple[int, float]]:
  """(step, value) of a callback scalar over training, sorted by step
  (`rundir.series`, which reads either results.json layout)."""
  return [(step, value) for step, _, value in rundir.series(results, key)]


@dataclasses.dataclass
class Run:
  """One finished cell: its flags and what the study reads from it."""
  name: str
  state: str  # completed or diverged
  model: str
  depth: int
  width: int
  learning_rate: float
  residual_scale: float
  steps: int  # steps trained
  total_steps: int
  curve_steps: np.ndarray
  curve_losses: np.ndarray
  final_loss: float
  final_top1_error: float
  steps_to_threshold: int | None
  gram: dict  # short key -> [(step, least eigenvalue)]
  condition: dict  # short key -> [(step, condition number)]
  wall_seconds: float
  num_parameters: int

  def gram_at(self, key: str, which: str, condition: bool = False
              ) -> float:
    """Least eigenvalue `key` (or its condition number) at "init", at the
    "end", or its "min" over training."""
    series = (self.condition if condition else self.gram).get(key) or []
    if not series:
      return math.nan
    if which == "init":
      return series[0][1] if series[0][0] == 0 else math.nan
    if which == "end":
      return series[-1][1]
    return min(v for _, v in series)


def load_run(cell_dir: str, threshold: float = THRESHOLD) -> Run | None:
  """The finished run in `cell_dir`, or None if it has not finished."""
  results = rundir.read_results(cell_dir)
  state = sweep.cell_state(cell_dir, results)
  if state not in sweep.FINISHED:
    return None
  flags = rundir.load_config(cell_dir)
  history = results.get("history", [])
  batch = read_scalar_events(os.path.join(cell_dir, "train"), LOSS_TAGS)
  steps, losses = loss_curve(history, batch)
  final = results.get("final") or {}
  final_loss = rundir.number(final.get("train_loss"))
  if state == sweep.DIVERGED:
    final_loss = math.inf
  return Run(
      name=os.path.basename(os.path.normpath(cell_dir)), state=state,
      model=flags.model, depth=int(flags.depth), width=int(flags.width),
      learning_rate=float(flags.learning_rate),
      residual_scale=float(flags.residual_scale),
      steps=int(results.get("steps", 0)),
      total_steps=int(results.get("total_steps", 0)),
      curve_steps=steps, curve_losses=losses, final_loss=final_loss,
      final_top1_error=rundir.number(final.get("train_top1_error")),
      steps_to_threshold=steps_to_threshold(steps, losses, threshold),
      gram={short: measurement_series(results, key)
            for short, key in GRAM_KEYS.items()},
      condition={short: measurement_series(results, key)
                 for short, key in CONDITION_KEYS.items()},
      wall_seconds=rundir.number(final.get("wall_seconds")),
      num_parameters=int(results.get("num_parameters", 0)))


def load_runs(study_dir: str, cells: Iterable[sweep.Cell],
              threshold: float = THRESHOLD) -> tuple[list[Run], list[str]]:
  """The finished runs of `cells` under `study_dir`, and unfinished names.

  Raises:
    UserError: `study_dir` is not a directory.
  """
  return common.load_runs(study_dir, cells, lambda cell: load_run(
      os.path.join(study_dir, cell.name), threshold))


# --- Summary -----------------------------------------------------------------


def _rank(run: Run) -> tuple:
  """Best first: reached sooner, else lower final loss; then smaller lr."""
  if run.steps_to_threshold is not None:
    return (0, run.steps_to_threshold, run.final_loss, run.learning_rate)
  loss = run.final_loss if math.isfinite(run.final_loss) else math.inf
  return (1, loss, 0, run.learning_rate)


def best_runs(runs: Sequence[Run]) -> dict[tuple[str, int, int], Run]:
  """The best learning rate's run per (model, depth, width).

  Best: reaches the threshold in the fewest steps; if no rate does, the
  lowest final training loss; diverged runs come last.
  """
  groups = {}
  for run in runs:
    groups.setdefault((run.model, run.depth, run.width), []).append(run)
  return {key: min(group, key=_rank) for key, group in sorted(groups.items())}


def run_row(run: Run, threshold: float = THRESHOLD) -> dict:
  """A CSV row of one run."""
  row = {"model": run.model, "depth": run.depth, "width": run.width,
         "learning_rate": run.learning_rate,
         "residual_scale": run.residual_scale if run.model == "fc_resnet"
         else "", "state": run.state, "steps": run.steps,
         "final_train_loss": run.final_loss,
         "final_train_top1_error": run.final_top1_error,
         "threshold": threshold,
         "reached_threshold": run.steps_to_threshold is not None,
         "steps_to_threshold": ("" if run.steps_to_threshold is None
                                else run.steps_to_threshold)}
  for short in GRAM_KEYS:
    for which in ("init", "end", "min"):
      row[f"{short}_min_eigenvalue_{which}"] = run.gram_at(short, which)
    for which in ("init", "end"):
      row[f"{short}_condition_number_{which}"] = run.gram_at(
          short, which, condition=True)
  row.update({"num_parameters": run.num_parameters,
              "wall_seconds": run.wall_seconds, "run": run.name})
  return row


def write_csv(path: str, runs: Sequence[Run],
              threshold: float = THRESHOLD) -> None:
  sweep.write_csv(path, [run_row(r, threshold) for r in runs])


def _fmt(value: float, spec: str = ".3g") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, float) and math.isinf(value):
    return "diverged"
  return format(value, spec)


def _fmt_eig(value: float) -> str:
  """A least eigenvalue; at or below SINGULAR (float32 noise can make it
  slightly negative) it is a numerical zero, shown as ~0."""
  return "~0" if value <= SINGULAR else _fmt(value)


def markdown(best: dict, threshold: float = THRESHOLD,
             unfinished: Sequence[str] = ()) -> str:
  """One table per model: rows depth, columns width, best learning rate."""
  lines = []
  widths = sorted({w for _, _, w in best})
  for model in [m for m in MODELS if any(k[0] == m for k in best)] + sorted(
      {k[0] for k in best} - set(MODELS)):
    depths = sorted({d for m, d, _ in best if m == model})
    lines.append(f"**{model}** — final training loss / steps to loss < "
                 f"{threshold:g} / least NTK eigenvalue at init -> end (~0: "
                 f"numerically singular) "
                 f"(best learning rate)")
    lines.append("")
    lines.append("| depth | " + " | ".join(f"width {w}" for w in widths)
                 + " |")
    lines.append("|---|" + "---|" * len(widths))
    for depth in depths:
      cells = []
      for width in widths:
        run = best.get((model, depth, width))
        if run is None:
          cells.append("")
          continue
        reached = (f"{run.steps_to_threshold} steps"
                   if run.steps_to_threshold is not None else "not reached")
        cells.append(
            f"{_fmt(run.final_loss)} / {reached} / "
            f"{_fmt_eig(run.gram_at('ntk', 'init'))} -> "
            f"{_fmt_eig(run.gram_at('ntk', 'end'))} "
            f"(lr {run.learning_rate:g})")
      lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    lines.append("")
  if unfinished:
    lines.append(f"{len(unfinished)} runs unfinished and left out: "
                 + ", ".join(unfinished))
    lines.append("")
  return "\n".join(lines)


def summary_json(runs: Sequence[Run], best: dict, unfinished: Sequence[str],
                 threshold: float = THRESHOLD) -> dict:
  return {"threshold": threshold,
          "best": [run_row(r, threshold) for r in best.values()],
          "runs": len(runs), "unfinished": list(unfinished),
          "reached": sum(r.steps_to_threshold is not None
                         for r in best.values()),
          "settings": len(best)}


# --- Figures -----------------------------------------------------------------




def _depth_axis(ax, depths, label="depth (hidden layers / residual blocks)"):
  ax.set_xscale("log", base=2)
  ax.set_xticks(depths, [str(d) for d in depths])
  ax.minorticks_off()
  ax.set_xlabel(label)


def _models(best) -> list[str]:
  present = {k[0] for k in best}
  return [m for m in MODELS if m in present] + sorted(present - set(MODELS))


def figures(best: dict, threshold: float = THRESHOLD) -> dict[str, bytes]:
  """The study's figures as PNG bytes, by file name (best rate per setting).

  Raises:
    UserError: no finished runs.
  """
  if not best:
    raise UserError("no finished runs to plot yet; run the study first")
  plt = figures_lib.pyplot()
  models = _models(best)
  widths = sorted({w for _, _, w in best})
  depths = sorted({d for _, d, _ in best})
  cmap = plt.get_cmap("viridis")
  wcolor = {w: cmap(i / max(1, len(widths) - 1) * 0.9)
            for i, w in enumerate(widths)}
  dcolor = {d: plt.get_cmap("plasma")(i / max(1, len(depths) - 1) * 0.85)
            for i, d in enumerate(depths)}
  budget = max(r.total_steps for r in best.values())
  out = {}

  # Final training loss against depth.
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8),
                           sharey=True, squeeze=False)
  for ax, model in zip(axes[0], models):
    for w in widths:
      pts = [(d, best[(model, d, w)].final_loss) for d in depths
             if (model, d, w) in best
             and math.isfinite(best[(model, d, w)].final_loss)]
      if pts:
        ax.plot(*zip(*pts), marker="o", color=wcolor[w], label=f"width {w}")
    ax.axhline(threshold, color="0.4", ls=":", lw=1,
               label=f"loss {threshold:g}")
    _depth_axis(ax, depths)
    ax.set_yscale("log")
    ax.set_title(f"{model}: training loss after {budget} GD steps")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("final training loss (random labels)")
  axes[0][-1].legend(fontsize=8)
  out["random_labels_final_loss.png"] = figures_lib.png(fig)

  # Steps to the threshold against depth; not reached drawn above the budget.
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8),
                           sharey=True, squeeze=False)
  ceiling = budget * 1.25
  for ax, model in zip(axes[0], models):
    for w in widths:
      runs = [(d, best[(model, d, w)]) for d in depths
              if (model, d, w) in best]
      reached = [(d, r.steps_to_threshold) for d, r in runs
                 if r.steps_to_threshold is not None]
      missed = [d for d, r in runs if r.steps_to_threshold is None]
      ax.plot([d for d, _ in reached], [s for _, s in reached], marker="o",
              color=wcolor[w], label=f"width {w}")
      if missed:
        ax.scatter(missed, [ceiling] * len(missed), marker="x", s=60,
                   color=wcolor[w])
    ax.axhline(budget, color="0.4", ls=":", lw=1)
    ax.text(0.02, ceiling, "x: not reached", transform=ax.get_yaxis_transform(),
            va="bottom", fontsize=8)
    _depth_axis(ax, depths)
    ax.set_ylim(0, ceiling * 1.12)
    ax.set_title(f"{model}: steps to training loss < {threshold:g}")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(f"GD steps (budget {budget}, dotted)")
  axes[0][-1].legend(fontsize=8)
  out["random_labels_steps_to_threshold.png"] = figures_lib.png(fig)

  # Loss curves and Gram eigenvalues: one panel per (model, width).
  for name, draw, ylabel in (
      ("random_labels_loss_curves.png", "loss", "training loss"),
      ("random_labels_ntk_eigenvalue.png", "ntk",
       "least eigenvalue, NTK Gram"),
      ("random_labels_features_eigenvalue.png", "features",
       "least eigenvalue, F F^T/width")):
    fig, axes = plt.subplots(len(models), len(widths),
                             figsize=(3.6 * len(widths), 3.0 * len(models)),
                             sharex=True, sharey=True, squeeze=False)
    any_data = False
    for i, model in enumerate(models):
      for j, w in enumerate(widths):
        ax = axes[i][j]
        for d in depths:
          run = best.get((model, d, w))
          if run is None:
            continue
          if draw == "loss":
            xs, ys = run.curve_steps, run.curve_losses
          else:
            series = [(s, v) for s, v in run.gram.get(draw, [])
                      if v > SINGULAR]
            xs = [s for s, _ in series]
            ys = [v for _, v in series]
          if len(xs):
            any_data = True
            ax.plot(xs, ys, color=dcolor[d], marker=None if draw == "loss"
                    else "o", ms=3, label=f"depth {d}")
        if draw == "loss":
          ax.axhline(threshold, color="0.4", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{model}, width {w}", fontsize=9)
        ax.grid(alpha=0.3)
        if i == len(models) - 1:
          ax.set_xlabel("GD step")
        if j == 0:
          ax.set_ylabel(ylabel, fontsize=8)
    if any_data:
      axes[0][-1].legend(fontsize=7)
      out[name] = figures_lib.png(fig)
    else:
      plt.close(fig)

  # Least eigenvalues at initialisation against depth.
  keys = [k for k in ("ntk", "features")
          if any(r.gram.get(k) for r in best.values())]
  if keys:
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8),
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
      for model, style in zip(models, ("-", "--", "-.", ":")):
        for w in widths:
          pts = [(d, best[(model, d, w)].gram_at(key, "init")) for d in depths
                 if (model, d, w) in best]
          pts = [(d, v) for d, v in pts if v > SINGULAR]
          if pts:
            ax.plot(*zip(*pts), style, marker="o", color=wcolor[w],
                    label=f"{model} w{w}")
      _depth_axis(ax, depths, "depth")
      ax.set_yscale("log")
      ax.set_title(f"at initialisation: {GRAM_LABELS[key]}", fontsize=9)
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"least eigenvalue (values <= {SINGULAR:g} left "
                          f"out)", fontsize=8)
    axes[0][-1].legend(fontsize=7, ncol=2)
    out["random_labels_gram_at_init.png"] = figures_lib.png(fig)
  return out


