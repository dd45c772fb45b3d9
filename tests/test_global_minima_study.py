"""The global-minima study (tfcapacity.studies.global_minima and its tool):
the width search, the linearised prediction, the claims and a tiny run."""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tfcapacity.studies import common
from tfcapacity.studies import global_minima as gm
from tfcapacity.studies import global_minima_figures
from tfcapacity.studies import sweep
import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "global_minima_study.py")


def plan(**overrides):
  values = dict(models=["mlp", "fc_resnet"], depths=[1, 4], widths=[8, 32],
                seeds=[0, 1], drift_depths=[1], max_parameters=10**9,
                inputs=10)
  values.update(overrides)
  return gm.Plan(**values)


def test_schedule_stops_at_the_first_fit_except_at_drift_depths():
  p = plan()
  first = gm.schedule(p, {})
  assert {c.name for c in first} == {
      gm.cell(k, 8).name for k in p.keys()}
  fitted = {c.name: True for c in first}
  second = {c.name for c in gm.schedule(p, fitted)}
  # Fitted at width 8: only the drift depth goes on to width 32.
  assert second == {gm.cell(k, 32).name for k in p.keys() if k.depth == 1}
  fitted = {c.name: False for c in first}
  assert len(gm.schedule(p, fitted)) == len(p.keys())
  fitted.update({gm.cell(k, 32).name: False for k in p.keys()})
  assert gm.schedule(p, fitted) == []


def test_the_parameter_cap_leaves_wide_deep_cells_out():
  p = plan(max_parameters=gm.num_parameters("mlp", 4, 8, 10))
  assert gm.num_parameters("mlp", 4, 8, 10) == 10 * 8 + 3 * 64 + 8
  assert gm.num_parameters("fc_resnet", 1, 8, 10) == 10 * 8 + 64 + 8
  capped = {c.name for c in p.over_cap()}
  assert gm.cell(gm.Key("mlp", 4, 0), 32).name in capped
  assert gm.cell(gm.Key("fc_resnet", 4, 0), 8).name in capped
  # Every allowed cell run and failed: nothing above the cap is scheduled.
  failed = {}
  while True:
    pending = gm.schedule(p, failed)
    if not pending:
      break
    assert not {c.name for c in pending} & capped
    failed.update({c.name: False for c in pending})
  assert len(failed) == sum(p.allowed(k, w) for k in p.keys()
                            for w in p.widths)


def test_linearised_fit_equals_gradient_descent_step_by_step():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((6, 9))
  gram = a @ a.T
  outputs = rng.standard_normal(6)
  labels = rng.integers(0, 2, 6)
  eta = 1.0 * 6 / np.linalg.eigvalsh(gram)[-1]
  first, losses = gm.linearised_fit(gram, outputs, labels, eta, 400)
  r = outputs - (2.0 * labels - 1)
  brute_first, brute = None, []
  for t in range(401):
    brute.append(0.5 * np.mean(r ** 2))
    if brute_first is None and np.all(np.abs(r) < 1):
      brute_first = t
    r = r - eta / 6 * gram @ r
  assert first == brute_first and first is not None
  np.testing.assert_allclose(losses, brute, rtol=1e-9)


def test_rate_bound():
  steps = np.arange(5)
  assert gm.rate_bound_holds(steps, 0.5 ** steps, 1.0, 1.0, 1)  # 0.5^t
  assert not gm.rate_bound_holds(steps, 0.9 ** steps, 1.0, 1.0, 1)
  assert gm.rate_bound_holds(steps[1:], 0.5 ** steps[1:], 1.0, 1.0, 1) is None


def make_run(model, depth, width, seed, fitted=True, ratio=0.1, drift=1.0,
             change=0.1):
  return gm.Run(
      name=gm.cell(gm.Key(model, depth, seed), width).name,
      state=sweep.COMPLETED, model=model, depth=depth, width=width,
      seed=seed, n=8, steps=100, learning_rate=1.0, lambda_max0=10.0,
      history=[(0, 0.5, 0.5), (100, 0.01, 0.0 if fitted else 0.25)],
      curve_steps=np.arange(3), curve_losses=np.array([0.5, 0.2, 0.01]),
      ntk=[(0, ratio * 10, 10.0, False, 0.0), (100, ratio * 9, 10.0, False,
                                               drift)],
      relative_change={"hidden_0": change}, linearised_steps=50,
      linearised_bound_holds=True, linearised_losses=np.array([0.5, 0.1]),
      num_parameters=100, wall_seconds=1.0)


def synthetic_report():
  p = plan()
  runs = []
  for seed in (0, 1):
    runs += [make_run("mlp", 1, 8, seed, ratio=0.1, drift=2.0, change=0.2),
             make_run("mlp", 1, 32, seed, ratio=0.1, drift=0.5, change=0.1),
             make_run("mlp", 4, 8, seed, fitted=False, ratio=1e-4),
             make_run("mlp", 4, 32, seed, fitted=False, ratio=1e-4),
             make_run("fc_resnet", 1, 8, seed, ratio=0.1, drift=3.0,
                      change=0.3),
             make_run("fc_resnet", 1, 32, seed, ratio=0.1, drift=1.0,
                      change=0.15),
             make_run("fc_resnet", 4, 8, seed, ratio=0.08)]
  report = gm.summarize(p, runs, [])
  report.learning_rate_c = 1.0
  return report


def test_claims_follow_their_rules():
  report = synthetic_report()
  assert report.needed_by_seed("mlp", 4) == {0: math.inf, 1: math.inf}
  assert report.needed_by_seed("fc_resnet", 4) == {0: 8.0, 1: 8.0}
  claims = {c.id: c for c in gm.claims(report)}
  assert claims["fits"].verdict == common.MIXED  # mlp depth 4 never fits.
  assert claims["width_vs_depth"].verdict == common.AGREES
  assert claims["lambda0_depth"].verdict == common.AGREES
  assert claims["gram_drift"].verdict == common.AGREES
  # The widest drift-depth runs' drift is 0.5 and 1.0: not below 1/2.
  assert claims["gram_drift_bound"].verdict == common.DISAGREES
  assert claims["weight_change"].verdict == common.AGREES
  assert claims["step_size"].verdict == common.MEASURED
  # ResNet's width needed growing as fast flips the verdict.
  for r in report.runs:
    if r.model == "fc_resnet" and r.depth == 4:
      r.history[-1] = (100, 0.01, 0.25)
  claims = {c.id: c for c in gm.claims(report)}
  assert claims["width_vs_depth"].verdict == common.NOT_MEASURED
  text = gm.claims_markdown(list(claims.values()), report)
  assert text.count("\n| ") == len(claims) + 1


def test_figures_and_tables():
  report = synthetic_report()
  pngs = global_minima_figures.figures(report)
  assert set(pngs) == {"global_minima_width_needed.png",
                       "global_minima_lambda0.png", "global_minima_drift.png",
                       "global_minima_loss.png"}
  assert all(p.startswith(b"\x89PNG") for p in pngs.values())
  table = gm.markdown(report)
  assert "| mlp | 4 | > grid / > grid |" in table
  assert "| fc_resnet | 5 | 8 / 8 |" in table


def tiny_flagfile(tmp_path, **changes):
  text = open(os.path.join(ROOT, "flags",
                           "global_minima_mnist1d_cpu.flags")).read()
  changes = {"--steps=1000": "--steps=12", "--eval_every=50": "--eval_every=6",
             "--gradients_every_steps=100": "--gradients_every_steps=6",
             "--track_distance_every_epochs=100":
                 "--track_distance_every_epochs=6",
             "--train_subset=32": "--train_subset=8",
             "--batch_size=32": "--batch_size=8",
             "--gradients_examples=32": "--gradients_examples=8",
             "--mnist1d_examples=1000": "--mnist1d_examples=200",
             **changes}
  for old, new in changes.items():
    assert old in text
    text = text.replace(old, new)
  path = tmp_path / "base.flags"
  path.write_text(text)
  return path


def run_study(*args):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True,
                        text=True, env=conftest.TOOL_ENV, timeout=600)


def test_the_tool_runs_a_tiny_study_and_reports(tmp_path):
  flagfile = tiny_flagfile(tmp_path)
  study = tmp_path / "study"
  args = [f"--flagfile={flagfile}", f"--study_dir={study}", "--models=mlp",
          "--depths=1", "--widths=4,8", "--seeds=0", "--drift_depths=1",
          "--parallel=2", "--notensorboard"]
  proc = run_study(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = study / "report"
  with open(report / "global_minima_runs.csv") as f:
    rows = list(csv.DictReader(f))
  assert {r["width"] for r in rows} == {"4", "8"}  # The drift depth: all.
  for row in rows:
    assert float(row["learning_rate_used"]) > 0
    assert os.path.exists(study / row["run"] / "ntk_init.npz")
  with open(report / "claims.csv") as f:
    ids = [r["id"] for r in csv.DictReader(f)]
  assert ids[:2] == ["fits", "zero_loss"]
  assert (report / "global_minima_width_needed.png").exists()
  # Rerunning trains nothing new and writes the same tables.
  before = (report / "global_minima.md").read_text()
  again = run_study(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "started cell" not in again.stderr
  assert (report / "global_minima.md").read_text() == before


def test_the_tool_refuses_flags_outside_the_regime(tmp_path):
  flagfile = tiny_flagfile(tmp_path, **{"--parametrization=ntk":
                                        "--parametrization=standard"})
  proc = run_study(f"--flagfile={flagfile}", f"--study_dir={tmp_path / 's'}")
  conftest.assert_one_line_error(proc, "--parametrization=ntk",
                                 prog="global_minima_study")
  assert not (tmp_path / "s").exists()


def test_ntk_conditioning_tool_reports_the_gram_spectrum(tmp_path):
  flagfile = tiny_flagfile(tmp_path)
  out = tmp_path / "c.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "ntk_conditioning.py"),
       f"--flagfile={flagfile}", "--models=mlp", "--depths=1,2",
       "--n_values=4,8", "--width=16", f"--output={out}"],
      capture_output=True, text=True, env=conftest.TOOL_ENV, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  rows = json.loads(out.read_text())["rows"]
  assert [(r["n"], r["depth"]) for r in rows] == [(4, 1), (4, 2), (8, 1),
                                                  (8, 2)]
  for r in rows:
    assert 0 < r["lambda_min"] < r["lambda_max"]
    # The tiny flagfile trains in float64.
    resolved = r["lambda_min"] >= r["n"] * np.finfo(np.float64).eps * \
        r["lambda_max"]
    assert r["resolved"] == resolved
    if resolved:
      assert r["condition_number"] == pytest.approx(
          r["lambda_max"] / r["lambda_min"])
    else:  # null, named in the row's non_finite.
      assert r["condition_number"] is None
      assert r["non_finite"] == {"condition_number": "nan"}
  missing = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "ntk_conditioning.py"),
       f"--flagfile={flagfile}"], capture_output=True, text=True,
      env=conftest.TOOL_ENV, timeout=300)
  conftest.assert_one_line_error(missing, "--output", prog="ntk_conditioning")
