"""The capacity study: its grids, its claims' rules, and the tool end to end.

Each rule is checked on hand-made results where it holds and where it
fails; the seed-paired intervals against numpy/scipy computed here.
"""

import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from tfcapacity.errors import UserError
from tfcapacity.studies import capacity
from tfcapacity.studies import common
from tfcapacity.studies import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILE = os.path.join(ROOT, "flags", "capacity_mnist1d_cpu.flags")


# --- Grids -------------------------------------------------------------------


def test_compare_line_overrides_and_extends_the_main_grid():
  main = sweep.parse_grid("width=16,32;learning_rate=1,0.5;seed=0,1,2")
  text = ("# sweep.grid: width=16,32\n"
          "# capacity.compare: kernel_init=glorot_uniform; seed=0\n")
  grid = capacity.compare_grid(text, main)
  assert grid == [("width", ["16", "32"]), ("learning_rate", ["1", "0.5"]),
                  ("seed", ["0"]), ("kernel_init", ["glorot_uniform"])]
  assert capacity.compare_grid("# sweep.grid: width=1\n", main) is None
  cells = capacity.study_cells(main, grid)
  assert len(cells) == 12 + 4
  assert cells[12].name == ("compare/width=16,learning_rate=1,seed=0,"
                            "kernel_init=glorot_uniform")
  assert len({c.name for c in cells}) == len(cells)
  with pytest.raises(UserError, match="capacity.compare"):
    capacity.compare_grid("# capacity.compare: seed\n", main)


def test_cpu_flagfile_grid_and_comparison():
  with open(FLAGFILE) as f:
    text = f.read()
  grid = sweep.parse_grid(sweep.grid_from_flagfile(text))
  comparison = capacity.compare_grid(text, grid)
  cells = capacity.study_cells(grid, comparison)
  # 4 widths x 4 rates x 3 seeds; the comparison: 4 widths x 2 rates, seed 0.
  assert len(cells) == 48 + 8
  configs = sweep.validate([f"--flagfile={FLAGFILE}"], cells)
  main = [c for c in cells if not c.name.startswith("compare/")]
  assert {configs[c.name].kernel_init for c in main} == {"glorot_sigmoid"}
  assert {configs[c.name].kernel_init for c in cells if c not in main} == {
      "glorot_uniform"}
  assert {configs[c.name].epochs for c in cells} == {300}
  assert "66%" not in text


def test_cost_order_puts_the_widest_first():
  cells = sweep.cells(sweep.parse_grid("width=16,1024,64;seed=0,1"))
  order = capacity.cost_order(cells)
  assert [dict(c.overrides)["width"] for c in order] == [
      "1024", "1024", "64", "64", "16", "16"]


# --- Hand-made results --------------------------------------------------------


def make_report(errors, diverged=(), epochs=None):
  """A Report from {(width, lr): {seed: final error %}}.

  Learning curves fall linearly from 90% to the final error over `epochs`.
  """
  epochs = epochs or [0, 5, 10]
  runs = []
  for (width, lr), by_seed in errors.items():
    for seed, final in by_seed.items():
      hist = [{"epoch": e, "train_top1_error":
               (90 - (90 - final) * e / epochs[-1]) / 100,
               "test_top1_error": 0.5, "train_top5_error": 0.0,
               "test_top5_error": 0.0} for e in epochs]
      state = (sweep.DIVERGED if (width, lr, seed) in diverged
               else sweep.COMPLETED)
      runs.append(capacity.Run(f"w{width}lr{lr}s{seed}",
                               {"width": width, "learning_rate": lr,
                                "seed": seed, "kernel_init": "glorot_sigmoid"},
                               state, hist))
  return capacity.summarize(runs, metric="top1")


def grid(width_errors, lrs=(1.0, 0.5, 0.1), best_lr=0.5, worse=5.0):
  """Every width at `lrs`; the best rate gets `width_errors[w]` (by seed),
  the others that plus `worse`."""
  out = {}
  for w, by_seed in width_errors.items():
    for lr in lrs:
      out[(w, lr)] = {s: e + (0 if lr == best_lr else worse)
                      for s, e in by_seed.items()}
  return out


# Errors per seed (%) at the best rate: falling with width, diminishing
# returns.
FALLING = {16: {0: 40.0, 1: 41.0, 2: 39.5},
           32: {0: 28.0, 1: 29.5, 2: 27.0},
           64: {0: 20.0, 1: 21.0, 2: 19.0},
           128: {0: 15.0, 1: 15.5, 2: 14.2}}


def test_bracket_check_holds_inside_and_fails_at_an_edge():
  inside = make_report(grid(FALLING))
  claim = capacity.check_lr_bracketed(inside)
  assert claim.verdict == common.AGREES
  assert claim.id == "check_lr_bracketed"
  at_edge = grid(FALLING)
  for s in (0, 1, 2):  # Width 64: the largest rate wins.
    at_edge[(64, 1.0)][s] = FALLING[64][s] - 1
    at_edge[(128, 0.1)][s] = FALLING[128][s] - 1  # 128: the smallest.
  claim = capacity.check_lr_bracketed(make_report(at_edge))
  assert claim.verdict == common.DISAGREES
  assert "widths 64, 128:" in claim.measured
  assert "largest" in claim.measured and "smallest" in claim.measured
  two_rates = make_report(grid(FALLING, lrs=(1.0, 0.5)))
  assert capacity.check_lr_bracketed(two_rates).verdict == common.DISAGREES


def test_bracket_check_counts_a_diverged_rate_as_tried():
  errors = grid({16: {0: 40.0}, 32: {0: 30.0}}, lrs=(2.0, 1.0, 0.5),
                best_lr=1.0)
  report = make_report(errors, diverged={(16, 2.0, 0)})
  assert report.best[16].learning_rate == 1.0
  assert capacity.check_lr_bracketed(report).verdict == common.AGREES


def test_error_falls_rule():
  report = make_report(grid(FALLING))
  claim = capacity.claim_error_falls(report)
  assert claim.verdict == common.AGREES
  assert "in 9 of 9" in claim.measured
  rising = {w: dict(v) for w, v in FALLING.items()}
  rising[128] = {0: 21.0, 1: 20.0, 2: 30.0}  # Above 64 in seeds 0 and 2.
  claim = capacity.claim_error_falls(make_report(grid(rising)))
  assert claim.verdict == common.MIXED
  assert "in 7 of 9" in claim.measured
  flat = {w: {0: 50.0 + w / 100} for w in (16, 32, 64)}
  assert capacity.claim_error_falls(make_report(grid(flat))).verdict == (
      common.DISAGREES)


def scipy_interval(values):
  v = np.asarray(values, float)
  lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(),
                            scale=stats.sem(v))
  return v.mean(), lo, hi


def test_roi_intervals_match_scipy():
  report = make_report(grid(FALLING))
  intervals = capacity.roi_intervals(report)
  widths = sorted(FALLING)
  for r, (a, b) in zip(intervals, zip(widths, widths[1:])):
    per_seed = [(FALLING[a][s] - FALLING[b][s]) / (b - a) for s in range(3)]
    mean, lo, hi = scipy_interval(per_seed)
    assert (r["from"], r["to"]) == (a, b)
    assert r["mean"] == pytest.approx(mean)
    assert r["low"] == pytest.approx(lo)
    assert r["high"] == pytest.approx(hi)
  drops = capacity.roi_drop_intervals(report)
  for d, (a, b, c) in zip(drops, zip(widths, widths[1:], widths[2:])):
    per_seed = [(FALLING[a][s] - FALLING[b][s]) / (b - a)
                - (FALLING[b][s] - FALLING[c][s]) / (c - b) for s in range(3)]
    mean, lo, hi = scipy_interval(per_seed)
    assert d["mean"] == pytest.approx(mean)
    assert (d["low"], d["high"]) == pytest.approx((lo, hi))


def test_interval_sign_and_verdict():
  assert capacity.interval_sign(capacity.t_interval([1, 1.1, 1.2])) == 1
  assert capacity.interval_sign(capacity.t_interval([-1, -1.1, -1.2])) == -1
  assert capacity.interval_sign(capacity.t_interval([-1, 1, 0.5])) == 0
  assert capacity.interval_sign(capacity.t_interval([4.0])) is None
  v = capacity.interval_verdict
  assert v([1, 1]) == common.AGREES
  assert v([-1, 0]) == common.DISAGREES
  assert v([1, 0]) == common.MIXED
  assert v([1, -1]) == common.MIXED
  assert v([0, 0]) == common.NOT_MEASURED
  assert v([None, None]) == common.NOT_MEASURED


def test_roi_falls_and_positive_hold():
  report = make_report(grid(FALLING))
  assert capacity.claim_roi_falls(report).verdict == common.AGREES
  claim = capacity.claim_roi_positive(report)
  assert claim.verdict == common.AGREES
  assert "above 0" in claim.measured


def test_roi_negative_and_rising():
  # 64 -> 128 loses error in every seed (resolved negative ROI); the ROI
  # rises from 32->64 to ... no: it drops below 0, so the drop is positive.
  errs = {16: {0: 40.0, 1: 41.0, 2: 39.0},
          32: {0: 39.0, 1: 40.2, 2: 38.1},  # ROI 16->32 ~0.06.
          64: {0: 20.0, 1: 21.0, 2: 19.5},  # ROI 32->64 ~0.6: rises.
          128: {0: 30.0, 1: 31.5, 2: 29.0}}  # ROI 64->128 < 0.
  report = make_report(grid(errs))
  positive = capacity.claim_roi_positive(report)
  assert positive.verdict == common.MIXED
  assert "64→128" in positive.measured and "below 0" in positive.measured
  falls = capacity.claim_roi_falls(report)
  assert falls.verdict == common.MIXED  # Rises at the first, falls next.
  rising = {16: {0: 40.0, 1: 41.0, 2: 39.0},
            32: {0: 39.5, 1: 40.4, 2: 38.6},
            64: {0: 37.0, 1: 38.0, 2: 36.0},
            128: {0: 20.0, 1: 21.5, 2: 19.0}}
  assert capacity.claim_roi_falls(make_report(grid(rising))).verdict == (
      common.DISAGREES)


def test_an_interval_spanning_zero_is_not_resolved_never_negative():
  errs = {256: {0: 5.0, 1: 5.3, 2: 4.9},
          512: {0: 5.4, 1: 5.1, 2: 4.95}}  # ROI per seed -, +, -: spans 0.
  report = make_report(grid(errs))
  (r,) = capacity.roi_intervals(report)
  assert r["low"] < 0 < r["high"] and r["mean"] < 0
  claim = capacity.claim_roi_positive(report)
  assert claim.verdict == common.NOT_MEASURED
  assert "not resolved (spans 0)" in claim.measured
  assert "below 0" not in claim.measured


def test_one_seed_gives_not_measured_with_the_reason():
  one = {w: {0: v[0]} for w, v in FALLING.items()}
  report = make_report(grid(one))
  for rule in (capacity.claim_roi_falls, capacity.claim_roi_positive):
    claim = rule(report)
    assert claim.verdict == common.NOT_MEASURED
    assert "n=1" in claim.measured
  assert capacity.claim_error_falls(report).verdict == common.AGREES


def test_fig3_end_rule_and_curves():
  report = make_report(grid(FALLING), epochs=[0, 1, 5, 15, 30])
  assert capacity.claim_fig3_end(report).verdict == common.AGREES
  errs = {w: dict(v) for w, v in FALLING.items()}
  errs[128] = {0: 14.0, 1: 22.0, 2: 13.0}  # Seed 1: 64 ends lowest.
  claim = capacity.claim_fig3_end(make_report(grid(errs)))
  assert claim.verdict == common.MIXED
  assert "seed 1: lowest 64" in claim.measured
  errs[128] = {0: 30.0, 1: 30.0, 2: 30.0}
  assert capacity.claim_fig3_end(make_report(grid(errs))).verdict == (
      common.DISAGREES)
  curves = capacity.claim_fig3_curves(report)
  assert curves.verdict == common.MEASURED
  assert capacity.snapshot_epochs(report) == [1.0, 5.0, 15.0, 30.0]
  # At epoch 15 (half-way) the curves are 90 - (90 - final) / 2.
  mean128 = np.mean([90 - (90 - e) / 2 for e in FALLING[128].values()])
  assert f"epoch 15: lowest 128 ({mean128:.2f}%)" in curves.measured


# --- The tool end to end ----------------------------------------------------


def micro_flagfile(tmp_path):
  with open(FLAGFILE) as f:
    text = f.read()
  text = re.sub(r"^# (sweep\.grid|capacity\.compare):.*\n", "", text,
                flags=re.M)
  text = ("# sweep.grid: width=4,8\n# sweep.grid: learning_rate=1,0.5\n"
          "# sweep.grid: seed=0\n"
          "# capacity.compare: kernel_init=glorot_uniform; width=4; "
          "learning_rate=1\n"
          + text + "--epochs=1\n--mnist1d_examples=400\n--eval_every=1\n"
          "--batch_size=64\n")
  path = tmp_path / "micro.flags"
  path.write_text(text)
  return str(path)


def run_tool(*args):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "capacity_study.py"),
       *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def results_mtimes(study_dir):
  out = {}
  for root, _, files in os.walk(study_dir):
    if "results.json" in files:
      path = os.path.join(root, "results.json")
      out[os.path.relpath(path, study_dir)] = os.stat(path).st_mtime_ns
  return out


def test_tool_end_to_end_and_rerun_trains_nothing(tmp_path):
  flagfile = micro_flagfile(tmp_path)
  study = str(tmp_path / "study")
  page = tmp_path / "page.md"
  page.write_text("a\n<!-- capacity:claims:begin -->\nOLD-TEXT\n"
                  "<!-- capacity:claims:end -->\n<!-- capacity:tables:begin "
                  "-->\n<!-- capacity:tables:end -->\nb\n")
  args = [f"--flagfile={flagfile}", f"--study_dir={study}", "--parallel=2",
          "--notensorboard", f"--docs_page={page}",
          f"--figures_dir={tmp_path / 'figs'}"]
  proc = run_tool(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  mtimes = results_mtimes(study)
  assert len(mtimes) == 4 + 1
  assert sum(k.startswith("compare/") for k in mtimes) == 1
  out = os.path.join(study, "report")
  with open(os.path.join(out, "claims.csv")) as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == common.CLAIM_COLUMNS
  ids = [r["id"] for r in rows]
  assert ids[:4] == ["check_lr_bracketed", "fig1_error_falls_with_width",
                     "fig2_roi_falls", "fig2_roi_positive"]
  verdict = {r["id"]: r["verdict"] for r in rows}
  assert verdict["check_lr_bracketed"] == common.DISAGREES  # Two rates.
  assert verdict["fig2_roi_positive"] == common.NOT_MEASURED  # One seed.
  assert any(i.startswith("compare_kernel_init") for i in ids)
  pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
  assert pngs == ["fig1_train_error_vs_width.png",
                  "fig2_return_on_investment.png",
                  "fig3_learning_curves.png", "fig4_init_comparison.png"]
  assert sorted(os.listdir(tmp_path / "figs")) == pngs
  text = page.read_text()
  assert "OLD-TEXT" not in text
  assert "The return on investment falls as width grows" in text
  assert "Return on investment" in text and text.endswith("b\n")
  # A rerun trains nothing.
  proc = run_tool(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert results_mtimes(study) == mtimes


def test_tool_bad_input(tmp_path):
  proc = run_tool(f"--flagfile={FLAGFILE}", f"--study_dir={tmp_path}/s",
                  "--report_only")
  assert proc.returncode == 2
  assert "capacity_study: error:" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
