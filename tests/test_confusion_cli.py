"""The gradient-confusion tool (tfcapacity.confusion) end to end.

One tiny run (digits, MLP of width 8: 610 parameters) is trained once.
Results are checked against a brute-force computation here: one
GradientTape per example on the run's model.keras (or on a freshly built
model with the run's seed), and the statistics from the stacked gradients in
numpy.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import confusion
from tfcapacity import data as data_lib
from tfcapacity import models as models_lib
from tfcapacity import training
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
N = 24
PROG = "tfcapacity.confusion"
KEYS = ("gradient_confusion", "min_inner_product", "mean_inner_product",
        "min_cosine", "mean_cosine", "cosine_quantiles", "gradient_diversity",
        "noise_scale_simple", "gram_min_eigenvalue", "gram_condition_number",
        "gram_resolved", "num_examples", "bn_mode", "seconds", "source",
        "checkpoint", "step", "dataset", "num_parameters")


def run_tool(*args):
  return conftest.run_tool(PROG, *args, env=ENV)


def compute(*args):
  return conftest.compute_tool(confusion, *args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("confusion_cli") / "run")
  cfg = config.make(dataset="digits", width=8, depth=1, epochs=1,
                    batch_size="32", train_subset=400, model_dir=model_dir,
                    progress_bar=False)
  assert training.train(cfg)["status"] == "completed"
  return model_dir


def run_config(run_dir):
  return config.parse_flagfile(open(os.path.join(run_dir,
                                                 "flags.txt")).read())


@pytest.fixture(scope="module")
def run_examples(run_dir):
  cfg = run_config(run_dir)
  return data_lib.get(cfg.dataset, "train", cfg).examples(np.arange(N))


def brute_force(model, x, y, loss="cross_entropy"):
  """Statistics from single-example tapes, numpy float64."""
  rows = []
  for xi, yi in zip(np.asarray(x, np.float32), np.asarray(y, np.int64)):
    with tf.GradientTape() as tape:
      logits = model(xi[None], training=False)
      if loss == "squared":  # 1/2 ||logits - one_hot||^2.
        value = 0.5 * tf.reduce_sum(tf.square(
            logits[0] - tf.one_hot(yi, logits.shape[-1])))
      else:
        value = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.constant([yi], tf.int32), logits=logits)[0]
    grads = tape.gradient(value, model.trainable_variables)
    rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
  m = np.asarray(rows, np.float64)
  g = m @ m.T
  n = len(g)
  i, j = np.triu_indices(n, 1)
  norms = np.sqrt(np.diag(g))
  cos = g[i, j] / (norms[i] * norms[j])
  mean_sq = g.sum() / n**2
  trace_sigma = (np.trace(g) / n - mean_sq) * n / (n - 1)
  eig = np.linalg.eigvalsh(g)
  return {"gradient_confusion": max(0.0, -g[i, j].min()),
          "min_inner_product": g[i, j].min(),
          "mean_inner_product": g[i, j].mean(),
          "min_cosine": cos.min(), "mean_cosine": cos.mean(),
          "cosine_quantiles": dict(zip(("0.01", "0.5", "0.99"),
                                       np.quantile(cos, [0.01, 0.5, 0.99]))),
          "gradient_diversity": np.trace(g) / g.sum(),
          "noise_scale_simple": trace_sigma / mean_sq,
          "gram_min_eigenvalue": eig[0], **resolution(eig, n)}


def resolution(eig, n):
  """The spectrum's resolved flag and condition number in float32 (the
  model's precision): resolved iff lambda_min >= n eps_32 lambda_max, by the
  float64 eigenvalues; the flag is checked only clear of that edge."""
  edge = n * np.finfo(np.float32).eps * eig[-1]
  resolved = bool(eig[0] >= edge)
  out = {"gram_condition_number": (eig[-1] / eig[0] if resolved
                                   else float("nan"))}
  if abs(eig[0] - edge) > 0.1 * edge:
    out["gram_resolved"] = resolved
  return out


def assert_matches(result, exact):
  for key, value in exact.items():
    if key == "cosine_quantiles":
      for q, v in value.items():
        assert result[key][q] == pytest.approx(v, rel=1e-4, abs=1e-5), q
    elif key == "gram_resolved":
      assert result[key] is value, key  # A JSON true/false.
    elif key == "gram_condition_number" and np.isnan(value):
      assert result[key] is None or np.isnan(result[key]), key
    elif key in ("gram_min_eigenvalue", "gram_condition_number"):
      # The least eigenvalue of a near-singular G: absolute tolerance.
      scale = exact["gram_min_eigenvalue"] if key == "gram_min_eigenvalue" \
          else value
      assert result[key] == pytest.approx(value, rel=1e-2,
                                          abs=1e-4 * abs(scale) + 1e-6), key
    else:
      assert result[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def cli_result(run_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("confusion_out") / "confusion.json")
  proc = run_tool(f"--model_dir={run_dir}", "--checkpoint=final",
                  f"--num_examples={N}", "--noshuffle", "--chunk_size=10",
                  "--per_layer", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


def test_cli_matches_single_example_tapes(cli_result, run_dir,
                                          run_examples):
  result = cli_result
  for key in KEYS:
    assert key in result, key
  assert result["num_examples"] == N and result["num_parameters"] == 610
  assert result["bn_mode"] == "inference" and result["at_init"] is False
  assert result["loss"] == "cross_entropy"  # The run's own.
  model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
  assert_matches(result, brute_force(model, *run_examples))
  assert set(result["per_layer"]) == {
      v.path for v in model.trainable_variables}
  # The per-layer blocks sum to G: their mean inner products add up.
  assert sum(r["mean_inner_product"] for r in result["per_layer"].values()
             ) == pytest.approx(result["mean_inner_product"], rel=1e-5)


def test_at_init_is_the_freshly_built_model(run_dir, run_examples,
                                             cli_result, tmp_path):
  result = compute(f"--model_dir={run_dir}", "--at_init",
                   f"--num_examples={N}", "--noshuffle")
  assert result["at_init"] is True and result["step"] == 0
  assert result["gradient_confusion"] != pytest.approx(
      cli_result["gradient_confusion"], rel=1e-3)
  cfg = run_config(run_dir)
  info = data_lib.get(cfg.dataset, "train", cfg).info
  keras.utils.set_random_seed(cfg.seed)
  fresh = models_lib.from_config(cfg, info.input_shape, info.num_classes)
  assert_matches(result, brute_force(fresh, *run_examples))
  # Training's own step-0 checkpoint is the same model.
  start = compute(f"--model_dir={run_dir}", "--checkpoint=0",
                  f"--num_examples={N}", "--noshuffle")
  assert start["mean_inner_product"] == pytest.approx(
      result["mean_inner_product"], rel=1e-5)
  # A run directory with nothing but its flags: the same initial model.
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(run_dir, "flags.txt"), bare / "flags.txt")
  only_flags = compute(f"--model_dir={bare}", "--at_init",
                       f"--num_examples={N}", "--noshuffle")
  assert only_flags["checkpoint"] is None and only_flags["at_init"] is True
  for key in ("mean_inner_product", "gradient_confusion", "min_cosine"):
    assert only_flags[key] == result[key], key


def test_saved_model_ntk_and_features(run_dir, run_examples):
  model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
  x, y = run_examples
  saved = compute(f"--saved_model={run_dir}/saved_model", "--dataset=digits",
                  f"--num_examples={N}", "--noshuffle", "--chunk_size=7",
                  "--ntk")
  assert saved["source"] == "saved_model"
  assert_matches(saved, brute_force(model, x, y))
  # The NTK of the logits and the penultimate feature kernel, brute force.
  jac = []
  for xi in np.asarray(x, np.float32):
    rows = []
    for c in range(10):
      with tf.GradientTape() as tape:
        logit = model(xi[None], training=False)[0, c]
      grads = tape.gradient(logit, model.trainable_variables)
      rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
    jac.append(np.concatenate(rows))
  jac = np.asarray(jac, np.float64)
  kernel, bias = (v.numpy().astype(np.float64)
                  for v in model.get_layer("hidden_0").weights)
  feats = np.maximum(np.asarray(x, np.float64) @ kernel + bias, 0.0)
  keras_result = compute(f"--keras_model={run_dir}/model.keras",
                         "--dataset=digits", f"--num_examples={N}",
                         "--noshuffle", "--ntk",
                         "--feature_layer=penultimate")
  for result in (saved, keras_result):
    eig = np.linalg.eigvalsh(jac @ jac.T)
    assert result["ntk_min_eigenvalue"] == pytest.approx(
        eig[0], rel=1e-3, abs=1e-5 * eig[-1])
    assert result["ntk_max_eigenvalue"] == pytest.approx(eig[-1], rel=1e-4)
  eig = np.linalg.eigvalsh(feats @ feats.T / feats.shape[1])
  assert keras_result["features_min_eigenvalue"] == pytest.approx(
      eig[0], rel=1e-3, abs=1e-5 * eig[-1])
  assert keras_result["features_max_eigenvalue"] == pytest.approx(
      eig[-1], rel=1e-4)


def test_hdf5_is_exactly_the_files_examples(run_dir, tmp_path):
  n = 15
  path = tmp_path / "probe.h5"
  x, y = conftest.write_digits_probe(path, n, seed=3)
  result = compute(f"--keras_model={run_dir}/model.keras",
                   f"--dataset=hdf5:{path}", "--noshuffle",
                   f"--num_examples={n}", "--chunk_size=4")
  assert result["num_examples"] == n
  assert result["dataset"] == f"hdf5:{path}"
  model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
  assert_matches(result, brute_force(model, x, y))


def test_loss_flag_sets_the_per_example_loss(run_dir, run_examples):
  result = compute(f"--model_dir={run_dir}", "--checkpoint=final",
                   "--loss=squared", f"--num_examples={N}", "--noshuffle",
                   "--chunk_size=10")
  assert result["loss"] == "squared"
  model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
  squared = brute_force(model, *run_examples, loss="squared")
  assert_matches(result, squared)
  # Not the cross-entropy's statistics: the check above tells them apart.
  entropy = brute_force(model, *run_examples)
  assert squared["mean_inner_product"] != pytest.approx(
      entropy["mean_inner_product"], rel=1e-2)


def test_bad_inputs_one_line(run_dir, tmp_path):
  keep = f"--output={tmp_path / 'out.json'}"
  cases = [
      ([f"--model_dir={run_dir}", "--bn_mode=batch", keep],
       "--bn_mode=inference"),
      ([f"--saved_model={run_dir}/saved_model", "--dataset=digits",
        "--feature_layer=penultimate", keep], "--keras_model"),
      ([f"--model_dir={run_dir}", "--at_init", "--checkpoint=0", keep],
       "drop --checkpoint"),
      ([f"--keras_model={run_dir}/model.keras", "--dataset=digits",
        "--at_init", keep], "--at_init needs --model_dir"),
      ([f"--model_dir={run_dir}"], "--output"),
  ]
  for args, needle in cases:
    proc = run_tool(*args)
    conftest.assert_one_line_error(proc, needle, prog=PROG)
  assert not os.listdir(tmp_path)
