"""The interpolation tool (tfcapacity.interpolate) and tfcapacity.landscape.

Four tiny digits runs are trained once: two MLPs 64-8-10 without
normalisation (checked against a numpy forward pass at every alpha) and two
MLPs 64-8-8-10 with batch norm (end points, recomputed statistics checked
against numpy and against training mode on the whole training batch).
"""

import json
import os

import keras
import numpy as np
import pytest

from tfcapacity import config
from tfcapacity import data as data_lib
from tfcapacity import interpolate
from tfcapacity import landscape
from tfcapacity import rundir
from tfcapacity import training
from tfcapacity.errors import UserError
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

PROG = "tfcapacity.interpolate"
SUBSET = 300
KEYS = ("alphas", "train_loss", "train_top1_error", "test_loss",
        "test_top1_error", "bn_stats", "num_train_examples",
        "num_test_examples", "dataset", "from", "to", "distance", "seconds")


def compute(*args):
  return conftest.compute_tool(interpolate, "--nofigure", *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("interpolate_cli")
  dirs = {}
  for name, depth, norm, seed, batch in (("plain_a", 1, "none", 0, "32"),
                                         ("plain_b", 1, "none", 1, "128"),
                                         ("bn_a", 2, "batch", 0, "32"),
                                         ("bn_b", 2, "batch", 1, "128")):
    model_dir = str(root / name)
    cfg = config.make(dataset="digits", width=8, depth=depth, epochs=1,
                      normalization=norm, seed=seed, batch_size=batch,
                      train_subset=SUBSET, model_dir=model_dir,
                      progress_bar=False)
    assert training.train(cfg)["status"] == "completed"
    dirs[name] = model_dir
  return dirs


def examples(run_dir, split, n=None):
  """The first n examples of the run's split (--noshuffle)."""
  cfg = config.parse_flagfile(open(os.path.join(run_dir,
                                                "flags.txt")).read())
  ds = data_lib.get(cfg.dataset, split, cfg)
  n = ds.info.num_examples if n is None else min(n, ds.info.num_examples)
  x, y = ds.examples(np.arange(n))
  return np.asarray(x, np.float32), np.asarray(y, np.int64)


def np_loss_error(logits, y):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  loss = -log_p[np.arange(len(y)), y].mean()
  return loss, float(np.mean(logits.argmax(axis=1) != y))


def model_loss_error(model, x, y, training=False):
  return np_loss_error(model(x, training=training).numpy(), y)


def test_cli_end_points_are_the_two_models(runs, tmp_path):
  out = tmp_path / "interp.json"
  proc = conftest.run_tool(PROG, f"--from={runs['bn_a']}",
                           f"--to={runs['bn_b']}", "--bn_stats=interpolate",
                           "--num_points=5", "--alpha_range=0,1",
                           "--noprogress_bar", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  for key in KEYS:
    assert key in result, key
  assert os.path.isfile(tmp_path / "interp.png")
  assert result["figure"] == str(tmp_path / "interp.png")
  assert result["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
  # The whole splits by default: the run's train subset, all test digits.
  x, y = examples(runs["bn_b"], "train")
  xt, yt = examples(runs["bn_b"], "test")
  assert result["num_train_examples"] == len(y) == SUBSET
  assert result["num_test_examples"] == len(yt)
  assert result["batch_norm_layers"] == 2
  assert result["bn_stats"] == "interpolate"
  assert result["loss"] == "cross_entropy"  # The --to run's own.
  assert result["from"]["step"] > 0 and result["to"]["step"] > 0
  for index, name in ((0, "bn_a"), (-1, "bn_b")):
    model, _, _ = rundir.load_run_model(runs[name])
    for split, (xs, ys) in (("train", (x, y)), ("test", (xt, yt))):
      loss, error = model_loss_error(model, xs, ys)
      assert result[f"{split}_loss"][index] == pytest.approx(loss, rel=1e-5)
      assert result[f"{split}_top1_error"][index] == pytest.approx(error)


def plain_thetas(runs):
  """The float64 weights of the two plain MLP runs, A then B."""
  return [[np.asarray(v.numpy(), np.float64) for v in
           rundir.load_run_model(runs[name])[0].weights]
          for name in ("plain_a", "plain_b")]


def interpolated_logits(thetas, alpha, x):
  """The one-hidden-layer ReLU MLP at (1 - alpha) A + alpha B, in numpy."""
  k0, b0, k1, b1 = ((1 - alpha) * a + alpha * b for a, b in zip(*thetas))
  return np.maximum(x @ k0 + b0, 0.0) @ k1 + b1


def test_midpoints_match_numpy(runs):
  result = compute(f"--from={runs['plain_a']}", f"--to={runs['plain_b']}",
                   "--num_points=5", "--alpha_range=-0.5,1.5")
  assert result["alphas"] == [-0.5, 0.0, 0.5, 1.0, 1.5]
  assert result["batch_norm_layers"] == 0
  thetas = plain_thetas(runs)
  data = {"train": examples(runs["plain_b"], "train"),
          "test": examples(runs["plain_b"], "test")}
  for i, alpha in enumerate(result["alphas"]):
    for split, (x, y) in data.items():
      logits = interpolated_logits(thetas, alpha, x)
      loss, error = np_loss_error(logits, y)
      assert result[f"{split}_loss"][i] == pytest.approx(loss, rel=1e-5)
      assert result[f"{split}_top1_error"][i] == pytest.approx(error)
  assert result["distance"] == pytest.approx(np.sqrt(sum(
      np.sum((a - b) ** 2) for a, b in zip(*thetas))), rel=1e-6)


def test_loss_flag_sets_the_loss_evaluated(runs):
  n = 100
  result = compute(f"--from={runs['plain_a']}", f"--to={runs['plain_b']}",
                   "--num_points=3", "--alpha_range=0,1", "--loss=squared",
                   f"--num_examples={n}", "--noshuffle")
  assert result["loss"] == "squared"
  thetas = plain_thetas(runs)
  x, y = examples(runs["plain_b"], "train", n)
  onehot = np.eye(10)[y]
  for i, alpha in enumerate(result["alphas"]):
    logits = interpolated_logits(thetas, alpha, x)
    squared = np.mean(0.5 * np.sum((logits - onehot) ** 2, axis=1))
    assert result["train_loss"][i] == pytest.approx(squared, rel=1e-5)
    # Errors come from the logits whatever the loss.
    assert result["train_top1_error"][i] == pytest.approx(
        np_loss_error(logits, y)[1])
    assert squared != pytest.approx(np_loss_error(logits, y)[0], rel=1e-2)


def test_from_init_is_the_step_zero_checkpoint(runs):
  args = (f"--to={runs['plain_b']}", "--num_points=2", "--alpha_range=0,1",
          "--num_examples=50", "--noshuffle")
  init = compute("--from_init", *args)
  step0 = compute(f"--from={runs['plain_b']}", "--from_checkpoint=0", *args)
  assert init["from"]["at_init"] and init["from"]["checkpoint"] is None
  assert init["num_train_examples"] == init["num_test_examples"] == 50
  for key in ("train_loss", "test_loss", "train_top1_error"):
    assert init[key] == step0[key], key


def test_recompute_is_training_mode_on_the_whole_batch(runs):
  n = 200
  result = compute(f"--from={runs['bn_a']}", f"--to={runs['bn_b']}",
                   "--num_points=3", "--alpha_range=0,1", "--noshuffle",
                   f"--num_examples={n}", "--batch_size=64")
  assert result["bn_stats"] == "recompute"
  x, y = examples(runs["bn_b"], "train", n)
  model_a, _, _ = rundir.load_run_model(runs["bn_a"])
  model_b, _, _ = rundir.load_run_model(runs["bn_b"])
  theta_a, theta_b = landscape.snapshot(model_a), landscape.snapshot(model_b)
  for i, alpha in enumerate(result["alphas"]):
    values, _ = landscape.interpolate(model_b, theta_a, theta_b, alpha)
    landscape.assign_weights(model_a, values)
    # Training mode, one batch of all the examples: batch statistics.
    loss, error = model_loss_error(model_a, x, y, training=True)
    assert result["train_loss"][i] == pytest.approx(loss, rel=1e-5)
    assert result["train_top1_error"][i] == pytest.approx(error)
  # The end points' own moving statistics give other losses.
  own = compute(f"--from={runs['bn_a']}", f"--to={runs['bn_b']}",
                "--num_points=3", "--alpha_range=0,1", "--noshuffle",
                f"--num_examples={n}", "--bn_stats=interpolate")
  assert own["train_loss"][0] != pytest.approx(result["train_loss"][0],
                                               rel=1e-4)


def test_recomputed_statistics_match_numpy(runs):
  model, _, _ = rundir.load_run_model(runs["bn_b"])
  x, _ = examples(runs["bn_b"], "train", 150)
  evaluator = landscape.Evaluator(model, batch_size=40)
  evaluator.recompute_batch_norm(x)
  weights = {v.path: np.asarray(v.numpy(), np.float64) for v in model.weights}
  h = np.asarray(x, np.float64)
  for i in range(2):
    h = h @ weights[f"hidden_{i}/kernel"]  # No bias before batch norm.
    norm = model.get_layer(f"hidden_{i}_norm")
    assert norm.moving_mean.numpy() == pytest.approx(h.mean(axis=0),
                                                     rel=1e-5, abs=1e-5)
    assert norm.moving_variance.numpy() == pytest.approx(h.var(axis=0),
                                                         rel=1e-4, abs=1e-6)
    h = (h - h.mean(axis=0)) / np.sqrt(h.var(axis=0) + norm.epsilon)
    h = np.maximum(h * weights[f"hidden_{i}_norm/gamma"]
                   + weights[f"hidden_{i}_norm/beta"], 0.0)


def test_interpolated_variances_are_clipped(runs):
  model, _, _ = rundir.load_run_model(runs["bn_b"])
  theta = landscape.snapshot(model)
  other = [np.array(t) for t in theta]
  variances = [i for i, v in enumerate(model.weights)
               if v.path.endswith("moving_variance")]
  for i in variances:
    other[i] = other[i] * 4.0
  values, clipped = landscape.interpolate(model, other, theta, 1.5)
  # 1.5 v - 0.5 (4 v) = -0.5 v < 0 on every channel.
  assert clipped == sum(theta[i].size for i in variances)
  assert all(np.all(values[i] == 0.0) for i in variances)


def test_filter_normalized_directions():
  inputs = keras.Input((6, 6, 2))
  h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
  h = keras.layers.BatchNormalization(name="norm")(h)
  h = keras.layers.Flatten()(h)
  logits = keras.layers.Dense(3, name="dense")(h)
  model = keras.Model(inputs, logits)
  theta = landscape.snapshot(model)
  theta[0][..., 1] = 0.0  # A zero filter stays zero.
  direction = landscape.filter_normalized_direction(
      model, theta, np.random.default_rng(0))
  for variable, d, t in zip(model.weights, direction, theta):
    if variable.path in ("conv/kernel", "dense/kernel"):
      axes = tuple(range(d.ndim - 1))
      np.testing.assert_allclose(np.linalg.norm(d.reshape(-1, d.shape[-1]),
                                                axis=0),
                                 np.sqrt(np.sum(np.square(t), axis=axes)),
                                 rtol=1e-6)
      assert not np.allclose(d, t * (np.linalg.norm(d) / np.linalg.norm(t)))
    else:  # Biases, gamma, beta, moving statistics: Li et al.'s biasbn.
      assert not np.any(d), variable.path
  assert not np.any(direction[0][..., 1])


def test_plane_grid(runs):
  result = compute("--plane", f"--to={runs['bn_b']}", "--num_points=3",
                   "--bn_stats=keep", "--num_examples=100", "--noshuffle")
  assert result["mode"] == "plane" and result["alphas"] == [-1.0, 0.0, 1.0]
  assert result["betas"] == result["alphas"]
  grid = np.asarray(result["train_loss"])
  assert grid.shape == (3, 3) and np.all(np.isfinite(grid))
  # The centre is the model itself, with its own moving statistics.
  model, _, _ = rundir.load_run_model(runs["bn_b"])
  x, y = examples(runs["bn_b"], "train", 100)
  loss, error = model_loss_error(model, x, y)
  assert grid[1, 1] == pytest.approx(loss, rel=1e-5)
  assert result["train_top1_error"][1][1] == pytest.approx(error)
  assert grid.max() > grid[1, 1]
  assert result["direction_norms"][0] == pytest.approx(np.sqrt(sum(
      np.sum(np.square(v.numpy())) for v in model.trainable_weights
      if len(v.shape) > 1)), rel=1e-6)


def test_bad_inputs_one_line(runs, tmp_path):
  keep = f"--output={tmp_path / 'out.json'}"
  two = (f"--from={runs['bn_a']}", f"--to={runs['bn_b']}")
  cases = [
      ((*two, "--num_points=1", keep), "--num_points must be at least 2"),
      ((*two, "--alpha_range=1,0", keep), "LOW < HIGH"),
      ((*two, "--alpha_range=0,x", keep), "two numbers"),
  ]
  for args, needle in cases:
    proc = conftest.run_tool(PROG, *args)
    conftest.assert_one_line_error(proc, needle, prog=PROG)
  # Found after loading both models (in-process: a TensorFlow start-up per
  # subprocess is slow); run_tool turns the UserError into the same line.
  with pytest.raises(UserError, match="different architectures: 4 and 12"):
    conftest.compute_tool(interpolate, f"--from={runs['plain_a']}",
                          f"--to={runs['bn_b']}", keep)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("args, needle", [
    (("--from_init", "--from=A"), "exactly one"),
    ((), "exactly one"),
    (("--from=A", "--plane"), "drop --from"),
    (("--from=A", "--bn_stats=keep"), "for --plane"),
    (("--plane", "--bn_stats=interpolate"), "two end points"),
    (("--from_init", "--from_checkpoint=3"), "drop --from_checkpoint"),
    (("--from=A", "--to_checkpoint=best"), "'latest', 'final' or a step"),
    (("--from=A", "--from_checkpoint=999"), "no checkpoint of step 999"),
])
def test_flag_checks(runs, args, needle):
  args = [a.replace("=A", f"={runs['bn_a']}") for a in args]
  fv = interpolate.flags.FlagValues()
  interpolate.define_flags(fv)
  fv(["prog", f"--to={runs['bn_b']}", "--output=/tmp/unused.json", *args])
  with pytest.raises(UserError) as raised:
    interpolate.check_flags(fv)
  assert needle in str(raised.value)
