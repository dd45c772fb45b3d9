"""What the analysis tools show a researcher: figures, TensorBoard, --help.

One tiny run (digits, MLP of width 8: 610 parameters, one epoch) is trained
once. `tfcapacity.confusion` must draw the histogram of its pairwise
gradient cosines beside its JSON and, with --logdir, log the cosines as a
TensorBoard histogram whose count and mean are those of cosines computed
here by one GradientTape per example; `tfcapacity.hessian --logdir` must log
eigenvalues equal to its JSON's and to a dense Hessian's. Each tool's --help
lists only what it accepts, and its parser refuses the rest in one line.
"""

import json
import os

from absl import flags
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tfcapacity import config
from tfcapacity import confusion
from tfcapacity import hessian
from tfcapacity import rundir
from tfcapacity import training
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

N = 16  # Examples measured: 120 pairs.
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("analysis_figures") / "run")
  cfg = config.make(dataset="digits", width=8, depth=1, epochs=1,
                    batch_size="64", train_subset=256, export=False,
                    model_dir=model_dir, progress_bar=False)
  assert training.train(cfg)["status"] == "completed"
  return model_dir


def last_step(run_dir):
  return max(int(name.split("-")[1].split(".")[0])
             for name in os.listdir(os.path.join(run_dir, "checkpoints"))
             if name.startswith("ckpt-"))


def loaded_model(run_dir):
  """The run's latest checkpoint and its first N training examples."""
  return rundir.load(rundir.Request(model_dir=run_dir, num_examples=N,
                                    shuffle=False))


def events(logdir):
  """{tag: (step, value as numpy)} of every tensor summary in logdir."""
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    (event,) = acc.Tensors(tag)
    out[tag] = (event.step, tf.make_ndarray(event.tensor_proto))
  return out


def same_pixels(image_summary, path):
  """Whether a tf.summary.image value ([width, height, PNG]) shows the PNG
  file's pixels."""
  width, height, encoded = image_summary
  with open(path, "rb") as f:
    expected = tf.image.decode_png(f.read(), channels=4).numpy()
  got = tf.image.decode_png(encoded, channels=4).numpy()
  return (got.shape == expected.shape == (int(height), int(width), 4)
          and np.array_equal(got, expected))


def brute_force_cosines(model, x, y):
  """Cosines of the per-example cross-entropy gradients, pairs i < j."""
  rows = []
  for xi, yi in zip(x, y):
    with tf.GradientTape() as tape:
      logits = model(xi[None], training=False)
      loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.constant([yi], tf.int32), logits=logits)[0]
    grads = tape.gradient(loss, model.trainable_variables)
    rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
  m = np.asarray(rows, np.float64)
  m /= np.linalg.norm(m, axis=1, keepdims=True)
  return (m @ m.T)[np.triu_indices(len(m), 1)]


@pytest.fixture(scope="module")
def confusion_run(run_dir, tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("confusion_figure")
  out = str(out_dir / "confusion.json")
  logdir = str(out_dir / "tb" / "confusion")  # Created by the tool.
  proc = conftest.run_tool("tfcapacity.confusion", f"--model_dir={run_dir}",
                           f"--num_examples={N}", "--noshuffle",
                           f"--output={out}", f"--logdir={logdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f), out, logdir


def test_confusion_writes_a_png_of_its_cosines(confusion_run):
  result, out, _ = confusion_run
  png = out[:-len(".json")] + "_cosines.png"
  assert result["cosines_figure"] == png
  with open(png, "rb") as f:
    data = f.read()
  assert data.startswith(PNG)
  image = tf.image.decode_png(data).numpy()
  assert image.shape[0] > 300 and image.shape[1] > 500
  assert image.std() > 10  # Not a blank canvas.


def test_confusion_logs_its_cosines_to_tensorboard(run_dir, confusion_run):
  result, _, logdir = confusion_run
  found = events(logdir)
  loaded = loaded_model(run_dir)
  cosines = brute_force_cosines(loaded.model, loaded.x, loaded.y)
  assert len(cosines) == N * (N - 1) // 2
  assert result["mean_cosine"] == pytest.approx(cosines.mean(), abs=1e-5)
  # Every summary at the checkpoint's step.
  assert {step for step, _ in found.values()} == {last_step(run_dir)}
  assert result["step"] == last_step(run_dir)
  # The histogram: one count per pair, its buckets spanning min..max, and
  # its mean, from bucket centres, within half a bucket of the true mean.
  _, buckets = found["gradients/cosines"]
  left, right, counts = buckets.T
  assert counts.sum() == len(cosines) == N * (N - 1) // 2 - \
      result["excluded_pairs"]
  assert left[0] == pytest.approx(cosines.min(), abs=1e-5)
  assert right[-1] == pytest.approx(cosines.max(), abs=1e-5)
  width = float(np.max(right - left))
  mean = float(np.sum(counts * (left + right) / 2) / counts.sum())
  assert abs(mean - cosines.mean()) <= width / 2 + 1e-5
  assert abs(mean - result["mean_cosine"]) <= width / 2 + 1e-5
  # The headline scalars are the JSON's (float32 in the event file).
  for key in ("gradient_confusion", "min_cosine", "mean_cosine",
              "gradient_diversity"):
    assert float(found[f"gradients/{key}"][1]) == pytest.approx(
        result[key], rel=1e-6, abs=1e-7), key
  assert float(found["gradients/min_cosine"][1]) == pytest.approx(
      cosines.min(), abs=1e-5)
  # The figure, as an image: the PNG written beside the JSON.
  assert same_pixels(found["figures/gradient_cosines"][1],
                     result["cosines_figure"])


def dense_eigenvalues(model, x, y):
  """Eigenvalues (descending) of the Hessian of the mean cross-entropy."""
  variables = model.trainable_variables
  with tf.GradientTape() as outer:
    with tf.GradientTape() as inner:
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=tf.constant(y), logits=model(tf.constant(x),
                                              training=False)))
    flat = tf.concat([tf.reshape(g, [-1])
                      for g in inner.gradient(loss, variables)], 0)
  blocks = outer.jacobian(flat, variables)
  h = tf.concat([tf.reshape(b, [flat.shape[0], -1]) for b in blocks], 1)
  h = h.numpy().astype(np.float64)
  return np.linalg.eigvalsh((h + h.T) / 2)[::-1]


def produce(module, *args):
  """What the tool's main computes and writes besides its JSON (figures,
  TensorBoard), in-process: a TensorFlow start-up per subprocess is slow."""
  fv = flags.FlagValues()
  module.define_flags(fv)
  fv(["prog", "--noprogress_bar", *args])
  return module.produce(fv)


def test_hessian_logs_its_eigenvalues_and_density(run_dir, tmp_path):
  logdir = str(tmp_path / "tb")
  result = produce(
      hessian, f"--model_dir={run_dir}", f"--num_examples={N}",
      "--noshuffle", "--top_k=2", "--tol=1e-5", "--max_iterations=400",
      "--trace", "--trace_probes=5", "--density", "--density_runs=1",
      "--density_steps=10", f"--output={tmp_path / 'hessian.json'}",
      f"--logdir={logdir}")
  assert result["density_figure"] == str(tmp_path / "hessian_density.png")
  found = events(logdir)
  assert {step for step, _ in found.values()} == {last_step(run_dir)}
  for i, value in enumerate(result["eigenvalues"], 1):
    assert float(found[f"hessian/eigenvalue_{i}"][1]) == pytest.approx(
        value, rel=1e-6), i
  assert "hessian/eigenvalue_3" not in found
  assert float(found["hessian/trace"][1]) == pytest.approx(result["trace"],
                                                           rel=1e-6)
  loaded = loaded_model(run_dir)
  exact = dense_eigenvalues(loaded.model, loaded.x, loaded.y)
  assert float(found["hessian/eigenvalue_1"][1]) == pytest.approx(
      exact[0], rel=1e-3)
  with open(result["density_figure"], "rb") as f:
    assert f.read().startswith(PNG)
  assert same_pixels(found["figures/hessian_density"][1],
                     result["density_figure"])


def test_at_init_logs_at_step_zero(run_dir, tmp_path):
  result = produce(confusion, f"--model_dir={run_dir}", "--at_init",
                   "--num_examples=4", "--nofigure",
                   f"--output={tmp_path / 'confusion.json'}",
                   f"--logdir={tmp_path / 'tb'}")
  assert "cosines_figure" not in result
  assert os.listdir(tmp_path) == ["tb"]
  found = events(str(tmp_path / "tb"))
  assert {step for step, _ in found.values()} == {0}
  assert found["gradients/cosines"][1][:, 2].sum() == 6


def flag_entries(help_text):
  """{flag name: its help entry} of absl's --help output."""
  entries, name = {}, None
  for line in help_text.splitlines():
    stripped = line.strip()
    if line.startswith("  --"):
      name = stripped[2:].split(":")[0].replace("[no]", "")
      entries[name] = stripped
    elif name and line.startswith("    "):
      entries[name] += " " + stripped
    else:
      name = None
  return entries


def tool_help(module):
  proc = conftest.run_tool(f"tfcapacity.{module}", "--help")
  return flag_entries(proc.stdout)


def test_help_lists_only_what_each_tool_accepts():
  confusion_help = tool_help("confusion")
  assert confusion_help["bn_mode"].startswith("--bn_mode: <auto|inference>:")
  assert "ghost" not in confusion_help["bn_mode"]
  for name in ("ghost_batch_size", "batch_size"):
    assert name not in confusion_help
  assert not any("Hessian-vector" in text for text in confusion_help.values())
  for name in ("figure", "logdir"):
    assert name in confusion_help
  hessian_help = tool_help("hessian")
  assert hessian_help["bn_mode"].startswith(
      "--bn_mode: <auto|inference|batch|ghost>:")
  assert "Hessian-vector-product batch" in hessian_help["batch_size"]
  assert "hessian/eigenvalue_1" in hessian_help["logdir"]
  interpolate_help = tool_help("interpolate")
  for name in ("model_dir", "checkpoint", "saved_model", "keras_model",
               "at_init", "split", "dtype", "bn_mode", "ghost_batch_size",
               "layers", "include_slopes"):
    assert name not in interpolate_help, name
  assert "(default: '-1')" in interpolate_help["num_examples"]
  assert "default 500" not in interpolate_help["num_examples"]
  for name in ("to", "from", "figure", "batch_size"):
    assert name in interpolate_help
  assert "logdir" not in tool_help("sharpness")


@pytest.mark.parametrize("module, args, fragments", [
    ("confusion", ["--bn_mode=ghost"],
     ["--bn_mode=ghost", "<auto|inference>", "--bn_mode=inference"]),
    ("confusion", ["--bn_mode=batch"], ["<auto|inference>"]),
    ("confusion", ["--ghost_batch_size=4"], ["--ghost_batch_size does not "
                                             "apply", "moving statistics"]),
    ("hessian", ["--bn_mode=moving"], ["<auto|inference|batch|ghost>"]),
    ("interpolate", ["--to=RUN", "--from_init", "--model_dir=RUN"],
     ["--model_dir does not apply", "--from/--to"]),
    ("interpolate", ["--to=RUN", "--from_init", "--bn_mode=inference"],
     ["--bn_mode does not apply", "--bn_stats"]),
    ("interpolate", ["--to=RUN", "--from_init", "--noinclude_slopes"],
     ["--include_slopes does not apply"]),
])
def test_refused_by_the_parser_in_one_line(tmp_path, module, args,
                                           fragments):
  args = [a.replace("RUN", str(tmp_path)) for a in args]
  proc = conftest.run_tool(f"tfcapacity.{module}", *args,
                           f"--output={tmp_path / 'out.json'}")
  conftest.assert_one_line_error(proc, *fragments, prog=f"tfcapacity.{module}")
  assert not os.path.exists(tmp_path / "out.json")


def test_logdir_is_checked_before_computing(run_dir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  for logdir, fragment in ((blocker, "is a file"),
                           (blocker / "tb", f"lies under a file, {blocker}")):
    proc = conftest.run_tool("tfcapacity.hessian", f"--model_dir={run_dir}",
                             f"--output={tmp_path / 'h.json'}",
                             f"--logdir={logdir}")
    conftest.assert_one_line_error(proc, f"--logdir={logdir}", fragment,
                                   prog="tfcapacity.hessian")
  assert sorted(os.listdir(tmp_path)) == ["file"]
