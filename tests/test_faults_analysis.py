"""Fault injection on the analysis tools: damaged runs, bad paths, one line.

The tools that read a run (`tfcapacity.hessian`, `sharpness`, `confusion`,
`interpolate`) in subprocesses, on copies of one finished tiny run with
damage injected. Each refusal is exit status 2, one stderr line without a
traceback naming the file or flag and the fix, and every file under the
test's directory (the run and any earlier output) byte-identical after.
"""

import json
import os
import shutil
import zipfile

import pytest

import conftest
from conftest import assert_one_line_error, run_cli, snapshot

RUN = ["--dataset=digits", "--width=8", "--depth=1", "--batch_size=64",
       "--epochs=2", "--keep_checkpoints=5", "--noprogress_bar", "--seed=1"]
TOOLS = {
    "hessian": ["--num_examples=64", "--max_iterations=5"],
    "sharpness": ["--num_examples=64", "--max_iterations=2"],
    "confusion": ["--num_examples=16"],
}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
  root = tmp_path_factory.mktemp("analysis_material")
  proc = run_cli("-m", "tfcapacity.train", *RUN,
                 f"--model_dir={root / 'done'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return root / "done"


def copy_run(done, tmp_path):
  target = tmp_path / "R"
  shutil.copytree(done, target)
  return target


def tool(name, *args):
  return run_cli("-m", f"tfcapacity.{name}", *TOOLS.get(name, ()), *args)


def refused(tmp_path, name, args, *fragments):
  before = snapshot(tmp_path)
  proc = tool(name, *args)
  assert_one_line_error(proc, *fragments, prog=f"tfcapacity.{name}")
  assert snapshot(tmp_path) == before
  return proc


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_truncated_checkpoint_is_named(done, tmp_path, name):
  run = copy_run(done, tmp_path)
  _truncate(run / "checkpoints" / "ckpt-44.data-00000-of-00001")
  # An earlier output of the tool is kept as it was.
  out = tmp_path / "out.json"
  out.write_text("{\"earlier\": true}\n")
  refused(tmp_path, name, [f"--model_dir={run}", f"--output={out}"],
          "ckpt-44 is damaged", "--checkpoint=STEP", "steps: 0, 22")


def test_interpolate_names_the_damaged_end_point(done, tmp_path):
  run = copy_run(done, tmp_path)
  _truncate(run / "checkpoints" / "ckpt-22.index")
  refused(tmp_path, "interpolate",
          [f"--from={run}", "--from_checkpoint=22", f"--to={run}",
           "--num_points=3", "--num_examples=32",
           f"--output={tmp_path / 'line.json'}"],
          "ckpt-22 is damaged", "--from_checkpoint=STEP")


def test_interpolate_names_its_own_flags(done, tmp_path):
  run = copy_run(done, tmp_path)
  out = f"--output={tmp_path / 'line.json'}"
  refused(tmp_path, "interpolate",
          [f"--from={tmp_path / 'nope'}", f"--to={run}", out],
          f"--from={tmp_path / 'nope'} is not a directory")
  refused(tmp_path, "interpolate",
          [f"--from={run}", "--from_checkpoint=7", f"--to={run}", out],
          "--from_checkpoint=7", "available steps: 0, 22, 44")


@pytest.mark.parametrize("content", [b"\x00\xffnot flags", b"--width=abc\n"],
                         ids=["binary", "bad_value"])
def test_garbled_flags_file(done, tmp_path, content):
  run = copy_run(done, tmp_path)
  (run / "flags.txt").write_bytes(content)
  refused(tmp_path, "hessian",
          [f"--model_dir={run}", f"--output={tmp_path / 'h.json'}"],
          "flags.txt is damaged")


def test_missing_flags_file(done, tmp_path):
  run = copy_run(done, tmp_path)
  os.unlink(run / "flags.txt")
  refused(tmp_path, "hessian",
          [f"--model_dir={run}", f"--output={tmp_path / 'h.json'}"],
          "has no flags.txt")


def test_garbled_results_file_with_checkpoint_final(done, tmp_path):
  # 'final' takes the step from results.json.
  run = copy_run(done, tmp_path)
  (run / "results.json").write_text("{\"steps\": 4")
  refused(tmp_path, "hessian",
          [f"--model_dir={run}", "--checkpoint=final",
           f"--output={tmp_path / 'h.json'}"], "results.json is damaged")


@pytest.mark.parametrize("make", ["text", "truncated_zip"])
def test_keras_file_that_is_not_a_keras_file(done, tmp_path, make):
  path = tmp_path / "model.keras"
  if make == "text":
    path.write_text("not a model")
  else:
    data = (done / "model.keras").read_bytes()
    path.write_bytes(data[:len(data) // 3])
    assert not zipfile.is_zipfile(path)
  refused(tmp_path, "hessian",
          [f"--keras_model={path}", "--dataset=digits",
           f"--output={tmp_path / 'h.json'}"], "is not a .keras file")


def test_model_dir_that_is_a_file(tmp_path):
  (tmp_path / "R").write_text("x")
  refused(tmp_path, "hessian", [f"--model_dir={tmp_path / 'R'}",
                                f"--output={tmp_path / 'h.json'}"],
          "is not a directory")


def test_output_under_a_file(done, tmp_path):
  run = copy_run(done, tmp_path)
  (tmp_path / "F").write_text("x")
  refused(tmp_path, "hessian", [f"--model_dir={run}",
                                f"--output={tmp_path / 'F' / 'h.json'}"],
          "is a file")


def test_output_into_a_read_only_directory_fails_before_computing(
    done, tmp_path):
  run = copy_run(done, tmp_path)
  ro = tmp_path / "ro"
  ro.mkdir()
  argv = conftest.readonly_argv(ro, [
      "-m", "tfcapacity.hessian", *TOOLS["hessian"], f"--model_dir={run}",
      f"--output={ro / 'h.json'}"])
  if argv is None:
    pytest.skip("no private mount namespace for a read-only bind mount")
  import subprocess
  before = snapshot(tmp_path)
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                        env=conftest.CLI_ENV)
  assert_one_line_error(proc, "cannot write in", "Read-only file system",
                        prog="tfcapacity.hessian")
  # Refused before TensorFlow computed anything: no log of a computation.
  assert "products" not in proc.stdout + proc.stderr
  assert snapshot(tmp_path) == before


def test_a_failed_tool_keeps_its_earlier_output(done, tmp_path):
  run = copy_run(done, tmp_path)
  out = tmp_path / "h.json"
  proc = tool("hessian", f"--model_dir={run}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    assert json.load(f)["eigenvalues"]
  refused(tmp_path, "hessian", [f"--model_dir={run}", "--checkpoint=5",
                                f"--output={out}"], "--checkpoint=5")
