"""The sweep runner: grid parsing, cell names, shards, resume after a kill."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tfcapacity.errors import UserError
from tfcapacity.studies import sweep
import conftest  # tests/ is on sys.path (pytest rootdir conftest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
TINY = """--dataset=digits
--model=mlp
--width=8
--batch_size=64
--epochs=1
--eval_every=1
"""


def run_sweep(*args, timeout=300):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "sweep.py"), *args],
      capture_output=True, text=True, env=ENV, timeout=timeout, cwd=ROOT)


def write_flags(tmp_path, text=TINY, name="base.flags"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def csv_rows(sweep_dir):
  with open(os.path.join(sweep_dir, sweep.CSV_FILE), newline="") as f:
    return list(csv.DictReader(f))


def attempts(sweep_dir, name):
  path = os.path.join(sweep_dir, name, sweep.ATTEMPTS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


# --- Grid parsing and naming ---------------------------------------------------


def test_parse_grid_keeps_order_and_strips_spaces():
  grid = sweep.parse_grid(" width=1000, 2000 ;learning_rate=0.1,0.01; "
                          "--seed=0,1;")
  assert grid == [("width", ["1000", "2000"]),
                  ("learning_rate", ["0.1", "0.01"]), ("seed", ["0", "1"])]
  assert sweep.format_grid(grid) == ("width=1000,2000;learning_rate=0.1,0.01;"
                                     "seed=0,1")


@pytest.mark.parametrize("spec,fragment", [
    ("", "empty"),
    ("width", "bad --grid part"),
    ("width=", "bad --grid part"),
    ("width=1,,2", "bad --grid part"),
    ("=1,2", "bad --grid part"),
    ("width=1;width=2", "twice"),
    ("width=1,1", "repeats"),
    ("model_dir=a,b", "may not set --model_dir"),
])
def test_parse_grid_rejects(spec, fragment):
  with pytest.raises(UserError, match=fragment):
    sweep.parse_grid(spec)


def test_grid_from_flagfile_comment_lines():
  text = ("--width=3\n# sweep.grid: width=16,32\n#sweep.grid:  seed=0,1  \n"
          "# a comment\n")
  assert sweep.grid_from_flagfile(text) == "width=16,32;seed=0,1"
  assert sweep.grid_from_flagfile("--width=3\n") is None


def test_cells_are_the_product_first_flag_slowest_with_stable_names():
  grid = sweep.parse_grid("width=4,8;learning_rate=0.1,0.01")
  cells = sweep.cells(grid)
  assert [c.name for c in cells] == [
      "width=4,learning_rate=0.1", "width=4,learning_rate=0.01",
      "width=8,learning_rate=0.1", "width=8,learning_rate=0.01"]
  assert [c.index for c in cells] == [0, 1, 2, 3]
  assert cells[3].args() == ["--width=8", "--learning_rate=0.01"]
  # Names depend only on the cell's own values, so extending a grid keeps
  # the directories of the cells it had.
  bigger = sweep.cells(sweep.parse_grid("width=4,8,16;learning_rate=0.1,"
                                        "0.01"))
  assert {c.name for c in cells} <= {c.name for c in bigger}


def test_cell_names_replace_unsafe_characters_and_refuse_collisions():
  cell = sweep.cells(sweep.parse_grid("dataset=hdf5:/data/a b.h5"))[0]
  assert cell.name == "dataset=hdf5__data_a_b.h5"
  assert cell.args() == ["--dataset=hdf5:/data/a b.h5"]
  with pytest.raises(UserError, match="same directory name"):
    sweep.cells(sweep.parse_grid("dataset=hdf5:a/b,hdf5:a_b"))


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 13])
def test_shards_cover_every_cell_exactly_once(num_shards):
  cells = sweep.cells(sweep.parse_grid("width=1,2,3;learning_rate=1,2;"
                                       "seed=0,1"))
  taken = [c for i in range(num_shards)
           for c in sweep.shard(cells, i, num_shards)]
  assert sorted(c.index for c in taken) == list(range(len(cells)))


def test_shard_index_out_of_range():
  cells = sweep.cells(sweep.parse_grid("width=1,2"))
  with pytest.raises(UserError, match="shard_index"):
    sweep.shard(cells, 2, 2)


def test_validate_names_the_bad_cell(tmp_path):
  base = write_flags(tmp_path)
  cells = sweep.cells(sweep.parse_grid("width=4,-3"))
  with pytest.raises(UserError, match="cell width=-3"):
    sweep.validate([f"--flagfile={base}"], cells)
  configs = sweep.validate([f"--flagfile={base}"], cells[:1])
  assert configs["width=4"].width == 4
  assert configs["width=4"].dataset == "digits"


# --- The CLI -------------------------------------------------------------------


def test_bad_grid_is_one_line_and_touches_nothing(tmp_path):
  base = write_flags(tmp_path)
  sweep_dir = str(tmp_path / "sweep")
  result = run_sweep(f"--flagfile={base}", f"--sweep_dir={sweep_dir}",
                     "--grid=widthh=4,8")
  conftest.assert_one_line_error(result, "widthh", "Did you mean: width",
                                 prog="sweep")
  assert not os.path.exists(sweep_dir)
  result = run_sweep(f"--flagfile={base}", f"--sweep_dir={sweep_dir}")
  conftest.assert_one_line_error(result, "no --grid", prog="sweep")
  result = run_sweep("--flagfile=/nonexistent.flags",
                     f"--sweep_dir={sweep_dir}", "--grid=width=4")
  conftest.assert_one_line_error(result, "cannot read --flagfile", prog="sweep")


def test_sweep_runs_cells_reports_failures_and_skips_finished_ones(tmp_path):
  """A failing cell is reported, the others finish; a rerun skips them."""
  base = write_flags(tmp_path, TINY + "# sweep.grid: width=4,8\n"
                     "# sweep.grid: dataset=digits,hdf5:/nonexistent.h5\n")
  sweep_dir = str(tmp_path / "sweep")
  result = run_sweep(f"--flagfile={base}", f"--sweep_dir={sweep_dir}",
                     "--parallel=2")
  assert result.returncode == 1, result.stderr[-3000:]
  assert "2 of 4 cells did not finish" in result.stderr
  rows = csv_rows(sweep_dir)
  assert [r["cell"] for r in rows] == [
      "width=4,dataset=digits", "width=4,dataset=hdf5__nonexistent.h5",
      "width=8,dataset=digits", "width=8,dataset=hdf5__nonexistent.h5"]
  assert [r["status"] for r in rows] == ["completed", "failed"] * 2
  assert "nonexistent.h5" in rows[1]["error"]
  assert float(rows[0]["train_top1_error"]) < 0.9
  assert rows[2]["width"] == "8" and rows[2]["num_parameters"] == str(
      64 * 8 + 8 + 8 * 10 + 10)

  again = run_sweep(f"--flagfile={base}", f"--sweep_dir={sweep_dir}",
                    "--parallel=2")
  assert again.returncode == 1
  assert "2 of this shard's 4 cells already finished" in again.stderr
  assert len(attempts(sweep_dir, "width=4,dataset=digits")) == 1
  assert len(attempts(sweep_dir, "width=4,dataset=hdf5__nonexistent.h5")) == 2
  assert len(csv_rows(sweep_dir)) == 4

  changed = write_flags(tmp_path, TINY.replace("--epochs=1", "--epochs=2"),
                        name="changed.flags")
  refused = run_sweep(f"--flagfile={changed}", f"--sweep_dir={sweep_dir}",
                      "--grid=width=4")
  conftest.assert_one_line_error(refused, "different base flags",
                                 "--epochs=2", prog="sweep")


def test_killed_sweep_reruns_only_unfinished_cells(tmp_path):
  """SIGKILL mid-sweep: cells die with it; a rerun resumes the cut one."""
  base = write_flags(tmp_path, TINY.replace("--epochs=1", "--epochs=30")
                     + "--checkpoint_every_steps=20\n--steps_per_loop=5\n")
  sweep_dir = str(tmp_path / "sweep")
  args = [f"--flagfile={base}", f"--sweep_dir={sweep_dir}",
          "--grid=width=4,6,8"]
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tools", "sweep.py"), *args],
      env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  second = os.path.join(sweep_dir, "width=6")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    ckpts = os.path.join(second, "checkpoints")
    if os.path.isdir(ckpts) and any(
        int(n.split("-")[1].split(".")[0]) >= 40 for n in os.listdir(ckpts)
        if n.endswith(".index")):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the sweep ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert sweep.cell_state(os.path.join(sweep_dir, "width=4")) == "completed"
  # The training process dies with the sweep and releases the cell's lock.
  deadline = time.time() + 30
  while sweep.is_locked(second) and time.time() < deadline:
    time.sleep(0.1)
  assert sweep.cell_state(second) == "interrupted"
  assert not os.path.exists(os.path.join(sweep_dir, "width=8",
                                         "results.json"))

  result = run_sweep(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = csv_rows(sweep_dir)
  assert [r["cell"] for r in rows] == ["width=4", "width=6", "width=8"]
  assert {r["status"] for r in rows} == {"completed"}
  assert len(attempts(sweep_dir, "width=4")) == 1
  with open(os.path.join(second, sweep.LOG_FILE)) as f:
    log = f.read()
  assert log.count("=== sweep attempt") == 2
  assert "Resumed" in log.split("=== sweep attempt")[-1]
  with open(os.path.join(second, "results.json")) as f:
    steps = [row["step"] for row in json.load(f)["history"]]
  assert steps == sorted(set(steps))  # No duplicated history rows.


def test_shards_share_one_sweep_dir_and_csv(tmp_path):
  base = write_flags(tmp_path)
  sweep_dir = str(tmp_path / "sweep")
  grid = "--grid=width=4,8;learning_rate=0.1,0.05"
  first = run_sweep(f"--flagfile={base}", f"--sweep_dir={sweep_dir}", grid,
                    "--shard_index=1", "--num_shards=2")
  assert first.returncode == 0, first.stderr[-3000:]
  assert [r["status"] for r in csv_rows(sweep_dir)] == [
      "pending", "completed", "pending", "completed"]
  second = run_sweep(f"--flagfile={base}", f"--sweep_dir={sweep_dir}", grid,
                     "--shard_index=0", "--num_shards=2")
  assert second.returncode == 0, second.stderr[-3000:]
  rows = csv_rows(sweep_dir)
  assert [r["status"] for r in rows] == ["completed"] * 4
  for row in rows:
    assert len(attempts(sweep_dir, row["cell"])) == 1
  # The HParams experiment at the root lists the grid's flags and values.
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import metadata  # pylint: disable=g-import-not-at-top
  events = [e for e in os.listdir(sweep_dir) if e.startswith("events.out")]
  assert len(events) == 1
  experiments = []
  for event in event_file_loader.EventFileLoader(
      os.path.join(sweep_dir, events[0])).Load():
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME:
        data = metadata.parse_experiment_plugin_data(
            value.metadata.plugin_data.content)
        experiments.append(data)
  assert len(experiments) == 1
  domains = {h.name: [v.number_value for v in h.domain_discrete.values]
             for h in experiments[0].hparam_infos}
  assert domains == {"width": [4.0, 8.0], "learning_rate": [0.05, 0.1]}
  # The train run's tags, with the test set's final values copied there
  # (TensorBoard reads a session's metrics from its own run).
  assert {m.name.tag for m in experiments[0].metric_infos} >= {
      "top1_error", "final/test_top1_error"}
