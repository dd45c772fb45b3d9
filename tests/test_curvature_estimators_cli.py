"""`tfcapacity.hessian --trace_method=hutchpp --diagonal` end to end.

One tiny run (digits, MLP of width 8: 610 parameters). The tool's Hutch++
trace and per-layer diagonal sums are checked against the same estimators
run on a dense Hessian computed here by nested tapes (same seeds, so the
same probes), and against that Hessian's exact trace and diagonal.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import data as data_lib
from tfcapacity import hessian
from tfcapacity import training
from tfcapacity.curvature import eigen
from tfcapacity.curvature import report
from tfcapacity.errors import UserError
import conftest  # tests/ is on sys.path (pytest rootdir conftest)
from test_curvature_cli import dense_hessian, trained_model

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
N = 40
SEED = 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("estimators_cli") / "run")
  cfg = config.make(dataset="digits", width=8, depth=1, epochs=1,
                    batch_size="32", train_subset=200, model_dir=model_dir,
                    progress_bar=False)
  assert training.train(cfg)["status"] == "completed"
  return model_dir


@pytest.fixture(scope="module")
def dense(run_dir):
  cfg = config.parse_flagfile(open(os.path.join(run_dir, "flags.txt")).read())
  x, y = data_lib.get(cfg.dataset, "train", cfg).examples(np.arange(N))
  model = trained_model(run_dir)
  layers = [(layer.name, sum(int(np.prod(w.shape))
                             for w in layer.trainable_weights))
            for layer in model.layers if layer.trainable_weights]
  return dense_hessian(model, x, y), layers


def run_hessian(run_dir, out, *args):
  return conftest.run_tool(
      "tfcapacity.hessian", f"--model_dir={run_dir}", f"--num_examples={N}",
      "--noshuffle", f"--seed={SEED}", "--max_iterations=20",
      "--noprogress_bar", f"--output={out}", *args, env=ENV)


def test_hutchpp_and_diagonal_cli(run_dir, dense, tmp_path):
  out = str(tmp_path / "hessian.json")
  proc = run_hessian(run_dir, out, "--trace", "--trace_method=hutchpp",
                     "--trace_probes=30", "--diagonal",
                     "--diagonal_probes=60", f"--logdir={tmp_path / 'tb'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  h, layers = dense
  assert result["trace_method"] == "hutchpp"
  assert result["trace_probes"] == 30

  # The same estimator on the dense Hessian with the same seed draws the
  # same probes: the results differ only by float32 rounding.
  op = eigen.DenseOperator(h, tf.float32)
  same = eigen.hutchpp_trace(op, 30, seed=SEED + 1)
  assert result["trace"] == pytest.approx(same.trace, rel=2e-3)
  assert result["trace_stderr"] == pytest.approx(same.stderr, rel=0.05,
                                                 abs=1e-3 * abs(same.trace))
  # Hutch++'s standard error is the one given the sketch: allow for the
  # sketch's own spread with an absolute margin of 2% of the trace.
  exact = np.trace(h)
  assert abs(result["trace"] - exact) <= (4 * result["trace_stderr"]
                                          + 0.02 * abs(exact))

  diag = result["diagonal"]
  assert diag["probes"] == 60
  assert [(r["layer"], r["num_parameters"]) for r in diag["per_layer"]] == (
      layers)
  assert sum(r["num_parameters"] for r in diag["per_layer"]) == len(h)
  found = eigen.hutchinson_diagonal(op, 60, seed=SEED + 3)
  assert diag["mean"] == pytest.approx(np.mean(found.diagonal), rel=2e-3,
                                       abs=1e-6)
  assert diag["stderr_rms"] == pytest.approx(
      np.sqrt(np.mean(found.stderr ** 2)), rel=2e-3)
  # Against the exact diagonal: layer L's sum per probe is
  # sum_{i in L, j} H_ij z_i z_j, whose variance is the sum over pairs
  # i < j of (H_ij ([i in L] + [j in L]))^2.
  offset = 0
  for row, (_, count) in zip(diag["per_layer"], layers):
    inside = np.zeros(len(h))
    inside[offset:offset + count] = 1
    coefficient = h * (inside[:, None] + inside[None, :])
    variance = np.sum(np.triu(coefficient, 1) ** 2)
    exact_sum = np.sum(np.diag(h)[offset:offset + count])
    assert abs(row["sum"] - exact_sum) <= (
        4 * np.sqrt(variance / 60) + 1e-4 * abs(exact_sum)), row
    assert row["mean"] == pytest.approx(row["sum"] / count)
    offset += count
  assert diag["sum"] == pytest.approx(
      sum(r["sum"] for r in diag["per_layer"]), rel=1e-9)

  scalars = hessian.tensorboard_scalars(result)
  assert scalars["hessian/diagonal_mean"] == diag["mean"]
  for name, _ in layers:
    assert f"hessian/diagonal_sum/{name}" in scalars


def test_hutchpp_with_too_few_probes_is_one_line(run_dir, tmp_path):
  out = str(tmp_path / "hessian.json")
  proc = run_hessian(run_dir, out, "--trace", "--trace_method=hutchpp",
                     "--trace_probes=2")
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "--trace_probes >= 3" in lines[0], proc.stderr
  assert not os.path.exists(out)


def test_report_checks_trace_options_before_any_work():
  with pytest.raises(UserError, match="--trace_probes=2"):
    report.check_trace_options("hutchpp", 2)
  with pytest.raises(UserError, match="--trace_method"):
    report.check_trace_options("xtrace", 30)
  report.check_trace_options("hutchinson", 1)
