"""The curvature measurement follows the run: auto batch-norm mode, the
same examples in the callback and the hessian tool, extra epochs at a drop.

A tiny batch-norm ResNet trains with the curvature callback in its default
mode (`--curvature_bn_mode=auto`: batch statistics, as training uses). The
hessian tool, run on the final checkpoint with the run's seed and count and
its own default `--bn_mode=auto`, must reproduce the callback's last
lambda_max: same examples, same batch-norm statistics, same batches.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import data as data_lib
from tfcapacity import hessian
from tfcapacity import measurements
from tfcapacity import objective
from tfcapacity.curvature import callback as curvature
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

SEED = 3
COUNT = 48


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("follows") / "run")
  cfg = config.make(
      dataset="digits", input_format="image", model="resnet", depth=8,
      width=4, normalization="batch", kernel_init="he_normal",
      optimizer="sgd", learning_rate=0.05, momentum=0.9, batch_size="16",
      train_subset=160, epochs=3, lr_schedule="step", lr_drop_epochs=[2],
      curvature_every_epochs=3, curvature_around_drop=1,
      curvature_examples=COUNT, curvature_test_batches=0, seed=SEED,
      model_dir=model_dir, progress_bar=False)
  results = measurements.train(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert results["status"] == "completed"
  return cfg, results


def test_auto_mode_is_the_training_mode_and_is_recorded(bn_run):
  cfg, results = bn_run
  assert cfg.curvature_bn_mode == "auto"
  info = results["callbacks"]["curvature"]
  assert info["bn_mode"] == "batch"
  # 16 divides 48: three training-sized batches, each with its statistics.
  assert info["batch_size"] == 16
  assert info["examples"] == COUNT


def test_measured_at_the_schedule_and_around_the_drop(bn_run):
  _, results = bn_run
  epochs = [row["epoch"] for row in results["measurements"]
            if "curvature/lambda_max" in row]
  # Every 3 epochs (0, 3) and the last epoch before the drop at 2 and the
  # first after it (2, 3).
  assert epochs == [0, 2, 3]


def test_hessian_tool_reproduces_the_callbacks_last_lambda_max(bn_run):
  cfg, results = bn_run
  last = [row for row in results["measurements"]
          if "curvature/lambda_max" in row][-1]
  assert last["step"] == results["steps"]
  found = conftest.compute_tool(
      hessian, f"--model_dir={cfg.model_dir}", "--checkpoint=final",
      f"--seed={SEED}", f"--num_examples={COUNT}", "--tol=1e-5",
      "--max_iterations=500")
  assert found["bn_mode"] == "batch"
  assert found["batch_size"] == 16
  assert found["eigenvalues"][0] == pytest.approx(
      last["curvature/lambda_max"], rel=1e-3)
  # Inference mode (the moving statistics) is a different loss: the test
  # fails if the tool ignored the mode.
  moving = conftest.compute_tool(
      hessian, f"--model_dir={cfg.model_dir}", "--checkpoint=final",
      f"--seed={SEED}", f"--num_examples={COUNT}", "--bn_mode=inference")
  assert abs(moving["eigenvalues"][0] / found["eigenvalues"][0] - 1) > 1e-2


def test_callback_and_tools_draw_the_same_examples(bn_run):
  cfg, _ = bn_run
  train = data_lib.get(cfg.dataset, "train", cfg)
  n = train.info.num_examples
  index = curvature.fixed_indices(SEED, n, COUNT)
  np.testing.assert_array_equal(
      index, np.random.default_rng(SEED).permutation(n)[:COUNT])
  batches = curvature.test_batches(SEED, 100, 30, -1)
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[0],
                                data_lib.draw_indices(SEED, 100, 30))
  assert len(np.unique(np.concatenate(batches))) == 90


@pytest.mark.parametrize("drops,window,expected", [
    ([20], 1, {20, 21}), ([15, 30], 2, {14, 15, 16, 17, 29, 30, 31, 32}),
    ([1], 3, {0, 1, 2, 3, 4}), ([20], 0, set()), ([], 3, set())])
def test_epochs_around_drops(drops, window, expected):
  assert curvature.epochs_around_drops(drops, window) == expected


@pytest.mark.parametrize("normalization,mode", [
    ("batch", "batch"), ("ghost", "ghost"), ("none", "inference"),
    (None, "inference")])
def test_training_bn_mode(normalization, mode):
  assert objective.training_bn_mode(normalization) == mode
  assert objective.resolve_bn_mode("auto", normalization) == mode
  for explicit in objective.BN_MODES:
    assert objective.resolve_bn_mode(explicit, normalization) == explicit


@pytest.mark.parametrize("n,mode,run_batch,expected", [
    (200, "batch", 25, 25), (200, "batch", 1400, 200), (200, "batch", 30, 200),
    (200, "inference", 25, 200), (1000, "inference", None, 500),
    (1000, "batch", None, 500), (200, "ghost", 50, 50)])
def test_measurement_batch_size(n, mode, run_batch, expected):
  assert objective.measurement_batch_size(n, mode, run_batch) == expected


def test_results_record_the_mode(bn_run):
  cfg, _ = bn_run
  with open(os.path.join(cfg.model_dir, "results.json")) as f:
    saved = json.load(f)
  assert saved["callbacks"]["curvature"]["bn_mode"] == "batch"


def test_stability_threshold_follows_the_learning_rate(bn_run):
  """2(1 + beta)/eta at the rate of the last step: 0.05 up to the end of
  epoch count 2, 0.005 after the drop (the first step of epoch 2, 0-based)."""
  _, results = bn_run
  rows = {row["epoch"]: row for row in results["measurements"]
          if "curvature/lambda_max" in row}
  assert sorted(rows) == [0, 2, 3]
  for epoch, rate in ((0, 0.05), (2, 0.05), (3, 0.005)):
    row = rows[epoch]
    assert row["curvature/stability_threshold"] == pytest.approx(
        2 * 1.9 / rate, rel=1e-6)
    assert row["curvature/lambda_max_over_threshold"] == pytest.approx(
        row["curvature/lambda_max"] / row["curvature/stability_threshold"],
        rel=1e-9)
