"""Per-example gradients against a loop of single-example tapes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import models
from tfcapacity.errors import UserError
from tfcapacity.gradients import per_example
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

CASES = {
    "mlp": ((5,), dict(activation="tanh")),
    "fc_resnet": ((5,), {}),
    "resnet": ((6, 6, 1), dict(normalization="batch")),
}


def make_model(name, seed=0):
  shape, overrides = CASES[name]
  keras.utils.set_random_seed(seed)
  model = models.get(name, input_shape=shape, num_classes=3,
                     **{**models.tiny_kwargs(name), **overrides})
  return model, shape


def make_data(n, shape, seed=1):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, *shape)).astype(np.float32),
          rng.integers(0, 3, size=n))


def reference(model, x, y):
  rows = []
  for i in range(len(y)):
    with tf.GradientTape() as tape:
      logits = model(x[i:i + 1], training=False)
      loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=y[i:i + 1].astype(np.int32), logits=logits)[0]
    grads = tape.gradient(loss, model.trainable_variables)
    rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
  return np.stack(rows)


def assert_close(a, b, tol=1e-6):
  np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_example_tapes(name):
  model, shape = make_model(name)
  x, y = make_data(10, shape)
  before = [v.numpy().copy() for v in model.variables]
  expected = reference(model, x, y)
  result = per_example.per_example_gradients(model, x, y)
  # Dense, Conv2D and batch norm: one batched pass, no vectorized_map.
  assert per_example.get_computation(model, shape).batched_paths == [
      v.path for v in model.trainable_variables]
  assert result.matrix.shape == expected.shape
  assert not result.projected and result.dim == expected.shape[1]
  assert_close(result.matrix, expected)
  small = per_example.per_example_gradients(model, x, y, chunk_size=4)
  assert_close(small.matrix, expected)
  # Layer slices tile the columns in the variables' order.
  slices = result.layer_slices
  assert [s[0] for s in slices] == [v.path for v in model.trainable_variables]
  assert slices[0][1] == 0 and slices[-1][2] == expected.shape[1]
  assert all(a[2] == b[1] for a, b in zip(slices, slices[1:]))
  # Other data of the same shape: no retrace; the model is unchanged.
  x2, y2 = make_data(10, shape, seed=7)
  assert_close(per_example.per_example_gradients(model, x2, y2,
                                                 chunk_size=4).matrix,
               reference(model, x2, y2))
  computation = per_example.get_computation(model, shape, chunk_size=4)
  assert computation.traces == 1
  for v, b in zip(model.variables, before):
    np.testing.assert_array_equal(v.numpy(), b)


def test_inner_products_and_per_layer():
  model, shape = make_model("mlp")
  x, y = make_data(10, shape)
  m = per_example.per_example_gradients(model, x, y).matrix.astype(np.float64)
  gram, layers = per_example.gradient_inner_products(
      model, x, y, chunk_size=4, per_layer=True)
  assert gram.dtype == np.float64 and gram.shape == (10, 10)
  assert_close(gram, m @ m.T)
  assert set(layers) == {v.path for v in model.trainable_variables}
  assert_close(sum(layers.values()), gram)
  # Chunks recomputed instead of kept: the same answer.
  computation = per_example.get_computation(model, shape, chunk_size=4)
  assert_close(computation.inner_products(x, y, resident_bytes=0), gram)


def test_selected_params():
  model, shape = make_model("mlp")
  x, y = make_data(6, shape)
  full = per_example.per_example_gradients(model, x, y)
  params = model.trainable_variables[-2:]
  part = per_example.per_example_gradients(model, x, y, params=params)
  start = full.layer_slices[-2][1]
  assert_close(part.matrix, full.matrix[:, start:])


def test_projection_preserves_inner_products():
  model, shape = make_model("mlp")
  x, y = make_data(10, shape)
  exact = per_example.gradient_inner_products(model, x, y)

  def error(d, seed=0):
    g = per_example.gradient_inner_products(model, x, y, projection_dim=d,
                                            seed=seed)
    return np.linalg.norm(g - exact) / np.linalg.norm(exact)

  big = [error(4096, s) for s in range(3)]
  small = [error(64, s) for s in range(3)]
  assert max(big) < 0.1
  assert np.mean(big) < np.mean(small)
  a = per_example.per_example_gradients(model, x, y, projection_dim=64,
                                        seed=3)
  b = per_example.per_example_gradients(model, x, y, projection_dim=64,
                                        seed=3, chunk_size=4)
  c = per_example.per_example_gradients(model, x, y, projection_dim=64,
                                        seed=4)
  assert a.projected and a.dim == 64 and a.layer_slices is None
  np.testing.assert_allclose(a.matrix, b.matrix, rtol=1e-5, atol=1e-6)
  assert not np.allclose(a.matrix, c.matrix)
  with pytest.raises(UserError, match="projection"):
    per_example.gradient_inner_products(model, x, y, projection_dim=64,
                                        per_layer=True)


def test_projection_in_blocks(monkeypatch):
  """A projection generated in several blocks is still a fixed linear map."""
  monkeypatch.setattr(per_example, "_PROJECTION_BLOCK_ENTRIES", 64 * 16)
  model, shape = make_model("mlp")
  x, y = make_data(6, shape)
  computation = per_example.PerExampleGradients(model, shape,
                                                projection_dim=64)
  m = per_example.per_example_gradients(model, x, y).matrix
  assert computation.size > 16
  twice = computation(np.concatenate([x, x]), np.concatenate([y, y])).matrix
  p = computation(x, y).matrix
  np.testing.assert_allclose(twice[:6], p)
  np.testing.assert_allclose(twice[6:], p)
  # Linear in the gradient: p = m R, so least squares recovers R consistently.
  r, *_ = np.linalg.lstsq(m, p, rcond=None)
  np.testing.assert_allclose(m @ r, p, atol=1e-4 * np.abs(p).max())


def test_batch_mode_refused():
  model, shape = make_model("resnet")
  x, y = make_data(4, shape)
  with pytest.raises(UserError, match="single example"):
    per_example.per_example_gradients(model, x, y, bn_mode="batch")
  with pytest.raises(UserError, match="unknown"):
    per_example.per_example_gradients(model, x, y, bn_mode="nope")


def test_two_replicas_equal_one_device():
  strategy = conftest.two_replicas()
  with strategy.scope():
    model, shape = make_model("mlp")
  x, y = make_data(9, shape)
  expected = reference(model, x, y)
  result = per_example.per_example_gradients(model, x, y, chunk_size=4,
                                             strategy=strategy)
  assert_close(result.matrix, expected)
  projected = per_example.per_example_gradients(
      model, x, y, chunk_size=4, strategy=strategy, projection_dim=32)
  single = per_example.PerExampleGradients(
      model, shape, chunk_size=4, projection_dim=32,
      strategy=tf.distribute.get_strategy())
  np.testing.assert_allclose(projected.matrix, single(x, y).matrix,
                             rtol=1e-5, atol=1e-6)


def reference_jacobians(model, x):
  """[n, C, P]: d logit_c(x_i) / d theta by a loop of single-example tapes."""
  out = []
  for i in range(len(x)):
    rows = []
    for c in range(3):
      with tf.GradientTape() as tape:
        logit = model(x[i:i + 1], training=False)[0, c]
      grads = tape.gradient(logit, model.trainable_variables)
      rows.append(np.concatenate([
          np.zeros(v.shape).ravel() if g is None else g.numpy().ravel()
          for g, v in zip(grads, model.trainable_variables)]))
    out.append(rows)
  return np.asarray(out)


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_logit_jacobian_gram_is_the_ntk(name):
  model, shape = make_model(name)
  x, y = make_data(7, shape)
  jac = reference_jacobians(model, x)
  expected = np.einsum("icp,jcp->ij", jac, jac)
  ntk, layers = per_example.gradient_inner_products(
      model, x, y, chunk_size=3, output="logits", per_layer=True)
  assert_close(ntk, expected)
  # Each variable's block: its own columns of every class's Jacobian.
  start = 0
  for v in model.trainable_variables:
    size = int(np.prod(v.shape))
    block = jac[:, :, start:start + size]
    assert_close(layers[v.path], np.einsum("icp,jcp->ij", block, block))
    start += size


def test_saved_model_matches_keras(tmp_path):
  model, shape = make_model("mlp")
  x, y = make_data(6, shape)
  model.export(str(tmp_path / "sm"), format="tf_saved_model", verbose=False)
  restored = tf.saved_model.load(str(tmp_path / "sm"))
  expected = reference(model, x, y)
  gram = per_example.gradient_inner_products(restored, x, y, chunk_size=4)
  assert_close(gram, expected @ expected.T)
  ntk = per_example.gradient_inner_products(restored, x, y, chunk_size=4,
                                            output="logits")
  jac = reference_jacobians(model, x)
  assert_close(ntk, np.einsum("icp,jcp->ij", jac, jac))


def mixed_model(seed=0):
  """Conv + batch norm, a Dense on a sequence, a fused-activation Dense, a
  Dense applied twice, and a classifier: every path of the fast-path test."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((6, 6, 1))
  h = keras.layers.Conv2D(3, 3, name="conv")(inputs)
  h = keras.layers.BatchNormalization(name="bn")(h)
  h = keras.layers.Activation("relu")(h)
  # Uneven strides and kernel with "same" padding; dilation; a fused tanh.
  h = keras.layers.Conv2D(3, (2, 3), strides=(2, 1), padding="same",
                          name="strided")(h)
  h = keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same",
                          activation="tanh", name="dilated")(h)
  h = keras.layers.Reshape((8, 3))(h)
  h = keras.layers.Dense(2, name="per_position")(h)  # rank 3: vmap path
  h = keras.layers.Flatten()(h)
  h = keras.layers.Dense(5, activation="tanh", name="fused")(h)
  shared = keras.layers.Dense(5, name="shared")  # applied twice: vmap path
  h = shared(keras.layers.Activation("tanh")(shared(h)))
  logits = keras.layers.Dense(3, name="classifier")(h)
  model = keras.Model(inputs, logits)
  # Moving statistics away from 0 and 1, so inference mode matters.
  bn = model.get_layer("bn")
  bn.moving_mean.assign([0.3, -0.2, 0.1])
  bn.moving_variance.assign([2.0, 0.5, 1.5])
  return model, (6, 6, 1)


def gram_reference(model, x, y, output):
  """G (and per-variable G_l) from the loop of single-example tapes."""
  if output == "loss":
    m = reference(model, x, y)[:, None, :]
  else:
    m = reference_jacobians(model, x)
  layers, start = {}, 0
  for v in model.trainable_variables:
    size = int(np.prod(v.shape))
    block = m[:, :, start:start + size]
    layers[v.path] = np.einsum("icp,jcp->ij", block, block)
    start += size
  return np.einsum("icp,jcp->ij", m, m), layers


@pytest.mark.parametrize("name,output", [
    ("mlp", "loss"), ("fc_resnet", "loss"), ("fc_resnet", "logits"),
    ("mixed", "loss"), ("mixed", "logits"), ("mlp_bn", "loss")])
def test_dense_fast_path_matches_single_example_tapes(name, output,
                                                     monkeypatch):
  if name == "mixed":
    model, shape = mixed_model()
  elif name == "mlp_bn":  # Dense without bias, then batch norm.
    keras.utils.set_random_seed(0)
    shape = (5,)
    model = models.get("mlp", input_shape=shape, num_classes=3, width=8,
                       depth=2, normalization="batch")
  else:
    model, shape = make_model(name)
  x, y = make_data(10, shape)
  computation = per_example.get_computation(model, shape, chunk_size=4,
                                            output=output)
  if name == "mixed":
    assert computation.dense_paths == [
        "fused/kernel", "fused/bias", "classifier/kernel", "classifier/bias"]
    assert computation.batched_paths == [
        "conv/kernel", "conv/bias", "bn/gamma", "bn/beta", "strided/kernel",
        "strided/bias", "dilated/kernel", "dilated/bias",
        *computation.dense_paths]
  else:
    assert computation.dense_paths == [
        v.path for v in model.trainable_variables if "norm" not in v.path]
  expected, expected_layers = gram_reference(model, x, y, output)
  gram, layers = per_example.gradient_inner_products(
      model, x, y, chunk_size=4, per_layer=True, output=output)
  assert gram.dtype == np.float64
  assert_close(gram, expected)
  assert list(layers) == [v.path for v in model.trainable_variables]
  for path, g in layers.items():
    assert_close(g, expected_layers[path])
  assert_close(per_example.gradient_inner_products(
      model, x, y, chunk_size=4, output=output), expected)
  if name == "fc_resnet":
    # One chunk holding everything; chunks recomputed instead of kept.
    assert_close(per_example.gradient_inner_products(
        model, x, y, chunk_size=16, output=output), expected)
    assert_close(computation.inner_products(x, y, resident_bytes=0),
                 expected)
    # Chunk by chunk instead of joined; kept or recomputed.
    monkeypatch.setattr(per_example, "_JOIN_BYTES", 0)
    for resident in (0, 1 << 30):
      gram, layers = computation.inner_products(
          x, y, per_layer=True, resident_bytes=resident)
      assert_close(gram, expected)
      for path, g in layers.items():
        assert_close(g, expected_layers[path])
  # The rows themselves (outer products of the same factors).
  if output == "loss":
    rows = per_example.per_example_gradients(model, x, y, chunk_size=4)
    assert_close(rows.matrix, reference(model, x, y))


def test_dense_fast_path_selected_params():
  model, shape = mixed_model()
  x, y = make_data(6, shape)
  params = [model.get_layer("classifier").kernel,
            model.get_layer("bn").gamma, model.get_layer("fused").bias]
  computation = per_example.get_computation(model, shape, params=params)
  assert computation.dense_paths == ["classifier/kernel", "fused/bias"]
  gram, layers = per_example.gradient_inner_products(
      model, x, y, params=params, per_layer=True)
  _, expected = gram_reference(model, x, y, "loss")
  assert list(layers) == [p.path for p in params]
  for p in params:
    assert_close(layers[p.path], expected[p.path])
  assert_close(gram, sum(expected[p.path] for p in params))


@pytest.mark.parametrize("name,outputs", [
    ("fc_resnet", per_example.OUTPUTS), ("resnet", ("loss",))])
def test_batched_path_two_replicas(name, outputs):
  strategy = conftest.two_replicas()
  with strategy.scope():
    model, shape = make_model(name)
  x, y = make_data(9, shape)
  for output in outputs:
    expected, expected_layers = gram_reference(model, x, y, output)
    gram, layers = per_example.gradient_inner_products(
        model, x, y, chunk_size=4, strategy=strategy, per_layer=True,
        output=output)
    assert_close(gram, expected)
    for path, g in layers.items():
      assert_close(g, expected_layers[path])


def test_while_loop_fallback_reported_once(monkeypatch, caplog):
  monkeypatch.setattr(per_example, "_REPORTED_FALLBACKS", set())
  # A Conv1D is not on the batched path: vectorized_map meets TF's
  # Conv2DBackpropFilter (Conv1D runs as a 2-D convolution).
  keras.utils.set_random_seed(0)
  inputs = keras.Input((8, 2))
  h = keras.layers.Flatten()(keras.layers.Conv1D(3, 3)(inputs))
  model = keras.Model(inputs, keras.layers.Dense(3)(h))
  x, y = make_data(4, (8, 2))
  caplog.set_level("WARNING")
  for chunk_size in (2, 4):  # Two traces; one line.
    computation = per_example.PerExampleGradients(model, (8, 2),
                                                  chunk_size=chunk_size)
    assert_close(computation(x, y).matrix, reference(model, x, y))
  lines = [r.getMessage() for r in caplog.records
           if "while_loop" in r.getMessage()]
  assert len(lines) == 1, lines
  assert "Conv2DBackpropFilter" in lines[0] and "slower" in lines[0]
  assert caplog.records[0].name == "absl"


class _Tied(keras.layers.Layer):
  """x W^T with the kernel W of another Dense layer (weight tying)."""

  def __init__(self, dense, **kwargs):
    super().__init__(**kwargs)
    self.dense = dense

  def call(self, x):
    return keras.ops.matmul(x, keras.ops.transpose(self.dense.kernel))


def test_tied_kernel_keeps_the_vmap_path():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,))
  encoder = keras.layers.Dense(3, activation="tanh", name="encoder")
  h = _Tied(encoder, name="tied")(encoder(inputs))
  model = keras.Model(inputs, keras.layers.Dense(3, name="classifier")(h))
  x, y = make_data(6, (4,))
  computation = per_example.get_computation(model, (4,))
  # The encoder's kernel has two uses: a probe at its output would see one.
  # (The tying layer holds the whole encoder, so its bias stays there too.)
  assert computation.batched_paths == ["classifier/kernel", "classifier/bias"]
  expected = reference(model, x, y)
  assert_close(computation(x, y).matrix, expected)
  assert_close(computation.inner_products(x, y), expected @ expected.T)


def test_long_products_summed_by_column_blocks(monkeypatch):
  monkeypatch.setattr(per_example, "_SUM_COLUMNS", 7)
  model, shape = mixed_model()
  x, y = make_data(6, shape)
  expected, expected_layers = gram_reference(model, x, y, "loss")
  computation = per_example.PerExampleGradients(model, shape, chunk_size=4)
  gram, layers = computation.inner_products(x, y, per_layer=True)
  assert_close(gram, expected)
  for path, g in layers.items():
    assert_close(g, expected_layers[path])
