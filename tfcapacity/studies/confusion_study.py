"""Gradient confusion vs width, depth, initialisation, batch norm and skips.

Sankararaman, De, Xu, Huang & Goldstein, "The impact of neural network
overparameterization on gradient confusion and stochastic gradient descent"
(papers/001 holds the abstract): gradient confusion is the smallest eta >= 0
with <g_i, g_j> >= -eta for all pairs of per-example loss gradients (their
Def. 2.1). The abstract makes three claims this study checks on a small scale:
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
then treat those statistics as constants. The gradients callback of a
training run cannot calibrate, so its step-0 measurement (and its step-0
evaluation) of a batch-norm run sees the identity: the report leaves step 0
of batch-norm runs out of its rows, tables, figures and claims. Later
measurements use the moving averages the run has accumulated (momentum
--bn_momentum).

Raw inner products scale with the squared gradient norm (which grows with
width under Glorot and He initialisation), so the report's headline is the
cosine of pairs of per-example gradients (min and mean pairwise cosine,
scale-free); the raw confusion is a secondary table.

Seeds and learning rates: every part may have a seed axis; tables give mean
± std over seeds, claims mean ± std [min, max] (`common.spread`). A training
part with several learning rates in its grid is a rate grid: per setting
(all flags but rate and seed) the report keeps the rate with the least mean
final training loss over seeds (`rate_table`, `at_best_rate`) and checks
that it is inside the grid. The claims (`evaluate`) are the abstract's,
each with its rule and a verdict the rule computes (`common.Claim`).
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

AGREES, DISAGREES = common.AGREES, common.DISAGREES
NOT_MEASURED, MEASURED = common.NOT_MEASURED, common.MEASURED
Claim = common.Claim
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
  """The JSON file at `path`, non-finite numbers restored; None if it is
  missing or unreadable."""
  try:
    return rundir.read_json(path)
  except (OSError, ValueError):
    return None


# --- Training runs -----------------------------------------------------------

GRADIENT_KEYS = {k: f"gradients/{k}" for k in (
    "gradient_confusion", "min_inner_product", "mean_inner_product",
    "min_cosine", "mean_cosine", "gradient_diversity")}
# The statistics a run is summarised by (at step 0, over training, last).
RUN_STATS = ("min_cosine", "mean_cosine", "gradient_confusion")
# "Early training" (claim 2): the evaluation nearest this fraction of a run.
EARLY_FRACTION = 1 / 3


def _series(results: dict, key: str) -> dict[int, float]:
  """step -> value of `key` (`rundir.series`, either results.json layout)."""
  return {step: value for step, _, value in rundir.series(results, key)}


def _finite_mean(values: Iterable[float]) -> float:
  values = [v for v in values if math.isfinite(v)]
  return float(np.mean(values)) if values else math.nan


def early_step(steps: Iterable[int], total_steps: int) -> int | None:
  """The step after 0 nearest EARLY_FRACTION of `total_steps` (the earlier
  of two equally near); None without one."""
  steps = [s for s in steps if s > 0]
  if not steps or total_steps <= 0:
    return None
  target = EARLY_FRACTION * total_steps
  return min(steps, key=lambda s: (abs(s - target), s))


def training_rows(study_dir: str, part: Part) -> tuple[list[dict],
                                                       list[dict],
                                                       list[str]]:
  """A training part's rows from its run directories.

  Step 0 of a batch-norm run is left out (its statistics and its training
  loss): per-example gradients and evaluation use batch norm in inference
  mode, and at step 0 the moving statistics were never updated, so batch
  norm is the identity there. The calibrated value at initialisation is the
  init_* parts' one.

  Returns:
    (per step rows: setting, step, epoch, train_loss where evaluated and
     the gradient statistics where measured;
     per run rows: setting, state, steps, final train loss and error, the
     training loss at the early step (`early_step`), and for each of
     RUN_STATS its value at step 0 (NaN for batch norm), its mean over the
     measurements after step 0 (`_train`) and the last one (`_last`);
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
    batch_norm = cfg.normalization != "none"
    losses = _series(results, "train_loss")
    series = {short: _series(results, key)
              for short, key in GRADIENT_KEYS.items()}
    if batch_norm:
      for values in (losses, *series.values()):
        values.pop(0, None)
    steps = sorted(set(losses) | set().union(*series.values()))
    spe = int(results.get("steps_per_epoch") or 1)
    for step in steps:
      row = {**base, "step": step, "epoch": step / spe,
             "train_loss": losses.get(step, ""), "cell": cell.name}
      for short in GRADIENT_KEYS:
        value = series[short].get(step)
        row[short] = "" if value is None else value
      steps_rows.append(row)
    final = results.get("final") or {}
    total = int(results.get("total_steps") or results.get("steps") or 0)
    early = early_step(losses, total)
    run = {**base, "state": state, "steps": int(results.get("steps", 0)),
           "batch_norm_step0_left_out": int(batch_norm),
           "final_train_loss": (math.inf if state == sweep.DIVERGED else
                                rundir.number(final.get("train_loss"))),
           "final_train_top1_error": rundir.number(
               final.get("train_top1_error")),
           "early_step": "" if early is None else early,
           "train_loss_early": (math.nan if early is None
                                else float(losses[early]))}
    for short in RUN_STATS:
      later = [v for s, v in sorted(series[short].items()) if s > 0]
      run[f"{short}_step0"] = series[short].get(0, math.nan)
      run[f"{short}_train"] = _finite_mean(later)
      run[f"{short}_last"] = later[-1] if later else math.nan
    run["num_parameters"] = int(results.get("num_parameters", 0))
    run["wall_seconds"] = rundir.number(final.get("wall_seconds"))
    run["cell"] = cell.name
    run_rows.append(run)
  return steps_rows, run_rows, unfinished


# --- Seeds, aggregation, the learning rate per depth -------------------------

AT_INIT_KEYS = ("min_cosine", "mean_cosine", "gradient_confusion",
                "min_inner_product")
RUN_KEYS = ("final_train_loss", "train_loss_early", "min_cosine_step0",
            "min_cosine_train", "min_cosine_last", "mean_cosine_train",
            "gradient_confusion_step0", "gradient_confusion_train")
_NOT_SETTING = ("seed",)


def group_key(row: dict, leave_out: Sequence[str] = _NOT_SETTING) -> tuple:
  """(part, the setting's flags but `leave_out`) as ((key, value), ...)."""
  return tuple((k, row[k]) for k in ("part",) + SETTING
               if k not in leave_out)


def aggregate(rows: Sequence[dict], keys: Sequence[str] = AT_INIT_KEYS
              ) -> list[dict]:
  """Rows of one setting over seeds: `<key>_mean/_std/_min/_max/_n` each.

  `common.spread`: the std is the sample one (NaN for one seed) and a
  non-finite value (a diverged run's loss) is left out; `diverged` counts
  the runs whose state says so.
  """
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(group_key(row), []).append(row)
  out = []
  for key, group in groups.items():
    row = dict(key)
    row["seeds"] = len(group)
    row["diverged"] = sum(r.get("state") == sweep.DIVERGED for r in group)
    for k in keys:
      s = common.spread(rundir.number(r[k]) for r in group
                        if r.get(k, "") != "")
      row.update({f"{k}_mean": s.mean, f"{k}_std": s.std,
                  f"{k}_min": s.min, f"{k}_max": s.max, f"{k}_n": s.n})
    out.append(row)
  return out


def rate_grid_parts(parts: Sequence[Part]) -> set[str]:
  """The training parts with more than one learning_rate in their grid."""
  return {p.name for p in parts if not p.at_init
          and len(dict(p.grid).get("learning_rate", ())) > 1}


def _rate_score(group: Sequence[dict]) -> float:
  """Mean final training loss over seeds; a diverged seed makes it inf."""
  losses = [float(r["final_train_loss"]) for r in group]
  if any(math.isinf(v) for v in losses):
    return math.inf
  return _finite_mean(losses)


def rate_table(runs: Sequence[dict], rate_parts: Iterable[str]
               ) -> list[dict]:
  """One row per (setting but rate, rate) of the rate-grid parts: the mean
  final training loss over seeds (`_rate_score`), the seeds, whether the
  rate is its setting's best (least score; of equal scores the smaller
  rate) and whether that best is at an edge of the grid."""
  rate_parts = set(rate_parts)
  by_rate: dict[tuple, dict[float, list[dict]]] = {}
  for r in runs:
    if r["part"] in rate_parts:
      key = group_key(r, ("seed", "learning_rate"))
      by_rate.setdefault(key, {}).setdefault(float(r["learning_rate"]),
                                             []).append(r)
  out = []
  for key, rates in by_rate.items():
    scores = {lr: _rate_score(g) for lr, g in rates.items()}
    best = min(scores, key=lambda lr: (scores[lr], lr))
    edge = best in (min(scores), max(scores))
    for lr in sorted(rates):
      out.append({**dict(key), "learning_rate": lr, "seeds": len(rates[lr]),
                  "diverged": sum(r["state"] == sweep.DIVERGED
                                  for r in rates[lr]),
                  "mean_final_train_loss": scores[lr],
                  "best": int(lr == best), "best_at_edge": int(edge)})
  return out


def best_rates(runs: Sequence[dict], rate_parts: Iterable[str]
               ) -> dict[tuple, float]:
  """{group_key(run, without seed and learning_rate): best rate} of the
  rate-grid parts (`rate_table`)."""
  return {tuple((k, r[k]) for k in ("part",) + SETTING
                if k not in ("seed", "learning_rate")): r["learning_rate"]
          for r in rate_table(runs, rate_parts) if r["best"]}


def at_best_rate(runs: Sequence[dict], rate_parts: Iterable[str]
                 ) -> list[dict]:
  """The runs of other parts, and of a rate-grid part those at their
  setting's best rate."""
  best = best_rates(runs, rate_parts)
  rate_parts = set(rate_parts)
  return [r for r in runs if r["part"] not in rate_parts
          or best.get(group_key(r, ("seed", "learning_rate")))
          == float(r["learning_rate"])]


# --- Claims ------------------------------------------------------------------
#
# Each claim's rule reads seed-paired quantities (seed s of one setting
# against seed s of another: the same examples, and for training the same
# data order) and the seed spread s = the larger sample standard deviation
# over those seeds of the settings compared. A difference of at most s is no
# difference. Verdicts (common.verdict) count (family, seed) pairs:
# agrees if the rule's condition holds in all, disagrees in none, mixed in
# some; one seed gives no spread and the verdict `not measured`.

PAPER = "papers/001 (abstract)"


def _role(part: Part) -> str:
  """What a part checks, from its grid: linear, norm_skip, width, depth."""
  grid = dict(part.grid)
  if grid.get("activation") == ("linear",):
    return "linear"
  if len(grid.get("model", ())) > 1 or len(grid.get("normalization",
                                                     ())) > 1:
    return "norm_skip"
  if len(grid.get("width", ())) > 1:
    return "width"
  if len(grid.get("depth", ())) > 1:
    return "depth"
  return "other"


def _families(part: Part, rows: Sequence[dict], axis: str
              ) -> dict[str, list[dict]]:
  """The part's rows by the values of its varying flags other than `axis`
  (and seed and the rate): {label: rows}."""
  keys = [k for k in _varying(part) if k not in (axis, "learning_rate")]
  out: dict[str, list[dict]] = {}
  for r in rows:
    if r["part"] == part.name:
      label = " ".join([part.name] + [str(r[k]) for k in keys])
      out.setdefault(label, []).append(r)
  return out


def by_seed(rows: Iterable[dict], key: str, **match) -> dict[int, float]:
  """{seed: row[key]} of the rows whose flags equal `match`; non-finite
  values left out."""
  out = {}
  for r in rows:
    if all(r[k] == v for k, v in match.items()):
      value = rundir.number(r[key]) if r.get(key, "") != "" else math.nan
      if math.isfinite(value):
        out[int(r["seed"])] = value
  return out


def seed_spread(*values: dict[int, float]) -> float:
  """The larger sample std over seeds of the settings; NaN below 2 seeds."""
  stds = [common.spread(v.values()).std for v in values]
  return max(stds) if stds and all(math.isfinite(s) for s in stds) else (
      math.nan)


def _stat(values: dict, digits: int = 3) -> str:
  s = common.spread(values.values())
  return f"{s.text(digits)} (n={s.n})" if s.n else "no runs"


def exceeds(low: dict[int, float], high: dict[int, float]
            ) -> tuple[dict[int, bool], float]:
  """Per seed both have: high - low > s (s = `seed_spread` over those
  seeds); ({}, NaN) below two seeds."""
  seeds = sorted(set(low) & set(high))
  low = {k: low[k] for k in seeds}
  high = {k: high[k] for k in seeds}
  s = seed_spread(low, high)
  if len(seeds) < 2 or not math.isfinite(s):
    return {}, s
  return {k: high[k] - low[k] > s for k in seeds}, s


def within(values: dict) -> tuple[dict[int, bool], float]:
  """`values`: {level: {seed: value}}. Per seed all levels have: max - min
  over the levels <= s (s = `seed_spread` of the levels over those seeds);
  ({}, NaN) below two seeds or levels."""
  seeds = sorted(set.intersection(*(set(v) for v in values.values()))
                 ) if values else []
  values = {lv: {k: v[k] for k in seeds} for lv, v in values.items()}
  s = seed_spread(*values.values())
  if len(seeds) < 2 or len(values) < 2 or not math.isfinite(s):
    return {}, s
  return {k: (max(v[k] for v in values.values())
              - min(v[k] for v in values.values())) <= s
          for k in seeds}, s


def _n_seeds(holds: dict) -> str:
  return f"holds in {sum(holds.values())} of {len(holds)} seeds"


def _pairs_claim(id_: str, claim: str, paper: str, rule: str,
                 comparisons: Sequence[tuple[str, str, dict, str, dict]]
                 ) -> Claim:
  """`comparisons`: (family, label_low, low, label_high, high); the
  condition is `exceeds(low, high)` in every family and seed."""
  holds, texts = [], []
  for family, label_low, low, label_high, high in comparisons:
    h, s = exceeds(low, high)
    diff = {k: high[k] - low[k] for k in sorted(set(low) & set(high))}
    text = (f"{family}: {label_low} {_stat(low)}, {label_high} "
            f"{_stat(high)}; paired difference ({label_high} minus "
            f"{label_low}) {_stat(diff)}")
    if h:
      inside = sum(not v for v in h.values())
      text += (f", s={s:.3f}, {_n_seeds(h)}"
               + (f" ({inside} inside the seed spread)" if inside else ""))
    else:
      text += ", n<2 seeds: no spread to compare it with"
    texts.append(text)
    holds += list(h.values())
  if not comparisons:
    return Claim(id_, claim, paper, rule, "no such runs in this study", 0,
                 NOT_MEASURED)
  return Claim(id_, claim, paper, rule, "; ".join(texts), len(holds),
               common.verdict(holds))


def _axis_comparisons(parts, rows, role, axis, key, larger_is_less: bool,
                      less_confused_end: str, **match):
  """Per family of each part of `role`: the two ends of `axis`, oriented
  so that the condition `exceeds(low, high)` reads "the end named
  `less_confused_end` ('high' or 'low' end of the axis) is less confused".

  `key` is a statistic where a larger value means less confusion when
  `larger_is_less` (cosines), more confusion otherwise (raw confusion).
  """
  out = []
  for part in parts:
    if _role(part) != role:
      continue
    for family, group in _families(part, rows, axis).items():
      group = [r for r in group if all(r[k] == v for k, v in match.items())]
      levels = sorted({r[axis] for r in group})
      if len(levels) < 2:
        continue
      ends = {end: (level, by_seed(group, key, **{axis: level}))
              for end, level in (("low", levels[0]), ("high", levels[-1]))}
      less = ends[less_confused_end]
      more = ends["low" if less_confused_end == "high" else "high"]
      # Less confused: the larger cosine, the smaller raw confusion.
      low, high = (more, less) if larger_is_less else (less, more)
      out.append((family, f"{axis} {low[0]}", low[1], f"{axis} {high[0]}",
                  high[1]))
  return out


def _rule_ends(axis: str, key_text: str, larger_is_less: bool,
               less_end: str) -> str:
  """The rule of `_axis_comparisons`, in words."""
  ends = {"high": f"largest {axis}", "low": f"smallest {axis}"}
  less, more = ends[less_end], ends["low" if less_end == "high" else "high"]
  first, second = (less, more) if larger_is_less else (more, less)
  return (f"per family (the part's other flags) and seed, {key_text} at "
          f"the {first} minus at the {second} (paired by seed) > s, s = the "
          f"larger std over seeds of the two; agrees if in all, disagrees "
          f"if in none")


def evaluate(parts: Sequence[Part], at_init: Sequence[dict],
             runs: Sequence[dict]) -> list[Claim]:
  """The claims of papers/001 on this study's rows, each with its rule
  and a verdict computed by the rule (see the comment above)."""
  init_parts = [p for p in parts if p.at_init]
  train_parts = [p for p in parts if not p.at_init]
  rate_parts = rate_grid_parts(parts)
  # The best rate counts diverged seeds (as an infinite loss); the
  # statistics then leave diverged runs out.
  best = at_best_rate(runs, rate_parts)
  trained = [r for r in best if r["state"] != sweep.DIVERGED]
  cos_init = "the min pairwise cosine at initialisation"
  cos_train = ("the min pairwise cosine averaged over the measurements "
               "after step 0")
  raw_init = "the raw gradient confusion max(0, -min <g_i, g_j>) at init"
  out = []

  def axis_claim(id_, claim, stat_rows, phase_parts, role, axis, key,
                 key_text, larger_is_less, less_end, **match):
    rule = _rule_ends(axis, key_text, larger_is_less, less_end)
    out.append(_pairs_claim(id_, claim, PAPER, rule, _axis_comparisons(
        phase_parts, stat_rows, role, axis, key, larger_is_less, less_end,
        **match)))

  axis_claim("wider_less_confusion_at_init",
             "Wider nets have less gradient confusion at initialisation "
             "(Glorot, He).", at_init, init_parts, "width", "width",
             "min_cosine", cos_init, True, "high")
  axis_claim("wider_less_confusion_training",
             "Wider nets have less gradient confusion during training.",
             trained, train_parts, "width", "width", "min_cosine_train",
             cos_train, True, "high")
  axis_claim("deeper_more_confusion_at_init",
             "Deeper nets have more gradient confusion at initialisation "
             "(Glorot, He).", at_init, init_parts, "depth", "depth",
             "min_cosine", cos_init, True, "low")
  axis_claim("deeper_more_confusion_training",
             "Deeper nets have more gradient confusion during training "
             "(each depth at its best learning rate).", trained,
             train_parts, "depth", "depth", "min_cosine_train", cos_train,
             True, "low")
  axis_claim("raw_wider_less_confusion_at_init",
             "The same in the paper's own quantity: wider nets have less "
             "raw gradient confusion at initialisation.", at_init,
             init_parts, "width", "width", "gradient_confusion", raw_init,
             False, "high")
  axis_claim("raw_deeper_more_confusion_at_init",
             "The same in the paper's own quantity: deeper nets have more "
             "raw gradient confusion at initialisation.", at_init,
             init_parts, "depth", "depth", "gradient_confusion", raw_init,
             False, "low")
  axis_claim("linear_gaussian_deeper_more_confusion_at_init",
             "Deep linear nets with Gaussian (Glorot) initialisation: "
             "deeper means more confusion (the contrast to orthogonal).",
             at_init, init_parts, "linear", "depth", "min_cosine",
             cos_init, True, "low", kernel_init="glorot_normal")
  out.append(_independent_claim(
      "orthogonal_linear_confusion_depth_independent_at_init",
      "With orthogonal initialisation, a deep linear net's gradient "
      "confusion at initialisation does not depend on depth.",
      f"per seed, max - min over the depths of {cos_init} <= s, s = the "
      f"largest std over seeds at any depth (orthogonal init, every part "
      f"of linear nets); agrees if in all seeds, disagrees if in none",
      init_parts, at_init, "min_cosine"))
  out.append(_independent_claim(
      "orthogonal_linear_early_training_depth_independent",
      "With orthogonal initialisation, the early training of deep linear "
      "nets does not depend on depth.",
      f"per seed, max - min over the depths of the training loss at the "
      f"evaluation nearest {EARLY_FRACTION:.2g} of the run (step after 0) "
      f"<= s, s = the largest std over seeds at any depth (orthogonal "
      f"init, every training part of linear nets); agrees if in all seeds, "
      f"disagrees if in none; Gaussian-init numbers for comparison",
      train_parts, trained, "train_loss_early"))
  for phase, rows, phase_parts, key, text in (
      ("at_init", at_init, init_parts, "min_cosine", cos_init),
      ("training", trained, train_parts, "min_cosine_train", cos_train)):
    out.append(_norm_skip_claim(
        f"batch_norm_skip_less_confusion_{phase}",
        "Batch norm together with skip connections lowers gradient "
        f"confusion in deep nets ({phase.replace('_', ' ')}).",
        f"at the deepest depth, per seed, {text} of fc_resnet with batch "
        f"norm minus the plain mlp's (no batch norm) > s, s = the larger "
        f"std over seeds of the two; agrees if in all seeds, disagrees if "
        f"in none; the other two families for comparison",
        phase_parts, rows, key))
  out += rate_claims(runs, rate_parts)
  return out


def _independent_claim(id_, claim, rule, parts, rows, key) -> Claim:
  """`within` over the depths of each orthogonal family of the linear
  parts; the other families' numbers for comparison."""
  holds, texts, others = [], [], []
  for part in parts:
    if _role(part) != "linear":
      continue
    for family, group in _families(part, rows, "depth").items():
      depths = sorted({r["depth"] for r in group})
      values = {d: by_seed(group, key, depth=d) for d in depths}
      desc = ", ".join(f"depth {d} {_stat(v)}" for d, v in values.items())
      if not all(r["kernel_init"] == "orthogonal" for r in group):
        others.append(f"{family} (for comparison): {desc}")
        continue
      h, s = within(values)
      ranges = {k: max(v[k] for v in values.values())
                - min(v[k] for v in values.values()) for k in h}
      texts.append(f"{family}: {desc}; range over depths "
                   + (f"{_stat(ranges)}, s={s:.3f}, {_n_seeds(h)}" if h
                      else "n<2 seeds: no spread to compare it with"))
      holds += list(h.values())
  if not texts:
    return Claim(id_, claim, PAPER, rule, "no such runs in this study", 0,
                 NOT_MEASURED)
  return Claim(id_, claim, PAPER, rule, "; ".join(texts + others),
               len(holds), common.verdict(holds))


def _norm_skip_claim(id_, claim, rule, parts, rows, key) -> Claim:
  comparisons, extra = [], []
  for part in parts:
    if _role(part) != "norm_skip":
      continue
    mine = [r for r in rows if r["part"] == part.name]
    if not mine:
      continue
    deepest = max(r["depth"] for r in mine)
    deep = [r for r in mine if r["depth"] == deepest]
    plain = by_seed(deep, key, model="mlp", normalization="none")
    both = by_seed(deep, key, model="fc_resnet", normalization="batch")
    if plain or both:
      comparisons.append((f"{part.name} depth {deepest}", "plain mlp",
                          plain, "fc_resnet + batch norm", both))
    for model, norm in (("mlp", "batch"), ("fc_resnet", "none")):
      v = by_seed(deep, key, model=model, normalization=norm)
      extra.append(f"{model} + normalization {norm}: {_stat(v)}")
  got = _pairs_claim(id_, claim, PAPER, rule, comparisons)
  if extra and got.verdict != NOT_MEASURED:
    got.measured += "; for comparison " + ", ".join(extra)
  return got


def rate_claims(runs: Sequence[dict], rate_parts: Iterable[str]
                ) -> list[Claim]:
  """The design checks of the learning rate tuned per depth."""
  table = rate_table(runs, rate_parts)
  best = [r for r in table if r["best"]]
  rule = ("for every setting of a part with a learning-rate grid, the rate "
          "with the least mean final training loss over seeds (a diverged "
          "seed counts as infinite) is neither the grid's smallest nor its "
          "largest; agrees if so for all, disagrees otherwise")
  claim = "Check: each depth's best learning rate lies inside the grid."
  if not best:
    return [Claim("check_best_rate_inside_grid", claim, "(study design)",
                  rule, "no part with a learning-rate grid", 0,
                  NOT_MEASURED)]
  text = "; ".join(
      f"{r['part']} {r['kernel_init']} depth {r['depth']} width "
      f"{r['width']}: {r['learning_rate']:g}"
      + (" (at an edge)" if r["best_at_edge"] else "") for r in best)
  edge = [r for r in best if r["best_at_edge"]]
  return [
      Claim("check_best_rate_inside_grid", claim, "(study design)", rule,
            f"best rates: {text}", len(best),
            DISAGREES if edge else AGREES),
      Claim("best_rate_per_depth",
            "The best learning rate per depth (the rate the depth claims "
            "read), reported as found.", "(study design)",
            "the rate of least mean final training loss per setting",
            f"best rates: {text}", len(best), MEASURED)]


def claims_markdown(claims: Sequence[Claim], n_seeds: int) -> str:
  """The claims table with a note on how to read it."""
  lines = [
      "Each rule compares seed-paired quantities against the seed spread s "
      "(the larger sample std over seeds of the settings compared): a "
      "difference of at most s is no difference. Cosines are the headline "
      "(the min pairwise cosine of the per-example loss gradients: lower is "
      "more confused); the raw inner-product confusion has its own rows. "
      "Numbers: mean ± std [min, max] over seeds (n). "
      f"Seeds per setting: {n_seeds or 'none finished'}"
      + (" (one seed: rules that need a spread say not measured)."
         if n_seeds == 1 else "."), ""]
  lines += common.claims_table(claims)
  return "\n".join(lines) + "\n"


# --- Tables ------------------------------------------------------------------


def _varying(part: Part) -> list[str]:
  return [k for k, v in part.grid if len(v) > 1
          and k not in ("seed", LR_X_DEPTH)]


def _fmt(value, spec=".3g") -> str:
  if value == "" or value is None:
    return "-"
  value = float(value)
  if math.isnan(value):
    return "-"
  if math.isinf(value):
    return "diverged"
  return format(value, spec)


def _pm(row: dict, key: str) -> str:
  """mean ± std of an aggregated row; the mean alone for one seed."""
  mean, std = row[f"{key}_mean"], row[f"{key}_std"]
  if math.isnan(mean):
    return "-"
  return _fmt(mean) + ("" if math.isnan(std) else f" ± {_fmt(std, '.2g')}")


def markdown_at_init(part: Part, agg: Sequence[dict]) -> str:
  """A part's at-init cosines (mean ± std over seeds)."""
  rows = [r for r in agg if r["part"] == part.name]
  keys = _varying(part) or ["model"]
  lines = [f"**{part.name}** (at initialisation; mean ± std over seeds)", "",
           "| " + " | ".join(keys) + " | seeds | min cosine | mean cosine |",
           "|" + "---|" * (len(keys) + 3)]
  for r in rows:
    lines.append("| " + " | ".join(str(r[k]) for k in keys)
                 + f" | {r['seeds']} | {_pm(r, 'min_cosine')} | "
                 f"{_pm(r, 'mean_cosine')} |")
  return "\n".join(lines) + "\n"


def markdown_training(part: Part, agg: Sequence[dict],
                      unfinished: Sequence[str]) -> str:
  """A training part's runs by setting (at the best rate for a rate grid):
  loss and cosines, mean ± std over seeds."""
  rows = [r for r in agg if r["part"] == part.name]
  keys = [k for k in _varying(part) if k != "learning_rate"] or ["model"]
  lines = [f"**{part.name}** (training runs; mean ± std over seeds; the "
           f"min cosine at step 0, averaged over the measurements after "
           f"step 0, and at the last one"
           + ("; each setting at its best learning rate" if "learning_rate"
              in _varying(part) else "") + ")", "",
           "| " + " | ".join(keys) + " | learning rate | seeds | final "
           "train loss | min cosine, step 0 | min cosine, training | min "
           "cosine, last | mean cosine, training |",
           "|" + "---|" * (len(keys) + 7)]
  for r in rows:
    step0 = ("left out (batch norm)" if r["normalization"] != "none"
             else _pm(r, "min_cosine_step0"))
    loss = _pm(r, "final_train_loss") + (
        f" ({r['diverged']} diverged)" if r["diverged"] else "")
    lines.append("| " + " | ".join(str(r[k]) for k in keys)
                 + f" | {r['learning_rate']:g} | {r['seeds']} | {loss} | "
                 f"{step0} | {_pm(r, 'min_cosine_train')} | "
                 f"{_pm(r, 'min_cosine_last')} | "
                 f"{_pm(r, 'mean_cosine_train')} |")
  if unfinished:
    lines += ["", f"unfinished, left out: {', '.join(unfinished)}"]
  return "\n".join(lines) + "\n"


def markdown_rates(part: Part, table: Sequence[dict]) -> str:
  """Mean final training loss per rate of a rate-grid part; best in bold."""
  rows = [r for r in table if r["part"] == part.name]
  if not rows:
    return ""
  keys = [k for k in _varying(part) if k != "learning_rate"] or ["model"]
  rates = sorted({r["learning_rate"] for r in rows})
  settings: dict[tuple, dict[float, dict]] = {}
  for r in rows:
    settings.setdefault(tuple(r[k] for k in keys), {})[
        r["learning_rate"]] = r
  lines = [f"**{part.name}**: mean final training loss over seeds per "
           f"learning rate (best in bold; a diverged seed makes it "
           f"'diverged')", "",
           "| " + " | ".join(keys) + " | " + " | ".join(
               f"lr {lr:g}" for lr in rates) + " |",
           "|" + "---|" * (len(keys) + len(rates))]
  for key, by_rate in settings.items():
    cells = []
    for lr in rates:
      r = by_rate.get(lr)
      text = "-" if r is None else _fmt(r["mean_final_train_loss"])
      cells.append(f"**{text}**" if r and r["best"] else text)
    lines.append("| " + " | ".join(str(v) for v in key) + " | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def markdown_raw(parts: Sequence[Part], agg_init: Sequence[dict],
                 agg_runs: Sequence[dict]) -> str:
  """The secondary table: raw inner-product confusion, every part."""
  lines = ["**Raw gradient confusion** max(0, -min <g_i, g_j>) (secondary: "
           "it scales with the squared gradient norms; mean ± std over "
           "seeds; training parts at step 0 / averaged after step 0)", "",
           "| part | setting | seeds | at init or step 0 | during "
           "training |", "|---|---|---|---|---|"]
  for part in parts:
    keys = [k for k in _varying(part) if k != "learning_rate"] or ["model"]
    agg = agg_init if part.at_init else agg_runs
    for r in (r for r in agg if r["part"] == part.name):
      label = ", ".join(f"{k} {r[k]}" for k in keys)
      if part.at_init:
        cells = (_pm(r, "gradient_confusion"), "")
      else:
        cells = ("left out (batch norm)" if r["normalization"] != "none"
                 else _pm(r, "gradient_confusion_step0"),
                 _pm(r, "gradient_confusion_train"))
      lines.append(f"| {part.name} | {label} | {r['seeds']} | {cells[0]} | "
                   f"{cells[1] or '-'} |")
  return "\n".join(lines) + "\n"


def tables_markdown(parts: Sequence[Part], at_init: Sequence[dict],
                    runs: Sequence[dict], unfinished: Sequence[str]) -> str:
  """All tables: cosines by part first, the rate grids, raw confusion."""
  rate_parts = rate_grid_parts(parts)
  agg_init = aggregate(at_init)
  agg_runs = aggregate(at_best_rate(runs, rate_parts), RUN_KEYS)
  table = rate_table(runs, rate_parts)
  out = []
  for part in parts:
    if part.at_init:
      out.append(markdown_at_init(part, agg_init))
    else:
      out.append(markdown_training(
          part, agg_runs, [u.split("/", 1)[1] for u in unfinished
                           if u.startswith(part.name + "/")]))
      if part.name in rate_parts:
        out.append(markdown_rates(part, table))
  out.append(markdown_raw(parts, agg_init, agg_runs))
  return "\n".join(t for t in out if t)


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
      ax.errorbar(xs, ys, yerr=None if all(math.isnan(e) for e in es)
                  else np.nan_to_num(es), marker="o", ms=3, capsize=2,
                  label=label)
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
  """Mean over seeds of `y_key` against the step, one line per value of
  `line_key`, shaded between the seeds' min and max."""
  rows = [r for r in steps_rows if r["part"] == part.name
          and all(str(r[k]) == str(v) for k, v in fixed.items())
          and r[y_key] != ""]
  lines: dict = {}
  for r in rows:
    lines.setdefault(r[line_key], {}).setdefault(r["seed"], []).append(r)
  cmap = figures_lib.pyplot().get_cmap("viridis")
  ordered = sorted(lines, key=float) if all(
      _isnum(k) for k in lines) else sorted(lines, key=str)
  for i, key in enumerate(ordered):
    curves = []
    for group in lines[key].values():
      group = sorted(group, key=lambda r: r["step"])
      curves.append(([r["step"] for r in group],
                     [rundir.number(r[y_key]) for r in group]))
    xs, mean, lo, hi, n = common.band(curves)
    color = cmap(0.9 * i / max(1, len(ordered) - 1))
    ax.plot(xs, mean, marker="o" if y_key != "train_loss" else None, ms=3,
            color=color, label=f"{line_key} {key} (n={int(max(n))})"
            if len(n) else f"{line_key} {key}")
    if len(curves) > 1:
      ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
  ax.grid(alpha=0.3)
  ax.set_xlabel("SGD step")


def _isnum(v) -> bool:
  try:
    float(v)
    return True
  except (TypeError, ValueError):
    return False


def figure_name(index: int, name: str) -> str:
  """confusion_<NN>_<name>.png: sorted names keep the flagfile's order."""
  return f"confusion_{index:02d}_{name}.png"


def figures(parts: Sequence[Part], at_init: Sequence[dict],
            steps_rows: Sequence[dict], runs: Sequence[dict]
            ) -> dict[str, bytes]:
  """The study's figures as PNG bytes by file name (`figure_name`).

  One figure per part: at-init parts plot min cosine, mean cosine and the
  raw confusion (mean ± std over seeds) against their first varying
  numeric flag (width or depth); training parts plot the min cosine, the
  mean cosine and the training loss over the steps (mean over seeds, the
  seeds' range shaded; a rate grid's settings at their best rate; step 0
  of batch-norm runs left out), one panel per value of their non-numeric
  flags. Then a summary of the training parts.
  """
  plt = figures_lib.pyplot()
  agg = aggregate(at_init)
  rate_parts = rate_grid_parts(parts)
  best_cells = {(r["part"], r["cell"]) for r in at_best_rate(runs,
                                                             rate_parts)}
  steps_rows = [r for r in steps_rows if r["part"] not in rate_parts
                or (r["part"], r.get("cell")) in best_cells]
  out = {}
  for index, part in enumerate(parts, 1):
    varying = [k for k in _varying(part) if k != "learning_rate"]
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
      fig.suptitle(f"{part.name}: at initialisation, mean ± std over seeds "
                   f"({_fixed_note(part, at_init)})", fontsize=10)
      out[figure_name(index, part.name)] = figures_lib.png(fig)
    else:
      if not any(r["part"] == part.name for r in steps_rows):
        continue
      line_key = numeric[0] if numeric else _numeric_key(part)
      panel_keys = [k for k in varying if k != line_key]
      panels = sorted({tuple(str(r[k]) for k in panel_keys)
                       for r in steps_rows if r["part"] == part.name})
      ys = ("min_cosine", "mean_cosine", "train_loss")
      fig, axes = plt.subplots(len(ys), len(panels),
                               figsize=(max(6.0, 3.8 * len(panels)),
                                        2.8 * len(ys)),
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
      note = ("; each setting at its best learning rate"
              if part.name in rate_parts else "")
      fig.suptitle(f"{part.name}: during training\n(mean over seeds, "
                   f"range shaded; batch-norm runs without step 0{note})",
                   fontsize=9)
      out[figure_name(index, part.name)] = figures_lib.png(fig)
  summary = _training_summary(parts, at_best_rate(runs, rate_parts))
  if summary:
    out[figure_name(len(parts) + 1, "training_summary")] = summary
  return out


def _training_summary(parts: Sequence[Part], runs: Sequence[dict]
                      ) -> bytes | None:
  """Per training part: the min cosine averaged over each run's
  measurements after step 0 (solid, mean ± std over seeds; diverged runs
  left out) and at step 0 (dotted; not for batch norm) against width or
  depth."""
  plt = figures_lib.pyplot()
  parts = [p for p in parts if not p.at_init
           and any(r["part"] == p.name for r in runs)]
  if not parts:
    return None
  agg = aggregate([r for r in runs if r["state"] != sweep.DIVERGED],
                  RUN_KEYS)
  fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.6),
                           squeeze=False)
  for ax, part in zip(axes[0], parts):
    varying = [k for k in _varying(part) if k != "learning_rate"]
    numeric = [k for k in varying if k in ("width", "depth")]
    x_key = numeric[0] if numeric else _numeric_key(part)
    other = [k for k in varying if k != x_key]
    lines = {}
    for r in agg:
      if r["part"] == part.name:
        lines.setdefault(_line_key(r, other), []).append(r)
    for i, (key, group) in enumerate(sorted(lines.items(),
                                            key=lambda kv: str(kv[0]))):
      group.sort(key=lambda r: float(r[x_key]))
      color = f"C{i}"
      std = [r["min_cosine_train_std"] for r in group]
      ax.errorbar([float(r[x_key]) for r in group],
                  [r["min_cosine_train_mean"] for r in group],
                  yerr=None if all(math.isnan(e) for e in std)
                  else np.nan_to_num(std), marker="o", capsize=2,
                  color=color, label=_label(other, key) or part.name)
      plain = [r for r in group if r["normalization"] == "none"]
      ax.plot([float(r[x_key]) for r in plain],
              [r["min_cosine_step0_mean"] for r in plain], ":", marker=".",
              color=color)
    ticks = sorted({float(r[x_key]) for r in runs if r["part"] == part.name})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(x_key)
    ax.set_title(part.name, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("min pairwise cosine: mean over training after "
                        "step 0\n(solid, ± std over seeds), step 0 (dotted, "
                        "no batch norm)", fontsize=8)
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
