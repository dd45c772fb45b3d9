"""Adaptive linearisation: the rule, the orientation, and the callback."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import data
from tfcapacity import measurements
from tfcapacity import models
from tfcapacity import rundir
from tfcapacity import training
from tfcapacity.curvature import hvp
from tfcapacity.curvature import linearize
from tfcapacity.errors import UserError
from tfcapacity.models import layers as layers_lib
from tfcapacity.objective import function as function_lib


def test_rule_on_a_hand_built_case():
  slopes = [0.0, 0.5, 0.95, 0.05, 1.0, 0.3]
  components = [0.2, 0.1, -0.3, 0.4, 0.0, -1e-9]
  got = linearize.update_slopes(slopes, components, 0.1, 0.05)
  # Positive: down by 0.1 (0.0 clips at 0; 0.05 clips at 0); zero or
  # negative: up by 0.05 (0.95 -> 1.0; 1.0 clips at 1).
  np.testing.assert_allclose(got, [0.0, 0.4, 1.0, 0.0, 1.0, 0.35])


def test_orientation():
  v = np.array([0.6, -0.8])
  np.testing.assert_array_equal(linearize.orient(v, [1.0, 0.0]), v)
  np.testing.assert_array_equal(linearize.orient(v, [-1.0, 0.0]), -v)
  # Orthogonal to the gradient: the largest entry becomes positive.
  np.testing.assert_array_equal(linearize.orient(v, [0.8, 0.6]), -v)


def test_callback_moves_slopes_by_the_dense_eigenvector():
  cfg = config.make(dataset="synthetic", synthetic_examples=40,
                    synthetic_dim=4, synthetic_classes=3, model="mlp",
                    width=4, depth=2, activation="leaky_relu",
                    leaky_slope=0.3, linearize_every_steps=1,
                    linearize_examples=40, curvature_tol=1e-7,
                    curvature_max_iterations=2000, delta_minus=0.1,
                    delta_plus=0.05)
  train = data.get(cfg.dataset, "train", cfg)
  keras.utils.set_random_seed(0)
  model = models.from_config(cfg, train.info.input_shape,
                             train.info.num_classes)
  layers = layers_lib.slope_layers(model)
  assert len(layers) == 2
  callback = linearize.LinearizationCallback(cfg)
  ctx = training.Context(model=model, optimizer=None,
                         strategy=tf.distribute.get_strategy(), cfg=cfg,
                         train_data=train, test_data=None, model_dir=None)
  callback.on_train_begin(ctx)

  # Brute force: the dense Hessian over weights and slopes, numpy's
  # eigenvector of the largest-magnitude eigenvalue, oriented uphill.
  x, y = train.examples(np.arange(40))
  params = function_lib.select_params(model, None, include_slopes=True)
  op = hvp.HessianOperator(model, x, y, params=params)
  h = op.dense().astype(np.float64)
  eig, vecs = np.linalg.eigh((h + h.T) / 2)
  top = np.argmax(np.abs(eig))
  assert abs(eig[top]) > 1.2 * np.sort(np.abs(eig))[-2]  # A clear gap.
  _, grad = op.loss_and_gradient()
  v = linearize.orient(vecs[:, top], grad.numpy())
  want = linearize.update_slopes([0.3, 0.3], v[-2:], 0.1, 0.05)

  out = callback(ctx)
  assert out["linearization/eigenvalue"] == pytest.approx(eig[top], rel=1e-4)
  for layer, slope, comp in zip(layers, want, v[-2:]):
    assert layer.slope.numpy() == pytest.approx(slope, abs=1e-7)
    assert out[f"linearization/slope/{layer.name}"] == pytest.approx(slope)
    assert out[f"linearization/component/{layer.name}"] == pytest.approx(
        comp, abs=1e-3)
  logged = [out[f"linearization/slope/{layer.name}"] for layer in layers]
  assert out["linearization/mean_slope"] == pytest.approx(np.mean(logged))
  assert out["linearization/mean_slope"] == pytest.approx(np.mean(want))


def test_training_with_linearization(tmp_path):
  cfg = config.make(dataset="synthetic", synthetic_examples=64,
                    synthetic_test_examples=16, synthetic_dim=4,
                    synthetic_classes=3, width=6, depth=2,
                    activation="leaky_relu", leaky_slope=0.5,
                    batch_size="16", epochs=2, linearize_every_steps=2,
                    linearize_examples=32, progress_bar=False, export=False,
                    model_dir=str(tmp_path / "run"))
  results = measurements.train(cfg,
                               tf.distribute.OneDeviceStrategy("/cpu:0"))
  points = rundir.series(results, "linearization/slope/hidden_0_act")
  assert [step for step, _, _ in points] == [2, 4, 6, 8]
  slopes = [0.5] + [value for _, _, value in points]
  for before, after in zip(slopes, slopes[1:]):
    assert after == pytest.approx(before - 0.1) or after == pytest.approx(
        before + 0.05)
  second = [v for _, _, v in rundir.series(
      results, "linearization/slope/hidden_1_act")]
  means = [v for _, _, v in rundir.series(results,
                                          "linearization/mean_slope")]
  np.testing.assert_allclose(means, np.mean([slopes[1:], second], axis=0),
                             rtol=1e-6)


def test_needs_leaky_relu():
  with pytest.raises(UserError, match="--activation=leaky_relu"):
    linearize.LinearizationCallback(config.make(linearize_every_steps=5))
