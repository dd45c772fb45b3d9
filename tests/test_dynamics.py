"""Distance travelled, gradient noise and recorded gradient variances."""

import collections
import json
import os
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import models
from tfcapacity import rundir
from tfcapacity import training
from tfcapacity.errors import UserError
from tfcapacity.training import dynamics
from tfcapacity.training import hooks as hooks_lib
import conftest  # tests/ is on sys.path (pytest rootdir conftest)


def one_device():
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def cfg_for(tmp_path, name="run", **overrides):
  return conftest.synthetic_cfg(tmp_path, name,
                                **{"deterministic": True, **overrides})


def final_weights(trainer):
  return [v.numpy() for v in trainer.model.trainable_variables]


def checkpoint_weights(trainer, path):
  keras.utils.set_random_seed(trainer.cfg.seed)
  model = models.from_config(trainer.cfg, trainer.train_data.info.input_shape,
                             trainer.train_data.info.num_classes)
  tf.train.Checkpoint(model=model).restore(path).expect_partial()
  return [v.numpy().astype(np.float64) for v in model.trainable_variables]


def test_distance_and_path_length_against_checkpoints(tmp_path):
  # Full-batch GD: one step per epoch, a checkpoint after every step.
  cfg = cfg_for(tmp_path, batch_size="full", epochs=4, keep_checkpoints=10,
                track_distance=True, momentum=0.9)
  trainer = training.Trainer(cfg, one_device())
  results = trainer.run()
  rows = results["measurements"]
  assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
  assert not any("distance/total" in row for row in results["history"])
  assert rows[0]["distance/total"] == 0.0
  assert rows[0]["path_length/total"] == 0.0
  ckpt = os.path.join(cfg.model_dir, "checkpoints")
  thetas = [checkpoint_weights(trainer, os.path.join(ckpt, f"ckpt-{s}"))
            for s in range(5)]
  paths = [v.path for v in trainer.model.trainable_variables]

  def norm(weights):
    return np.sqrt(sum(np.sum(np.square(w.astype(np.float64)))
                       for w in weights))

  # ||theta_t||: the initial weights at step 0, the final ones at the end.
  assert rows[0]["distance/norm"] == pytest.approx(norm(thetas[0]), rel=1e-6)
  assert rows[0]["distance/norm"] > 0
  assert rows[-1]["distance/norm"] == pytest.approx(
      norm(final_weights(trainer)), rel=1e-6)
  assert rows[-1]["distance/norm"] != pytest.approx(rows[0]["distance/norm"])
  for step in range(1, 5):
    row = rows[step]
    delta = [a - b for a, b in zip(thetas[step], thetas[0])]
    assert row["distance/total"] == pytest.approx(
        np.sqrt(sum(np.sum(d ** 2) for d in delta)), rel=1e-5)
    layer = [np.sum(d ** 2) for d, p in zip(delta, paths)
             if p.startswith("hidden_0/")]
    assert row["distance/hidden_0"] == pytest.approx(np.sqrt(sum(layer)),
                                                     rel=1e-5)
    steps = [np.sqrt(sum(np.sum((a - b) ** 2) for a, b in
                         zip(thetas[t + 1], thetas[t])))
             for t in range(step)]
    assert row["path_length/total"] == pytest.approx(sum(steps), rel=1e-5)
    assert row["distance/norm"] == pytest.approx(norm(thetas[step]), rel=1e-6)
  # With momentum the path is longer than the straight line.
  assert rows[-1]["path_length/total"] > rows[-1]["distance/total"]


def test_distance_survives_a_resume(tmp_path):
  whole = training.Trainer(cfg_for(tmp_path, "whole", epochs=3,
                                   track_distance=True), one_device()).run()
  # A crash at the end of epoch 2, before its checkpoint: the rerun resumes
  # from epoch 1's checkpoint.

  class Crash(training.Callback):
    every_epochs = 1

    def __call__(self, ctx):
      if ctx.epoch == 2:
        raise RuntimeError("crash")
      return {}

  part = cfg_for(tmp_path, "part", epochs=3, track_distance=True)
  with pytest.raises(RuntimeError, match="crash"):
    training.Trainer(part, one_device(), callbacks=[Crash()]).run()
  resumed = training.Trainer(part, one_device()).run()
  path = [rundir.series(r, "path_length/total") for r in (resumed, whole)]
  assert [p[:2] for p in path[0]] == [p[:2] for p in path[1]]
  assert path[0][-1][2] == pytest.approx(path[1][-1][2], rel=1e-6)


def make_noise(kind, steps_per_epoch=10, replicas=1, **flags):
  cfg = config.make(grad_noise=kind, **{"grad_noise_scope": "all", **flags})
  variables = [keras.Variable(np.zeros((300, 400), np.float32), name="w"),
               keras.Variable(np.zeros((7,), np.float32), name="b")]
  return dynamics.GradientNoise(cfg, variables, steps_per_epoch, replicas)


@pytest.mark.parametrize("kind,flags,target", [
    ("fixed", dict(grad_noise_std=0.3), lambda t: 0.3),
    ("annealed", dict(grad_noise_eta=0.5, grad_noise_gamma=0.55),
     lambda t: np.sqrt(0.5 / (1 + t) ** 0.55)),
])
def test_noise_has_the_target_std(kind, flags, target):
  noise = make_noise(kind, **flags)
  zeros = [tf.zeros(v.shape) for v in noise.variables]
  draws = []
  for step in (0, 5, 1000):
    out = noise.add(zeros, tf.constant(step, tf.int64))[0].numpy()
    assert out.std() == pytest.approx(target(step), rel=0.05)
    assert abs(out.mean()) < 0.05 * target(step)
    draws.append(out)
    # Seeded: the same step gives the same noise.
    again = noise.add(zeros, tf.constant(step, tf.int64))[0].numpy()
    np.testing.assert_array_equal(out, again)
  assert not np.array_equal(draws[0], draws[1])
  assert noise.scalars(5)["grad_noise/std"] == pytest.approx(target(5),
                                                             rel=1e-6)
  # Under R replicas each adds 1/R of the same draw.
  halves = make_noise(kind, replicas=2, **flags).add(
      zeros, tf.constant(5, tf.int64))[0].numpy()
  np.testing.assert_allclose(2 * halves, draws[1], rtol=1e-6)


def test_zero_noise_equals_no_noise_bit_for_bit(tmp_path):
  plain = training.Trainer(cfg_for(tmp_path, "plain"), one_device())
  plain.run()
  zero = training.Trainer(cfg_for(tmp_path, "zero", grad_noise="fixed",
                                  grad_noise_std=0.0), one_device())
  zero.run()
  noisy = training.Trainer(cfg_for(tmp_path, "noisy", grad_noise="fixed",
                                   grad_noise_std=0.05), one_device())
  noisy.run()
  for a, b, c in zip(final_weights(plain), final_weights(zero),
                     final_weights(noisy)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, c) for a, c in
             zip(final_weights(plain), final_weights(noisy)))


def test_noisy_training_same_on_one_and_two_replicas(tmp_path):
  flags = dict(grad_noise="annealed", grad_noise_eta=0.01,
               deterministic=False)
  one = training.Trainer(cfg_for(tmp_path, "one", **flags), one_device())
  one.run()
  two = training.Trainer(cfg_for(tmp_path, "two", **flags),
                         conftest.two_replicas())
  two.run()
  for a, b in zip(final_weights(one), final_weights(two)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_recorded_variance_equals_numpy(tmp_path):
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(6, 4, 3)).astype(np.float32) * [1.0, 2.0, 3.0]
  variables = [keras.Variable(np.zeros((4, 3), np.float32), name="k")]
  recorder = dynamics.GradientVarianceRecorder(variables)
  for g in grads:
    recorder.accumulate([tf.constant(g)], 1)
  got = recorder.scalars_and_reset()
  want = np.mean(np.var(grads.astype(np.float64), axis=0, ddof=1))
  assert got[f"grad_variance/{variables[0].path}"] == pytest.approx(
      want, rel=1e-5)
  assert int(recorder.count.numpy()) == 0

  # Two replicas, each holding half of every step's gradient.
  strategy = conftest.two_replicas()
  with strategy.scope():
    recorder = dynamics.GradientVarianceRecorder(variables)

  @tf.function
  def add(g):
    def replica(g):
      return recorder.accumulate([g / 2.0], 2)
    strategy.run(replica, args=(g,))

  for g in grads:
    add(tf.constant(g))
  assert recorder.scalars_and_reset()[
      f"grad_variance/{variables[0].path}"] == pytest.approx(want, rel=1e-5)


def test_empirical_noise_uses_the_reference_variances(tmp_path):
  ref = training.Trainer(cfg_for(tmp_path, "ref", epochs=3,
                                 record_grad_variance=True), one_device())
  ref_results = ref.run()
  recorded = {row["epoch"]: row for row in ref_results["measurements"]
              if "grad_variance/hidden_0/kernel" in row}
  assert sorted(recorded) == [1, 2, 3]
  run = training.Trainer(
      cfg_for(tmp_path, "emp", batch_size="32", epochs=4,
              grad_noise="empirical", grad_noise_reference=ref.model_dir),
      one_device())
  results = run.run()
  assert [row["epoch"] for row in results["measurements"]] == [0, 1, 2, 3, 4]
  for row in results["measurements"]:
    # The std logged at the end of epoch e is that of epoch e's next steps.
    source = recorded[min(row["epoch"] + 1, 3)]
    for v in run.model.trainable_variables:
      key = f"grad_noise/std/{v.path}"
      if not v.path.endswith("/kernel"):  # --grad_noise_scope=conv
        assert key not in row
        continue
      assert row[key] == pytest.approx(
          np.sqrt(source[f"grad_variance/{v.path}"]), rel=1e-5)


def test_bad_noise_flags(tmp_path):
  with pytest.raises(UserError, match="needs --grad_noise_reference"):
    training.Trainer(cfg_for(tmp_path, grad_noise="empirical"), one_device())
  plain = training.Trainer(cfg_for(tmp_path, "plain"), one_device())
  plain.run()
  with pytest.raises(UserError, match="--record_grad_variance"):
    training.Trainer(cfg_for(tmp_path, "x", grad_noise="empirical",
                             grad_noise_reference=plain.model_dir),
                     one_device())
  with pytest.raises(UserError, match="grad_noise_std must be"):
    training.Trainer(cfg_for(tmp_path, "y", grad_noise="fixed",
                             grad_noise_std=-1.0), one_device())
  assert not os.path.exists(tmp_path / "x")
  with open(os.path.join(plain.model_dir, "results.json")) as f:
    assert json.load(f)["status"] == "completed"


def test_hooks_from_config_record_before_adding_noise():
  variables = [keras.Variable(np.zeros((5, 10), np.float32), name="w")]
  assert dynamics.hooks_from_config(config.make(), variables, 1, 1) == []
  cfg = config.make(track_distance=True, record_grad_variance=True,
                    grad_noise="fixed", grad_noise_std=0.5)
  hooks = dynamics.hooks_from_config(cfg, variables, 1, 1)
  assert [type(h) for h in hooks] == [dynamics.DistanceTracker,
                                      dynamics.GradientVarianceRecorder,
                                      dynamics.GradientNoise]
  assert [h.name for h in hooks if h.trackables()] == ["distance",
                                                      "grad_variance"]
  grads = [tf.constant(np.arange(50, dtype=np.float32).reshape(5, 10))]
  step = tf.constant(3, tf.int64)
  out = hooks_lib.adjust_gradients(hooks, grads, step)
  noise = hooks[2].add([tf.zeros([5, 10])], step)[0].numpy()
  assert np.std(noise) > 0.1
  np.testing.assert_array_equal(out[0].numpy(), grads[0].numpy() + noise)
  # The recorder saw the gradient, not the noisy one.
  np.testing.assert_array_equal(hooks[1].sums[0].numpy(), grads[0].numpy())


# -- --grad_noise_scope --------------------------------------------------------


def tiny_model(name, **flags):
  cfg = config.make(model=name, normalization="batch",
                    **{**models.tiny_kwargs(name), **flags})
  shape = (8, 8, 1) if name == "resnet" else (6,)
  keras.utils.set_random_seed(0)
  return cfg, models.from_config(cfg, shape, 3)


def kinds_of(model):
  """Variable path -> 'kernel', 'batch_norm' or 'bias', from the layers'
  own attributes."""
  kinds = {}
  for layer in models.layers.batch_norm_layers(model):
    kinds[layer.gamma.path] = kinds[layer.beta.path] = "batch_norm"
  for layer in models.layers.all_layers(model):
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
      kinds[layer.kernel.path] = "kernel"
      if layer.bias is not None:
        kinds[layer.bias.path] = "bias"
  return kinds


@pytest.mark.parametrize("scope", training.NOISE_SCOPES)
def test_noise_scope_on_a_resnet_with_batch_norm(scope):
  cfg, model = tiny_model("resnet", grad_noise="fixed", grad_noise_std=0.3,
                          grad_noise_scope=scope, seed=7)
  variables = model.trainable_variables
  kinds = kinds_of(model)
  assert sorted(kinds) == sorted(v.path for v in variables)
  # depth 8: a stem and 3 x 2 convolutions, each with batch norm and no
  # bias, and the dense classifier with its bias.
  assert sorted(collections.Counter(kinds.values()).items()) == [
      ("batch_norm", 14), ("bias", 1), ("kernel", 8)]
  [noise] = dynamics.hooks_from_config(cfg, variables, 10, 1, model=model)
  step = 5
  out = noise.adjust_gradients([tf.zeros(v.shape) for v in variables],
                               tf.constant(step, tf.int64))
  out = [o.numpy() for o in out]
  noisy = [v.path for v, o in zip(variables, out) if np.all(o != 0)]
  clean = [v.path for v, o in zip(variables, out) if np.all(o == 0)]
  assert len(noisy) + len(clean) == len(variables)
  want = [v.path for v in variables
          if scope == "all" or kinds[v.path] == "kernel"]
  assert noisy == want
  pooled = np.concatenate([o.ravel() for o in out if np.any(o)])
  assert pooled.std() == pytest.approx(0.3, rel=0.05)
  assert abs(pooled.mean()) < 0.02
  # The documented seed: (crc32 of "<seed>:28161", step * L + l), l the
  # classifier kernel's place among the L noised variables.
  k = [v.path for v in variables].index("classifier/kernel")
  place = want.index("classifier/kernel")
  seed = [zlib.crc32(b"7:28161"), step * len(want) + place]
  expected = tf.random.stateless_normal(variables[k].shape, seed=seed) * 0.3
  np.testing.assert_array_equal(out[k], expected.numpy())


@pytest.mark.parametrize("name", models.names())
def test_kernels_by_rank_are_the_kernels_of_the_layers(name):
  # The loop passes only the variables; their ranks must pick the same
  # kernels that the layers name.
  _, model = tiny_model(name)
  variables = model.trainable_variables
  by_layers = dynamics.noise_indices(variables, "conv", model)
  by_rank = dynamics.noise_indices(variables, "conv")
  assert by_layers == by_rank
  kinds = kinds_of(model)
  assert [variables[i].path for i in by_layers] == [
      v.path for v in variables if kinds[v.path] == "kernel"]
  assert dynamics.noise_indices(variables, "all") == list(
      range(len(variables)))


def test_noise_scope_errors():
  variables = [keras.Variable(np.zeros((4,), np.float32), name="b")]
  with pytest.raises(UserError, match="selects no variable"):
    dynamics.GradientNoise(config.make(grad_noise="fixed"), variables, 1, 1)
  with pytest.raises(UserError, match="--grad_noise_scope=x: choose one"):
    dynamics.noise_indices(variables, "x")
