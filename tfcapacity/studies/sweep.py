"""Grids of training runs: the shared runner behind every tfcapacity study.

A sweep is a base flagfile and a grid such as
`width=1000,2000,5000;learning_rate=0.1,0.01;seed=0,1`. Each cell of the
grid's Cartesian product is one `python -m tfcapacity.train` run in its own
model_dir, `<sweep_dir>/<cell name>`, named after its grid values
(`width=1000,learning_rate=0.1,seed=0`).

What makes a sweep safe to kill, rerun and split:
  * A cell's state lives in its run directory (results.json), so a rerun
    skips completed and diverged cells and resumes interrupted ones from
    their checkpoints: the train CLI resumes by itself when rerun with the
    same flags.
  * Every cell is validated (flags parsed with the base flagfile) before
    any process starts, so a bad grid fails at once with one line.
  * A running cell holds an exclusive lock on `<cell>/.sweep.lock` that the
    training process inherits, so two sweeps (or two shards given the same
    index by mistake) never train the same cell at once. A sweep reads a
    cell again once it holds its lock (another sweep may have finished it
    meanwhile), and waits for cells that another sweep is running, so two
    sweeps on one directory both end with every cell's final state.
  * The sweep's own records (sweep.json, base.flags, each cell's
    sweep_attempts.json) and the cells' results.json are never trusted
    blindly: a damaged one stops the sweep before it writes anything, with
    one line naming the file and the fix (`UserError`).
  * `sweep.csv` is rebuilt from all cells' run directories after every
    finished cell and written atomically: one row per cell, whichever shard
    or invocation ran it.
  * Shard k of n takes cells k, k+n, k+2n, ... of the grid's fixed order.

The base flags are stored resolved in `<sweep_dir>/base.flags` and every cell
runs from that copy, so a sweep's cells agree even if the original flagfile
is edited later; a rerun whose base flags differ is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence

from absl import logging

from tfcapacity import config as config_lib
from tfcapacity.errors import UserError
from tfcapacity import rundir

SWEEP_FILE = "sweep.json"
BASE_FLAGS_FILE = "base.flags"
CSV_FILE = "sweep.csv"
LOCK_FILE = ".sweep.lock"
LOG_FILE = "train.log"
ATTEMPTS_FILE = "sweep_attempts.json"

# Comment lines in a flagfile that carry its study's grid, one flag per line:
#   # sweep.grid: width=16,32,64
GRID_COMMENT = re.compile(r"^\s*#\s*sweep\.grid:\s*(.+?)\s*$")

# A cell's final state, from its run directory and its last attempt.
COMPLETED, DIVERGED, FAILED, INTERRUPTED, PENDING, RUNNING = (
    "completed", "diverged", "failed", "interrupted", "pending", "running")
FINISHED = (COMPLETED, DIVERGED)
# A cell whose results.json or sweep_attempts.json was found damaged while
# the sweep ran (sweep.csv and `run`'s states; `cell_state` raises instead).
DAMAGED = "damaged"

EXIT_DIVERGED = 3
METRIC_KEYS = ("train_loss", "train_top1_error", "train_top5_error",
               "test_loss", "test_top1_error", "test_top5_error")
# Flags a grid may not set: the sweep owns them.
_RESERVED = frozenset({"model_dir", "flagfile", "overwrite"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One grid point: its overrides of the base flags, in grid order."""
  index: int
  overrides: tuple[tuple[str, str], ...]

  @property
  def name(self) -> str:
    return cell_name(self.overrides)

  def args(self) -> list[str]:
    return [f"--{key}={value}" for key, value in self.overrides]


def parse_grid(spec: str) -> list[tuple[str, list[str]]]:
  """`'width=1,2;learning_rate=0.1'` -> [('width', ['1', '2']), ...].

  Raises:
    UserError: an empty or malformed part, a repeated flag or value, or a
      flag the sweep sets itself.
  """
  grid = []
  for part in spec.split(";"):
    part = part.strip()
    if not part:
      continue
    key, sep, values = part.partition("=")
    key = key.strip().lstrip("-")
    values = [v.strip() for v in values.split(",")]
    if not sep or not key or not all(values):
      raise UserError(
          f"bad --grid part {part!r}; write flag=value1,value2,... and "
          f"separate flags with ';'")
    if key in _RESERVED:
      raise UserError(f"--grid may not set --{key}; the sweep sets it")
    if key in dict(grid):
      raise UserError(f"--grid names --{key} twice; give all its values in "
                      f"one part")
    if len(set(values)) != len(values):
      raise UserError(f"--grid repeats a value of --{key}: {part!r}")
    grid.append((key, values))
  if not grid:
    raise UserError("--grid is empty; give e.g. --grid='width=16,64;"
                    "learning_rate=0.1,0.01'")
  return grid


def grid_from_flagfile(text: str) -> str | None:
  """The grid spec held in `# sweep.grid:` comment lines, or None."""
  parts = [m.group(1) for m in map(GRID_COMMENT.match, text.splitlines())
           if m]
  return ";".join(parts) if parts else None


def flagfile_grid(text: str, path: str) -> list[tuple[str, list[str]]]:
  """The parsed grid of the flagfile at `path` (whose text is `text`).

  Raises:
    UserError: the flagfile has no `# sweep.grid:` lines, or a bad one.
  """
  spec = grid_from_flagfile(text)
  if spec is None:
    raise UserError(f"{path} has no '# sweep.grid: flag=v1,v2' lines; add "
                    f"the study's grid there")
  return parse_grid(spec)


def format_grid(grid: Sequence[tuple[str, Sequence[str]]]) -> str:
  return ";".join(f"{key}={','.join(values)}" for key, values in grid)


def cell_name(overrides: Iterable[tuple[str, str]]) -> str:
  """The cell's directory name: `key=value` pairs joined by commas.

  Characters outside [A-Za-z0-9._+=,-] (a '/' in a path, say) become '_'.
  """
  return ",".join(f"{key}={_UNSAFE.sub('_', value)}"
                  for key, value in overrides)


def cells(grid: Sequence[tuple[str, Sequence[str]]]) -> list[Cell]:
  """The grid's Cartesian product; the first flag varies slowest.

  Raises:
    UserError: two cells would share a directory name.
  """
  keys = [key for key, _ in grid]
  out = [Cell(i, tuple(zip(keys, combo))) for i, combo in
         enumerate(itertools.product(*(values for _, values in grid)))]
  names = [c.name for c in out]
  if len(set(names)) != len(names):
    raise UserError("two grid cells get the same directory name after "
                    "replacing characters outside [A-Za-z0-9._+=,-]; make "
                    "the values differ in other characters")
  return out


def shard(all_cells: Sequence[Cell], index: int, num_shards: int
          ) -> list[Cell]:
  """Cells index, index + num_shards, ... (a job array's share)."""
  if num_shards < 1 or not 0 <= index < num_shards:
    raise UserError(f"--shard_index={index} must be in [0, --num_shards="
                    f"{num_shards})")
  return list(all_cells[index::num_shards])


def validate(base_args: Sequence[str], grid_cells: Sequence[Cell]
             ) -> dict[str, config_lib.Config]:
  """Each cell's Config (base args, then its overrides), before any run.

  Raises:
    UserError: naming the first cell whose flags the train CLI would refuse.
  """
  configs = {}
  for cell in grid_cells:
    try:
      configs[cell.name] = config_lib.parse_args(
          [*base_args, *cell.args()])
    except UserError as e:
      raise UserError(f"cell {cell.name}: {e}") from None
  return configs


# --- The sweep directory -----------------------------------------------------


def _fix_sweep(flag: str) -> str:
  """The fix a damaged sweep.json or base.flags message names."""
  return f"restore it, or start the sweep afresh in a new {flag}"


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else e.__class__.__name__


def _damaged(path: str, why: str, fix: str) -> UserError:
  return UserError(f"{path} is damaged ({why}); {fix}")


def _read_bytes(path: str, fix: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror}); {fix}") from None


def _read_json(path: str, fix: str):
  try:
    return json.loads(_read_bytes(path, fix).decode())
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError.
    raise _damaged(path, _first_line(e), fix) from None


def check_sweep_path(sweep_dir: str, flag: str = "--sweep_dir") -> None:
  """Refuses a sweep directory that is a file or lies under one; `flag`
  names the flag that gave it.

  Raises:
    UserError: naming the file in the way.
  """
  if os.path.exists(sweep_dir) and not os.path.isdir(sweep_dir):
    raise UserError(f"{flag}={sweep_dir} is a file; choose a directory")
  parent = os.path.dirname(os.path.abspath(sweep_dir))
  while not os.path.exists(parent) and os.path.dirname(parent) != parent:
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{flag}={sweep_dir} lies under the file {parent}; "
                    f"choose a directory path")


def read_sweep(sweep_dir: str, flag: str = "--sweep_dir") -> dict | None:
  """sweep.json: the grid last run here, and base.flags' digest; None if
  the sweep has not started. `flag` gave `sweep_dir` (for the message).

  Raises:
    UserError: the file is unreadable or not such a record.
  """
  path = os.path.join(sweep_dir, SWEEP_FILE)
  if not os.path.exists(path):
    return None
  record = _read_json(path, _fix_sweep(flag))
  if not (isinstance(record, dict) and isinstance(record.get("grid"), str)
          and isinstance(record.get("base_flags_sha256", ""), str)):
    raise _damaged(path, 'not a JSON object with a "grid" string',
                   _fix_sweep(flag))
  return record


def read_base_flags(sweep_dir: str, record: dict | None = None,
                    flag: str = "--sweep_dir") -> config_lib.Config | None:
  """The Config of base.flags, parsed as strictly as the cells' train CLI
  parses it; None if the sweep has not started.

  Args:
    sweep_dir: the sweep directory.
    record: its sweep.json (`read_sweep`); its digest of base.flags, if it
      has one, must match the file.
    flag: the flag that gave `sweep_dir` (for the message).

  Raises:
    UserError: base.flags is unreadable, differs from the digest, or is not
      a valid flagfile.
  """
  path = os.path.join(sweep_dir, BASE_FLAGS_FILE)
  if not os.path.exists(path):
    return None
  fix = _fix_sweep(flag)
  data = _read_bytes(path, fix)
  digest = (record or {}).get("base_flags_sha256")
  if digest and hashlib.sha256(data).hexdigest() != digest:
    raise _damaged(path, f"its bytes differ from those {SWEEP_FILE} "
                   f"recorded", fix)
  try:
    text = data.decode()
  except UnicodeDecodeError as e:
    raise _damaged(path, _first_line(e), fix) from None
  lines = [line.strip() for line in text.splitlines()
           if line.strip() and not line.lstrip().startswith("#")]
  try:
    return config_lib.parse_args(lines)
  except UserError as e:
    raise _damaged(path, _first_line(e), fix) from None


def _cell_dirs(sweep_dir: str, names: Iterable[str] = ()) -> list[str]:
  """`names` under `sweep_dir`, and every subdirectory the runner has run
  (it holds a lock or an attempts file)."""
  marked = []
  if os.path.isdir(sweep_dir):
    for entry in sorted(os.listdir(sweep_dir)):
      path = os.path.join(sweep_dir, entry)
      if any(os.path.exists(os.path.join(path, f))
             for f in (LOCK_FILE, ATTEMPTS_FILE)):
        marked.append(path)
  named = [os.path.join(sweep_dir, n) for n in names]
  return list(dict.fromkeys([*named, *marked]))


def check_cells(sweep_dir: str, names: Iterable[str] = ()) -> None:
  """Reads the records of the cells `names` and of every cell the runner
  has run in `sweep_dir`; reads only.

  Raises:
    UserError: a cell's path is a file, or its results.json or
      sweep_attempts.json is damaged (the first such file is named).
  """
  for cell_dir in _cell_dirs(sweep_dir, names):
    if os.path.exists(cell_dir) and not os.path.isdir(cell_dir):
      raise UserError(f"cell directory {cell_dir} is a file; move it out of "
                      f"the sweep directory")
    read_attempts(cell_dir)
    read_cell_results(cell_dir)


def check_sweep_dir(sweep_dir: str, names: Iterable[str] = (),
                    flag: str = "--sweep_dir"
                    ) -> tuple[dict | None, config_lib.Config | None]:
  """Checks a sweep directory's records; reads only. `flag` names the flag
  that gave the directory.

  Returns:
    (its sweep.json, the Config of its base.flags); None for each that
    does not exist yet.

  Raises:
    UserError: the path is a file or lies under one; sweep.json or
      base.flags is damaged; or so is a record of the cells `names` or of
      a cell the runner has run there (`check_cells`).
  """
  check_sweep_path(sweep_dir, flag)
  record = read_sweep(sweep_dir, flag)
  base = read_base_flags(sweep_dir, record, flag)
  check_cells(sweep_dir, names)
  return record, base


def prepare_sweep_dir(sweep_dir: str, base: config_lib.Config,
                      grid: Sequence[tuple[str, Sequence[str]]],
                      grid_cells: Sequence[Cell] = ()) -> bool:
  """Writes base.flags and sweep.json; returns whether the grid is new.

  Everything is checked before anything is written (`check_sweep_dir`):
  the path, the records of an earlier sweep there, and those of
  `grid_cells` and of every cell the runner has run there.

  Raises:
    UserError: the path is a file or lies under one, or cannot be created;
      a record is damaged; or the directory holds a sweep of different base
      flags.
  """
  record, old = check_sweep_dir(sweep_dir, [c.name for c in grid_cells])
  base_path = os.path.join(sweep_dir, BASE_FLAGS_FILE)
  if old is not None:
    old, new = old.semantic_dict(), base.semantic_dict()
    diffs = [f"--{k}={new.get(k)} (sweep has {old.get(k)})"
             for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    if diffs:
      raise UserError(
          f"--sweep_dir={sweep_dir} holds a sweep of different base flags: "
          f"{'; '.join(diffs[:3])}; use another --sweep_dir")
  spec = format_grid(grid)
  try:
    os.makedirs(sweep_dir, exist_ok=True)
    if old is None:
      rundir.atomic_write(base_path, config_lib.to_flagfile(
          base.replace(model_dir=None)))
    with open(base_path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    new_record = {"grid": spec, "base_flags": BASE_FLAGS_FILE,
                  "base_flags_sha256": digest}
    if new_record != record:
      rundir.write_json(os.path.join(sweep_dir, SWEEP_FILE), new_record)
  except OSError as e:
    raise UserError(f"cannot write the sweep directory {sweep_dir} "
                    f"({e.strerror}); choose one you can write") from None
  return record is None or record.get("grid") != spec


def _lock(cell_dir: str) -> int | None:
  """An fd holding the cell's exclusive lock, or None if it is taken."""
  os.makedirs(cell_dir, exist_ok=True)
  fd = os.open(os.path.join(cell_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT,
               0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    return None
  return fd


def is_locked(cell_dir: str) -> bool:
  if not os.path.exists(os.path.join(cell_dir, LOCK_FILE)):
    return False
  fd = _lock(cell_dir)
  if fd is None:
    return True
  os.close(fd)
  return False


def read_attempts(cell_dir: str) -> list[dict]:
  """The runner's record of the cell's training processes ([] if none).

  Raises:
    UserError: the file is not a list of attempts. The runner does not
      rebuild it (its exit codes tell a failed cell from an interrupted
      one); the message says how to start it afresh.
  """
  path = os.path.join(cell_dir, ATTEMPTS_FILE)
  if not os.path.exists(path):
    return []
  fix = (f"restore it, or delete it to start the cell's record of attempts "
         f"afresh (the cell's run in {cell_dir} is kept)")
  attempts = _read_json(path, fix)
  if not isinstance(attempts, list) or not all(
      isinstance(a, dict) and _is_int_or_none(a.get("exit_code"))
      for a in attempts):
    raise _damaged(path, "not a list of attempts with integer exit codes",
                   fix)
  return attempts


def _is_int_or_none(value) -> bool:
  return value is None or (isinstance(value, int)
                           and not isinstance(value, bool))


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_cell_results(cell_dir: str) -> dict | None:
  """The cell's results.json (None if absent), with the fields the runner
  reads checked (`check_results`).

  Raises:
    UserError: the file is unreadable, not a JSON object, or has fields of
      the wrong type.
  """
  path = os.path.join(cell_dir, rundir.RESULTS_FILE)
  try:
    results = rundir.read_results(cell_dir)
  except UserError as e:
    raise UserError(f"{e}; in a sweep, deleting the cell's directory "
                    f"retrains the cell") from None
  except (OSError, ValueError) as e:
    raise _damaged(path, _first_line(e), _results_fix(cell_dir)) from None
  if results is not None:
    check_results(cell_dir, results)
  return results


def _results_fix(cell_dir: str) -> str:
  return (f"restore it, or delete the cell's directory {cell_dir} to train "
          f"the cell afresh")


def check_results(cell_dir: str, results) -> None:
  """Raises UserError unless `results` (the cell's results.json) is an
  object whose status, steps, total_steps, final and diverged_at_step, where
  present, have the types the loop writes."""
  path = os.path.join(cell_dir, rundir.RESULTS_FILE)
  if not isinstance(results, dict):
    raise _damaged(path, "not a JSON object", _results_fix(cell_dir))
  wrong = [key for key, ok in (
      ("status", lambda v: isinstance(v, str)),
      ("steps", _is_number), ("total_steps", _is_number),
      ("diverged_at_step", _is_number),
      ("final", lambda v: isinstance(v, dict))) if key in results
           and not ok(results[key])]
  if wrong:
    raise _damaged(path, f"its {wrong[0]} is {results[wrong[0]]!r}",
                   _results_fix(cell_dir))


def _state(results: dict | None, attempts: list[dict], locked: bool) -> str:
  status = (results or {}).get("status")
  if status == COMPLETED and results.get("steps", 0) >= results.get(
      "total_steps", math.inf):
    return COMPLETED
  if status == DIVERGED:
    return DIVERGED
  if locked:
    return RUNNING
  if attempts and attempts[-1].get("exit_code") not in (None, 0,
                                                        EXIT_DIVERGED):
    return FAILED
  if results is not None or attempts:
    return INTERRUPTED
  return PENDING


def cell_state(cell_dir: str, results: dict | None = None) -> str:
  """One of completed, diverged, running, failed, interrupted, pending.

  `results` is the cell's results.json if the caller has read it already.

  Raises:
    UserError: the cell's results.json or sweep_attempts.json is damaged.
  """
  if results is None:
    results = read_cell_results(cell_dir)
  else:
    check_results(cell_dir, results)
  attempts = read_attempts(cell_dir)
  state = _state(results, attempts, locked=False)
  if state in FINISHED:
    return state
  return _state(results, attempts, is_locked(cell_dir))


def collect(sweep_dir: str, grid_cells: Sequence[Cell],
            configs: dict[str, config_lib.Config] | None = None
            ) -> list[dict]:
  """One row per cell: name, state, grid values, final metrics, flags.

  A cell whose records are damaged gets the state `DAMAGED` and the
  message in its `error` column.
  """
  rows = []
  for cell in grid_cells:
    cell_dir = os.path.join(sweep_dir, cell.name)
    try:
      results = read_cell_results(cell_dir)
      attempts = read_attempts(cell_dir)
      state = cell_state(cell_dir, results)
      error = attempts[-1].get("error", "") if (
          attempts and state == FAILED) else ""
    except UserError as e:
      results, state, error = None, DAMAGED, str(e)
    row = {"cell": cell.name, "status": state, **dict(cell.overrides)}
    final = (results or {}).get("final", {})
    for key in METRIC_KEYS:
      row[key] = final.get(key, "")
    row["epoch"] = final.get("epoch", "")
    row["steps"] = (results or {}).get("steps", "")
    row["wall_seconds"] = final.get("wall_seconds", "")
    row["examples_per_second"] = (results or {}).get(
        "examples_per_second", "")
    row["num_parameters"] = (results or {}).get("num_parameters", "")
    row["diverged_at_step"] = (results or {}).get("diverged_at_step", "")
    row["error"] = error
    row["model_dir"] = cell_dir
    cfg = (configs or {}).get(cell.name)
    if cfg is not None:
      for key, value in sorted(cfg.semantic_dict().items()):
        row.setdefault(key, "" if value is None else value)
    rows.append(row)
  return rows


def write_csv(path: str, rows: Sequence[dict]) -> None:
  """Writes rows (the union of their keys, first-seen order) atomically."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _csv_value(v) for k, v in row.items()})
  rundir.atomic_write(path, buf.getvalue())


def _csv_value(value):
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value)
  return value


def read_csv(path: str) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def write_hparams_config(sweep_dir: str, grid, configs) -> None:
  """The sweep's HParams experiment: the grid's flags and their values.

  Written at the sweep's root (replacing an earlier one), so TensorBoard
  pointed at --sweep_dir shows every cell as one session of one experiment:
  the grid's flags as columns, typed, with their values as domains (each
  cell's session, in its `train` run, lists only those flags:
  `--hparams_keys`), and as metrics the final train and test loss and
  errors and every curvature, gradient and distance scalar that the cells
  measured so far (`training.summaries.metric_tags`). Imports TensorFlow:
  call it after the cells' processes have ended.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfcapacity.training import summaries  # pylint: disable=g-import-not-at-top
  for entry in os.listdir(sweep_dir):
    if entry.startswith("events.out.tfevents."):
      os.unlink(os.path.join(sweep_dir, entry))
  domains = {}
  for key, _ in grid:
    domains[key] = [summaries.session_hparams(cfg, [key])[key]
                    for cfg in configs.values()]
  measured = set()
  for name in configs:
    try:
      results = read_cell_results(os.path.join(sweep_dir, name))
    except UserError:
      continue  # A damaged cell is reported elsewhere.
    for row in (results or {}).get("measurements", []):
      measured.update(k for k in row if k not in ("epoch", "step"))
  writer = tf.summary.create_file_writer(sweep_dir)
  with writer.as_default(step=0):
    summaries.write_experiment(domains, summaries.metric_tags(measured))
  writer.close()


# --- Running -----------------------------------------------------------------


def die_with_parent(parent_pid: int) -> Callable[[], None] | None:
  """A preexec_fn: the child gets SIGKILL when the sweep process dies.

  Linux only (prctl PR_SET_PDEATHSIG); elsewhere cells outlive a killed
  sweep, and their locks keep a rerun from training them twice.
  """
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # Loaded before fork.
  except (OSError, AttributeError):
    return None

  def preexec():
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
      os._exit(1)  # pylint: disable=protected-access
  return preexec


@dataclasses.dataclass
class _Job:
  cell: Cell
  process: subprocess.Popen
  lock_fd: int
  log: io.TextIOBase
  started: float


def last_error_line(log_path: str) -> str:
  """The train CLI's one-line error, else the log's last line."""
  try:
    with open(log_path, errors="replace") as f:
      lines = [line.rstrip() for line in f if line.strip()]
  except OSError:
    return ""
  for line in reversed(lines):
    if "error:" in line:
      return line
  return lines[-1] if lines else ""


def run(sweep_dir: str, grid_cells: Sequence[Cell],
        my_cells: Sequence[Cell], configs: dict[str, config_lib.Config], *,
        parallel: int = 1, threads_per_cell: int = 0,
        progress: bool | None = None, python: str = sys.executable,
        extra_env: dict | None = None) -> dict[str, str]:
  """Runs `my_cells` (this shard's), `parallel` at a time.

  A cell that another process (another sweep, or a shard given the same
  index) is running is waited for, not skipped: once its lock is released
  the cell is read again and, unless it finished or failed there, run here.
  Each cell is read again under its lock before it starts, so a cell that
  another sweep finished meanwhile is not trained twice, and a cell that
  failed in another sweep since this one started is not retried here.

  Args:
    sweep_dir: where base.flags lives and each cell gets its directory.
    grid_cells: every cell of the grid (the CSV covers them all).
    my_cells: the cells this process may run.
    configs: every cell's validated Config, by name.
    parallel: training processes at once.
    threads_per_cell: TF intra-op threads per process (0: TF's default).
    progress: a progress bar over cells (None: only on a terminal).
    python: the interpreter that runs `-m tfcapacity.train`.
    extra_env: environment additions for the cells.

  Returns:
    The state of each of `my_cells` at the end, by name: a cell whose path
    is a file or whose records are damaged is not run and ends `DAMAGED`
    (`prepare_sweep_dir` refuses such cells before a sweep starts).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  base_path = os.path.join(sweep_dir, BASE_FLAGS_FILE)
  states, attempts_before = {}, {}
  for cell in my_cells:
    cell_dir = os.path.join(sweep_dir, cell.name)
    try:
      if os.path.exists(cell_dir) and not os.path.isdir(cell_dir):
        raise UserError(f"cell directory {cell_dir} is a file; move it out "
                        f"of the sweep directory")
      states[cell.name] = cell_state(cell_dir)
      # More attempts under the lock later: another sweep ran it since.
      attempts_before[cell.name] = len(read_attempts(cell_dir))
    except UserError as e:
      states[cell.name] = DAMAGED
      logging.error("cell %s not run: %s", cell.name, e)
  todo = [c for c in my_cells if states[c.name] not in (*FINISHED, DAMAGED)]
  done_before = sum(states[c.name] in FINISHED for c in my_cells)
  if done_before:
    logging.info("%d of this shard's %d cells already finished; skipping "
                 "them.", done_before, len(my_cells))
  env = dict(os.environ, **(extra_env or {}))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if threads_per_cell:
    env["TF_NUM_INTRAOP_THREADS"] = str(threads_per_cell)
    env["TF_NUM_INTEROP_THREADS"] = str(min(threads_per_cell, 2))
    env["OMP_NUM_THREADS"] = str(threads_per_cell)
  tqdm.monitor_interval = 0  # No monitor thread: we fork children.
  bar = tqdm(total=len(my_cells), initial=len(my_cells) - len(todo),
             unit="cell", desc="sweep",
             disable=None if progress is None else not progress,
             file=sys.stderr, dynamic_ncols=True)
  running: list[_Job] = []
  queue = list(todo)
  waiting: list[Cell] = []  # Locked by another process when we tried.

  def refresh_csv():
    write_csv(os.path.join(sweep_dir, CSV_FILE),
              collect(sweep_dir, grid_cells, configs))

  def settle(cell: Cell, state: str, message: str, *args):
    """The cell ended without a process of ours."""
    states[cell.name] = state
    (logging.error if state in (FAILED, DAMAGED) else logging.info)(
        message, *args)
    bar.update(1)

  def start(cell: Cell) -> bool:
    cell_dir = os.path.join(sweep_dir, cell.name)
    fd = _lock(cell_dir)
    if fd is None:
      logging.info("cell %s is running in another process; waiting for it.",
                   cell.name)
      states[cell.name] = RUNNING
      waiting.append(cell)
      return False
    # Read again under the lock: another sweep may have run it meanwhile.
    try:
      results = read_cell_results(cell_dir)
      attempts = read_attempts(cell_dir)
    except UserError as e:
      os.close(fd)
      settle(cell, DAMAGED, "cell %s not run: %s", cell.name, e)
      return False
    state = _state(results, attempts, locked=False)
    if state in FINISHED:
      os.close(fd)
      settle(cell, state, "cell %s %s in another process.", cell.name, state)
      return False
    if state == FAILED and len(attempts) > attempts_before[cell.name]:
      os.close(fd)
      settle(cell, state, "cell %s failed in another process: %s; see %s",
             cell.name, attempts[-1].get("error", ""),
             os.path.join(cell_dir, LOG_FILE))
      return False
    log = open(os.path.join(cell_dir, LOG_FILE), "a")
    log.write(f"\n=== sweep attempt {time.strftime('%Y-%m-%d %H:%M:%S')} "
              f"===\n")
    log.flush()
    cmd = [python, "-m", "tfcapacity.train", f"--flagfile={base_path}",
           *cell.args(), f"--model_dir={cell_dir}", "--noprogress_bar"]
    if cell.overrides:  # The cell's HParams session: the swept flags.
      cmd.append("--hparams_keys=" + ",".join(k for k, _ in cell.overrides))
    process = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, pass_fds=(fd,), process_group=0,  # Ctrl-C: the sweep's.
        preexec_fn=die_with_parent(os.getpid()))
    running.append(_Job(cell, process, fd, log, time.time()))
    logging.info("started cell %s", cell.name)
    return True

  def finish(job: _Job, code: int):
    cell_dir = os.path.join(sweep_dir, job.cell.name)
    job.log.close()
    attempt = {"started": job.started, "seconds": time.time() - job.started,
               "exit_code": code}
    if code not in (0, EXIT_DIVERGED):
      attempt["error"] = last_error_line(os.path.join(cell_dir, LOG_FILE))
    try:
      # Under the lock: the record read here is the latest.
      attempts = read_attempts(cell_dir)
      rundir.write_json(os.path.join(cell_dir, ATTEMPTS_FILE),
                        attempts + [attempt])
      state = _state(read_cell_results(cell_dir), attempts + [attempt],
                     locked=False)
    except UserError as e:  # Damaged while the cell ran.
      state, attempt["error"] = DAMAGED, str(e)
    os.close(job.lock_fd)
    states[job.cell.name] = state
    if state in (FAILED, DAMAGED):
      logging.error("cell %s %s (exit %d): %s; see %s", job.cell.name,
                    state, code, attempt["error"],
                    os.path.join(cell_dir, LOG_FILE))
    else:
      logging.info("cell %s %s in %.0f s", job.cell.name, state,
                   attempt["seconds"])
    bar.update(1)
    refresh_csv()

  told_waiting = False
  try:
    refresh_csv()
    while queue or running or waiting:
      while queue and len(running) < parallel:
        start(queue.pop(0))
        bar.set_postfix_str(", ".join(j.cell.name for j in running),
                            refresh=True)
      for job in list(running):
        code = job.process.poll()
        if code is not None:
          running.remove(job)
          finish(job, code)
      for cell in list(waiting):
        if not is_locked(os.path.join(sweep_dir, cell.name)):
          waiting.remove(cell)
          queue.append(cell)
      if waiting and not queue and not running and not told_waiting:
        logging.info("waiting for %d cells that another process is "
                     "running: %s", len(waiting),
                     ", ".join(c.name for c in waiting))
        told_waiting = True
      time.sleep(0.2)
  finally:
    for job in running:  # Interrupted: stop the cells, keep checkpoints.
      job.process.kill()
      job.process.wait()
      job.log.close()
      os.close(job.lock_fd)
    bar.close()
  refresh_csv()
  return states
