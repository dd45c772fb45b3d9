"""The objective layer against answers computed another way.

The squared loss (Du et al.'s) is checked end to end: the Hessian's top
eigenvalues against a dense float64 Hessian of a float64 copy of the model
(the loss written out here, the model called directly, `tape.jacobian`
instead of Hessian-vector products), and the per-example gradient
statistics against a loop of single-example tapes, each on an MLP and on a
batch-norm ResNet. The objective's value, gradient and metrics are checked
against numpy, and the fixed examples' padding and validation directly.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import models
from tfcapacity.curvature import eigen
from tfcapacity.curvature import hvp
from tfcapacity.errors import UserError
from tfcapacity.gradients import per_example
from tfcapacity.gradients import statistics
from tfcapacity.models import layers as layers_lib
from tfcapacity.objective import examples as examples_lib
from tfcapacity.objective import function as function_lib
from tfcapacity.objective import losses
from tfcapacity.objective import objective as objective_lib

CLASSES = 3
# name, builder options, input shape, batch-norm mode of the Hessian.
MODELS = {
    "mlp": ("mlp", dict(width=6, depth=2, activation="tanh"), (5,),
            "inference"),
    "bn_resnet": ("resnet", dict(width=2, depth=8, normalization="batch"),
                  (4, 4, 1), "batch"),
}


def build(key, dtype="float32", seed=0):
  name, options, shape, _ = MODELS[key]
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy(dtype)
  try:
    keras.utils.set_random_seed(seed)
    return models.get(name, input_shape=shape, num_classes=CLASSES,
                      **options)
  finally:
    keras.config.set_dtype_policy(previous)


def data(key, n=8, seed=1):
  shape = MODELS[key][2]
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *shape)).astype(np.float32)
  y = rng.integers(0, CLASSES, size=n)
  return x, y


def float64_copy(model, key):
  """The same network in float64, holding `model`'s values."""
  twin = build(key, "float64", seed=123)
  for a, b in zip(twin.weights, model.weights):
    a.assign(b.numpy().astype(np.float64))
  return twin


def squared_by_hand(z, y):
  """1/2 ||z - onehot(y)||^2 per example, written out (float64)."""
  target = tf.one_hot(y, CLASSES, dtype=z.dtype)
  return 0.5 * tf.reduce_sum((z - target) ** 2, axis=-1)


def dense_hessian64(model64, x, y, training):
  """The Hessian of the mean squared loss over all trainable variables."""
  params = model64.trainable_variables
  x64 = tf.constant(x, tf.float64)

  @tf.function
  def hessian():
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        loss = tf.reduce_mean(squared_by_hand(model64(x64, training=training),
                                              y))
      grad = tf.concat([tf.reshape(g, [-1])
                        for g in inner.gradient(loss, params)], 0)
    jac = outer.jacobian(grad, params, experimental_use_pfor=False)
    return tf.concat([tf.reshape(j, [grad.shape[0], -1]) for j in jac], 1)

  state = [v.numpy().copy() for v in model64.variables]
  dense = hessian().numpy()
  for v, s in zip(model64.variables, state):  # Training mode moved BN stats.
    v.assign(s)
  return dense


@pytest.mark.parametrize("key", sorted(MODELS))
def test_squared_loss_top_eigenvalues_equal_a_float64_dense_hessian(key):
  model = build(key)
  x, y = data(key, n=6)
  bn_mode = MODELS[key][3]
  op = hvp.HessianOperator(model, x, y, loss="squared", bn_mode=bn_mode)
  assert op.describe()["loss"] == "squared"
  dense = dense_hessian64(float64_copy(model, key), x, y,
                          training=bn_mode != "inference")
  assert dense.shape == (op.size, op.size)
  want = np.sort(np.linalg.eigvalsh((dense + dense.T) / 2))[::-1][:3]
  got = eigen.lanczos_top_k(op, 3, num_steps=min(op.size, 80), seed=0)
  np.testing.assert_allclose(got.eigenvalues, want, rtol=1e-4)
  # The same loss under cross-entropy has another spectrum: the loss is used.
  other = eigen.lanczos_top_k(
      hvp.HessianOperator(model, x, y, bn_mode=bn_mode), 1,
      num_steps=min(op.size, 80), seed=0)
  assert abs(other.eigenvalues[0] - want[0]) > 1e-2 * want[0]


def looped_gradients(model, x, y):
  """Each example's squared-loss gradient by its own tape (inference)."""
  rows = []
  for xi, yi in zip(x, y):
    with tf.GradientTape() as tape:
      z = tf.cast(model(xi[None], training=False), tf.float64)
      loss = squared_by_hand(z, np.array([yi]))[0]
    grads = tape.gradient(loss, model.trainable_variables)
    rows.append(np.concatenate([np.ravel(g.numpy()) for g in grads]))
  return np.asarray(rows, np.float64)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_squared_loss_per_example_statistics_equal_a_loop_of_tapes(key):
  model = build(key)
  x, y = data(key, n=7)
  if key == "bn_resnet":  # Statistics that are not the identity map.
    function_lib.recompute_batch_norm(model, x)
  rows = looped_gradients(model, x, y)
  got = per_example.per_example_gradients(model, x, y, loss="squared",
                                          chunk_size=4)  # 2 chunks, padded.
  scale = np.abs(rows).max()
  np.testing.assert_allclose(got.matrix, rows, rtol=0, atol=1e-4 * scale)
  gram = per_example.gradient_inner_products(model, x, y, loss="squared",
                                             chunk_size=4)
  want = rows @ rows.T
  np.testing.assert_allclose(gram, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
  got_stats = statistics.summarize(gram)
  want_stats = statistics.summarize(want)
  for name in ("gradient_confusion", "min_inner_product", "mean_inner_product",
               "gradient_diversity"):
    np.testing.assert_allclose(got_stats[name], want_stats[name], rtol=1e-4,
                               atol=1e-4 * np.abs(want).max(), err_msg=name)
  for name in ("min_cosine", "mean_cosine"):
    np.testing.assert_allclose(got_stats[name], want_stats[name], atol=1e-4,
                               err_msg=name)
  ce = per_example.per_example_gradients(model, x, y, chunk_size=4)
  assert np.abs(ce.matrix - rows).max() > 1e-2 * scale  # Another loss.


def test_objective_value_gradient_and_metrics_equal_numpy():
  model = build("mlp")
  x, y = data("mlp", n=11)
  obj = objective_lib.Objective(model, x, y, loss="squared", batch_size=4,
                                weight_decay=0.01)
  assert obj.examples.num_batches == 3  # 11 examples: the last one padded.
  z = model(x, training=False).numpy().astype(np.float64)
  onehot = np.eye(CLASSES)[y]
  data_loss = np.mean(0.5 * np.sum((z - onehot) ** 2, axis=1))
  kernels = [v.numpy() for v in model.trainable_variables
             if v.path.endswith("kernel")]
  penalty = 0.005 * sum(np.sum(k.astype(np.float64) ** 2) for k in kernels)
  value, grad = obj.value_and_gradient()
  assert value == pytest.approx(data_loss + penalty, rel=1e-5)
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(squared_by_hand(
        tf.cast(model(x, training=False), tf.float64), y))
    loss += tf.cast(losses.l2_penalty(model, 0.01), tf.float64)
  want = np.concatenate([np.ravel(g) for g in
                         tape.gradient(loss, model.trainable_variables)])
  np.testing.assert_allclose(grad.numpy(), want, rtol=1e-4, atol=1e-6)
  metrics = obj.metrics()
  ranks = (z > z[np.arange(len(y)), y][:, None]).sum(axis=1)
  assert metrics["loss"] == pytest.approx(data_loss, rel=1e-5)
  assert metrics["top1_error"] == pytest.approx(np.mean(ranks >= 1))
  assert metrics["top5_error"] == 0.0  # 3 classes: top-3 always hits.
  # At other weights, without changing the model.
  before = [v.numpy().copy() for v in model.variables]
  shifted = obj.parameters() + 0.1
  assert obj.value_and_gradient(shifted)[0] != pytest.approx(value)
  for v, b in zip(model.variables, before):
    np.testing.assert_array_equal(v.numpy(), b)
  assert obj.trace_counts()["value_and_gradient"] == 1


def test_losses_registry_and_the_squared_loss():
  z = tf.constant([[1.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
  y = tf.constant([1, 2])
  np.testing.assert_allclose(losses.get("squared")(y, z).numpy(),
                             [0.5 * (1 + 1 + 1), 0.5 * 1])
  np.testing.assert_allclose(
      losses.get("cross_entropy")(y, z).numpy(),
      -np.log(np.exp([2.0, 0.0]) / np.exp(z.numpy()).sum(axis=1)), rtol=1e-6)
  with pytest.raises(UserError, match="unknown loss 'hinge'; choose one of: "
                     "cross_entropy, squared"):
    losses.get("hinge")


def test_fixed_examples_pad_with_zero_weights_and_check_their_input():
  x = np.arange(10, dtype=np.float32).reshape(5, 2)
  y = np.array([0, 1, 2, 0, 1])
  ex = examples_lib.FixedExamples(x, y, batch_size=2)
  xs, ys, ws = (v.numpy() for v in ex.data)
  assert xs.shape == (3, 2, 2) and ws.tolist() == [[1, 1], [1, 1], [1, 0]]
  np.testing.assert_array_equal(xs.reshape(6, 2)[:5], x)
  with pytest.raises(UserError, match="needs 5 examples of shape"):
    ex.assign(x[:4], y[:4])
  bad = x.copy()
  bad[1, 0] = np.nan
  with pytest.raises(UserError, match="NaN or Inf"):
    examples_lib.FixedExamples(bad, y)
  with pytest.raises(UserError, match="non-negative class indices"):
    examples_lib.FixedExamples(x, -y - 1)
  with pytest.raises(UserError, match="--bn_mode=batch: the batch size 2 "
                     "must divide the 5 examples"):
    examples_lib.FixedExamples(x, y, batch_size=2,
                               full_batches="--bn_mode=batch")


def test_recomputed_batch_norm_makes_inference_equal_one_training_batch():
  model = build("bn_resnet")
  x, _ = data("bn_resnet", n=12)
  wanted = model(x, training=True).numpy()  # Moves the moving statistics.
  assert function_lib.recompute_batch_norm(model, x, batch_size=5) == len(
      layers_lib.batch_norm_layers(model))
  np.testing.assert_allclose(model(x, training=False).numpy(), wanted,
                             rtol=1e-4, atol=1e-5)
