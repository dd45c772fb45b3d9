"""What a curvature measurement after training needs: a model and examples.

The two command-line tools `python -m tfcapacity.hessian` (top eigenvalues,
trace and spectral density of the Hessian: papers/003 Sec. 2.3; Hutchinson
1990; Ghorbani, Krishnan & Xiao 2019) and `python -m tfcapacity.sharpness`
(Keskar et al. 2017, Metric 2.1) share everything up to the measurement:

1. A model, from one of three sources:
   * `--model_dir=RUN [--checkpoint=latest|STEP|final]`: the model is rebuilt
     from the run's flags.txt exactly as training built it (same seed, input
     shape and classes from the run's dataset) and the checkpoint's model
     weights are restored (only the model: optimizer and counters are left
     in the checkpoint). `final` loads the run's model.keras instead.
     `--at_init` restores nothing: the model as training initialised it,
     which needs only the run's flags.txt (e.g. a run not yet started).
   * `--saved_model=DIR`: a `tf_saved_model` export with a `serve` function
     (`tf.saved_model.load`); inference mode and reverse-mode HVPs only.
   * `--keras_model=FILE`: a `.keras` file (`keras.saving.load_model`, with
     tfcapacity's custom layers registered).
2. Fixed examples, as numpy arrays: `--num_examples` of a `--split`, a
   random subset drawn with `--seed` (in the drawn order, so that batch-norm
   batches in `batch`/`ghost` mode mix the classes of files sorted by
   class), or the first N in storage order with `--noshuffle`. The default
   is 500 examples (m = 500 in papers/003), or the whole split if smaller;
   -1 or 0 takes the whole split.

Which data, exactly. A run directory's own dataset is rebuilt with all of the
run's data flags: the Hessian is then that of the loss the run trained on,
with its `--random_labels`, `--label_noise`, `--train_subset` and
`--standardize`, but never its augmentation (the examples are fixed). With
`--dataset` given, for a run directory or for a saved/Keras model, the data
are that dataset as stored: the run's training-set transforms
(`--random_labels`, `--label_noise`, `--train_subset`) and its HDF5 split and
preprocessing flags (`--test_dataset`, `--holdout_fraction`, `--standardize`)
are NOT applied, because they describe the run's data, not the new one; only
`--standardize` given to the tool itself standardises an HDF5 file. So with
`--dataset=hdf5:FILE --noshuffle --num_examples=<rows of FILE>` the loss is
the mean over exactly the file's rows, each with its own label. The run's
input-layout and generation flags (`--input_format`, `--channel_normalize`,
`--data_seed`, ...) are kept, since the model expects their inputs.

`LossObjective` adapts a `hvp.HessianOperator` to the objective that
`sharpness.sharpness` maximises (float32 inside, float64 outside), and
`hessian_report`/`sharpness_report` are the measurements the two tools run.

TensorFlow is imported inside the functions that need it, so that the tools
parse and validate their flags (and fail on a bad one) before loading it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

from absl import flags
from absl import logging
import numpy as np

from tfcapacity import cli
from tfcapacity import config as config_lib
from tfcapacity.errors import UserError
from tfcapacity import rundir

# Modules that load TensorFlow are imported inside the functions that use
# them (pylint: g-import-not-at-top), so that flags fail fast.

SOURCES = ("model_dir", "saved_model", "keras_model")
SPLITS = ("train", "test")
DEFAULT_NUM_EXAMPLES = 500
BN_MODES = ("inference", "batch", "ghost")
# Data flags that describe the run's own data, not a dataset given to the
# tool: an override is built with these at their defaults.
RUN_DATA_FLAGS = ("random_labels", "label_noise", "train_subset",
                  "test_dataset", "holdout_fraction", "standardize")
# Data flags a user may give the tool (None: the run's value, or the
# default); passed on to `config.make`.
DATA_FLAGS = ("standardize", "input_format", "hdf5_features", "hdf5_labels",
              "data_dir", "manual_dir", "cache_dir")
_CHECKPOINT_RE = re.compile(r"^ckpt-(\d+)\.index$")


# --- Flags -------------------------------------------------------------------


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the flags both curvature tools share (idempotent per `fv`)."""
  if "saved_model" in fv:
    return
  # The model.
  flags.DEFINE_string("model_dir", None,
                      "A tfcapacity run directory (flags.txt, checkpoints/).",
                      flag_values=fv)
  flags.DEFINE_string(
      "checkpoint", None,
      "With --model_dir: 'latest' (default), a step number, or 'final' "
      "(the run's model.keras).", flag_values=fv)
  flags.DEFINE_bool(
      "at_init", False,
      "With --model_dir: the run's model freshly initialised from its flags "
      "and seed, no checkpoint (flags.txt suffices).", flag_values=fv)
  flags.DEFINE_string("saved_model", None,
                      "A tf_saved_model export (serve function); needs "
                      "--dataset.", flag_values=fv)
  flags.DEFINE_string("keras_model", None,
                      "A .keras model file; needs --dataset.", flag_values=fv)
  # The examples.
  flags.DEFINE_string(
      "dataset", None,
      "digits | mnist1d | synthetic | hdf5:<path> | tfds:<name>. Required "
      "for --saved_model/--keras_model; with --model_dir it replaces the "
      "run's dataset (used as stored: none of the run's label transforms, "
      "subset or standardisation).", flag_values=fv)
  flags.DEFINE_enum("split", "train", list(SPLITS), "Which split.",
                    flag_values=fv)
  flags.DEFINE_integer(
      "num_examples", None,
      f"Examples of the loss (default {DEFAULT_NUM_EXAMPLES}, or the whole "
      f"split if smaller; -1 or 0: the whole split).", flag_values=fv)
  flags.DEFINE_bool(
      "shuffle", True,
      "A random subset drawn with --seed (else the first N in storage "
      "order).", flag_values=fv)
  flags.DEFINE_integer("seed", 0,
                       "Seed of the example draw and of the random starts.",
                       flag_values=fv)
  flags.DEFINE_bool(
      "standardize", None,
      "Standardise HDF5 features with train-split statistics (default: the "
      "run's value for its own dataset, off otherwise).", flag_values=fv)
  flags.DEFINE_enum(
      "input_format", None, ["auto", "flat", "image"],
      "Digits as 64-vectors or 8x8x1 images (default: the run's, or what the "
      "model's input shape needs).", flag_values=fv)
  for name, text in (("hdf5_features", "Features dataset in HDF5 files"),
                     ("hdf5_labels", "Labels dataset in HDF5 files"),
                     ("data_dir", "tensorflow-datasets data directory"),
                     ("manual_dir", "tensorflow-datasets manual directory"),
                     ("cache_dir", "Cache of generated data (mnist1d)")):
    flags.DEFINE_string(name, None, f"{text} (default: the run's, or the "
                        f"training default).", flag_values=fv)
  # The loss and its parameters.
  flags.DEFINE_enum(
      "bn_mode", "inference", list(BN_MODES),
      "Batch-norm statistics in the loss: moving (inference), per batch, or "
      "per ghost sub-batch.", flag_values=fv)
  flags.DEFINE_integer(
      "ghost_batch_size", None,
      "Sub-batch of --bn_mode=ghost (default: the run's).", flag_values=fv)
  flags.DEFINE_integer(
      "batch_size", None,
      "Examples per Hessian-vector-product batch (default: all, at most 500; "
      "with --bn_mode=batch/ghost the run's training batch if it divides "
      "--num_examples).", flag_values=fv)
  flags.DEFINE_list(
      "layers", None,
      "Differentiate only these layers' weights (names or name prefixes); "
      "default all trainable weights.", flag_values=fv)
  flags.DEFINE_bool("include_slopes", False,
                    "Also differentiate the adaptive rectifier slopes.",
                    flag_values=fv)
  # Running.
  flags.DEFINE_string("strategy", "auto",
                      "auto | one_device | mirrored | multi_worker_mirrored "
                      "| tpu.", flag_values=fv)
  flags.DEFINE_integer("cpu_replicas", 1,
                       "Split the CPU into N logical devices (replicas).",
                       flag_values=fv)
  flags.DEFINE_bool("progress_bar", True,
                    "A progress bar when stderr is a terminal (else log "
                    "lines).", flag_values=fv)
  flags.DEFINE_string("output", None, "The JSON file to write.",
                      flag_values=fv)

  flags.register_validator(
      "num_examples", lambda v: v is None or v >= -1,
      "--num_examples must be positive, or -1/0 for the whole split",
      flag_values=fv)
  for name in ("ghost_batch_size", "batch_size", "cpu_replicas"):
    flags.register_validator(name, lambda v: v is None or v > 0,
                             f"--{name} must be positive", flag_values=fv)
  flags.register_validator(
      "checkpoint", lambda v: v is None or v in ("latest", "final")
      or v.isdigit(),
      "--checkpoint must be 'latest', 'final' or a step number",
      flag_values=fv)


# --- The request and its checks (no TensorFlow) ------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
  """Where the model and the examples come from.

  Exactly one of `model_dir`, `saved_model`, `keras_model`. `data_flags`
  holds tfcapacity data flags (`DATA_FLAGS`) given explicitly; None values
  are ignored.
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
  # The run's model as training initialised it (its flags and seed), no
  # checkpoint: a run directory with flags.txt alone will do.
  at_init: bool = False
  # num_examples is an upper bound: a smaller split is taken whole.
  at_most: bool = False

  @property
  def source(self) -> str:
    given = [s for s in SOURCES if getattr(self, s)]
    return given[0] if given else ""

  def validate(self) -> None:
    """Checks what can be checked without loading anything.

    Raises:
      UserError: no model source or several, missing files or checkpoints,
        no dataset for a saved or Keras model, a bad split.
    """
    given = [s for s in SOURCES if getattr(self, s)]
    if not given:
      raise UserError("name a model: --model_dir=RUN_DIR, --saved_model=DIR "
                      "or --keras_model=FILE")
    if len(given) > 1:
      raise UserError(f"--{given[0]} and --{given[1]} both name a model; "
                      f"give only one")
    if self.split not in SPLITS:
      raise UserError(f"--split={self.split}: choose train or test")
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
    if self.model_dir:
      if not os.path.isdir(self.model_dir):
        raise UserError(f"--model_dir={self.model_dir} is not a directory; "
                        f"name a tfcapacity run directory")
      rundir.load_config(self.model_dir)  # Raises if flags.txt is missing.
      if not self.at_init:
        resolve_checkpoint(self.model_dir, self.checkpoint)
      return
    flag = f"--{self.source}"
    path = getattr(self, self.source)
    if self.saved_model and not os.path.isfile(
        os.path.join(path, "saved_model.pb")):
      raise UserError(f"{flag}={path} is not a SavedModel directory (no "
                      f"saved_model.pb); name the run's saved_model/ folder")
    if self.keras_model and not os.path.isfile(path):
      raise UserError(f"{flag}={path}: no such file; name a .keras file "
                      f"(e.g. a run's model.keras)")
    if not self.dataset:
      raise UserError(f"{flag} needs --dataset (e.g. --dataset=digits or "
                      f"--dataset=hdf5:FILE): a model file carries no data "
                      f"flags")


def request_from_flags(fv: flags.FlagValues = flags.FLAGS) -> Request:
  """The `Request` of the tool's flags, validated (see `Request.validate`)."""
  request = Request(
      model_dir=fv.model_dir, checkpoint=fv.checkpoint,
      saved_model=fv.saved_model, keras_model=fv.keras_model,
      dataset=fv.dataset, split=fv.split, num_examples=fv.num_examples,
      shuffle=fv.shuffle, seed=fv.seed,
      data_flags={name: fv[name].value for name in DATA_FLAGS
                  if fv[name].value is not None},
      at_init=fv.at_init)
  request.validate()
  return request


def check_output(path: str) -> None:
  """Raises UserError unless `path` can be written as a file."""
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UserError(f"--output={path} is a directory; name a .json file")
  if not os.path.isdir(directory):
    raise UserError(f"--output={path}: directory {directory} does not exist; "
                    f"create it first")


def run_tool(prog: str, fv: flags.FlagValues, compute, summary, *,
             check=None) -> None:
  """The body of the analysis mains (hessian, sharpness, confusion).

  Checks what needs no TensorFlow first (`check`, default
  `request_from_flags`, and the output path), builds the strategy with
  TensorFlow's load-time lines hidden, runs `compute(fv, strategy)`, and on
  the chief writes the JSON atomically and logs `summary(result)`. A
  UserError ends the program with one line and status 2.
  """
  try:
    (check or request_from_flags)(fv)
    check_output(fv.output)
    with cli.quiet_native_stderr():  # TF's load-time and device-probe lines.
      from tfcapacity import distribute  # pylint: disable=g-import-not-at-top
      strategy = distribute.make_strategy(fv.strategy, fv.cpu_replicas)
    result = compute(fv, strategy)
  except UserError as e:
    cli.fail(prog, str(e))
  if not distribute.is_chief(strategy):
    return  # Under multi-worker training every worker computes; one writes.
  rundir.write_json(fv.output, result)
  logging.info("%s; wrote %s", summary(result), fv.output)


def tool_main(prog: str, define_flags, compute, summary, *, check=None,
              fv: flags.FlagValues = flags.FLAGS) -> None:
  """The whole program of an analysis tool (its console-script entry).

  Defines the tool's flags with `define_flags(fv)`, parses them (bad flags:
  one line, status 2), refuses positional arguments and runs `run_tool`.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags(fv)

  def program(argv):
    cli.no_arguments(prog, argv)
    run_tool(prog, fv, compute, summary, check=check)

  app.run(program, flags_parser=cli.flags_parser(prog, fv))


def checkpoint_steps(model_dir: str) -> list[int]:
  """The steps of the checkpoints in `model_dir`/checkpoints, increasing."""
  directory = os.path.join(model_dir, rundir.CHECKPOINT_DIR)
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
  if checkpoint not in (None, "latest", "final") and not (
      str(checkpoint).isdigit()):
    raise UserError(f"--checkpoint={checkpoint}: use 'latest', 'final' or a "
                    f"step number")
  if checkpoint == "final":
    path = os.path.join(model_dir, "model.keras")
    if not os.path.isfile(path):
      raise UserError(f"{model_dir} has no model.keras (the run has not "
                      f"finished, or ran with --noexport); use "
                      f"--checkpoint=latest")
    return path, None
  steps = checkpoint_steps(model_dir)
  directory = os.path.join(model_dir, rundir.CHECKPOINT_DIR)
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


# --- Loading -----------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
  """A model and the fixed examples of its loss.

  Attributes:
    model: a `keras.Model`, or a SavedModel from `tf.saved_model.load`.
    x, y: the examples (numpy float32 inputs, int64 labels), in order.
    description: where they came from (JSON-ready): source, path,
      checkpoint, step, dataset, split, num_examples, shuffle,
      selection_seed.
    config: the run's `Config` (model_dir source), else None.
    strategy: the `tf.distribute.Strategy` the model was built under.
  """
  model: Any
  x: np.ndarray
  y: np.ndarray
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
  """The selected examples of the split, and the dataset's name."""
  from tfcapacity import data as data_lib
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
    indices = np.random.default_rng(request.seed).permutation(total)[:n]
  else:
    indices = np.arange(n)
  x, y = ds.examples(indices)
  return np.asarray(x, np.float32), np.asarray(y, np.int64), ds.info


def _describe(request: Request, path, checkpoint, step, info, n) -> dict:
  return {"source": request.source, "path": os.path.abspath(path),
          "checkpoint": checkpoint and os.path.abspath(checkpoint),
          "step": step, "dataset": info.name,
          "split": request.split, "num_examples": int(n),
          "shuffle": bool(request.shuffle),
          "selection_seed": int(request.seed),
          "at_init": bool(request.at_init)}


def _check_fit(x, y, input_shape, num_outputs, dataset):
  if tuple(x.shape[1:]) != tuple(input_shape):
    raise UserError(
        f"the model takes inputs of shape {tuple(input_shape)} but "
        f"{dataset} has {tuple(x.shape[1:])}; use the dataset (and "
        f"--input_format) the model was trained on")
  if num_outputs is not None and len(y) and int(y.max()) >= num_outputs:
    raise UserError(
        f"{dataset} has labels up to {int(y.max())} but the model has "
        f"{num_outputs} outputs; use the dataset the model was trained on")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def load_run_model(model_dir: str, checkpoint: str | None = None, *,
                   at_init: bool = False, strategy=None):
  """A run directory's model alone, as `load` builds it for --model_dir.

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
  run_cfg = rundir.load_config(model_dir)
  path, step = ((None, 0) if at_init
                else resolve_checkpoint(model_dir, checkpoint))
  model = _run_model(model_dir, run_cfg, path, checkpoint,
                     strategy or tf.distribute.get_strategy(), None)
  return model, path, step


def _run_model(model_dir, run_cfg, path, checkpoint, strategy, run_info):
  """The run's model, built and restored under `strategy`'s scope.

  `run_info`: the run's own training split's info (it fixes the input shape
  and classes, whatever data a measurement uses), loaded when None.
  """
  import keras
  import tensorflow as tf
  from tfcapacity import data as data_lib
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
            f"{model_dir}/flags.txt describes ({_first_line(e)}); was "
            f"flags.txt edited?") from None
  return model


def _load_run(request: Request, strategy) -> Loaded:
  model_dir = request.model_dir
  run_cfg = rundir.load_config(model_dir)
  path, step = ((None, 0) if request.at_init
                else resolve_checkpoint(model_dir, request.checkpoint))
  data_cfg = _data_config(request, run_cfg, None)
  x, y, info = _examples(request, data_cfg)

  run_info = (info if request.split == "train" and not request.dataset
              else None)
  model = _run_model(model_dir, run_cfg, path, request.checkpoint, strategy,
                     run_info)
  _check_fit(x, y, model.input_shape[1:], model.output_shape[-1], info.name)
  if step is None:
    results = rundir.read_results(model_dir) or {}
    step = results.get("steps")
  return Loaded(model=model, x=x, y=y,
                description=_describe(request, model_dir, path, step, info,
                                      len(y)),
                config=run_cfg, strategy=strategy)


def _load_keras_file(path: str, flag: str):
  import keras
  from tfcapacity import models  # noqa: F401  (registers our layers)
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
  return Loaded(model=model, x=x, y=y,
                description=_describe(request, path, None, None, info,
                                      len(y)),
                config=None, strategy=strategy)


# --- The loss ----------------------------------------------------------------


def make_operator(loaded: Loaded, *, bn_mode: str = "inference",
                  ghost_batch_size: int | None = None,
                  batch_size: int | None = None,
                  layers: list[str] | None = None,
                  include_slopes: bool = False, method: str = "reverse"):
  """The `hvp.HessianOperator` of the mean loss over the loaded examples.

  Args:
    loaded: from `load`.
    bn_mode: inference | batch | ghost.
    ghost_batch_size: default the run's, when it trained with ghost batch
      norm (else the model's own).
    batch_size: examples per batch; default all of them, at most 500, or in
      batch/ghost mode the run's training batch when it divides them.
    layers, include_slopes: the parameter block (`hvp.select_params`).
    method: reverse | forward.

  Raises:
    UserError: a block of a SavedModel, and the operator's own errors.
  """
  from tfcapacity.curvature import hvp
  n = len(loaded.y)
  cfg = loaded.config
  if batch_size is None:
    batch_size = min(n, DEFAULT_NUM_EXAMPLES)
    if bn_mode != "inference" and cfg is not None and not cfg.full_batch:
      run_batch = int(cfg.batch_size)
      if run_batch <= n and n % run_batch == 0:
        batch_size = run_batch
  if ghost_batch_size is None and cfg is not None and (
      cfg.normalization == "ghost"):
    ghost_batch_size = cfg.ghost_batch_size
  params = None
  if layers or include_slopes:
    if not loaded.is_keras:
      raise UserError("--layers/--include_slopes need a Keras model "
                      "(--model_dir or --keras_model); a SavedModel's "
                      "variables have no layers")
    params = hvp.select_params(loaded.model, layers or None,
                               include_slopes=include_slopes)
  return hvp.HessianOperator(
      loaded.model, loaded.x, loaded.y, bn_mode=bn_mode,
      batch_size=batch_size, params=params, method=method,
      strategy=loaded.strategy, ghost_batch_size=ghost_batch_size)


class LossObjective:
  """The mean loss of a `HessianOperator`'s examples as a sharpness objective.

  `sharpness.sharpness` works in float64 numpy; the operator in its own
  dtype (float32). Every evaluation is at explicit parameters, so a Keras
  model is never changed, and a SavedModel's variables are restored after
  each call (`HessianOperator.loss_and_gradient`).
  """

  def __init__(self, op):
    self.op = op
    self.size = int(op.size)
    self._x = np.asarray(op.parameters(), np.float64)

  def initial(self) -> np.ndarray:
    return self._x.copy()

  def loss_and_gradient(self, params: np.ndarray
                        ) -> tuple[float, np.ndarray]:
    flat = np.asarray(params, self.op.dtype.as_numpy_dtype)
    loss, grad = self.op.loss_and_gradient(flat)
    return float(loss), np.asarray(grad, np.float64)


# --- Progress ----------------------------------------------------------------


class Progress:
  """`progress(iteration, info)` callbacks shown as a bar or as log lines.

  A tqdm bar on stderr when it is a terminal (and `bar` is on); otherwise an
  absl log line every `every` iterations.
  """

  def __init__(self, desc: str, total: int | None = None, *,
               bar: bool = True, every: int = 10):
    self.desc = desc
    self.every = every
    self._bar = None
    if bar and sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                       dynamic_ncols=True)

  def __call__(self, iteration: int, info: dict) -> None:
    shown = {k: f"{v:.4g}" if isinstance(v, float) else v
             for k, v in info.items() if isinstance(v, (int, float, str))}
    if self._bar is not None:
      self._bar.update(max(0, iteration - self._bar.n))
      self._bar.set_postfix(shown, refresh=False)
    elif iteration % self.every == 0:
      logging.info("%s: %d %s", self.desc, iteration,
                   " ".join(f"{k}={v}" for k, v in shown.items()))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# --- The measurements --------------------------------------------------------


def hessian_report(loaded: Loaded, *, top_k: int = 1, method: str = "power",
                   hvp_method: str = "reverse", trace: bool = False,
                   trace_probes: int = 100, density: bool = False,
                   density_runs: int = 4, density_steps: int = 30,
                   density_figure: str | None = None,
                   bn_mode: str = "inference",
                   ghost_batch_size: int | None = None,
                   batch_size: int | None = None,
                   layers: list[str] | None = None,
                   include_slopes: bool = False, tol: float = 1e-3,
                   max_iterations: int = 100,
                   lanczos_steps: int | None = None, seed: int = 0,
                   per_layer: bool = False,
                   progress_bar: bool = True) -> dict:
  """Top eigenvalues, and optionally trace and density, of the Hessian.

  Args:
    loaded: from `load`.
    top_k: eigenvalues wanted.
    method: power (power iteration with deflation, largest magnitude) |
      lanczos (largest algebraic); see `eigen`.
    hvp_method: reverse | forward.
    trace, trace_probes: Hutchinson's estimate with that many probes.
    density, density_runs, density_steps: stochastic Lanczos quadrature.
    density_figure: write the density's PNG here.
    bn_mode, ghost_batch_size, batch_size, layers, include_slopes: see
      `make_operator`.
    tol, max_iterations: power iteration's stopping rule and budget (per
      eigenvalue); `tol` also decides `converged` for Lanczos.
    lanczos_steps: default `eigen.default_lanczos_steps`.
    seed: seeds the starts (trace and density use seed + 1 and seed + 2).
    per_layer: also lambda_max of every layer's diagonal block
      (`blocks.per_layer`), as `per_layer` rows.
    progress_bar: see `Progress`.

  Returns:
    A JSON-ready dict: eigenvalues, residuals, relative_residuals,
    iterations, converged (all pairs), converged_pairs, and trace,
    trace_stderr, density when asked, plus how it was computed and
    `loaded.description`.

  Raises:
    UserError: bad options.
  """
  from tfcapacity.curvature import eigen
  if method not in ("power", "lanczos"):
    raise UserError(f"--method={method}: choose power or lanczos")
  start = time.time()
  op = make_operator(loaded, bn_mode=bn_mode,
                     ghost_batch_size=ghost_batch_size,
                     batch_size=batch_size, layers=layers,
                     include_slopes=include_slopes, method=hvp_method)
  if not 1 <= top_k <= op.size:
    raise UserError(f"--top_k={top_k} must lie in [1, {op.size}] (the "
                    f"number of parameters)")
  described = op.describe()
  out = {**loaded.description, **described, "method": method,
         "hvp_method": described["method"], "top_k": int(top_k),
         "seed": int(seed), "layers": list(layers) if layers else None}
  if method == "power":
    with Progress("power iteration", top_k * max_iterations,
                  bar=progress_bar) as report:
      found = eigen.top_k_power(op, top_k, tol=tol,
                                max_iterations=max_iterations, seed=seed,
                                progress=report)
    out.update(tol=float(tol), max_iterations=int(max_iterations))
  else:
    steps = min(lanczos_steps or eigen.default_lanczos_steps(op.size, top_k),
                op.size)
    with Progress("lanczos", steps, bar=progress_bar) as report:
      found = eigen.lanczos_top_k(op, top_k, num_steps=steps, seed=seed,
                                  tol=tol, progress=report)
    out.update(tol=float(tol), lanczos_steps=int(steps))
  out.update(eigenvalues=found.eigenvalues, residuals=found.residuals,
             relative_residuals=found.relative_residuals,
             iterations=int(found.iterations),
             converged=bool(all(found.converged)),
             converged_pairs=[bool(c) for c in found.converged])
  matvecs = found.iterations
  if trace:
    with Progress("trace", trace_probes, bar=progress_bar) as report:
      estimate = eigen.hutchinson_trace(op, trace_probes, seed=seed + 1,
                                        progress=report)
    out.update(trace=estimate.trace, trace_stderr=estimate.stderr,
               trace_probes=int(trace_probes))
    matvecs += estimate.iterations
  if density:
    with Progress("density", density_runs * min(density_steps, op.size),
                  bar=progress_bar) as report:
      spectrum = eigen.spectral_density(op, num_runs=density_runs,
                                        num_steps=density_steps,
                                        seed=seed + 2, progress=report)
    out["density"] = {
        "grid": spectrum.grid.tolist(), "values": spectrum.values.tolist(),
        "sigma": spectrum.sigma, "runs": int(density_runs),
        "steps": int(density_steps),
        "nodes": [n.tolist() for n in spectrum.nodes],
        "weights": [w.tolist() for w in spectrum.weights]}
    matvecs += spectrum.iterations
    if density_figure:
      eigen.density_figure(spectrum, density_figure)
      out["density_figure"] = os.path.abspath(density_figure)
  if per_layer:
    if not loaded.is_keras:
      raise UserError("--per_layer needs a Keras model (--model_dir or "
                      "--keras_model); a SavedModel's variables have no "
                      "layers")
    from tfcapacity.curvature import blocks
    names = blocks.weighted_layers(loaded.model)
    with Progress("per-layer", len(names), bar=progress_bar) as report:
      rows = blocks.per_layer(
          loaded.model, lambda name: make_operator(
              loaded, bn_mode=bn_mode, ghost_batch_size=ghost_batch_size,
              batch_size=batch_size, layers=[name], method=hvp_method),
          layers=names, tol=tol, max_iterations=max_iterations, seed=seed,
          progress=report)
    matvecs += sum(row["iterations"] for row in rows)
    out["per_layer"] = rows
  out["matvecs"] = int(matvecs)
  out["seconds"] = time.time() - start
  return out


def sharpness_report(loaded: Loaded, *, epsilon: float = 1e-3,
                     optimizer: str = "lbfgsb",
                     subspace_dim: int | None = None,
                     max_iterations: int = 10, bn_mode: str = "inference",
                     ghost_batch_size: int | None = None,
                     batch_size: int | None = None,
                     layers: list[str] | None = None,
                     include_slopes: bool = False, seed: int = 0,
                     progress_bar: bool = True) -> dict:
  """Keskar et al.'s sharpness of the loss over the loaded examples.

  Args:
    loaded: from `load`.
    epsilon: the box size (Keskar et al. used 1e-3 and 5e-4).
    optimizer: lbfgsb | ascent, the inner maximisation (`sharpness`).
    subspace_dim: None for the full space, else a random subspace of p dims.
    max_iterations: the optimiser's budget (10 in the paper).
    bn_mode, ghost_batch_size, batch_size, layers, include_slopes: see
      `make_operator`.
    seed: seeds the random subspace and start.
    progress_bar: see `Progress`.

  Returns:
    A JSON-ready dict: `SharpnessResult.to_json()` (sharpness, epsilon,
    loss, max_loss, ...), `optimizer`, how the loss was computed, and
    `loaded.description`.
  """
  from tfcapacity.curvature import sharpness as sharpness_lib
  start = time.time()
  op = make_operator(loaded, bn_mode=bn_mode,
                     ghost_batch_size=ghost_batch_size,
                     batch_size=batch_size, layers=layers,
                     include_slopes=include_slopes)
  objective = LossObjective(op)
  with Progress(f"sharpness eps={epsilon:g}", None, bar=progress_bar,
                every=5) as report:
    result = sharpness_lib.sharpness(
        objective, epsilon, method=optimizer, subspace_dim=subspace_dim,
        max_iterations=max_iterations, seed=seed, progress=report)
  described = op.describe()
  described.pop("method")
  out = {**loaded.description, **described, **result.to_json(),
         "optimizer": optimizer,
         "layers": list(layers) if layers else None}
  out["seconds"] = time.time() - start
  if not math.isfinite(out["sharpness"]):
    logging.warning("the sharpness is not finite (%s): the loss overflowed "
                    "inside the box", out["sharpness"])
  return out
