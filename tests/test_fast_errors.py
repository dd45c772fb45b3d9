"""Mistakes in flags, dataset names and paths end a command before
TensorFlow loads, with one line that says what to fix.

Each command runs in a subprocess whose atexit hook reports whether
`tensorflow` was ever imported: absl's `app.run` ends with `sys.exit`,
after which atexit hooks still run, so the report covers the whole program.
A timer would also pass on a fast machine with TensorFlow loaded; the module
table cannot.
"""

import os
import subprocess
import sys

import pytest

import conftest  # tests/ is on sys.path (pytest rootdir conftest)

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
# Runs `module.run()` (the console-script entry, absl's app.run) with
# sys.argv[1:] and prints, at exit, whether TensorFlow was imported.
PROGRAM = """
import atexit, sys
atexit.register(lambda: print(
    'TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED'))
module = sys.argv.pop(1)
sys.argv[0] = module
__import__(module, fromlist=["run"]).run()
"""


def run_cli(module, *args, cwd=None):
  return subprocess.run(
      [sys.executable, "-c", PROGRAM, module, *args],
      capture_output=True, text=True, env=ENV, timeout=120, cwd=cwd)


def assert_fails_before_tf(proc, *fragments, prog):
  conftest.assert_one_line_error(proc, *fragments, prog=prog)
  assert proc.stdout.split() == ["TF_NOT_LOADED"], proc.stdout


def write_h5(path):
  import h5py  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  with h5py.File(path, "w") as f:
    f["features"] = np.zeros((4, 3), np.float32)
    f["labels"] = np.arange(4)
  return str(path)


def test_the_probe_sees_tensorflow_when_it_loads(tmp_path):
  # The probe can fail: the same program with a good dataset gets past the
  # checks, loads TensorFlow and then refuses a flag that needs the model.
  proc = run_cli("tfcapacity.train", f"--model_dir={tmp_path / 'run'}",
                 "--dataset=digits", "--model=mlp", "--normalization=ghost",
                 "--ghost_batch_size=7", "--batch_size=32")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stdout.split() == ["TF_LOADED"], proc.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--dataset=cifar"], ["unknown dataset 'cifar'", "digits",
                           "hdf5:<path>", "tfds:<name>"]),
    (["--dataset=tfds:"], ["unknown dataset 'tfds:'", "tfds:<name>"]),
    (["--dataset=hdf5:/no/such/file.h5"],
     ["HDF5 file not found: /no/such/file.h5", "--dataset=hdf5:<path>"]),
    (["--dataset=hdf5:missing.h5"],
     ["HDF5 file not found: missing.h5", "looked in", "--dataset"]),
    (["--dataset=HDF5", "--test_dataset=/no/such/test.h5"],
     ["HDF5 file not found: /no/such/test.h5", "--test_dataset"]),
    (["--dataset=digits", "--test_dataset=HDF5"],
     ["--test_dataset is the test split of an hdf5: dataset",
      "drop --test_dataset"]),
    (["--dataset=tfds:mnist", "--unit_norm_inputs"],
     ["--unit_norm_inputs applies to in-memory datasets"]),
    (["--flagfile=/no/such.flags"],
     ["--flagfile=/no/such.flags: no such file", "check the path"]),
])
def test_train_refuses_data_flags_before_tensorflow(tmp_path, args,
                                                    fragments):
  good = write_h5(tmp_path / "good.h5")
  args = [a.replace("HDF5", "hdf5:" + good) for a in args]
  model_dir = tmp_path / "run"
  proc = run_cli("tfcapacity.train", f"--model_dir={model_dir}", *args,
                 cwd=tmp_path)
  assert_fails_before_tf(proc, *fragments, prog="tfcapacity.train")
  if "looked in" in fragments:
    assert str(tmp_path) in proc.stderr
  assert not model_dir.exists()


def test_a_flagfile_naming_a_missing_file_is_refused_before_tensorflow(
    tmp_path):
  flagfile = tmp_path / "run.flags"
  flagfile.write_text(f"--dataset=hdf5:{tmp_path / 'gone.h5'}\n--width=8\n")
  proc = run_cli("tfcapacity.train", f"--flagfile={flagfile}",
                 f"--model_dir={tmp_path / 'run'}")
  assert_fails_before_tf(proc, f"{tmp_path / 'gone.h5'}", "not found",
                         prog="tfcapacity.train")


@pytest.mark.parametrize("tool", ["hessian", "sharpness", "confusion"])
@pytest.mark.parametrize("dataset, fragments", [
    ("hdf5:/no/such/probe.h5", ["HDF5 file not found: /no/such/probe.h5",
                                "--dataset=hdf5:<path>"]),
    ("cifar", ["unknown dataset 'cifar'", "hdf5:<path>"]),
])
def test_analysis_tools_refuse_the_dataset_before_tensorflow(
    tmp_path, tool, dataset, fragments):
  # A run directory whose flags and checkpoint state look fine: only the
  # dataset is wrong. The model file is checked before the dataset is, so
  # the run directory needs nothing else for the dataset to be reached.
  model_file = tmp_path / "model.keras"
  model_file.write_bytes(b"")
  output = tmp_path / "out.json"
  proc = run_cli(f"tfcapacity.{tool}", f"--keras_model={model_file}",
                 f"--dataset={dataset}", f"--output={output}")
  assert_fails_before_tf(proc, *fragments, prog=f"tfcapacity.{tool}")
  assert not output.exists()


def test_hessian_with_a_run_directory_refuses_a_missing_hdf5_file(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "flags.txt").write_text("--dataset=digits\n")
  proc = run_cli("tfcapacity.hessian", f"--model_dir={run}", "--at_init",
                 f"--dataset=hdf5:{tmp_path / 'missing.h5'}",
                 f"--output={tmp_path / 'out.json'}")
  assert_fails_before_tf(proc, "HDF5 file not found",
                         str(tmp_path / "missing.h5"),
                         prog="tfcapacity.hessian")


@pytest.mark.parametrize("args", [[], ["--model_dir="]])
def test_train_says_what_a_missing_model_dir_is_for(args):
  proc = run_cli("tfcapacity.train", "--dataset=digits", *args)
  assert_fails_before_tf(
      proc, "--model_dir is required: the run directory", "results.json",
      "e.g. --model_dir=runs/quickstart", prog="tfcapacity.train")
  assert "must have a value other than None" not in proc.stderr


@pytest.mark.parametrize("module, args, fragments", [
    ("tfcapacity.hessian", ["--model_dir=RUN"],
     ["--output is required: the JSON file",
      "e.g. --output=runs/quickstart/hessian.json"]),
    ("tfcapacity.confusion", ["--model_dir=RUN"],
     ["--output is required", "runs/quickstart/confusion.json"]),
    ("tfcapacity.interpolate", ["--from_init", "--output=OUT"],
     ["--to is required: the run directory of end point B",
      "e.g. --to=runs/quickstart"]),
])
def test_analysis_tools_say_what_a_missing_flag_is_for(tmp_path, module,
                                                       args, fragments):
  args = [a.replace("RUN", str(tmp_path)).replace(
      "OUT", str(tmp_path / "o.json")) for a in args]
  proc = run_cli(module, *args)
  assert_fails_before_tf(proc, *fragments, prog=module)


def test_several_bad_flags_are_one_line_naming_the_others():
  proc = run_cli("tfcapacity.train", "--width=0", "--batch_size=0")
  assert_fails_before_tf(proc, "--width must be positive",
                         "also check --batch_size, --model_dir",
                         prog="tfcapacity.train")
