"""GGN, Fisher and empirical Fisher operators against dense matrices built
from explicit per-example Jacobians and single-example gradient tapes."""

import keras
import numpy as np
import pytest
from scipy.sparse import linalg as sparse_linalg
import tensorflow as tf

from tfcapacity import models
from tfcapacity.curvature import eigen
from tfcapacity.curvature import hvp
from tfcapacity.curvature import matrices
from tfcapacity.errors import UserError
from tfcapacity.objective import function as function_lib


def mlp64(seed=0, num_classes=3, **options):
  keras.utils.set_random_seed(seed)
  kwargs = dict(width=6, depth=1, activation="tanh", **options)
  with models.dtype_policy("float64"):
    return models.get("mlp", input_shape=(4,), num_classes=num_classes,
                      **kwargs)


def data(n=10, shape=(4,), classes=3, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *shape)).astype(np.float32)
  return x, rng.integers(0, classes, size=n)


def snapshot(model):
  return [v.numpy().copy() for v in model.variables]


def jacobians(model, x, params, training=False):
  """[n, C, P] float64: d logits_i / d params, one tape per example (or, with
  `training`, of the whole batch's logits, which batch norm couples)."""
  state = snapshot(model)

  @tf.function
  def run():
    if training:
      with tf.GradientTape() as tape:
        logits = model(x, training=True)
      jac = tape.jacobian(logits, params, experimental_use_pfor=False)
      return tf.concat([tf.reshape(tf.cast(j, tf.float64),
                                   [len(x), logits.shape[-1], -1])
                        for j in jac], axis=-1), logits
    rows, outs = [], []
    for i in range(len(x)):
      with tf.GradientTape() as tape:
        logits = model(x[i:i + 1], training=False)[0]
      jac = tape.jacobian(logits, params, experimental_use_pfor=False)
      rows.append(tf.concat([tf.reshape(tf.cast(j, tf.float64),
                                        [logits.shape[0], -1]) for j in jac],
                            axis=-1))
      outs.append(logits)
    return tf.stack(rows), tf.stack(outs)

  jac, logits = run()
  for var, value in zip(model.variables, state):
    var.assign(value)
  return jac.numpy(), np.asarray(logits, np.float64)


def softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def loss_hessians(loss, z):
  if loss == "squared":
    return np.broadcast_to(np.eye(z.shape[-1]), z.shape + z.shape[-1:])
  p = softmax(z)
  return np.einsum("nc,cd->ncd", p, np.eye(z.shape[-1])) - np.einsum(
      "nc,nd->ncd", p, p)


def dense_ggn(model, x, loss="cross_entropy", params=None, training=False):
  params = model.trainable_variables if params is None else params
  jac, z = jacobians(model, x, params, training)
  return np.einsum("ncp,ncd,ndq->pq", jac, loss_hessians(loss, z),
                   jac) / len(x)


def dense_empirical_fisher(model, x, y, loss="cross_entropy"):
  """1/n sum_i g_i g_i^T from a loop of single-example tapes."""
  params = model.trainable_variables
  fn = {"cross_entropy": lambda t, z: tf.reduce_sum(
      tf.nn.sparse_softmax_cross_entropy_with_logits(t, z)),
        "squared": lambda t, z: 0.5 * tf.reduce_sum(
            tf.square(z - tf.one_hot(t, z.shape[-1], dtype=z.dtype)))}[loss]
  total = 0.0
  for i in range(len(x)):
    with tf.GradientTape() as tape:
      value = fn(y[i:i + 1], model(x[i:i + 1], training=False))
    g = np.concatenate([np.ravel(t) for t in tape.gradient(value, params)])
    total = total + np.outer(g, g)
  return total / len(x)


def assert_close(actual, expected, tol=1e-10):
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("loss", ["cross_entropy", "squared"])
@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_ggn_equals_sum_of_jacobian_products(loss, method):
  model = mlp64()
  x, y = data(11)
  op = matrices.GGNOperator(model, x, y, loss=loss, method=method,
                            batch_size=4)  # 4 + 4 + 3 (padded)
  assert (op.matrix, op.size, op.dtype, op.num_classes) == (
      "ggn", 51, tf.float64, 3)
  dense = op.dense()
  assert_close(dense, dense_ggn(model, x, loss))
  assert_close(dense, dense.T)
  assert np.linalg.eigvalsh(dense).min() > -1e-12  # PSD.
  assert op.describe()["matrix"] == "ggn"
  assert op.describe()["bn_mode"] == "inference"


@pytest.mark.parametrize("loss", ["cross_entropy", "squared"])
def test_empirical_fisher_equals_single_example_tapes(loss):
  model = mlp64()
  x, y = data(9)
  op = matrices.make_operator("empirical_fisher", model, x, y, loss=loss,
                              batch_size=5)
  assert op.matrix == "empirical_fisher"
  assert_close(op.dense(), dense_empirical_fisher(model, x, y, loss))


def test_ggn_equals_hessian_for_a_linear_model_with_squared_loss():
  keras.utils.set_random_seed(3)
  with models.dtype_policy("float64"):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
  x, y = data(8)
  ggn = matrices.make_operator("ggn", model, x, y, loss="squared")
  hessian = matrices.make_operator("hessian", model, x, y, loss="squared")
  assert hessian.matrix == "hessian"
  assert_close(ggn.dense(), hessian.dense())
  # Not so with the cross-entropy's curvature at a hidden layer.
  model = mlp64()
  assert np.abs(matrices.make_operator("ggn", model, x, y).dense()
                - hvp.HessianOperator(model, x, y).dense()).max() > 1e-3


def test_fisher_expectation_is_the_ggn_and_draws_are_seeded():
  model = mlp64()
  x, y = data(10)
  ggn = dense_ggn(model, x)
  samples = 2000
  fisher = matrices.make_operator("fisher", model, x, y, mc_samples=samples,
                                  seed=7, batch_size=4)
  assert fisher.describe()["mc_samples"] == samples
  dense = fisher.dense()
  error = np.linalg.norm(dense - ggn) / np.linalg.norm(ggn)
  assert error < 3.0 / np.sqrt(samples)
  few = matrices.FisherOperator(model, x, y, mc_samples=5, seed=7).dense()
  assert np.linalg.norm(few - ggn) / np.linalg.norm(ggn) > error
  # Same seed: the same matrix, whatever the batching; another seed differs.
  again = matrices.FisherOperator(model, x, y, mc_samples=5, seed=7,
                                  batch_size=10, method="forward").dense()
  assert_close(again, few, 1e-12)
  other = matrices.FisherOperator(model, x, y, mc_samples=5, seed=8).dense()
  assert np.abs(other - few).max() > 1e-3


def test_fisher_of_squared_loss_samples_gaussian_targets():
  model = mlp64(num_classes=2)
  x, y = data(6, classes=2)
  samples = 2000
  dense = matrices.FisherOperator(model, x, y, loss="squared",
                                  mc_samples=samples).dense()
  ggn = dense_ggn(model, x, "squared")
  assert (np.linalg.norm(dense - ggn) / np.linalg.norm(ggn)
          < 3.0 / np.sqrt(samples))


@pytest.mark.parametrize("matrix", matrices.MATRICES)
def test_scipy_eigsh_agrees_with_lanczos(matrix):
  model = mlp64()
  x, y = data(10)
  op = matrices.make_operator(matrix, model, x, y)
  linear = op.to_scipy()
  assert linear.shape == (51, 51) and linear.dtype == np.float64
  v = np.random.default_rng(0).normal(size=51)
  np.testing.assert_allclose(linear.matvec(v), op.matvec(v).numpy(),
                             rtol=0, atol=1e-14)
  values = np.sort(sparse_linalg.eigsh(linear, k=3, which="LA",
                                       return_eigenvectors=False))[::-1]
  top = eigen.lanczos_top_k(op, 3, num_steps=51)
  np.testing.assert_allclose(top.eigenvalues, values, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(values, np.linalg.eigvalsh(op.dense())[::-1][:3],
                             rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("matrix", ["ggn", "fisher", "empirical_fisher"])
def test_exact_diagonal_is_the_dense_diagonal(matrix):
  model = mlp64()
  x, y = data(7)
  op = matrices.make_operator(matrix, model, x, y, batch_size=3)
  diagonal = op.exact_diagonal().numpy()
  assert_close(diagonal, np.diag(op.dense()))
  if matrix == "ggn":
    assert_close(diagonal, np.diag(dense_ggn(model, x)))
  with pytest.raises(UserError, match="1,071 Jacobian entries"):
    op.exact_diagonal(max_entries=1000)  # 7 x 3 x 51 = 1071.


def test_ggn_weight_decay_adds_the_penalty_hessian():
  model = mlp64()
  x, y = data(6)
  plain = matrices.GGNOperator(model, x, y).dense()
  decayed = matrices.GGNOperator(model, x, y, weight_decay=0.1)
  mask = np.concatenate([np.full(np.prod(v.shape),
                                 1.0 if v.path.endswith("kernel") else 0.0)
                         for v in model.trainable_variables])
  assert_close(decayed.dense(), plain + 0.1 * np.diag(mask))
  assert_close(decayed.exact_diagonal().numpy(),
               np.diag(plain) + 0.1 * mask)


def test_user_errors():
  model = mlp64()
  x, y = data(4)
  with pytest.raises(UserError, match="unknown --matrix 'gn'"):
    matrices.make_operator("gn", model, x, y)
  with pytest.raises(UserError, match="mc_samples applies to --matrix=fisher"):
    matrices.make_operator("ggn", model, x, y, mc_samples=3)
  with pytest.raises(UserError, match="mc_samples"):
    matrices.make_operator("fisher", model, x, y, mc_samples=0)
  with pytest.raises(UserError, match="no weight decay"):
    matrices.make_operator("empirical_fisher", model, x, y, weight_decay=0.1)


def test_batch_mode_ggn_couples_the_batch():
  model = mlp64(normalization="batch")
  x, y = data(6)
  for _ in range(2):
    model(x * 1.5 + 0.3, training=True)
  before = snapshot(model)
  op = matrices.GGNOperator(model, x, y, bn_mode="batch", batch_size=6)
  dense = op.dense()
  for actual, expected in zip(snapshot(model), before):
    np.testing.assert_array_equal(actual, expected)
  assert op.describe()["bn_mode"] == "batch"
  assert_close(dense, dense_ggn(model, x, training=True))
  assert np.abs(dense - dense_ggn(model, x)).max() > 1e-3


def test_batch_norm_resnet_in_inference_mode_is_left_alone():
  keras.utils.set_random_seed(0)
  model = models.get("resnet", input_shape=(6, 6, 1), num_classes=3,
                     **{**models.tiny_kwargs("resnet"),
                        "normalization": "batch"})
  x, y = data(4, (6, 6, 1))
  for _ in range(3):  # Moving statistics away from their start.
    model(x * 1.5 + 0.3, training=True)
  params = function_lib.select_params(model, ["stage1_block1_norm1",
                                              "classifier"])
  before = snapshot(model)
  ops = [matrices.make_operator(m, model, x, y, params=params, batch_size=2,
                                bn_mode="inference",
                                **({"mc_samples": 2} if m == "fisher" else {}))
         for m in ("ggn", "fisher", "empirical_fisher")]
  v = np.random.default_rng(0).normal(size=ops[0].size).astype(np.float32)
  for op in ops:
    assert op.describe()["bn_mode"] == "inference"
    op.matvec(v)
  ggn = ops[0].dense()
  diagonal = ops[0].exact_diagonal().numpy()
  for actual, expected in zip(snapshot(model), before):
    np.testing.assert_array_equal(actual, expected)  # Weights and BN stats.
  expected = dense_ggn(model, x, params=params)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(ggn, expected, rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(diagonal, np.diag(expected), rtol=0,
                             atol=1e-5 * scale)
