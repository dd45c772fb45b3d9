"""Tests of tfcapacity.models: registry, builders, custom layers.

Every registered model is built with its TINY options and each normalisation;
numerical layers are checked against numpy, against Keras' batch norm, and
second derivatives against finite differences of gradients (in float64).
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from tfcapacity import config
from tfcapacity import models
from tfcapacity.errors import UserError
from tfcapacity.models import layers
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

NAMES = models.names()
NORMS = ("none", "batch", "ghost")
INPUT_SHAPE = (8, 8, 1)  # Digits as images; mlp and fc_resnet flatten them.
NUM_CLASSES = 3
BATCH = 8
GHOST = 4


def build(name, normalization="none", seed=0, **overrides):
  keras.utils.set_random_seed(seed)
  kwargs = {**models.tiny_kwargs(name), "normalization": normalization,
            "ghost_batch_size": GHOST, **overrides}
  return models.get(name, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES,
                    **kwargs)


def batch(n=BATCH, seed=0, shape=INPUT_SHAPE, dtype="float32"):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *shape)).astype(dtype)
  y = rng.integers(0, NUM_CLASSES, size=n)
  return x, y


def n_params(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


# -- Registry ----------------------------------------------------------------

def test_names():
  assert NAMES == ["fc_resnet", "mlp", "resnet"]


def test_unknown_model_lists_choices():
  with pytest.raises(UserError,
                     match="unknown model 'vgg'; choose one of: fc_resnet, "
                           "mlp, resnet"):
    models.get("vgg", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)


# -- Every model, every normalisation ----------------------------------------

@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("name", NAMES)
def test_builds_finite_logits(name, normalization):
  model = build(name, normalization)
  x, _ = batch()
  for training in (True, False):
    logits = model(x, training=training)
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert logits.dtype == tf.float32
    assert np.all(np.isfinite(logits))
  assert model.layers[-1].name == "classifier"
  assert model.layers[-1].get_config()["activation"] == "linear"
  first = "stage1_block1_act2" if name == "resnet" else "hidden_0_act"
  assert model.get_layer(first) is not None


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_trainable_variable(name, normalization):
  model = build(name, normalization)
  x, y = batch()
  with tf.GradientTape() as tape:
    loss = keras.losses.sparse_categorical_crossentropy(
        y, model(x, training=True), from_logits=True)
  grads = tape.gradient(loss, model.trainable_variables)
  for v, g in zip(model.trainable_variables, grads):
    assert g is not None, v.path
    assert np.all(np.isfinite(g)), v.path
    assert np.linalg.norm(g) > 0, f"{v.path} gets a zero gradient"


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("name", NAMES)
def test_keras_file_round_trip(name, normalization, tmp_path):
  model = build(name, normalization, activation="leaky_relu")
  x, _ = batch()
  model(x, training=True)  # Moves the moving statistics off their start.
  for layer in layers.slope_layers(model):
    layer.slope.assign(0.3)
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.saving.load_model(path)  # No custom_objects needed.
  np.testing.assert_array_equal(loaded(x, training=False),
                                model(x, training=False))
  assert [type(l) for l in loaded.layers] == [type(l) for l in model.layers]
  for a, b in zip(loaded.weights, model.weights):
    np.testing.assert_array_equal(a, b)
  if normalization == "ghost":
    norms = [l for l in loaded.layers
             if isinstance(l, layers.GhostBatchNormalization)]
    assert norms and all(l.ghost_batch_size == GHOST for l in norms)


@pytest.mark.parametrize("name,normalization",
                         [("mlp", "ghost"), ("fc_resnet", "none"),
                          ("resnet", "batch")])
def test_saved_model_serves_logits(name, normalization, tmp_path):
  model = build(name, normalization)
  x, _ = batch()
  model(x, training=True)
  model.export(str(tmp_path), format="tf_saved_model", verbose=False)
  loaded = tf.saved_model.load(str(tmp_path))  # Keep it: it owns the weights.
  served = loaded.serve(tf.constant(x))
  np.testing.assert_allclose(served, model(x, training=False), atol=1e-5)


# -- Parameter counts --------------------------------------------------------

@pytest.mark.parametrize("normalization", NORMS)
def test_mlp_parameter_count(normalization):
  model = build("mlp", normalization)  # 64 inputs, width 8, depth 2, 3 classes.
  if normalization == "none":
    hidden = (64 * 8 + 8) + (8 * 8 + 8)        # kernels + biases
  else:
    hidden = (64 * 8 + 2 * 8) + (8 * 8 + 2 * 8)  # kernels + gamma, beta
  assert n_params(model.trainable_variables) == hidden + 8 * 3 + 3
  moving = 0 if normalization == "none" else 2 * (2 * 8)
  assert n_params(model.non_trainable_variables) == moving


@pytest.mark.parametrize("normalization", NORMS)
def test_fc_resnet_parameter_count(normalization):
  model = build("fc_resnet", normalization)
  projection = 64 * 8 + 8
  per_block = 8 * 8 + (8 if normalization == "none" else 2 * 8)
  assert n_params(model.trainable_variables) == (
      projection + 2 * per_block + 8 * 3 + 3)


@pytest.mark.parametrize("depth,normalization,trainable,non_trainable", [
    # He et al. Table 6: 0.27M and 0.46M. Non-trainable: two moving
    # statistics per normalised channel and one slope per rectifier.
    (20, "batch", 269_722, 2 * 688 + 19),
    (20, "none", 269_034, 19),   # conv biases instead of gamma and beta
    (32, "ghost", 464_154, 2 * 1136 + 31),
])
def test_resnet_parameter_count(depth, normalization, trainable,
                                non_trainable):
  model = models.get("resnet", input_shape=(32, 32, 3), num_classes=10,
                     depth=depth, normalization=normalization)
  assert n_params(model.trainable_variables) == trainable
  assert n_params(model.non_trainable_variables) == non_trainable
  paper = {20: 0.27e6, 32: 0.46e6}[depth]
  assert abs(trainable - paper) <= 0.01e6
  assert len(layers.slope_layers(model)) == depth - 1


# -- Initialisation ----------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_zero_init_classifier_gives_zero_logits(name):
  model = build(name, "batch", zero_init_classifier=True)
  x, _ = batch()
  np.testing.assert_array_equal(model(x, training=False), 0.0)
  np.testing.assert_array_equal(model(x, training=True), 0.0)
  for v in model.trainable_variables:
    if v.path.endswith("bias") or v.path.endswith("beta"):
      np.testing.assert_array_equal(v, 0.0)


def test_dauphin_bengio_network():
  keras.utils.set_random_seed(0)
  model = models.get("mlp", input_shape=(1000,), num_classes=10, width=50,
                     depth=1, activation="sigmoid",
                     kernel_init="glorot_uniform", zero_init_classifier=True)
  hidden = model.get_layer("hidden_0")
  bound = np.sqrt(6 / (1000 + 50))
  kernel = hidden.kernel.numpy()
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.9 * bound
  np.testing.assert_array_equal(hidden.bias, 0.0)
  np.testing.assert_array_equal(model.get_layer("classifier").kernel, 0.0)
  np.testing.assert_array_equal(model.get_layer("classifier").bias, 0.0)
  assert model.get_layer("hidden_0_act").get_config()["activation"] == (
      "sigmoid")


@pytest.mark.parametrize("name", NAMES)
def test_seeded_builds_are_reproducible(name):
  a, b, c = build(name, seed=1), build(name, seed=1), build(name, seed=2)
  for va, vb in zip(a.weights, b.weights):
    np.testing.assert_array_equal(va, vb)
  assert any(not np.array_equal(va, vc)
             for va, vc in zip(a.weights, c.weights))


def test_layers_get_different_initial_kernels():
  model = build("fc_resnet")
  assert not np.array_equal(model.get_layer("hidden_0").kernel,
                            model.get_layer("hidden_1").kernel)


@pytest.mark.parametrize("init", layers.KERNEL_INITS)
def test_kernel_inits(init):
  model = build("fc_resnet", kernel_init=init)
  kernel = model.get_layer("hidden_0").kernel.numpy()  # 8 x 8
  if init == "orthogonal":
    np.testing.assert_allclose(kernel.T @ kernel, np.eye(8), atol=1e-5)
  else:
    assert not np.allclose(kernel.T @ kernel, np.eye(8), atol=1e-2)


def test_initial_slopes():
  def slopes(model):
    return [float(l.slope) for l in layers.slope_layers(model)]
  assert slopes(build("mlp", activation="leaky_relu")) == (
      pytest.approx([0.01, 0.01]))
  assert slopes(build("mlp", activation="leaky_relu", leaky_slope=0.2)) == (
      pytest.approx([0.2, 0.2]))
  assert slopes(build("mlp", activation="relu")) == []
  # ResNet-8: stem + 2 rectifiers in each of 3 blocks.
  assert slopes(build("resnet")) == [0.0] * 7
  assert slopes(build("resnet", leaky_slope=0.1)) == pytest.approx([0.1] * 7)
  assert slopes(build("resnet", activation="leaky_relu")) == (
      pytest.approx([0.01] * 7))
  # Each rectifier owns its slope.
  model = build("resnet")
  layers.slope_layers(model)[0].slope.assign(0.5)
  assert slopes(model) == [0.5] + [0.0] * 6


# -- Registry from flags -----------------------------------------------------

def test_from_config_maps_flags():
  cfg = config.make(model="resnet", depth=8, width=4, normalization="ghost",
                    ghost_batch_size=4, leaky_slope=0.25)
  model = models.from_config(cfg, INPUT_SHAPE, NUM_CLASSES)
  assert model.name == "resnet8"
  assert model.get_layer("stem_norm").ghost_batch_size == 4
  assert float(model.get_layer("stem_act").slope) == 0.25
  cfg = config.make(model="fc_resnet", width=8, depth=3, residual_scale=0.5,
                    activation="tanh")
  model = models.from_config(cfg, (5,), 2)
  assert model.get_layer("hidden_2_scale").scale == 0.5
  assert model.get_layer("hidden_0_act").get_config()["activation"] == "tanh"
  cfg = config.make(model="mlp", width=8, depth=1)
  model = models.from_config(cfg, (5,), 2)
  assert n_params(model.trainable_variables) == 5 * 8 + 8 + 8 * 2 + 2


def test_from_config_rejects_bad_resnet_depth():
  cfg = config.make(model="resnet", depth=21)
  with pytest.raises(UserError) as e:
    models.from_config(cfg, (32, 32, 3), 10)
  assert str(e.value) == "--depth=21 is not 6n+2; use 20, 32, 56, ..."


@pytest.mark.parametrize("name,kwargs,message", [
    ("mlp", dict(activation="swish"),
     "unknown activation 'swish'; choose one of: leaky_relu, linear, relu, "
     "sigmoid, softplus, tanh"),
    ("fc_resnet", dict(kernel_init="he_uniform"),
     "unknown kernel_init 'he_uniform'; choose one of: glorot_normal"),
    ("resnet", dict(normalization="layer"),
     "unknown normalization 'layer'; choose one of: batch, ghost, none"),
    ("resnet", dict(activation="sigmoid"),
     "unknown activation 'sigmoid'; choose one of: leaky_relu, relu"),
    ("mlp", dict(width=0), "--width must be a positive integer; got 0"),
    ("fc_resnet", dict(depth=-1), "--depth must be a positive integer; got -1"),
    ("resnet", dict(width=0), "--width must be a positive integer; got 0"),
    ("resnet", dict(depth=21), "--depth=21 is not 6n+2; use 20, 32, 56, ..."),
    ("resnet", dict(depth=2), "--depth=2 leaves no residual blocks"),
    ("mlp", dict(normalization="ghost", ghost_batch_size=0),
     "--ghost_batch_size must be a positive integer for "
     "--normalization=ghost; got 0"),
    ("resnet", dict(normalization="ghost", ghost_batch_size=-5),
     "--ghost_batch_size must be a positive integer"),
    ("mlp", dict(normalization="batch", bn_momentum=1.5),
     "--bn_momentum must be in [0, 1); got 1.5"),
    ("mlp", dict(activation="leaky_relu", leaky_slope=1.5),
     "--leaky_slope must be in [0, 1]; got 1.5"),
    ("mlp", dict(activation="relu", leaky_slope=0.1),
     "--leaky_slope applies to --activation=leaky_relu only"),
    ("fc_resnet", dict(residual_scale=float("nan")),
     "--residual_scale must be a finite number"),
    ("mlp", dict(dropout=0.5), "model 'mlp' has no option 'dropout'"),
])
def test_bad_options_raise_user_error(name, kwargs, message):
  with pytest.raises(UserError) as e:
    build(name, **{"normalization": "none", **kwargs})
  assert str(e.value).startswith(message), str(e.value)
  assert "\n" not in str(e.value)


def test_bad_shapes_raise_user_error():
  with pytest.raises(UserError, match="resnet needs image inputs"):
    models.get("resnet", input_shape=(64,), num_classes=10)
  with pytest.raises(UserError, match="num_classes must be a positive"):
    models.get("mlp", input_shape=(4,), num_classes=0, width=2, depth=1)
  with pytest.raises(UserError, match="input shape must be positive"):
    models.get("mlp", input_shape=(0, 4), num_classes=2, width=2, depth=1)


# -- GhostBatchNormalization -------------------------------------------------

def numpy_ghost_bn(x, g, gamma, beta, eps):
  """Each sub-batch of g examples normalised by its own moments."""
  grouped = x.reshape(-1, g, *x.shape[1:])
  axes = tuple(range(1, grouped.ndim - 1))
  mean = grouped.mean(axis=axes, keepdims=True)
  var = grouped.var(axis=axes, keepdims=True)
  out = (grouped - mean) / np.sqrt(var + eps) * gamma + beta
  c = x.shape[-1]
  return (out.reshape(x.shape), mean.reshape(-1, c).mean(0),
          var.reshape(-1, c).mean(0))


def _init_layer(layer, shape, rng):
  layer.build(shape)
  c = shape[-1]
  layer.gamma.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
  layer.beta.assign(rng.normal(size=c).astype("float32"))
  layer.moving_mean.assign(rng.normal(size=c).astype("float32"))
  layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


@pytest.mark.parametrize("shape", [(12, 3), (6, 2, 3, 4)])
def test_ghost_bn_matches_numpy(shape):
  rng = np.random.default_rng(0)
  g, momentum, eps = (4, 0.8, 1e-3) if len(shape) == 2 else (2, 0.8, 1e-3)
  layer = layers.GhostBatchNormalization(g, momentum=momentum, epsilon=eps)
  _init_layer(layer, shape, rng)
  # Sub-batches with very different locations and scales.
  x = (rng.normal(size=shape) * rng.uniform(0.1, 5, (shape[0],) + (1,) * (
      len(shape) - 1)) + rng.normal(size=(shape[0],) + (1,) * (
          len(shape) - 1)) * 3).astype("float32")
  gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
  mm, mv = layer.moving_mean.numpy(), layer.moving_variance.numpy()
  expected, mean, var = numpy_ghost_bn(x.astype("float64"), g, gamma, beta,
                                       eps)
  np.testing.assert_allclose(layer(x, training=True), expected, atol=1e-5)
  np.testing.assert_allclose(layer.moving_mean,
                             momentum * mm + (1 - momentum) * mean, atol=1e-5)
  np.testing.assert_allclose(layer.moving_variance,
                             momentum * mv + (1 - momentum) * var, atol=1e-5)
  # Whole-batch normalisation would differ: the test can tell them apart.
  whole, _, _ = numpy_ghost_bn(x.astype("float64"), shape[0], gamma, beta,
                               eps)
  assert np.abs(whole - expected).max() > 0.1
  # Inference uses the moving statistics.
  mm, mv = layer.moving_mean.numpy(), layer.moving_variance.numpy()
  np.testing.assert_allclose(
      layer(x, training=False), (x - mm) / np.sqrt(mv + eps) * gamma + beta,
      atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 3, 5)])
@pytest.mark.parametrize("ours", ["ghost", "batch"])
def test_full_ghost_batch_equals_keras_batch_norm(shape, ours):
  rng = np.random.default_rng(1)
  momentum, eps = 0.7, 1e-3
  if ours == "ghost":
    layer = layers.GhostBatchNormalization(shape[0], momentum=momentum,
                                           epsilon=eps)
  else:
    layer = layers.BatchNormalization(momentum=momentum, epsilon=eps)
  reference = keras.layers.BatchNormalization(momentum=momentum, epsilon=eps)
  _init_layer(layer, shape, rng)
  reference.build(shape)
  reference.set_weights(layer.get_weights())  # gamma, beta, mean, variance
  w = tf.constant(rng.normal(size=shape).astype("float32"))
  for _ in range(2):
    x = tf.constant((rng.normal(size=shape) * 2 + 1).astype("float32"))
    outputs, grads = [], []
    for bn in (layer, reference):
      with tf.GradientTape() as tape:
        tape.watch(x)
        out = bn(x, training=True)
        total = tf.reduce_sum(w * out)
      outputs.append(out)
      grads.append(tape.gradient(total, [x, bn.gamma, bn.beta]))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    for ours_grad, keras_grad in zip(*grads):
      np.testing.assert_allclose(ours_grad, keras_grad, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean, reference.moving_mean,
                               atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance,
                               reference.moving_variance, atol=1e-5)
    np.testing.assert_allclose(layer(x, training=False),
                               reference(x, training=False), atol=1e-5)


def test_ghost_bn_rejects_indivisible_batch():
  layer = layers.GhostBatchNormalization(8, name="gbn")
  with pytest.raises(UserError,
                     match="a batch of 30 examples is not divisible by "
                           "--ghost_batch_size=8"):
    layer(tf.zeros([30, 3]), training=True)
  layer(tf.zeros([30, 3]), training=False)  # Inference has no sub-batches.

  @tf.function(input_signature=[tf.TensorSpec([None, 3])])
  def run(x):
    return layer(x, training=True)
  run(tf.zeros([16, 3]))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="not divisible by --ghost_batch_size=8"):
    run(tf.zeros([12, 3]))


def _hvp_and_finite_difference(loss_fn, params, vector, eps=1e-5):
  """Nested-tape HVP and a central difference of gradients along `vector`."""
  def grad(ps):
    with tf.GradientTape() as tape:
      tape.watch(ps)
      loss = loss_fn(ps)
    return tape.gradient(loss, ps)
  with tf.GradientTape() as outer:
    outer.watch(params)
    g = grad(params)
    gv = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(g, vector)])
  hvp = outer.gradient(gv, params)
  plus = grad([p + eps * v for p, v in zip(params, vector)])
  minus = grad([p - eps * v for p, v in zip(params, vector)])
  fd = [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
  flat = lambda ts: np.concatenate([np.ravel(t) for t in ts])
  return flat(hvp), flat(fd)


@pytest.mark.parametrize("ghost_batch_size", [3, None])
def test_bn_second_derivatives_match_finite_differences(ghost_batch_size):
  """Double backprop through our batch norms, w.r.t. inputs and gamma/beta.

  Keras' own BatchNormalization fails this (its tf.nn.moments stops the
  gradient of the mean inside the variance).
  """
  rng = np.random.default_rng(2)
  layer = layers.GhostBatchNormalization(ghost_batch_size, dtype="float64")
  layer.build((6, 4))
  x = tf.constant(rng.normal(size=(6, 4)) * 2)
  w = tf.constant(rng.normal(size=(6, 4)))
  gamma = tf.constant(rng.uniform(0.5, 2, 4))
  beta = tf.constant(rng.normal(size=4))

  def loss(ps):
    x, gamma, beta = ps
    out, _ = layer.stateless_call(
        [gamma, beta], [v.value for v in layer.non_trainable_variables], x,
        training=True)
    return tf.reduce_sum(w * out ** 2)
  params = [x, gamma, beta]
  vector = [tf.constant(rng.normal(size=p.shape)) for p in params]
  hvp, fd = _hvp_and_finite_difference(loss, params, vector)
  np.testing.assert_allclose(hvp, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())
  assert np.abs(fd).max() > 1.0


@pytest.fixture
def float64_policy():
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float64")
  yield
  keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("name,normalization,activation", [
    ("mlp", "ghost", "tanh"), ("fc_resnet", "batch", "softplus"),
    ("resnet", "ghost", "leaky_relu")])
def test_model_hvp_under_stateless_call(name, normalization, activation,
                                        float64_policy):
  del float64_policy
  model = build(name, normalization, activation=activation)
  x, y = batch(dtype="float64")
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]
  assert trainable[0].dtype == tf.float64

  def loss(ps):
    logits, _ = model.stateless_call(ps, non_trainable, x, training=True)
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True))
  rng = np.random.default_rng(3)
  vector = [tf.constant(rng.normal(size=p.shape)) for p in trainable]
  hvp, fd = _hvp_and_finite_difference(loss, trainable, vector)
  np.testing.assert_allclose(hvp, fd, rtol=1e-5,
                             atol=1e-6 * np.abs(fd).max())
  # The HVP calls left the model's state alone.
  for v, before in zip(model.non_trainable_variables, non_trainable):
    np.testing.assert_array_equal(v, before)


def test_stateless_call_returns_moving_statistics():
  model = build("mlp", "ghost")
  x, _ = batch()
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]
  logits, updated = model.stateless_call(trainable, non_trainable, x,
                                         training=True)
  for v, before in zip(model.non_trainable_variables, non_trainable):
    np.testing.assert_array_equal(v, before)  # Not applied to the model.
  assert any(not np.array_equal(a, b) for a, b in zip(updated, non_trainable))
  np.testing.assert_allclose(logits, model(x, training=True), atol=1e-6)
  for v, u in zip(model.non_trainable_variables, updated):
    np.testing.assert_allclose(v, u, atol=1e-6)  # The same update, applied.


def test_mirrored_ghost_bn_averages_replica_statistics():
  x, _ = batch(n=16)
  single = build("mlp", "ghost")
  single(x, training=True)
  strategy = conftest.two_replicas()
  with strategy.scope():
    mirrored = build("mlp", "ghost")
  data = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices(x).batch(16))

  @tf.function
  def step(xb):
    return strategy.run(lambda xb: mirrored(xb, training=True), (xb,))
  for xb in data:
    step(xb)
  for a, b in zip(single.non_trainable_variables,
                  mirrored.non_trainable_variables):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_per_example_gradients_vectorize(name):
  model = build(name, "ghost", activation="leaky_relu")
  x, y = batch(n=4)
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]

  def example_grad(xy):
    xi, yi = xy
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      logits, _ = model.stateless_call(trainable, non_trainable, xi[None],
                                       training=False)
      loss = keras.losses.sparse_categorical_crossentropy(
          yi[None], logits, from_logits=True)
    return tape.gradient(loss, trainable)
  grads = tf.vectorized_map(example_grad, (tf.constant(x), tf.constant(y)))
  for i in (0, 3):
    expected = example_grad((tf.constant(x[i]), tf.constant(y[i])))
    for g, e in zip(grads, expected):
      np.testing.assert_allclose(g[i], e, atol=1e-5)


# -- AdaptiveLeakyReLU -------------------------------------------------------

def test_adaptive_leaky_relu():
  x = np.random.default_rng(4).normal(size=(5, 7)).astype("float32")
  relu = layers.AdaptiveLeakyReLU(0.0)
  np.testing.assert_array_equal(relu(x), tf.nn.relu(x))
  leaky = layers.AdaptiveLeakyReLU(0.2)
  np.testing.assert_allclose(leaky(x), np.where(x > 0, x, 0.2 * x),
                             rtol=1e-6)
  assert leaky.trainable_weights == []
  assert [w.path for w in leaky.non_trainable_weights] == [
      leaky.slope.path]
  leaky.slope.assign(1.0)  # Fully linearised.
  np.testing.assert_allclose(leaky(x), x, rtol=1e-6)


def test_slope_is_differentiable_under_stateless_call():
  layer = layers.AdaptiveLeakyReLU(0.1)
  x = tf.constant([[-2.0, -1.0, 3.0]])
  layer.build(x.shape)
  slope = tf.constant(0.1)
  with tf.GradientTape() as tape:
    tape.watch(slope)
    y, _ = layer.stateless_call([], [slope], x)
    total = tf.reduce_sum(y)
  np.testing.assert_allclose(tape.gradient(total, slope), -3.0)


def test_padded_shortcut():
  x = tf.reshape(tf.range(2 * 5 * 5 * 3, dtype=tf.float32), [2, 5, 5, 3])
  y = layers.PaddedShortcut(2, 8)(x)
  assert y.shape == (2, 3, 3, 8)
  np.testing.assert_array_equal(y[..., :3], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., 3:], 0.0)


@pytest.mark.parametrize("shape", [(12, 5, 5, 3), (12, 6)])
def test_fused_batch_norm_matches_explicit_path_to_second_order(
    monkeypatch, shape):
  """The fused float32 kernel gives the explicit formula's values, gradients,
  Hessian-vector products and moving statistics."""
  x = tf.random.stateless_normal(shape, seed=[7, 1]) * 2.0 + 0.5
  w = tf.random.stateless_normal(shape, seed=[7, 2])

  def measure(fused):
    if not fused:
      monkeypatch.setattr(layers.GhostBatchNormalization, "_fusable",
                          lambda self, x: False)
    layer = layers.BatchNormalization(momentum=0.8)
    layer.build(shape)
    layer.gamma.assign(tf.linspace(0.5, 1.5, shape[-1]))
    layer.beta.assign(tf.linspace(-0.2, 0.3, shape[-1]))
    params = [layer.gamma, layer.beta]
    v = [tf.ones_like(p) * 0.3 for p in params]
    xin = tf.Variable(x)
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        y = layer(xin, training=True)
        loss = tf.reduce_sum(tf.tanh(y) * w)
      grads = inner.gradient(loss, params + [xin])
      gv = tf.add_n([tf.reduce_sum(g * u) for g, u in zip(grads, v)])
    hvp = outer.gradient(gv, params + [xin])
    monkeypatch.undo()
    return ([y.numpy()] + [g.numpy() for g in grads]
            + [h.numpy() for h in hvp]
            + [layer.moving_mean.numpy(), layer.moving_variance.numpy()])

  for got, want in zip(measure(True), measure(False)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
