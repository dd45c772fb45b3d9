"""Strategy selection from flags."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from tfcapacity import distribute
from tfcapacity.errors import UserError


def test_auto_is_one_device_without_gpus():
  strategy = distribute.make_strategy("auto", 1)
  assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
  assert distribute.is_chief(strategy)


def test_cpu_replicas_give_mirrored():
  for name in ("auto", "mirrored"):
    strategy = distribute.make_strategy(name, 2)
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2


def test_unknown_strategy_lists_choices():
  with pytest.raises(UserError, match="one_device, tpu"):
    distribute.make_strategy("horovod")


def test_multi_worker_needs_tf_config(monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  with pytest.raises(UserError, match="TF_CONFIG"):
    distribute.make_strategy("multi_worker_mirrored")
  monkeypatch.setenv("TF_CONFIG", "{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    distribute.make_strategy("multi_worker_mirrored")


def test_cli_cpu_replicas_runs_mirrored(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "tfcapacity.train", "--dataset=synthetic",
       "--cpu_replicas=2", "--batch_size=32", "--epochs=1", "--width=8",
       "--noprogress_bar", "--noexport", f"--model_dir={tmp_path}"],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert out.returncode == 0, out.stderr[-2000:]
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["num_replicas"] == 2
