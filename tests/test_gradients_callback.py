"""Gradient statistics during training against a brute-force computation."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import data
from tfcapacity import measurements
from tfcapacity.gradients import callback as gradients_callback

FLAGS = dict(dataset="digits", width=6, depth=1, activation="tanh",
             epochs=2, batch_size="40", gradients_every_epochs=1,
             gradients_examples=30, gradients_chunk_size=8,
             gradients_per_layer=True, gradients_ntk=True,
             gradients_feature_layer="penultimate", deterministic=True,
             export=True)


def run(tiny_cfg, model_dir, **overrides):
  cfg = tiny_cfg.replace(model_dir=str(model_dir), **{**FLAGS, **overrides})
  return cfg, measurements.train(cfg,
                                 tf.distribute.OneDeviceStrategy("/cpu:0"))


def test_logged_statistics_equal_a_loop_of_single_example_tapes(tiny_cfg,
                                                                tmp_path):
  cfg, results = run(tiny_cfg, tmp_path / "run")
  row = results["measurements"][-1]
  assert row["step"] == results["history"][-1]["step"]  # The final model.
  model = keras.saving.load_model(os.path.join(tmp_path / "run",
                                               "model.keras"))
  train = data.get("digits", "train", cfg)
  x, y = train.examples(gradients_callback.fixed_indices(
      cfg.seed, train.info.num_examples, 30))
  rows = []
  for i in range(len(y)):
    with tf.GradientTape() as tape:
      loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
          y[i:i + 1], model(x[i:i + 1], training=False))
    grads = tape.gradient(loss, model.trainable_variables)
    rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
  m = np.array(rows, np.float64)
  n = len(m)
  pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
  inner = np.array([m[i] @ m[j] for i, j in pairs])
  norms = np.linalg.norm(m, axis=1)
  cosines = np.array([m[i] @ m[j] / (norms[i] * norms[j]) for i, j in pairs])
  mean = m.mean(0)
  trace_sigma = ((m - mean) ** 2).sum() / (n - 1)
  expected = {
      "gradients/gradient_confusion": max(0.0, -inner.min()),
      "gradients/min_inner_product": inner.min(),
      "gradients/mean_inner_product": inner.mean(),
      "gradients/min_cosine": cosines.min(),
      "gradients/mean_cosine": cosines.mean(),
      "gradients/gradient_diversity": (norms ** 2).sum() / (m.sum(0) @ m.sum(0)),
      "gradients/noise_scale_simple": trace_sigma / (mean @ mean),
  }
  for key, value in expected.items():
    assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
  assert "gradients/hidden_0/kernel/gradient_confusion" in row
  # Gram spectra: loss gradients, logit Jacobians (NTK), penultimate features.
  jac = []
  for i in range(n):
    rows = []
    for c in range(10):
      with tf.GradientTape() as tape:
        logit = model(x[i:i + 1], training=False)[0, c]
      grads = tape.gradient(logit, model.trainable_variables)
      rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
    jac.append(np.concatenate(rows))
  jac = np.array(jac, np.float64)
  kernel, bias = (v.numpy().astype(np.float64) for v in
                  model.get_layer("hidden_0").weights)
  feats = np.tanh(x.reshape(n, -1) @ kernel + bias)
  for name, k in [("gram", m @ m.T), ("ntk", jac @ jac.T),
                  ("features", feats @ feats.T / feats.shape[1])]:
    eig = np.linalg.eigvalsh(k)
    assert row[f"gradients/{name}_min_eigenvalue"] == pytest.approx(
        eig[0], rel=1e-3, abs=1e-6 * eig[-1]), name
    assert row[f"gradients/{name}_max_eigenvalue"] == pytest.approx(
        eig[-1], rel=1e-4), name
    # Resolved in float32 iff lambda_min >= n eps_32 lambda_max (by the
    # float64 truth); the width-6 features have rank 6 < 30: singular.
    edge = n * np.finfo(np.float32).eps * eig[-1]
    resolved = row[f"gradients/{name}_resolved"]
    if abs(eig[0] - edge) > 0.1 * edge:  # Clear of the edge.
      assert resolved == float(eig[0] > edge), name
    condition = row[f"gradients/{name}_condition_number"]
    if resolved:
      assert condition == pytest.approx(eig[-1] / eig[0], rel=1e-2), name
    else:
      assert math.isnan(condition), name
  assert row["gradients/features_resolved"] == 0.0
  assert row["timing/gradients_seconds"] > 0


def test_measuring_gradients_does_not_change_training(tiny_cfg, tmp_path):
  run(tiny_cfg, tmp_path / "with")
  run(tiny_cfg, tmp_path / "without", gradients_every_epochs=0)
  a = keras.saving.load_model(os.path.join(tmp_path / "with", "model.keras"))
  b = keras.saving.load_model(os.path.join(tmp_path / "without",
                                           "model.keras"))
  for u, v in zip(a.variables, b.variables):
    np.testing.assert_array_equal(u.numpy(), v.numpy())


def test_unknown_feature_layer_fails_before_training(tiny_cfg, tmp_path):
  from tfcapacity.errors import UserError
  with pytest.raises(UserError, match="no 'hidden_9'.*hidden_0"):
    run(tiny_cfg, tmp_path / "bad", gradients_feature_layer="hidden_9")
