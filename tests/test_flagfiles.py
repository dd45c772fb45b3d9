"""Every flagfile parses; the quickstart and CPU study flagfiles run."""

import glob
import os

import pytest
import tensorflow as tf

from tfcapacity import config
from tfcapacity import measurements

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
  results = measurements.train(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert results["final"]["train_top1_error"] < 0.02
  assert results["final"]["epoch"] == 40


@pytest.mark.parametrize("name, overrides", [
    ("capacity_mnist1d_cpu.flags", dict(mnist1d_examples=600)),
    ("maxibatch_resnet_digits_cpu.flags", dict(depth=8, width=4)),
])
def test_cpu_study_flagfiles_run(tmp_path, name, overrides):
  cfg = load(name).replace(model_dir=str(tmp_path / "run"), steps=3,
                           progress_bar=False, export=False, **overrides)
  results = measurements.train(cfg, tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert results["status"] == "completed"
  assert results["steps"] == 3


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(FLAGS_DIR,
                                                               "*.flags"))))
def test_flagfile_grids_validate(path):
  """A flagfile's `# sweep.grid:` lines make cells the train CLI accepts."""
  from tfcapacity.studies import sweep  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    spec = sweep.grid_from_flagfile(f.read())
  if spec is None:
    pytest.skip("no grid")
  cells = sweep.cells(sweep.parse_grid(spec))
  configs = sweep.validate([f"--flagfile={path}"], cells)
  assert len(configs) == len(cells)


def test_capacity_cpu_grid_spans_the_required_widths():
  from tfcapacity.studies import sweep  # pylint: disable=g-import-not-at-top
  path = os.path.join(FLAGS_DIR, "capacity_mnist1d_cpu.flags")
  with open(path) as f:
    grid = dict(sweep.parse_grid(sweep.grid_from_flagfile(f.read())))
  widths = [int(w) for w in grid["width"]]
  assert min(widths) <= 16 and max(widths) >= 1024
  # Enough rates to bracket the best one, 3 seeds, the paper's 300 epochs.
  assert len(grid["learning_rate"]) >= 3 and len(grid["seed"]) >= 3
  cfg = load("capacity_mnist1d_cpu.flags")
  assert cfg.dataset == "mnist1d" and cfg.epochs == 300
  # 20k (not the 40k of the 2-rate, 200-epoch grid): the 3-hour cpu tier.
  assert cfg.mnist1d_examples * (1 - cfg.mnist1d_test_fraction) >= 20000
