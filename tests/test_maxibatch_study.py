"""The maxi-batch study (papers/003): its report on hand-made runs."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tfcapacity.errors import UserError
from tfcapacity.studies import common
from tfcapacity.studies import maxibatch
from tfcapacity.studies import maxibatch_claims as claims_lib
from tfcapacity.studies import maxibatch_figures
from tfcapacity.studies import sweep
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "maxibatch_study.py")
FLAGFILES = [os.path.join(ROOT, "flags", name) for name in (
    "maxibatch_resnet_digits_cpu.flags", "maxibatch_resnet32_cifar10.flags")]
GRID = [("batch_size", ["50", "1400"]), ("learning_rate", ["0.1", "0.3"])]
GRID_SEEDS = GRID + [("seed", ["0", "1"])]
VARIANT_LINES = (
    "# maxibatch.variant: big_noise batch_size=1400 learning_rate=0.1 "
    "grad_noise=empirical grad_noise_reference=@batch_size=50,"
    "learning_rate=0.1\n"
    "# maxibatch.variant: big_lr1 batch_size=1400 learning_rate=1.0\n")
STUDY_VARIANT_LINES = VARIANT_LINES + (
    "# maxibatch.variant: ghost batch_size=1400 learning_rate=0.1 "
    "normalization=ghost ghost_batch_size=50\n"
    "# maxibatch.variant: lin batch_size=1400 learning_rate=0.1 "
    "activation=leaky_relu linearize_every_steps=1\n")
EPOCHS, DROP = 8, 5
MOVING_OFFSET = 0.05  # Moving-statistics errors end this far above.


def history(train, test, lam=50.0, lam_test=60.0, dist=10.0, *, jump=1.0,
            norm=30.0, path=40.0, lr=0.1, epochs=EPOCHS, drop=DROP,
            recomputed=True, extra=None):
  """Evaluation and callback rows (callback keys hold a '/').

  Errors fall linearly to `train`/`test` (recomputed batch-norm keys; the
  moving-statistics ones end MOVING_OFFSET higher). lambda_max is 10 at
  epoch 0, lam / jump up to the drop's epoch and lam after it.
  """
  rows = []
  for e in range(epochs + 1):
    f = e / epochs
    lam_e = 10.0 if e == 0 else lam / jump if e <= drop else lam
    lam_t = 10.0 if e == 0 else lam_test / jump if e <= drop else lam_test
    threshold = 2 * 1.9 / (lr * (0.1 if e >= drop else 1.0))
    row = {"epoch": e, "step": 10 * e,
           "train_top1_error": 0.9 - f * (0.9 - train) + MOVING_OFFSET * f,
           "test_top1_error": 0.9 - f * (0.9 - test) + MOVING_OFFSET * f,
           "train_loss": 2.3 - f, "test_loss": 2.4 - f,
           "wall_seconds": 10.0 * e,
           "curvature/lambda_max": lam_e,
           "curvature/lambda_max_test": lam_t,
           "curvature/stability_threshold": threshold,
           "curvature/lambda_max_over_threshold": lam_e / threshold,
           "distance/total": f * dist, "distance/norm": norm * (0.5 + f / 2),
           "path_length/total": f * path}
    if recomputed:
      row.update({"train_top1_error_recomputed_bn": 0.9 - f * (0.9 - train),
                  "test_top1_error_recomputed_bn": 0.9 - f * (0.9 - test),
                  "train_loss_recomputed_bn": 2.2 - f,
                  "test_loss_recomputed_bn": 2.3 - f})
    for key, value in (extra or {}).items():
      row[key] = value(f) if callable(value) else value
    rows.append(row)
  return rows


def split_rows(rows):
  """(history, measurements) as the loop writes them."""
  def callback(key):
    return "/" in key
  return ([{k: v for k, v in r.items() if not callback(k)} for r in rows],
          [{"epoch": r["epoch"], "step": r["step"],
            **{k: v for k, v in r.items() if callback(k)}} for r in rows])


def run_flags(m, lr, seed, **flags):
  return {"batch_size": m, "learning_rate": lr, "seed": seed,
          "lr_drop_epochs": [str(DROP)], "grad_noise": "none",
          "momentum": 0.9, **flags}


def write_run(study, name, m, lr, rows, status="completed",
              layout="measurements", seed=0, **flags):
  """A run's results.json: the callbacks' scalars (curvature/, distance/)
  in `measurements` rows, as the loop writes them, or with
  `layout="callbacks_in_history"` in the evaluations' rows, as it wrote them
  before."""
  cell = os.path.join(study, name)
  os.makedirs(cell, exist_ok=True)
  steps = rows[-1]["step"] if rows else 0
  results = {"status": status, "steps": steps, "total_steps": steps,
             "flags": run_flags(m, lr, seed, model_dir=cell, **flags),
             "history": rows,
             "callbacks": {"curvature": {"bn_mode": "batch"}}}
  if layout == "measurements":
    results["history"], results["measurements"] = split_rows(rows)
  with open(os.path.join(cell, "results.json"), "w") as f:
    json.dump(results, f)
  with open(os.path.join(cell, "flags.txt"), "w") as f:
    f.write(f"--batch_size={m}\n")


def make_run(name, m, lr, seed, rows, state="completed", group="",
             **flags):
  """A Run in memory (no files)."""
  hist, meas = split_rows(rows)
  return maxibatch.Run(name, run_flags(m, lr, seed, **flags), state, hist,
                       bool(group), meas, group)


def cell(m, lr, seed):
  return f"batch_size={m},learning_rate={lr},seed={seed}"


@pytest.fixture
def study(tmp_path):
  """Two m x two lr x two seeds (m=1400 lr 0.3 diverged), four variants.

  Seed s adds s/100 to every error; m=50 lr 0.3 seed 0 is in the older
  layout (callback scalars in the history rows).
  """
  d = str(tmp_path / "study")
  ref = os.path.join(d, "batch_size=50,learning_rate=0.1,seed=")
  slope = {"linearization/mean_slope": lambda f: 0.3 * f}
  noise = {"grad_noise/std": lambda f: 1e-2 * (1 - f) + 1e-4}
  for s in (0, 1):
    j = s / 100
    write_run(d, cell(50, 0.1, s), 50, 0.1,
              history(0.01 + j, 0.03 + j, 40.0 + s, 45.0, 30.0, jump=1.5),
              seed=s)
    write_run(d, cell(50, 0.3, s), 50, 0.3,
              history(0.02 + j, 0.02 + j, 30.0, 35.0, 40.0, lr=0.3),
              layout="callbacks_in_history" if s == 0 else "measurements",
              seed=s)
    write_run(d, cell(1400, 0.1, s), 1400, 0.1,
              history(0.30 + j, 0.32 + j, 80.0 + s, 90.0, 5.0), seed=s)
    write_run(d, cell(1400, 0.3, s), 1400, 0.3,
              history(0.9, 0.9, math.nan, math.nan, 1.0, epochs=1, lr=0.3),
              status="diverged", seed=s)
    write_run(d, f"big_noise,seed={s}", 1400, 0.1,
              history(0.35 + j, 0.36 + j, 70.0, 75.0, 6.0, extra=noise),
              seed=s, grad_noise="empirical",
              grad_noise_reference=ref + str(s))
    write_run(d, f"big_lr1,seed={s}", 1400, 1.0,
              history(0.25 + j, 0.27 + j, 60.0, 65.0, 9.0, lr=1.0), seed=s)
    write_run(d, f"ghost,seed={s}", 1400, 0.1,
              history(0.31 + j, 0.34 + j, 85.0, 95.0, 5.0), seed=s,
              normalization="ghost", ghost_batch_size=50)
    write_run(d, f"lin,seed={s}", 1400, 0.1,
              history(0.29 + j, 0.305 + j, 70.0, 80.0, 5.0, jump=2.0,
                      extra=slope),
              seed=s, activation="leaky_relu", linearize_every_steps=1)
  return d


def cells(study_dir):
  grid_cells = sweep.cells(GRID_SEEDS)
  return grid_cells + maxibatch.parse_variants(STUDY_VARIANT_LINES,
                                               grid_cells, study_dir)


def interpolation(n=5, bump=3.0):
  alphas = [-0.5 + 2 * i / (n - 1) for i in range(n)]
  return {"alphas": alphas, "train_loss": [0.5, 0.01, bump, 0.4, 2.0][:n],
          "train_top1_error": [0.2, 0.0, 0.8, 0.1, 0.6][:n],
          "test_loss": [0.6, 0.1, 3.1, 0.5, 2.1][:n],
          "test_top1_error": [0.3, 0.05, 0.8, 0.2, 0.6][:n]}


def plane(n=5):
  a = np.linspace(-1, 1, n)
  loss = 0.1 + np.add.outer(a ** 2, 2 * a ** 2)
  return {"alphas": list(a), "betas": list(a), "bn_stats": "recompute",
          **{k: loss.tolist() for k in maxibatch.INTERPOLATION_KEYS[1:]}}


# --- Variants ----------------------------------------------------------------


def test_variants_resolve_references_and_run_after_them():
  grid_cells = sweep.cells(GRID)
  variants = maxibatch.parse_variants(VARIANT_LINES, grid_cells, "S")
  assert [v.name for v in variants] == ["big_noise", "big_lr1"]
  noise = variants[0]
  assert noise.depends_on == ("batch_size=50,learning_rate=0.1",)
  assert ("--grad_noise_reference=" + os.path.join(
      "S", "batch_size=50,learning_rate=0.1")) in noise.args()
  first, second = maxibatch.run_order(grid_cells, variants)
  assert first[0].name == "batch_size=50,learning_rate=0.1"
  assert [c.name for c in first[1:]] == [
      "batch_size=50,learning_rate=0.3", "batch_size=1400,learning_rate=0.1",
      "batch_size=1400,learning_rate=0.3", "big_lr1"]
  assert second == [noise]


def test_variants_that_name_variants_run_in_rounds():
  lines = ("# maxibatch.variant: ref batch_size=50 record_grad_variance=true\n"
           "# maxibatch.variant: noisy grad_noise_reference=@ref\n"
           "# maxibatch.variant: noisier grad_noise_reference=@noisy\n"
           "# maxibatch.variant: orphan grad_noise_reference=@"
           "batch_size=1400,learning_rate=0.3\n")
  grid_cells = sweep.cells(GRID)
  variants = maxibatch.parse_variants(lines, grid_cells, "S")
  first, second = maxibatch.run_order(grid_cells, variants)
  # Cells that others wait for lead, in grid order, then the rest.
  assert [c.name for c in first[:2]] == ["batch_size=1400,learning_rate=0.3",
                                         "ref"]
  assert [v.name for v in second] == ["noisy", "noisier", "orphan"]
  states = {c.name: sweep.COMPLETED for c in first}
  states["batch_size=1400,learning_rate=0.3"] = sweep.DIVERGED
  rounds = []

  def run(cells):
    rounds.append([c.name for c in cells])
    return {c.name: sweep.COMPLETED for c in cells}

  left = maxibatch.run_in_rounds(second, states, run)
  assert rounds == [["noisy"], ["noisier"]]
  assert [v.name for v in left] == ["orphan"]


def test_variants_expand_over_the_seed_axis():
  lines = VARIANT_LINES + (
      "# maxibatch.variant: follow grad_noise_reference=@big_lr1\n"
      "# maxibatch.variant: pinned seed=1 grad_noise_reference="
      "@learning_rate=0.1,batch_size=1400\n")
  grid_cells = sweep.cells(GRID_SEEDS)
  assert maxibatch.seed_axis(grid_cells) == ["0", "1"]
  variants = maxibatch.parse_variants(lines, grid_cells, "S")
  names = [v.name for v in variants]
  assert names == ["big_noise,seed=0", "big_noise,seed=1", "big_lr1,seed=0",
                   "big_lr1,seed=1", "follow,seed=0", "follow,seed=1",
                   "pinned"]
  # Run directories: names the sweep keeps as they are, none a grid cell's.
  assert all(sweep.cell_name([("x", n)]) == "x=" + n for n in names)
  assert not set(names) & {c.name for c in grid_cells}
  by_name = {v.name: v for v in variants}
  for seed in ("0", "1"):
    noise = by_name[f"big_noise,seed={seed}"]
    assert noise.group == "big_noise"
    assert noise.depends_on == (
        f"batch_size=50,learning_rate=0.1,seed={seed}",)
    assert f"--seed={seed}" in noise.args()
    assert ("--grad_noise_reference=" + os.path.join(
        "S", f"batch_size=50,learning_rate=0.1,seed={seed}")) in noise.args()
    assert by_name[f"follow,seed={seed}"].depends_on == (
        f"big_lr1,seed={seed}",)
  pinned = by_name["pinned"]
  assert pinned.depends_on == ("batch_size=1400,learning_rate=0.1,seed=1",)
  assert pinned.args().count("--seed=1") == 1
  # Every reference exists, so the rounds can run.
  first, second = maxibatch.run_order(grid_cells, variants)
  assert {d for v in second for d in v.depends_on} <= set(
      c.name for c in first) | set(names)


def test_quick_tier_keeps_the_first_seed():
  grid = maxibatch.first_seed_only(GRID_SEEDS)
  assert grid == GRID + [("seed", ["0"])]
  assert maxibatch.first_seed_only(GRID) == GRID
  grid_cells = sweep.cells(grid)
  variants = maxibatch.parse_variants(VARIANT_LINES, grid_cells, "S")
  assert [v.name for v in variants] == ["big_noise,seed=0", "big_lr1,seed=0"]
  assert len(grid_cells) == 4


def test_a_reference_at_a_seed_off_the_axis_fails():
  line = ("# maxibatch.variant: odd seed=7 grad_noise_reference="
          "@batch_size=50,learning_rate=0.1\n")
  with pytest.raises(UserError, match="names no cell of this study at "
                     "seed 7"):
    maxibatch.parse_variants(line, sweep.cells(GRID_SEEDS), "S")


@pytest.mark.parametrize("line, match", [
    ("# maxibatch.variant: lonely", "write '# maxibatch.variant: NAME"),
    ("# maxibatch.variant: a=b batch_size=5", "may hold only"),
    ("# maxibatch.variant: x batch_size", "bad token"),
    ("# maxibatch.variant: x model_dir=/tmp", "may not set --model_dir"),
    ("# maxibatch.variant: x grad_noise_reference=@nope", "names no cell"),
    ("# maxibatch.variant: x grad_noise_reference=@x", "names itself"),
    ("# maxibatch.variant: x batch_size=5\n# maxibatch.variant: x "
     "batch_size=6", "used twice"),
])
def test_bad_variant_lines_fail_with_one_line(line, match):
  with pytest.raises(UserError, match=match) as e:
    maxibatch.parse_variants(line, sweep.cells(GRID), "S")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("path", FLAGFILES)
def test_study_flagfiles_grid_and_variants_validate(path):
  with open(path) as f:
    text = f.read()
  grid = sweep.parse_grid(sweep.grid_from_flagfile(text))
  grid_cells = sweep.cells(grid)
  variants = maxibatch.parse_variants(text, grid_cells, "runs/s")
  configs = sweep.validate([f"--flagfile={path}"], grid_cells + variants)
  sizes = {int(v) for v in dict(grid)["batch_size"]}
  assert min(sizes) <= 50 and len(sizes) >= 4
  kinds = {configs[v.name].grad_noise for v in variants}
  assert "empirical" in kinds
  assert any(configs[v.name].linearize_every_steps for v in variants)
  for cfg in configs.values():
    assert cfg.track_distance and cfg.curvature_every_epochs
    assert cfg.curvature_test_batches != 0


def test_paper_flagfile_keeps_the_paper_setting():
  from tfcapacity import config  # pylint: disable=g-import-not-at-top
  with open(FLAGFILES[1]) as f:
    text = f.read()
  cfg = config.parse_flagfile(text)
  grid = dict(sweep.parse_grid(sweep.grid_from_flagfile(text)))
  assert grid["batch_size"] == ["50", "100", "250", "500", "1000", "5000",
                                "10000"]
  assert (cfg.depth, cfg.dataset, cfg.learning_rate) == (32, "tfds:cifar10",
                                                         0.1)
  assert [int(e) for e in cfg.lr_drop_epochs] == [80]
  assert cfg.weight_decay > 0 and cfg.curvature_examples == 500


# --- Groups over seeds -------------------------------------------------------


def test_spread_and_band_equal_numpy():
  values = [0.3, float("nan"), 0.1, 0.7, float("inf")]
  s = common.spread(values)
  finite = np.array([0.3, 0.1, 0.7])
  assert s.n == 3 and s.mean == pytest.approx(finite.mean())
  assert s.std == pytest.approx(np.std(finite, ddof=1))
  assert (s.min, s.max, s.range) == (0.1, 0.7, pytest.approx(0.6))
  assert s.text(1) == (f"{finite.mean():.1f} ± {np.std(finite, ddof=1):.1f}"
                       f" [0.1, 0.7]")
  assert common.spread([2.0]).text() == "2.00"
  assert math.isnan(common.spread([2.0]).std)
  assert common.spread([]).text() == ""
  # Curves on different epochs: statistics over the curves present.
  x, mean, lo, hi, n = common.band([([0, 2, 4], [1.0, 3.0, 5.0]),
                                    ([0, 2, 3], [3.0, float("nan"), 7.0])])
  np.testing.assert_array_equal(x, [0, 2, 3, 4])
  np.testing.assert_allclose(mean, [2.0, 3.0, 7.0, 5.0])
  np.testing.assert_allclose(lo, [1.0, 3.0, 7.0, 5.0])
  np.testing.assert_allclose(hi, [3.0, 3.0, 7.0, 5.0])
  np.testing.assert_array_equal(n, [2, 1, 1, 1])


def test_summary_groups_seeds_and_picks_best_rate(study):
  runs, unfinished = maxibatch.load_runs(study, cells(study))
  assert unfinished == []
  report = maxibatch.summarize(runs)
  assert report.batch_sizes == [50, 1400] and report.seeds == [0, 1]
  assert report.recomputed
  assert report.error_key("train") == "train_top1_error_recomputed_bn"
  assert report.tier == "full: 2 seeds (0, 1)"
  # Mean training error 1.5% < 2.5%; at m=1400 lr 0.3 diverged.
  assert report.best[50].learning_rate == 0.1
  assert report.best[1400].learning_rate == 0.1
  assert report.lr_drop_epochs == [float(DROP)]
  assert report.baseline().name == "m=1400, lr=0.1"
  assert list(report.variants) == ["big_noise", "big_lr1", "ghost", "lin"]
  assert [r.name for r in report.variants["lin"].runs] == ["lin,seed=0",
                                                           "lin,seed=1"]
  assert report.curvature_bn_modes() == {"batch": 16}
  # Mean and spread over seeds, as numpy computes them.
  group = report.grid[(1400, 0.1)]
  err = group.final(report.error_key("train"), 100)
  values = np.array([30.0, 31.0])
  assert err.mean == pytest.approx(values.mean())
  assert err.std == pytest.approx(np.std(values, ddof=1))
  assert (err.min, err.max) == (pytest.approx(30.0), pytest.approx(31.0))
  x, mean, lo, hi, n = group.band(maxibatch.LAMBDA_TRAIN)
  curves = np.array([r.curve(maxibatch.LAMBDA_TRAIN)[1] for r in group.runs])
  np.testing.assert_allclose(mean, curves.mean(axis=0))
  np.testing.assert_allclose(lo, curves.min(axis=0))
  np.testing.assert_allclose(hi, curves.max(axis=0))
  np.testing.assert_array_equal(x, np.arange(EPOCHS + 1))
  table = maxibatch.tables(report)
  assert (f"| 1400 | 0.1 | 2 | {values.mean():.2f} ± "
          f"{np.std(values, ddof=1):.2f} [30.00, 31.00] |") in table
  assert "(2 diverged)" in table
  assert "lambda_max measured with batch-norm mode batch (16 runs)" in table
  assert "normalization=ghost" in table
  assert "grad_noise=empirical grad_noise_reference=@batch_size=50," in table


def test_best_rate_ties_and_divergence():
  def group(lr, errors, losses, states=("completed", "completed")):
    return [make_run(cell(8, lr, s), 8, lr, s, [
        {"epoch": 1, "step": 5, "train_top1_error": e, "train_loss": l}],
                     state=st)
            for s, (e, l, st) in enumerate(zip(errors, losses, states))]
  # Equal mean training errors: the lower mean training loss wins.
  runs = group(0.1, [0.0, 0.0], [0.02, 0.04]) + group(0.3, [0.0, 0.0],
                                                       [0.01, 0.04])
  assert maxibatch.summarize(runs).best[8].learning_rate == 0.3
  # A rate that diverged in one seed ranks after one that never did.
  runs = group(0.1, [0.2, 0.2], [1, 1]) + group(
      0.3, [0.0, 0.9], [0.1, 9], ("completed", "diverged"))
  assert maxibatch.summarize(runs).best[8].learning_rate == 0.1
  with pytest.raises(UserError, match="both have batch size 8, learning "
                     "rate 0.1 and seed 0"):
    maxibatch.summarize(group(0.1, [0, 0], [0, 0])[:1] * 2)


def test_errors_fall_back_to_moving_statistics():
  runs = [make_run(cell(50, 0.1, 0), 50, 0.1, 0, history(0.1, 0.2)),
          make_run(cell(1400, 0.1, 0), 1400, 0.1, 0,
                   history(0.3, 0.4, recomputed=False))]
  report = maxibatch.summarize(runs)
  assert not report.recomputed
  assert report.error_key("test") == "test_top1_error"
  assert report.best[1400].final("test_top1_error", 100).mean == (
      pytest.approx(100 * (0.4 + MOVING_OFFSET)))
  assert "moving batch-norm statistics" in maxibatch.tables(report)


def test_quick_report_says_its_tier(study):
  runs, _ = maxibatch.load_runs(study, cells(study))
  report = maxibatch.summarize([r for r in runs if r.seed == 0], quick=True)
  assert report.tier == "quick (1-seed tier, --quick): 1 seed (0)"
  assert report.tier in maxibatch.tables(report)


def test_interpolation_pairs_pair_runs_of_one_seed(study):
  runs, _ = maxibatch.load_runs(study, cells(study))
  report = maxibatch.summarize(runs)
  pairs = maxibatch.interpolation_pairs(report)
  # The diverged grid runs and the variants that change more than the
  # learning rate are left out.
  assert [(a.name, b.name) for a, b in pairs] == [
      (cell(50, 0.1, s), end) for s in (0, 1)
      for end in (cell(1400, 0.1, s), f"big_lr1,seed={s}")]
  a, b = pairs[0]
  paths = {maxibatch.interpolation_path("S", a, b, bn)
           for bn in maxibatch.LINE_BN_STATS}
  assert len(paths) == 2
  assert [r.name for r in maxibatch.plane_runs(report)] == [
      cell(50, 0.1, 0), cell(1400, 0.1, 0)]
  assert [r.name for r in maxibatch.sharpness_runs(report)] == [
      cell(50, 0.1, 0), cell(50, 0.1, 1), cell(1400, 0.1, 0),
      cell(1400, 0.1, 1)]


def test_unfinished_runs_are_counted_not_reported(study):
  path = os.path.join(study, "big_lr1,seed=1", "results.json")
  with open(path) as f:
    results = json.load(f)
  results.update(status="running", steps=1)
  with open(path, "w") as f:
    json.dump(results, f)
  runs, unfinished = maxibatch.load_runs(study, cells(study))
  assert unfinished == ["big_lr1,seed=1"]
  report = maxibatch.summarize(runs, unfinished)
  assert "1 runs unfinished and left out: big_lr1,seed=1" in (
      maxibatch.markdown(report))


def add_analyses(report, bump=3.0):
  for a, b in maxibatch.interpolation_pairs(report):
    for bn in maxibatch.LINE_BN_STATS:
      report.lines.append(maxibatch.Line(a, b, bn, interpolation(
          bump=bump)))
  report.planes = [(run, plane()) for run in maxibatch.plane_runs(report)]
  report.sharpness = {r.name: 10.0 * r.batch_size / 50 + r.seed
                      for r in maxibatch.sharpness_runs(report)}


FIGURES = ["maxibatch_fig1_error_vs_batch_size.png",
           "maxibatch_fig2_interpolation.png", "maxibatch_fig2b_planes.png",
           "maxibatch_fig3_lambda_max_train.png",
           "maxibatch_fig4_lambda_max_test.png",
           "maxibatch_fig5_distance.png", "maxibatch_fig6_variants.png"]


def test_figures_are_pngs(study):
  runs, _ = maxibatch.load_runs(study, cells(study))
  report = maxibatch.summarize(runs)
  add_analyses(report)
  pngs = maxibatch_figures.figures(report)
  assert sorted(pngs) == FIGURES
  assert all(data.startswith(b"\x89PNG") for data in pngs.values())
  if os.environ.get("MAXIBATCH_FIGURES_DIR"):  # To look at them.
    for name, data in pngs.items():
      with open(os.path.join(os.environ["MAXIBATCH_FIGURES_DIR"], name),
                "wb") as f:
        f.write(data)
  report.lines, report.planes = [], []
  assert ("maxibatch_fig2_interpolation.png"
          not in maxibatch_figures.figures(report))


def test_figures_of_older_runs_say_not_measured():
  """Runs without the new keys: panels say "not measured", no error."""
  old = ("curvature/", "distance/", "path_length/")
  runs = [make_run(cell(m, 0.1, 0), m, 0.1, 0, [
      {k: v for k, v in row.items() if not k.startswith(old)}
      for row in history(m / 5000, 0.2, recomputed=False)])
          for m in (50, 1400)]
  report = maxibatch.summarize(runs)
  pngs = maxibatch_figures.figures(report)
  assert "maxibatch_fig3_lambda_max_train.png" in pngs
  verdicts = {c.id: c.verdict for c in claims_lib.evaluate(report)}
  assert verdicts["fig3_lambda_end"] == claims_lib.NOT_MEASURED
  assert verdicts["fig5_norm"] == claims_lib.NOT_MEASURED
  assert verdicts["stability_ratio"] == claims_lib.NOT_MEASURED
  assert verdicts["fig1_train_error"] == claims_lib.AGREES


def test_line_summary_and_barrier(tmp_path):
  path = str(tmp_path / "i.json")
  with open(path, "w") as f:
    json.dump(interpolation(), f)
  data = maxibatch.read_interpolation(path)
  s = maxibatch.line_summary(data)
  assert s["at_0"] == pytest.approx(0.01)
  assert s["at_1"] == pytest.approx(0.4)
  assert s["max_between"] == pytest.approx(3.0)
  assert s["rise_beyond_1"] == pytest.approx(2.0 - 0.4)
  assert s["rise_beyond_0"] == pytest.approx(0.5 - 0.01)
  # 10% above the higher end: 0.44.
  assert maxibatch.has_barrier(interpolation(bump=0.45))
  assert not maxibatch.has_barrier(interpolation(bump=0.43))
  with open(path, "w") as f:
    json.dump(plane(), f)
  assert len(maxibatch.read_interpolation(path, plane=True)["betas"]) == 5
  with open(path, "w") as f:
    json.dump(interpolation(), f)
  with pytest.raises(UserError, match="lacks betas"):
    maxibatch.read_interpolation(path, plane=True)


@pytest.mark.parametrize("content, match", [
    ("{", "cannot read"),
    ('{"alphas": [0]}', "lacks train_loss"),
    ('{"alphas": [0, 1], "train_loss": [1], "train_top1_error": [0], '
     '"test_loss": [1], "test_top1_error": [0]}', "differ in length"),
])
def test_bad_interpolation_files(tmp_path, content, match):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(UserError, match=match):
    maxibatch.read_interpolation(str(path))


def test_bad_results_are_one_line_errors(tmp_path):
  cell_dir = tmp_path / "batch_size=50,learning_rate=0.1"
  cell_dir.mkdir()
  (cell_dir / "results.json").write_text("not json")
  with pytest.raises(UserError, match="not valid JSON"):
    maxibatch.load_run(str(cell_dir))
  (cell_dir / "results.json").write_text('{"status": "completed"}')
  with pytest.raises(UserError, match="no 'history' list"):
    maxibatch.load_run(str(cell_dir))
  with pytest.raises(UserError, match="is not a directory"):
    maxibatch.load_runs(str(tmp_path / "nope"), [])
  with pytest.raises(UserError, match="no finished grid runs"):
    maxibatch.summarize([], ["a"])
  (tmp_path / "s.json").write_text('{"epsilon": 0.001}')
  with pytest.raises(UserError, match="cannot read sharpness"):
    maxibatch.read_sharpness(str(tmp_path / "s.json"))


# --- Claims ------------------------------------------------------------------


def verdicts(report):
  return {c.id: c.verdict for c in claims_lib.evaluate(report)}


def test_claims_of_the_synthetic_study(study):
  runs, _ = maxibatch.load_runs(study, cells(study))
  report = maxibatch.summarize(runs)
  v = verdicts(report)
  a, d, n = claims_lib.AGREES, claims_lib.DISAGREES, claims_lib.NOT_MEASURED
  assert v["fig1_train_error"] == v["fig1_test_error"] == a
  assert v["fig3_lambda_end"] == v["fig4_lambda_test_end"] == a
  assert v["fig3_drop_jump_small_m"] == a  # jump 1.5 at m=50.
  assert v["fig3_drop_jump_large_m"] == a  # no jump at m=1400.
  assert v["fig4_drop_jump_small_m"] == a
  assert v["fig5_distance"] == a  # 5 < 30.
  assert v["fig5_norm"] == v["fig5_path_length"] == d  # equal at both m.
  assert v["sec21_ghost_gap"] == v["sec21_ghost_worse"] == a
  assert v["sec24_noise"] == v["sec24_noise_worse"] == a
  assert v["sec25_early_lambda"] == a  # 35 < 80.
  assert v["sec25_gap"] == a  # 1.5 < 2 points.
  assert v["sec25_accuracy_cost"] == d  # its test error is lower.
  assert v["keskar_phi"] == v["fig2_barrier_recompute"] == n
  assert v["stability_ratio"] == claims_lib.MEASURED
  add_analyses(report)
  v = verdicts(report)
  assert v["keskar_phi"] == a
  assert v["fig2_barrier_recompute"] == v["fig2_barrier_interpolate"] == a
  assert v["fig2_sharper"] == a  # 1.6 beyond alpha=1 > 0.49 beyond 0.
  # Only one rate completed at m=1400.
  assert v["fig2_larger_lr"] == n
  # The stability range, as numpy computes it from the logged ratios.
  ratios = np.array([[r.curve(maxibatch.RATIO)[1] for r in
                      report.grid[(1400, 0.1)].runs if r.completed]])
  text = next(c.measured for c in claims_lib.evaluate(report)
              if c.id == "stability_ratio")
  assert f"lr=0.1: [{ratios.min():.3g}, {ratios.max():.3g}]" in text


def two_m(small_kw, large_kw, seeds=(0, 1), variants=()):
  """A report of m=50 and m=1400 at lr 0.1; *_kw: seed -> history kwargs."""
  runs = []
  for s in seeds:
    runs.append(make_run(cell(50, 0.1, s), 50, 0.1, s,
                         history(**small_kw(s))))
    runs.append(make_run(cell(1400, 0.1, s), 1400, 0.1, s,
                         history(**large_kw(s))))
    for name, kw, flags in variants:
      runs.append(make_run(f"{name},seed={s}", 1400, 0.1, s,
                           history(**kw(s)), group=name, **flags))
  return maxibatch.summarize(runs)


@pytest.mark.parametrize("large_train, expected", [
    ((0.3, 0.3), claims_lib.AGREES),
    ((0.005, 0.001), claims_lib.DISAGREES),
    ((0.3, 0.001), claims_lib.MIXED),
])
def test_rule_larger_at_large_m(large_train, expected):
  report = two_m(lambda s: dict(train=0.01, test=0.05),
                 lambda s: dict(train=large_train[s], test=0.05))
  claim = next(c for c in claims_lib.evaluate(report)
               if c.id == "fig1_train_error")
  assert claim.verdict == expected and claim.seeds == 2
  assert "m=50: 1.00 ± 0.00 [1.00, 1.00] (n=2)" in claim.measured


@pytest.mark.parametrize("jumps, expected", [
    ((1.5, 1.25), claims_lib.AGREES),
    ((1.0, 1.15), claims_lib.DISAGREES),
    ((1.5, 1.15), claims_lib.MIXED),
])
def test_rule_drop_jump(jumps, expected):
  report = two_m(lambda s: dict(train=0.01, test=0.05, jump=jumps[s]),
                 lambda s: dict(train=0.3, test=0.4, jump=jumps[s]))
  v = verdicts(report)
  assert v["fig3_drop_jump_small_m"] == expected
  flipped = {claims_lib.AGREES: claims_lib.DISAGREES,
             claims_lib.DISAGREES: claims_lib.AGREES}
  assert v["fig3_drop_jump_large_m"] == flipped.get(expected, expected)
  run = report.best[50].runs[0]
  before, after = run.around(maxibatch.LAMBDA_TRAIN, DROP)
  assert after / before == pytest.approx(jumps[0])


@pytest.mark.parametrize("noise_test, expected", [
    ((0.10, 0.10), claims_lib.AGREES),
    ((0.06, 0.06), claims_lib.MIXED),  # 3 > 2 points in seed 0, 1 in 1.
    ((0.04, 0.05), claims_lib.DISAGREES),
])
def test_rule_noise_stays_above_small_m(noise_test, expected):
  # m=50 test errors 3% and 5%: a spread of 2 points.
  report = two_m(
      lambda s: dict(train=0.0, test=(0.03, 0.05)[s]),
      lambda s: dict(train=0.3, test=0.4),
      variants=[("noisy", lambda s: dict(train=0.3, test=noise_test[s]),
                 dict(grad_noise="fixed")),
                ("noisier", lambda s: dict(train=0.5, test=0.5),
                 dict(grad_noise="annealed"))])
  claim = next(c for c in claims_lib.evaluate(report) if c.id == "sec24_noise")
  assert claim.verdict == expected
  assert "noisy (best)" in claim.measured and "spread 2.00" in claim.measured
  # The worst noise variant trains worse than the plain run in all seeds.
  assert verdicts(report)["sec24_noise_worse"] == claims_lib.AGREES


@pytest.mark.parametrize("lin_jump, expected", [
    ((4.0, 4.0), claims_lib.AGREES),  # early lambda 50/4 < 50.
    ((0.5, 0.5), claims_lib.DISAGREES),
    ((4.0, 0.5), claims_lib.MIXED),
])
def test_rule_linearization_lowers_early_lambda(lin_jump, expected):
  report = two_m(
      lambda s: dict(train=0.0, test=0.03),
      lambda s: dict(train=0.3, test=0.4, lam=50.0),
      variants=[("lin", lambda s: dict(train=0.3, test=0.4, lam=50.0,
                                       jump=lin_jump[s]),
                 dict(linearize_every_steps=1))])
  assert verdicts(report)["sec25_early_lambda"] == expected


@pytest.mark.parametrize("bumps, expected", [
    ((3.0, 0.45), claims_lib.AGREES),
    ((0.43, 0.2), claims_lib.DISAGREES),
    ((3.0, 0.43), claims_lib.MIXED),
])
def test_rule_barrier(bumps, expected):
  report = two_m(lambda s: dict(train=0.0, test=0.03),
                 lambda s: dict(train=0.3, test=0.4))
  for s in (0, 1):
    report.lines.append(maxibatch.Line(
        report.best[50].runs[s], report.best[1400].runs[s], "recompute",
        interpolation(bump=bumps[s])))
  v = verdicts(report)
  assert v["fig2_barrier_recompute"] == expected
  assert v["fig2_barrier_interpolate"] == claims_lib.NOT_MEASURED


@pytest.mark.parametrize("phi_large, expected", [
    ((5.0, 6.0), claims_lib.AGREES),
    ((0.5, 0.6), claims_lib.DISAGREES),
])
def test_rule_keskar(phi_large, expected):
  report = two_m(lambda s: dict(train=0.0, test=0.03),
                 lambda s: dict(train=0.3, test=0.4))
  for s in (0, 1):
    report.sharpness[cell(50, 0.1, s)] = 1.0
    report.sharpness[cell(1400, 0.1, s)] = phi_large[s]
  assert verdicts(report)["keskar_phi"] == expected


def test_claims_csv_and_markdown(study):
  runs, _ = maxibatch.load_runs(study, cells(study))
  report = maxibatch.summarize(runs)
  claims = claims_lib.evaluate(report)
  rows = list(csv.DictReader(claims_lib.to_csv(claims).splitlines()))
  assert tuple(rows[0]) == common.CLAIM_COLUMNS
  assert len(rows) == len(claims) >= 13
  assert {r["verdict"] for r in rows} <= {
      claims_lib.AGREES, claims_lib.DISAGREES, claims_lib.MIXED,
      claims_lib.NOT_MEASURED, claims_lib.MEASURED}
  assert all(r["rule"] and r["paper"] for r in rows)
  text = claims_lib.markdown(claims, report)
  assert text.count("\n| ") == len(claims) + 1  # header and rows.


# --- Docs page ---------------------------------------------------------------


def test_fill_markers_replaces_only_between_them(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("intro\n<!-- a:begin -->\nold\n<!-- a:end -->\nmiddle\n"
                  "<!-- b:begin --><!-- b:end -->\nend\n")
  common.fill_markers(str(page), {"a": "new A", "b": "| t |\n"})
  expected = ("intro\n<!-- a:begin -->\nnew A\n<!-- a:end -->\nmiddle\n"
              "<!-- b:begin -->\n| t |\n<!-- b:end -->\nend\n")
  assert page.read_text() == expected
  common.fill_markers(str(page), {"a": "new A", "b": "| t |"})
  assert page.read_text() == expected  # Rerunning changes nothing.
  with pytest.raises(UserError, match="lacks the markers <!-- c:begin -->") \
      as e:
    common.fill_markers(str(page), {"a": "X", "c": "Y"})
  assert "\n" not in str(e.value)
  assert page.read_text() == expected  # Nothing written.
  page.write_text("<!-- a:end --> <!-- a:begin -->")
  with pytest.raises(UserError, match="lacks the markers"):
    common.check_markers(str(page), ["a"])


# --- The tool ----------------------------------------------------------------


def run_tool(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True,
                        text=True, env=env, timeout=300)


def study_flagfile(tmp_path):
  flagfile = tmp_path / "study.flags"
  flagfile.write_text("# sweep.grid: batch_size=50,1400\n"
                      "# sweep.grid: learning_rate=0.1,0.3\n"
                      "# sweep.grid: seed=0,1\n" + STUDY_VARIANT_LINES
                      + "--dataset=digits\n")
  return flagfile


def test_tool_reports_a_study_without_training(study, tmp_path):
  runs, _ = maxibatch.load_runs(study, cells(study))
  report = maxibatch.summarize(runs)
  a, b = maxibatch.interpolation_pairs(report)[0]  # seed 0.
  os.makedirs(os.path.join(study, maxibatch.INTERPOLATION_DIR))
  for bn in maxibatch.LINE_BN_STATS:
    with open(maxibatch.interpolation_path(study, a, b, bn), "w") as f:
      json.dump(interpolation(), f)
  with open(maxibatch.plane_path(study, a), "w") as f:
    json.dump(plane(), f)
  os.makedirs(os.path.join(study, maxibatch.SHARPNESS_DIR))
  with open(maxibatch.sharpness_path(study, a), "w") as f:
    json.dump({"sharpness": 1.5}, f)
  page = tmp_path / "page.md"
  page.write_text("# Page\n<!-- maxibatch:claims:begin -->\n"
                  "<!-- maxibatch:claims:end -->\ntext\n"
                  "<!-- maxibatch:tables:begin -->\n"
                  "<!-- maxibatch:tables:end -->\n")
  out, figs = tmp_path / "report", tmp_path / "figures"
  result = run_tool(f"--flagfile={study_flagfile(tmp_path)}",
                    f"--study_dir={study}", "--report_only",
                    "--notensorboard", f"--output_dir={out}",
                    f"--docs_page={page}", f"--figures_dir={figs}")
  assert result.returncode == 0, result.stderr
  # 8 lines (2 seeds x 2 ends x 2 bn_stats), 2 planes, 4 sharpness runs.
  assert ("2 lines, 1 planes, 1 sharpness values (10 not computed: "
          "--report_only)") in result.stdout
  summary = json.loads((out / "maxibatch.json").read_text())
  assert len(summary["analyses_missing"]) == 10
  assert summary["training_seconds_this_invocation"] is None
  assert summary["runs_wall_seconds"] == pytest.approx(
      sum(r.final("wall_seconds") for r in runs))
  claims = (out / "claims.md").read_text()
  assert "| Training error rises with the batch size | Fig. 1 |" in claims
  rows = list(csv.DictReader((out / "claims.csv").read_text().splitlines()))
  assert rows[0]["id"] == "fig1_train_error"
  assert rows[0]["verdict"] == claims_lib.AGREES
  # A header and 16 runs.
  assert (out / "maxibatch.csv").read_text().count("\n") == 17
  assert sorted(os.listdir(figs)) == FIGURES
  text = page.read_text()
  assert "| Training error rises with the batch size" in text
  assert "| m | best lr | seeds |" in text and text.endswith(
      "<!-- maxibatch:tables:end -->\n")


def test_tool_docs_page_without_markers_is_one_line(study, tmp_path):
  page = tmp_path / "page.md"
  page.write_text("# no markers\n")
  result = run_tool(f"--flagfile={study_flagfile(tmp_path)}",
                    f"--study_dir={study}", "--report_only",
                    f"--docs_page={page}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"maxibatch_study: error: {page} lacks the markers <!-- "
      f"maxibatch:claims:begin --> ... <!-- maxibatch:claims:end -->; put "
      f"them where the generated text goes"]


@pytest.mark.parametrize("args, match", [
    ([], "--study_dir is required"),
    (["--study_dir=/tmp/x"], "--flagfile is required"),
    (["--study_dir=/tmp/x", "--flagfile=/nonexistent.flags"],
     "cannot read --flagfile"),
])
def test_tool_bad_input_is_one_line(args, match):
  conftest.assert_one_line_error(run_tool(*args), match,
                                 prog="maxibatch_study")


def test_tool_bad_variant_is_one_line(tmp_path):
  flagfile = tmp_path / "bad.flags"
  flagfile.write_text("# sweep.grid: batch_size=50,100\n"
                      "# maxibatch.variant: v grad_noise_reference=@m50\n")
  result = run_tool(f"--flagfile={flagfile}",
                    f"--study_dir={tmp_path / 's'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "maxibatch_study: error: variant v: @m50 names no cell of this study; "
      "use a grid cell name such as batch_size=100"]
  assert not (tmp_path / "s").exists()
