"""Hessian-vector products against dense Hessians computed another way."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import models
from tfcapacity.curvature import hvp
from tfcapacity.errors import UserError
from tfcapacity.models import layers as layers_lib
from tfcapacity.objective import function as function_lib
import conftest  # tests/ is on sys.path (pytest rootdir conftest)


def make_model(name, input_shape, seed=0, **overrides):
  keras.utils.set_random_seed(seed)
  kwargs = {**models.tiny_kwargs(name), **overrides}
  return models.get(name, input_shape=input_shape, num_classes=3, **kwargs)


def make_data(n, input_shape, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *input_shape)).astype(np.float32)
  y = rng.integers(0, 3, size=n)
  return x, y


def snapshot(model):
  return [v.numpy().copy() for v in model.variables]


def reference_hessian(model, x, y, batch_size, training, params,
                      ghost="keep"):
  """d2/dp2 of sum over batches of (n_b / n) mean_b loss, by jacobian.

  Calls the model directly (which may move batch-norm statistics; they are
  restored afterwards). `ghost=None` makes ghost layers use whole batches.
  """
  state = snapshot(model)
  saved = {}
  if ghost != "keep":
    for layer in model.layers:
      if isinstance(layer, layers_lib.GhostBatchNormalization):
        saved[layer] = layer.ghost_batch_size
        layer.ghost_batch_size = ghost
  n = len(y)
  targets = [p.value for p in params]

  @tf.function  # A graph while-loop over rows: far faster than eager.
  def dense_and_loss():
    with tf.GradientTape(persistent=True) as outer:
      outer.watch(targets)  # Non-trainable ones (slopes) too.
      with tf.GradientTape() as inner:
        inner.watch(targets)
        loss = 0.0
        for s in range(0, n, batch_size):
          logits = model(x[s:s + batch_size], training=training)
          loss += tf.reduce_sum(
              tf.nn.sparse_softmax_cross_entropy_with_logits(
                  y[s:s + batch_size], logits)) / n
      grad = function_lib.flatten(inner.gradient(loss, targets))
    jac = outer.jacobian(grad, targets, experimental_use_pfor=False)
    return tf.concat([tf.reshape(j, [grad.shape[0], -1]) for j in jac],
                     axis=1), loss

  dense, loss = dense_and_loss()
  dense = dense.numpy()
  for layer, size in saved.items():
    layer.ghost_batch_size = size
  for var, value in zip(model.variables, state):
    var.assign(value)
  return dense, float(loss)


def assert_close(actual, expected, tol=1e-5):
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


CASES = [
    # name, model options, bn_mode, input shape, batch, layers (None: all)
    ("mlp", dict(width=5, depth=2, activation="tanh"), "inference", (4,), 5,
     None),
    ("mlp", dict(width=5, depth=1, activation="softplus",
                 normalization="batch"), "batch", (4,), 6, None),
    ("mlp", dict(width=5, depth=1, activation="tanh", normalization="ghost",
                 ghost_batch_size=3), "ghost", (4,), 6, None),
    ("mlp", dict(width=5, depth=1, activation="tanh", normalization="batch"),
     "inference", (4,), 4, None),
    ("fc_resnet", dict(width=4, depth=2, activation="softplus"), "inference",
     (4,), 5, None),
    ("fc_resnet", dict(width=4, depth=2, activation="tanh",
                       normalization="batch"), "batch", (4,), 6, None),
    ("resnet", dict(normalization="ghost", ghost_batch_size=3), "ghost",
     (6, 6, 1), 6, ["stage1_block1_norm1", "classifier"]),
    ("resnet", dict(normalization="ghost", ghost_batch_size=3), "batch",
     (6, 6, 1), 6, ["stage3_block1_norm2", "classifier"]),
    ("resnet", dict(normalization="batch"), "inference", (6, 6, 1), 4,
     ["stage1_block1_conv1", "classifier"]),
]


@pytest.mark.parametrize("name,options,bn_mode,shape,batch,block", CASES)
def test_hvp_equals_dense_hessian_and_leaves_model_alone(
    name, options, bn_mode, shape, batch, block):
  model = make_model(name, shape, **options)
  x, y = make_data(12, shape)
  # Move the moving statistics away from their initial values first.
  for _ in range(3):
    model(x * 1.5 + 0.3, training=True)
  params = function_lib.select_params(model, block)
  before = snapshot(model)
  op = hvp.HessianOperator(model, x, y, bn_mode=bn_mode, batch_size=batch,
                           params=params)
  dense = op.dense()
  for actual, expected in zip(snapshot(model), before):
    np.testing.assert_array_equal(actual, expected)  # Weights and BN stats.
  training = bn_mode != "inference"
  ghost = None if bn_mode == "batch" else "keep"
  expected, loss = reference_hessian(model, x, y, batch, training, params,
                                     ghost=ghost)
  assert dense.shape == (op.size, op.size)
  assert_close(dense, expected)
  assert_close(dense, dense.T)
  forward = hvp.HessianOperator(model, x, y, bn_mode=bn_mode,
                                batch_size=batch, params=params,
                                method="forward")
  v = np.random.default_rng(2).normal(size=op.size).astype(np.float32)
  assert_close(forward.matvec(v).numpy(), op.matvec(v).numpy())
  assert op.loss_and_gradient()[0] == pytest.approx(loss, rel=1e-5)
  for actual, expected in zip(snapshot(model), before):
    np.testing.assert_array_equal(actual, expected)


def test_padded_last_batch_gives_the_mean_over_all_examples():
  model = make_model("mlp", (4,), width=5, depth=1, activation="tanh")
  x, y = make_data(11, (4,))
  whole, _ = reference_hessian(model, x, y, 11, False,
                               model.trainable_variables)
  op = hvp.HessianOperator(model, x, y, batch_size=4)  # 4 + 4 + 3 (padded)
  assert_close(op.dense(), whole)


def test_no_retracing_across_vectors_and_weights():
  model = make_model("mlp", (4,), width=5, depth=1)
  x, y = make_data(10, (4,))
  op = hvp.HessianOperator(model, x, y, batch_size=5)
  rng = np.random.default_rng(0)
  first = op.matvec(rng.normal(size=op.size).astype(np.float32))
  for var in model.trainable_variables:  # New weights, same function.
    var.assign(var.numpy() + 0.1)
  second = op.matvec(rng.normal(size=op.size).astype(np.float32))
  op.matvec(tf.ones([op.size]))
  op.loss_and_gradient()
  op.loss_and_gradient()
  assert op.traces == 1
  assert op.objective.trace_counts()["value_and_gradient"] == 1
  assert not np.allclose(first.numpy(), second.numpy())


def test_a_block_is_the_submatrix_of_the_full_hessian():
  model = make_model("mlp", (4,), width=5, depth=2, activation="tanh")
  x, y = make_data(9, (4,))
  full = hvp.HessianOperator(model, x, y).dense()
  block = function_lib.select_params(model, ["hidden_1"])
  sub = hvp.HessianOperator(model, x, y, params=block).dense()
  names = [v.path for v in model.trainable_variables]
  offsets = np.cumsum([0] + [int(np.prod(v.shape))
                             for v in model.trainable_variables])
  index = np.concatenate([np.arange(offsets[i], offsets[i + 1])
                          for i, n in enumerate(names) if "hidden_1/" in n])
  assert len(index) == sub.shape[0] == 5 * 5 + 5
  assert_close(sub, full[np.ix_(index, index)])


def test_weight_decay_adds_its_diagonal_on_kernels_only():
  model = make_model("mlp", (4,), width=3, depth=1, activation="tanh")
  x, y = make_data(8, (4,))
  plain = hvp.HessianOperator(model, x, y).dense()
  decayed = hvp.HessianOperator(model, x, y, weight_decay=0.5)
  mask = np.concatenate([np.full(int(np.prod(v.shape)),
                                 1.0 if v.path.endswith("kernel") else 0.0)
                         for v in model.trainable_variables])
  assert_close(decayed.dense(), plain + 0.5 * np.diag(mask))
  loss, grad = decayed.loss_and_gradient()
  theta = decayed.parameters().numpy()
  plain_loss, plain_grad = hvp.HessianOperator(model, x, y
                                               ).loss_and_gradient()
  assert loss == pytest.approx(plain_loss + 0.25 * np.sum(mask * theta**2),
                               rel=1e-6)
  assert_close(grad.numpy(), plain_grad.numpy() + 0.5 * mask * theta)


def test_slopes_are_coordinates_of_the_product():
  model = make_model("resnet", (6, 6, 1), normalization="none",
                     activation="leaky_relu", leaky_slope=0.2)
  x, y = make_data(6, (6, 6, 1))
  params = function_lib.select_params(model, ["classifier", "stage3_block1_act1",
                                     "stage3_block1_act2"],
                             include_slopes=True)
  slopes = [p for p in params if p.path.endswith("slope")]
  assert len(slopes) == 2 and len(params) == 4
  op = hvp.HessianOperator(model, x, y, params=params)
  expected, _ = reference_hessian(model, x, y, 6, False, params)
  assert np.abs(expected[-2:]).max() > 1e-3  # The slopes do matter.
  assert_close(op.dense(), expected)


def test_two_replicas_equal_one_device():
  x, y = make_data(16, (6, 6, 1))
  strategy = conftest.two_replicas()
  with strategy.scope():
    mirrored = make_model("resnet", (6, 6, 1), normalization="ghost",
                          ghost_batch_size=4)
  single = make_model("resnet", (6, 6, 1), normalization="ghost",
                      ghost_batch_size=4)
  for a, b in zip(single.variables, mirrored.variables):
    a.assign(b.numpy())
  v = np.random.default_rng(3).normal(
      size=sum(int(np.prod(p.shape)) for p in single.trainable_variables)
  ).astype(np.float32)
  for bn_mode, batch in [("inference", 6), ("ghost", 8)]:
    one = hvp.HessianOperator(single, x, y, bn_mode=bn_mode,
                              batch_size=batch)
    two = hvp.HessianOperator(mirrored, x, y, bn_mode=bn_mode,
                              batch_size=batch, strategy=strategy)
    assert two.describe()["num_replicas"] == 2
    assert_close(two.matvec(v).numpy(), one.matvec(v).numpy())
    assert two.loss_and_gradient()[0] == pytest.approx(
        one.loss_and_gradient()[0], rel=1e-5)


def test_saved_model_products_equal_the_keras_model(tmp_path):
  model = make_model("mlp", (4,), width=5, depth=1, activation="tanh",
                     normalization="batch")
  x, y = make_data(10, (4,))
  model(x, training=True)
  path = str(tmp_path / "saved")
  model.export(path, format="tf_saved_model", verbose=False)
  loaded = tf.saved_model.load(path)
  v = np.random.default_rng(4).normal(
      size=sum(int(np.prod(p.shape)) for p in model.trainable_variables)
  ).astype(np.float32)
  keras_op = hvp.HessianOperator(model, x, y, batch_size=4)
  saved_op = hvp.HessianOperator(loaded, x, y, batch_size=4)
  assert saved_op.size == keras_op.size
  assert_close(saved_op.matvec(v).numpy(), keras_op.matvec(v).numpy())
  before = [var.numpy().copy() for var in loaded.variables]
  loss, _ = saved_op.loss_and_gradient(saved_op.parameters() + 0.01)
  assert loss != pytest.approx(saved_op.loss_and_gradient()[0])
  for var, value in zip(loaded.variables, before):
    np.testing.assert_array_equal(var.numpy(), value)
  with pytest.raises(UserError, match="needs a Keras model"):
    hvp.HessianOperator(loaded, x, y, bn_mode="batch")


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(bn_mode="train"), "unknown --bn_mode"),
    (dict(method="exact"), "unknown --method"),
    (dict(bn_mode="ghost"), "needs --ghost_batch_size"),
    (dict(bn_mode="batch", batch_size=4), "must divide"),
    (dict(bn_mode="ghost", ghost_batch_size=3, batch_size=5),
     "does not divide"),
])
def test_bad_options(kwargs, fragment):
  model = make_model("mlp", (4,), width=3, depth=1, normalization="batch")
  x, y = make_data(10, (4,))
  with pytest.raises(UserError, match=fragment):
    hvp.HessianOperator(model, x, y, **kwargs)


def test_unknown_layer_names_the_choices():
  model = make_model("mlp", (4,), width=3, depth=1)
  with pytest.raises(UserError, match="no layer named 'hiden_0'"):
    function_lib.select_params(model, ["hiden_0"])


def test_set_examples_reuses_the_trace_and_equals_a_fresh_operator():
  model = make_model("mlp", (4,), width=5, depth=1, activation="tanh")
  x, y = make_data(10, (4,))
  x2, y2 = make_data(10, (4,), seed=7)
  op = hvp.HessianOperator(model, x, y, batch_size=4)
  v = np.random.default_rng(5).normal(size=op.size).astype(np.float32)
  first = op.matvec(v).numpy()
  op.set_examples(x2, y2)
  assert_close(op.matvec(v).numpy(),
               hvp.HessianOperator(model, x2, y2, batch_size=4
                                   ).matvec(v).numpy())
  op.set_examples(x, y)
  assert_close(op.matvec(v).numpy(), first)
  assert op.traces == 1
  with pytest.raises(UserError, match="set_examples needs 10 examples"):
    op.set_examples(x2[:8], y2[:8])
