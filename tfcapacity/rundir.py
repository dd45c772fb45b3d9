"""The run directory, read and written in one place.

Layout of a model_dir:
  flags.txt        a flagfile that reproduces the run
  results.json     status, flags, loss, history (evaluations), measurements
                   (callback scalars), final metrics (written atomically;
                   NaN and inf as null, named in the row's `non_finite`)
  checkpoints/     tf.train.CheckpointManager checkpoints (ckpt-STEP)
  train/, test/    TensorBoard event files (training.summaries)
  model.keras      the final Keras model
  saved_model/     `model.export(..., format="tf_saved_model")`, `serve`

Training writes it (`prepare`, `write_json`, `export_model`); the analysis
tools (`tfcapacity.hessian`, `sharpness`, `confusion`, `interpolate`) and the
studies read it. What a measurement after training needs is a model and
fixed examples, described by a `Request` and loaded by `load`:

1. A model, from one of three sources:
   * `model_dir=RUN [checkpoint=latest|STEP|final]`: the model is rebuilt
     from the run's flags.txt exactly as training built it (same seed, input
     shape and classes from the run's dataset) and the checkpoint's model
     weights are restored (only the model: optimizer and counters are left
     in the checkpoint). `final` loads the run's model.keras instead.
     `at_init` restores nothing: the model as training initialised it,
     which needs only the run's flags.txt (e.g. a run not yet started).
   * `saved_model=DIR`: a `tf_saved_model` export with a `serve` function
     (`tf.saved_model.load`); inference mode and reverse-mode HVPs only.
   * `keras_model=FILE`: a `.keras` file (`keras.saving.load_model`, with
     tfcapacity's custom layers registered).
2. Fixed examples, as numpy arrays: `num_examples` of a `split`, a random
   subset drawn with the request's `seed` (in the drawn order, so that
   batch-norm batches in `batch`/`ghost` mode mix the classes of files sorted
   by class), or the first N in storage order without `shuffle`. The default
   is 500 examples (m = 500 in papers/003), or the whole split if smaller;
   -1 or 0 takes the whole split.
3. The per-example loss (`objective.LOSSES`): the request's `loss`, else for
   a run directory the run's own `--loss` (its flags.txt), else
   cross-entropy (the training default).

Which data, exactly. A run directory's own dataset is rebuilt with all of the
run's data flags: the loss is then the one the run trained on, with its
`--random_labels`, `--label_noise`, `--train_subset` and `--standardize`, but
never its augmentation (the examples are fixed). With a `dataset` given, for
a run directory or for a saved/Keras model, the data are that dataset as
stored: the run's training-set transforms (`--random_labels`,
`--label_noise`, `--train_subset`) and its HDF5 split and preprocessing flags
(`--test_dataset`, `--holdout_fraction`, `--standardize`) are NOT applied,
because they describe the run's data, not the new one (`RUN_DATA_FLAGS`);
only a `standardize` given to the tool itself standardises an HDF5 file. So
with `dataset=hdf5:FILE`, no shuffle and `num_examples=<rows of FILE>` the
loss is the mean over exactly the file's rows, each with its own label. The
run's input-layout and generation flags (`--input_format`,
`--channel_normalize`, `--data_seed`, ...) are kept, since the model expects
their inputs.

This module loads no TensorFlow at import (the sweep runner and the study
reports import it): TensorFlow, Keras, the data sources and the models are
imported inside the functions that need them, so that `Request.validate`
checks a request, and a tool fails on bad input, before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any

import numpy as np

from tfcapacity import config as config_lib
from tfcapacity import data as data_lib
from tfcapacity import objective
from tfcapacity.errors import UserError, choices_error, first_line

FLAGS_FILE = "flags.txt"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
_RUN_ENTRIES = (FLAGS_FILE, RESULTS_FILE, CHECKPOINT_DIR, "train", "test",
                "train_recomputed_bn", "test_recomputed_bn",
                # TensorBoard runs of runs written before `train`/`test`.
                "eval", "eval_recomputed_bn", KERAS_FILE, SAVED_MODEL_DIR,
                "ntk_init.npz")
_CHECKPOINT_RE = re.compile(r"^ckpt-(\d+)\.index$")
# The one-writer lock: the process that trains (or otherwise writes) a run
# holds an exclusive flock on this file for its whole life.
LOCK_FILE = ".run.lock"
# The checkpoint manager's state file in checkpoints/.
CHECKPOINT_STATE = "checkpoint"

# Where a measured model comes from (the `Request` fields, and tool flags).
SOURCES = ("model_dir", "saved_model", "keras_model")
# Examples of a measured loss when the request names no number (papers/003's
# m = 500), or the whole split if smaller.
DEFAULT_NUM_EXAMPLES = 500
# Data flags that describe the run's own data, not a dataset given to the
# tool: an override is built with these at their defaults.
RUN_DATA_FLAGS = ("random_labels", "label_noise", "train_subset",
                  "test_dataset", "holdout_fraction", "standardize")
# Data flags a tool's user may give (None: the run's value, or the default);
# passed on to `config.make`.
DATA_FLAGS = ("standardize", "input_format", "hdf5_features", "hdf5_labels",
              "data_dir", "manual_dir", "cache_dir")
# TensorFlow, Keras and the models are imported inside the functions that use
# them (pylint: g-import-not-at-top), so that this module loads without them.


# --- Writing a run -----------------------------------------------------------


def atomic_write(path: str, text: str | bytes) -> None:
  """Writes `text` (or bytes) to `path` through a temp file and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


# JSON has no NaN or infinity. `write_json` writes a non-finite float as
# null and names what it was in a `non_finite` object of the dict that holds
# it: {key: "inf" | "-inf" | "nan"}. A number in a list is named by its key
# and index, `key[i]` (`key[i][j]` in a list of lists), in the `non_finite`
# of the dict that holds the list; a list that no dict holds (a top-level
# list) keeps bare nulls. So a row of results.json reads
#   {"step": 5, "gradients/gradient_diversity": null, ...,
#    "non_finite": {"gradients/gradient_diversity": "inf"}}
# and any JSON reader sees null, never a string where a number belongs.
# `read_json` (and `read_results`) put the floats back; files written before
# this rule hold the strings "inf", "-inf" and "nan", which `number` and
# `series` still read.
NON_FINITE_KEY = "non_finite"
_NON_FINITE_VALUES = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_INDEXED_PATH = re.compile(r"^(.*?)((?:\[\d+\])+)$")


def non_finite_reason(value: float) -> str:
  """"nan", "inf" or "-inf": how `write_json` names a non-finite float."""
  if math.isnan(value):
    return "nan"
  return "inf" if value > 0 else "-inf"


def _encode(value, path: str | None, reasons: dict):
  if isinstance(value, float) and not math.isfinite(value):
    if path is not None:
      reasons[path] = non_finite_reason(value)
    return None
  if isinstance(value, dict):
    return json_safe(value)
  if isinstance(value, (list, tuple)):
    return [_encode(v, None if path is None else f"{path}[{i}]", reasons)
            for i, v in enumerate(value)]
  return value


def json_safe(value):
  """`value` as `write_json` writes it: non-finite floats as None, named in
  each holding dict's `non_finite` (see above). Other values unchanged.

  Raises:
    ValueError: a dict holds a `non_finite` entry that is not a dict.
  """
  if not isinstance(value, dict):
    return _encode(value, None, {})
  reasons = {}
  out = {key: _encode(item, str(key), reasons)
         for key, item in value.items() if key != NON_FINITE_KEY}
  if NON_FINITE_KEY in value:  # E.g. a row read back raw and written again.
    earlier = value[NON_FINITE_KEY]
    if not isinstance(earlier, dict):
      raise ValueError(f"{NON_FINITE_KEY!r} is reserved for the reasons of "
                       f"non-finite numbers; got {earlier!r}")
    # Kept where the value is still null.
    reasons = {**{path: reason for path, reason in earlier.items()
                  if _null_at(out, path)}, **reasons}
  if reasons:
    out[NON_FINITE_KEY] = reasons
  return out


def _restore_dict(value: dict) -> dict:
  out = {key: restore_non_finite(item) for key, item in value.items()
         if key != NON_FINITE_KEY}
  reasons = value.get(NON_FINITE_KEY)
  if not isinstance(reasons, dict):
    if NON_FINITE_KEY in value:
      out[NON_FINITE_KEY] = reasons
    return out
  left = {}
  for path, reason in reasons.items():
    if not (reason in _NON_FINITE_VALUES and _put(out, path, reason)):
      left[path] = reason
  if left:
    out[NON_FINITE_KEY] = left
  return out


def _locate(obj: dict, path: str) -> tuple | None:
  """(container, key or index) of `path` (`key` or `key[i]...`) in `obj`,
  or None if there is no such place."""
  if path in obj:
    return obj, path
  match = _INDEXED_PATH.match(path)
  if not match or match.group(1) not in obj:
    return None
  container, last = obj, match.group(1)
  for index in (int(i) for i in re.findall(r"\d+", match.group(2))):
    container = container[last]
    if not isinstance(container, list) or index >= len(container):
      return None
    last = index
  return container, last


def _null_at(obj: dict, path: str) -> bool:
  place = _locate(obj, path)
  return place is not None and place[0][place[1]] is None


def _put(obj: dict, path: str, reason: str) -> bool:
  """Sets the null at `path` to the float `reason` names; False if there is
  no null there."""
  if not _null_at(obj, path):
    return False
  container, last = _locate(obj, path)
  container[last] = _NON_FINITE_VALUES[reason]
  return True


def restore_non_finite(value):
  """The inverse of `json_safe`: each null named in a `non_finite` object
  becomes its float again and the object is dropped (entries it cannot
  place are kept)."""
  if isinstance(value, dict):
    return _restore_dict(value)
  if isinstance(value, list):
    return [restore_non_finite(v) for v in value]
  return value


def write_json(path: str, obj) -> None:
  """Writes `obj` as JSON, atomically; non-finite floats as null with their
  reasons (`json_safe`)."""
  atomic_write(path, json.dumps(json_safe(obj), indent=1, sort_keys=False,
                                allow_nan=False) + "\n")


def read_json(path: str):
  """A JSON file as `write_json` wrote it, non-finite floats restored.

  Raises:
    OSError, ValueError: as `open` and `json.load`.
  """
  with open(path, "rb") as f:
    return restore_non_finite(json.loads(f.read().decode()))


def read_results(model_dir: str) -> dict | None:
  """The run's results.json, or None if it has none; non-finite numbers
  are floats again (`read_json`).

  Raises:
    UserError: the file is not a JSON object (damaged: never trusted).
  """
  path = os.path.join(model_dir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  try:
    results = read_json(path)
  except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError.
    raise UserError(f"{path} is damaged ({first_line(e)}); restore it, or "
                    f"retrain the run into a fresh --model_dir") from None
  if not isinstance(results, dict):
    raise UserError(f"{path} is damaged (not a JSON object); restore it, or "
                    f"retrain the run into a fresh --model_dir")
  return results


# results.json holds evaluations in `history` (one row per evaluation:
# losses, errors, learning rate, wall time) and every callback's scalars in
# `measurements` (one row per step at which any callback ran, evaluation
# steps included). Files written before that rule kept a callback's scalars
# at an evaluation step in the evaluation's `history` row; `series` reads
# both lists, so they read alike.


def number(value) -> float:
  """A value of a results file as a float: a number as it is; the strings
  "inf", "-inf" and "nan" of files written before `write_json` wrote null;
  NaN for null or anything else that is not a number."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def row_number(row: dict, key: str) -> float:
  """`row[key]` as a float: `number`, except that a null that the row's
  `non_finite` names (raw JSON, not read through `read_json`) is the float
  it names."""
  value = row[key]
  if value is None:
    reason = (row.get(NON_FINITE_KEY) or {}).get(key)
    return _NON_FINITE_VALUES.get(reason, math.nan)
  return number(value)


def _rows(results: dict) -> list[dict]:
  return [*results.get("history", []), *results.get("measurements", [])]


def series(results: dict, key: str) -> list[tuple[int, int, float]]:
  """The (step, epoch, value) points of scalar `key` in step order.

  `key` is an evaluation metric (`train_loss`, ...) or a callback scalar
  (`curvature/lambda_max`, ...); read from `history` and `measurements` of
  the contents of a results.json, of either layout. A null reads as the
  float its row's `non_finite` names, else NaN; the strings "inf", "-inf"
  and "nan" of older files read as those floats; any other value that is
  not a number reads as NaN.
  """
  points = {}
  for row in _rows(results):
    if key in row:
      step = int(row["step"])
      points[step] = (step, int(row["epoch"]), row_number(row, key))
  return [points[step] for step in sorted(points)]


def keys_with_prefix(results: dict, prefix: str) -> list[str]:
  """The sorted scalar keys of `results` that start with `prefix`."""
  return sorted({key for row in _rows(results) for key in row
                 if key.startswith(prefix) and key != NON_FINITE_KEY})


def _differences(old: dict, new: dict) -> list[str]:
  diffs = []
  for key in sorted(set(old) | set(new)):
    if old.get(key) != new.get(key):
      diffs.append(f"--{key}={new.get(key)} (run has {old.get(key)})")
  return diffs


def run_entries(model_dir: str) -> list[str]:
  """The entries of a run that `model_dir` holds: `_RUN_ENTRIES`, the
  run-level event file (the model graph and hyperparameters) and the
  checkpoints that `--resume_from` moved aside."""
  if not os.path.isdir(model_dir):
    return []
  return sorted(
      entry for entry in os.listdir(model_dir)
      if entry in _RUN_ENTRIES or entry.startswith(
          ("events.out.tfevents.", CHECKPOINT_DIR + ".after-")))


def check_resumable(model_dir: str, cfg) -> bool:
  """Whether `model_dir` holds a run of `cfg` (True) or nothing (False).

  Reads only. With `cfg.overwrite`, a run of other flags, or a damaged one,
  gives False: the caller moves it aside (`start`) once the lock is held.

  Raises:
    UserError: `model_dir` is a file or lies under one; it holds a run of
      other flags; or it holds a damaged run (checkpoints or results but no
      readable flags.txt) and `cfg.overwrite` is off.
  """
  _check_directory_path(model_dir, "--model_dir")
  flags_path = os.path.join(model_dir, FLAGS_FILE)
  entries = [e for e in run_entries(model_dir) if e != FLAGS_FILE]
  if not os.path.exists(flags_path):
    if entries and not cfg.overwrite:
      raise UserError(
          f"--model_dir={model_dir} holds a run ({', '.join(entries[:3])}) "
          f"but no {FLAGS_FILE}; restore {FLAGS_FILE} (the run's flagfile) "
          f"to resume it, or pass --overwrite to move it aside and start "
          f"afresh")
    return False
  try:
    old = load_config(model_dir).semantic_dict()
  except UserError:
    if cfg.overwrite:
      return False
    raise
  diffs = _differences(old, cfg.semantic_dict())
  if not diffs:
    return True
  if cfg.overwrite:
    return False
  shown = "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "")
  raise UserError(
      f"--model_dir={model_dir} holds a run with different flags: {shown}; "
      f"use another --model_dir, or --overwrite to start afresh")


def _check_directory_path(path: str, flag: str) -> None:
  """Raises UserError if `path` is a file or lies under one."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={path} is a file; choose a directory")
  parent = os.path.dirname(os.path.abspath(path))
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    raise UserError(f"{flag}={path} lies under the file {parent}; choose a "
                    f"directory path")


def state_key(model_dir: str) -> tuple:
  """What changes when a writer changes a run: its checkpoint steps and the
  modification times of flags.txt, results.json and the checkpoint state."""
  def mtime(*parts):
    try:
      return os.stat(os.path.join(model_dir, *parts)).st_mtime_ns
    except OSError:
      return None
  return (tuple(checkpoint_steps(model_dir)), mtime(FLAGS_FILE),
          mtime(RESULTS_FILE), mtime(CHECKPOINT_DIR, CHECKPOINT_STATE))


class RunLock:
  """An exclusive flock on `<model_dir>/.run.lock`, held until `release`
  (or the process's end: the kernel drops a dead process's locks)."""

  def __init__(self, fd: int, path: str):
    self.fd, self.path = fd, path

  def release(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None

  def __del__(self):
    self.release()


def lock(model_dir: str, flag: str = "--model_dir") -> RunLock:
  """Creates `model_dir` if needed and takes its one-writer lock.

  The lock file holds the holder's pid and host, for the message that a
  second writer gets.

  Raises:
    UserError: the directory cannot be created or written, or another
      process holds the lock (the message names its pid and host).
  """
  _check_directory_path(model_dir, flag)
  path = os.path.join(model_dir, LOCK_FILE)
  try:
    os.makedirs(model_dir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f"{flag}={model_dir} is not writable ({e.strerror}); "
                    f"choose a directory you can write") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
    os.close(fd)
    raise UserError(
        f"{flag}={model_dir} is in use by {holder or 'another process'} "
        f"(lock {path}); wait for it to finish, or use another "
        f"{flag}") from None
  holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode() + b"\n", 0)
  except OSError as e:
    os.close(fd)
    raise UserError(f"{flag}={model_dir} is not writable ({e.strerror}); "
                    f"choose a directory you can write") from None
  return RunLock(fd, path)


def move_aside(model_dir: str) -> str | None:
  """Moves the run in `model_dir` (its `_RUN_ENTRIES`) into a new sibling
  `<model_dir>.replaced-<time>/`; returns that path (None: nothing there).

  Only renames: nothing of the old run is deleted. The lock file and files
  that are not the run's (e.g. a sweep cell's log) stay.
  """
  entries = run_entries(model_dir)
  if not entries:
    return None
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target = f"{os.path.normpath(model_dir)}.replaced-{stamp}"
  suffix = 1
  while os.path.exists(target):
    suffix += 1
    target = f"{os.path.normpath(model_dir)}.replaced-{stamp}-{suffix}"
  os.makedirs(target)
  for entry in entries:
    os.replace(os.path.join(model_dir, entry), os.path.join(target, entry))
  return target


def start(model_dir: str, cfg, resumable: bool) -> str | None:
  """Makes `model_dir` ready to train `cfg`, under the lock, after every
  check has passed; returns where an earlier run was moved (or None).

  A run that cannot resume (`--overwrite` over other flags or a damaged
  run) is moved aside, never deleted. flags.txt is written when its text
  changes (a resume with other operational flags records them).
  """
  moved = None if resumable else move_aside(model_dir)
  os.makedirs(model_dir, exist_ok=True)
  text = config_lib.to_flagfile(cfg)
  path = os.path.join(model_dir, FLAGS_FILE)
  if not os.path.exists(path) or _read_text(path) != text:
    atomic_write(path, text)
  return moved


def _read_text(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read()
  except (OSError, ValueError):
    return None


def export_model(model, model_dir: str) -> None:
  """Writes model.keras and saved_model/ (serve: inputs -> logits).

  Both are written next to their final place and renamed into it, so a
  killed export never leaves a half-written model under the final name.
  """
  keras_path = os.path.join(model_dir, KERAS_FILE)
  tmp_keras = os.path.join(model_dir, ".model.tmp.keras")
  model.save(tmp_keras)
  os.replace(tmp_keras, keras_path)
  saved = os.path.join(model_dir, SAVED_MODEL_DIR)
  tmp_saved = os.path.join(model_dir, ".saved_model.tmp")
  if os.path.exists(tmp_saved):
    shutil.rmtree(tmp_saved)
  model.export(tmp_saved, format="tf_saved_model", verbose=False)
  if os.path.exists(saved):
    shutil.rmtree(saved)
  os.replace(tmp_saved, saved)


# --- Reading a run: its model and the examples of a loss ---------------------


def load_config(model_dir: str):
  """The Config of the run in `model_dir`, from its flags.txt.

  Raises:
    UserError: no flags.txt, or one that is not a valid flagfile.
  """
  path = os.path.join(model_dir, FLAGS_FILE)
  if not os.path.exists(path):
    raise UserError(f"{model_dir} has no {FLAGS_FILE}: is it a tfcapacity "
                    f"run directory?")
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    with open(path, "rb") as f:
      text = f.read().decode()
    return config_lib.parse_flagfile(text)
  except (OSError, ValueError, flags.Error) as e:  # UserError is a ValueError.
    raise UserError(f"{path} is damaged ({first_line(e)}); restore the "
                    f"run's flagfile, or pass --overwrite to start "
                    f"afresh") from None


def is_checkpoint_name(value: str | None) -> bool:
  """Whether `value` names a checkpoint of a run: None (latest), 'latest',
  'final' (model.keras) or a step number."""
  return value in (None, "latest", "final") or str(value).isdigit()


def check_checkpoint_name(flag: str, value: str | None) -> None:
  """Raises UserError unless `is_checkpoint_name(value)`; `flag` names the
  option in the message."""
  if not is_checkpoint_name(value):
    raise UserError(f"{flag}={value}: use 'latest', 'final' or a step "
                    f"number")


def checkpoint_steps(model_dir: str) -> list[int]:
  """The steps of the checkpoints in `model_dir`/checkpoints, increasing."""
  directory = os.path.join(model_dir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  steps = []
  for name in os.listdir(directory):
    match = _CHECKPOINT_RE.match(name)
    if match:
      steps.append(int(match.group(1)))
  return sorted(steps)


def resolve_checkpoint(model_dir: str, checkpoint: str | None,
                       flag: str = "--checkpoint"
                       ) -> tuple[str, int | None]:
  """The file to load for `--checkpoint` and its step.

  `flag` names the option in messages (e.g. --from_checkpoint).

  Returns:
    (checkpoint prefix, step) for 'latest' (None) or a step number, and
    (path of model.keras, None) for 'final'.

  Raises:
    UserError: no such checkpoint (the message lists the steps there are).
  """
  check_checkpoint_name(flag, checkpoint)
  if checkpoint == "final":
    path = os.path.join(model_dir, KERAS_FILE)
    if not os.path.isfile(path):
      raise UserError(f"{model_dir} has no {KERAS_FILE} (the run has not "
                      f"finished, or ran with --noexport); use "
                      f"{flag}=latest")
    return path, None
  steps = checkpoint_steps(model_dir)
  directory = os.path.join(model_dir, CHECKPOINT_DIR)
  if not steps:
    raise UserError(f"{model_dir} holds no checkpoints in {directory}; train "
                    f"the run first, or load a model file with "
                    f"--keras_model/--saved_model")
  if checkpoint in (None, "latest"):
    step = steps[-1]
  else:
    step = int(checkpoint)
    if step not in steps:
      shown = ", ".join(str(s) for s in steps)
      raise UserError(f"{flag}={checkpoint}: {directory} has no "
                      f"checkpoint of step {step}; available steps: {shown} "
                      f"(or latest)")
  return os.path.join(directory, f"ckpt-{step}"), step


def checkpoint_damage(prefix: str) -> str | None:
  """Why the checkpoint at `prefix` cannot be read (None: it reads whole).

  Reads its index and every tensor, as a restore would: a truncated or
  garbled `.index` or `.data` file is found before anything trusts it.
  """
  import tensorflow as tf
  try:
    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except Exception as e:  # pylint: disable=broad-except
    return first_line(e)
  return None


_STATE_LINE = re.compile(
    r'^(model_checkpoint_path|all_model_checkpoint_paths|'
    r'all_model_checkpoint_timestamps|last_preserved_timestamp): '
    r'("[^"]*"|[-+0-9.eE]+)$')


def _latest_in_state(path: str) -> str | None:
  """The latest checkpoint that the manager's state file names (None: the
  file is missing or is not a checkpoint state). Parsed here: TensorFlow
  logs a parse failure and carries on as if there were no checkpoint."""
  try:
    with open(path, "rb") as f:
      lines = f.read().decode().splitlines()
  except (OSError, ValueError):
    return None
  latest = None
  for line in filter(None, (line.strip() for line in lines)):
    match = _STATE_LINE.match(line)
    if not match:
      return None
    if match.group(1) == "model_checkpoint_path":
      latest = match.group(2).strip('"')
  return latest


def _intact_steps(model_dir: str, below: int | None = None) -> list[int]:
  directory = os.path.join(model_dir, CHECKPOINT_DIR)
  return [step for step in checkpoint_steps(model_dir)
          if (below is None or step < below) and checkpoint_damage(
              os.path.join(directory, f"ckpt-{step}")) is None]


def _resume_fix(model_dir: str, below: int) -> str:
  intact = _intact_steps(model_dir, below)
  offer = (f"resume from an intact earlier checkpoint with --resume_from="
           f"{intact[-1]}" if intact else "no earlier checkpoint is intact")
  return f"{offer}, or pass --overwrite to move the run aside and start afresh"


def resume_prefix(model_dir: str, resume_from: int | None = None
                  ) -> str | None:
  """The checkpoint prefix a resumed run restores (None: none, step 0),
  from the file names and the state file alone (no TensorFlow).

  The checkpoint manager's state file names the latest checkpoint; it must
  agree with the checkpoint files. `resume_from` picks another checkpoint
  instead (the state file is then not consulted: `start_from_checkpoint`
  rewrites it).

  Raises:
    UserError: a missing or garbled state file beside checkpoint files, or
      no checkpoint of step `resume_from`.
  """
  directory = os.path.join(model_dir, CHECKPOINT_DIR)
  steps = checkpoint_steps(model_dir)
  if resume_from is not None:
    if resume_from not in steps:
      shown = ", ".join(str(s) for s in steps) or "none"
      raise UserError(f"--resume_from={resume_from}: {directory} has no "
                      f"checkpoint of that step; available steps: {shown}")
    return os.path.join(directory, f"ckpt-{resume_from}")
  if not steps:
    return None
  state_path = os.path.join(directory, CHECKPOINT_STATE)
  latest = _latest_in_state(state_path)
  match = latest and _CHECKPOINT_RE.match(os.path.basename(latest) + ".index")
  if not match or int(match.group(1)) not in steps:
    what = ("is missing" if not os.path.exists(state_path) else
            "is damaged" if not match else f"names {latest}, which is not "
            f"there")
    shown = ", ".join(str(s) for s in steps)
    raise UserError(
        f"{state_path} {what}; resume from one of the checkpoints there with "
        f"--resume_from={steps[-1]} (steps: {shown}; the one chosen is read "
        f"whole before it is used), or pass --overwrite to move the run "
        f"aside and start afresh")
  return os.path.join(directory, f"ckpt-{int(match.group(1))}")


def checkpoint_to_resume(model_dir: str, resume_from: int | None = None
                         ) -> str | None:
  """`resume_prefix`, read whole (`checkpoint_damage`).

  Raises:
    UserError: those of `resume_prefix`, and a damaged checkpoint (the
      message offers `--resume_from` where an older one is intact).
  """
  prefix = resume_prefix(model_dir, resume_from)
  if prefix is None:
    return None
  why = checkpoint_damage(prefix)
  if why:
    step = int(prefix.rsplit("-", 1)[1])
    raise UserError(f"checkpoint {prefix} is damaged ({why}); "
                    f"{_resume_fix(model_dir, below=step)}")
  return prefix


def check_run(model_dir: str, cfg) -> bool:
  """Every check of a run directory that needs no TensorFlow; returns
  whether the run resumes (`check_resumable`).

  The train CLI calls it before TensorFlow loads, so that most mistakes
  end in a second; the trainer calls it again, then reads the checkpoint.

  Raises:
    UserError: those of `check_resumable`, a damaged results.json,
      `resume_prefix`'s, and `--resume_from` without a run to resume.
  """
  resumable = check_resumable(model_dir, cfg)
  resume_from = getattr(cfg, "resume_from", None)
  if resume_from is not None and not resumable:
    raise UserError(f"--resume_from={resume_from}: {model_dir} holds no run "
                    f"of these flags to resume; drop the flag")
  if resumable:
    read_results(model_dir)
    resume_prefix(model_dir, resume_from)
  return resumable


def start_from_checkpoint(model_dir: str, step: int) -> str | None:
  """For `--resume_from=STEP`: moves the checkpoints after `step` into
  `checkpoints.after-<step>-<time>/` (kept, not deleted) and rewrites the
  state file to name ckpt-`step`; returns where they went (None: none)."""
  directory = os.path.join(model_dir, CHECKPOINT_DIR)
  later = [s for s in checkpoint_steps(model_dir) if s > step]
  target = None
  if later:
    target = (f"{directory}.after-{step}-"
              f"{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(directory):
      match = re.match(r"^ckpt-(\d+)\.", name)
      if match and int(match.group(1)) > step:
        os.replace(os.path.join(directory, name), os.path.join(target, name))
  # The manager's state file (a text proto), naming ckpt-`step` latest.
  lines = [f'model_checkpoint_path: "ckpt-{step}"'] + [
      f'all_model_checkpoint_paths: "ckpt-{s}"'
      for s in checkpoint_steps(model_dir)]
  atomic_write(os.path.join(directory, CHECKPOINT_STATE),
               "\n".join(lines) + "\n")
  return target


@dataclasses.dataclass(frozen=True)
class Request:
  """Where the model and the examples come from, and which loss.

  Exactly one of `model_dir`, `saved_model`, `keras_model` (see the module
  docstring). `data_flags` holds tfcapacity data flags (`DATA_FLAGS`) given
  explicitly; None values are ignored. `loss` is a name of
  `objective.LOSSES`, or None for the run's own (cross-entropy for a model
  file).
  """
  model_dir: str | None = None
  checkpoint: str | None = None
  saved_model: str | None = None
  keras_model: str | None = None
  dataset: str | None = None
  split: str = "train"
  num_examples: int | None = None
  shuffle: bool = True
  seed: int = 0
  data_flags: dict = dataclasses.field(default_factory=dict)
  loss: str | None = None
  # The run's model as training initialised it (its flags and seed), no
  # checkpoint: a run directory with flags.txt alone will do.
  at_init: bool = False
  # The options that named `model_dir` and `checkpoint`, for messages
  # (e.g. --from and --from_checkpoint in tfcapacity.interpolate).
  model_flag: str = "--model_dir"
  checkpoint_flag: str = "--checkpoint"
  # num_examples is an upper bound: a smaller split is taken whole.
  at_most: bool = False
  # The run's model rebuilt in this dtype with its weights copied (float64
  # resolves Gram and Hessian eigenvalues that float32 cannot); None: as
  # stored.
  dtype: str | None = None

  @property
  def source(self) -> str:
    given = [s for s in SOURCES if getattr(self, s)]
    return given[0] if given else ""

  def validate(self) -> None:
    """Checks what can be checked without loading anything.

    Raises:
      UserError: no model source or several, missing files or checkpoints,
        no dataset for a saved or Keras model, an unknown --dataset or a
        missing file of one (`data.check_name`), a bad split or loss.
    """
    given = [s for s in SOURCES if getattr(self, s)]
    if not given:
      raise UserError("name a model: --model_dir=RUN_DIR, --saved_model=DIR "
                      "or --keras_model=FILE")
    if len(given) > 1:
      raise UserError(f"--{given[0]} and --{given[1]} both name a model; "
                      f"give only one")
    if self.dataset:
      data_lib.check_name(self.dataset)
    if self.split not in data_lib.SPLITS:
      raise UserError(f"--split={self.split}: choose one of "
                      f"{', '.join(data_lib.SPLITS)}")
    if self.loss is not None and self.loss not in objective.LOSSES:
      raise choices_error("--loss", self.loss, objective.LOSSES)
    if self.num_examples is not None and self.num_examples < -1:
      raise UserError("--num_examples must be positive, or -1/0 for the "
                      "whole split")
    unknown = sorted(set(self.data_flags) - set(DATA_FLAGS))
    if unknown:
      raise UserError(f"--{unknown[0]} is not a data flag of this tool")
    if self.source != "model_dir" and self.checkpoint is not None:
      raise UserError("--checkpoint applies to --model_dir only; drop it")
    if self.at_init and self.source != "model_dir":
      raise UserError("--at_init needs --model_dir (the run's flags and "
                      "seed rebuild the initial model)")
    if self.at_init and self.checkpoint is not None:
      raise UserError("--at_init measures the initial model, not a "
                      "checkpoint; drop --checkpoint")
    if self.dtype is not None and self.source != "model_dir":
      raise UserError("--dtype needs --model_dir (the run's flags rebuild "
                      "its model in that dtype); drop it")
    if self.dtype is not None and self.dtype not in config_lib.DTYPES:
      raise choices_error("--dtype", self.dtype, config_lib.DTYPES)
    if self.model_dir:
      if not os.path.isdir(self.model_dir):
        raise UserError(f"{self.model_flag}={self.model_dir} is not a "
                        f"directory; name a tfcapacity run directory")
      load_config(self.model_dir)  # Raises if flags.txt is missing.
      if not self.at_init:
        resolve_checkpoint(self.model_dir, self.checkpoint,
                           self.checkpoint_flag)
      return
    flag = f"--{self.source}"
    path = getattr(self, self.source)
    if self.saved_model and not os.path.isfile(
        os.path.join(path, "saved_model.pb")):
      raise UserError(f"{flag}={path} is not a SavedModel directory (no "
                      f"saved_model.pb); name the run's {SAVED_MODEL_DIR}/ "
                      f"folder")
    if self.keras_model and not os.path.isfile(path):
      raise UserError(f"{flag}={path}: no such file; name a .keras file "
                      f"(e.g. a run's {KERAS_FILE})")
    if not self.dataset:
      raise UserError(f"{flag} needs --dataset (e.g. --dataset=digits or "
                      f"--dataset=hdf5:FILE): a model file carries no data "
                      f"flags")


@dataclasses.dataclass
class Loaded:
  """A model, the fixed examples of its loss, and the loss.

  Attributes:
    model: a `keras.Model`, or a SavedModel from `tf.saved_model.load`.
    x, y: the examples (numpy float32 inputs, int64 labels), in order.
    loss: the per-example loss's name (`objective.LOSSES`), resolved.
    description: where they came from (JSON-ready): source, path,
      checkpoint, step, dataset, split, num_examples, shuffle,
      selection_seed, at_init, and the loss.
    config: the run's `Config` (model_dir source), else None.
    strategy: the `tf.distribute.Strategy` the model was built under.
  """
  model: Any
  x: np.ndarray
  y: np.ndarray
  loss: str
  description: dict
  config: config_lib.Config | None
  strategy: Any

  @property
  def is_keras(self) -> bool:
    import keras
    return isinstance(self.model, keras.Model)


def load(request: Request, strategy=None) -> Loaded:
  """Loads the model and examples that `request` names.

  Args:
    request: the sources.
    strategy: build and load the model under this strategy's scope, so
      that Hessian-vector products shard over its replicas (default: the
      current strategy).

  Raises:
    UserError: everything `Request.validate` checks, and data or models
      that cannot be loaded or do not fit each other.
  """
  request.validate()
  import tensorflow as tf
  strategy = strategy or tf.distribute.get_strategy()
  if request.model_dir:
    return _load_run(request, strategy)
  return _load_file(request, strategy)


def load_run_model(model_dir: str, checkpoint: str | None = None, *,
                   at_init: bool = False, strategy=None,
                   model_flag: str = "--model_dir",
                   checkpoint_flag: str = "--checkpoint"):
  """A run directory's model alone, as `load` builds it for a model_dir.

  For tools that need a run's model without its examples (e.g. the second
  end point of an interpolation).

  Returns:
    (model, path, step): the checkpoint prefix or model.keras loaded (None
    with `at_init`), and its step (0 at init, None for 'final').

  Raises:
    UserError: no flags.txt, no such checkpoint, or one that does not match.
  """
  import tensorflow as tf
  if not os.path.isdir(model_dir):
    raise UserError(f"{model_flag}={model_dir} is not a directory; name a "
                    f"tfcapacity run directory")
  run_cfg = load_config(model_dir)
  path, step = ((None, 0) if at_init
                else resolve_checkpoint(model_dir, checkpoint,
                                        checkpoint_flag))
  model = _run_model(model_dir, run_cfg, path, checkpoint,
                     strategy or tf.distribute.get_strategy(), None,
                     checkpoint_flag)
  return model, path, step


def _data_config(request: Request, run_cfg, model_rank: int | None):
  """The Config the examples are built with (see the module docstring)."""
  given = {k: v for k, v in request.data_flags.items() if v is not None}
  if run_cfg is not None and not request.dataset:
    return run_cfg.replace(augment=False, **given)
  if run_cfg is not None:
    reset = {name: config_lib.make().values[name] for name in RUN_DATA_FLAGS}
    return run_cfg.replace(dataset=request.dataset, augment=False,
                           **{**reset, **given})
  if "input_format" not in given and model_rank is not None:
    given["input_format"] = "image" if model_rank == 3 else "flat"
  return config_lib.make(dataset=request.dataset, **given)


def _examples(request: Request, data_cfg):
  """The selected examples of the split, and the dataset's info."""
  ds = data_lib.get(data_cfg.dataset, request.split, data_cfg)
  total = ds.info.num_examples
  wanted = request.num_examples
  if wanted is None:
    n = min(DEFAULT_NUM_EXAMPLES, total)
  elif wanted in (-1, 0):
    n = total
  elif wanted > total and request.at_most:
    n = total
  elif wanted > total:
    raise UserError(
        f"--num_examples={wanted} exceeds the {total} {request.split} "
        f"examples of {ds.info.name}; use at most {total}, or -1 for all")
  else:
    n = wanted
  if request.shuffle:
    indices = data_lib.draw_indices(request.seed, total, n)
  else:
    indices = np.arange(n)
  x, y = ds.examples(indices)
  return np.asarray(x, np.float32), np.asarray(y, np.int64), ds.info


def _describe(request: Request, path, checkpoint, step, info, n,
              loss) -> dict:
  return {"source": request.source, "path": os.path.abspath(path),
          "checkpoint": checkpoint and os.path.abspath(checkpoint),
          "step": step, "dataset": info.name,
          "split": request.split, "num_examples": int(n),
          "shuffle": bool(request.shuffle),
          "selection_seed": int(request.seed),
          "at_init": bool(request.at_init), "loss": loss}


def _check_fit(x, y, input_shape, num_outputs, dataset):
  if tuple(x.shape[1:]) != tuple(input_shape):
    raise UserError(
        f"the model takes inputs of shape {tuple(input_shape)} but "
        f"{dataset} has {tuple(x.shape[1:])}; use the dataset (and "
        f"--input_format) the model was trained on")
  # A one-output model is a sign model: its labels are 0 and 1.
  if num_outputs is not None and len(y) and int(y.max()) >= max(
      num_outputs, 2):
    raise UserError(
        f"{dataset} has labels up to {int(y.max())} but the model has "
        f"{num_outputs} outputs; use the dataset the model was trained on")


def _run_model(model_dir, run_cfg, path, checkpoint, strategy, run_info,
               checkpoint_flag="--checkpoint"):
  """The run's model, built and restored under `strategy`'s scope.

  `run_info`: the run's own training split's info (it fixes the input shape
  and classes, whatever data a measurement uses), loaded when None.
  """
  import keras
  import tensorflow as tf
  from tfcapacity import models as models_lib
  if run_info is None and checkpoint != "final":
    try:
      run_info = data_lib.get(run_cfg.dataset, "train",
                              run_cfg.replace(augment=False)).info
    except UserError as e:
      raise UserError(f"the run's dataset {run_cfg.dataset} (it fixes the "
                      f"model's input shape and classes) cannot be loaded: "
                      f"{e}") from None
  with strategy.scope():
    if checkpoint == "final":
      return _load_keras_file(path, "--checkpoint=final")
    keras.utils.set_random_seed(run_cfg.seed)
    model = models_lib.from_config(run_cfg, run_info.input_shape,
                                   run_info.num_classes)
    if path is not None:
      why = checkpoint_damage(path)
      if why:
        intact = [str(s) for s in _intact_steps(model_dir)]
        raise UserError(
            f"checkpoint {path} is damaged ({why}); "
            + (f"measure an intact one with {checkpoint_flag}=STEP (steps: "
               f"{', '.join(intact)})" if intact else
               "the run has no intact checkpoint; retrain it"))
      try:
        status = tf.train.Checkpoint(model=model).restore(path)
        status.expect_partial()
        status.assert_existing_objects_matched()
      except (AssertionError, ValueError, tf.errors.OpError) as e:
        tf.get_logger().setLevel("ERROR")  # The half-restore's warnings.
        raise UserError(
            f"checkpoint {path} does not match the model that "
            f"{model_dir}/{FLAGS_FILE} describes ({first_line(e)}); was "
            f"{FLAGS_FILE} edited?") from None
  return model


def _load_run(request: Request, strategy) -> Loaded:
  model_dir = request.model_dir
  run_cfg = load_config(model_dir)
  path, step = ((None, 0) if request.at_init
                else resolve_checkpoint(model_dir, request.checkpoint,
                                        request.checkpoint_flag))
  data_cfg = _data_config(request, run_cfg, None)
  x, y, info = _examples(request, data_cfg)

  run_info = (info if request.split == "train" and not request.dataset
              else None)
  model = _run_model(model_dir, run_cfg, path, request.checkpoint, strategy,
                     run_info, request.checkpoint_flag)
  if request.dtype:
    model = _with_dtype(model, run_cfg, request.dtype, strategy)
  _check_fit(x, y, model.input_shape[1:], model.output_shape[-1], info.name)
  if step is None:
    results = read_results(model_dir) or {}
    step = results.get("steps")
  loss = request.loss or run_cfg.loss
  return Loaded(model=model, x=x, y=y, loss=loss,
                description={**_describe(request, model_dir, path, step,
                                         info, len(y), loss),
                             "dtype": str(model.trainable_variables[0].dtype)},
                config=run_cfg, strategy=strategy)


def _with_dtype(model, run_cfg, dtype: str, strategy):
  """`model`, or the run's model rebuilt in `dtype` holding its weights."""
  from tfcapacity import models as models_lib
  if str(model.trainable_variables[0].dtype) == dtype:
    return model
  with strategy.scope():
    other = models_lib.from_config(run_cfg.replace(dtype=dtype),
                                   model.input_shape[1:],
                                   model.output_shape[-1])
    other.set_weights([np.asarray(w).astype(dtype)
                       if np.issubdtype(np.asarray(w).dtype, np.floating)
                       else w for w in model.get_weights()])
  return other


def _load_keras_file(path: str, flag: str):
  import zipfile
  import keras
  if path.endswith(".keras") and not zipfile.is_zipfile(path):
    raise UserError(f"{flag}: {path} is not a .keras file (not a zip "
                    f"archive: damaged, or another format); name a file "
                    f"that model.save wrote")
  # Importing the models registers tfcapacity's layers with Keras.
  from tfcapacity import models  # noqa: F401
  try:
    return keras.saving.load_model(path, compile=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{flag}: cannot load {path} as a Keras model "
                    f"({first_line(e)})") from None


def _load_file(request: Request, strategy) -> Loaded:
  import tensorflow as tf
  if request.keras_model:
    path = request.keras_model
    with strategy.scope():
      model = _load_keras_file(path, "--keras_model")
    input_shape = tuple(model.input_shape[1:])
    num_outputs = model.output_shape[-1]
  else:
    path = request.saved_model
    try:
      with strategy.scope():
        model = tf.saved_model.load(path)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"--saved_model: cannot load {path} "
                      f"({first_line(e)})") from None
    serve = getattr(model, "serve", None)
    if serve is None or not getattr(serve, "input_signature", None):
      raise UserError(f"--saved_model={path} has no 'serve' function with an "
                      f"input signature; export it with model.export(..., "
                      f"format='tf_saved_model')")
    input_shape = tuple(serve.input_signature[0].shape[1:])
    outputs = serve.concrete_functions[0].structured_outputs
    num_outputs = (outputs.shape[-1] if hasattr(outputs, "shape") else None)
  data_cfg = _data_config(request, None, len(input_shape))
  x, y, info = _examples(request, data_cfg)
  _check_fit(x, y, input_shape, num_outputs, info.name)
  # A model file records no loss: the training default unless asked.
  loss = request.loss or config_lib.make().loss
  return Loaded(model=model, x=x, y=y, loss=loss,
                description=_describe(request, path, None, None, info,
                                      len(y), loss),
                config=None, strategy=strategy)
