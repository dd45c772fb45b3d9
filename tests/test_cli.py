"""The command line in subprocesses: SIGKILL and resume, multi-worker, errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest

import conftest  # tests/ is on sys.path (pytest rootdir conftest)

PROG = "tfcapacity.train"
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


def train_cmd(*args):
  return [sys.executable, "-m", "tfcapacity.train", *args]


def run_train(*args, env=None, timeout=300):
  return subprocess.run(train_cmd(*args), capture_output=True, text=True,
                        env=env or ENV, timeout=timeout)


def final_weights(model_dir):
  model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
  return [w.numpy() for w in model.weights]


def checkpoint_steps(model_dir):
  directory = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name.split("-")[1].split(".")[0])
                for name in os.listdir(directory) if name.endswith(".index"))


RESUME_ARGS = ["--dataset=digits", "--width=64", "--depth=2",
               "--batch_size=16", "--epochs=5", "--steps_per_loop=1",
               "--checkpoint_every_steps=20", "--deterministic", "--seed=3",
               "--learning_rate=0.05", "--momentum=0.9", "--noprogress_bar"]


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
  whole = str(tmp_path / "whole")
  done = run_train(*RESUME_ARGS, f"--model_dir={whole}")
  assert done.returncode == 0, done.stderr[-2000:]

  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(train_cmd(*RESUME_ARGS, f"--model_dir={killed}"),
                          env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if any(s >= 40 for s in checkpoint_steps(killed)):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with open(os.path.join(killed, "results.json")) as f:
    # The kill must have landed mid-run, or this test would prove nothing.
    assert json.load(f)["status"] == "running"
  assert not os.path.exists(os.path.join(killed, "model.keras"))

  resumed = run_train(*RESUME_ARGS, f"--model_dir={killed}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resumed" in resumed.stderr
  for a, b in zip(final_weights(whole), final_weights(killed)):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(killed, "results.json")) as f:
    history = json.load(f)["history"]
  assert [row["epoch"] for row in history] == [0, 1, 2, 3, 4, 5]


def free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


MW_ARGS = ["--dataset=synthetic", "--synthetic_examples=128",
           "--synthetic_test_examples=32", "--synthetic_dim=5",
           "--synthetic_classes=3", "--width=16", "--batch_size=32",
           "--epochs=2", "--deterministic", "--noprogress_bar",
           "--steps_per_loop=2",
           # Hessian-vector products under MultiWorkerMirroredStrategy too.
           "--curvature_every_epochs=1", "--curvature_examples=64",
           "--curvature_tol=1e-5", "--curvature_max_iterations=1000",
           # And per-example gradients, loss and logits (NTK).
           "--gradients_every_epochs=1", "--gradients_examples=24",
           "--gradients_chunk_size=8", "--gradients_ntk"]


def test_two_worker_run_matches_single_worker(tmp_path):
  single = str(tmp_path / "single")
  out = run_train(*MW_ARGS, "--strategy=one_device", f"--model_dir={single}")
  assert out.returncode == 0, out.stderr[-2000:]

  multi = str(tmp_path / "multi")
  ports = free_ports(2)
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  procs = []
  for index in range(2):
    env = dict(ENV, TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": index}}))
    procs.append(subprocess.Popen(
        train_cmd(*MW_ARGS, "--strategy=multi_worker_mirrored",
                  f"--model_dir={multi}"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]

  with open(os.path.join(single, "results.json")) as f:
    one = json.load(f)
  with open(os.path.join(multi, "results.json")) as f:
    two = json.load(f)
  assert two["num_replicas"] == 2
  assert len(one["history"]) == len(two["history"]) == 3
  for a, b in zip(one["history"], two["history"]):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
  assert len(one["measurements"]) == len(two["measurements"]) == 3
  for a, b in zip(one["measurements"], two["measurements"]):
    assert a["curvature/lambda_max"] == pytest.approx(
        b["curvature/lambda_max"], rel=1e-4)
    assert a["curvature/lambda_max_test"] == pytest.approx(
        b["curvature/lambda_max_test"], rel=1e-4)
    for key in ("gradient_confusion", "mean_cosine", "gram_max_eigenvalue",
                "ntk_max_eigenvalue", "ntk_min_eigenvalue"):
      assert a[f"gradients/{key}"] == pytest.approx(
          b[f"gradients/{key}"], rel=1e-4, abs=1e-7), key
  for a, b in zip(final_weights(single), final_weights(multi)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cli_bad_inputs_one_line_and_nothing_damaged(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "flags.txt").write_text("--width=99\n")
  sentinel = (model_dir / "flags.txt").read_text()

  conftest.assert_one_line_error(
      run_train("--width=0", f"--model_dir={model_dir}"),
      "--width must be positive", prog=PROG)
  # In a plain environment too: TensorFlow's load-time lines stay hidden.
  plain_env = {k: v for k, v in os.environ.items()
               if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
  conftest.assert_one_line_error(
      run_train("--dataset=imagenet", f"--model_dir={model_dir}",
                env=plain_env), "unknown dataset 'imagenet'", prog=PROG)

  path = tmp_path / "bad.h5"
  with h5py.File(path, "w") as f:
    x = np.zeros((20, 3), np.float32)
    x[7, 1] = np.nan
    f["features"] = x
    f["labels"] = np.arange(20) % 2
  # (A directory of its own: in `model_dir` the run directory's check,
  # which needs no data, refuses the other flags first.)
  conftest.assert_one_line_error(
      run_train(f"--dataset=hdf5:{path}", f"--model_dir={tmp_path / 'nan'}",
                "--batch_size=4"), "NaN", prog=PROG)
  assert not (tmp_path / "nan").exists()
  conftest.assert_one_line_error(
      run_train("--dataset=synthetic", "--epochs=1",
                f"--model_dir={model_dir}"), "different flags", prog=PROG)
  assert (model_dir / "flags.txt").read_text() == sentinel
  assert sorted(os.listdir(model_dir)) == ["flags.txt"]


def test_cli_divergence_exit_status(tmp_path):
  out = run_train("--dataset=synthetic", "--learning_rate=1e12",
                  "--epochs=2", "--noprogress_bar",
                  f"--model_dir={tmp_path / 'run'}")
  assert out.returncode == 3
  assert "diverged" in out.stderr.strip().splitlines()[-1]
  with open(tmp_path / "run" / "results.json") as f:
    assert json.load(f)["status"] == "diverged"


@pytest.mark.parametrize("module, flag", [("train", "--batch_size"),
                                          ("confusion", "--num_examples"),
                                          ("interpolate", "--alpha_range")])
def test_console_script_help_lists_the_flags(module, flag):
  # As a console script, sys.argv[0] is the script, not the module that
  # defines the flags; --help must list them all the same.
  code = (f"import sys; sys.argv[0] = '/usr/bin/tfcapacity-{module}'; "
          f"from tfcapacity import {module}; {module}.run()")
  proc = subprocess.run([sys.executable, "-c", code, "--help"],
                        capture_output=True, text=True, env=ENV, timeout=120)
  # (absl's --help exits with status 1.)
  assert f"  {flag}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
