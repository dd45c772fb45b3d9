"""Distance travelled, gradient noise and recorded gradient variances."""

import json
import os

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
  cfg = config.make(grad_noise=kind, **flags)
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
      assert row[f"grad_noise/std/{v.path}"] == pytest.approx(
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
  variables = [keras.Variable(np.zeros((50,), np.float32), name="w")]
  assert dynamics.hooks_from_config(config.make(), variables, 1, 1) == []
  cfg = config.make(track_distance=True, record_grad_variance=True,
                    grad_noise="fixed", grad_noise_std=0.5)
  hooks = dynamics.hooks_from_config(cfg, variables, 1, 1)
  assert [type(h) for h in hooks] == [dynamics.DistanceTracker,
                                      dynamics.GradientVarianceRecorder,
                                      dynamics.GradientNoise]
  assert [h.name for h in hooks if h.trackables()] == ["distance",
                                                      "grad_variance"]
  grads = [tf.constant(np.arange(50, dtype=np.float32))]
  step = tf.constant(3, tf.int64)
  out = hooks_lib.adjust_gradients(hooks, grads, step)
  noise = hooks[2].add([tf.zeros([50])], step)[0].numpy()
  assert np.std(noise) > 0.1
  np.testing.assert_array_equal(out[0].numpy(), grads[0].numpy() + noise)
  # The recorder saw the gradient, not the noisy one.
  np.testing.assert_array_equal(hooks[1].sums[0].numpy(), grads[0].numpy())
