"""The gradient-confusion study (issue 5a): its logic on exact answers."""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import data as data_lib
from tfcapacity import models
from tfcapacity.errors import UserError
from tfcapacity.gradients import callback
from tfcapacity.gradients import statistics
from tfcapacity.studies import confusion_study as study
from tfcapacity.studies import sweep
from tfcapacity import rundir
from tfcapacity.models import layers as layers_lib
from tfcapacity.objective import function as function_lib
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILE = os.path.join(ROOT, "flags", "confusion_mnist1d_cpu.flags")
TOOL = os.path.join(ROOT, "tools", "confusion_study.py")
TINY = dict(dataset="mnist1d", mnist1d_examples=120, width=8, depth=2,
            gradients_examples=12, gradients_chunk_size=8, seed=3)


# --- Parts --------------------------------------------------------------------


def test_parse_parts_joins_lines_and_keeps_order():
  text = ("# confusion.train_b: width=4,8\n--width=2\n"
          "# confusion.init_a: depth=1,2\n# confusion.train_b: seed=0,1\n"
          "# sweep.grid: width=1\n")
  parts = study.parse_parts(text)
  assert [p.name for p in parts] == ["train_b", "init_a"]
  assert parts[0].grid == (("width", ("4", "8")), ("seed", ("0", "1")))
  assert not parts[0].at_init and parts[1].at_init
  assert [c.name for c in parts[1].cells()] == ["depth=1", "depth=2"]
  assert [p.name for p in study.select(parts, ["init_a"])] == ["init_a"]
  with pytest.raises(UserError, match="does not define"):
    study.select(parts, ["init_c"])


def test_lr_x_depth_divides_the_learning_rate_by_depth():
  (part,) = study.parse_parts(
      "# confusion.train_s: kernel_init=orthogonal; depth=1,8; "
      "lr_x_depth=0.08,0.2\n")
  got = [dict(c.overrides) for c in part.cells()]
  assert [(c["depth"], c["learning_rate"]) for c in got] == [
      ("1", "0.08"), ("1", "0.2"), ("8", "0.01"), ("8", "0.025")]
  assert all("lr_x_depth" not in c for c in got)
  assert part.cells()[2].name == (
      "kernel_init=orthogonal,depth=8,learning_rate=0.01")


@pytest.mark.parametrize("text, message", [
    ("# confusion.init_a: depth=1; lr_x_depth=0.1; learning_rate=0.1\n",
     "keep one"),
    ("# confusion.init_a: lr_x_depth=0.1\n", "add depth="),
    ("# confusion.init_a: depth=1; lr_x_depth=-1\n", "must be positive"),
    ("# confusion.init_a: depth=x; lr_x_depth=1\n", "must be positive"),
    ("--width=2\n", "no '# confusion"),
    ("# confusion.other: width=1,2\n", "must start with"),
    ("# confusion.init_a: width\n", "confusion.init_a: bad --grid"),
    ("# confusion.init_a: model_dir=x\n", "may not set"),
])
def test_parse_parts_rejects_bad_lines(text, message):
  with pytest.raises(UserError, match=message):
    study.parse_parts(text)


def test_the_cpu_flagfile_covers_the_three_questions():
  with open(FLAGFILE) as f:
    parts = {p.name: dict(p.grid) for p in study.parse_parts(f.read())}
  for name in ("init_width", "init_depth", "train_width", "train_depth"):
    assert set(parts[name]["kernel_init"]) == {"glorot_normal", "he_normal"}
  assert len(parts["init_width"]["width"]) >= 3
  assert len(parts["init_depth"]["depth"]) >= 3
  for name in ("init_linear", "train_linear", "train_linear_scaled"):
    assert parts[name]["activation"] == ("linear",)
    assert set(parts[name]["kernel_init"]) == {"orthogonal", "glorot_normal"}
  for name in ("init_norm_skip", "train_norm_skip"):
    assert set(parts[name]["model"]) == {"mlp", "fc_resnet"}
    assert set(parts[name]["normalization"]) == {"none", "batch"}
  # Every cell is a valid training run.
  with open(FLAGFILE) as f:
    for part in study.parse_parts(f.read()):
      cells = part.cells()
      assert len(sweep.validate([f"--flagfile={FLAGFILE}"], cells)) == len(
          cells)


# --- Measurement at initialisation -------------------------------------------


def brute_force_gram(model, x, y):
  """G from a Python loop of one-example tapes, float64."""
  rows = []
  for i in range(len(x)):
    with tf.GradientTape() as tape:
      logits = model(x[i:i + 1], training=False)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.cast(y[i:i + 1], tf.int32), logits=logits))
    grads = tape.gradient(loss, model.trainable_variables)
    rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
  m = np.asarray(rows, np.float64)
  return m @ m.T


def build_as_the_study_does(cfg):
  train = data_lib.get(cfg.dataset, "train", cfg)
  idx = callback.fixed_indices(cfg.seed, train.info.num_examples,
                               cfg.gradients_examples)
  x, y = train.examples(idx)
  keras.utils.set_random_seed(cfg.seed)
  model = models.from_config(cfg, train.info.input_shape,
                             train.info.num_classes)
  return train, model, x, y


@pytest.mark.parametrize("overrides", [
    dict(kernel_init="he_normal"),
    dict(activation="linear", kernel_init="orthogonal"),
    dict(model="fc_resnet", normalization="batch"),
])
def test_at_init_statistics_equal_a_brute_force_loop(overrides):
  cfg = config.make(**TINY, **overrides)
  got = study.measure_at_init(cfg)
  train, model, x, y = build_as_the_study_does(cfg)
  if cfg.normalization != "none":
    xs, _ = train.examples(np.arange(train.info.num_examples))
    assert function_lib.recompute_batch_norm(model, xs) == cfg.depth
  want = statistics.summarize(brute_force_gram(model, x, y))
  for key in ("gradient_confusion", "min_inner_product", "mean_inner_product",
              "min_cosine", "mean_cosine", "gradient_diversity"):
    np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=1e-6,
                               err_msg=key)
  assert got["cosine_q0.5"] == pytest.approx(want["cosine_quantiles"]["0.5"],
                                             rel=2e-4, abs=1e-6)
  assert got["num_examples"] == 12
  assert got["num_parameters"] == sum(
      int(np.prod(v.shape)) for v in model.trainable_variables)
  assert got["bn_layers_calibrated"] == (2 if cfg.normalization != "none"
                                         else 0)


def test_calibrated_batch_norm_infers_what_training_mode_computes():
  cfg = config.make(**TINY, normalization="batch")
  train, model, _, _ = build_as_the_study_does(cfg)
  xs, _ = train.examples(np.arange(train.info.num_examples))
  before = model(xs, training=False).numpy()
  wanted = model(xs, training=True).numpy()
  assert np.abs(before - wanted).max() > 1e-3  # Identity BN differs.
  momenta = [l.momentum for l in layers_lib.batch_norm_layers(model)]
  assert len(momenta) == 2
  function_lib.recompute_batch_norm(model, xs, batch_size=7)  # Uneven batches.
  np.testing.assert_allclose(model(xs, training=False).numpy(), wanted,
                             rtol=1e-3, atol=1e-4)
  assert momenta == [l.momentum for l in layers_lib.batch_norm_layers(model)]


def test_uncalibrated_batch_norm_matches_the_plain_mlp():
  """Why calibration exists: fresh BN in inference mode is ~ the identity."""
  plain = study.measure_at_init(config.make(**TINY, kernel_init="he_normal"))
  bn = study.measure_at_init(config.make(**TINY, kernel_init="he_normal",
                                         normalization="batch"),
                             calibrate_bn=False)
  # Same kernels (same seed, BN adds no kernel draws before them) and BN =
  # x / sqrt(1 + eps): cosines agree closely, biases aside.
  assert bn["bn_layers_calibrated"] == 0
  assert bn["mean_cosine"] == pytest.approx(plain["mean_cosine"], abs=0.05)


def test_run_at_init_caches_and_recomputes_on_new_flags(tmp_path,
                                                        monkeypatch):
  part = study.Part("init_t", (("width", ("4", "8")),))
  base = [f"--{k}={v}" for k, v in TINY.items()]
  configs = sweep.validate(base, part.cells())
  first = study.run_at_init(str(tmp_path), part, configs)
  assert [r["width"] for r in first] == [4, 8]
  assert os.path.exists(tmp_path / "at_init" / "init_t" / "width=4.json")

  def boom(*args, **kwargs):
    raise AssertionError("measured again")
  monkeypatch.setattr(study, "measure_at_init", boom)
  assert study.run_at_init(str(tmp_path), part, configs) == first
  assert study.read_at_init(str(tmp_path), part, configs) == first
  changed = sweep.validate(base + ["--seed=4"], part.cells())
  with pytest.raises(AssertionError, match="measured again"):
    study.run_at_init(str(tmp_path), part, changed)


# --- Rows, aggregation, CSV ----------------------------------------------------


def fake_run(part_dir, cell, results, **flags):
  cell_dir = os.path.join(part_dir, cell.name)
  os.makedirs(cell_dir)
  cfg = config.make(**{**TINY, **flags})
  rundir.atomic_write(os.path.join(cell_dir, rundir.FLAGS_FILE),
                      config.to_flagfile(cfg))
  rundir.write_json(os.path.join(cell_dir, rundir.RESULTS_FILE), results)


@pytest.mark.parametrize("layout", ["callbacks_in_history", "measurements"])
def test_training_rows_from_run_directories(tmp_path, layout):
  part = study.Part("train_t", (("depth", ("1", "2", "3")),))
  c1, c2, c3 = part.cells()
  evaluations = [{"step": 0, "epoch": 0, "train_loss": 2.0},
                 {"step": 10, "epoch": 1, "train_loss": 1.0},
                 {"step": 20, "epoch": 2, "train_loss": 0.5,
                  "train_top1_error": 0.25}]
  measured = [
      {"step": 0, "epoch": 0, "gradients/min_cosine": -0.5,
       "gradients/mean_cosine": 0.1, "gradients/gradient_confusion": 4.0},
      {"step": 5, "epoch": 0, "gradients/min_cosine": -0.3,
       "gradients/mean_cosine": 0.2, "gradients/gradient_confusion": 2.0},
      {"step": 20, "epoch": 2, "gradients/min_cosine": -0.1,
       "gradients/mean_cosine": 0.3, "gradients/gradient_confusion": 1.0}]
  if layout == "measurements":  # As the loop writes results.json now.
    history, measurements = evaluations, measured
  else:  # Before: a callback's row at an evaluation joined the evaluation.
    history = [dict(row) for row in evaluations]
    history[0].update(measured[0])
    history[2].update(measured[2])
    measurements = [measured[1]]
  results = {
      "status": "completed", "steps": 20, "total_steps": 20,
      "steps_per_epoch": 10, "num_parameters": 99, "history": history,
      "measurements": measurements}
  results["final"] = results["history"][-1]
  fake_run(str(tmp_path / "train_t"), c1, results, depth=1)
  fake_run(str(tmp_path / "train_t"), c2, {**results, "status": "running",
                                           "steps": 10}, depth=2)
  steps, runs, unfinished = study.training_rows(str(tmp_path), part)
  assert unfinished == ["depth=2", "depth=3"]
  assert [r["step"] for r in steps] == [0, 5, 10, 20]
  assert [r["epoch"] for r in steps] == [0.0, 0.5, 1.0, 2.0]
  assert [r["train_loss"] for r in steps] == [2.0, "", 1.0, 0.5]
  assert [r["min_cosine"] for r in steps] == [-0.5, -0.3, "", -0.1]
  (run,) = runs
  assert run["depth"] == 1 and run["state"] == "completed"
  assert run["final_train_loss"] == 0.5
  assert run["min_cosine_step0"] == -0.5 and run["min_cosine_last"] == -0.1
  assert run["min_cosine_mean"] == pytest.approx(-0.3)
  assert run["gradient_confusion_mean"] == pytest.approx(7 / 3)
  assert run["num_parameters"] == 99
  path = str(tmp_path / "runs.csv")
  study.write_csv(path, runs)
  (row,) = sweep.read_csv(path)
  assert float(row["min_cosine_mean"]) == pytest.approx(-0.3)
  assert row["cell"] == "depth=1"
  text = study.markdown_training(part, runs, unfinished)
  assert "| 1 | 0.5 | -0.5 / -0.3 / -0.1 |" in text
  assert "depth=2, depth=3" in text


def test_aggregate_means_and_stds_over_seeds():
  rows = [{"part": "init_t", **study.setting(config.make(**{**TINY, "seed": s})),
           "min_cosine": v, "mean_cosine": 0.0, "gradient_confusion": 1.0}
          for s, v in ((0, -0.2), (1, -0.4), (2, -0.6))]
  rows.append({**rows[0], "width": 16, "min_cosine": 0.5})
  agg = study.aggregate(rows)
  assert [(r["width"], r["seeds"]) for r in agg] == [(8, 3), (16, 1)]
  assert agg[0]["min_cosine_mean"] == pytest.approx(-0.4)
  assert agg[0]["min_cosine_std"] == pytest.approx(np.std([-0.2, -0.4,
                                                           -0.6]))
  assert agg[1]["min_cosine_std"] == 0.0
  part = study.Part("init_t", (("width", ("8", "16")), ("seed", ("0", "1"))))
  assert "| 8 | -0.4 ± 0.16 |" in study.markdown_at_init(part, agg)
  pngs = study.figures([part], rows, [], [])
  assert list(pngs) == ["confusion_init_t.png"]
  assert pngs["confusion_init_t.png"][:8] == b"\x89PNG\r\n\x1a\n"


# --- The tool ------------------------------------------------------------------


def run_tool(*args):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


@pytest.mark.parametrize("args, message", [
    (["--flagfile=" + FLAGFILE], "--study_dir is required"),
    (["--study_dir=x"], "--flagfile is required"),
    (["--flagfile=/nonexistent.flags", "--study_dir=x"], "cannot read"),
    (["--flagfile=" + FLAGFILE, "--study_dir=x", "--parts=init_nope"],
     "does not define"),
    (["--flagfile=" + FLAGFILE, "--study_dir=/nonexistent", "--report_only"],
     "is not a directory"),
    (["--flagfile=" + FLAGFILE, "--study_dir=x", "--parallel=0"],
     "parallel"),
])
def test_tool_bad_input_is_one_line(args, message):
  conftest.assert_one_line_error(run_tool(*args), message,
                                 prog="confusion_study")


def test_tool_runs_reports_and_rerun_skips_finished_work(tmp_path):
  flagfile = tmp_path / "tiny.flags"
  flagfile.write_text(
      "# confusion.init_w: width=4,8\n"
      "# confusion.train_d: depth=1\n"
      + "".join(f"--{k}={v}\n" for k, v in TINY.items())
      + "--steps=4\n--batch_size=16\n--gradients_every_steps=2\n"
      "--noexport\n--noprogress_bar\n")
  study_dir = tmp_path / "study"
  args = [f"--flagfile={flagfile}", f"--study_dir={study_dir}",
          "--parallel=1", "--notensorboard", "--noprogress"]
  proc = run_tool(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = study_dir / "report"
  at_init = sweep.read_csv(str(report / "confusion_at_init.csv"))
  assert [r["width"] for r in at_init] == ["4", "8"]
  cached = json.loads((study_dir / "at_init" / "init_w" /
                       "width=4.json").read_text())
  assert float(at_init[0]["min_cosine"]) == pytest.approx(
      cached["statistics"]["min_cosine"])
  runs = sweep.read_csv(str(report / "confusion_runs.csv"))
  assert [r["cell"] for r in runs] == ["depth=1"]
  steps = sweep.read_csv(str(report / "confusion_training.csv"))
  assert [int(r["step"]) for r in steps] == [0, 2, 4]
  results = rundir.read_results(str(study_dir / "train_d" / "depth=1"))
  assert [m["step"] for m in results["measurements"]] == [0, 2, 4]
  assert float(steps[1]["min_cosine"]) == pytest.approx(
      results["measurements"][1]["gradients/min_cosine"])
  assert (report / "confusion_init_w.png").exists()
  assert (report / "confusion_train_d.png").exists()

  stamp = (study_dir / "at_init" / "init_w" / "width=4.json").stat().st_mtime
  proc = run_tool(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (study_dir / "at_init" / "init_w" /
          "width=4.json").stat().st_mtime == stamp
  attempts = json.loads((study_dir / "train_d" / "depth=1" /
                         sweep.ATTEMPTS_FILE).read_text())
  assert len(attempts) == 1  # The finished run was not started again.
  assert sweep.read_csv(str(report / "confusion_runs.csv")) == runs
  assert not math.isnan(float(runs[0]["final_train_loss"]))
