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
    return float(self.history[-1][key]) if self.history else math.nan


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
            "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
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
                          100.0 * np.array([row[key] for row in run.history]))
  best = {}
  for x in sorted({x for x, _ in groups}):
    eligible = [g for (gx, _), g in groups.items()
                if gx == x and g.eligible]
    best[x] = min(eligible, key=lambda g: (g.stat()["mean"],
                                           g.learning_rate), default=None)
  xs = [x for x in sorted(best) if best[x] is not None]
  roi = [return_on_investment(best[a], best[b]) for a, b in zip(xs, xs[1:])]
  return Report(x_flag, metric, groups, best, roi, list(unfinished),
                sorted({lr for _, lr in groups}, reverse=True))


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
  ax.errorbar(xs, [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
              color="k", marker="o", capsize=3, label="best lr per width")
  ax.set_xscale("log", base=2)
  ax.set_xlabel(f"{report.x_flag} (hidden units)")
  ax.set_ylabel(f"final training {m} error (%)")
  ax.set_title("Training error vs capacity (Fig. 1)")
  ax.grid(alpha=0.3)
  ax.legend()
  out["fig1_train_error_vs_width.png"] = figures_lib.png(fig)

  fig, ax = plt.subplots(figsize=(6, 4.2))
  if report.roi:
    mids = [math.sqrt(r["from"] * r["to"]) for r in report.roi]
    err = [0.0 if math.isnan(r["roi_std"]) else r["roi_std"]
           for r in report.roi]
    ax.errorbar(mids, [r["roi"] for r in report.roi], yerr=err, marker="o",
                color="C3", capsize=3)
    for mid, r in zip(mids, report.roi):
      ax.annotate(f"{_fmt_x(r['from'])}→{_fmt_x(r['to'])}", (mid, r["roi"]),
                  textcoords="offset points", xytext=(0, 6), ha="center",
                  fontsize=7)
  ax.axhline(0.0, color="0.5", lw=0.8)
  nonzero = [abs(r["roi"]) for r in report.roi if r["roi"] != 0.0]
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
