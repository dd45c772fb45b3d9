"""The random-labels study (Du et al. 2019): its logic on exact answers."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import measurements
from tfcapacity.errors import UserError
from tfcapacity.studies import random_labels
from tfcapacity.studies import sweep
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILE = os.path.join(ROOT, "flags", "random_labels_mnist1d_cpu.flags")
TOOL = os.path.join(ROOT, "tools", "random_labels_study.py")


def flagfile_text():
  with open(FLAGFILE) as f:
    return f.read()


# --- Steps to the threshold and the loss curve -------------------------------


@pytest.mark.parametrize("losses, threshold, expected", [
    ([2.3, 0.5, 0.0009, 0.002, 0.0001], 1e-3, 2),  # First crossing counts.
    ([2.3, 0.5, 0.001, 0.0011], 1e-3, None),  # Strictly below.
    ([0.0005, 0.2], 1e-3, 0),
    ([2.3, 1.0, 0.4], 0.5, 2),
    ([], 1e-3, None),
])
def test_steps_to_threshold(losses, threshold, expected):
  steps = list(range(len(losses)))
  assert random_labels.steps_to_threshold(steps, losses,
                                          threshold) == expected


def test_steps_to_threshold_sorts_steps_and_rejects_bad_threshold():
  assert random_labels.steps_to_threshold([300, 100, 200],
                                          [1e-4, 0.5, 5e-4]) == 200
  for bad in (0.0, -1.0, math.nan, math.inf):
    with pytest.raises(UserError, match="--threshold"):
      random_labels.steps_to_threshold([0], [1.0], bad)


def test_loss_curve_shifts_batch_losses_by_one_step():
  # train/batch_loss at step s is the loss after s - 1 steps.
  history = [{"step": 0, "train_loss": 2.0}, {"step": 3, "train_loss": 0.25},
             {"step": 5, "train_loss": 0.1}]
  batch = {1: 2.0, 2: 1.0, 3: 0.5, 4: 0.25}
  steps, losses = random_labels.loss_curve(history, batch)
  np.testing.assert_array_equal(steps, [0, 1, 2, 3, 5])
  np.testing.assert_allclose(losses, [2.0, 1.0, 0.5, 0.25, 0.1])
  assert random_labels.steps_to_threshold(steps, losses, 0.3) == 3


def test_measurement_series_merges_history_and_measurements():
  # The layout before every callback row went to "measurements".
  results = {
      "history": [{"step": 0, "epoch": 0, "train_loss": 1.0,
                   "gradients/ntk_min_eigenvalue": 2.5},
                  {"step": 100, "epoch": 4, "train_loss": 0.5}],
      "measurements": [
          {"step": 50, "epoch": 2, "gradients/ntk_min_eigenvalue": "nan"},
          {"step": 25, "epoch": 1, "gradients/ntk_min_eigenvalue": 3.0}]}
  series = random_labels.measurement_series(
      results, "gradients/ntk_min_eigenvalue")
  assert [s for s, _ in series] == [0, 25, 50]
  assert series[0][1] == 2.5 and series[1][1] == 3.0
  assert math.isnan(series[2][1])


def test_read_scalar_events_keeps_the_last_write_of_a_step(tmp_path):
  logdir = str(tmp_path / "train")
  for values in ({1: 3.0, 2: 2.0, 3: 1.0}, {3: 0.75, 4: 0.5}):  # A resume.
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
      for step, value in values.items():
        tf.summary.scalar("train/batch_loss", value, step=step)
        tf.summary.scalar("train/learning_rate", 9.0, step=step)
    writer.close()
  got = random_labels.read_scalar_events(logdir, "train/batch_loss")
  assert got == {1: 3.0, 2: 2.0, 3: 0.75, 4: 0.5}
  assert random_labels.read_scalar_events(str(tmp_path / "none"), "x") == {}


# --- Cells -------------------------------------------------------------------


def test_fc_resnet_cells_get_branch_scale_one_over_depth():
  grid = sweep.parse_grid("model=mlp,fc_resnet;depth=1,4,16;width=8")
  cells = random_labels.study_cells(grid, c_res=1.0)
  scales = {(dict(c.overrides)["model"], dict(c.overrides)["depth"]):
            dict(c.overrides).get("residual_scale") for c in cells}
  assert scales == {("mlp", "1"): None, ("mlp", "4"): None,
                    ("mlp", "16"): None, ("fc_resnet", "1"): "1",
                    ("fc_resnet", "4"): "0.25", ("fc_resnet", "16"): "0.0625"}
  assert len({c.name for c in cells}) == 6
  # c_res = 0: the flags' own --residual_scale.
  assert all("residual_scale" not in dict(c.overrides)
             for c in random_labels.study_cells(grid, c_res=0.0))
  # Depth from the base flags when the grid does not vary it.
  cells = random_labels.study_cells(sweep.parse_grid("model=fc_resnet"), 2.0,
                                    base_depth=8)
  assert dict(cells[0].overrides)["residual_scale"] == "0.25"


def test_grid_that_sets_residual_scale_is_refused_when_c_res_is_on():
  grid = sweep.parse_grid("model=fc_resnet;residual_scale=0.1,1")
  with pytest.raises(UserError, match="residual_scale"):
    random_labels.study_cells(grid, c_res=1.0)
  assert len(random_labels.study_cells(grid, c_res=0.0)) == 2


# --- Best rate, CSV ----------------------------------------------------------


def make_run(lr, final_loss, reached, model="mlp", depth=2, width=16,
             state="completed", ntk=((0, 1.5), (100, 4.0), (200, 3.0))):
  steps = np.arange(3)
  return random_labels.Run(
      name=f"{model},{depth},{width},{lr}", state=state, model=model,
      depth=depth, width=width, learning_rate=lr,
      residual_scale=1.0 / depth, steps=200, total_steps=200,
      curve_steps=steps, curve_losses=np.array([2.0, 1.0, final_loss]),
      final_loss=final_loss, final_top1_error=0.0,
      steps_to_threshold=reached, gram={"ntk": list(ntk), "features": [],
                                        "gram": []},
      condition={"ntk": [(s, 10.0 * (s + 1)) for s, _ in ntk]},
      wall_seconds=1.0, num_parameters=10)


def test_best_rate_reaches_first_else_lowest_final_loss():
  runs = [
      make_run(0.1, 1e-4, 150), make_run(1.0, 5e-4, 120),  # 1.0: sooner.
      make_run(0.1, 0.3, None, depth=8), make_run(1.0, 0.2, None, depth=8),
      make_run(0.05, math.inf, None, depth=16, state="diverged"),
      make_run(0.2, 2.0, None, depth=16),
      make_run(0.1, 1e-4, 100, depth=4), make_run(1.0, 2e-4, 100, depth=4),
  ]
  best = random_labels.best_runs(runs)
  assert list(best) == [("mlp", 2, 16), ("mlp", 4, 16), ("mlp", 8, 16),
                        ("mlp", 16, 16)]
  assert best[("mlp", 2, 16)].learning_rate == 1.0
  assert best[("mlp", 4, 16)].learning_rate == 0.1  # Tie: lower loss.
  assert best[("mlp", 8, 16)].learning_rate == 1.0
  assert best[("mlp", 16, 16)].learning_rate == 0.2  # Diverged comes last.


def test_csv_rows(tmp_path):
  runs = [make_run(1.0, 5e-4, 120),
          make_run(0.2, 0.7, None, model="fc_resnet", depth=4, ntk=())]
  path = str(tmp_path / "rows.csv")
  random_labels.write_csv(path, runs)
  rows = sweep.read_csv(path)
  assert len(rows) == 2
  first, second = rows
  assert first["model"] == "mlp" and first["residual_scale"] == ""
  assert first["steps_to_threshold"] == "120"
  assert first["reached_threshold"] == "True"
  assert float(first["final_train_loss"]) == 5e-4
  assert float(first["ntk_min_eigenvalue_init"]) == 1.5
  assert float(first["ntk_min_eigenvalue_end"]) == 3.0
  assert float(first["ntk_min_eigenvalue_min"]) == 1.5
  assert float(first["ntk_condition_number_init"]) == 10.0
  assert float(first["ntk_condition_number_end"]) == 2010.0
  assert first["features_condition_number_init"] == "nan"
  assert second["steps_to_threshold"] == ""
  assert second["reached_threshold"] == "False"
  assert float(second["residual_scale"]) == 0.25
  assert second["ntk_min_eigenvalue_init"] == "nan"
  table = random_labels.markdown(random_labels.best_runs(runs))
  assert "120 steps" in table and "not reached" in table
  assert "/ 1.5 -> 3 (lr 1)" in table
  # A least eigenvalue at or below zero is float noise: shown as ~0.
  singular = make_run(1.0, 2.0, None, ntk=((0, -1e-3), (100, 2.0)))
  assert "/ ~0 -> 2 (lr 1)" in random_labels.markdown({("mlp", 2, 16):
                                                        singular})


def test_figures_are_pngs():
  runs = [make_run(1.0, 5e-4, 120, depth=d, width=w, model=m)
          for m in ("mlp", "fc_resnet") for d in (1, 4) for w in (8, 16)]
  pngs = random_labels.figures(random_labels.best_runs(runs))
  assert "random_labels_final_loss.png" in pngs
  assert "random_labels_ntk_eigenvalue.png" in pngs
  assert all(data.startswith(b"\x89PNG") for data in pngs.values())
  with pytest.raises(UserError, match="no finished runs"):
    random_labels.figures({})


# --- The flagfile and a tiny real run ----------------------------------------


def test_flagfile_is_full_batch_gradient_descent_on_random_labels():
  cfg = config.parse_flagfile(flagfile_text())
  assert cfg.random_labels and cfg.dataset == "mnist1d"
  assert int(cfg.batch_size) == cfg.train_subset and not cfg.shuffle
  assert cfg.optimizer == "sgd" and cfg.momentum == 0.0
  assert cfg.weight_decay == 0.0 and cfg.activation == "softplus"
  assert cfg.gradients_ntk and cfg.gradients_feature_layer
  grid = dict(sweep.parse_grid(sweep.grid_from_flagfile(flagfile_text())))
  assert set(grid["model"]) == {"mlp", "fc_resnet"}
  assert len(grid["depth"]) >= 4 and len(grid["width"]) >= 3


def test_tiny_run_lowers_the_loss_and_is_read_back(tmp_path):
  # The directory of the one cell of the grid written below, so that the
  # tool's --report_only finds it.
  study_dir = tmp_path / "study"
  cell_dir = str(study_dir / "model=fc_resnet,residual_scale=0.5")
  cfg = config.parse_flagfile(flagfile_text()).replace(
      model="fc_resnet", depth=2, width=16, residual_scale=0.5,
      learning_rate=1.0, train_subset=32, batch_size="32",
      mnist1d_examples=200, steps=30, eval_every=10,
      gradients_every_steps=15, gradients_examples=8, model_dir=cell_dir,
      progress_bar=False)
  results = measurements.train(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert results["steps_per_epoch"] == 1  # Every step sees all examples.
  run = random_labels.load_run(cell_dir, threshold=1e-3)
  assert run is not None and run.state == "completed"
  np.testing.assert_array_equal(run.curve_steps, np.arange(31))
  assert run.curve_losses[-1] < 0.8 * run.curve_losses[0]
  # The events and the evaluations agree on the loss after 10 steps.
  loss10 = [r["train_loss"] for r in results["history"] if r["step"] == 10]
  assert run.curve_losses[10] == pytest.approx(loss10[0], rel=1e-4)
  assert [s for s, _ in run.gram["ntk"]] == [0, 15, 30]
  assert all(v > 0 for _, v in run.gram["ntk"])
  assert [s for s, _ in run.condition["ntk"]] == [0, 15, 30]
  assert all(c >= 1 for _, c in run.condition["ntk"])
  assert run.steps_to_threshold == random_labels.steps_to_threshold(
      run.curve_steps, run.curve_losses, 1e-3)
  # Loose enough to be reached: the first step below it.
  loose = float(run.curve_losses[20])
  first = random_labels.steps_to_threshold(run.curve_steps, run.curve_losses,
                                           loose * 1.0001)
  assert first is not None and first <= 20
  assert run.curve_losses[first] < loose * 1.0001

  # The tool's report of that study directory (no training).
  flagfile = tmp_path / "tiny.flags"
  flagfile.write_text(config.to_flagfile(cfg.replace(model_dir=None))
                      + "# sweep.grid: model=fc_resnet\n")
  out_dir = tmp_path / "report"
  out = subprocess.run(
      [sys.executable, TOOL, f"--flagfile={flagfile}",
       f"--study_dir={study_dir}", "--report_only", "--notensorboard",
       f"--output_dir={out_dir}", f"--threshold={loose * 1.0001!r}"],
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert out.returncode == 0, out.stderr
  rows = sweep.read_csv(str(out_dir / "random_labels.csv"))
  assert len(rows) == 1 and rows[0]["steps_to_threshold"] == str(first)
  assert (out_dir / "random_labels_steps_to_threshold.png").exists()
  assert f"{first} steps" in (out_dir / "random_labels.md").read_text()


# --- The CLI -----------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--study_dir=/tmp/x"], "--flagfile is required"),
    ([f"--flagfile={FLAGFILE}"], "--study_dir is required"),
    ([f"--flagfile={FLAGFILE}", "--study_dir=/nonexistent/rl",
      "--report_only"], "is not a directory"),
    (["--flagfile=/nonexistent.flags", "--study_dir=/tmp/x"],
     "cannot read --flagfile"),
])
def test_cli_bad_input_is_one_line(args, message):
  out = subprocess.run([sys.executable, TOOL, *args], capture_output=True,
                       text=True, timeout=120,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  conftest.assert_one_line_error(out, message, prog="random_labels_study")


def test_cli_refuses_a_flagfile_without_grid(tmp_path):
  path = tmp_path / "nogrid.flags"
  path.write_text("--dataset=digits\n")
  out = subprocess.run([sys.executable, TOOL, f"--flagfile={path}",
                        f"--study_dir={tmp_path / 's'}"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "sweep.grid" in out.stderr.strip().splitlines()[-1]
  assert len(out.stderr.strip().splitlines()) == 1
