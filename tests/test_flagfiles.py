"""Every flagfile parses; the quickstart and CPU study flagfiles run."""

import glob
import os

import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import training

FLAGS_DIR = os.path.join(os.path.dirname(__file__), "..", "flags")


def load(name):
  with open(os.path.join(FLAGS_DIR, name)) as f:
    return config.parse_flagfile(f.read())


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(FLAGS_DIR,
                                                               "*.flags"))))
def test_flagfile_parses_to_known_flags(path):
  with open(path) as f:
    text = f.read()
  cfg = config.parse_flagfile(text)
  for line in text.splitlines():
    if line.startswith("--"):
      name = line[2:].split("=")[0]
      name = name[2:] if name.startswith("no") and name[2:] in (
          cfg.values) else name
      assert name in cfg.values, f"{path}: unknown flag {line}"


def test_quickstart_reaches_two_percent_training_error(tmp_path):
  cfg = load("quickstart.flags").replace(model_dir=str(tmp_path / "q"),
                                         progress_bar=False, export=False)
  results = training.train(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert results["final"]["train_top1_error"] < 0.02
  assert results["final"]["epoch"] == 40


@pytest.mark.parametrize("name, overrides", [
    ("capacity_mnist1d_cpu.flags", dict(mnist1d_examples=600)),
    ("maxibatch_resnet_digits_cpu.flags", dict(depth=8, width=4)),
])
def test_cpu_study_flagfiles_run(tmp_path, name, overrides):
  cfg = load(name).replace(model_dir=str(tmp_path / "run"), steps=3,
                           progress_bar=False, export=False, **overrides)
  results = training.train(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert results["status"] == "completed"
  assert results["steps"] == 3
