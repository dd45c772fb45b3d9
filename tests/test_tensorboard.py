"""What TensorBoard shows, read with TensorBoard's own event reader.

A tiny sweep of two cells (widths 4 and 8, with curvature and gradient
measurements) and a lone run are read back through
`event_multiplexer.EventMultiplexer`, as the TensorBoard server reads them:
the HParams sessions and experiment (parsed with the hparams plugin's
metadata functions), the runs and their tags, the cosine histogram, the
custom-scalars layout, and that no non-finite scalar was written.
"""

import io
import math
import os
import sys

from absl import logging
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--dataset=digits", "--depth=1", "--epochs=2", "--batch_size=64",
        "--noexport", "--curvature_every_epochs=1", "--curvature_examples=64",
        "--curvature_test_batches=1", "--gradients_every_epochs=1",
        "--gradients_examples=16"]


def multiplexer(logdir):
  from tensorboard.backend.event_processing import event_multiplexer
  m = event_multiplexer.EventMultiplexer(size_guidance={"tensors": 0})
  m.AddRunsFromDirectory(str(logdir))
  m.Reload()
  return m


def hparams_of(m):
  """{run: ("experiment", Experiment) or ("session", SessionStartInfo)}."""
  from tensorboard.plugins.hparams import metadata
  out = {}
  for run, tags in m.Runs().items():
    for tag in tags["tensors"]:
      content = m.SummaryMetadata(run, tag).plugin_data.content
      if tag == metadata.EXPERIMENT_TAG:
        out.setdefault(run, {})["experiment"] = (
            metadata.parse_experiment_plugin_data(content))
      elif tag == metadata.SESSION_START_INFO_TAG:
        out.setdefault(run, {})["session"] = (
            metadata.parse_session_start_info_plugin_data(content))
  return out


def plugin_tags(m, run, plugin):
  return {tag for tag in m.Runs()[run]["tensors"]
          if m.SummaryMetadata(run, tag).plugin_data.plugin_name == plugin}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tb_sweep")
  base = root / "base.flags"
  base.write_text("\n".join(BASE) + "\n")
  proc = run_cli(os.path.join(ROOT, "tools", "sweep.py"),
                 f"--flagfile={base}", "--grid=width=4,8",
                 f"--sweep_dir={root / 'sweep'}", "--parallel=2",
                 timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / "sweep"


def test_sweep_sessions_list_only_the_swept_flags(sweep_dir):
  found = hparams_of(multiplexer(sweep_dir))
  sessions = {run: v["session"] for run, v in found.items()
              if "session" in v}
  assert sorted(sessions) == ["width=4/train", "width=8/train"]
  for run, info in sessions.items():
    assert list(info.hparams) == ["width"]
    width = int(run.split("=")[1].split("/")[0])
    assert info.hparams["width"].number_value == width  # Typed, not text.
    assert info.group_name == f"w{width}"  # A short trial id.
  experiment = found["."]["experiment"]
  assert [h.name for h in experiment.hparam_infos] == ["width"]
  domain = experiment.hparam_infos[0].domain_discrete.values
  assert sorted(v.number_value for v in domain) == [4, 8]
  metrics = {mi.name.tag for mi in experiment.metric_infos}
  assert {"top1_error", "final/test_top1_error", "curvature/lambda_max",
          "gradients/gradient_confusion", "gradients/min_cosine"} <= metrics
  # Every metric names a tag of each session's run (the group is "").
  m = multiplexer(sweep_dir)
  for run in sessions:
    tags = set(m.Runs()[run]["tensors"])
    assert all(mi.name.group == "" for mi in experiment.metric_infos)
    assert {mi.name.tag for mi in experiment.metric_infos} <= tags


def test_train_and_test_runs_overlay_under_one_tag(sweep_dir):
  m = multiplexer(sweep_dir)
  # One run per real curve: the root holds the experiment alone, each cell
  # a train and a test run.
  assert sorted(m.Runs()) == [".", "width=4/test", "width=4/train",
                              "width=8/test", "width=8/train"]
  for cell in ("width=4", "width=8"):
    train = set(m.Runs()[f"{cell}/train"]["tensors"])
    test = set(m.Runs()[f"{cell}/test"]["tensors"])
    assert {"loss", "top1_error", "top5_error"} <= train & test
    # The test batches' lambda_max is the train set's tag in the test run.
    assert "curvature/lambda_max" in train & test
    assert not any(tag.endswith("_test") for tag in train | test)
    values = [tf.make_ndarray(e.tensor_proto) for e in
              m.Tensors(f"{cell}/test", "top1_error")]
    assert len(values) == 3  # Steps 0, 22, 44.


def test_cosine_histogram_and_layer_norms_are_written(sweep_dir):
  m = multiplexer(sweep_dir)
  run = "width=4/train"
  histograms = plugin_tags(m, run, "histograms")
  assert "gradients/cosines" in histograms
  assert {"weights/hidden_0/kernel", "weights/classifier/kernel"} <= (
      histograms)
  events = m.Tensors(run, "gradients/cosines")
  assert [e.step for e in events] == [0, 22, 44]
  # A histogram of the 16 * 15 / 2 pairwise cosines: counts sum to 120.
  buckets = tf.make_ndarray(events[-1].tensor_proto)
  assert buckets[:, 2].sum() == 120
  assert np.all(buckets[:, 0] >= -1 - 1e-6) and np.all(buckets[:, 1] <= 1)
  scalars = plugin_tags(m, run, "scalars")
  assert {"layers/hidden_0/weight_norm", "layers/hidden_0/gradient_norm",
          "layers/classifier/gradient_norm"} <= scalars


def test_layout_and_flags_are_in_the_train_run(sweep_dir):
  from tensorboard.plugins.custom_scalar import layout_pb2
  m = multiplexer(sweep_dir)
  run = "width=8/train"
  assert "flags" in plugin_tags(m, run, "text")
  [event] = m.Tensors(run, "custom_scalars__config__")
  layout = layout_pb2.Layout()
  layout.ParseFromString(tf.make_ndarray(event.tensor_proto).item())
  titles = [c.title for cat in layout.category for c in cat.chart]
  assert any("lambda_max" in t for t in titles)
  assert any("top-1 error" in t for t in titles)


def test_no_non_finite_scalar_is_written(sweep_dir):
  m = multiplexer(sweep_dir)
  count = 0
  for run in m.Runs():
    for tag in plugin_tags(m, run, "scalars"):
      for event in m.Tensors(run, tag):
        value = float(tf.make_ndarray(event.tensor_proto))
        assert math.isfinite(value), (run, tag, event.step)
        count += 1
  assert count > 100


def test_lone_run_session_lists_flags_that_differ_from_defaults(tmp_path):
  run = tmp_path / "run"
  proc = run_cli("-m", "tfcapacity.train", "--dataset=digits", "--width=8",
                 "--depth=1", "--epochs=1", "--batch_size=64",
                 f"--model_dir={run}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = hparams_of(multiplexer(run))
  session = found["train"]["session"]
  from tfcapacity import config
  given = config.make(width=8, depth=1, epochs=1, batch_size="64")
  default = config.make()
  differ = {k for k, v in given.semantic_dict().items()
            if v != default.semantic_dict()[k]}
  assert "width" in differ and "epochs" in differ
  assert set(session.hparams) == differ
  assert session.group_name.split("_") == ["b64", "e1", "w8"]
  experiment = found["train"]["experiment"]
  assert {h.name for h in experiment.hparam_infos} == set(session.hparams)
  # The console: a start line; no TensorFlow INFO chatter from the export.
  lines = proc.stderr.splitlines()
  assert any("training mlp: depth 1 width 8" in l and "parameters" in l
             and "1 replica" in l for l in lines), proc.stderr[-3000:]
  for chatter in ("Sharding callback", "Writing fingerprint",
                  "Assets written"):
    assert chatter not in proc.stderr


def test_route_sends_test_measurements_to_the_test_run():
  from tfcapacity.training import summaries
  routed = summaries.route({
      "curvature/lambda_max": 1.0, "curvature/lambda_max_test": 2.0,
      "curvature/lambda_max_test_std": 0.5, "gradients/test_cosine": 3.0})
  assert routed == {
      "train": {"curvature/lambda_max": 1.0, "gradients/test_cosine": 3.0},
      "test": {"curvature/lambda_max": 2.0, "curvature/lambda_max_std": 0.5}}


def test_trial_ids_are_short():
  from tfcapacity.training import summaries
  assert summaries.trial_id(
      {"width": 16, "learning_rate": 0.1, "seed": 0}) == "w16_lr0.1_s0"
  assert summaries.trial_id({"activation": "relu", "depth": 3}) == "relu_d3"
  assert summaries.trial_id({"augment": True}) == "augment"


def test_log_lines_print_above_the_training_bar(monkeypatch):
  """On a terminal, a log line during training clears the bar and starts
  on a line of its own; the bar is redrawn after it."""
  from tfcapacity import progress

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  screen = Terminal()
  monkeypatch.setattr(sys, "stderr", screen)
  import logging as std_logging
  handler = std_logging.StreamHandler(screen)
  std_logging.getLogger().addHandler(handler)
  try:
    bar = progress.TrainingBar(total=10)
    bar.update(3, loss=1.5)
    logging.warning("a line from the loop")
    bar.update(4, loss=1.25)
    bar.close()
  finally:
    std_logging.getLogger().removeHandler(handler)
  text = screen.getvalue()
  at = text.index("a line from the loop")
  line_start = max(text.rfind("\r", 0, at), text.rfind("\n", 0, at))
  # Nothing of the bar on the log line: only the log prefix precedes it.
  assert "it/s" not in text[line_start:at] and "step" not in text[
      line_start:at].replace("a line", "")
  assert "|" in text[at:], "the bar is drawn again after the line"
