"""The maxi-batch study: error, curvature and distance against batch size.

"Towards mini-error with maxi-batch SGD" (papers/003) trains ResNet-32 on
CIFAR-10 with batch sizes m from 50 to 10000 for the same number of epochs
and finds that large m gives worse *training* and test error, sharper
minima (a larger top Hessian eigenvalue lambda_max, on training examples and
averaged over the test set), and parameters that travel less far from their
initial values. Gradient noise (Sec. 2.4) and adaptive linearisation of the
rectifiers (Sec. 2.5) do not repair it. This module turns a study directory
into the paper's figures:
  Fig. 1  final training and test error against m, one curve per learning
          rate and the best rate per m (best: lowest final training error);
  Fig. 2  loss and error along the line from a small-m model to large-m
          models, alpha in [-0.5, 1.5] (tfcapacity.interpolate);
  Fig. 3  lambda_max on fixed training examples over epochs
          (`curvature/lambda_max`), per m, and per rate at the largest m;
  Fig. 4  the same averaged over test batches (`curvature/lambda_max_test`);
  Fig. 5  ||theta_t - theta_0|| over epochs (`distance/total`);
  Fig. 6  the largest m with gradient noise and linearisation against its
          plain run: training and test error and lambda_max over epochs.

A study is a sweep (tfcapacity.studies.sweep) over the base flagfile's
`# sweep.grid:` lines (batch size x learning rate) plus *variants*: single
runs beyond the grid, one per flagfile line

  # maxibatch.variant: NAME flag=value flag=value ...

A value `@CELL` stands for the run directory of another cell or variant of
the same study, which must finish first; this is how an empirical-noise run
names the small-batch run whose gradient variances it adds
(`grad_noise_reference=@batch_size=50,learning_rate=0.1`).

Deviation from the paper: the best learning rate of a batch size is chosen
by final training error, ties broken by final training loss (the paper
reports its best model by test accuracy without saying how rates were
picked).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Callable, Iterable, Sequence

import numpy as np

from tfcapacity import data as data_lib
from tfcapacity import figures as figures_lib
from tfcapacity.errors import UserError
from tfcapacity.studies import common
from tfcapacity.studies import sweep
from tfcapacity import rundir

VARIANT_COMMENT = re.compile(r"^\s*#\s*maxibatch\.variant:\s*(.*?)\s*$")
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
LAMBDA_TRAIN = "curvature/lambda_max"
LAMBDA_TEST = "curvature/lambda_max_test"
DISTANCE = "distance/total"
SEED = "seed"
INTERPOLATION_DIR = "interpolation"
INTERPOLATION_KEYS = ("alphas", "train_loss", "train_top1_error",
                      "test_loss", "test_top1_error")


# --- Cells -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant(sweep.Cell):
  """A run beyond the grid: named by its flagfile line, not its values.

  `group` is the line's NAME; `label` (the run directory's name) is NAME,
  or `NAME,seed=S` when the line is expanded over the grid's seeds.
  """
  label: str = ""
  depends_on: tuple[str, ...] = ()
  group: str = ""

  @property
  def name(self) -> str:
    return self.label


def seed_axis(grid_cells: Sequence[sweep.Cell]) -> list[str]:
  """The values of the grid's `seed` axis in grid order ([]: no such axis)."""
  return list(dict.fromkeys(dict(c.overrides)[SEED] for c in grid_cells
                            if SEED in dict(c.overrides)))


def first_seed_only(grid: Sequence[tuple[str, Sequence[str]]]
                    ) -> list[tuple[str, list[str]]]:
  """The grid with its seed axis cut to its first value (--quick's tier)."""
  return [(key, list(values[:1]) if key == SEED else list(values))
          for key, values in grid]


def variant_label(name: str, seed: str) -> str:
  """The run directory of variant `name` expanded at `seed`."""
  return f"{name},{SEED}={seed}"


def _variant_lines(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
  """(NAME, [(flag, value), ...]) of each `# maxibatch.variant:` line."""
  lines = [m.group(1) for m in map(VARIANT_COMMENT.match, text.splitlines())
           if m]
  out = []
  for line in lines:
    tokens = line.split()
    if len(tokens) < 2:
      raise UserError(f"bad '# maxibatch.variant: {line}' line; write "
                      f"'# maxibatch.variant: NAME flag=value ...'")
    name = tokens[0]
    if not _VARIANT_NAME.match(name) or "=" in name:
      raise UserError(f"variant name {name!r} may hold only letters, digits "
                      f"and ._+- (no '='), so it cannot clash with a grid "
                      f"cell")
    if name in [n for n, _ in out]:
      raise UserError(f"variant name {name!r} is used twice; give each "
                      f"variant its own name")
    pairs = []
    for token in tokens[1:]:
      key, sep, value = token.partition("=")
      key = key.lstrip("-")
      if not sep or not key or not value:
        raise UserError(f"variant {name}: bad token {token!r}; write "
                        f"flag=value")
      if key in ("model_dir", "flagfile", "overwrite"):
        raise UserError(f"variant {name} may not set --{key}; the study sets "
                        f"it")
      pairs.append((key, value))
    out.append((name, pairs))
  return out


def _grid_values(target: str) -> dict | None:
  """`a=1,b=2` -> {"a": "1", "b": "2"}; None if not of that form."""
  parts = [p.partition("=") for p in target.split(",")]
  if not all(sep and key and value for key, sep, value in parts):
    return None
  return {key: value for key, _, value in parts}


def parse_variants(text: str, grid_cells: Sequence[sweep.Cell],
                   study_dir: str) -> list[Variant]:
  """The flagfile's `# maxibatch.variant:` lines as cells.

  When the grid has a `seed` axis, a line that sets no `seed=` becomes one
  variant per seed of the axis, named `NAME,seed=S` (the `=` no user name
  may hold keeps it apart from grid cells), and its `@CELL` references
  resolve at the same seed: `@batch_size=50,learning_rate=0.1` names the
  grid cell with those values and `seed=S`, `@OTHER` the variant OTHER's
  run at S. A line with `seed=` is one run, references resolved at its
  seed. Without a seed axis each line is one run named NAME.

  Args:
    text: the base flagfile.
    grid_cells: the grid's cells (names a variant may refer to with @).
    study_dir: where the cells' run directories live (@CELL resolves there).

  Raises:
    UserError: a line without a name or flags, a bad name or `flag=value`
      token, a repeated name, a flag the sweep sets, or @ naming no cell.
  """
  lines = _variant_lines(text)
  known = {c.name for c in grid_cells}
  seeds = seed_axis(grid_cells)
  instances = []  # (NAME, label, seed or None, pairs)
  for name, pairs in lines:
    own = dict(pairs).get(SEED)
    if seeds and own is None:
      instances += [(name, variant_label(name, s), s, pairs + [(SEED, s)])
                    for s in seeds]
    else:
      instances.append((name, name, own, pairs))
  labels = {label for _, label, _, _ in instances}
  expanded = {(name, seed): label for name, label, seed, _ in instances
              if label != name}
  single = {name for name, label, _, _ in instances if label == name}

  def resolve(seed: str | None, value: str) -> str | None:
    target = value[1:]
    if target in labels or target in known or target in single:
      return target
    if (target, seed) in expanded:
      return expanded[(target, seed)]
    wanted = _grid_values(target)
    if wanted is None:
      return None
    if seeds and SEED not in wanted and seed is not None:
      wanted[SEED] = seed
    for cell in grid_cells:
      if dict(cell.overrides) == wanted:
        return cell.name
    return None

  out = []
  for number, (name, label, seed, pairs) in enumerate(instances):
    overrides, depends = [], []
    for key, value in pairs:
      if value.startswith("@"):
        if value[1:] in (name, label):
          raise UserError(f"variant {name} names itself in {key}={value}; "
                          f"name the run it should wait for")
        target = resolve(seed, value)
        if target is None:
          at = f" at seed {seed}" if seeds and seed is not None else ""
          raise UserError(f"variant {name}: {value} names no cell of this "
                          f"study{at}; use a grid cell name such as "
                          f"{sorted(known)[0] if known else 'batch_size=50'}")
        depends.append(target)
        value = os.path.join(study_dir, target)
      overrides.append((key, value))
    out.append(Variant(len(grid_cells) + number, tuple(overrides),
                       label=label, depends_on=tuple(depends), group=name))
  return out


def run_order(grid_cells: Sequence[sweep.Cell],
              variants: Sequence[Variant]) -> tuple[list, list]:
  """(first, second): cells that others depend on lead the first phase;
  variants that depend on another cell make up the second."""
  needed = {d for v in variants for d in v.depends_on}
  independent = [v for v in variants if not v.depends_on]
  first = ([c for c in [*grid_cells, *independent] if c.name in needed]
           + [c for c in [*grid_cells, *independent] if c.name not in needed])
  return first, [v for v in variants if v.depends_on]


def run_in_rounds(variants: Sequence[Variant], states: dict,
                  run: Callable[[list], dict]) -> list[Variant]:
  """Runs `variants` in rounds, each once every cell it names has completed.

  Args:
    variants: the variants with references (`run_order`'s second phase).
    states: every cell's state so far, by name; updated in place.
    run: trains a list of cells and returns their states by name.

  Returns:
    The variants never started because a reference did not complete.
  """
  pending = list(variants)
  while pending:
    ready = [v for v in pending if all(
        states.get(d) == sweep.COMPLETED for d in v.depends_on)]
    if not ready:
      break
    states.update(run(ready))
    pending = [v for v in pending if v not in ready]
  return pending


# --- Runs --------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A finished run of the study."""
  name: str
  flags: dict
  state: str  # completed or diverged
  history: list[dict]  # evaluation rows
  variant: bool = False
  measurements: list[dict] = dataclasses.field(default_factory=list)

  @property
  def batch_size(self) -> int:
    return int(self.flags["batch_size"])

  @property
  def learning_rate(self) -> float:
    return float(self.flags["learning_rate"])

  def series(self, key: str) -> list[tuple[int, int, float]]:
    """(step, epoch, value) of an evaluation or callback scalar."""
    return rundir.series({"history": self.history,
                          "measurements": self.measurements}, key)

  def final(self, key: str) -> float:
    """The last logged value of `key` (NaN if never logged)."""
    points = self.series(key)
    return points[-1][2] if points else math.nan

  def last_evaluation(self, key: str) -> float:
    """`key` ("epoch", "step", ...) of the last evaluation row (or NaN)."""
    return _float(self.history[-1].get(key)) if self.history else math.nan

  def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of `key` over the run."""
    points = self.series(key)
    return (np.array([float(epoch) for _, epoch, _ in points]),
            np.array([value for _, _, value in points]))


def _float(value) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan  # "nan"/"inf" strings from rundir.write_json.


def load_run(cell_dir: str, variant: bool = False) -> Run | None:
  """The cell's finished run, or None while it is not finished.

  Raises:
    UserError: results.json exists but is not a tfcapacity results file.
  """
  if not os.path.isfile(os.path.join(cell_dir, rundir.RESULTS_FILE)):
    return None
  path = os.path.join(cell_dir, rundir.RESULTS_FILE)
  try:
    with open(path) as f:
      results = json.load(f)
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e}); delete the cell's "
                    f"directory and rerun the study") from None
  if not isinstance(results, dict) or not isinstance(
      results.get("history"), list) or not isinstance(results.get("flags"),
                                                      dict):
    raise UserError(f"{path} has no 'history' list or 'flags' dict; is it a "
                    f"tfcapacity results.json?")
  state = sweep.cell_state(cell_dir, results)
  if state not in sweep.FINISHED:
    return None
  missing = [k for k in ("batch_size", "learning_rate")
             if k not in results["flags"]]
  if missing:
    raise UserError(f"{path}: 'flags' lacks {', '.join(missing)}")
  measurements = results.get("measurements", [])
  for rows, name in ((results["history"], "history"),
                     (measurements, "measurements")):
    for row in rows:
      if "epoch" not in row or "step" not in row:
        raise UserError(f"{path}: a {name} row has no 'epoch' or 'step'")
  return Run(os.path.basename(os.path.normpath(cell_dir)), results["flags"],
             state, results["history"], variant, measurements)


def load_runs(study_dir: str, cells: Iterable[sweep.Cell]
              ) -> tuple[list[Run], list[str]]:
  """Finished runs of `cells` under `study_dir`, and unfinished names.

  Raises:
    UserError: `study_dir` is not a directory.
  """
  return common.load_runs(study_dir, cells, lambda cell: load_run(
      os.path.join(study_dir, cell.name), isinstance(cell, Variant)))


# --- Summary -----------------------------------------------------------------


@dataclasses.dataclass
class Report:
  grid: dict  # (batch size, learning rate) -> Run
  best: dict  # batch size -> Run of the best rate (None: all diverged)
  variants: list  # Runs
  unfinished: list
  lr_drop_epochs: list

  @property
  def batch_sizes(self) -> list[int]:
    return sorted(self.best)

  @property
  def learning_rates(self) -> list[float]:
    return sorted({lr for _, lr in self.grid})

  def baseline(self) -> Run | None:
    """The grid run at the largest m with the variants' learning rate."""
    if not self.batch_sizes:
      return None
    m = self.batch_sizes[-1]
    lrs = {v.learning_rate for v in self.variants if v.batch_size == m}
    for lr in sorted(lrs):
      if (m, lr) in self.grid:
        return self.grid[(m, lr)]
    return self.best.get(m)


def _rank(run: Run) -> tuple:
  """Best first: lower final training error, then (ties are common once
  training error reaches 0) lower final training loss; diverged last."""
  if run.state == sweep.DIVERGED:
    return (1, math.inf, math.inf, run.learning_rate)
  error, loss = run.final("train_top1_error"), run.final("train_loss")
  return (0, error if math.isfinite(error) else math.inf,
          loss if math.isfinite(loss) else math.inf, run.learning_rate)


def summarize(runs: Sequence[Run], unfinished: Sequence[str] = ()) -> Report:
  """Grid runs by (m, lr), the best rate per m, and the variants.

  Raises:
    UserError: no finished grid run, or two grid runs with one (m, lr).
  """
  grid_runs = [r for r in runs if not r.variant]
  if not grid_runs:
    raise UserError(f"no finished grid runs yet ({len(unfinished)} "
                    f"unfinished); run or wait for the study")
  grid = {}
  for run in grid_runs:
    key = (run.batch_size, run.learning_rate)
    if key in grid:
      raise UserError(f"runs {grid[key].name} and {run.name} both have "
                      f"batch size {key[0]} and learning rate {key[1]:g}; "
                      f"the grid must vary only --batch_size and "
                      f"--learning_rate")
    grid[key] = run
  best = {}
  for m in sorted({m for m, _ in grid}):
    choice = min((r for (gm, _), r in grid.items() if gm == m), key=_rank)
    best[m] = None if choice.state == sweep.DIVERGED else choice
  drops = grid_runs[0].flags.get("lr_drop_epochs") or []
  if isinstance(drops, str):
    drops = [d for d in drops.split(",") if d]
  return Report(grid, best, [r for r in runs if r.variant], list(unfinished),
                [float(d) for d in drops])


def interpolation_pairs(report: Report) -> list[tuple[Run, Run]]:
  """Fig. 2's pairs: the smallest m's best run to every finished run of the
  largest m that differs from the grid's runs there only in its learning
  rate (grid runs and such variants: the paper's top and bottom panels)."""
  ms = [m for m in report.batch_sizes if report.best[m] is not None]
  if len(ms) < 2:
    return []
  start, last = report.best[ms[0]], ms[-1]
  ends = [run for (m, _), run in sorted(report.grid.items()) if m == last]
  reference = ends[0]
  ends += [v for v in report.variants if v.batch_size == last and set(
      _changes(v, reference)) <= {"learning_rate"}]
  return [(start, run) for run in ends if run.state == sweep.COMPLETED]


def _changes(run: Run, base: Run) -> list[str]:
  return [k for k in sorted(set(run.flags) | set(base.flags))
          if k != "model_dir" and run.flags.get(k) != base.flags.get(k)]


def interpolation_path(study_dir: str, a: Run, b: Run) -> str:
  return os.path.join(study_dir, INTERPOLATION_DIR,
                      f"{a.name}__to__{b.name}.json")


def read_interpolation(path: str) -> dict:
  """An interpolation JSON, checked.

  Raises:
    UserError: unreadable, or keys missing or of unequal lengths.
  """
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read interpolation {path} ({e.__class__.__name__}"
                    f"); delete it and rerun the study") from None
  if not isinstance(data, dict):
    raise UserError(f"interpolation {path} is not a JSON object")
  missing = [k for k in INTERPOLATION_KEYS if k not in data]
  if missing:
    raise UserError(f"interpolation {path} lacks {', '.join(missing)}; "
                    f"delete it and rerun the study")
  if len({len(data[k]) for k in INTERPOLATION_KEYS}) != 1:
    raise UserError(f"interpolation {path}: its lists differ in length; "
                    f"delete it and rerun the study")
  return data


def _changed_flags(run: Run, base: Run | None) -> str:
  if base is None:
    return ""
  out = []
  for key, value in sorted(run.flags.items()):
    if key in ("model_dir",) or base.flags.get(key) == value:
      continue
    if key == "grad_noise_reference" and value:
      value = "@" + os.path.basename(os.path.normpath(str(value)))
    out.append(f"{key}={value}")
  return " ".join(out)


def max_after(run: Run, key: str, epoch: float) -> float:
  epochs, values = run.curve(key)
  kept = values[(epochs >= epoch) & np.isfinite(values)]
  return float(kept.max()) if kept.size else math.nan


def row(run: Run) -> dict:
  """A run's final numbers (errors in %)."""
  return {
      "run": run.name, "status": run.state,
      "batch_size": run.batch_size, "learning_rate": run.learning_rate,
      "epoch": run.last_evaluation("epoch"),
      "step": run.last_evaluation("step"),
      "train_top1_error": 100 * run.final("train_top1_error"),
      "test_top1_error": 100 * run.final("test_top1_error"),
      "train_loss": run.final("train_loss"),
      "test_loss": run.final("test_loss"),
      "lambda_max": run.final(LAMBDA_TRAIN),
      "lambda_max_peak": max_after(run, LAMBDA_TRAIN, 0),
      "lambda_max_test": run.final(LAMBDA_TEST),
      "distance": run.final(DISTANCE),
      "wall_seconds": run.final("wall_seconds"),
  }


def table_rows(report: Report) -> list[dict]:
  """One row per grid run, best rates marked, then one per variant."""
  base = report.baseline()
  out = []
  for (m, lr), run in sorted(report.grid.items()):
    out.append({**row(run), "best_lr": report.best.get(m) is run,
                "kind": "grid", "changes": ""})
  for run in report.variants:
    out.append({**row(run), "best_lr": "", "kind": "variant",
                "changes": _changed_flags(run, base)})
  return out


def _f(value: float, digits: int = 2) -> str:
  return "" if value is None or (isinstance(value, float) and
                                 math.isnan(value)) else f"{value:.{digits}f}"


def markdown(report: Report) -> str:
  """The best rate per m, every rate's errors, and the variants."""
  lrs = report.learning_rates
  head = ["m", "best lr", "train err %", "test err %", "gap", "lambda_max",
          "lambda_max test", "distance"]
  head += [f"train/test % at lr={lr:g}" for lr in lrs]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in report.batch_sizes:
    run = report.best[m]
    if run is None:
      cells = [str(m), "all diverged", "", "", "", "", "", ""]
    else:
      r = row(run)
      cells = [str(m), f"{run.learning_rate:g}", _f(r["train_top1_error"]),
               _f(r["test_top1_error"]),
               _f(r["test_top1_error"] - r["train_top1_error"]),
               _f(r["lambda_max"], 1), _f(r["lambda_max_test"], 1),
               _f(r["distance"], 1)]
    for lr in lrs:
      other = report.grid.get((m, lr))
      if other is None:
        cells.append("")
      elif other.state == sweep.DIVERGED:
        cells.append("diverged")
      else:
        cells.append(f"{_f(100 * other.final('train_top1_error'))} / "
                     f"{_f(100 * other.final('test_top1_error'))}")
    lines.append("| " + " | ".join(cells) + " |")
  if report.variants:
    base = report.baseline()
    lines += ["", "| run | changes | train err % | test err % | lambda_max | "
              "lambda_max test | distance |", "|---|---|---|---|---|---|---|"]
    for run in ([base] if base else []) + report.variants:
      r = row(run)
      changes = ("(grid run)" if run is base
                 else _changed_flags(run, base) or "(none)")
      if run.state == sweep.DIVERGED:
        lines.append(f"| {run.name} | {changes} | diverged | | | | |")
        continue
      lines.append(
          f"| {run.name} | {changes} | {_f(r['train_top1_error'])} | "
          f"{_f(r['test_top1_error'])} | {_f(r['lambda_max'], 1)} | "
          f"{_f(r['lambda_max_test'], 1)} | {_f(r['distance'], 1)} |")
  if report.unfinished:
    lines += ["", f"{len(report.unfinished)} runs unfinished and left out: "
              + ", ".join(report.unfinished)]
  return "\n".join(lines) + "\n"


def summary_json(report: Report, interpolations: dict) -> dict:
  """Best rates, the paper's claims checked on these runs, interpolations."""
  ms = [m for m in report.batch_sizes if report.best[m] is not None]
  claims = {}
  if len(ms) >= 2:
    small, large = report.best[ms[0]], report.best[ms[-1]]
    for key, label in ((
        "train_top1_error", "train_error"), ("test_top1_error",
                                             "test_error"),
        (LAMBDA_TRAIN, "lambda_max"), (LAMBDA_TEST, "lambda_max_test"),
        (DISTANCE, "distance")):
      a, b = small.final(key), large.final(key)
      claims[f"{label}_small_m"] = a
      claims[f"{label}_large_m"] = b
      claims[f"{label}_larger_at_large_m"] = bool(b > a) if (
          math.isfinite(a) and math.isfinite(b)) else None
    claims["small_m"], claims["large_m"] = ms[0], ms[-1]
  return {"best_learning_rate": {str(m): (None if r is None else
                                          r.learning_rate)
                                 for m, r in report.best.items()},
          "rows": table_rows(report), "claims": claims,
          "interpolations": {os.path.basename(p): _interp_summary(d)
                             for p, d in interpolations.items()},
          "unfinished": report.unfinished}


def _interp_summary(data: dict) -> dict:
  alphas = np.asarray(data["alphas"], float)
  out = {}
  for key in ("train_loss", "test_loss", "train_top1_error"):
    values = np.asarray(data[key], float)
    out[f"{key}_at_0"] = float(np.interp(0.0, alphas, values))
    out[f"{key}_at_1"] = float(np.interp(1.0, alphas, values))
    inside = (alphas >= 0) & (alphas <= 1)
    out[f"{key}_max_between"] = float(values[inside].max()) if (
        inside.any()) else math.nan
  return out


# --- Figures -----------------------------------------------------------------


def figures(report: Report, interpolations: dict | None = None
            ) -> dict[str, bytes]:
  """Figs. 1-6 as PNG bytes by file name (Fig. 2 only with interpolations,
  Fig. 6 only with variants)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  plt = figures_lib.pyplot()
  ms = [m for m in report.batch_sizes if report.best[m] is not None]
  cmap = plt.get_cmap("viridis")

  def color(m):
    return cmap(ms.index(m) / max(1, len(ms) - 1)) if m in ms else "0.3"

  def drops(ax):
    for epoch in report.lr_drop_epochs:
      ax.axvline(epoch, color="0.6", lw=0.8, ls=":")

  out = {}
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, split in zip(axes, data_lib.SPLITS):
    key = f"{split}_top1_error"
    for i, lr in enumerate(report.learning_rates):
      pts = [(m, 100 * r.final(key)) for (m, glr), r in sorted(
          report.grid.items()) if glr == lr and r.state == sweep.COMPLETED]
      if pts:
        ax.plot(*zip(*pts), "--", marker=".", alpha=0.6, color=f"C{i}",
                label=f"lr={lr:g}")
    if ms:
      ax.plot(ms, [100 * report.best[m].final(key) for m in ms], "k-o",
              label="best lr per m (by training error)")
    ax.set_xscale("log")
    ax.set_xlabel("batch size m")
    ax.set_ylabel(f"final {split} top-1 error (%)")
    ax.set_title(f"{split.capitalize()} error vs batch size")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("Fig. 1: same epochs for every m")
  out["maxibatch_fig1_error_vs_batch_size.png"] = figures_lib.png(fig)

  if interpolations:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (path, data) in enumerate(sorted(interpolations.items())):
      label = (os.path.basename(path)[:-len(".json")]
               .replace("__to__", " → ").replace("batch_size=", "m=")
               .replace("learning_rate=", "lr="))
      for ax, key in zip(axes, ("loss", "top1_error")):
        scale = 100 if key == "top1_error" else 1
        for split, style in (("train", "-"), ("test", "--")):
          ax.plot(data["alphas"], scale * np.asarray(data[f"{split}_{key}"],
                                                     float), style,
                  color=f"C{i}", label=f"{split}: {label}" if key == "loss"
                  else None)
    for ax, name in zip(axes, ("cross-entropy loss", "top-1 error (%)")):
      for x in (0, 1):
        ax.axvline(x, color="0.6", lw=0.8, ls=":")
      ax.set_xlabel("alpha (0: small-m model, 1: large-m model)")
      ax.set_ylabel(name)
      ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.suptitle("Fig. 2: (1-alpha)·θ_small + alpha·θ_large")
    out["maxibatch_fig2_interpolation.png"] = figures_lib.png(fig)

  largest = ms[-1] if ms else None
  for number, key, what in ((3, LAMBDA_TRAIN, "training examples"),
                            (4, LAMBDA_TEST, "test batches (mean)")):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for m in ms:
      run = report.best[m]
      axes[0].plot(*run.curve(key), marker=".", color=color(m),
                   label=f"m={m} (lr={run.learning_rate:g})")
    if largest is not None:
      for i, lr in enumerate(report.learning_rates):
        run = report.grid.get((largest, lr))
        if run is not None and run.state == sweep.COMPLETED:
          axes[1].plot(*run.curve(key), marker=".", color=f"C{i}",
                       label=f"lr={lr:g}")
      for j, run in enumerate(report.variants):
        if run.batch_size == largest and run.state == sweep.COMPLETED:
          axes[1].plot(*run.curve(key), ls="--", color=f"C{j + 4}",
                       label=run.name)
    axes[0].set_title("best lr per m")
    axes[1].set_title(f"m={largest}: learning rates and variants")
    for ax in axes:
      drops(ax)
      ax.set_yscale("log")
      ax.set_xlabel("epoch")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    axes[0].set_ylabel("lambda_max")
    fig.suptitle(f"Fig. {number}: top Hessian eigenvalue on {what}")
    name = "train" if key == LAMBDA_TRAIN else "test"
    out[f"maxibatch_fig{number}_lambda_max_{name}.png"] = figures_lib.png(fig)

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for m in ms:
    run = report.best[m]
    ax.plot(*run.curve(DISTANCE), color=color(m),
            label=f"m={m} (lr={run.learning_rate:g})")
  for j, run in enumerate(report.variants):
    if run.state == sweep.COMPLETED:
      ax.plot(*run.curve(DISTANCE), ls="--", color=f"C{j + 4}",
              label=run.name)
  drops(ax)
  ax.set_xlabel("epoch")
  ax.set_ylabel("||θ_t − θ_0||")
  ax.set_title("Fig. 5: distance from the initial parameters")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  out["maxibatch_fig5_distance.png"] = figures_lib.png(fig)

  base = report.baseline()
  shown = [r for r in report.variants if r.state == sweep.COMPLETED]
  if shown and base is not None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for j, run in enumerate([base] + shown):
      style = dict(color="k") if run is base else dict(color=f"C{j + 3}")
      label = f"{run.name} (plain)" if run is base else run.name
      axes[0].plot(*_scaled(run.curve("train_top1_error")), label=label,
                   **style)
      axes[1].plot(*_scaled(run.curve("test_top1_error")), **style)
      axes[2].plot(*run.curve(LAMBDA_TRAIN), marker=".", **style)
    for ax, name in zip(axes, ("training top-1 error (%)",
                               "test top-1 error (%)", "lambda_max (train)")):
      drops(ax)
      ax.set_xlabel("epoch")
      ax.set_ylabel(name)
      ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Fig. 6: m={base.batch_size} with gradient noise "
                 f"(Sec. 2.4) and adaptive linearisation (Sec. 2.5)")
    out["maxibatch_fig6_noise_linearization.png"] = figures_lib.png(fig)
  return out


def _scaled(curve):
  return curve[0], 100 * curve[1]



