"""Fault injection on a run directory: nothing already written is lost.

Each case damages or misuses a run directory the way a user or a crash can,
runs `python -m tfcapacity.train` on it in a subprocess, and asserts the
promise of docs/reliability.md: a refusal is exit status 2 with one stderr
line (no traceback) naming the problem and the fix, and every file under
the test's directory is byte-identical before and after. Two runs serve as
material: `done` (completed) and `killed` (a process that died without
cleanup after step 44 of 66, as SIGKILL leaves it).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import conftest
from conftest import assert_one_line_error, run_cli, snapshot

PROG = "tfcapacity.train"
BASE = ["--dataset=digits", "--width=8", "--depth=1", "--batch_size=64",
        "--noprogress_bar", "--keep_checkpoints=5", "--deterministic",
        "--seed=1", "--learning_rate=0.1"]
DONE = BASE + ["--epochs=2"]     # 22 steps an epoch: 44 steps.
KILLED = BASE + ["--epochs=3"]   # Dies after step 50; checkpoints 0, 22, 44.

# Trains KILLED in-process and exits without any cleanup at step 50, after
# the checkpoint of step 44: the state SIGKILL leaves.
_DIE_AT_50 = """
import os, sys
from tfcapacity import config, measurements
from tfcapacity.training import callbacks
class Die(callbacks.Callback):
  every_steps = 1
  def __call__(self, ctx):
    if ctx.step >= 50:
      os._exit(0)
    return {}
cfg = config.parse_args(sys.argv[1:])
measurements.train(cfg, callbacks=[Die()])
"""


def train(*args, **kwargs):
  return run_cli("-m", "tfcapacity.train", *args, **kwargs)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
  root = tmp_path_factory.mktemp("material")
  done = train(*DONE, f"--model_dir={root / 'done'}")
  assert done.returncode == 0, done.stderr[-2000:]
  killed = run_cli("-c", _DIE_AT_50, *KILLED,
                   f"--model_dir={root / 'killed'}")
  assert killed.returncode == 0, killed.stderr[-2000:]
  with open(root / "killed" / "results.json") as f:
    assert json.load(f)["status"] == "running"
  return root


def copy_run(material, name, tmp_path):
  target = tmp_path / "R"
  shutil.copytree(material / name, target)
  return target


def weights(path):
  return [w.numpy() for w in keras.saving.load_model(path).weights]


def refused(tmp_path, args, *fragments):
  """Runs the trainer; asserts a one-line refusal and no change on disk."""
  before = snapshot(tmp_path)
  proc = train(*args)
  assert_one_line_error(proc, *fragments, prog=PROG)
  assert snapshot(tmp_path) == before
  return proc


# --- Validation before anything is written ----------------------------------

LATE_INVALID = {
    "feature_layer": (["--gradients_every_epochs=1",
                       "--gradients_feature_layer=nosuch"],
                      "--gradients_feature_layer"),
    "top_k": (["--curvature_every_epochs=1", "--curvature_top_k=100000"],
              "--curvature_top_k=100000"),
    "ghost_without_bn": (["--curvature_every_epochs=1",
                          "--curvature_bn_mode=ghost"],
                         "--curvature_bn_mode=ghost"),
}


@pytest.mark.parametrize("case", sorted(LATE_INVALID))
def test_overwrite_with_a_late_invalid_flag_keeps_the_finished_run(
    material, tmp_path, case):
  run = copy_run(material, "done", tmp_path)
  extra, fragment = LATE_INVALID[case]
  refused(tmp_path, [*DONE, f"--model_dir={run}", "--overwrite",
                     "--width=9", *extra], fragment)


@pytest.mark.parametrize("case", sorted(LATE_INVALID))
def test_resume_with_a_late_invalid_flag_writes_nothing(material, tmp_path,
                                                        case):
  run = copy_run(material, "killed", tmp_path)
  extra, fragment = LATE_INVALID[case]
  refused(tmp_path, [*KILLED, f"--model_dir={run}", *extra], fragment)


def test_model_dir_that_is_a_file(tmp_path):
  (tmp_path / "R").write_text("a file")
  refused(tmp_path, [*DONE, f"--model_dir={tmp_path / 'R'}"], "is a file")


def test_model_dir_under_a_file(tmp_path):
  (tmp_path / "F").write_text("a file")
  refused(tmp_path, [*DONE, f"--model_dir={tmp_path / 'F' / 'R'}"],
          "lies under the file")


def test_read_only_parent_directory(tmp_path):
  parent = tmp_path / "ro"
  parent.mkdir()
  argv = conftest.readonly_argv(parent, ["-m", "tfcapacity.train", *DONE,
                                         f"--model_dir={parent / 'R'}"])
  if argv is None:
    pytest.skip("no private mount namespace for a read-only bind mount")
  before = snapshot(tmp_path)
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                        env=conftest.CLI_ENV)
  assert_one_line_error(proc, "not writable", "Read-only file system",
                        prog=PROG)
  assert snapshot(tmp_path) == before


def test_read_only_finished_run_reruns_cleanly(material, tmp_path):
  run = copy_run(material, "done", tmp_path)
  argv = conftest.readonly_argv(run, ["-m", "tfcapacity.train", *DONE,
                                      f"--model_dir={run}"])
  if argv is None:
    pytest.skip("no private mount namespace for a read-only bind mount")
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                        env=conftest.CLI_ENV)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


# --- One writer per run directory ------------------------------------------


def test_a_second_trainer_is_refused_while_the_first_runs(tmp_path):
  run = tmp_path / "R"
  long_args = [*BASE, "--epochs=400", "--steps_per_loop=1",
               f"--model_dir={run}"]
  first = subprocess.Popen(
      [sys.executable, "-m", "tfcapacity.train", *long_args],
      env=conftest.CLI_ENV, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    lock = run / ".run.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
      if (lock.exists() and f"pid {first.pid} " in lock.read_text()
          and (run / "checkpoints").exists()):
        break
      time.sleep(0.1)
    assert first.poll() is None, "the first trainer ended too soon"
    twin = train(*long_args)
    assert_one_line_error(twin, f"in use by pid {first.pid}", prog=PROG)
    rival = train(*long_args, "--overwrite", "--width=9")
    assert_one_line_error(rival, f"in use by pid {first.pid}", prog=PROG)
    assert first.poll() is None
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The directory holds the first trainer's run alone: its flags, no
  # replaced copy, one set of event files.
  with open(run / "flags.txt") as f:
    assert "--width=8\n" in f.read()
  assert not list(tmp_path.glob("R.replaced-*"))
  assert len(os.listdir(run / "train")) == 1


def test_rerun_of_a_finished_run_is_read_only(material, tmp_path):
  run = copy_run(material, "done", tmp_path)
  before = snapshot(tmp_path)
  # Operational flags may differ: still nothing is written.
  proc = train(*DONE, f"--model_dir={run}", "--steps_per_loop=3")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "already holds this run, completed" in proc.stderr
  assert snapshot(tmp_path) == before


def test_overwrite_moves_the_old_run_aside(material, tmp_path):
  run = copy_run(material, "done", tmp_path)
  old = snapshot(run)
  proc = train(*DONE, f"--model_dir={run}", "--overwrite", "--width=9")
  assert proc.returncode == 0, proc.stderr[-2000:]
  aside = list(tmp_path.glob("R.replaced-*"))
  assert len(aside) == 1
  # Every file of the old run is there, byte for byte (the lock file stays
  # with the directory).
  moved = snapshot(aside[0])
  assert {k: v for k, v in old.items() if ".run.lock" not in k} == moved
  with open(run / "flags.txt") as f:
    text = f.read()
  assert "--width=9\n" in text
  assert "\n--overwrite" not in text and "\n--nooverwrite" not in text


# --- Damaged state is reported, never trusted -------------------------------


def test_missing_flags_file_is_refused(material, tmp_path):
  run = copy_run(material, "killed", tmp_path)
  os.unlink(run / "flags.txt")
  refused(tmp_path, [*KILLED, f"--model_dir={run}"],
          "no flags.txt", "--overwrite")


@pytest.mark.parametrize("text", ["\x00\xff garbage \x01",
                                  "--width=abc\n--depth=1\n"],
                         ids=["binary", "bad_value"])
def test_garbled_flags_file_is_refused(material, tmp_path, text):
  run = copy_run(material, "killed", tmp_path)
  with open(run / "flags.txt", "w", encoding="latin-1") as f:
    f.write(text)
  refused(tmp_path, [*KILLED, f"--model_dir={run}"],
          "flags.txt is damaged")


def test_edited_flags_that_do_not_match_the_checkpoint(material, tmp_path):
  run = copy_run(material, "killed", tmp_path)
  path = run / "flags.txt"
  path.write_text(path.read_text().replace("--width=8", "--width=16"))
  refused(tmp_path, [*KILLED, "--width=16", f"--model_dir={run}"],
          "does not match the model")


@pytest.mark.parametrize("content", ["garbage {{", None],
                         ids=["garbled", "missing"])
def test_checkpoint_state_file_damage_is_refused(material, tmp_path,
                                                 content):
  run = copy_run(material, "killed", tmp_path)
  state = run / "checkpoints" / "checkpoint"
  if content is None:
    os.unlink(state)
  else:
    state.write_text(content)
  refused(tmp_path, [*KILLED, f"--model_dir={run}"],
          "checkpoints/checkpoint is", "--resume_from=44")


def _damage(path, how):
  data = path.read_bytes()
  if how == "truncated":
    path.write_bytes(data[:len(data) // 2])
  else:  # Same length, every byte flipped: only the checksums can tell.
    path.write_bytes(bytes(b ^ 0x5A for b in data))


@pytest.mark.parametrize("suffix", [".index", ".data-00000-of-00001"])
@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_damaged_latest_checkpoint_is_refused(material, tmp_path, suffix,
                                              how):
  run = copy_run(material, "killed", tmp_path)
  _damage(run / "checkpoints" / f"ckpt-44{suffix}", how)
  refused(tmp_path, [*KILLED, f"--model_dir={run}"],
          "ckpt-44 is damaged", "--resume_from=22")


def test_resume_from_an_older_checkpoint_equals_an_unbroken_run(
    material, tmp_path):
  run = copy_run(material, "killed", tmp_path)
  _damage(run / "checkpoints" / "ckpt-44.data-00000-of-00001", "truncated")
  damaged = snapshot(run / "checkpoints")
  proc = train(*KILLED, f"--model_dir={run}", "--resume_from=22")
  assert proc.returncode == 0, proc.stderr[-2000:]
  # The damaged checkpoint is kept aside, not deleted.
  aside = list(run.glob("checkpoints.after-22-*"))
  assert len(aside) == 1
  assert snapshot(aside[0]) == {
      k: v for k, v in damaged.items()
      if k.startswith("./ckpt-44") or k == "./"}
  whole = tmp_path / "whole"
  proc = train(*KILLED, f"--model_dir={whole}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  for a, b in zip(weights(whole / "model.keras"),
                  weights(run / "model.keras")):
    np.testing.assert_array_equal(a, b)
  with open(run / "results.json") as f:
    steps = [row["step"] for row in json.load(f)["history"]]
  assert steps == [0, 22, 44, 66]


def test_resume_from_a_step_without_a_checkpoint(material, tmp_path):
  run = copy_run(material, "killed", tmp_path)
  refused(tmp_path, [*KILLED, f"--model_dir={run}", "--resume_from=30"],
          "--resume_from=30", "available steps: 0, 22, 44")


def test_resume_from_without_a_run(tmp_path):
  refused(tmp_path, [*KILLED, f"--model_dir={tmp_path / 'R'}",
                     "--resume_from=22"], "--resume_from=22", "no run")


@pytest.mark.parametrize("content", ["{\"status\": \"runn", "[1, 2]"],
                         ids=["truncated", "not_an_object"])
def test_damaged_results_file_is_refused(material, tmp_path, content):
  run = copy_run(material, "killed", tmp_path)
  (run / "results.json").write_text(content)
  refused(tmp_path, [*KILLED, f"--model_dir={run}"],
          "results.json is damaged")


# --- Small gaps -------------------------------------------------------------


def test_diverged_run_records_the_step(tmp_path):
  run = tmp_path / "R"
  proc = train(*BASE, "--epochs=2", "--learning_rate=1e12", "--loss=squared",
               f"--model_dir={run}")
  assert proc.returncode == 3, proc.stderr[-2000:]
  with open(run / "results.json") as f:
    results = json.load(f)
  assert results["status"] == "diverged"
  assert results["diverged_at_step"] == results["steps"] > 0


@pytest.mark.parametrize("flag,tag", [
    ("--curvature_examples=100000", "lambda_max is measured on all 1437"),
    ("--gradients_examples=100000", "statistics use all 1437")])
def test_measurement_examples_above_the_set_are_clamped_with_a_note(
    tmp_path, flag, tag):
  every = ("--curvature_every_epochs=1" if "curvature" in flag
           else "--gradients_every_epochs=1")
  proc = train(*BASE, "--epochs=1", "--noexport", every, flag,
               f"--model_dir={tmp_path / 'R'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert tag in proc.stderr
