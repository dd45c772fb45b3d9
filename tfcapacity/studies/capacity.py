"""The capacity report: training error against width, and its derivative.

Dauphin & Bengio (2013), "Big neural networks waste capacity", train
one-hidden-layer sigmoid networks of several widths with two learning rates,
keep for each width the rate with the lowest *training* error after 300
epochs, and plot
  Fig. 1  training error against the number of hidden units;
  Fig. 2  the return on investment (ROI): percentage points of training
          error removed per added hidden unit, the derivative of Fig. 1
          taken between consecutive widths;
  Fig. 3  training error against epochs, one curve per width.
This module computes the same from a sweep directory (tools/sweep.py), with
seeds as repeats: per width and rate the mean, standard deviation, minimum and
maximum of the final training error over seeds; the best rate by the mean;
and the ROI with a spread from seed-paired differences.

Runs that diverged make their rate ineligible for that width; unfinished runs
are left out and counted, so a report of a sweep in progress says so.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from typing import Sequence

import numpy as np

from tfcapacity import figures as figures_lib
from tfcapacity.errors import UserError
from tfcapacity.studies import common
from tfcapacity.studies import sweep
from tfcapacity import rundir

METRICS = ("top1", "top5")
# Flags that may differ between the runs of one report besides the x flag.
_GROUPING = ("learning_rate", "seed")


@dataclasses.dataclass
class Run:
  """A finished run: its flags and what it measured."""
  name: str
  flags: dict
  state: str  # completed or diverged
  history: list[dict]

  def final(self, key: str) -> float:
    return (rundir.row_number(self.history[-1], key) if self.history
            else math.nan)


@dataclasses.dataclass
class Group:
  """The runs of one (width, learning rate): statistics over seeds."""
  x: float
  learning_rate: float
  errors: dict  # seed -> final training error (%)
  test_errors: dict  # seed -> final test error (%)
  curves: dict  # seed -> (epochs, training errors %)
  diverged: int = 0

  @property
  def eligible(self) -> bool:
    return bool(self.errors) and not self.diverged

  def stat(self, values=None) -> dict:
    values = np.array(list((self.errors if values is None else values
                            ).values()), float)
    if values.size == 0:
      return {"mean": math.nan, "std": math.nan, "min": math.nan,
              "max": math.nan, "n": 0}
    return {"mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if values.size > 1
                   else math.nan,
            "min": float(values.min()), "max": float(values.max()),
            "n": int(values.size)}


@dataclasses.dataclass
class Report:
  """Everything the tables and figures show."""
  x_flag: str
  metric: str
  groups: dict  # (x, learning_rate) -> Group
  best: dict  # x -> Group with the lowest mean error (None: no eligible)
  roi: list[dict]  # one per consecutive pair of widths with a best rate
  unfinished: list[str]
  learning_rates: list[float]
  flags: dict = dataclasses.field(default_factory=dict)  # a run's flags

  @property
  def xs(self) -> list[float]:
    return sorted(self.best)


def load_runs(sweep_dir: str) -> tuple[list[Run], list[str]]:
  """Finished runs under `sweep_dir`, and the names of unfinished ones."""
  if not os.path.isdir(sweep_dir):
    raise UserError(f"--sweep_dir={sweep_dir} is not a directory")
  runs, unfinished = [], []
  for name in sorted(os.listdir(sweep_dir)):
    cell_dir = os.path.join(sweep_dir, name)
    if not os.path.isfile(os.path.join(cell_dir, rundir.FLAGS_FILE)):
      continue
    state = sweep.cell_state(cell_dir)
    if state not in sweep.FINISHED:
      unfinished.append(name)
      continue
    results = rundir.read_results(cell_dir)
    flags = rundir.load_config(cell_dir).semantic_dict()
    runs.append(Run(name, flags, state, results.get("history", [])))
  if not runs and not unfinished:
    raise UserError(f"--sweep_dir={sweep_dir} holds no runs (directories "
                    f"with flags.txt); run tools/sweep.py first")
  return runs, unfinished


# --- The study: a main grid and a comparison grid ---------------------------
#
# The base flagfile's `# sweep.grid:` lines are the main grid; its
# `# capacity.compare:` lines (same syntax) override axes of the main grid
# or add new ones, e.g. `# capacity.compare: kernel_init=glorot_uniform;
# seed=0` keeps the main grid's widths and rates, one seed and today's
# initialiser. The comparison's cells live in STUDY_DIR/compare/<cell>.

COMPARE_COMMENT = re.compile(r"^\s*#\s*capacity\.compare:\s*(.+?)\s*$")
COMPARE_DIR = "compare"


@dataclasses.dataclass(frozen=True)
class StudyCell(sweep.Cell):
  """A sweep cell whose directory is `prefix` + its usual name."""
  prefix: str = ""

  @property
  def name(self) -> str:
    return self.prefix + sweep.cell_name(self.overrides)


def compare_grid(text: str, main_grid: Sequence[tuple[str, Sequence[str]]]
                 ) -> list[tuple[str, list[str]]] | None:
  """The comparison grid of a base flagfile's text, or None without one.

  Axes the `# capacity.compare:` lines name replace the main grid's values
  (in the main grid's order); others are appended in their order.

  Raises:
    UserError: malformed lines (as `sweep.parse_grid`).
  """
  parts = [m.group(1) for m in map(COMPARE_COMMENT.match, text.splitlines())
           if m]
  if not parts:
    return None
  try:
    given = sweep.parse_grid(";".join(parts))
  except UserError as e:
    raise UserError(f"'# capacity.compare:' line: {e}") from None
  override = dict(given)
  grid = [(key, list(override.get(key, values))) for key, values in main_grid]
  grid += [(key, values) for key, values in given if key not in dict(grid)]
  return grid


def study_cells(main_grid, comparison=None) -> list[StudyCell]:
  """The main grid's cells, then the comparison's under `compare/`."""
  out = [StudyCell(c.index, c.overrides) for c in sweep.cells(main_grid)]
  if comparison:
    out += [StudyCell(len(out) + c.index, c.overrides, COMPARE_DIR + "/")
            for c in sweep.cells(comparison)]
  return out


def cost_order(cells_: Sequence[sweep.Cell], x_flag: str = "width"
               ) -> list[sweep.Cell]:
  """Widest first (longest runs first keeps both processes busy to the end);
  grid order among equals."""
  def width(cell):
    try:
      return -float(dict(cell.overrides).get(x_flag, 0))
    except ValueError:
      return 0.0
  return sorted(cells_, key=width)


def load_cell(study_dir: str, cell: sweep.Cell) -> Run | None:
  """The cell's finished run, or None if it has not finished."""
  cell_dir = os.path.join(study_dir, cell.name)
  state = sweep.cell_state(cell_dir)
  if state not in sweep.FINISHED:
    return None
  results = rundir.read_results(cell_dir)
  flags = rundir.load_config(cell_dir).semantic_dict()
  return Run(cell.name, flags, state, results.get("history", []))


def default_metric(dataset: str) -> str:
  """top1 for the 10-class embedded datasets, else the paper's top5."""
  return "top1" if dataset in ("mnist1d", "digits") else "top5"


def filter_runs(runs: Sequence[Run], where: Sequence[str]) -> list[Run]:
  """The runs whose flags match every `flag=value` of `where`."""
  kept = list(runs)
  for condition in where:
    key, sep, value = condition.partition("=")
    if not sep:
      raise UserError(f"bad --where {condition!r}; write flag=value")
    if runs and key not in runs[0].flags:
      raise UserError(f"--where names an unknown flag --{key}")
    kept = [r for r in kept if _same(r.flags[key], value)]
  return kept


def _same(flag_value, text: str) -> bool:
  if isinstance(flag_value, bool):
    return text.lower() in (("true", "1") if flag_value else ("false", "0"))
  if isinstance(flag_value, (int, float)):
    try:
      return float(text) == float(flag_value)
    except ValueError:
      return False
  return str(flag_value) == text


def summarize(runs: Sequence[Run], *, x_flag: str = "width",
              metric: str = "top5", unfinished: Sequence[str] = ()
              ) -> Report:
  """Groups runs by (x, learning rate); best rate per x; ROI.

  Raises:
    UserError: an unknown metric or x flag, or runs that differ in flags
      other than the x flag, the learning rate and the seed.
  """
  if metric not in METRICS:
    raise UserError(f"unknown --metric {metric!r}; choose top1 or top5")
  if not runs:
    raise UserError(f"no finished runs yet ({len(unfinished)} unfinished); "
                    f"wait for the sweep or rerun it")
  if x_flag not in runs[0].flags:
    raise UserError(f"--x_flag={x_flag} is not a flag of these runs")
  _check_one_setting(runs, x_flag)
  key = f"train_{metric}_error"
  groups = {}
  for run in runs:
    x = float(run.flags[x_flag])
    lr = float(run.flags["learning_rate"])
    group = groups.setdefault((x, lr), Group(x, lr, {}, {}, {}))
    seed = run.flags["seed"]
    if run.state == sweep.DIVERGED:
      group.diverged += 1
      continue
    group.errors[seed] = 100.0 * run.final(key)
    group.test_errors[seed] = 100.0 * run.final(f"test_{metric}_error")
    group.curves[seed] = (np.array([row["epoch"] for row in run.history]),
                          100.0 * np.array([rundir.row_number(row, key)
                                            for row in run.history]))
  best = {}
  for x in sorted({x for x, _ in groups}):
    eligible = [g for (gx, _), g in groups.items()
                if gx == x and g.eligible]
    best[x] = min(eligible, key=lambda g: (g.stat()["mean"],
                                           g.learning_rate), default=None)
  xs = [x for x in sorted(best) if best[x] is not None]
  roi = [return_on_investment(best[a], best[b]) for a, b in zip(xs, xs[1:])]
  return Report(x_flag, metric, groups, best, roi, list(unfinished),
                sorted({lr for _, lr in groups}, reverse=True),
                dict(runs[0].flags))


def return_on_investment(small: Group, large: Group) -> dict:
  """Percentage points of training error removed per added unit.

  `roi` uses the mean errors of each width's best rate; `roi_std` is the
  standard deviation over seeds of the same quotient taken seed by seed
  (seeds present at both widths), NaN with fewer than two such seeds.
  """
  step = large.x - small.x
  mean = (small.stat()["mean"] - large.stat()["mean"]) / step
  paired = [(small.errors[s] - large.errors[s]) / step
            for s in small.errors if s in large.errors]
  return {"from": small.x, "to": large.x, "roi": mean,
          "roi_std": float(np.std(paired, ddof=1)) if len(paired) > 1
          else math.nan, "seeds": len(paired)}


def _check_one_setting(runs: Sequence[Run], x_flag: str) -> None:
  free = {x_flag, *_GROUPING}
  varying = sorted(k for k in runs[0].flags if k not in free and len(
      {repr(r.flags.get(k)) for r in runs}) > 1)
  if varying:
    values = sorted({str(r.flags[varying[0]]) for r in runs})
    raise UserError(
        f"the runs differ in --{', --'.join(varying)} as well as --{x_flag}, "
        f"--learning_rate and --seed; report one setting at a time, e.g. "
        f"--where={varying[0]}={values[0]}")


# --- Tables ------------------------------------------------------------------


def _fmt(value: float, digits: int = 2) -> str:
  return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _fmt_x(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else f"{x:g}"


def table_rows(report: Report) -> list[dict]:
  """One row per x: best rate, its statistics, per-rate means, ROI."""
  roi_by_from = {r["from"]: r for r in report.roi}
  rows = []
  for x in report.xs:
    group = report.best[x]
    row = {report.x_flag: _fmt_x(x)}
    if group is None:
      row["best_learning_rate"] = ""
    else:
      stat = group.stat()
      row.update({"best_learning_rate": f"{group.learning_rate:g}",
                  "seeds": stat["n"],
                  f"train_{report.metric}_error_mean": stat["mean"],
                  f"train_{report.metric}_error_std": stat["std"],
                  f"train_{report.metric}_error_min": stat["min"],
                  f"train_{report.metric}_error_max": stat["max"],
                  f"test_{report.metric}_error_mean":
                      group.stat(group.test_errors)["mean"]})
    for lr in report.learning_rates:
      g = report.groups.get((x, lr))
      label = f"train_{report.metric}_error_mean@lr={lr:g}"
      if g is None:
        row[label] = ""
      elif g.diverged:
        row[label] = "diverged"
      else:
        row[label] = g.stat()["mean"]
    roi = roi_by_from.get(x)
    row["roi_to_next"] = roi["roi"] if roi else ""
    row["roi_to_next_std"] = roi["roi_std"] if roi else ""
    rows.append(row)
  return rows


def markdown(report: Report) -> str:
  """The table as markdown: errors in %, ROI in points per added unit."""
  m = report.metric.replace("top", "top-")
  head = [report.x_flag, "best lr", f"train {m} error % (mean ± sd, n)",
          "min-max", f"test {m} error %"]
  head += [f"train % at lr={lr:g}" for lr in report.learning_rates]
  head += ["ROI to next (points per unit)"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  roi_by_from = {r["from"]: r for r in report.roi}
  for x in report.xs:
    g = report.best[x]
    cells = [_fmt_x(x)]
    if g is None:
      cells += ["all diverged", "", "", ""]
    else:
      s = g.stat()
      cells += [f"{g.learning_rate:g}",
                f"{_fmt(s['mean'])} (n=1)" if s["n"] == 1 else
                f"{_fmt(s['mean'])} ± {_fmt(s['std'])} ({s['n']})",
                f"{_fmt(s['min'])}-{_fmt(s['max'])}",
                _fmt(g.stat(g.test_errors)["mean"])]
    for lr in report.learning_rates:
      other = report.groups.get((x, lr))
      cells.append("" if other is None else "diverged" if other.diverged
                   else _fmt(other.stat()["mean"]))
    roi = roi_by_from.get(x)
    cells.append("" if roi is None else
                 f"{roi['roi']:.4f}" + (f" ± {roi['roi_std']:.4f}"
                                        if not math.isnan(roi["roi_std"])
                                        else ""))
    lines.append("| " + " | ".join(cells) + " |")
  if report.unfinished:
    lines.append("")
    lines.append(f"{len(report.unfinished)} runs unfinished and left out: "
                 + ", ".join(report.unfinished))
  return "\n".join(lines) + "\n"


def write_csv(report: Report, path: str) -> None:
  sweep.write_csv(path, table_rows(report))


# --- Figures -----------------------------------------------------------------


def figures(report: Report) -> dict[str, bytes]:
  """Figs. 1-3 as PNG bytes, by file name."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  plt = figures_lib.pyplot()
  m = report.metric.replace("top", "top-")
  xs = [x for x in report.xs if report.best[x] is not None]
  out = {}

  fig, ax = plt.subplots(figsize=(6, 4.2))
  for lr in report.learning_rates:
    pts = [(x, g.stat()["mean"]) for (x, glr), g in sorted(
        report.groups.items()) if glr == lr and g.eligible]
    if pts:
      ax.plot(*zip(*pts), "--", marker=".", alpha=0.5, label=f"lr={lr:g}")
  stats = [report.best[x].stat() for x in xs]
  ax.errorbar(xs, [s["mean"] for s in stats],
              yerr=[0.0 if math.isnan(s["std"]) else s["std"] for s in stats],
              color="k", marker="o", capsize=3, label="best lr per width")
  ax.set_xscale("log", base=2)
  ax.set_xlabel(f"{report.x_flag} (hidden units)")
  ax.set_ylabel(f"final training {m} error (%)")
  ax.set_title("Training error vs capacity (Fig. 1)")
  ax.grid(alpha=0.3)
  ax.legend()
  out["fig1_train_error_vs_width.png"] = figures_lib.png(fig)

  fig, ax = plt.subplots(figsize=(6, 4.2))
  intervals = roi_intervals(report)
  if intervals:
    mids = [math.sqrt(r["from"] * r["to"]) for r in intervals]
    means = [r["mean"] for r in intervals]
    err = np.array([[0.0, 0.0] if r["n"] < 2 else
                    [r["mean"] - r["low"], r["high"] - r["mean"]]
                    for r in intervals]).T
    n = max(r["n"] for r in intervals)
    ax.errorbar(mids, means, yerr=err, marker="o", color="C3", capsize=3,
                label=(f"mean over seeds, seed-paired {CONFIDENCE:.0%} "
                       f"t-interval (n={n})" if n > 1 else "n=1"))
    for mid, r in zip(mids, intervals):
      ax.annotate(f"{_fmt_x(r['from'])}→{_fmt_x(r['to'])}", (mid, r["mean"]),
                  textcoords="offset points", xytext=(0, 6), ha="center",
                  fontsize=7)
    ax.legend(fontsize=7)
  ax.axhline(0.0, color="0.5", lw=0.8)
  nonzero = [abs(r["mean"]) for r in intervals if r["mean"] != 0.0]
  if nonzero and max(nonzero) / min(nonzero) > 100:
    # Symmetric log: the ROI spans orders of magnitude and may turn negative.
    ax.set_yscale("symlog", linthresh=min(nonzero))
  ax.set_xscale("log", base=2)
  ax.set_xlabel(f"{report.x_flag} (geometric midpoint of each step)")
  ax.set_ylabel(f"{m} error removed per added unit (points)")
  ax.set_title("Return on investment (Fig. 2)")
  ax.grid(alpha=0.3)
  out["fig2_return_on_investment.png"] = figures_lib.png(fig)

  fig, ax = plt.subplots(figsize=(6, 4.2))
  cmap = plt.get_cmap("viridis")
  for i, x in enumerate(xs):
    g = report.best[x]
    curves = list(g.curves.values())
    length = min(len(c[0]) for c in curves)
    epochs = curves[0][0][:length]
    values = np.stack([c[1][:length] for c in curves])
    color = cmap(i / max(1, len(xs) - 1))
    ax.plot(epochs, values.mean(0), color=color,
            label=f"{_fmt_x(x)} (lr={g.learning_rate:g})")
    if len(curves) > 1:
      ax.fill_between(epochs, values.min(0), values.max(0), color=color,
                      alpha=0.2, lw=0)
  ax.set_xlabel("epoch")
  ax.set_ylabel(f"training {m} error (%)")
  ax.set_title("Learning curves per width, best lr (Fig. 3)")
  ax.grid(alpha=0.3)
  ax.legend(title=report.x_flag, fontsize=7)
  out["fig3_learning_curves.png"] = figures_lib.png(fig)
  return out





def roi_falls(report: Report) -> dict:
  """Whether the ROI falls with width: first vs last, and step by step."""
  values = [r["roi"] for r in report.roi]
  drops = sum(b < a for a, b in zip(values, values[1:]))
  return {"first": values[0] if values else math.nan,
          "last": values[-1] if values else math.nan,
          "falling_steps": drops, "steps": max(0, len(values) - 1)}


def counts(report: Report) -> collections.Counter:
  c = collections.Counter()
  for g in report.groups.values():
    c["finished"] += len(g.errors)
    c["diverged"] += g.diverged
  c["unfinished"] = len(report.unfinished)
  return c


# --- The study's report ------------------------------------------------------


@dataclasses.dataclass
class Study:
  """The main grid's report and the comparisons', from one study dir."""
  metric: str
  main: Report
  compare: dict  # label (e.g. "kernel_init=glorot_uniform") -> Report
  # label -> the main grid restricted to that comparison's seeds.
  compare_main: dict
  unfinished: list[str]
  finished: int
  training_seconds: float | None = None


def _label(run: Run, axes: Sequence[str]) -> str:
  return ",".join(f"{k}={run.flags[k]}" for k in axes)


def load_study(study_dir: str, cells_: Sequence[sweep.Cell], *,
               metric: str, x_flag: str = "width") -> Study:
  """Loads the finished runs of `cells_` and summarises each grid.

  Raises:
    UserError: no main-grid run has finished, or as `summarize`.
  """
  runs, unfinished = common.load_runs(
      study_dir, cells_, lambda c: load_cell(study_dir, c))
  prefix = COMPARE_DIR + "/"
  main = [r for r in runs if not r.name.startswith(prefix)]
  other = [r for r in runs if r.name.startswith(prefix)]
  main_unfinished = [n for n in unfinished if not n.startswith(prefix)]
  if not main:
    raise UserError(f"no run of the main grid has finished yet "
                    f"({len(main_unfinished)} unfinished); run the study "
                    f"first (without --report_only)")
  report = summarize(main, x_flag=x_flag, metric=metric,
                     unfinished=main_unfinished)
  compare, compare_main = {}, {}
  if other:
    free = {x_flag, *_GROUPING}
    axes = sorted(k for k in other[0].flags if k not in free and (
        len({repr(r.flags.get(k)) for r in other}) > 1
        or repr(other[0].flags.get(k)) != repr(main[0].flags.get(k))))
    for label in sorted({_label(r, axes) for r in other}):
      group = [r for r in other if _label(r, axes) == label]
      label = label or COMPARE_DIR
      compare[label] = summarize(
          group, x_flag=x_flag, metric=metric,
          unfinished=[n for n in unfinished if n.startswith(prefix)])
      seeds = {r.flags["seed"] for r in group}
      same = [r for r in main if r.flags["seed"] in seeds]
      if same:
        compare_main[label] = summarize(same, x_flag=x_flag, metric=metric)
  return Study(metric, report, compare, compare_main, unfinished, len(runs))


def write_report(study: Study, out_dir: str, *, tensorboard: bool = True,
                 figures_dir: str | None = None) -> dict:
  """Tables, CSVs, claims, JSON and figures into `out_dir`.

  Returns:
    {"claims": [Claim], "claims_md": str, "tables_md": str}.
  """
  os.makedirs(out_dir, exist_ok=True)
  claims = evaluate(study)
  claims_md = claims_markdown(claims, study)
  tables_md = study_tables(study)
  rundir.atomic_write(os.path.join(out_dir, "capacity.md"),
                      "# Capacity study: tables\n\n" + tables_md)
  write_csv(study.main, os.path.join(out_dir, "capacity.csv"))
  for i, (label, rep) in enumerate(sorted(study.compare.items())):
    suffix = "" if len(study.compare) == 1 else f"_{i}"
    sweep.write_csv(os.path.join(out_dir, f"capacity_compare{suffix}.csv"),
                    [{"compare": label, **row} for row in table_rows(rep)])
  common.write_claims(out_dir, claims, claims_md)
  rundir.write_json(os.path.join(out_dir, "capacity.json"), {
      "metric": study.metric, "x_flag": study.main.x_flag,
      "rows": table_rows(study.main), "roi": study.main.roi,
      "roi_intervals": roi_intervals(study.main),
      "compare": {k: table_rows(v) for k, v in study.compare.items()},
      "claims": [c.to_json() for c in claims],
      "finished": study.finished, "unfinished": study.unfinished,
      "training_seconds": study.training_seconds})
  pngs = study_figures(study)
  common.write_figures(out_dir, pngs, "capacity", tensorboard)
  if figures_dir:
    os.makedirs(figures_dir, exist_ok=True)
    common.write_figures(figures_dir, pngs, "capacity", False)
  return {"claims": claims, "claims_md": claims_md, "tables_md": tables_md}


# --- Seed-paired intervals ---------------------------------------------------

CONFIDENCE = 0.95


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE
               ) -> dict:
  """Mean and two-sided t-interval of the mean of `values` (seeds).

  low/high = mean -+ t_{(1+c)/2, n-1} * s / sqrt(n), s the sample standard
  deviation; NaN bounds below two values.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  v = np.asarray([x for x in values if math.isfinite(x)], float)
  n = int(v.size)
  mean = float(v.mean()) if n else math.nan
  if n < 2:
    return {"mean": mean, "low": math.nan, "high": math.nan, "n": n}
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1)
               / math.sqrt(n))
  return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def interval_sign(interval: dict) -> int | None:
  """+1 above 0, -1 below 0, 0 spanning 0 (not resolved), None: no interval
  (fewer than two seeds)."""
  if interval["n"] < 2 or math.isnan(interval["low"]):
    return None
  if interval["low"] > 0:
    return 1
  if interval["high"] < 0:
    return -1
  return 0


def roi_per_seed(small: Group, large: Group) -> dict:
  """seed -> points of error removed per added unit, for seeds at both."""
  step = large.x - small.x
  return {s: (small.errors[s] - large.errors[s]) / step
          for s in sorted(small.errors) if s in large.errors}


def best_groups(report: Report) -> list[Group]:
  """The best-rate group of each width that has one, by width."""
  return [report.best[x] for x in report.xs if report.best[x] is not None]


def roi_intervals(report: Report) -> list[dict]:
  """Per consecutive pair of widths: the ROI per seed, mean, t-interval."""
  groups = best_groups(report)
  out = []
  for a, b in zip(groups, groups[1:]):
    per_seed = roi_per_seed(a, b)
    out.append({"from": a.x, "to": b.x, "per_seed": per_seed,
                **t_interval(list(per_seed.values()))})
  return out


def roi_drop_intervals(report: Report) -> list[dict]:
  """Per consecutive pair of ROI steps k, k+1 (widths w_k < w_k+1 < w_k+2):
  the seed-paired drop ROI_k,s - ROI_k+1,s over seeds run at all three
  widths, mean and t-interval."""
  steps = roi_intervals(report)
  out = []
  for a, b in zip(steps, steps[1:]):
    drops = {s: a["per_seed"][s] - b["per_seed"][s]
             for s in a["per_seed"] if s in b["per_seed"]}
    out.append({"step": (a["from"], a["to"]), "next": (b["from"], b["to"]),
                "per_seed": drops, **t_interval(list(drops.values()))})
  return out


def interval_verdict(signs: Sequence[int | None]) -> str:
  """agrees: every interval above 0; disagrees: none above 0 and some
  below; not measured: no interval resolved (all span 0 or n < 2); mixed
  otherwise. An interval spanning 0 never counts as below 0."""
  if not any(s in (1, -1) for s in signs):
    return common.NOT_MEASURED
  if all(s == 1 for s in signs):
    return common.AGREES
  if not any(s == 1 for s in signs) and any(s == -1 for s in signs):
    return common.DISAGREES
  return common.MIXED


# --- Claims ------------------------------------------------------------------

PAPER = "Dauphin & Bengio 2013"
RESOLVED = {1: "above 0", -1: "below 0", 0: "not resolved (spans 0)",
            None: "no interval (n=1)"}


def _w(x: float) -> str:
  return _fmt_x(x)


def _pair(a: float, b: float) -> str:
  return f"{_w(a)}→{_w(b)}"


def _ival(iv: dict, values, digits: int = 4) -> str:
  """`mean ± std [min, max] (n=k), 95% t-interval [low, high]`."""
  text = _spread_text(values, digits)
  if iv["n"] < 2:
    return text
  return (f"{text}, {CONFIDENCE:.0%} t-interval [{iv['low']:.{digits}f}, "
          f"{iv['high']:.{digits}f}]")


def _spread_text(values, digits: int = 2) -> str:
  sp = common.spread(values)
  if sp.n == 1:
    return f"{sp.mean:.{digits}f} (n=1)"
  return f"{sp.text(digits)} (n={sp.n})"


def _seeds(report: Report) -> int:
  return len({s for g in report.groups.values() for s in g.errors})


def check_lr_bracketed(report: Report, suffix: str = "",
                       what: str = "main grid") -> common.Claim:
  """The best rate of every width lies strictly inside the rates tried."""
  at_edge, inside, notes = [], [], []
  for x in report.xs:
    tried = sorted(lr for (gx, lr) in report.groups if gx == x)
    best = report.best[x]
    if best is None:
      at_edge.append(x)
      notes.append(f"{_w(x)}: every rate diverged")
    elif len(tried) < 3 or best.learning_rate in (tried[0], tried[-1]):
      at_edge.append(x)
      edge = "largest" if best.learning_rate == tried[-1] else "smallest"
      notes.append(f"{_w(x)}: {best.learning_rate:g} ({edge} of "
                   f"{', '.join(f'{lr:g}' for lr in reversed(tried))})")
    else:
      inside.append(x)
  if not report.xs:
    verdict, measured = common.NOT_MEASURED, "no finished runs"
  elif at_edge:
    verdict = common.DISAGREES
    measured = ("best rate at an edge of the grid at widths "
                + ", ".join(_w(x) for x in at_edge) + ": "
                + "; ".join(notes))
  else:
    verdict = common.AGREES
    measured = "best rate inside the grid at every width: " + ", ".join(
        f"{_w(x)}: {report.best[x].learning_rate:g}" for x in inside)
  return common.Claim(
      f"check_lr_bracketed{suffix}",
      f"The learning-rate grid brackets each width's best rate ({what})",
      "design check (the paper keeps the better of two rates)",
      "best rate = lowest mean final training error over seeds among rates "
      "with no diverged seed; a width fails if its best rate is the largest "
      "or the smallest rate tried (diverged rates count as tried) or every "
      "rate diverged; agrees if no width fails, else disagrees",
      measured, _seeds(report), verdict)


def claim_error_falls(report: Report) -> common.Claim:
  """Fig. 1: final training error falls from each width to the next."""
  groups = best_groups(report)
  holds, parts = [], []
  for a, b in zip(groups, groups[1:]):
    drops = [a.errors[s] - b.errors[s] for s in a.errors if s in b.errors]
    holds += [d > 0 for d in drops]
    parts.append(f"{_pair(a.x, b.x)}: {_spread_text(drops)}")
  n_hold = sum(holds)
  measured = ("error removed (points, seed-paired): " + "; ".join(parts)
              + f". Lower at the wider net in {n_hold} of {len(holds)} "
              f"(pair, seed)") if holds else "fewer than two widths finished"
  return common.Claim(
      "fig1_error_falls_with_width",
      "Training error falls as hidden units are added (Fig. 1)",
      "Fig. 1: training error decreases from 1000 to 15000 units",
      "for each pair of consecutive widths, each at its best rate, and each "
      "seed run at both: holds if the wider net's final training error is "
      "lower; agrees if it holds for every (pair, seed), disagrees if for "
      "none, mixed otherwise",
      measured, _seeds(report), common.verdict(holds))


def claim_roi_falls(report: Report) -> common.Claim:
  """Fig. 2: the ROI falls from each step of widths to the next."""
  drops = roi_drop_intervals(report)
  signs = [interval_sign(d) for d in drops]
  parts = [f"{_pair(*d['step'])} minus {_pair(*d['next'])}: "
           f"{_ival(d, d['per_seed'].values())}, {RESOLVED[s]}"
           for d, s in zip(drops, signs)]
  measured = ("ROI drop (points per unit, seed-paired): " + "; ".join(parts)
              ) if drops else (
                  "fewer than three widths finished")
  if drops and all(s is None for s in signs):
    measured += "; n=1: an interval needs two seeds"
  return common.Claim(
      "fig2_roi_falls",
      "The return on investment falls as width grows (Fig. 2)",
      "Fig. 2: the ROI decreases fast with the number of hidden units",
      "ROI_k,s = (err(w_k, s) - err(w_k+1, s)) / (w_k+1 - w_k), each width "
      "at its best rate, seed s run at both; for consecutive steps k, k+1 "
      "the drop D_s = ROI_k,s - ROI_k+1,s over seeds run at all three "
      "widths; 95% t-interval of mean D (t_{0.975, n-1} s / sqrt(n)). A "
      "step falls if the interval lies above 0, rises if below, is not "
      "resolved if it spans 0. Agrees if every step falls, disagrees if "
      "none falls and some rises, not measured if none is resolved "
      "(n < 2 or every interval spans 0), mixed otherwise",
      measured, _seeds(report), interval_verdict(signs))


def claim_roi_positive(report: Report) -> common.Claim:
  """The ROI stays positive (the paper: up to 15000 units)."""
  steps = roi_intervals(report)
  signs = [interval_sign(r) for r in steps]
  parts = [f"{_pair(r['from'], r['to'])}: "
           f"{_ival(r, r['per_seed'].values())}, {RESOLVED[s]}"
           for r, s in zip(steps, signs)]
  measured = ("ROI (points per unit, seed-paired): " + "; ".join(parts)
              ) if steps else "fewer than two widths"
  if steps and all(s is None for s in signs):
    measured += "; n=1: an interval needs two seeds"
  return common.Claim(
      "fig2_roi_positive",
      "Added units still remove training error: the ROI stays positive",
      "Fig. 2: the ROI falls but stays above 0 up to 15000 units",
      "ROI_k,s as in fig2_roi_falls; per step the 95% t-interval of the "
      "mean over seeds: positive if it lies above 0, negative if below, "
      "not resolved if it spans 0 (never read as negative). Agrees if every "
      "step is positive, disagrees if none is and some is negative, not "
      "measured if none is resolved (n < 2 or all span 0), mixed otherwise",
      measured, _seeds(report), interval_verdict(signs))


def _curve_at(group: Group, seed, epoch: float) -> float:
  epochs, values = group.curves[seed]
  hit = np.nonzero(epochs == epoch)[0]
  return float(values[hit[0]]) if hit.size else math.nan


def claim_fig3_end(report: Report) -> common.Claim:
  """Fig. 3: by the last epoch the widest net is the lowest curve."""
  groups = best_groups(report)
  holds, notes = [], []
  if len(groups) >= 2:
    seeds = sorted(set.intersection(*(set(g.errors) for g in groups)),
                   key=str)
    widest = groups[-1]
    for s in seeds:
      finals = {g.x: g.errors[s] for g in groups}
      lowest = min(finals, key=finals.get)
      holds.append(lowest == widest.x)
      notes.append(f"seed {s}: lowest {_w(lowest)} ({finals[lowest]:.2f}%)"
                   f", widest {_w(widest.x)} {finals[widest.x]:.2f}%")
  measured = "; ".join(notes) if notes else "fewer than two widths finished"
  return common.Claim(
      "fig3_widest_lowest_at_end",
      "By the end of training the widest net has the lowest training error "
      "(Fig. 3)",
      "Fig. 3: learning curves per width; wider nets end lower, those above "
      "5000 units converge to the same point",
      "per seed run at every width (best rate per width): holds if the "
      "widest width has the lowest final training error of all widths; "
      "agrees if in every seed, disagrees if in none, mixed otherwise",
      measured, len(holds), common.verdict(holds))


def snapshot_epochs(report: Report, count: int = 4) -> list[float]:
  """Epochs where every best-rate curve has a value: about 1/30, 1/6, 1/2
  and all of the run."""
  groups = best_groups(report)
  if not groups:
    return []
  common_epochs = sorted(set.intersection(*(
      set(float(e) for e in c[0]) for g in groups
      for c in g.curves.values())) - {0.0})
  if not common_epochs:
    return []
  last = common_epochs[-1]
  picks = []
  for frac in (1 / 30, 1 / 6, 1 / 2, 1.0)[-count:]:
    e = min(common_epochs, key=lambda e: abs(e - frac * last))
    if e not in picks:
      picks.append(e)
  return picks


def claim_fig3_curves(report: Report) -> common.Claim:
  """What the learning curves show at a few epochs (measured)."""
  groups = best_groups(report)
  parts = []
  for epoch in snapshot_epochs(report):
    means = {g.x: float(np.nanmean([_curve_at(g, s, epoch)
                                    for s in g.curves])) for g in groups}
    lowest = min(means, key=means.get)
    highest = max(means, key=means.get)
    parts.append(
        f"epoch {epoch:g}: lowest {_w(lowest)} ({means[lowest]:.2f}%), "
        f"highest {_w(highest)} ({means[highest]:.2f}%), widest "
        f"{_w(groups[-1].x)} {means[groups[-1].x]:.2f}%")
  return common.Claim(
      "fig3_curves_at_epochs",
      "Where the learning curves stand during training (Fig. 3)",
      "Fig. 3: shown for reference, no claim about early epochs",
      "mean over seeds of the best-rate curves at epochs near 1/30, 1/6, "
      "1/2 and the end of training: the lowest and highest width and the "
      "widest width's error (no verdict)",
      "; ".join(parts) if parts else "no common evaluation epochs",
      _seeds(report), common.MEASURED)


def claim_compare(label: str, sigmoid: Report, other: Report
                  ) -> common.Claim:
  """The main initialiser against a comparison grid, at the same seeds."""
  parts, lower = [], 0
  xs = [x for x in sigmoid.xs if x in other.best]
  both = 0
  for x in xs:
    a, b = sigmoid.best[x], other.best[x]
    if a is None or b is None:
      parts.append(f"{_w(x)}: no eligible rate")
      continue
    ea, eb = a.stat()["mean"], b.stat()["mean"]
    both += 1
    lower += ea < eb
    parts.append(f"{_w(x)}: {ea:.2f}% (lr {a.learning_rate:g}) vs "
                 f"{eb:.2f}% (lr {b.learning_rate:g})")
  main_init = _flag_text(sigmoid, "kernel_init")
  return common.Claim(
      f"compare_{_ident(label)}",
      f"The main grid ({main_init}) against {label}: best-rate final "
      f"training error per width",
      "the paper's era initialised sigmoid nets with Glorot's limit x4; "
      "no claim about today's initialisers",
      "per width, each grid at its own best rate chosen at the comparison's "
      "seeds only; the main grid's error first (no verdict)",
      "; ".join(parts) + (f". Main grid lower at {lower} of {both} widths"
                          if both else ""),
      _seeds(other), common.MEASURED)


def _flag_text(report: Report, key: str) -> str:
  return f"{key}={report.flags.get(key)}"


def _ident(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def evaluate(study: Study) -> list[common.Claim]:
  """Every claim of the study, verdicts from their rules."""
  r = study.main
  claims = [check_lr_bracketed(r), claim_error_falls(r), claim_roi_falls(r),
            claim_roi_positive(r), claim_fig3_end(r), claim_fig3_curves(r)]
  for label, other in sorted(study.compare.items()):
    claims.append(check_lr_bracketed(other, f"_{_ident(label)}", label))
    if label in study.compare_main:
      claims.append(claim_compare(label, study.compare_main[label], other))
  return claims


def claims_markdown(claims: Sequence[common.Claim], study: Study) -> str:
  m = study.metric.replace("top", "top-")
  lines = [f"Training {m} error in %, final epoch; each width at its best "
           f"learning rate. Verdicts come from the rule in each row.", ""]
  lines += common.claims_table([dataclasses.replace(
      c, claim=f"`{c.id}`: {c.claim}") for c in claims])
  return "\n".join(lines) + "\n"


def study_tables(study: Study) -> str:
  """The main grid's table, ROI intervals and the comparisons' tables."""
  m = study.metric.replace("top", "top-")
  out = [f"### Main grid ({_flag_text(study.main, 'kernel_init')})", "",
         markdown(study.main), "",
         "### Return on investment with seed-paired 95% t-intervals", "",
         f"| step | ROI (points of {m} error per unit) | 95% interval | "
         f"seeds | sign |", "|---|---|---|---|---|"]
  for r in roi_intervals(study.main):
    out.append(f"| {_pair(r['from'], r['to'])} | {r['mean']:.4f} | "
               + ("" if r["n"] < 2 else
                  f"[{r['low']:.4f}, {r['high']:.4f}]")
               + f" | {r['n']} | {RESOLVED[interval_sign(r)]} |")
  for label, rep in sorted(study.compare.items()):
    out += ["", f"### Comparison: {label}", "", markdown(rep)]
  if study.training_seconds is not None:
    out += ["", f"Training wall time of this invocation: "
            f"{study.training_seconds / 60:.1f} min."]
  return "\n".join(out) + "\n"


def study_figures(study: Study) -> dict[str, bytes]:
  """Figs. 1-3 of the main grid, and Fig. 4: each comparison against the
  main grid at the same seeds (best-rate final training error per width)."""
  out = figures(study.main)
  if not study.compare:
    return out
  plt = figures_lib.pyplot()
  m = study.metric.replace("top", "top-")
  fig, ax = plt.subplots(figsize=(6, 4.2))
  main_name = _flag_text(study.main, "kernel_init")
  for label, other in sorted(study.compare.items()):
    for rep, name, style in ((study.compare_main.get(label), main_name, "-"),
                             (other, label, "--")):
      groups = best_groups(rep) if rep is not None else []
      if not groups:
        continue
      seeds = sorted({s for g in groups for s in g.errors}, key=str)
      ax.plot([g.x for g in groups], [g.stat()["mean"] for g in groups],
              style, marker="o",
              label=f"{name} (seed{'s' if len(seeds) > 1 else ''} "
                    f"{', '.join(map(str, seeds))})")
  ax.set_xscale("log", base=2)
  ax.set_xlabel(f"{study.main.x_flag} (hidden units)")
  ax.set_ylabel(f"final training {m} error (%), best lr")
  ax.set_title("Initialisation: the main grid against the comparison")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  out["fig4_init_comparison.png"] = figures_lib.png(fig)
  return out
