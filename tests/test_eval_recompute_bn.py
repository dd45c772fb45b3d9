"""Evaluation with recomputed batch-norm statistics, and callbacks' info.

The recomputed evaluation is checked against another route to the same
numbers: a batch-norm network in training mode on the whole training set as
one batch normalises each layer by exactly the statistics that recomputation
gives, and the same statistics, read from that forward pass, evaluate the
test set in inference mode.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import training
from tfcapacity import rundir
from tfcapacity.models import layers as layers_lib
from tfcapacity.objective import function as function_lib
from tfcapacity.training import loop
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

SUFFIX = "_recomputed_bn"
RECOMPUTED = tuple(key + SUFFIX for key in loop.EVAL_KEYS)


def one_device():
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def strategy(replicas):
  return one_device() if replicas == 1 else conftest.two_replicas()


def bn_cfg(tmp_path, name="run", **overrides):
  """A tiny MLP with batch norm on synthetic data (6 steps an epoch)."""
  base = dict(normalization="batch", depth=2, epochs=1, learning_rate=0.3)
  base.update(overrides)
  return conftest.synthetic_cfg(tmp_path, name, **base)


def state(model):
  """Every weight, the moving statistics included, as numpy."""
  return [v.numpy() for v in model.weights]


def metrics_of(logits, y):
  """(mean cross-entropy, top-1 error, examples whose top two logits are
  within 1e-4: float noise may flip their argmax) in float64 numpy."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
  loss = -logp[np.arange(len(y)), y].mean()
  order = np.argsort(-logits, axis=1, kind="stable")
  top1 = np.mean(order[:, 0] != y)
  ranked = np.sort(logits, axis=1)
  near_ties = int(np.sum(ranked[:, -1] - ranked[:, -2] < 1e-4))
  return loss, top1, near_ties


def full_batch_statistics(model, x):
  """Per batch-norm layer, the float64 mean and biased variance of its
  inputs when the model runs in training mode on `x` as one batch."""
  out = []
  for layer in layers_lib.batch_norm_layers(model):
    below = keras.Model(model.inputs, layer.input)
    h = np.asarray(below(x, training=True), np.float64)
    h = h.reshape(-1, h.shape[-1])
    out.append((h.mean(0), h.var(0)))
  return out


@pytest.mark.parametrize("case", ["mlp", "mlp_two_replicas", "resnet"])
def test_recomputed_evaluation_matches_one_full_batch(tmp_path, case):
  if case == "resnet":
    cfg = conftest.synthetic_cfg(
        tmp_path, dataset="digits", model="resnet", depth=8, width=4,
        normalization="batch", batch_size="128", epochs=1,
        eval_batch_size=512, learning_rate=0.1, export=True)
  else:
    cfg = bn_cfg(tmp_path, epochs=2, export=True)
  trainer = training.Trainer(cfg, strategy(2 if "two" in case else 1))
  assert trainer.recompute_bn
  results = trainer.run()
  final = results["history"][-1]
  model = keras.saving.load_model(os.path.join(cfg.model_dir, "model.keras"))
  train, test = trainer.eval_train_data, trainer.test_data
  x, y = train.examples(np.arange(train.info.num_examples))
  x_test, y_test = test.examples(np.arange(test.info.num_examples))
  # The moving statistics differ from the recomputed ones (else the check
  # below could not tell them apart).
  stats = full_batch_statistics(model, x)
  norms = layers_lib.batch_norm_layers(model)
  assert len(norms) == len(stats) >= 2
  assert not np.allclose(norms[0].moving_mean.numpy(), stats[0][0],
                         atol=1e-3)
  # Train set: training mode, all examples in one batch.
  loss, top1, near = metrics_of(model(x, training=True), y)
  assert final["train_loss" + SUFFIX] == pytest.approx(loss, rel=1e-5)
  assert abs(final["train_top1_error" + SUFFIX] - top1) <= near / len(y) + 1e-9
  # Test set: inference mode on the statistics of that forward pass.
  for layer, (mean, var) in zip(norms, stats):
    layer.moving_mean.assign(mean.astype(np.float32))
    layer.moving_variance.assign(var.astype(np.float32))
  loss, top1, near = metrics_of(model(x_test, training=False), y_test)
  assert final["test_loss" + SUFFIX] == pytest.approx(loss, rel=1e-5)
  assert abs(final["test_top1_error" + SUFFIX] - top1) <= (near / len(y_test)
                                                            + 1e-9)
  # The plain evaluation kept the moving statistics (the trained model's).
  trained = keras.saving.load_model(os.path.join(cfg.model_dir,
                                                 "model.keras"))
  loss, _, _ = metrics_of(trained(x_test, training=False), y_test)
  assert final["test_loss"] == pytest.approx(loss, rel=1e-5)
  for row in results["history"]:
    assert set(RECOMPUTED) <= set(row)
    assert 0.0 <= row["train_top5_error" + SUFFIX] <= row[
        "train_top1_error" + SUFFIX] <= 1.0


@pytest.mark.parametrize("replicas", [1, 2])
def test_training_is_bitwise_unaffected(tmp_path, replicas):
  runs = {}
  for flag in (True, False):
    cfg = bn_cfg(tmp_path, f"flag_{flag}", epochs=2, deterministic=True,
                 eval_recompute_bn=flag)
    trainer = training.Trainer(cfg, strategy(replicas))
    results = trainer.run()
    runs[flag] = (state(trainer.model), results["history"])
  (on_state, on_history), (off_state, off_history) = runs[True], runs[False]
  assert len(on_state) == len(off_state)
  for a, b in zip(on_state, off_state):
    assert np.array_equal(a, b)
  for a, b in zip(on_history, off_history):
    assert {k: a[k] for k in loop.EVAL_KEYS} == {k: b[k]
                                                 for k in loop.EVAL_KEYS}
  assert set(RECOMPUTED) <= set(on_history[-1])
  # Every replica's copy of a moving statistic is the same after the run.
  if replicas == 2:
    for layer in layers_lib.batch_norm_layers(trainer.model):
      copies = trainer.strategy.experimental_local_results(
          layer.moving_mean.value)
      assert len(copies) == 2
      assert np.array_equal(copies[0].numpy(), copies[1].numpy())


@pytest.mark.parametrize("overrides", [
    dict(normalization="none"), dict(eval_recompute_bn=False)])
def test_nothing_new_without_batch_norm_or_flag(tmp_path, overrides):
  cfg = bn_cfg(tmp_path, **overrides)
  trainer = training.Trainer(cfg, one_device())
  assert not trainer.recompute_bn
  results = trainer.run()
  for row in results["history"]:
    assert not any(key.endswith(SUFFIX) for key in row)
  assert not [name for name in os.listdir(cfg.model_dir)
              if name.endswith(SUFFIX)]
  assert results["callbacks"] == {}


def event_scalars(directory):
  """{tag: {step: value}} of the scalar summaries in `directory`."""
  out = {}
  for name in os.listdir(directory):
    if not name.startswith("events"):
      continue
    for event in tf.compat.v1.train.summary_iterator(
        os.path.join(directory, name)):
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor)
        if array.ndim == 0 and array.dtype.kind in "fiu":  # Not histograms
          # or the flags text.
          out.setdefault(value.tag, {})[event.step] = float(array)
  return out


def test_tensorboard_run_and_log_line(tmp_path, monkeypatch):
  cfg = bn_cfg(tmp_path)
  messages = []
  monkeypatch.setattr(loop.logging, "info",
                      lambda fmt, *args: messages.append(fmt % args))
  results = training.train(cfg, one_device())
  monkeypatch.undo()
  tags = {"loss", "top1_error", "top5_error"}
  for split in ("train", "test"):
    recomputed = event_scalars(os.path.join(cfg.model_dir, split + SUFFIX))
    plain = event_scalars(os.path.join(cfg.model_dir, split))
    assert set(recomputed) == tags <= set(plain)
    for row in results["history"]:
      for tag in tags:
        assert recomputed[tag][row["step"]] == pytest.approx(
            row[f"{split}_{tag}{SUFFIX}"], rel=1e-6)
        assert plain[tag][row["step"]] == pytest.approx(
            row[f"{split}_{tag}"], rel=1e-6)
  final = results["history"][-1]
  lines = [m for m in messages if "recomputed BN top1" in m]
  assert len(lines) == len(results["history"])
  assert (f"recomputed BN top1 train {final['train_top1_error' + SUFFIX]:.4f}"
          f" test {final['test_top1_error' + SUFFIX]:.4f}") in lines[-1]


def test_non_finite_recomputation_does_not_crash(tmp_path, monkeypatch):
  def poisoned(model, x, batch_size=None, moments=None):
    del x, batch_size, moments
    for layer in layers_lib.batch_norm_layers(model):
      layer.moving_mean.assign(np.full(layer.moving_mean.shape, np.nan,
                                       np.float32))
    return 0

  cfg = bn_cfg(tmp_path, "poisoned", deterministic=True)
  monkeypatch.setattr(function_lib, "recompute_batch_norm", poisoned)
  trainer = training.Trainer(cfg, one_device())
  results = trainer.run()
  assert results["status"] == "completed"
  for row in results["history"]:
    assert all(np.isnan(row[key]) for key in RECOMPUTED
               if "loss" in key)
  on_disk = rundir.read_results(cfg.model_dir)
  assert np.isnan(on_disk["history"][-1]["train_loss" + SUFFIX])
  with open(os.path.join(cfg.model_dir, rundir.RESULTS_FILE)) as f:
    raw = json.load(f)["history"][-1]  # JSON null, named in non_finite.
  assert raw["train_loss" + SUFFIX] is None
  assert raw["non_finite"]["train_loss" + SUFFIX] == "nan"
  monkeypatch.undo()
  reference = training.Trainer(bn_cfg(tmp_path, "plain", deterministic=True,
                                      eval_recompute_bn=False), one_device())
  reference.run()
  for a, b in zip(state(trainer.model), state(reference.model)):
    assert np.array_equal(a, b)


class InfoCallback(training.Callback):
  """Says how it measures, from what it saw at the start of training."""
  name = "probe"
  every_epochs = 1

  def __init__(self):
    self.examples = None

  def on_train_begin(self, ctx):
    self.examples = ctx.train_data.info.num_examples

  def info(self):
    return {"bn_mode": "batch", "examples": self.examples, "layers": [1, 2]}

  def __call__(self, ctx):
    return {"probe/one": 1.0}


class SilentCallback(InfoCallback):
  name = "silent"

  def info(self):
    return {}


def test_callbacks_info_in_results(tmp_path):
  cfg = conftest.synthetic_cfg(tmp_path, epochs=1)
  results = training.train(cfg, one_device(),
                           callbacks=[InfoCallback(), SilentCallback()])
  want = {"probe": {"bn_mode": "batch", "examples": 96, "layers": [1, 2]}}
  assert results["callbacks"] == want
  assert rundir.read_results(cfg.model_dir)["callbacks"] == want
