"""Gradient confusion vs width, depth, initialisation, batch norm and skips.

Sankararaman, De, Xu, Huang & Goldstein, "The impact of neural network
overparameterization on gradient confusion and stochastic gradient descent"
(papers/001 holds the abstract): gradient confusion is the smallest eta >= 0
with <g_i, g_j> >= -eta for all pairs of per-example loss gradients (their
Def. 2.1). The abstract makes four claims this study checks on a small scale:
  1. with standard initialisations (Gaussian, Glorot, He) wider nets have
     less confusion and deeper nets more;
  2. with orthogonal initialisation the early training of deep LINEAR nets
     does not depend on depth;
  3. batch norm together with skip connections lowers confusion in deep
     nets.

A study is one base flagfile whose comment lines name its parts, each a grid
in the sweep syntax (`tfcapacity.studies.sweep.parse_grid`; single values
are plain overrides of the base flags):

  # confusion.init_width: kernel_init=glorot_normal,he_normal; width=16,64
  # confusion.train_linear: activation=linear; depth=1,4,16

One key is the study's own, not a flag: `lr_x_depth=c` gives each cell
`--learning_rate=c/depth`, so that the total step over a linear net's layers
stays the same as depth grows (for the depth-independence claim 2).

A part whose name starts with `init_` is measured at initialisation, in
process: each cell's model is built as the training loop builds it (same
seed, `keras.utils.set_random_seed(seed)` then `models.from_config`), and
the Gram matrix of the per-example loss gradients of `--gradients_examples`
training examples (the ones the gradients callback of a run with that seed
would use) is summarised by `statistics.summarize`. Each cell's result is
cached as JSON, so a rerun skips it. A part whose name starts with `train_`
is a sweep of training runs (`tfcapacity.studies.sweep`, resumable), whose
gradients callback logs the same statistics during training.

Deviation to know about: per-example gradients use batch norm in inference
mode (`tfcapacity.gradients.per_example`). A fresh model's moving statistics
are mean 0 and variance 1, so batch norm at initialisation would be the
identity map. At init this study therefore first sets the moving statistics
to the batch statistics of the whole training set
(`objective.function.recompute_batch_norm`, on by default); the gradients
then treat those statistics as constants. A training run's own step-0
measurement is uncalibrated, and later ones use the moving averages the run
has accumulated (momentum --bn_momentum).

Raw inner products scale with the squared gradient norm (which grows with
width under Glorot and He initialisation), so the report puts the cosine
statistics (min and mean pairwise cosine, scale-free) first and shows the
raw confusion beside them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Iterable, Sequence

import numpy as np

from tfcapacity import figures as figures_lib
from tfcapacity.errors import UserError
from tfcapacity.studies import common
from tfcapacity.studies import sweep
from tfcapacity import rundir

PART_COMMENT = re.compile(r"^\s*#\s*confusion\.([A-Za-z0-9_]+):\s*(.+?)\s*$")
INIT, TRAIN = "init_", "train_"
# A grid key of the study, not a flag: learning_rate = value / depth.
LR_X_DEPTH = "lr_x_depth"
AT_INIT_DIR = "at_init"
# The statistics a row carries, in CSV order (from statistics.summarize,
# plus the mean squared gradient norm and the Gram spectrum).
STATS = ("gradient_confusion", "min_inner_product", "mean_inner_product",
         "min_cosine", "mean_cosine", "cosine_q0.01", "cosine_q0.5",
         "cosine_q0.99", "gradient_diversity", "mean_sq_norm",
         "gram_min_eigenvalue", "gram_max_eigenvalue")
# The flags that describe a setting (the CSV's leading columns).
SETTING = ("model", "width", "depth", "activation", "kernel_init",
           "normalization", "residual_scale", "learning_rate", "seed")
# Flags that change the model or its seed but not the data.
_MODEL_FLAGS = frozenset({
    "model", "width", "depth", "activation", "kernel_init", "normalization",
    "ghost_batch_size", "bn_momentum", "zero_init_classifier",
    "residual_scale", "leaky_slope", "learning_rate", "optimizer",
    "momentum", "model_dir"})


# --- The study's parts --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
  name: str
  grid: tuple  # ((flag, (values...)), ...)

  @property
  def at_init(self) -> bool:
    return self.name.startswith(INIT)

  def cells(self) -> list[sweep.Cell]:
    """The grid's cells; `lr_x_depth=c` becomes --learning_rate=c/depth."""
    out = []
    for cell in sweep.cells(self.grid):
      values = dict(cell.overrides)
      if LR_X_DEPTH in values:
        rate = float(values[LR_X_DEPTH]) / int(values["depth"])
        cell = sweep.Cell(cell.index, tuple(
            (k, v) for k, v in cell.overrides if k != LR_X_DEPTH) + (
                ("learning_rate", format(rate, ".12g")),))
      out.append(cell)
    return out


def parse_parts(text: str) -> list[Part]:
  """The `# confusion.<part>: grid` lines of a flagfile, in file order.

  Several lines of one part are joined with ';'.

  Raises:
    UserError: no such lines, a part name without init_/train_, or a bad
      grid.
  """
  specs: dict[str, list[str]] = {}
  for line in text.splitlines():
    m = PART_COMMENT.match(line)
    if m:
      specs.setdefault(m.group(1), []).append(m.group(2))
  if not specs:
    raise UserError("the flagfile has no '# confusion.<part>: flag=v1,v2' "
                    "lines; add the study's parts there (see "
                    "flags/confusion_mnist1d_cpu.flags)")
  parts = []
  for name, lines in specs.items():
    if not name.startswith((INIT, TRAIN)):
      raise UserError(f"part confusion.{name} must start with '{INIT}' "
                      f"(measured at initialisation) or '{TRAIN}' (training "
                      f"runs)")
    try:
      grid = sweep.parse_grid(";".join(lines))
    except UserError as e:
      raise UserError(f"confusion.{name}: {e}") from None
    _check_lr_x_depth(name, dict(grid))
    parts.append(Part(name, tuple((k, tuple(v)) for k, v in grid)))
  return parts


def _check_lr_x_depth(name: str, grid: dict) -> None:
  if LR_X_DEPTH not in grid:
    return
  if "learning_rate" in grid:
    raise UserError(f"confusion.{name} sets both {LR_X_DEPTH} and "
                    f"learning_rate; keep one")
  if "depth" not in grid:
    raise UserError(f"confusion.{name}: {LR_X_DEPTH} needs the part's own "
                    f"depth values; add depth=... to its grid")
  try:
    ok = all(float(v) > 0 for v in grid[LR_X_DEPTH]) and all(
        int(d) > 0 for d in grid["depth"])
  except ValueError:
    ok = False
  if not ok:
    raise UserError(f"confusion.{name}: {LR_X_DEPTH} must be positive "
                    f"numbers and depth positive integers")


def select(parts: Sequence[Part], names: Sequence[str] | None
           ) -> list[Part]:
  """The parts named (all when `names` is empty).

  Raises:
    UserError: an unknown name.
  """
  if not names:
    return list(parts)
  known = [p.name for p in parts]
  for n in names:
    if n not in known:
      raise UserError(f"--parts names {n!r}, which the flagfile does not "
                      f"define; its parts are: {', '.join(known)}")
  return [p for p in parts if p.name in names]


# --- Measurement at initialisation ------------------------------------------


def flat_statistics(gram: np.ndarray) -> dict:
  """`statistics.summarize(gram)` flattened, with the Gram's spectrum."""
  from tfcapacity.gradients import statistics  # pylint: disable=g-import-not-at-top
  s = statistics.summarize(gram)
  out = {k: s[k] for k in ("gradient_confusion", "min_inner_product",
                           "mean_inner_product", "min_cosine", "mean_cosine",
                           "gradient_diversity")}
  for level, value in s["cosine_quantiles"].items():
    out[f"cosine_q{level}"] = value
  out["mean_sq_norm"] = float(np.trace(gram) / gram.shape[0])
  spectrum = statistics.gram_spectrum(gram)
  out["gram_min_eigenvalue"] = spectrum["min_eigenvalue"]
  out["gram_max_eigenvalue"] = spectrum["max_eigenvalue"]
  out["num_examples"] = s["num_examples"]
  return out


class _DataCache:
  """Training sets by their data flags (the cells of a study share one)."""

  def __init__(self):
    self._data = {}

  def get(self, cfg):
    from tfcapacity import data as data_lib  # pylint: disable=g-import-not-at-top
    key = tuple(sorted((k, repr(v)) for k, v in cfg.values.items()
                       if k not in _MODEL_FLAGS and k != "seed"))
    key += ((cfg.seed if cfg.random_labels or cfg.label_noise else None),)
    if key not in self._data:
      self._data[key] = data_lib.get(cfg.dataset, "train", cfg)
    return self._data[key]


def measure_at_init(cfg, *, calibrate_bn: bool = True, cache=None) -> dict:
  """Gradient statistics of the model `cfg` describes, as initialised.

  The examples are the `--gradients_examples` training examples that the
  gradients callback of a run with these flags compares.

  Returns:
    flat statistics (see `flat_statistics`) plus num_parameters and
    bn_layers_calibrated.
  """
  import keras  # pylint: disable=g-import-not-at-top
  from tfcapacity import models as models_lib  # pylint: disable=g-import-not-at-top
  from tfcapacity.gradients import callback  # pylint: disable=g-import-not-at-top
  from tfcapacity.gradients import per_example  # pylint: disable=g-import-not-at-top
  from tfcapacity.objective import function as function_lib  # pylint: disable=g-import-not-at-top
  train = (cache or _DataCache()).get(cfg)
  info = train.info
  index = callback.fixed_indices(cfg.seed, info.num_examples,
                                 cfg.gradients_examples)
  x, y = train.examples(index)
  keras.utils.set_random_seed(cfg.seed)
  model = models_lib.from_config(cfg, info.input_shape, info.num_classes)
  calibrated = 0
  if calibrate_bn and cfg.normalization != "none":
    xs, _ = train.examples(np.arange(info.num_examples))
    calibrated = function_lib.recompute_batch_norm(model, xs)
  gram = per_example.gradient_inner_products(
      model, x, y, chunk_size=cfg.gradients_chunk_size, loss=cfg.loss)
  out = flat_statistics(gram)
  out["num_parameters"] = int(sum(int(np.prod(v.shape))
                                  for v in model.trainable_variables))
  out["bn_layers_calibrated"] = calibrated
  return out


def setting(cfg) -> dict:
  return {k: cfg.values[k] for k in SETTING}


def run_at_init(study_dir: str, part: Part, configs: dict, *,
                calibrate_bn: bool = True, log=None) -> list[dict]:
  """Measures (or reads the cached) at-init statistics of a part's cells.

  Each cell's result is `<study_dir>/at_init/<part>/<cell>.json`; a file
  that exists is read, not recomputed, as long as it was made with the same
  flags and calibration.
  """
  import keras  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(study_dir, AT_INIT_DIR, part.name)
  os.makedirs(out_dir, exist_ok=True)
  cache = _DataCache()
  rows = []
  for cell in part.cells():
    cfg = configs[cell.name]
    path = os.path.join(out_dir, cell.name + ".json")
    flags = {k: v for k, v in sorted(cfg.semantic_dict().items())}
    record = _read_json(path)
    if not (record and record.get("flags") == _jsonable(flags)
            and record.get("calibrate_bn") == calibrate_bn):
      stats = measure_at_init(cfg, calibrate_bn=calibrate_bn, cache=cache)
      record = {"flags": _jsonable(flags), "calibrate_bn": calibrate_bn,
                "statistics": stats}
      rundir.write_json(path, record)
      keras.backend.clear_session()
      if log:
        log(f"{part.name}/{cell.name}: min cosine "
            f"{stats['min_cosine']:.3f}, mean cosine "
            f"{stats['mean_cosine']:.3f}")
    rows.append({"part": part.name, **setting(cfg),
                 **record["statistics"], "cell": cell.name})
  return rows


def read_at_init(study_dir: str, part: Part, configs: dict) -> list[dict]:
  """The cached at-init rows of a part (nothing is measured)."""
  rows = []
  for cell in part.cells():
    record = _read_json(os.path.join(study_dir, AT_INIT_DIR, part.name,
                                     cell.name + ".json"))
    if record:
      rows.append({"part": part.name, **setting(configs[cell.name]),
                   **record["statistics"], "cell": cell.name})
  return rows


def _jsonable(obj):
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(json.dumps(obj, default=str))


def _read_json(path: str):
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# --- Training runs -----------------------------------------------------------

GRADIENT_KEYS = {k: f"gradients/{k}" for k in (
    "gradient_confusion", "min_inner_product", "mean_inner_product",
    "min_cosine", "mean_cosine", "gradient_diversity")}


def _series(results: dict, key: str) -> dict[int, float]:
  """step -> value of `key` (`rundir.series`, either results.json layout)."""
  return {step: value for step, _, value in rundir.series(results, key)}


def training_rows(study_dir: str, part: Part) -> tuple[list[dict],
                                                       list[dict],
                                                       list[str]]:
  """A training part's rows from its run directories.

  Returns:
    (per step rows: setting, step, epoch, train_loss where evaluated and
     the gradient statistics where measured;
     per run rows: setting, state, steps, final train loss and error,
     min/mean cosine and confusion at step 0, at the last measurement and
     averaged over the measurements;
     names of cells not finished).
  """
  part_dir = os.path.join(study_dir, part.name)
  steps_rows, run_rows, unfinished = [], [], []
  for cell in part.cells():
    cell_dir = os.path.join(part_dir, cell.name)
    results = rundir.read_results(cell_dir) if os.path.isdir(cell_dir) else None
    state = sweep.cell_state(cell_dir, results) if results else sweep.PENDING
    if state not in sweep.FINISHED:
      unfinished.append(cell.name)
      continue
    cfg = rundir.load_config(cell_dir)
    base = {"part": part.name, **setting(cfg)}
    losses = _series(results, "train_loss")
    series = {short: _series(results, key)
              for short, key in GRADIENT_KEYS.items()}
    steps = sorted(set(losses) | set().union(*series.values()))
    spe = int(results.get("steps_per_epoch") or 1)
    for step in steps:
      row = {**base, "step": step, "epoch": step / spe,
             "train_loss": losses.get(step, "")}
      for short in GRADIENT_KEYS:
        value = series[short].get(step)
        row[short] = "" if value is None else value
      steps_rows.append(row)
    final = results.get("final") or {}
    run = {**base, "state": state, "steps": int(results.get("steps", 0)),
           "final_train_loss": (math.inf if state == sweep.DIVERGED else
                                float(final.get("train_loss", math.nan))),
           "final_train_top1_error": float(final.get("train_top1_error",
                                                     math.nan))}
    for short in ("gradient_confusion", "min_cosine", "mean_cosine"):
      values = [v for _, v in sorted(series[short].items())]
      run[f"{short}_step0"] = series[short].get(0, math.nan)
      run[f"{short}_last"] = values[-1] if values else math.nan
      run[f"{short}_mean"] = (float(np.mean(values)) if values
                              else math.nan)
    run["num_parameters"] = int(results.get("num_parameters", 0))
    run["wall_seconds"] = float(final.get("wall_seconds", math.nan))
    run["cell"] = cell.name
    run_rows.append(run)
  return steps_rows, run_rows, unfinished


# --- Aggregation and tables --------------------------------------------------


def aggregate(rows: Sequence[dict], keys: Sequence[str] = (
    "min_cosine", "mean_cosine", "gradient_confusion")) -> list[dict]:
  """Mean and standard deviation over seeds of each (part, setting)."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    setting_key = tuple((k, row[k]) for k in ("part",) + SETTING
                        if k != "seed")
    groups.setdefault(setting_key, []).append(row)
  out = []
  for setting_key, group in groups.items():
    row = dict(setting_key)
    row["seeds"] = len(group)
    for k in keys:
      values = np.array([float(r[k]) for r in group], np.float64)
      row[f"{k}_mean"] = float(np.mean(values))
      row[f"{k}_std"] = float(np.std(values))
    out.append(row)
  return out


def _varying(part: Part) -> list[str]:
  return [k for k, v in part.grid if len(v) > 1 and k != "seed"]


def _fmt(value, spec=".3g") -> str:
  if value == "" or value is None:
    return "-"
  value = float(value)
  if math.isnan(value):
    return "-"
  if math.isinf(value):
    return "diverged"
  return format(value, spec)


def markdown_at_init(part: Part, agg: Sequence[dict]) -> str:
  """A table of a part's at-init statistics (mean ± std over seeds)."""
  rows = [r for r in agg if r["part"] == part.name]
  keys = _varying(part) or ["model"]
  lines = [f"**{part.name}** (at initialisation, mean ± std over "
           f"{rows[0]['seeds'] if rows else 0} seeds)", "",
           "| " + " | ".join(keys) + " | min cosine | mean cosine | "
           "gradient confusion |",
           "|" + "---|" * (len(keys) + 3)]
  for r in rows:
    lines.append("| " + " | ".join(str(r[k]) for k in keys) + " | " + " | ".join(
        f"{_fmt(r[f'{s}_mean'])} ± {_fmt(r[f'{s}_std'], '.2g')}"
        for s in ("min_cosine", "mean_cosine", "gradient_confusion")) + " |")
  return "\n".join(lines) + "\n"


def markdown_training(part: Part, runs: Sequence[dict],
                      unfinished: Sequence[str]) -> str:
  """A table of a training part's runs."""
  keys = _varying(part) or ["model"]
  lines = [f"**{part.name}** (training runs; cosines at step 0 / averaged "
           f"over the run's measurements / at the last one)", "",
           "| " + " | ".join(keys) + " | final train loss | min cosine "
           "0 / mean / last | mean cosine 0 / mean / last | confusion 0 / "
           "last |", "|" + "---|" * (len(keys) + 4)]
  for r in runs:
    cos = [" / ".join(_fmt(r[f"{s}_{w}"]) for w in ("step0", "mean", "last"))
           for s in ("min_cosine", "mean_cosine")]
    conf = " / ".join(_fmt(r[f"gradient_confusion_{w}"])
                      for w in ("step0", "last"))
    lines.append("| " + " | ".join(str(r[k]) for k in keys) + " | "
                 f"{_fmt(r['final_train_loss'])} | {cos[0]} | {cos[1]} | "
                 f"{conf} |")
  if unfinished:
    lines += ["", f"unfinished, left out: {', '.join(unfinished)}"]
  return "\n".join(lines) + "\n"


# --- Figures -----------------------------------------------------------------




_STAT_LABELS = {"min_cosine": "min pairwise cosine",
                "mean_cosine": "mean pairwise cosine",
                "gradient_confusion": "gradient confusion, raw (mean; 0 omitted)"}


def _line_key(row, keys):
  return tuple(row[k] for k in keys)


def _label(keys, values):
  return ", ".join(f"{v}" if k in ("kernel_init", "model") else f"{k}={v}"
                   for k, v in zip(keys, values))


def _at_init_panel(ax, agg, part, x_key, stat):
  """One statistic against x_key, a line per value of the other flags."""
  rows = [r for r in agg if r["part"] == part.name]
  other = [k for k in _varying(part) if k != x_key]
  lines = {}
  for r in rows:
    lines.setdefault(_line_key(r, other), []).append(r)
  for key, group in sorted(lines.items(), key=lambda kv: str(kv[0])):
    group.sort(key=lambda r: float(r[x_key]))
    xs = [float(r[x_key]) for r in group]
    ys = [r[f"{stat}_mean"] for r in group]
    es = [r[f"{stat}_std"] for r in group]
    label = _label(other, key) or part.name
    if stat == "gradient_confusion":  # Log scale: means only, zeros left out.
      pts = [(x, y) for x, y in zip(xs, ys) if y > 0]
      ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3,
              label=label)
    else:
      ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=label)
  ax.set_xscale("log", base=2)
  ticks = sorted({float(r[x_key]) for r in rows})
  ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
  ax.minorticks_off()
  if stat == "gradient_confusion":
    ax.set_yscale("log")
  ax.set_xlabel(x_key)
  ax.set_ylabel(_STAT_LABELS[stat], fontsize=8)
  ax.grid(alpha=0.3)


def _training_panel(ax, steps_rows, part, line_key, fixed, y_key):
  rows = [r for r in steps_rows if r["part"] == part.name
          and all(str(r[k]) == str(v) for k, v in fixed.items())
          and r[y_key] != ""]
  lines = {}
  for r in rows:
    lines.setdefault(r[line_key], []).append(r)
  cmap = figures_lib.pyplot().get_cmap("viridis")
  ordered = sorted(lines, key=float) if all(
      _isnum(k) for k in lines) else sorted(lines, key=str)
  for i, key in enumerate(ordered):
    group = sorted(lines[key], key=lambda r: r["step"])
    ax.plot([r["step"] for r in group], [float(r[y_key]) for r in group],
            marker="o" if y_key != "train_loss" else None, ms=3,
            color=cmap(0.9 * i / max(1, len(ordered) - 1)),
            label=f"{line_key} {key}")
  ax.grid(alpha=0.3)
  ax.set_xlabel("SGD step")


def _isnum(v) -> bool:
  try:
    float(v)
    return True
  except (TypeError, ValueError):
    return False


def figures(parts: Sequence[Part], at_init: Sequence[dict],
            steps_rows: Sequence[dict], runs: Sequence[dict]
            ) -> dict[str, bytes]:
  """The study's figures as PNG bytes by file name.

  One figure per part: at-init parts plot min cosine, mean cosine and the
  raw confusion against their first varying numeric flag (width or depth);
  training parts plot the min cosine, the mean cosine and the training loss
  over the steps, one panel per value of their non-numeric flags.
  """
  plt = figures_lib.pyplot()
  agg = aggregate(at_init)
  out = {}
  for part in parts:
    varying = _varying(part)
    numeric = [k for k in varying if k in ("width", "depth")]
    if part.at_init:
      if not any(r["part"] == part.name for r in agg):
        continue
      x_key = numeric[0] if numeric else _numeric_key(part)
      stats = ("min_cosine", "mean_cosine", "gradient_confusion")
      fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
      for ax, stat in zip(axes, stats):
        _at_init_panel(ax, agg, part, x_key, stat)
      axes[0].legend(fontsize=7)
      fig.suptitle(f"{part.name}: at initialisation ({_fixed_note(part, at_init)})",
                   fontsize=10)
      out[f"confusion_{part.name}.png"] = figures_lib.png(fig)
    else:
      if not any(r["part"] == part.name for r in steps_rows):
        continue
      line_key = numeric[0] if numeric else _numeric_key(part)
      panel_keys = [k for k in varying if k != line_key]
      panels = sorted({tuple(str(r[k]) for k in panel_keys)
                       for r in steps_rows if r["part"] == part.name})
      ys = ("min_cosine", "mean_cosine", "train_loss")
      fig, axes = plt.subplots(len(ys), len(panels),
                               figsize=(3.8 * len(panels), 2.8 * len(ys)),
                               squeeze=False, sharex=True, sharey="row")
      for j, panel in enumerate(panels):
        fixed = dict(zip(panel_keys, panel))
        for i, y_key in enumerate(ys):
          ax = axes[i][j]
          _training_panel(ax, steps_rows, part, line_key, fixed, y_key)
          if y_key == "train_loss":
            ax.set_yscale("log")
          if i == 0:
            ax.set_title(", ".join(panel) or part.name, fontsize=9)
          if j == 0:
            ax.set_ylabel({"train_loss": "training loss (all train ex.)"}
                          .get(y_key, _STAT_LABELS.get(y_key, y_key)),
                          fontsize=8)
      axes[0][0].legend(fontsize=7)
      fig.suptitle(f"{part.name}: during training", fontsize=10)
      out[f"confusion_{part.name}.png"] = figures_lib.png(fig)
  summary = _training_summary(parts, runs)
  if summary:
    out["confusion_training_summary.png"] = summary
  return out


def _training_summary(parts: Sequence[Part], runs: Sequence[dict]
                      ) -> bytes | None:
  """Per training part: min cosine averaged over each run's measurements
  (solid; diverged runs left out) and at step 0 (dotted) against width or
  depth."""
  plt = figures_lib.pyplot()
  parts = [p for p in parts if not p.at_init
           and any(r["part"] == p.name for r in runs)]
  if not parts:
    return None
  fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.6),
                           squeeze=False)
  for ax, part in zip(axes[0], parts):
    numeric = [k for k in _varying(part) if k in ("width", "depth")]
    x_key = numeric[0] if numeric else _numeric_key(part)
    other = [k for k in _varying(part) if k != x_key]
    lines = {}
    for r in runs:
      if r["part"] == part.name:
        lines.setdefault(_line_key(r, other), []).append(r)
    for i, (key, group) in enumerate(sorted(lines.items(),
                                            key=lambda kv: str(kv[0]))):
      group.sort(key=lambda r: float(r[x_key]))
      color = f"C{i}"
      xs = [float(r[x_key]) for r in group]
      done = [r for r in group if r["state"] != sweep.DIVERGED]
      ax.plot([float(r[x_key]) for r in done],
              [r["min_cosine_mean"] for r in done], marker="o",
              color=color, label=_label(other, key) or part.name)
      ax.plot(xs, [r["min_cosine_step0"] for r in group], ":", marker=".",
              color=color)
    ticks = sorted({float(r[x_key]) for r in runs if r["part"] == part.name})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(x_key)
    ax.set_title(part.name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("min pairwise cosine: mean over training (solid),\n"
                        "step 0 (dotted)", fontsize=8)
  return figures_lib.png(fig)


def _numeric_key(part: Part) -> str:
  """Width or depth, whichever the part sets (depth if neither)."""
  return next((k for k, _ in part.grid if k in ("width", "depth")), "depth")


def _fixed_note(part: Part, rows: Sequence[dict]) -> str:
  """The flags a part keeps fixed that readers need (width or depth)."""
  mine = [r for r in rows if r["part"] == part.name]
  if not mine:
    return ""
  notes = []
  for k in ("width", "depth", "activation", "model", "normalization"):
    values = {r[k] for r in mine}
    if len(values) == 1:
      notes.append(f"{k} {values.pop()}")
  return ", ".join(notes) + f"; {mine[0].get('num_examples', '?')} examples"




def write_csv(path: str, rows: Iterable[dict]) -> None:
  sweep.write_csv(path, list(rows))
