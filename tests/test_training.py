"""The training loop: learning, distribution, full-batch GD, run directory."""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import training
from tfcapacity.objective import losses
from tfcapacity.errors import UserError
from tfcapacity.training import optim
from tfcapacity import rundir
import conftest  # tests/ is on sys.path (pytest rootdir conftest)


def one_device():
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def mirrored():
  return conftest.two_replicas()


synthetic_cfg = conftest.synthetic_cfg


def weights(model):
  return [v.numpy() for v in model.weights]


def test_loss_falls_and_results_schema(tmp_path):
  cfg = config.make(dataset="digits", width=32, epochs=3, batch_size="32",
                    learning_rate=0.5, progress_bar=False, export=False,
                    model_dir=str(tmp_path / "digits"))
  results = training.train(cfg, one_device())
  history = results["history"]
  assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
  assert history[-1]["train_top1_error"] < history[0]["train_top1_error"]
  on_disk = rundir.read_results(cfg.model_dir)
  assert on_disk["status"] == "completed"
  for key, kind in (("flags", dict), ("history", list), ("final", dict),
                    ("examples_per_second", float),
                    ("num_parameters", int), ("num_replicas", int)):
    assert isinstance(on_disk[key], kind), key
  assert on_disk["num_parameters"] == 64 * 32 + 32 + 32 * 10 + 10
  assert on_disk["num_replicas"] == 1
  assert on_disk["flags"]["width"] == 32
  assert on_disk["loss"] == "cross_entropy" == on_disk["flags"]["loss"]
  assert on_disk["measurements"] == []  # No callback ran.
  assert [row["epoch"] for row in on_disk["history"]] == [0, 1, 2, 3]
  for row in on_disk["history"]:
    assert isinstance(row["epoch"], int) and isinstance(row["step"], int)
    for key in ("train_loss", "test_loss", "learning_rate", "wall_seconds"):
      assert isinstance(row[key], float) and math.isfinite(row[key])
    for key in ("train_top1_error", "train_top5_error", "test_top1_error",
                "test_top5_error"):
      assert 0.0 <= row[key] <= 1.0
    assert row["train_top5_error"] <= row["train_top1_error"]
  assert on_disk["final"] == on_disk["history"][-1]
  assert on_disk["history"][-1]["step"] == 3 * (1437 // 32)


def test_evaluation_matches_numpy(tmp_path):
  cfg = synthetic_cfg(tmp_path, synthetic_classes=7, epochs=1)
  trainer = training.Trainer(cfg, mirrored())
  metrics = trainer.evaluate()
  for split, ds in (("train", trainer.train_data), ("test", trainer.test_data)):
    x, y = ds.examples(np.arange(ds.info.num_examples))
    logits = trainer.model(x, training=False).numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(
        1, keepdims=True)) - logits.max(1, keepdims=True)
    loss = -logp[np.arange(len(y)), y].mean()
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = np.mean(order[:, 0] != y)
    top5 = np.mean([label not in row[:5] for row, label in zip(order, y)])
    assert metrics[f"{split}_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics[f"{split}_top1_error"] == pytest.approx(top1, abs=1e-9)
    assert metrics[f"{split}_top5_error"] == pytest.approx(top5, abs=1e-9)


def test_topk_ties_count_as_wrong():
  logits = tf.zeros([4, 10])
  labels = tf.constant([0, 3, 4, 9])
  np.testing.assert_array_equal(
      losses.topk_correct(labels, logits, 1).numpy(), [1, 0, 0, 0])
  np.testing.assert_array_equal(
      losses.topk_correct(labels, logits, 5).numpy(), [1, 1, 1, 0])


def test_one_and_two_replicas_agree(tmp_path):
  single = training.Trainer(synthetic_cfg(tmp_path, "one"), one_device())
  r1 = single.run()
  double = training.Trainer(synthetic_cfg(tmp_path, "two"), mirrored())
  r2 = double.run()
  assert r2["num_replicas"] == 2
  for a, b in zip(r1["history"], r2["history"]):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
  for a, b in zip(weights(single.model), weights(double.model)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("chunk", [16, 64])  # Accumulated; one batch.
def test_full_batch_gd_equals_hand_step(tmp_path, replicas, chunk):
  cfg = synthetic_cfg(tmp_path, synthetic_examples=50, batch_size="full",
                      full_batch_chunk=chunk, steps=1, weight_decay=0.01,
                      learning_rate=0.3, momentum=0.0)
  trainer = training.Trainer(cfg, one_device() if replicas == 1
                             else mirrored())
  assert trainer.accumulate == (chunk < 50)
  x, y = trainer.train_data.examples(np.arange(50))
  model = trainer.model
  before = [v.numpy() for v in model.trainable_variables]
  with tf.GradientTape() as tape:
    logits = model(x, training=True)
    loss = tf.reduce_mean(losses.cross_entropy(y, logits))
    kernels = [v for v in model.trainable_variables
               if v.path.endswith("kernel")]
    loss += 0.005 * tf.add_n([tf.reduce_sum(k ** 2) for k in kernels])
  grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
  expected = [w - 0.3 * g for w, g in zip(before, grads)]
  results = trainer.run()
  assert results["steps"] == 1
  for got, want in zip(model.trainable_variables, expected):
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_schedules():
  s = optim.Schedule(0.1, "step", steps_per_epoch=10, total_steps=100,
                     drop_epochs=[3, 6], drop_factor=0.1)
  assert float(s(29)) == pytest.approx(0.1)
  assert float(s(30)) == pytest.approx(0.01)
  assert float(s(65)) == pytest.approx(0.001)
  c = optim.Schedule(1.0, "cosine", steps_per_epoch=10, total_steps=100)
  assert float(c(0)) == pytest.approx(1.0)
  assert float(c(50)) == pytest.approx(0.5)
  assert float(c(100)) == pytest.approx(0.0, abs=1e-7)
  w = optim.Schedule(1.0, "constant", steps_per_epoch=10, total_steps=100,
                     warmup_epochs=2)
  assert float(w(0)) == pytest.approx(1 / 20)
  assert float(w(9)) == pytest.approx(0.5)
  assert float(w(50)) == pytest.approx(1.0)


def test_momentum_adam_nesterov_and_schedule_run(tmp_path):
  for i, extra in enumerate([
      dict(optimizer="sgd", momentum=0.9, nesterov=True, lr_schedule="step",
           lr_drop_epochs=["1"]),
      dict(optimizer="adam", learning_rate=0.01, lr_schedule="cosine",
           warmup_epochs=0.5)]):
    results = training.train(synthetic_cfg(tmp_path, f"r{i}", **extra),
                             one_device())
    assert results["status"] == "completed"
    assert results["final"]["train_loss"] < results["history"][0][
        "train_loss"]


def test_step_schedule_logged_learning_rate(tmp_path):
  cfg = synthetic_cfg(tmp_path, lr_schedule="step", lr_drop_epochs=["1"],
                      epochs=2, learning_rate=0.2)
  history = training.train(cfg, one_device())["history"]
  assert history[1]["learning_rate"] == pytest.approx(0.2)
  assert history[2]["learning_rate"] == pytest.approx(0.02)


def test_resume_continues_and_completed_run_is_not_redone(tmp_path):
  cfg = synthetic_cfg(tmp_path, epochs=2, deterministic=True)
  whole = training.Trainer(cfg.replace(model_dir=str(tmp_path / "whole")),
                           one_device())
  whole.run()
  first = training.Trainer(cfg.replace(epochs=1), one_device())
  first.run()
  # Same flags except the length: refused without --overwrite.
  with pytest.raises(UserError, match="different flags"):
    training.Trainer(cfg, one_device()).run()
  again = training.Trainer(cfg.replace(epochs=1), one_device())
  results = again.run()
  assert results["status"] == "completed"
  assert len(results["history"]) == 2
  for a, b in zip(weights(first.model), weights(again.model)):
    np.testing.assert_array_equal(a, b)


def test_different_flags_refused_then_overwritten(tmp_path):
  cfg = synthetic_cfg(tmp_path, epochs=1)
  training.train(cfg, one_device())
  before = open(os.path.join(cfg.model_dir, "flags.txt")).read()
  with pytest.raises(UserError, match="--width=16"):
    training.train(cfg.replace(width=16), one_device())
  assert open(os.path.join(cfg.model_dir, "flags.txt")).read() == before
  results = training.train(cfg.replace(width=16, overwrite=True),
                           one_device())
  assert results["flags"]["width"] == 16
  assert rundir.load_config(cfg.model_dir).width == 16


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = synthetic_cfg(tmp_path, learning_rate=1e12, epochs=3,
                      steps_per_loop=1)
  results = training.train(cfg, one_device())
  assert results["status"] == "diverged"
  assert rundir.read_results(cfg.model_dir)["status"] == "diverged"
  assert results["diverged_at_step"] < 3 * 6
  latest = tf.train.latest_checkpoint(os.path.join(cfg.model_dir,
                                                   "checkpoints"))
  reader = tf.train.load_checkpoint(latest)
  for name in reader.get_variable_to_shape_map():
    value = reader.get_tensor(name)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
      assert np.all(np.isfinite(value)), name


class CountingCallback(training.Callback):
  name = "counting"

  def __init__(self, every_steps=0, every_epochs=0):
    self.every_steps, self.every_epochs = every_steps, every_epochs
    self.steps = []

  def __call__(self, ctx):
    self.steps.append(ctx.step)
    return {"probe/sum_of_kernel": float(
        tf.reduce_sum(ctx.model.trainable_variables[0]))}


def test_callbacks_run_at_their_frequency_and_are_logged(tmp_path):
  by_step = CountingCallback(every_steps=4)
  by_epoch = CountingCallback(every_epochs=1)
  cfg = synthetic_cfg(tmp_path, epochs=2, steps_per_loop=5,  # 6 steps/epoch
                      export=True)
  results = training.train(cfg, one_device(), callbacks=[by_step, by_epoch])
  assert by_step.steps == [0, 4, 8, 12]
  assert by_epoch.steps == [0, 6, 12]
  # Every callback row is a measurement, at evaluation steps too; the
  # history holds the evaluations only.
  assert rundir.read_results(cfg.model_dir) == results
  assert [row["step"] for row in results["history"]] == [0, 6, 12]
  assert [(m["epoch"], m["step"]) for m in results["measurements"]] == [
      (0, 0), (0, 4), (1, 6), (1, 8), (2, 12)]
  for row in results["history"]:
    assert not any(k.startswith(("probe/", "timing/")) for k in row)
  for row in results["measurements"]:
    assert row["timing/counting_seconds"] >= 0.0
  # The last value is the trained model's.
  model = keras.saving.load_model(os.path.join(cfg.model_dir, "model.keras"))
  assert results["measurements"][-1]["probe/sum_of_kernel"] == pytest.approx(
      float(np.sum(model.trainable_variables[0].numpy())), rel=1e-6)
  assert rundir.series(results, "probe/sum_of_kernel")[-1] == (
      12, 2, results["measurements"][-1]["probe/sum_of_kernel"])


def test_squared_loss_trains_and_is_recorded(tmp_path):
  cfg = synthetic_cfg(tmp_path, loss="squared", epochs=3, export=True,
                      learning_rate=0.05)
  trainer = training.Trainer(cfg, one_device())
  results = trainer.run()
  assert results["loss"] == "squared"
  history = results["history"]
  assert history[-1]["train_loss"] < history[0]["train_loss"]
  model = keras.saving.load_model(os.path.join(cfg.model_dir, "model.keras"))
  for split, ds in (("train", trainer.train_data), ("test", trainer.test_data)):
    x, y = ds.examples(np.arange(ds.info.num_examples))
    logits = model(x, training=False).numpy().astype(np.float64)
    onehot = np.eye(logits.shape[1])[y]
    want = np.mean(0.5 * np.sum((logits - onehot) ** 2, axis=1))
    assert history[-1][f"{split}_loss"] == pytest.approx(want, rel=1e-5)
    top1 = np.mean(np.argmax(logits, axis=1) != y)
    assert history[-1][f"{split}_top1_error"] == pytest.approx(top1,
                                                               abs=1e-9)


def test_no_retracing_across_epochs(tmp_path):
  trainer = training.Trainer(synthetic_cfg(tmp_path, epochs=3,
                                           steps_per_loop=4), mirrored())
  trainer.run()
  assert not trainer.resident
  assert trainer.train_steps.experimental_get_tracing_count() == 1
  assert trainer.eval_sums.experimental_get_tracing_count() <= 2
  single = training.Trainer(synthetic_cfg(tmp_path, "one", epochs=3,
                                          steps_per_loop=4), one_device())
  single.run()
  assert single.resident
  assert single.train_steps_resident.experimental_get_tracing_count() == 1


def test_resident_and_iterator_feeds_train_identically(tmp_path, monkeypatch):
  cfg = synthetic_cfg(tmp_path, epochs=2, steps_per_loop=4,
                      deterministic=True)
  resident = training.Trainer(cfg, one_device())
  resident.run()
  monkeypatch.setattr(training.Trainer, "resident", property(lambda s: False))
  streamed = training.Trainer(cfg.replace(model_dir=str(tmp_path / "it")),
                              one_device())
  streamed.run()
  assert streamed.train_steps.experimental_get_tracing_count() == 1
  for a, b in zip(weights(resident.model), weights(streamed.model)):
    np.testing.assert_array_equal(a, b)


def test_exports_round_trip(tmp_path):
  cfg = synthetic_cfg(tmp_path, export=True, epochs=1)
  trainer = training.Trainer(cfg, one_device())
  trainer.run()
  x, _ = trainer.test_data.examples(np.arange(10))
  want = trainer.model(x, training=False).numpy()
  loaded = keras.saving.load_model(os.path.join(cfg.model_dir,
                                                "model.keras"))
  np.testing.assert_allclose(loaded(x, training=False).numpy(), want,
                             rtol=1e-6)
  saved = tf.saved_model.load(os.path.join(cfg.model_dir, "saved_model"))
  np.testing.assert_allclose(saved.serve(tf.constant(x)).numpy(), want,
                             rtol=1e-6)


def test_tensorboard_events(tmp_path):
  cfg = synthetic_cfg(tmp_path, epochs=1)
  training.train(cfg, one_device())

  def tags(subdir):
    found = set()
    for name in os.listdir(os.path.join(cfg.model_dir, subdir)):
      if not name.startswith("events"):
        continue
      for event in tf.compat.v1.train.summary_iterator(
          os.path.join(cfg.model_dir, subdir, name)):
        found.update(v.tag for v in event.summary.value)
    return found

  train = tags("train")
  assert {"batch/loss", "batch/learning_rate",
          "batch/examples_per_second"} <= train
  assert {"loss", "top1_error", "top5_error"} <= train & tags("test")
  assert "_hparams_/session_start_info" in train
  assert "flags/text_summary" in train or "flags" in train
  assert not any(name.startswith("events") for name in os.listdir(
      cfg.model_dir))  # No run at the root: one run per real curve.


def test_flags_file_reproduces_the_run(tmp_path):
  cfg = synthetic_cfg(tmp_path, epochs=1, lr_drop_epochs=["1", "2"],
                      lr_schedule="step")
  training.train(cfg, one_device())
  assert rundir.load_config(cfg.model_dir) == cfg


@pytest.mark.parametrize("overrides, message", [
    (dict(dataset="nope"), "unknown dataset 'nope'"),
    (dict(model="nope"), "unknown model 'nope'"),
    (dict(optimizer="nope"), "unknown optimizer 'nope'"),
    (dict(lr_schedule="nope"), "unknown learning-rate schedule 'nope'"),
    (dict(activation="nope"), "activation"),
    (dict(batch_size="500"), "exceeds the 96 training examples"),
    (dict(normalization="ghost", ghost_batch_size=5), "does not divide"),
])
def test_bad_input_raises_before_writing(tmp_path, overrides, message):
  cfg = synthetic_cfg(tmp_path, **overrides)
  with pytest.raises(UserError, match=message):
    training.train(cfg, one_device())
  assert not os.path.exists(cfg.model_dir)


def test_batch_not_divisible_by_replicas(tmp_path):
  cfg = synthetic_cfg(tmp_path, batch_size="15")
  with pytest.raises(UserError, match="not divisible by the 2 replicas"):
    training.train(cfg, mirrored())
  assert not os.path.exists(cfg.model_dir)


def test_ghost_batch_must_divide_per_replica_batch(tmp_path):
  cfg = synthetic_cfg(tmp_path, batch_size="16", normalization="ghost",
                      ghost_batch_size=16)
  with pytest.raises(UserError, match="per-replica batch of 8"):
    training.train(cfg, mirrored())


@pytest.mark.parametrize("flag, value", [
    ("width", 0), ("depth", -1), ("learning_rate", 0.0),
    ("batch_size", "0"), ("label_noise", 1.5)])
def test_non_positive_flags_refused(flag, value):
  with pytest.raises(UserError, match=f"--{flag}"):
    config.make(**{flag: value})


def test_results_json_is_written_atomically(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  rundir.write_json(str(path), {"a": 1})

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError):
    rundir.write_json(str(path), {"a": 2})
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["results.json"]
