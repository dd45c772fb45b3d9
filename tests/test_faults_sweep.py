"""Damaged inputs to the sweep runner and the study tools, and two sweeps on
one directory.

Every damaged file ends a tool with one line on stderr, `<prog>: error:`,
naming the file and the fix, exit status 2, and every file under the sweep
or study directory byte-identical (`conftest.snapshot`).
"""

import csv
import fcntl
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time

import pytest

from tfcapacity import config
from tfcapacity import rundir
from tfcapacity.errors import UserError
from tfcapacity.studies import confusion_study
from tfcapacity.studies import sweep
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_TOOL = os.path.join(ROOT, "tools", "sweep.py")
TINY = ("--dataset=digits\n--width=4\n--depth=1\n--epochs=1\n"
        "--batch_size=64\n--noexport\n--noprogress_bar\n")
GRID = "width=4,8"
CELL = "width=4"  # The cell the fixture has finished.


def base_flagfile(tmp_path, text=TINY):
  path = tmp_path / "base.flags"
  path.write_text(text)
  return str(path)


def mark_cell(cell_dir, attempts=({"exit_code": 0},)):
  """What the runner leaves in a cell it ran: its lock file and attempts."""
  os.makedirs(cell_dir, exist_ok=True)
  open(os.path.join(cell_dir, sweep.LOCK_FILE), "w").close()
  rundir.write_json(os.path.join(cell_dir, sweep.ATTEMPTS_FILE), [
      {"started": 1.0e9, "seconds": 12.0, **a} for a in attempts])


def finish_cell(cell_dir, status="completed", steps=22, total_steps=22,
                **extra):
  row = {"epoch": 1, "step": steps, "train_loss": 0.5, "test_loss": 0.6}
  rundir.write_json(os.path.join(cell_dir, rundir.RESULTS_FILE), {
      "status": status, "steps": steps, "total_steps": total_steps,
      "history": [row], "final": row, **extra})


@pytest.fixture
def swept(tmp_path):
  """(base flagfile, sweep dir): a sweep of GRID whose cell CELL finished,
  laid out as the runner leaves it (no training: the tools must refuse
  before they would train)."""
  base = base_flagfile(tmp_path)
  sweep_dir = str(tmp_path / "sweep")
  cfg = config.parse_args([f"--flagfile={base}"])
  grid = sweep.parse_grid(GRID)
  sweep.prepare_sweep_dir(sweep_dir, cfg, grid)
  cell_dir = os.path.join(sweep_dir, CELL)
  mark_cell(cell_dir)
  finish_cell(cell_dir)
  return base, sweep_dir


def run_sweep(base, sweep_dir, *args, timeout=300):
  return conftest.run_cli(SWEEP_TOOL, f"--flagfile={base}",
                          f"--sweep_dir={sweep_dir}", f"--grid={GRID}",
                          *args, timeout=timeout, cwd=ROOT)


def assert_refused(base, sweep_dir, *fragments, args=()):
  """The sweep tool ends with one line holding `fragments` and changes
  nothing under `sweep_dir` (nor the base flagfile)."""
  before = conftest.snapshot(sweep_dir), conftest.snapshot(base)
  proc = run_sweep(base, sweep_dir, *args)
  conftest.assert_one_line_error(proc, *fragments, prog="sweep")
  assert (conftest.snapshot(sweep_dir), conftest.snapshot(base)) == before


def garble(path, content: bytes):
  with open(path, "wb") as f:
    f.write(content)


def truncated(path) -> bytes:
  with open(path, "rb") as f:
    data = f.read()
  return data[:len(data) // 2]


# --- The sweep's own records -------------------------------------------------


@pytest.mark.parametrize("damage,dry_run", [
    ("binary", False), ("truncated", False), ("not_a_record", False),
    ("binary", True)])
def test_damaged_sweep_json_is_one_line(swept, damage, dry_run):
  base, sweep_dir = swept
  path = os.path.join(sweep_dir, sweep.SWEEP_FILE)
  garble(path, {"binary": b"\x00\xff\xfe{garbage",
                "truncated": truncated(path),
                "not_a_record": b'["width=4,8"]\n'}[damage])
  assert_refused(base, sweep_dir, path, "is damaged", "restore it",
                 "new --sweep_dir",
                 args=["--dry_run"] if dry_run else [])


@pytest.mark.parametrize("damage,why", [
    ("binary", "differ"), ("text", "differ"), ("truncated", "differ"),
    ("binary_no_digest", "utf-8"), ("text_no_digest", "unexpected"),
    ("bad_value_no_digest", "--width=abc")])
def test_damaged_base_flags_is_one_line(swept, damage, why):
  """With sweep.json's digest any change is caught; without one (a sweep
  begun before the digest), base.flags must parse as the train CLI parses
  it."""
  base, sweep_dir = swept
  path = os.path.join(sweep_dir, sweep.BASE_FLAGS_FILE)
  if damage.endswith("_no_digest"):
    record_path = os.path.join(sweep_dir, sweep.SWEEP_FILE)
    with open(record_path) as f:
      record = json.load(f)
    del record["base_flags_sha256"]
    rundir.write_json(record_path, record)
  with open(path, "rb") as f:
    good = f.read()
  garble(path, {"binary": b"\x00\xff\xfe--width=4",
                "text": b"garbage\n",
                "truncated": good[:len(good) // 2],
                "binary_no_digest": b"--width=4\n\xff\xfe\n",
                "text_no_digest": good + b"garbage\n",
                "bad_value_no_digest": good + b"--width=abc\n"}[damage])
  assert_refused(base, sweep_dir, path, "is damaged", why, "restore it",
                 "new --sweep_dir")


@pytest.mark.parametrize("content", [
    b"[{\"started\": 1e9, \"exit_c", b"\x00\xff", b"{}\n", b"[1, 2]\n",
    b"[{\"exit_code\": \"zero\"}]\n"])
def test_damaged_attempts_file_is_refused_not_rebuilt(swept, content):
  """The runner's record of a cell's processes is not rebuilt: it is what
  tells a failed cell from an interrupted one. The message says that
  deleting it keeps the cell's run; nothing is written."""
  base, sweep_dir = swept
  path = os.path.join(sweep_dir, CELL, sweep.ATTEMPTS_FILE)
  garble(path, content)
  assert_refused(base, sweep_dir, path, "is damaged", "restore it",
                 "delete it", "is kept")
  with pytest.raises(UserError, match="is damaged"):
    sweep.cell_state(os.path.join(sweep_dir, CELL))


@pytest.mark.parametrize("marked", [True, False])
@pytest.mark.parametrize("content", [
    b"{\"status\": \"compl\x00\xff", b"[]\n",
    b"{\"status\": \"completed\", \"steps\": \"22\", \"total_steps\": 22}"])
def test_damaged_cell_results_is_one_line(swept, marked, content):
  """A grid cell's results.json, whether the runner ran the cell (marked)
  or someone trained it by hand, is read before the sweep starts."""
  base, sweep_dir = swept
  cell_dir = os.path.join(sweep_dir, "width=8")
  os.makedirs(cell_dir)
  if marked:
    mark_cell(cell_dir)
  path = os.path.join(cell_dir, rundir.RESULTS_FILE)
  garble(path, content)
  assert_refused(base, sweep_dir, path, "is damaged", "restore it")


def test_damaged_records_while_running_are_a_csv_state(swept):
  """Damage found mid-sweep (after the checks) marks the cell's CSV row,
  with the message, instead of ending the sweep."""
  _, sweep_dir = swept
  cells = sweep.cells(sweep.parse_grid(GRID))
  garble(os.path.join(sweep_dir, CELL, sweep.ATTEMPTS_FILE), b"{")
  rows = sweep.collect(sweep_dir, cells)
  assert [r["status"] for r in rows] == [sweep.DAMAGED, sweep.PENDING]
  assert sweep.ATTEMPTS_FILE in rows[0]["error"]


# --- Where the sweep directory is --------------------------------------------


@pytest.mark.parametrize("where,fragment,dry_run", [
    ("file", "is a file", False), ("file/sub", "lies under the file", False),
    ("file/sub/deeper", "lies under the file", False),
    ("file/sub", "lies under the file", True)])
def test_sweep_dir_through_a_regular_file(tmp_path, where, fragment,
                                          dry_run):
  base = base_flagfile(tmp_path)
  (tmp_path / "file").write_text("not a directory\n")
  before = conftest.snapshot(tmp_path)
  proc = run_sweep(base, str(tmp_path / where),
                   *(["--dry_run"] if dry_run else []))
  conftest.assert_one_line_error(proc, f"--sweep_dir={tmp_path / where}",
                                 fragment, prog="sweep")
  assert conftest.snapshot(tmp_path) == before


# --- The study tools ---------------------------------------------------------

STUDIES = {  # tool: its CPU flagfile
    "capacity_study": "capacity_mnist1d_cpu",
    "random_labels_study": "random_labels_mnist1d_cpu",
    "maxibatch_study": "maxibatch_resnet_digits_cpu",
    "global_minima_study": "global_minima_mnist1d_cpu",
    "confusion_study": "confusion_mnist1d_cpu",
}


def study_cell(tool, flagfile, study_dir) -> str:
  """The directory of a cell the study's report reads (for the confusion
  study, in a training part's own sweep directory, as the tool lays it
  out)."""
  with open(flagfile) as f:
    text = f.read()
  if tool == "confusion_study":
    part = next(p for p in confusion_study.parse_parts(text)
                if not p.at_init)
    part_dir = os.path.join(study_dir, part.name)
    sweep.prepare_sweep_dir(part_dir, config.parse_args(
        [f"--flagfile={flagfile}"]), part.grid)
    return os.path.join(part_dir, part.cells()[0].name)
  if tool == "global_minima_study":  # The first cell of its default plan.
    return os.path.join(study_dir, "model=mlp,depth=1,width=16,seed=0")
  first = sweep.cells(sweep.flagfile_grid(text, flagfile))[0]
  return os.path.join(study_dir, first.name)


@pytest.mark.parametrize("marked", [
    True, pytest.param(False, id="unmarked")])
@pytest.mark.parametrize("tool", sorted(STUDIES))
def test_study_report_only_with_damaged_cell_results(tmp_path, tool, marked):
  """--report_only over a study whose cell has a garbage results.json.

  Marked: the cell as the runner leaves it (its lock file and attempts), so
  `common.check_study_dir` refuses it before the report. Unmarked: only
  the report's own reading can catch it.
  """
  flagfile = os.path.join(ROOT, "flags", STUDIES[tool] + ".flags")
  study_dir = str(tmp_path / "study")
  cell_dir = study_cell(tool, flagfile, study_dir)
  if marked:
    mark_cell(cell_dir)
  else:
    os.makedirs(cell_dir, exist_ok=True)
  path = os.path.join(cell_dir, rundir.RESULTS_FILE)
  garble(path, b"{\"status\": \"completed\", \"hist\x00\xff")
  before = conftest.snapshot(study_dir)
  proc = conftest.run_cli(os.path.join(ROOT, "tools", tool + ".py"),
                          f"--flagfile={flagfile}",
                          f"--study_dir={study_dir}", "--report_only",
                          cwd=ROOT)
  conftest.assert_one_line_error(proc, path, prog=tool)
  assert conftest.snapshot(study_dir) == before


@pytest.mark.parametrize("record", [sweep.SWEEP_FILE, sweep.BASE_FLAGS_FILE,
                                    sweep.ATTEMPTS_FILE])
def test_study_with_damaged_sweep_record_is_one_line(tmp_path, record):
  """A study directory is a sweep directory: its records are checked before
  the tool trains (here without --report_only) or reports."""
  flagfile = os.path.join(ROOT, "flags", STUDIES["capacity_study"] + ".flags")
  study_dir = str(tmp_path / "study")
  cell_dir = study_cell("capacity_study", flagfile, study_dir)
  sweep.prepare_sweep_dir(study_dir, config.parse_args(
      [f"--flagfile={flagfile}"]), sweep.parse_grid("width=16"))
  mark_cell(cell_dir)
  path = (os.path.join(cell_dir, record) if record == sweep.ATTEMPTS_FILE
          else os.path.join(study_dir, record))
  garble(path, b"\x00\xff{")
  before = conftest.snapshot(study_dir)
  proc = conftest.run_cli(os.path.join(ROOT, "tools", "capacity_study.py"),
                          f"--flagfile={flagfile}",
                          f"--study_dir={study_dir}", "--parallel=1",
                          cwd=ROOT)
  conftest.assert_one_line_error(proc, path, "is damaged",
                                 prog="capacity_study")
  assert conftest.snapshot(study_dir) == before


def test_study_dir_through_a_regular_file(tmp_path):
  flagfile = os.path.join(ROOT, "flags", STUDIES["capacity_study"] + ".flags")
  (tmp_path / "file").write_text("x\n")
  before = conftest.snapshot(tmp_path)
  proc = conftest.run_cli(os.path.join(ROOT, "tools", "capacity_study.py"),
                          f"--flagfile={flagfile}",
                          f"--study_dir={tmp_path / 'file' / 'study'}",
                          "--report_only", cwd=ROOT)
  conftest.assert_one_line_error(proc, "--study_dir=", "lies under the file",
                                 prog="capacity_study")
  assert conftest.snapshot(tmp_path) == before


# --- Cells another process holds ---------------------------------------------


FAKE_TRAIN = """#!{python}
# Stands in for `python -m tfcapacity.train`: a completed run, at once.
import json, os, sys
model_dir = [a.split("=", 1)[1] for a in sys.argv
             if a.startswith("--model_dir=")][0]
with open(os.path.join(model_dir, "results.json"), "w") as f:
  json.dump({{"status": "completed", "steps": 3, "total_steps": 3,
             "final": {{"train_loss": 0.25}}}}, f)
"""


@pytest.mark.parametrize("other_finishes", [True, False])
def test_run_waits_for_a_cell_another_process_holds(tmp_path,
                                                    other_finishes):
  """A cell locked by another process is waited for. If that process
  completed it, it is not trained again; if it stopped before (killed),
  this sweep trains it. Either way every cell ends finished."""
  fake = tmp_path / "fake_python"
  fake.write_text(FAKE_TRAIN.format(python=sys.executable))
  fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
  base = base_flagfile(tmp_path)
  sweep_dir = str(tmp_path / "sweep")
  grid = sweep.parse_grid(GRID)
  cells = sweep.cells(grid)
  configs = sweep.validate([f"--flagfile={base}"], cells)
  sweep.prepare_sweep_dir(sweep_dir, config.parse_args(
      [f"--flagfile={base}"]), grid)
  held = os.path.join(sweep_dir, CELL)
  os.makedirs(held)
  fd = os.open(os.path.join(held, sweep.LOCK_FILE), os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "Another sweep".
  out = {}
  thread = threading.Thread(target=lambda: out.update(states=sweep.run(
      sweep_dir, cells, cells, configs, progress=False, python=str(fake))))
  thread.start()
  try:
    other = os.path.join(sweep_dir, "width=8", rundir.RESULTS_FILE)
    deadline = time.time() + 60
    while not os.path.exists(other) and time.time() < deadline:
      time.sleep(0.05)
    time.sleep(0.5)
    assert thread.is_alive(), "run() ended while a cell was still locked"
    if other_finishes:
      finish_cell(held, steps=7, total_steps=7)
      rundir.write_json(os.path.join(held, sweep.ATTEMPTS_FILE),
                        [{"started": 1.0e9, "seconds": 1.0, "exit_code": 0}])
  finally:
    os.close(fd)
  thread.join(60)
  assert not thread.is_alive()
  assert out["states"] == {"width=4": "completed", "width=8": "completed"}
  with open(os.path.join(held, rundir.RESULTS_FILE)) as f:
    steps = json.load(f)["steps"]
  attempts = sweep.read_attempts(held)
  if other_finishes:  # The other process's run, untouched.
    assert steps == 7 and len(attempts) == 1
  else:  # Trained here once the lock was free.
    assert steps == 3 and [a["exit_code"] for a in attempts] == [0]
  rows = sweep.read_csv(os.path.join(sweep_dir, sweep.CSV_FILE))
  assert [r["status"] for r in rows] == ["completed", "completed"]


def test_two_sweeps_on_one_dir_both_exit_0(tmp_path):
  """Two tools/sweep.py on one directory split the grid between them and
  both exit 0 once every cell finished. One cell diverges: sweep.csv's
  diverged_at_step is the step the training log reports."""
  base = base_flagfile(tmp_path, TINY + "--loss=squared\n")
  sweep_dir = str(tmp_path / "sweep")
  cells = ["learning_rate=0.1", "learning_rate=1e6"]
  args = [SWEEP_TOOL, f"--flagfile={base}", f"--sweep_dir={sweep_dir}",
          "--grid=learning_rate=0.1,1e6", "--threads_per_cell=1",
          "--noprogress"]

  def start(name):  # Output to files: a full pipe would stall a sweep.
    with open(tmp_path / f"{name}.err", "w") as err:
      return subprocess.Popen([sys.executable, *args], cwd=ROOT,
                              env=conftest.CLI_ENV, stdout=subprocess.DEVNULL,
                              stderr=err)

  first = start("first")
  # The second starts once the first holds cell 0, so it finds it locked.
  log = os.path.join(sweep_dir, cells[0], sweep.LOG_FILE)
  deadline = time.time() + 60
  while not os.path.exists(log) and time.time() < deadline:
    time.sleep(0.05)
  second = start("second")
  errs = []
  for name, proc in (("first", first), ("second", second)):
    proc.wait(timeout=240)
    errs.append((tmp_path / f"{name}.err").read_text())
    assert proc.returncode == 0, errs[-1][-3000:]
    assert "did not finish" not in errs[-1]
  assert f"started cell {cells[0]}" in errs[0]
  assert f"started cell {cells[1]}" in errs[1]
  assert f"cell {cells[0]} is running in another process" in errs[1]
  for name in cells:  # Each cell trained once, by one of them.
    assert len(sweep.read_attempts(os.path.join(sweep_dir, name))) == 1

  with open(os.path.join(sweep_dir, sweep.CSV_FILE), newline="") as f:
    rows = {r["cell"]: r for r in csv.DictReader(f)}
  assert rows[cells[0]]["status"] == "completed"
  assert rows[cells[0]]["diverged_at_step"] == ""
  assert rows[cells[1]]["status"] == "diverged"
  with open(os.path.join(sweep_dir, cells[1], sweep.LOG_FILE)) as f:
    logged = re.findall(r"Run diverged at step (\d+)", f.read())
  assert len(logged) == 1
  assert rows[cells[1]]["diverged_at_step"] == logged[0]
