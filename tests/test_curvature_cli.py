"""The curvature tools (tfcapacity.hessian, tfcapacity.sharpness) end to end.

One tiny run (digits, MLP of width 8: 610 parameters) is trained once. Its
flags carry --label_noise, --train_subset and --standardize on purpose: the
run's own data must use them, and a --dataset override must not. Results are
checked against a dense Hessian computed here by nested GradientTapes on the
run's exported model.keras, over the same examples. A second tiny run trains
with --loss=squared: the tools must measure the run's own loss by default,
checked against a float64 Hessian of a forward pass written here.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import data as data_lib
from tfcapacity import hessian
from tfcapacity import rundir
from tfcapacity import sharpness
from tfcapacity import training
from tfcapacity.curvature import report
from tfcapacity.errors import UserError
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
N = 40  # Examples of the measured loss.


def run_tool(module, *args, env=None):
  return conftest.run_tool(module, *args, env=env or ENV)


compute = conftest.compute_tool


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("curvature_cli") / "run")
  cfg = config.make(dataset="digits", width=8, depth=1, epochs=1,
                    batch_size="32", train_subset=400, label_noise=0.5,
                    standardize=True, model_dir=model_dir,
                    progress_bar=False)
  assert training.train(cfg)["status"] == "completed"
  return model_dir


def dense_hessian(model, x, y):
  """The Hessian of the mean cross-entropy, by nested tapes (float64)."""
  variables = model.trainable_variables
  with tf.GradientTape() as outer:
    with tf.GradientTape() as inner:
      logits = model(tf.constant(x), training=False)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.constant(y), logits=logits))
    grads = inner.gradient(loss, variables)
    flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
  blocks = outer.jacobian(flat, variables)
  size = int(flat.shape[0])
  h = tf.concat([tf.reshape(b, [size, -1]) for b in blocks], 1).numpy()
  h = h.astype(np.float64)
  return (h + h.T) / 2


def trained_model(run_dir):
  return keras.saving.load_model(os.path.join(run_dir, "model.keras"))


@pytest.fixture(scope="module")
def run_examples(run_dir):
  """The run's first N training examples, as training saw them."""
  cfg = config.parse_flagfile(open(os.path.join(run_dir, "flags.txt")).read())
  return data_lib.get(cfg.dataset, "train", cfg).examples(np.arange(N))


@pytest.fixture(scope="module")
def exact(run_dir, run_examples):
  hess = dense_hessian(trained_model(run_dir), *run_examples)
  return {"eigenvalues": np.linalg.eigvalsh(hess)[::-1],
          "trace": float(np.trace(hess))}


@pytest.fixture(scope="module")
def cli_result(run_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("hessian_out") / "hessian.json")
  proc = run_tool("tfcapacity.hessian", f"--model_dir={run_dir}",
                  f"--num_examples={N}", "--noshuffle", "--top_k=2",
                  "--tol=1e-4", "--max_iterations=500", "--trace",
                  "--density", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f), out


def test_hessian_cli_matches_the_dense_hessian(cli_result, exact):
  result, out = cli_result
  for key in ("eigenvalues", "residuals", "relative_residuals", "iterations",
              "trace", "trace_stderr", "density", "num_examples", "bn_mode",
              "seconds", "method", "hvp_method", "num_parameters",
              "converged", "source", "checkpoint", "step", "dataset"):
    assert key in result, key
  assert result["num_examples"] == N and result["num_parameters"] == 610
  assert result["bn_mode"] == "inference" and result["source"] == "model_dir"
  assert result["converged"] is True
  np.testing.assert_allclose(result["eigenvalues"], exact["eigenvalues"][:2],
                             rtol=1e-4)
  assert abs(result["trace"] - exact["trace"]) <= 3 * result["trace_stderr"]
  assert len(result["density"]["grid"]) == len(result["density"]["values"])
  png = out[:-len(".json")] + "_density.png"
  assert os.path.getsize(png) > 1000
  assert result["density_figure"] == png


def test_lanczos_agrees_with_power_iteration(run_dir, cli_result, exact):
  result = compute(hessian, f"--model_dir={run_dir}", f"--num_examples={N}",
                   "--noshuffle", "--top_k=2", "--method=lanczos")
  assert result["method"] == "lanczos"
  np.testing.assert_allclose(result["eigenvalues"],
                             cli_result[0]["eigenvalues"], rtol=1e-4)
  np.testing.assert_allclose(result["eigenvalues"], exact["eigenvalues"][:2],
                             rtol=1e-4)


def test_hdf5_override_is_the_loss_over_exactly_the_files_examples(
    run_dir, tmp_path):
  """The contract: the file's rows and labels as stored, nothing else.

  The run's --standardize, --label_noise and --train_subset (all set) must
  not touch the override's data.
  """
  n = 30
  path = tmp_path / "probe.h5"
  x, y = conftest.write_digits_probe(path, n, seed=5)
  loaded = rundir.load(rundir.Request(
      model_dir=run_dir, dataset=f"hdf5:{path}", num_examples=n,
      shuffle=False))
  np.testing.assert_array_equal(loaded.x, x)
  np.testing.assert_array_equal(loaded.y, y)

  result = compute(hessian, f"--model_dir={run_dir}",
                   f"--dataset=hdf5:{path}", "--noshuffle",
                   f"--num_examples={n}", "--top_k=2", "--method=lanczos")
  assert result["dataset"] == f"hdf5:{path}" and result["num_examples"] == n
  exact = np.linalg.eigvalsh(dense_hessian(trained_model(run_dir), x, y))
  np.testing.assert_allclose(result["eigenvalues"], exact[::-1][:2],
                             rtol=1e-4)


def test_saved_and_keras_models_equal_the_run_directory(run_dir,
                                                         run_examples):
  common = [f"--num_examples={N}", "--noshuffle", "--method=lanczos"]
  # --dataset=digits is the clean data; the run's own data has its noise.
  own = compute(hessian, f"--model_dir={run_dir}", *common)
  clean = compute(hessian, f"--model_dir={run_dir}", "--dataset=digits",
                  *common)
  saved = compute(hessian, f"--saved_model={run_dir}/saved_model",
                  "--dataset=digits", *common)
  kept = compute(hessian, f"--keras_model={run_dir}/model.keras",
                 "--dataset=digits", *common)
  assert own["eigenvalues"][0] != pytest.approx(clean["eigenvalues"][0],
                                                rel=1e-3)
  for other in (saved, kept):
    assert other["eigenvalues"][0] == pytest.approx(clean["eigenvalues"][0],
                                                    rel=1e-5)
  assert saved["source"] == "saved_model" and kept["source"] == "keras_model"
  x, y = data_lib.get("digits", "train").examples(np.arange(N))
  loaded = rundir.load(rundir.Request(
      keras_model=f"{run_dir}/model.keras", dataset="digits",
      num_examples=N, shuffle=False))
  np.testing.assert_array_equal(loaded.x, x)
  np.testing.assert_array_equal(loaded.y, y)
  assert not np.array_equal(run_examples[1], y)  # The noise is there.


def test_checkpoint_by_step(run_dir):
  assert rundir.checkpoint_steps(run_dir)[0] == 0
  start = compute(hessian, f"--model_dir={run_dir}", "--checkpoint=0",
                  f"--num_examples={N}", "--method=lanczos")
  latest = compute(hessian, f"--model_dir={run_dir}", f"--num_examples={N}",
                   "--method=lanczos")
  assert start["step"] == 0 and latest["step"] > 0
  assert start["eigenvalues"][0] != pytest.approx(latest["eigenvalues"][0],
                                                  rel=1e-3)


def model_files(run_dir):
  paths = [os.path.join(run_dir, "model.keras")]
  for root, _, names in os.walk(os.path.join(run_dir, "checkpoints")):
    paths += [os.path.join(root, n) for n in names]
  for root, _, names in os.walk(os.path.join(run_dir, "saved_model")):
    paths += [os.path.join(root, n) for n in names]
  return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths}


def test_sharpness(run_dir, tmp_path):
  before = model_files(run_dir)
  out = tmp_path / "sharpness.json"
  proc = run_tool("tfcapacity.sharpness", f"--model_dir={run_dir}",
                  f"--num_examples={N}", "--epsilon=1e-3", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  large = json.loads(out.read_text())
  for key in ("sharpness", "epsilon", "loss", "loss_value", "max_loss",
              "iterations", "evaluations", "method", "num_examples",
              "bn_mode", "seconds", "source"):
    assert key in large, key
  assert large["method"] == "lbfgsb" and large["bn_mode"] == "inference"
  # "loss" names the loss function (the run's), as in every tool's JSON.
  assert large["loss"] == "cross_entropy"
  small = compute(sharpness, f"--model_dir={run_dir}", f"--num_examples={N}",
                  "--epsilon=5e-4")
  assert small["loss_value"] == pytest.approx(large["loss_value"], rel=1e-6)
  assert 0 <= small["sharpness"] <= large["sharpness"]
  assert large["max_loss"] >= large["loss_value"]

  # Neither a Keras model nor a SavedModel changes while it is measured.
  for request in (
      rundir.Request(keras_model=f"{run_dir}/model.keras",
                     dataset="digits", num_examples=N),
      rundir.Request(saved_model=f"{run_dir}/saved_model",
                     dataset="digits", num_examples=N)):
    loaded = rundir.load(request)
    weights = [v.numpy().copy() for v in loaded.model.trainable_variables]
    result = report.sharpness_report(loaded, epsilon=1e-3,
                                     optimizer="ascent", progress_bar=False)
    assert result["sharpness"] > 0
    for v, w in zip(loaded.model.trainable_variables, weights):
      np.testing.assert_array_equal(v.numpy(), w)
  assert model_files(run_dir) == before


def test_loss_objective_matches_the_model(run_dir):
  loaded = rundir.load(rundir.Request(model_dir=run_dir, num_examples=N,
                                      shuffle=False))
  op = report.make_operator(loaded)
  objective = report.LossObjective(op)
  x0 = objective.initial()
  assert x0.dtype == np.float64 and x0.shape == (610,)
  loss, grad = objective.loss_and_gradient(x0)
  assert grad.dtype == np.float64 and grad.shape == (610,)
  logits = loaded.model(loaded.x, training=False)
  expected = float(tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(labels=loaded.y,
                                                     logits=logits)))
  assert loss == pytest.approx(expected, rel=1e-5)


def test_bad_inputs_one_line_and_output_untouched(run_dir, tmp_path):
  out = tmp_path / "existing.json"
  out.write_text('{"kept": true}\n')
  keep = f"--output={out}"
  cases = [
      ("tfcapacity.hessian", [f"--model_dir={run_dir}"], "--output"),
      ("tfcapacity.sharpness", [f"--model_dir={run_dir}"], "--output"),
      ("tfcapacity.hessian", [f"--model_dir={run_dir}",
                              f"--saved_model={run_dir}/saved_model", keep],
       "give only one"),
      ("tfcapacity.hessian", [f"--saved_model={run_dir}/saved_model", keep],
       "needs --dataset"),
      ("tfcapacity.sharpness", [f"--model_dir={run_dir}", "--checkpoint=999",
                                keep], "available steps: 0, "),
      ("tfcapacity.hessian", [keep], "name a model"),
      ("tfcapacity.sharpness", [f"--model_dir={run_dir}", "--loss=hinge",
                                keep], "--loss"),
  ]
  for module, args, needle in cases:
    conftest.assert_one_line_error(run_tool(module, *args), needle,
                                   prog=module)
  # This one loads TensorFlow and the data first; in a plain environment
  # too, TensorFlow's own stderr lines stay hidden.
  plain = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
  conftest.assert_one_line_error(
      run_tool("tfcapacity.hessian", f"--model_dir={run_dir}",
               "--num_examples=5000", keep, env=plain),
      "exceeds the 400 train examples", prog="tfcapacity.hessian")
  assert out.read_text() == '{"kept": true}\n'
  assert sorted(os.listdir(tmp_path)) == ["existing.json"]


def test_request_errors_need_no_tensorflow(run_dir, tmp_path):
  with pytest.raises(UserError, match="not a directory"):
    rundir.Request(model_dir=str(tmp_path / "none")).validate()
  with pytest.raises(UserError, match="no flags.txt"):
    rundir.Request(model_dir=str(tmp_path)).validate()
  with pytest.raises(UserError, match="not a SavedModel"):
    rundir.Request(saved_model=run_dir, dataset="digits").validate()
  with pytest.raises(UserError, match="no such file"):
    rundir.Request(keras_model=str(tmp_path / "m.keras"),
                   dataset="digits").validate()
  with pytest.raises(UserError, match="--model_dir only"):
    rundir.Request(keras_model=f"{run_dir}/model.keras", dataset="digits",
                   checkpoint="3").validate()
  path, step = rundir.resolve_checkpoint(run_dir, "latest")
  assert step == rundir.checkpoint_steps(run_dir)[-1]
  assert path.endswith(f"ckpt-{step}")
  assert rundir.resolve_checkpoint(run_dir, "final")[0].endswith(
      "model.keras")


def test_per_layer_blocks(run_dir, run_examples):
  result = compute(hessian, f"--model_dir={run_dir}", f"--num_examples={N}",
                   "--noshuffle", "--per_layer", "--tol=1e-5",
                   "--max_iterations=2000")
  rows = result["per_layer"]
  assert [r["layer"] for r in rows] == ["hidden_0", "classifier"]
  assert [r["num_parameters"] for r in rows] == [64 * 8 + 8, 8 * 10 + 10]
  hess = dense_hessian(trained_model(run_dir), *run_examples)
  start = 0
  for row in rows:
    end = start + row["num_parameters"]
    values = np.linalg.eigvalsh(hess[start:end, start:end])
    assert row["lambda_max"] == pytest.approx(
        values[np.argmax(np.abs(values))], rel=1e-4)
    start = end


# --- The loss: the run's own (--loss=squared here), or --loss ---------------


@pytest.fixture(scope="module")
def squared_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("curvature_cli") / "squared")
  cfg = config.make(dataset="digits", width=8, depth=1, epochs=1,
                    batch_size="32", train_subset=400, loss="squared",
                    learning_rate=0.01, model_dir=model_dir,
                    progress_bar=False)
  assert training.train(cfg)["status"] == "completed"
  return model_dir


def mlp_hessian64(run_dir, x, y, loss):
  """The Hessian of the mean `loss` of the run's MLP 64-8-10 (ReLU) over
  (x, y): a float64 forward pass written here from model.keras's weights,
  differentiated by nested tapes."""
  weights = [tf.constant(np.asarray(w, np.float64))
             for w in trained_model(run_dir).get_weights()]
  size = sum(int(np.prod(w.shape)) for w in weights)
  flat = tf.Variable(tf.concat([tf.reshape(w, [-1]) for w in weights], 0))
  x = tf.constant(np.asarray(x, np.float64))
  onehot = tf.one_hot(np.asarray(y), 10, dtype=tf.float64)
  with tf.GradientTape() as outer:
    with tf.GradientTape() as inner:
      k0, b0, k1, b1 = (tf.reshape(part, w.shape) for part, w in zip(
          tf.split(flat, [int(np.prod(w.shape)) for w in weights]), weights))
      logits = tf.nn.relu(x @ k0 + b0) @ k1 + b1
      if loss == "squared":
        per_example = 0.5 * tf.reduce_sum(tf.square(logits - onehot), -1)
      else:
        per_example = -tf.reduce_sum(onehot * tf.nn.log_softmax(logits), -1)
      mean = tf.reduce_mean(per_example)
    grad = inner.gradient(mean, flat)
  hess = outer.jacobian(grad, flat).numpy()
  assert hess.shape == (size, size)
  return (hess + hess.T) / 2


def first_examples(run_dir, n):
  cfg = config.parse_flagfile(open(os.path.join(run_dir, "flags.txt")).read())
  return data_lib.get(cfg.dataset, "train", cfg).examples(np.arange(n))


def test_hessian_measures_the_runs_own_loss(squared_run):
  x, y = first_examples(squared_run, N)
  result = compute(hessian, f"--model_dir={squared_run}",
                   f"--num_examples={N}", "--noshuffle", "--tol=1e-6",
                   "--max_iterations=3000")
  assert result["loss"] == "squared" and result["converged"] is True
  squared = np.linalg.eigvalsh(mlp_hessian64(squared_run, x, y, "squared"))
  entropy = np.linalg.eigvalsh(mlp_hessian64(squared_run, x, y,
                                             "cross_entropy"))
  top = lambda values: values[np.argmax(np.abs(values))]  # Power iteration.
  assert result["eigenvalues"][0] == pytest.approx(top(squared), rel=1e-4)
  # The two losses' curvatures differ: the check above can tell them apart.
  assert top(squared) != pytest.approx(top(entropy), rel=1e-2)

  # --loss overrides the run's own.
  other = compute(hessian, f"--model_dir={squared_run}",
                  "--loss=cross_entropy", f"--num_examples={N}",
                  "--noshuffle", "--method=lanczos")
  assert other["loss"] == "cross_entropy"
  assert other["eigenvalues"][0] == pytest.approx(entropy[-1], rel=1e-4)


def test_sharpness_and_model_files_take_the_loss(squared_run):
  loss_of = {}
  for loss in ("squared", "cross_entropy"):
    loaded = rundir.load(rundir.Request(
        keras_model=f"{squared_run}/model.keras", dataset="digits",
        num_examples=N, shuffle=False, loss=loss))
    logits = np.asarray(loaded.model(loaded.x, training=False), np.float64)
    onehot = np.eye(10)[loaded.y]
    shifted = logits - logits.max(axis=1, keepdims=True)
    loss_of[loss] = float(np.mean(
        0.5 * np.sum((logits - onehot) ** 2, axis=1) if loss == "squared"
        else np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(N),
                                                           loaded.y]))
  # A model file records no loss: cross-entropy unless --loss says.
  default = compute(sharpness, f"--keras_model={squared_run}/model.keras",
                    "--dataset=digits", f"--num_examples={N}", "--noshuffle",
                    "--max_iterations=2")
  assert default["loss"] == "cross_entropy"
  assert default["loss_value"] == pytest.approx(loss_of["cross_entropy"],
                                                rel=1e-5)
  own = compute(sharpness, f"--model_dir={squared_run}", "--dataset=digits",
                f"--num_examples={N}", "--noshuffle", "--max_iterations=2")
  assert own["loss"] == "squared"
  assert own["loss_value"] == pytest.approx(loss_of["squared"], rel=1e-5)


def test_loading_and_checking_need_no_tensorflow(run_dir, tmp_path):
  """The run-directory contract and the tools' flag checks load no
  TensorFlow (the sweep runner and the study reports import them)."""
  code = f"""
import sys
from absl import flags
from tfcapacity import cli, confusion, hessian, interpolate, rundir, sharpness
from tfcapacity.errors import UserError
for tool in (hessian, sharpness, confusion):
  fv = flags.FlagValues()
  tool.define_flags(fv)
  fv(["prog", "--model_dir={run_dir}", "--output=x.json"])
  assert cli.request_from_flags(fv).loss is None
try:
  rundir.Request(model_dir="{run_dir}", loss="hinge").validate()
except UserError as e:
  assert "hinge" in str(e), e
else:
  raise AssertionError("loss=hinge accepted")
loaded = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")]
assert not loaded, loaded[:5]
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, env=ENV, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
