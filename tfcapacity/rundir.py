"""The run directory: flags.txt, results.json, checkpoints and exports.

Layout of a model_dir:
  flags.txt        a flagfile that reproduces the run
  results.json     status, flags, loss, history (evaluations), measurements
                   (callback scalars), final metrics (written atomically)
  checkpoints/     tf.train.CheckpointManager checkpoints
  train/, eval/    TensorBoard event files
  model.keras      the final Keras model
  saved_model/     `model.export(..., format="tf_saved_model")`, `serve`
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from tfcapacity import config as config_lib
from tfcapacity.errors import UserError

FLAGS_FILE = "flags.txt"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
_RUN_ENTRIES = (FLAGS_FILE, RESULTS_FILE, CHECKPOINT_DIR, "train", "eval",
                "model.keras", "saved_model")


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


def _json_safe(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep the fact readable.
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def write_json(path: str, obj) -> None:
  atomic_write(path, json.dumps(_json_safe(obj), indent=1, sort_keys=False)
               + "\n")


def read_results(model_dir: str) -> dict | None:
  path = os.path.join(model_dir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# results.json holds evaluations in `history` (one row per evaluation:
# losses, errors, learning rate, wall time) and every callback's scalars in
# `measurements` (one row per step at which any callback ran, evaluation
# steps included). Files written before that rule kept a callback's scalars
# at an evaluation step in the evaluation's `history` row; `series` reads
# both lists, so they read alike.


def _number(value) -> float:
  try:
    return float(value)  # Also the "nan"/"inf" strings of `write_json`.
  except (TypeError, ValueError):
    return math.nan


def _rows(results: dict) -> list[dict]:
  return [*results.get("history", []), *results.get("measurements", [])]


def series(results: dict, key: str) -> list[tuple[int, int, float]]:
  """The (step, epoch, value) points of scalar `key` in step order.

  `key` is an evaluation metric (`train_loss`, ...) or a callback scalar
  (`curvature/lambda_max`, ...); read from `history` and `measurements` of
  the contents of a results.json, of either layout. A value that is not a
  number reads as NaN.
  """
  points = {}
  for row in _rows(results):
    if key in row:
      step = int(row["step"])
      points[step] = (step, int(row["epoch"]), _number(row[key]))
  return [points[step] for step in sorted(points)]


def keys_with_prefix(results: dict, prefix: str) -> list[str]:
  """The sorted scalar keys of `results` that start with `prefix`."""
  return sorted({key for row in _rows(results) for key in row
                 if key.startswith(prefix)})


def _differences(old: dict, new: dict) -> list[str]:
  diffs = []
  for key in sorted(set(old) | set(new)):
    if old.get(key) != new.get(key):
      diffs.append(f"--{key}={new.get(key)} (run has {old.get(key)})")
  return diffs


def check_compatible(model_dir: str, cfg) -> bool:
  """Whether `model_dir` holds a run of `cfg` (True) or nothing (False).

  Raises:
    UserError: the directory holds a run with different flags and
      `cfg.overwrite` is off, or it is a file.
  """
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise UserError(f"--model_dir={model_dir} is a file; choose a directory")
  flags_path = os.path.join(model_dir, FLAGS_FILE)
  if not os.path.exists(flags_path):
    return False
  with open(flags_path) as f:
    old = config_lib.parse_flagfile(f.read()).semantic_dict()
  diffs = _differences(old, cfg.semantic_dict())
  if not diffs:
    return True
  if cfg.overwrite:
    return False
  shown = "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "")
  raise UserError(
      f"--model_dir={model_dir} holds a run with different flags: {shown}; "
      f"use another --model_dir, or --overwrite to start afresh")


def prepare(model_dir: str, cfg, chief: bool = True) -> bool:
  """Makes `model_dir` ready; returns whether an earlier run may resume.

  With `--overwrite` and a run of different flags, the earlier run's files
  are removed. Call only after all input has been validated, so that bad
  input never touches an existing directory.
  """
  resumable = check_compatible(model_dir, cfg)
  if not chief:
    return resumable
  if not resumable and cfg.overwrite and os.path.isdir(model_dir):
    for entry in _RUN_ENTRIES:
      path = os.path.join(model_dir, entry)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.unlink(path)
  os.makedirs(model_dir, exist_ok=True)
  atomic_write(os.path.join(model_dir, FLAGS_FILE),
               config_lib.to_flagfile(cfg))
  return resumable


def load_config(model_dir: str):
  """The Config of the run in `model_dir`, from its flags.txt."""
  path = os.path.join(model_dir, FLAGS_FILE)
  if not os.path.exists(path):
    raise UserError(f"{model_dir} has no {FLAGS_FILE}: is it a tfcapacity "
                    f"run directory?")
  with open(path) as f:
    return config_lib.parse_flagfile(f.read())


def export_model(model, model_dir: str) -> None:
  """Writes model.keras and saved_model/ (serve: inputs -> logits).

  Both are written next to their final place and renamed into it, so a
  killed export never leaves a half-written model under the final name.
  """
  keras_path = os.path.join(model_dir, "model.keras")
  tmp_keras = os.path.join(model_dir, ".model.tmp.keras")
  model.save(tmp_keras)
  os.replace(tmp_keras, keras_path)
  saved = os.path.join(model_dir, "saved_model")
  tmp_saved = os.path.join(model_dir, ".saved_model.tmp")
  if os.path.exists(tmp_saved):
    shutil.rmtree(tmp_saved)
  model.export(tmp_saved, format="tf_saved_model", verbose=False)
  if os.path.exists(saved):
    shutil.rmtree(saved)
  os.replace(tmp_saved, saved)
