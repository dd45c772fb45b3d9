"""The capacity report on run directories with hand-made results."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tfcapacity import config
from tfcapacity.errors import UserError
from tfcapacity.studies import capacity
from tfcapacity import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Final training top-5 errors (fractions) by (width, learning rate) and seed;
# None marks a diverged run.
TABLE = {
    (10, 0.1): [0.50, 0.54], (10, 0.01): [0.60, 0.62],
    (20, 0.1): [0.30, None], (20, 0.01): [0.40, 0.44],
    (40, 0.1): [0.35, 0.41], (40, 0.01): [0.39, 0.41],
}


def make_run(sweep_dir, width, lr, seed, final, status="completed",
             **flags):
  cfg = config.make(width=width, learning_rate=lr, seed=seed, epochs=4,
                    **flags)
  name = f"width={width},learning_rate={lr},seed={seed}" + "".join(
      f",{k}={v}" for k, v in flags.items())
  run_dir = os.path.join(sweep_dir, name)
  os.makedirs(run_dir)
  rundir.atomic_write(os.path.join(run_dir, rundir.FLAGS_FILE),
                      config.to_flagfile(cfg))
  if status is None:
    return
  # Training error falls linearly from 0.9 to `final` over four epochs.
  history = [{"epoch": e, "step": 10 * e, "train_loss": 1.0,
              "train_top1_error": 0.9 - e * (0.9 - final) / 4 + 0.1,
              "train_top5_error": 0.9 - e * (0.9 - final) / 4,
              "test_loss": 1.0, "test_top1_error": 0.95,
              "test_top5_error": final + 0.05} for e in range(5)]
  results = {"status": status, "history": history, "steps": 40,
             "total_steps": 40, "final": history[-1]}
  if status == "diverged":
    results.update(history=history[:2], steps=10, diverged_at_step=10,
                   final=history[1])
  rundir.write_json(os.path.join(run_dir, rundir.RESULTS_FILE), results)


@pytest.fixture
def sweep_dir(tmp_path):
  path = str(tmp_path / "sweep")
  for (width, lr), finals in TABLE.items():
    for seed, final in enumerate(finals):
      make_run(path, width, lr, seed, final if final is not None else 0.5,
               status="completed" if final is not None else "diverged")
  make_run(path, 80, 0.1, 0, 0.2, status="running")  # Unfinished.
  return path


def test_best_rate_spread_and_return_on_investment(sweep_dir):
  runs, unfinished = capacity.load_runs(sweep_dir)
  assert unfinished == ["width=80,learning_rate=0.1,seed=0"]
  report = capacity.summarize(runs, metric="top5", unfinished=unfinished)
  best = {x: (g.learning_rate, g.stat()) for x, g in report.best.items()}
  assert best[10][0] == 0.1
  assert best[20][0] == 0.01  # lr 0.1 diverged at one seed: ineligible.
  assert best[40][0] == 0.1
  assert best[10][1]["mean"] == pytest.approx(52.0)
  assert best[10][1]["std"] == pytest.approx(np.std([50, 54], ddof=1))
  assert best[40][1]["min"] == pytest.approx(35.0)
  assert best[40][1]["max"] == pytest.approx(41.0)
  assert report.groups[(20.0, 0.1)].diverged == 1
  # ROI in points of error per added unit, from the best rates' means.
  assert [(r["from"], r["to"]) for r in report.roi] == [(10, 20), (20, 40)]
  assert report.roi[0]["roi"] == pytest.approx((52 - 42) / 10)
  assert report.roi[1]["roi"] == pytest.approx((42 - 38) / 20)
  # Seed-paired spread: seed 0 gives (40-35)/20, seed 1 (44-41)/20.
  assert report.roi[1]["roi_std"] == pytest.approx(
      np.std([5 / 20, 3 / 20], ddof=1))
  assert report.roi[0]["roi_std"] == pytest.approx(0.0, abs=1e-12)
  falls = capacity.roi_falls(report)
  assert falls == {"first": pytest.approx(1.0), "last": pytest.approx(0.2),
                   "falling_steps": 1, "steps": 1}


def test_top1_metric_selects_by_top1(sweep_dir):
  runs, _ = capacity.load_runs(sweep_dir)
  report = capacity.summarize(runs, metric="top1")
  assert report.best[10].stat()["mean"] == pytest.approx(62.0)


def test_learning_curves_are_kept_per_seed(sweep_dir):
  runs, _ = capacity.load_runs(sweep_dir)
  report = capacity.summarize(runs)
  epochs, errors = report.best[10].curves[1]
  assert list(epochs) == [0, 1, 2, 3, 4]
  assert errors[0] == pytest.approx(90.0)
  assert errors[-1] == pytest.approx(54.0)


def test_runs_differing_in_other_flags_are_refused_unless_filtered(sweep_dir):
  make_run(sweep_dir, 10, 0.1, 0, 0.1, depth=2)
  runs, _ = capacity.load_runs(sweep_dir)
  with pytest.raises(UserError, match="differ in --depth.*--where=depth=1"):
    capacity.summarize(runs)
  kept = capacity.filter_runs(runs, ["depth=1"])
  assert capacity.summarize(kept).best[10].stat()["mean"] == pytest.approx(
      52.0)
  deep = capacity.summarize(capacity.filter_runs(runs, ["depth=2"]))
  assert deep.best[10].stat()["mean"] == pytest.approx(10.0)
  with pytest.raises(UserError, match="unknown flag --depthh"):
    capacity.filter_runs(runs, ["depthh=2"])


def test_cli_writes_tables_and_figures(sweep_dir, tmp_path):
  out = str(tmp_path / "report")
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "capacity_report.py"),
       f"--sweep_dir={sweep_dir}", f"--output_dir={out}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| 20 | 0.01 | 42.00 ± 2.83 (2) |" in result.stdout
  assert "1 runs unfinished" in result.stdout
  with open(os.path.join(out, "capacity.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["width"] for r in rows] == ["10", "20", "40"]
  assert rows[1]["train_top5_error_mean@lr=0.1"] == "diverged"
  assert float(rows[0]["roi_to_next"]) == pytest.approx(1.0)
  assert rows[2]["roi_to_next"] == ""
  with open(os.path.join(out, "capacity.json")) as f:
    summary = json.load(f)
  assert summary["roi_falls"]["falling_steps"] == 1
  # Seed-paired interval of 20 -> 40 (lr 0.01 at 20, 0.1 at 40), by scipy.
  from scipy import stats  # pylint: disable=g-import-not-at-top
  paired = [(40 - 35) / 20, (44 - 41) / 20]
  low, high = stats.t.interval(0.95, 1, loc=np.mean(paired),
                               scale=stats.sem(paired))
  (second,) = [r for r in summary["roi_intervals"] if r["from"] == 20]
  assert (second["low"], second["high"]) == pytest.approx((low, high))
  with open(os.path.join(out, "claims.csv"), newline="") as f:
    claims = {r["id"]: r for r in csv.DictReader(f)}
  # Two rates cannot bracket a best rate: the design check fails visibly.
  assert claims["check_lr_bracketed"]["verdict"] == "disagrees"
  assert "widths 10, 20, 40" in claims["check_lr_bracketed"]["measured"]
  assert claims["fig1_error_falls_with_width"]["verdict"] == "agrees"
  assert os.path.exists(os.path.join(out, "claims.md"))
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  for name in ("fig1_train_error_vs_width.png",
               "fig2_return_on_investment.png", "fig3_learning_curves.png"):
    pixels = image.imread(os.path.join(out, name))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert float(np.std(pixels)) > 0.01  # Not blank.
  assert any(e.startswith("events.out") for e in os.listdir(out))


def test_cli_bad_input(tmp_path):
  for args, fragment in [
      ([f"--sweep_dir={tmp_path}/missing"], "is not a directory"),
      ([f"--sweep_dir={tmp_path}"], "holds no runs"),
      ([f"--sweep_dir={tmp_path}", "--metric=top3"], "--metric"),
  ]:
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "capacity_report.py"),
         *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_nan_free_markdown_for_a_width_where_every_rate_diverged(tmp_path):
  path = str(tmp_path / "sweep")
  make_run(path, 10, 0.1, 0, 0.5)
  make_run(path, 20, 0.1, 0, 0.5, status="diverged")
  runs, _ = capacity.load_runs(path)
  report = capacity.summarize(runs)
  assert report.best[20.0] is None and report.roi == []
  text = capacity.markdown(report)
  assert "all diverged" in text and "nan" not in text
  assert not math.isnan(report.best[10.0].stat()["mean"])
