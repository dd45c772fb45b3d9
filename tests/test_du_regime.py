"""Du et al.'s regime: the ntk parametrisation, random signs, float64, and
the step size from the neural-tangent Gram matrix.

Every number is checked against an independent computation: the forward
pass against numpy, the empirical NTK at width 4096 against the
infinite-width kernel (the arc-cosine recursion in closed form), the step
against eigvalsh of a brute-force Jacobian, the stability edge against
gradient descent on the linearised model, and float64 Gram spectra against
numpy where float32 cannot resolve them.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import confusion
from tfcapacity import data
from tfcapacity import hessian
from tfcapacity import measurements
from tfcapacity import models
from tfcapacity.errors import UserError
from tfcapacity.gradients import measure
from tfcapacity.gradients import per_example
from tfcapacity.gradients import statistics
from tfcapacity.gradients import tangent
from tfcapacity.models import layers
from tfcapacity.objective import losses
from tfcapacity.training import dynamics
import conftest


def unit_rows(n, d, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_activation(name):
  return {"relu": lambda z: np.maximum(z, 0),
          "softplus": lambda z: np.logaddexp(0, z),
          "tanh": np.tanh}[name]


def jacobian(model, x):
  """[n C, P] by brute force: tape.jacobian of every output."""
  with tf.GradientTape() as tape:
    f = model(tf.constant(x, tf.float32))
  jac = tape.jacobian(f, model.trainable_variables)
  rows = f.shape[0] * f.shape[1]
  return np.concatenate([np.reshape(j.numpy(), (rows, -1)) for j in jac],
                        axis=1).astype(np.float64), f.numpy()


# --- c_sigma and the forward pass -----------------------------------------------


@pytest.mark.parametrize("activation, exact", [("relu", 2.0), ("linear", 1.0)])
def test_c_sigma_has_the_closed_form_values(activation, exact):
  assert layers.c_sigma(activation) == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("activation", ["softplus", "tanh", "sigmoid"])
def test_c_sigma_matches_a_monte_carlo_second_moment(activation):
  z = np.random.default_rng(0).standard_normal(2_000_000)
  fn = {"softplus": lambda z: np.logaddexp(0, z), "tanh": np.tanh,
        "sigmoid": lambda z: 1 / (1 + np.exp(-z))}[activation]
  assert layers.c_sigma(activation) == pytest.approx(
      1 / np.mean(fn(z) ** 2), rel=3e-3)


@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_ntk_mlp_forward_pass_equals_numpy(activation):
  keras.utils.set_random_seed(3)
  m = models.get("mlp", input_shape=(5,), num_classes=2, width=7, depth=3,
                 activation=activation, parametrization="ntk")
  assert all("bias" not in v.path for v in m.trainable_variables)
  x = unit_rows(4, 5)
  h, c = x, layers.c_sigma(activation)
  for i in range(3):
    w = m.get_layer(f"hidden_{i}").kernel.numpy().astype(np.float64)
    h = np.sqrt(c / 7) * numpy_activation(activation)(h @ w)
  want = h @ m.get_layer("classifier").kernel.numpy().astype(np.float64)
  np.testing.assert_allclose(m(x.astype(np.float32)).numpy(), want,
                             rtol=1e-5, atol=1e-6)


def test_ntk_fc_resnet_forward_pass_equals_numpy():
  keras.utils.set_random_seed(4)
  depth, width, c_res = 3, 6, 0.7
  m = models.get("fc_resnet", input_shape=(5,), num_classes=1, width=width,
                 depth=depth, activation="softplus", residual_scale=c_res,
                 parametrization="ntk")
  x = unit_rows(4, 5, seed=1)
  act, c = numpy_activation("softplus"), layers.c_sigma("softplus")
  kernel = lambda name: m.get_layer(name).kernel.numpy().astype(np.float64)  # noqa: E731
  h = np.sqrt(c / width) * act(x @ kernel("input_projection"))
  for i in range(depth):  # H = depth + 1 layers below the output.
    h = h + c_res / ((depth + 1) * np.sqrt(width)) * act(
        h @ kernel(f"hidden_{i}"))
  np.testing.assert_allclose(m(x.astype(np.float32)).numpy(),
                             h @ kernel("classifier"), rtol=1e-5, atol=1e-6)


def test_ntk_weights_are_standard_normal():
  keras.utils.set_random_seed(0)
  m = models.get("mlp", input_shape=(20,), num_classes=1, width=512,
                 depth=2, parametrization="ntk")
  w = m.get_layer("hidden_1").kernel.numpy()
  assert abs(w.mean()) < 0.01 and w.std() == pytest.approx(1.0, abs=0.01)


def arccos_ntk(x, depth):
  """The infinite-width NTK of the ntk-parametrised ReLU MLP (c_sigma = 2).

  Sigma_0 = x x^T; Sigma_h = (sqrt(s s')/pi) (sin t + (pi - t) cos t) and
  Sigma'_h = (pi - t)/pi with t the angle under Sigma_{h-1} (Cho & Saul's
  arc-cosine kernels of degree 1 and 0, times c_sigma = 2); Theta_0 =
  Sigma_0, Theta_h = Theta_{h-1} Sigma'_h + Sigma_h.
  """
  sigma = x @ x.T
  theta = sigma.copy()
  for _ in range(depth):
    diag = np.sqrt(np.outer(np.diag(sigma), np.diag(sigma)))
    t = np.arccos(np.clip(sigma / diag, -1, 1))
    dot = (np.pi - t) / np.pi
    sigma = diag / np.pi * (np.sin(t) + (np.pi - t) * np.cos(t))
    theta = theta * dot + sigma
  return theta


def test_empirical_ntk_at_width_4096_is_the_arc_cosine_kernel():
  x = unit_rows(6, 10, seed=2)
  keras.utils.set_random_seed(0)
  m = models.get("mlp", input_shape=(10,), num_classes=1, width=4096,
                 depth=2, activation="relu", parametrization="ntk")
  empirical = per_example.gradient_inner_products(
      m, x.astype(np.float32), np.zeros(6, np.int64), output="logits")
  want = arccos_ntk(x, 2)
  error = np.linalg.norm(empirical - want) / np.linalg.norm(want)
  assert error < 0.10
  # Not a kernel of another depth: depth 1's is further off than 10%.
  assert np.linalg.norm(empirical - arccos_ntk(x, 1)) / np.linalg.norm(
      want) > 0.10


def test_ntk_refuses_what_it_cannot_have():
  with pytest.raises(UserError, match="normalization=none"):
    models.get("mlp", input_shape=(4,), num_classes=1, width=4, depth=1,
               normalization="batch", parametrization="ntk")
  with pytest.raises(UserError, match="zero_init_classifier"):
    models.get("mlp", input_shape=(4,), num_classes=1, width=4, depth=1,
               zero_init_classifier=True, parametrization="ntk")
  with pytest.raises(UserError, match="parametrization"):
    models.get("mlp", input_shape=(4,), num_classes=1, width=4, depth=1,
               parametrization="mup")
  cfg = config.make(model="resnet", parametrization="ntk")
  with pytest.raises(UserError, match="applies to mlp and fc_resnet"):
    models.from_config(cfg, (8, 8, 1), 10)


# --- Random signs, unit norms, the loss ----------------------------------------


def test_random_sign_task_and_unit_norm_inputs():
  cfg = config.make(dataset="synthetic", synthetic_examples=64, seed=5,
                    task="random_sign", unit_norm_inputs=True)
  train = data.get("synthetic", "train", cfg)
  test = data.get("synthetic", "test", cfg)
  assert train.info.num_classes == 1 and test.info.num_classes == 1
  x, y = train.examples(np.arange(64))
  np.testing.assert_allclose(np.linalg.norm(x.reshape(64, -1), axis=1), 1,
                             rtol=1e-6)
  assert set(np.unique(y)) == {0, 1}
  # A fixed draw of the seed; another seed, other signs.
  again = data.get("synthetic", "train", cfg).examples(np.arange(64))[1]
  other = data.get("synthetic", "train", cfg.replace(seed=6)).examples(
      np.arange(64))[1]
  assert np.array_equal(y, again) and not np.array_equal(y, other)


def test_streamed_datasets_refuse_the_in_memory_flags(tmp_path):
  path = tmp_path / "d.h5"
  conftest.write_digits_probe(path, 8, 0)
  cfg = config.make(task="random_sign")
  with pytest.raises(UserError, match="in-memory datasets"):
    data.get(f"hdf5:{path}", "train", cfg)


def test_squared_loss_and_errors_of_a_sign_model():
  f = tf.constant([[0.5], [-2.0], [0.0]])
  y = tf.constant([1, 1, 0])
  np.testing.assert_allclose(losses.squared(y, f).numpy(),
                             [0.5 * 0.25, 0.5 * 9.0, 0.5 * 1.0])
  np.testing.assert_array_equal(losses.topk_correct(y, f, 5).numpy(),
                                [1.0, 0.0, 1.0])
  # float64 outputs keep float64 (no float32 cast in the gradient's path).
  assert losses.squared(y, tf.cast(f, tf.float64)).dtype == tf.float64


# --- The step size from the Gram matrix ------------------------------------------


def gram_cfg(tmp_path, **overrides):
  flags = dict(
      synthetic_examples=16, synthetic_dim=5, batch_size="16",
      task="random_sign", unit_norm_inputs=True, loss="squared",
      parametrization="ntk", activation="softplus", width=16, depth=2,
      learning_rate_from="gram", learning_rate=0.7, steps=3, eval_every=1,
      shuffle=False)
  flags.update(overrides)
  return conftest.synthetic_cfg(tmp_path, **flags)


def test_learning_rate_from_gram_is_c_n_over_lambda_max(tmp_path):
  cfg = gram_cfg(tmp_path)
  results = measurements.train(cfg)
  # The model at initialisation, as the trainer builds it; J by brute force.
  train = data.get(cfg.dataset, "train", cfg)
  x, _ = train.examples(np.arange(16))
  keras.utils.set_random_seed(cfg.seed)
  model = models.from_config(cfg, train.info.input_shape, 1)
  jac, _ = jacobian(model, x)
  lam = np.linalg.eigvalsh(jac @ jac.T)[-1]
  want = 0.7 * 16 / lam
  assert results["learning_rate_used"] == pytest.approx(want, rel=1e-6)
  assert results["gram_max_eigenvalue_at_init"] == pytest.approx(lam,
                                                                  rel=1e-6)
  # The optimiser stepped with it.
  assert results["history"][-1]["learning_rate"] == pytest.approx(want,
                                                                  rel=1e-6)
  # A resumed run builds its trainer again: the same step from the seed.
  again = measurements.trainer(cfg)
  assert again.learning_rate == results["learning_rate_used"]


def test_learning_rate_from_gram_needs_the_squared_loss(tmp_path):
  cfg = gram_cfg(tmp_path, task="classes", loss="cross_entropy")
  with pytest.raises(UserError, match="--loss=squared"):
    measurements.train(cfg)
  assert not os.path.exists(cfg.model_dir)
  big = gram_cfg(tmp_path, synthetic_examples=5000, batch_size="full")
  with pytest.raises(UserError, match="--train_subset<=4096"):
    measurements.train(big)
  assert not os.path.exists(big.model_dir)


@pytest.mark.parametrize("c, stable", [(1.9, True), (2.1, False)])
def test_c_of_two_is_where_gd_on_the_linearised_model_stops_being_stable(
    c, stable):
  x = unit_rows(12, 6, seed=3).astype(np.float32)
  y = np.random.default_rng(3).integers(0, 2, 12)
  keras.utils.set_random_seed(1)
  model = models.get("mlp", input_shape=(6,), num_classes=1, width=32,
                     depth=2, activation="softplus", parametrization="ntk")
  eta, _ = tangent.learning_rate_from_gram(model, x, c)
  jac, f0 = jacobian(model, x)
  jac, f0 = tf.constant(jac), tf.constant(f0, tf.float64)
  delta = tf.Variable(tf.zeros([jac.shape[1]], tf.float64))
  norms = []
  for _ in range(300):  # GD on the package's mean squared loss.
    with tf.GradientTape() as tape:
      out = f0 + tf.reshape(tf.linalg.matvec(jac, delta), [-1, 1])
      loss = tf.reduce_mean(losses.squared(y, out))
    delta.assign_sub(eta * tape.gradient(loss, delta))
    norms.append(float(loss))
  if stable:
    assert norms[-1] < norms[0]
  else:
    assert norms[-1] > 1e6 * norms[0]


# --- float64 -----------------------------------------------------------------------


def near_parallel_inputs():
  x = unit_rows(8, 6, seed=4)
  x[1] = x[0] + 3e-5 * x[1]  # Almost the same direction as x[0].
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_float64_gram_resolves_what_float32_cannot():
  x = near_parallel_inputs()
  y = np.zeros(8, np.int64)
  keras.utils.set_random_seed(0)
  with models.dtype_policy("float64"):
    m64 = models.get("mlp", input_shape=(6,), num_classes=1, width=64,
                     depth=2, activation="softplus", parametrization="ntk")
  assert m64.trainable_variables[0].dtype == "float64"
  jac, _ = jacobian(m64, x)
  want = np.linalg.eigvalsh(jac @ jac.T)
  assert want[0] < 1e-8 * want[-1]  # Far below float32's resolution.
  got = per_example.gradient_inner_products(m64, x.astype(np.float32), y,
                                            output="logits")
  spectrum = statistics.gram_spectrum(got)
  assert spectrum["min_eigenvalue"] == pytest.approx(want[0], rel=1e-5)
  assert spectrum["min_below_float32"] == 1.0
  # The same weights in float32 do not resolve it.
  m32 = models.get("mlp", input_shape=(6,), num_classes=1, width=64,
                   depth=2, activation="softplus", parametrization="ntk")
  m32.set_weights([w.astype(np.float32) for w in m64.get_weights()])
  got32 = per_example.gradient_inner_products(m32, x.astype(np.float32), y,
                                              output="logits")
  least32 = np.linalg.eigvalsh(got32)[0]
  assert abs(least32 - want[0]) > 0.5 * want[0]
  # Each spectrum says so in the precision its model computes in.
  assert measure.precision(m64) == "float64"
  assert measure.precision(m32) == "float32"
  resolved = statistics.gram_spectrum(got, dtype=measure.precision(m64))
  assert resolved["resolved"] == 1.0
  assert resolved["condition_number"] == pytest.approx(want[-1] / want[0],
                                                       rel=1e-4)
  lost = statistics.gram_spectrum(got32, dtype=measure.precision(m32))
  assert lost["resolved"] == 0.0 and np.isnan(lost["condition_number"])
  assert statistics.gram_spectrum(jac @ jac.T)["min_below_float32"] == 1.0
  assert statistics.gram_spectrum(np.eye(3))["min_below_float32"] == 0.0


def test_a_float64_run_trains_in_float64(tmp_path):
  cfg = gram_cfg(tmp_path, dtype="float64", gradients_every_steps=3,
                 gradients_examples=16, gradients_ntk=True,
                 track_distance=True, export=True)
  results = measurements.train(cfg)
  model = keras.saving.load_model(os.path.join(cfg.model_dir, "model.keras"))
  assert all(v.dtype == "float64" for v in model.trainable_variables)
  assert keras.config.dtype_policy().name == "float32"  # Restored.
  # The drift against Theta(0), kept in the run directory.
  with np.load(os.path.join(cfg.model_dir, "ntk_init.npz")) as saved:
    gram0 = saved["gram"]
  train = data.get(cfg.dataset, "train", cfg)
  x, _ = train.examples(np.arange(16))
  jac, _ = jacobian(model, x)
  last = [m for m in results["measurements"] if "gradients/ntk_drift" in m][-1]
  want = np.linalg.norm(jac @ jac.T - gram0, 2) / np.linalg.eigvalsh(gram0)[0]
  assert last["step"] == 3
  assert last["gradients/ntk_drift"] == pytest.approx(want, rel=1e-6)
  assert results["measurements"][0]["gradients/ntk_drift"] == 0.0
  # The Hessian tool on the float64 run: lambda_max of the squared loss
  # against a dense float64 Hessian of the final model.
  found = conftest.compute_tool(
      hessian, f"--model_dir={cfg.model_dir}", "--num_examples=16",
      "--top_k=1", "--tol=1e-10", "--checkpoint=final")
  _, y = train.examples(np.arange(16))
  variables = model.trainable_variables
  with tf.GradientTape() as outer:
    with tf.GradientTape() as inner:
      loss = tf.reduce_mean(losses.squared(y, model(x.astype(np.float32))))
    grad = tf.concat([tf.reshape(g, [-1]) for g in
                      inner.gradient(loss, variables)], 0)
  dense = np.concatenate([np.reshape(j.numpy(), (grad.shape[0], -1)) for j
                          in outer.jacobian(grad, variables)], axis=1)
  assert found["eigenvalues"][0] == pytest.approx(
      np.linalg.eigvalsh((dense + dense.T) / 2)[-1], rel=1e-8)


def test_relative_distance_is_per_layer_change_over_start():
  keras.utils.set_random_seed(0)
  m = models.get("mlp", input_shape=(3,), num_classes=1, width=4, depth=1,
                 parametrization="ntk")
  tracker = dynamics.DistanceTracker(m.trainable_variables)
  start = [w.copy() for w in m.get_weights()]
  m.get_layer("hidden_0").kernel.assign_add(
      np.full((3, 4), 0.5, np.float32))
  out = tracker.scalars(0)
  want = np.linalg.norm(np.full((3, 4), 0.5)) / np.linalg.norm(start[0])
  assert out["relative_distance/hidden_0"] == pytest.approx(want, rel=1e-6)
  assert out["relative_distance/classifier"] == 0.0


def test_train_cli_refuses_cross_entropy_on_one_output(tmp_path):
  proc = conftest.run_tool(
      "tfcapacity.train", f"--model_dir={tmp_path / 'r'}",
      "--dataset=synthetic", "--synthetic_examples=32", "--task=random_sign",
      "--loss=cross_entropy", "--width=4", "--steps=1", "--batch_size=32")
  conftest.assert_one_line_error(proc, "--loss=squared",
                                 prog="tfcapacity.train")


def test_analysis_tools_rebuild_a_float32_run_in_float64(tmp_path):
  cfg = gram_cfg(tmp_path, steps=2, export=True)
  measurements.train(cfg)
  found = conftest.compute_tool(
      confusion, f"--model_dir={cfg.model_dir}", "--num_examples=16",
      "--ntk", "--dtype=float64")
  assert found["dtype"] == "float64"
  # The float32 weights in float64, the NTK Gram by brute force.
  model = keras.saving.load_model(os.path.join(cfg.model_dir, "model.keras"))
  with models.dtype_policy("float64"):
    m64 = models.from_config(cfg.replace(dtype="float64"), (5,), 1)
  m64.set_weights([w.astype(np.float64) for w in model.get_weights()])
  train = data.get(cfg.dataset, "train", cfg)
  x, _ = train.examples(np.arange(16))
  jac, _ = jacobian(m64, x)
  assert found["ntk_min_eigenvalue"] == pytest.approx(
      np.linalg.eigvalsh(jac @ jac.T)[0], rel=1e-9)
  plain = conftest.compute_tool(confusion, f"--model_dir={cfg.model_dir}",
                                "--num_examples=16", "--ntk")
  assert plain["dtype"] == "float32"
  proc = conftest.run_tool(
      "tfcapacity.confusion", f"--keras_model={cfg.model_dir}/model.keras",
      "--dataset=synthetic", "--dtype=float64", f"--output={tmp_path}/o.json")
  conftest.assert_one_line_error(proc, "--dtype needs --model_dir")
