"""The gradient-confusion study (issues 5a, 13): its logic on exact answers,
its claim rules on hand-made rows, and the tool end to end."""

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
from tfcapacity.studies import common
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
  for name in ("init_linear", "train_linear_scaled"):
    assert parts[name]["activation"] == ("linear",)
    assert set(parts[name]["kernel_init"]) == {"orthogonal", "glorot_normal"}
  for name in ("init_norm_skip", "train_norm_skip"):
    assert set(parts[name]["model"]) == {"mlp", "fc_resnet"}
    assert set(parts[name]["normalization"]) == {"none", "batch"}
  # Issue 13: three seeds everywhere; the depth parts' rate tuned per depth
  # (a grid wide enough to have an inside) or divided by depth.
  for name, grid in parts.items():
    assert grid["seed"] == ("0", "1", "2"), name
  assert len(parts["train_depth"]["learning_rate"]) >= 3
  for name in ("train_linear_scaled", "train_norm_skip"):
    assert "lr_x_depth" in parts[name]
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
  # Over training = the measurements after step 0: steps 5 and 20.
  assert run["min_cosine_train"] == pytest.approx(-0.2)
  assert run["gradient_confusion_train"] == pytest.approx(1.5)
  # Early = the evaluation after 0 nearest a third of 20 steps: step 10.
  assert run["early_step"] == 10 and run["train_loss_early"] == 1.0
  assert run["num_parameters"] == 99
  path = str(tmp_path / "runs.csv")
  study.write_csv(path, runs)
  (row,) = sweep.read_csv(path)
  assert float(row["min_cosine_train"]) == pytest.approx(-0.2)
  assert row["cell"] == "depth=1"
  agg = study.aggregate(runs, study.RUN_KEYS)
  text = study.markdown_training(part, agg, unfinished)
  lr = f"{config.make(**TINY).learning_rate:g}"
  assert f"| 1 | {lr} | 1 | 0.5 | -0.5 | -0.2 | -0.1 | 0.25 |" in text
  assert "depth=2, depth=3" in text

  # A batch-norm run: step 0 (uncalibrated batch norm) is left out.
  fake_run(str(tmp_path / "train_t"), c3, results, depth=3,
           normalization="batch")
  steps, runs, _ = study.training_rows(str(tmp_path), part)
  bn = [r for r in steps if r["depth"] == 3]
  assert [r["step"] for r in bn] == [5, 10, 20]
  (run,) = [r for r in runs if r["depth"] == 3]
  assert math.isnan(run["min_cosine_step0"])
  assert run["min_cosine_train"] == pytest.approx(-0.2)
  assert run["batch_norm_step0_left_out"] == 1
  text = study.markdown_training(part, study.aggregate(runs, study.RUN_KEYS),
                                 [])
  assert f"| 3 | {lr} | 1 | 0.5 | left out (batch norm) | -0.2 |" in text


def test_aggregate_means_and_stds_over_seeds():
  rows = [{"part": "init_t", **study.setting(config.make(**{**TINY, "seed": s})),
           "min_cosine": v, "mean_cosine": 0.0, "gradient_confusion": 1.0}
          for s, v in ((0, -0.2), (1, -0.4), (2, -0.6))]
  rows.append({**rows[0], "width": 16, "min_cosine": 0.5})
  agg = study.aggregate(rows)
  assert [(r["width"], r["seeds"]) for r in agg] == [(8, 3), (16, 1)]
  assert agg[0]["min_cosine_mean"] == pytest.approx(-0.4)
  assert agg[0]["min_cosine_std"] == pytest.approx(np.std([-0.2, -0.4,
                                                           -0.6], ddof=1))
  assert (agg[0]["min_cosine_min"], agg[0]["min_cosine_max"]) == (-0.6, -0.2)
  assert math.isnan(agg[1]["min_cosine_std"])  # One seed: no spread.
  part = study.Part("init_t", (("width", ("8", "16")), ("seed", ("0", "1"))))
  text = study.markdown_at_init(part, agg)
  assert "| 8 | 3 | -0.4 ± 0.2 |" in text
  assert "| 16 | 1 | 0.5 |" in text
  pngs = study.figures([part], rows, [], [])
  assert list(pngs) == ["confusion_01_init_t.png"]
  assert pngs["confusion_01_init_t.png"][:8] == b"\x89PNG\r\n\x1a\n"


# --- Claims on hand-made rows ------------------------------------------------
#
# Every rule compares seed-paired values against the seed spread s = the
# larger sample std (ddof=1) over seeds of the two settings; the expected
# verdicts below are worked out by hand from the numbers.

SEEDS = (0, 1, 2)
BASE_SETTING = dict(model="mlp", width=64, depth=4, activation="relu",
                    kernel_init="he_normal", normalization="none",
                    residual_scale=1.0, learning_rate=0.05)


def part(name, **grid):
  return study.Part(name, tuple((k, tuple(str(x) for x in v))
                                for k, v in grid.items()))


def init_rows(name, key, values, **setting):
  """At-init rows of one setting: values[i] is seed i's `key`."""
  return [{"part": name, **BASE_SETTING, **setting, "seed": s, key: v,
           "cell": f"{name}-{s}"} for s, v in zip(SEEDS, values)]


def run_rows(name, key, values, state="completed", **setting):
  return [{**r, "state": state, "final_train_loss": r.get(
      "final_train_loss", 1.0)} for r in init_rows(name, key, values,
                                                   **setting)]


def claim(claims, id_):
  (got,) = [c for c in claims if c.id == id_]
  return got


def sd(values):
  return float(np.std(values, ddof=1))


WIDTH = part("init_width", kernel_init=["he_normal"], width=[16, 256],
             seed=SEEDS)
NARROW = [-0.50, -0.45, -0.55]  # s = 0.05


@pytest.mark.parametrize("wide, verdict", [
    ([-0.20, -0.25, -0.15], "agrees"),      # +0.3 in every seed, s = 0.05.
    ([-0.46, -0.41, -0.51], "disagrees"),   # +0.04 < s: inside the spread.
    ([-0.20, -0.44, -0.35], "mixed"),       # s = 0.121: +0.3 only in seed 0.
    ([-0.60, -0.55, -0.65], "disagrees"),   # The other way round.
])
def test_wider_less_confusion_rule(wide, verdict):
  assert sd(NARROW) == pytest.approx(0.05)
  rows = (init_rows("init_width", "min_cosine", NARROW, width=16)
          + init_rows("init_width", "min_cosine", wide, width=256))
  got = claim(study.evaluate([WIDTH], rows, []),
              "wider_less_confusion_at_init")
  assert got.verdict == verdict
  assert got.seeds == 3
  s = max(sd(NARROW), sd(wide))
  assert f"s={s:.3f}" in got.measured
  if verdict == "disagrees" and wide[0] > NARROW[0]:
    assert "3 inside the seed spread" in got.measured
  # mean ± std [min, max] (n) of each end.
  assert (f"width 256 {np.mean(wide):.3f} ± {sd(wide):.3f} "
          f"[{min(wide):.3f}, {max(wide):.3f}] (n=3)") in got.measured


def test_one_seed_is_not_measured():
  rows = (init_rows("init_width", "min_cosine", NARROW[:1], width=16)
          + init_rows("init_width", "min_cosine", [-0.1], width=256))
  got = claim(study.evaluate([WIDTH], rows, []),
              "wider_less_confusion_at_init")
  assert got.verdict == "not measured"
  assert "no spread" in got.measured and "(n=1)" in got.measured
  none = claim(study.evaluate([], [], []), "wider_less_confusion_at_init")
  assert none.verdict == "not measured" and none.seeds == 0


@pytest.mark.parametrize("wide, verdict", [
    ([5.0, 6.0, 7.0], "agrees"),       # narrow - wide = 15 > s = 1.
    ([19.5, 20.5, 21.5], "disagrees"),  # 0.5 < s = 1: no difference.
])
def test_raw_confusion_rule_reads_lower_as_less_confused(wide, verdict):
  rows = (init_rows("init_width", "gradient_confusion", [20.0, 21.0, 22.0],
                    width=16)
          + init_rows("init_width", "gradient_confusion", wide, width=256))
  for r in rows:
    r["min_cosine"] = -0.5
  got = claim(study.evaluate([WIDTH], rows, []),
              "raw_wider_less_confusion_at_init")
  assert got.verdict == verdict


DEPTH = part("train_depth", kernel_init=["glorot_normal", "he_normal"],
             depth=[1, 16], learning_rate=[0.01, 0.05, 0.2], seed=SEEDS)


def depth_runs(shallow, deep, kernel_init="he_normal"):
  """Runs of the rate grid: the best rate (0.05) gets the cosines given;
  the other rates worse losses and cosines that would reverse the claim."""
  rows = []
  for lr, loss in ((0.01, 2.0), (0.05, 1.0), (0.2, 1.5)):
    for depth, values in ((1, shallow), (16, deep)):
      cos = values if lr == 0.05 else [-v for v in values]
      got = run_rows("train_depth", "min_cosine_train", cos, depth=depth,
                     learning_rate=lr, kernel_init=kernel_init)
      for r in got:
        r["final_train_loss"] = loss
      rows += got
  return rows


def test_deeper_more_confusion_reads_each_depth_at_its_best_rate():
  rows = depth_runs([-0.3, -0.35, -0.25], [-0.6, -0.65, -0.55])
  claims = study.evaluate([DEPTH], [], rows)
  assert claim(claims, "deeper_more_confusion_training").verdict == "agrees"
  assert claim(claims, "check_best_rate_inside_grid").verdict == "agrees"
  # Depth 16 inside the spread of depth 1 (difference 0.02 < s = 0.05).
  rows = depth_runs([-0.3, -0.35, -0.25], [-0.32, -0.37, -0.27])
  assert claim(study.evaluate([DEPTH], [], rows),
               "deeper_more_confusion_training").verdict == "disagrees"


def test_best_rate_per_depth_against_a_hand_computation():
  """Per (init, depth) the rate of least mean final loss over seeds; a
  diverged seed makes a rate's mean infinite; a best rate at the grid's
  edge fails the check."""
  losses = {  # (depth, lr): losses of seeds 0, 1, 2
      (1, 0.01): [1.0, 1.2, 1.1], (1, 0.05): [0.9, 1.3, 1.0],
      (1, 0.2): [0.5, 0.6, None],  # Seed 2 diverged: never the best.
      (16, 0.01): [2.0, 2.1, 2.2], (16, 0.05): [2.3, 2.0, 2.2],
      (16, 0.2): [2.5, 2.6, 2.4]}
  rows = []
  for (depth, lr), values in losses.items():
    for seed, loss in zip(SEEDS, values):
      rows.append({"part": "train_depth", **BASE_SETTING, "depth": depth,
                   "learning_rate": lr, "seed": seed, "min_cosine_train": -0.5,
                   "state": "completed" if loss is not None else "diverged",
                   "final_train_loss": math.inf if loss is None else loss})
  # By hand: depth 1: means 1.1, 1.0667, inf -> 0.05 (inside);
  # depth 16: 2.1, 2.1667, 2.5 -> 0.01 (an edge).
  table = study.rate_table(rows, {"train_depth"})
  best = {(r["depth"], r["learning_rate"]) for r in table if r["best"]}
  assert best == {(1, 0.05), (16, 0.01)}
  means = {(r["depth"], r["learning_rate"]): r["mean_final_train_loss"]
           for r in table}
  assert means[(1, 0.05)] == pytest.approx(np.mean([0.9, 1.3, 1.0]))
  assert math.isinf(means[(1, 0.2)])
  kept = study.at_best_rate(rows, {"train_depth"})
  assert {(r["depth"], r["learning_rate"]) for r in kept} == best
  assert len(kept) == 6
  checks = study.rate_claims(rows, {"train_depth"})
  assert checks[0].id == "check_best_rate_inside_grid"
  assert checks[0].verdict == "disagrees"
  assert "depth 16 width 64: 0.01 (at an edge)" in checks[0].measured
  assert checks[1].verdict == "measured"
  # Without a rate grid the check says so.
  assert study.rate_claims(rows, set())[0].verdict == "not measured"


LINEAR = part("init_linear", activation=["linear"],
              kernel_init=["orthogonal", "glorot_normal"], depth=[1, 8, 32],
              seed=SEEDS)


@pytest.mark.parametrize("deep, verdict", [
    ([-0.57, -0.50, -0.64], "agrees"),    # Ranges 0.03, 0.02, 0.04 <= s.
    ([-0.30, -0.25, -0.35], "disagrees"),  # Ranges 0.3 > s = 0.07.
])
def test_orthogonal_depth_independence_rule(deep, verdict):
  rows = (init_rows("init_linear", "min_cosine", [-0.60, -0.52, -0.66],
                    activation="linear", kernel_init="orthogonal", depth=1)
          + init_rows("init_linear", "min_cosine", [-0.58, -0.53, -0.62],
                      activation="linear", kernel_init="orthogonal", depth=8)
          + init_rows("init_linear", "min_cosine", deep, activation="linear",
                      kernel_init="orthogonal", depth=32)
          + init_rows("init_linear", "min_cosine", [-0.5, -0.4, -0.6],
                      activation="linear", kernel_init="glorot_normal",
                      depth=1)
          + init_rows("init_linear", "min_cosine", [-0.9, -0.8, -0.95],
                      activation="linear", kernel_init="glorot_normal",
                      depth=32))
  claims = study.evaluate([LINEAR], rows, [])
  got = claim(claims, "orthogonal_linear_confusion_depth_independent_at_init")
  assert got.verdict == verdict and got.seeds == 3
  assert "glorot_normal (for comparison)" in got.measured
  # The Gaussian contrast: depth 32 below depth 1 by 0.4, 0.4, 0.35 > s.
  assert claim(claims, "linear_gaussian_deeper_more_confusion_at_init"
               ).verdict == "agrees"


def test_orthogonal_early_training_rule():
  train = part("train_linear_scaled", activation=["linear"],
               kernel_init=["orthogonal"], depth=[1, 32], lr_x_depth=[0.08],
               seed=SEEDS)

  def rows(deep):
    return (run_rows("train_linear_scaled", "train_loss_early",
                     [1.70, 1.75, 1.80], activation="linear",
                     kernel_init="orthogonal", depth=1)
            + run_rows("train_linear_scaled", "train_loss_early", deep,
                       activation="linear", kernel_init="orthogonal",
                       depth=32))
  id_ = "orthogonal_linear_early_training_depth_independent"
  # s = 0.07 (depth 32's std); |differences| 0.01, 0.02, 0.04 <= s.
  deep = [1.71, 1.73, 1.84]
  assert sd(deep) == pytest.approx(0.07)
  got = claim(study.evaluate([train], [], rows(deep)), id_)
  assert got.verdict == "agrees"
  assert f"s={max(0.05, sd(deep)):.3f}" in got.measured
  # Seed 1 differs by 0.08 > s = 0.068 (depth 32's std), the others by 0.
  deep = [1.70, 1.83, 1.80]
  assert 0.06 < sd(deep) < 0.08
  assert claim(study.evaluate([train], [], rows(deep)), id_
               ).verdict == "mixed"
  # Slower by 0.2 in every seed, s = 0.05.
  assert claim(study.evaluate([train], [], rows([1.90, 1.95, 2.00])), id_
               ).verdict == "disagrees"


NORM = part("init_norm_skip", model=["mlp", "fc_resnet"],
            normalization=["none", "batch"], depth=[2, 32], seed=SEEDS)


@pytest.mark.parametrize("both, verdict", [
    ([-0.30, -0.35, -0.25], "agrees"),
    ([-0.58, -0.52, -0.66], "disagrees"),  # |+-0.02..0.04| < s = 0.1.
])
def test_batch_norm_and_skips_rule_at_the_deepest_depth(both, verdict):
  rows = []
  for depth in (2, 32):
    plain = [-0.6, -0.5, -0.7] if depth == 32 else [0.9, 0.9, 0.9]
    rows += init_rows("init_norm_skip", "min_cosine", plain, depth=depth)
    rows += init_rows("init_norm_skip", "min_cosine",
                      both if depth == 32 else [-0.9, -0.9, -0.9],
                      depth=depth, model="fc_resnet", normalization="batch")
  got = claim(study.evaluate([NORM], rows, []),
              "batch_norm_skip_less_confusion_at_init")
  assert got.verdict == verdict
  assert "depth 32" in got.measured


def test_diverged_runs_are_left_out_of_training_claims():
  train = part("train_width", kernel_init=["he_normal"], width=[16, 256],
               seed=SEEDS)
  rows = (run_rows("train_width", "min_cosine_train", NARROW, width=16)
          + run_rows("train_width", "min_cosine_train", [-0.2, -0.25, -0.15],
                     width=256))
  rows[3]["state"], rows[3]["final_train_loss"] = "diverged", math.inf
  got = claim(study.evaluate([train], [], rows),
              "wider_less_confusion_training")
  assert got.seeds == 2 and got.verdict == "agrees"
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
    (["--flagfile=" + FLAGFILE, "--study_dir=x", "--shard_index=2",
      "--num_shards=2"], "must be in [0, --num_shards=2)"),
    (["--flagfile=" + FLAGFILE, "--study_dir=x", "--docs_page=" + FLAGFILE],
     "lacks the markers <!-- confusion:claims:begin -->"),
])
def test_tool_bad_input_is_one_line(args, message):
  conftest.assert_one_line_error(run_tool(*args), message,
                                 prog="confusion_study")


def micro_flagfile(path, parts):
  """The cpu flagfile's base flags with `parts` for its part lines, cut to
  a few steps on few examples (as tools/reproduce.py derives a tier)."""
  with open(FLAGFILE) as f:
    base = [line for line in f if not line.lstrip().startswith("#")]
  path.write_text(
      "".join(f"# confusion.{name}: {grid}\n" for name, grid in parts)
      + "".join(base)
      + "--mnist1d_examples=120\n--epochs=1\n--batch_size=16\n--width=8\n"
      "--gradients_examples=8\n--gradients_chunk_size=8\n"
      "--gradients_every_steps=2\n--noprogress_bar\n")
  return path


PAGE = ("# page\n<!-- confusion:claims:begin -->\nOLD-TEXT\n"
        "<!-- confusion:claims:end -->\ntext\n"
        "<!-- confusion:tables:begin -->\n<!-- confusion:tables:end -->\n")


def test_tool_runs_reports_and_rerun_trains_nothing(tmp_path):
  flagfile = micro_flagfile(tmp_path / "micro.flags", [
      ("init_width", "kernel_init=he_normal; width=4,8; seed=0"),
      ("train_depth", "depth=1; seed=0")])
  page = tmp_path / "page.md"
  page.write_text(PAGE)
  study_dir = tmp_path / "study"
  args = [f"--flagfile={flagfile}", f"--study_dir={study_dir}",
          "--parallel=1", "--notensorboard", "--noprogress",
          f"--docs_page={page}", f"--figures_dir={tmp_path / 'figures'}"]
  proc = run_tool(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = study_dir / "report"
  claims = sweep.read_csv(str(report / "claims.csv"))
  assert list(claims[0]) == list(common.CLAIM_COLUMNS)
  ids = [c["id"] for c in claims]
  assert "wider_less_confusion_at_init" in ids
  verdicts = {c["id"]: c["verdict"] for c in claims}
  assert verdicts["wider_less_confusion_at_init"] == "not measured"  # 1 seed
  assert verdicts["check_best_rate_inside_grid"] == "not measured"
  at_init = sweep.read_csv(str(report / "confusion_at_init.csv"))
  assert [r["width"] for r in at_init] == ["4", "8"]
  cached = json.loads((study_dir / "at_init" / "init_width" /
                       "kernel_init=he_normal,width=4,seed=0.json"
                       ).read_text())
  assert float(at_init[0]["min_cosine"]) == pytest.approx(
      cached["statistics"]["min_cosine"])
  (run,) = sweep.read_csv(str(report / "confusion_runs.csv"))
  results = rundir.read_results(str(study_dir / "train_depth" / run["cell"]))
  assert [m["step"] for m in results["measurements"]] == [0, 2, 4, 6]
  assert float(run["min_cosine_train"]) == pytest.approx(np.mean(
      [m["gradients/min_cosine"] for m in results["measurements"][1:]]))
  text = page.read_text()
  assert "OLD-TEXT" not in text and "| claim | paper | rule |" in text
  assert "**init_width**" in text and "**Raw gradient confusion**" in text
  pngs = sorted(os.listdir(tmp_path / "figures"))
  assert pngs == ["confusion_01_init_width.png",
                  "confusion_02_train_depth.png",
                  "confusion_03_training_summary.png"]
  assert sorted(p for p in os.listdir(report) if p.endswith(".png")) == pngs

  stamps = {p: os.stat(p).st_mtime_ns for p in
            [*study_dir.glob("train_depth/*/results.json"),
             *study_dir.glob("at_init/init_width/*.json")]}
  assert len(stamps) == 3
  proc = run_tool(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
  for run_dir in study_dir.glob("train_depth/*=*"):
    attempts = json.loads((run_dir / sweep.ATTEMPTS_FILE).read_text())
    assert len(attempts) == 1  # Not started again.
  assert sweep.read_csv(str(report / "claims.csv")) == claims


def test_tool_shard_trains_its_cells_only_and_writes_no_report(tmp_path):
  flagfile = micro_flagfile(tmp_path / "micro.flags", [
      ("init_width", "width=4; seed=0"),
      ("train_depth", "depth=1; seed=0")])
  study_dir = tmp_path / "study"
  # Shard 1 of 2 owns no cell of the one-cell part and no at-init part.
  proc = run_tool(f"--flagfile={flagfile}", f"--study_dir={study_dir}",
                  "--shard_index=1", "--num_shards=2", "--noprogress")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not (study_dir / "at_init").exists()
  assert not (study_dir / "report").exists()
  assert not list(study_dir.glob("train_depth/*=*/results.json"))
  # The sharding itself: cells i, i+k, ... of each part.
  (part,) = study.parse_parts("# confusion.train_d: depth=1,2,3; seed=0,1\n")
  names = [c.name for c in sweep.shard(part.cells(), 1, 2)]
  assert names == [c.name for c in part.cells()][1::2]
