"""Faults of tools/convert_sbow.py: refused resumes, one-line errors, no loss.

Each case runs the tool in a subprocess on the tiny fake release of
test_convert_sbow.py and checks the exit status, that stderr is one line
without a traceback, and what the files hold before and after: a refused
command must leave the output and `<output>.partial` byte for byte as they
were; a failing conversion must name its partial file and keep its rows.
Partial files are made in-process with `sbow.convert(stop_after_files=...)`,
the library behind the tool. Outputs are compared, array by array, with an
uninterrupted conversion of the same inputs.
"""

import os
import shutil

import h5py
import numpy as np
import pytest

from tfcapacity.data import sbow
from tfcapacity.errors import UserError
import conftest  # tests/ is on sys.path (pytest rootdir conftest)
from test_convert_sbow import make_release, read, write_sbow

PROG = "convert_sbow"
TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "tools", "convert_sbow.py")
# Train files in output order (class ids 1..4), 3, 4, 5 and 6 images.
TRAIN_FILES = ["n04000000.sbow.mat", "n01000000.sbow.mat",
               "n03000000.sbow.mat", "n02000000.sbow.mat"]


def args_of(sbow_dir, devkit, out, split="train", *extra):
  """The tool's flags; chunk_rows=1 so that every finished file is on disk."""
  return [f"--sbow_dir={sbow_dir}", f"--devkit_dir={devkit}",
          f"--split={split}", f"--output={out}", "--chunk_rows=1", *extra]


def run(*args):
  return conftest.run_cli(TOOL, *args, timeout=120)


def started(tmp_path, split="train", stop=2, corrupt=None):
  """A fake release and a partial conversion of `split` after `stop` files.

  Args:
    corrupt: a train file name to replace with garbage before converting,
      past `stop`, so that the partial file records it as it is.

  Returns:
    (args of the command that started it, release dirs, devkit, output).
  """
  dirs, devkit, _ = make_release(tmp_path / "release")
  if corrupt:
    with open(os.path.join(dirs["train"], corrupt), "wb") as f:
      f.write(b"not a MATLAB file" * 20)
  out = tmp_path / "out" / f"{split}.h5"
  summary = sbow.convert(dirs[split], devkit, split, str(out), chunk_rows=1,
                         stop_after_files=stop)
  assert summary["files_done"] == stop and not out.exists()
  return args_of(dirs[split], devkit, out, split), dirs, devkit, out


def partial_of(out):
  return str(out) + sbow.PARTIAL_SUFFIX


def contents(path):
  """The arrays and checkpoint of an HDF5 output or partial file."""
  features, labels, ids, attrs = read(path)
  keys = ("files_done", "resume_file", "resume_skip", "disk_rows",
          "num_descriptors", "num_empty", "fingerprint")
  return features, labels, ids, {k: attrs[k] for k in keys}


def assert_same_contents(a, b):
  for x, y in zip(a[:3], b[:3]):
    np.testing.assert_array_equal(x, y)
  assert a[3] == b[3]


def uninterrupted(tmp_path, sbow_dir, devkit, split="train", name="fresh"):
  """The output of one uninterrupted conversion, made in-process."""
  fresh = str(tmp_path / f"{name}.h5")
  sbow.convert(sbow_dir, devkit, split, fresh, chunk_rows=1)
  return fresh


def assert_refused(proc, tmp_path, before, *fragments):
  conftest.assert_one_line_error(proc, *fragments, "delete it to start "
                                 "afresh", prog=PROG)
  assert conftest.snapshot(tmp_path) == before


# -- refused resumes --------------------------------------------------------


@pytest.mark.parametrize("other", ["copy", "other_release"])
def test_resume_from_another_sbow_dir_is_refused(tmp_path, other):
  args, dirs, devkit, out = started(tmp_path)
  if other == "copy":  # Same names, labels, sizes and times: only paths.
    elsewhere = str(tmp_path / "copy")
    shutil.copytree(dirs["train"], elsewhere)
  else:
    elsewhere = make_release(tmp_path / "other", seed=1)[0]["train"]
  before = conftest.snapshot(tmp_path)
  proc = run(*args_of(elsewhere, devkit, out))
  assert_refused(proc, tmp_path, before, partial_of(out),
                 "it was started from other source files",
                 os.path.realpath(os.path.join(dirs["train"],
                                               TRAIN_FILES[0])))
  assert not out.exists()


@pytest.mark.parametrize("change, index", [("touch", 0), ("rewrite", 3)])
def test_resume_after_a_source_file_changed_in_place_is_refused(
    tmp_path, change, index):
  args, dirs, _, out = started(tmp_path)
  path = os.path.join(dirs["train"], TRAIN_FILES[index])
  size = os.path.getsize(path)
  if change == "touch":  # Same bytes, a later modification time.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  else:  # Other images: another size.
    write_sbow(path, [("n02000000_1", [1, 2, 3])])
    assert os.path.getsize(path) != size
  before = conftest.snapshot(tmp_path)
  assert_refused(run(*args), tmp_path, before, partial_of(out),
                 f"source file {os.path.realpath(path)} changed since it was "
                 f"started")


@pytest.mark.parametrize("flag, was", [
    ("--normalize=l2", "--normalize=none"),
    ("--chunk_rows=2", "--chunk_rows=1"),
    ("--compression=gzip", "--compression=none"),
])
def test_resume_with_another_option_is_refused(tmp_path, flag, was):
  args, _, _, out = started(tmp_path)
  before = conftest.snapshot(tmp_path)
  assert_refused(run(*args, flag), tmp_path, before, partial_of(out),
                 f"it was started with {was}, not {flag}")


def test_resume_with_another_ground_truth_is_refused(tmp_path):
  args, _, devkit, out = started(tmp_path, split="val", stop=1)
  truth = os.path.join(devkit, sbow.GROUND_TRUTH_FILE)
  with open(truth) as f:
    lines = f.read().split()
  lines[-1] = "1" if lines[-1] != "1" else "2"  # Same count, one label.
  with open(truth, "w") as f:
    f.write("\n".join(lines) + "\n")
  before = conftest.snapshot(tmp_path)
  assert_refused(run(*args), tmp_path, before, partial_of(out),
                 f"the devkit's {sbow.GROUND_TRUTH_FILE} differs")


def test_partial_file_without_a_record_is_refused(tmp_path):
  args, _, _, out = started(tmp_path)
  with h5py.File(partial_of(out), "r+") as f:  # As an older converter's.
    del f["inputs"]
  before = conftest.snapshot(tmp_path)
  assert_refused(run(*args), tmp_path, before, partial_of(out),
                 "holds no record of its inputs")


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_output_and_partial_are_untouched(tmp_path, overwrite):
  dirs, devkit, _ = make_release(tmp_path / "release")
  out = tmp_path / "out" / "train.h5"
  sbow.convert(dirs["train"], devkit, "train", str(out), chunk_rows=1)
  # Then a second conversion, to replace it, stopped half way.
  sbow.convert(dirs["train"], devkit, "train", str(out), chunk_rows=1,
               overwrite=True, stop_after_files=2)
  assert os.path.exists(partial_of(out))
  args = args_of(dirs["train"], devkit, out)
  if overwrite:  # Allowed to replace the output, but not with other files.
    elsewhere = str(tmp_path / "copy")
    shutil.copytree(dirs["train"], elsewhere)
    argv, fragments = (args_of(elsewhere, devkit, out, "train",
                               "--overwrite"),
                       [partial_of(out), "other source files", "delete it"])
  else:
    argv, fragments = args, [f"--output={out} already exists", "--overwrite"]
  before = conftest.snapshot(tmp_path)
  conftest.assert_one_line_error(run(*argv), *fragments, prog=PROG)
  assert conftest.snapshot(tmp_path) == before


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING") == "FALSE",
                    reason="HDF5 file locking is off")
def test_partial_file_open_for_writing_is_refused(tmp_path):
  args, _, _, out = started(tmp_path)
  with h5py.File(partial_of(out), "r+") as f:  # Another conversion's.
    f.flush()
    before = conftest.snapshot(tmp_path)
    conftest.assert_one_line_error(run(*args), f"{partial_of(out)} is locked",
                                   prog=PROG)
    assert conftest.snapshot(tmp_path) == before


# -- one line on stderr -----------------------------------------------------


@pytest.mark.parametrize("given", [["--split=train"], []])
def test_missing_required_flags_are_one_line(tmp_path, given):
  args, _, _, out = started(tmp_path)
  before = conftest.snapshot(tmp_path)
  proc = conftest.run_cli(TOOL, *given, cwd=tmp_path, timeout=120)
  names = ("--sbow_dir, --devkit_dir and --output" if given else
           "--sbow_dir, --devkit_dir, --split and --output")
  conftest.assert_one_line_error(proc, f"{names} are required", prog=PROG)
  assert conftest.snapshot(tmp_path) == before


@pytest.mark.parametrize("fault", ["corrupt_next_file", "ground_truth_lines"])
def test_error_after_resuming_is_one_line(tmp_path, fault):
  """The resume note is logged (to stdout) before the error, not on stderr."""
  if fault == "corrupt_next_file":
    args, dirs, _, out = started(tmp_path, corrupt=TRAIN_FILES[2])
    bad = os.path.join(dirs["train"], TRAIN_FILES[2])
    fragments, done = [bad, "not a readable MATLAB v5 file"], "2 of 4"
  else:
    dirs, devkit, _ = make_release(tmp_path / "release")
    truth = os.path.join(devkit, sbow.GROUND_TRUTH_FILE)
    with open(truth, "a") as f:  # One line more than there are images.
      f.write("1\n")
    out = tmp_path / "out" / "val.h5"
    args = args_of(dirs["val"], devkit, out, "val")
    sbow.convert(dirs["val"], devkit, "val", str(out), chunk_rows=1,
                 stop_after_files=1)
    fragments = [f"{truth} has 10 lines but the 3 validation files hold 9"]
    done = "3 of 3"
  kept = contents(partial_of(out))
  proc = run(*args)
  conftest.assert_one_line_error(
      proc, *fragments, f"the partial output {partial_of(out)} is kept "
      f"({done} source files done): rerun the same command to resume",
      prog=PROG)
  assert f"Resuming {partial_of(out)} after" in proc.stdout
  assert not out.exists()
  if fault == "corrupt_next_file":  # Nothing was added: rows as they were.
    assert_same_contents(contents(partial_of(out)), kept)


def test_failing_conversion_names_its_partial_and_resumes(tmp_path):
  dirs, devkit, _ = make_release(tmp_path / "release")
  bad = os.path.join(dirs["train"], TRAIN_FILES[2])
  good = tmp_path / "good.sbow.mat"
  shutil.move(bad, good)
  with open(bad, "wb") as f:
    f.write(b"not a MATLAB file" * 20)
  out = tmp_path / "out" / "train.h5"
  args = args_of(dirs["train"], devkit, out)
  kept = (f"the partial output {partial_of(out)} is kept (2 of 4 source "
          f"files done): rerun the same command to resume, or delete it to "
          f"start afresh")
  proc = run(*args)
  conftest.assert_one_line_error(proc, bad, "not a readable MATLAB", kept,
                                 prog=PROG)
  assert not out.exists() and not proc.stdout.count("Resuming")
  first = contents(partial_of(out))
  # Rerun as told: it resumes after 2 files and stops at the same one.
  proc = run(*args)
  conftest.assert_one_line_error(proc, bad, kept, prog=PROG)
  assert f"Resuming {partial_of(out)} after 2 of 4" in proc.stdout
  assert_same_contents(contents(partial_of(out)), first)
  # A replaced source file makes it refuse; deleting the partial file, as
  # told, gives the uninterrupted conversion's output.
  shutil.copy2(good, bad)
  before = conftest.snapshot(tmp_path)
  assert_refused(run(*args), tmp_path, before, partial_of(out),
                 f"source file {os.path.realpath(bad)} changed")
  os.remove(partial_of(out))
  proc = run(*args)
  assert proc.returncode == 0 and not proc.stderr, proc.stderr
  fresh = uninterrupted(tmp_path, dirs["train"], devkit)
  assert_same_contents(contents(out), contents(fresh))


# -- no loss --------------------------------------------------------------


def test_original_command_resumes_after_refusals(tmp_path):
  args, dirs, devkit, out = started(tmp_path)
  elsewhere = str(tmp_path / "copy")
  shutil.copytree(dirs["train"], elsewhere)
  for refused in (args_of(elsewhere, devkit, out),
                  args + ["--normalize=l1"], args + ["--chunk_rows=3"]):
    before = conftest.snapshot(tmp_path)
    assert_refused(run(*refused), tmp_path, before, partial_of(out))
  proc = run(*args)
  assert proc.returncode == 0 and not proc.stderr, proc.stderr
  assert f"Resuming {partial_of(out)} after 2 of 4 source files" in proc.stdout
  assert not os.path.exists(partial_of(out))
  got = read(out)
  fresh = read(uninterrupted(tmp_path, dirs["train"], devkit))
  for a, b in zip(got[:3], fresh[:3]):
    np.testing.assert_array_equal(a, b)
  for key in ("fingerprint", "num_descriptors", "num_empty", "num_examples",
              "complete"):
    assert got[3][key] == fresh[3][key], key


def test_unreadable_partial_is_started_afresh_with_a_warning(tmp_path):
  dirs, devkit, _ = make_release(tmp_path / "release")
  out = tmp_path / "out" / "val.h5"
  os.makedirs(out.parent)
  with open(partial_of(out), "wb") as f:  # As a kill may leave it.
    f.write(b"\x89HDF\r\n garbage" * 10)
  proc = run(*args_of(dirs["val"], devkit, out, "val"))
  assert proc.returncode == 0 and not proc.stderr, proc.stderr
  assert (f"Starting afresh: the partial file {partial_of(out)} is "
          f"unreadable") in proc.stdout
  fresh = uninterrupted(tmp_path, dirs["val"], devkit, "val")
  assert_same_contents(contents(out), contents(fresh))


def test_source_changed_during_conversion_stops_it(tmp_path, monkeypatch):
  dirs, devkit, _ = make_release(tmp_path / "release")
  original = sbow.read_sbow

  def read_then_touch(path):
    result = original(path)
    if os.path.basename(path) == TRAIN_FILES[1]:  # Rewritten as it is read.
      st = os.stat(path)
      os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return result

  monkeypatch.setattr(sbow, "read_sbow", read_then_touch)
  out = str(tmp_path / "train.h5")
  with pytest.raises(UserError, match=r"n01000000\.sbow\.mat changed while "
                     r"it was being converted.*train\.h5\.partial is kept "
                     r"\(1 of 4 source files done\)"):
    sbow.convert(dirs["train"], devkit, "train", out, chunk_rows=1)
  assert not os.path.exists(out)
