"""lambda_max during training: exact values, untouched model, warm starts."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import data
from tfcapacity import measurements
from tfcapacity import training
from tfcapacity.curvature import callback as curvature
from tfcapacity import rundir
from tfcapacity.objective import function as function_lib
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

FLAGS = dict(dataset="digits", width=6, depth=1, activation="tanh",
             normalization="batch", epochs=2, batch_size="40",
             curvature_every_epochs=1, curvature_examples=60,
             curvature_test_batches=2, curvature_tol=1e-6,
             curvature_max_iterations=1000, deterministic=True)


def run(tiny_cfg, model_dir, strategy=None, **overrides):
  cfg = tiny_cfg.replace(model_dir=str(model_dir), export=True,
                         **{**FLAGS, **overrides})
  results = measurements.train(
      cfg, strategy or tf.distribute.OneDeviceStrategy("/cpu:0"))
  return cfg, results


def final_weights(model_dir):
  model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
  return model, [v.numpy() for v in model.variables]


def dense_lambda_max(model, x, y, bn_mode):
  """Largest eigenvalue of the dense Hessian (eigvalsh)."""
  params = model.trainable_variables
  training_mode = bn_mode != "inference"
  targets = [p.value for p in params]
  state = [v.numpy() for v in model.variables]

  @tf.function
  def dense():
    with tf.GradientTape(persistent=True) as outer:
      with tf.GradientTape() as inner:
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            y, model(x, training=training_mode)))
      grad = function_lib.flatten(inner.gradient(loss, targets))
    jac = outer.jacobian(grad, targets, experimental_use_pfor=False)
    return tf.concat([tf.reshape(j, [grad.shape[0], -1]) for j in jac], 1)

  matrix = dense().numpy()
  for var, value in zip(model.variables, state):
    var.assign(value)
  eigenvalues = np.linalg.eigvalsh((matrix + matrix.T) / 2)
  return eigenvalues[-1]


@pytest.mark.parametrize("bn_mode", ["inference", "batch"])
def test_logged_lambda_max_is_the_dense_hessians(tiny_cfg, tmp_path,
                                                 bn_mode):
  cfg, results = run(tiny_cfg, tmp_path / "run", curvature_bn_mode=bn_mode)
  rows = results["measurements"]
  assert [r["epoch"] for r in rows] == [0, 1, 2]
  for row in rows:
    assert row["curvature/relative_residual"] <= 1e-6
    assert row["timing/curvature_seconds"] > 0
    assert "curvature/lambda_max_test" in row
  model, _ = final_weights(tmp_path / "run")
  train = data.get("digits", "train", cfg)
  x, y = train.examples(curvature.fixed_indices(cfg.seed,
                                                train.info.num_examples, 60))
  expected = dense_lambda_max(model, x, y, bn_mode)
  assert rows[-1]["curvature/lambda_max"] == pytest.approx(expected,
                                                           rel=1e-4)
  test = data.get("digits", "test", cfg)
  batches = curvature.test_batches(cfg.seed, test.info.num_examples, 60, 2)
  assert len(batches) == 2
  tops = [dense_lambda_max(model, *test.examples(b), bn_mode)
          for b in batches]
  assert rows[-1]["curvature/lambda_max_test"] == pytest.approx(
      np.mean(tops), rel=1e-4)
  with open(os.path.join(tmp_path / "run", "results.json")) as f:
    assert "curvature/lambda_max" in json.load(f)["measurements"][-1]


def test_measuring_does_not_change_training(tiny_cfg, tmp_path):
  """Batch-norm statistics included: bitwise the same run without it."""
  run(tiny_cfg, tmp_path / "with", curvature_bn_mode="batch")
  run(tiny_cfg, tmp_path / "without", curvature_every_epochs=0)
  _, with_weights = final_weights(tmp_path / "with")
  _, without_weights = final_weights(tmp_path / "without")
  assert len(with_weights) == len(without_weights) == 7  # BN stats too.
  for a, b in zip(with_weights, without_weights):
    np.testing.assert_array_equal(a, b)


def test_warm_start_and_step_frequency(tiny_cfg, tmp_path):
  cfg = tiny_cfg.replace(model_dir=str(tmp_path / "run"),
                         **{**FLAGS, "curvature_every_epochs": 0,
                            "curvature_every_steps": 5, "epochs": 1})
  trainer = measurements.trainer(cfg,
                                 tf.distribute.OneDeviceStrategy("/cpu:0"))
  cb = trainer.callbacks[0]
  assert isinstance(cb, curvature.CurvatureCallback)
  results = trainer.run()
  steps = [m["step"] for m in results["measurements"]]
  assert steps == list(range(0, trainer.total_steps + 1, 5))
  ctx = trainer.context(trainer.total_steps)
  first = cb(ctx)
  again = cb(ctx)  # Same model: the warm start is already the answer.
  assert again["curvature/iterations"] <= 2
  assert again["curvature/lambda_max"] == pytest.approx(
      first["curvature/lambda_max"], rel=1e-5)


def test_two_replicas_measure_what_one_device_does(tiny_cfg, tmp_path):
  overrides = dict(curvature_test_batches=0, normalization="none", epochs=1)
  _, one = run(tiny_cfg, tmp_path / "one", **overrides)
  strategy = conftest.two_replicas()
  _, two = run(tiny_cfg, tmp_path / "two", strategy=strategy, **overrides)
  assert two["num_replicas"] == 2
  assert len(one["measurements"]) == len(two["measurements"]) == 2
  for a, b in zip(one["measurements"], two["measurements"]):
    assert b["curvature/lambda_max"] == pytest.approx(
        a["curvature/lambda_max"], rel=1e-4)


class _Interrupt(training.Callback):
  every_epochs = 1

  def __call__(self, ctx):
    if ctx.epoch == 1:
      raise KeyboardInterrupt  # Killed before epoch 1's checkpoint.
    return {}


def test_a_run_resumes_with_measurements_added(tiny_cfg, tmp_path):
  """Measurement flags may change on resume: they never change training."""
  cfg = tiny_cfg.replace(model_dir=str(tmp_path / "run"),
                         **{**FLAGS, "curvature_every_epochs": 0})
  with pytest.raises(KeyboardInterrupt):
    training.train(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"),
                   callbacks=[_Interrupt()])
  _, results = run(tiny_cfg, tmp_path / "run", curvature_test_batches=0)
  assert [r["epoch"] for r in results["history"]] == [0, 1, 2]
  measured = rundir.series(results, "curvature/lambda_max")
  assert [epoch for _, epoch, _ in measured] == [1, 2]
