"""The run directory, read and written in one place.

Layout of a model_dir:
  flags.txt        a flagfile that reproduces the run
  results.json     status, flags, loss, history (evaluations), measurements
                   (callback scalars), final metrics (written atomically)
  checkpoints/     tf.train.CheckpointManager checkpoints (ckpt-STEP)
  train/, eval/    TensorBoard event files
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
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from tfcapacity import config as config_lib
from tfcapacity import data as data_lib
from tfcapacity import objective
from tfcapacity.errors import UserError, choices_error

FLAGS_FILE = "flags.txt"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
_RUN_ENTRIES = (FLAGS_FILE, RESULTS_FILE, CHECKPOINT_DIR, "train", "eval",
                "eval_recomputed_bn", KERAS_FILE, SAVED_MODEL_DIR,
                "ntk_init.npz")
_CHECKPOINT_RE = re.compile(r"^ckpt-(\d+)\.index$")

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
  """The Config of the run in `model_dir`, from its flags.txt."""
  path = os.path.join(model_dir, FLAGS_FILE)
  if not os.path.exists(path):
    raise UserError(f"{model_dir} has no {FLAGS_FILE}: is it a tfcapacity "
                    f"run directory?")
  with open(path) as f:
    return config_lib.parse_flagfile(f.read())


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


def resolve_checkpoint(model_dir: str, checkpoint: str | None
                       ) -> tuple[str, int | None]:
  """The file to load for `--checkpoint` and its step.

  Returns:
    (checkpoint prefix, step) for 'latest' (None) or a step number, and
    (path of model.keras, None) for 'final'.

  Raises:
    UserError: no such checkpoint (the message lists the steps there are).
  """
  check_checkpoint_name("--checkpoint", checkpoint)
  if checkpoint == "final":
    path = os.path.join(model_dir, KERAS_FILE)
    if not os.path.isfile(path):
      raise UserError(f"{model_dir} has no {KERAS_FILE} (the run has not "
                      f"finished, or ran with --noexport); use "
                      f"--checkpoint=latest")
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
      raise UserError(f"--checkpoint={checkpoint}: {directory} has no "
                      f"checkpoint of step {step}; available steps: {shown} "
                      f"(or latest)")
  return os.path.join(directory, f"ckpt-{step}"), step


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
        no dataset for a saved or Keras model, a bad split or loss.
    """
    given = [s for s in SOURCES if getattr(self, s)]
    if not given:
      raise UserError("name a model: --model_dir=RUN_DIR, --saved_model=DIR "
                      "or --keras_model=FILE")
    if len(given) > 1:
      raise UserError(f"--{given[0]} and --{given[1]} both name a model; "
                      f"give only one")
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
        raise UserError(f"--model_dir={self.model_dir} is not a directory; "
                        f"name a tfcapacity run directory")
      load_config(self.model_dir)  # Raises if flags.txt is missing.
      if not self.at_init:
        resolve_checkpoint(self.model_dir, self.checkpoint)
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
                   at_init: bool = False, strategy=None):
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
    raise UserError(f"{model_dir} is not a directory; name a tfcapacity run "
                    f"directory")
  run_cfg = load_config(model_dir)
  path, step = ((None, 0) if at_init
                else resolve_checkpoint(model_dir, checkpoint))
  model = _run_model(model_dir, run_cfg, path, checkpoint,
                     strategy or tf.distribute.get_strategy(), None)
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


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _run_model(model_dir, run_cfg, path, checkpoint, strategy, run_info):
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
      try:
        status = tf.train.Checkpoint(model=model).restore(path)
        status.expect_partial()
        status.assert_existing_objects_matched()
      except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise UserError(
            f"checkpoint {path} does not match the model that "
            f"{model_dir}/{FLAGS_FILE} describes ({_first_line(e)}); was "
            f"{FLAGS_FILE} edited?") from None
  return model


def _load_run(request: Request, strategy) -> Loaded:
  model_dir = request.model_dir
  run_cfg = load_config(model_dir)
  path, step = ((None, 0) if request.at_init
                else resolve_checkpoint(model_dir, request.checkpoint))
  data_cfg = _data_config(request, run_cfg, None)
  x, y, info = _examples(request, data_cfg)

  run_info = (info if request.split == "train" and not request.dataset
              else None)
  model = _run_model(model_dir, run_cfg, path, request.checkpoint, strategy,
                     run_info)
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
  import keras
  # Importing the models registers tfcapacity's layers with Keras.
  from tfcapacity import models  # noqa: F401
  try:
    return keras.saving.load_model(path, compile=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{flag}: cannot load {path} as a Keras model "
                    f"({_first_line(e)})") from None


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
                      f"({_first_line(e)})") from None
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
