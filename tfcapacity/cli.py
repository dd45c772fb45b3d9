"""What every tfcapacity command-line main shares: one-line errors, and the
analysis tools' flags and program body.

A user's mistake ends a command with one line on stderr, `<prog>: error:
<what is wrong and how to fix it>`, and exit status 2; never a traceback.
TensorFlow's native libraries write a few lines to stderr when they load and
when devices are first listed, whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21),
so mains load TensorFlow inside `quiet_native_stderr()`.

The analysis tools (`tfcapacity.hessian`, `sharpness`, `confusion`,
`interpolate`) measure a model after training; they share the flags that
name the model, the examples and the loss (`define_analysis_flags`, read into
a `rundir.Request` by `request_from_flags`) and their whole program
(`tool_main`: parse, check before TensorFlow loads, compute, write the JSON
atomically). A flag name keeps one meaning across programs: where a shared
name means something tool-specific (`--seed`, `--batch_size`, `--per_layer`,
`--max_iterations`), the tool states its meaning there, and its help text
says how it differs from `tfcapacity.train`'s flag of that name.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
import tempfile
from typing import Callable, Iterator, NoReturn

from absl import flags
from absl import logging

from tfcapacity import config as config_lib
from tfcapacity import data as data_lib
from tfcapacity import errors
from tfcapacity.errors import UserError
from tfcapacity import objective
from tfcapacity import rundir


def fail(prog: str, message: str, status: int = 2) -> NoReturn:
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(status)


def flags_parser(prog: str, fv: flags.FlagValues = flags.FLAGS,
                 rewrite: Callable[[list[str]], list[str]] | None = None):
  """absl's parser for `app.run`, but a bad flag is one line and status 2.

  It also makes --help list tfcapacity's flags when the program is a console
  script: absl lists the flags of the module named by sys.argv[0], which for
  `tfcapacity-confusion` is the script, not the modules defining them.
  """
  def parse(argv):
    main = argv[0] if argv else sys.argv[0]
    for module, module_flags in fv.flags_by_module_dict().items():
      if module.startswith("tfcapacity.") and module != main:
        for flag in module_flags:
          fv.register_key_flag_for_module(main, flag)
    try:
      return fv(rewrite(argv) if rewrite else argv)
    except flags.Error as e:
      fail(prog, f"{e}; see --helpfull")
  return parse


def no_arguments(prog: str, argv: list[str]) -> None:
  if len(argv) > 1:
    fail(prog, f"unexpected arguments {argv[1:]}; all options are --flags")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
  """Silences file descriptor 2 (native libraries' logging) for a block.

  What was written is replayed if the block raises anything but SystemExit
  or UserError (one line by design), so a real failure keeps its context.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    except (SystemExit, UserError):
      raise
    except BaseException:
      sys.stderr.flush()
      os.dup2(saved, 2)
      captured.seek(0)
      sys.stderr.write(captured.read().decode(errors="replace"))
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


# --- The analysis tools ------------------------------------------------------


def define_analysis_flags(fv: flags.FlagValues = flags.FLAGS, *,
                          seed: str,
                          batch_size: str | None = None,
                          per_layer: str | None = None,
                          max_iterations: tuple[int, str] | None = None
                          ) -> None:
  """Defines the flags the analysis tools share (idempotent per `fv`).

  Every tool gets the model, example, loss and running flags. The four
  flags below are shared by name but mean something tool-specific; each
  tool says what, and a tool that passes None for one does not have it.

  Args:
    fv: where to define them.
    seed: what `--seed` seeds besides the example draw (e.g. "the random
      starts of the eigen-solvers").
    batch_size: what one `--batch_size` batch is (e.g. "Hessian-vector-
      product batch"), with its default; None: no --batch_size.
    per_layer: the help of `--per_layer`; None: no --per_layer.
    max_iterations: (default, help) of `--max_iterations`; None: none.
  """
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
  flags.DEFINE_enum("split", "train", list(data_lib.SPLITS), "Which split.",
                    flag_values=fv)
  flags.DEFINE_integer(
      "num_examples", None,
      f"Examples of the loss (default {rundir.DEFAULT_NUM_EXAMPLES}, or the "
      f"whole split if smaller; -1 or 0: the whole split).", flag_values=fv)
  flags.DEFINE_bool(
      "shuffle", True,
      "The examples are a random subset drawn with --seed (else the first N "
      "in storage order). Not the run's training --shuffle (epoch order).",
      flag_values=fv)
  flags.DEFINE_integer(
      "seed", 0,
      f"Seed of this tool's random draws: the example draw (with "
      f"--shuffle), {seed}. Not the run's training --seed (flags.txt), "
      f"which rebuilds its model.", flag_values=fv)
  flags.DEFINE_bool(
      "standardize", None,
      "Standardise HDF5 features with train-split statistics (default: the "
      "run's value for its own dataset, off otherwise).", flag_values=fv)
  flags.DEFINE_enum(
      "input_format", None, list(config_lib.INPUT_FORMATS),
      "Digits as 64-vectors or 8x8x1 images (default: the run's, or what the "
      "model's input shape needs).", flag_values=fv)
  for name, text in (("hdf5_features", "Features dataset in HDF5 files"),
                     ("hdf5_labels", "Labels dataset in HDF5 files"),
                     ("data_dir", "tensorflow-datasets data directory"),
                     ("manual_dir", "tensorflow-datasets manual directory"),
                     ("cache_dir", "Cache of generated data (mnist1d)")):
    flags.DEFINE_string(name, None, f"{text} (default: the run's, or the "
                        f"training default).", flag_values=fv)
  flags.DEFINE_enum(
      "dtype", None, list(config_lib.DTYPES),
      "With --model_dir: rebuild the run's model (mlp, fc_resnet) in this "
      "dtype and copy its weights; float64 resolves Gram and Hessian "
      "eigenvalues below float32 round-off. Default: the model's own.",
      flag_values=fv)
  # The loss and its parameters.
  flags.DEFINE_enum(
      "loss", None, list(objective.LOSSES),
      "The per-example loss measured: cross_entropy, or squared = 1/2 "
      "||logits - one_hot(label)||^2. Default: with --model_dir the run's "
      "own --loss (its flags.txt), else cross_entropy.", flag_values=fv)
  flags.DEFINE_enum(
      "bn_mode", "auto", list(objective.BN_MODE_CHOICES),
      "Batch-norm statistics in the loss: auto = those the run's training "
      "steps used (per batch for --normalization=batch, per ghost sub-batch "
      "for ghost; inference without a run directory or batch norm), or "
      "moving (inference), per batch, per ghost sub-batch.", flag_values=fv)
  flags.DEFINE_integer(
      "ghost_batch_size", None,
      "Sub-batch of --bn_mode=ghost (default: the run's).", flag_values=fv)
  if batch_size is not None:
    flags.DEFINE_integer(
        "batch_size", None,
        f"Examples per {batch_size}. Not the run's training --batch_size.",
        flag_values=fv)
    flags.register_validator("batch_size", lambda v: v is None or v > 0,
                             "--batch_size must be positive", flag_values=fv)
  flags.DEFINE_list(
      "layers", None,
      "Differentiate only these layers' weights (names or name prefixes); "
      "default all trainable weights.", flag_values=fv)
  flags.DEFINE_bool("include_slopes", False,
                    "Also differentiate the adaptive rectifier slopes.",
                    flag_values=fv)
  # What to compute, where the tool has it.
  if per_layer is not None:
    flags.DEFINE_bool("per_layer", False, per_layer, flag_values=fv)
  if max_iterations is not None:
    default, text = max_iterations
    flags.DEFINE_integer("max_iterations", default, text, flag_values=fv)
    flags.register_validator("max_iterations", lambda v: v > 0,
                             "--max_iterations must be positive",
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
  for name in ("ghost_batch_size", "cpu_replicas"):
    flags.register_validator(name, lambda v: v is None or v > 0,
                             f"--{name} must be positive", flag_values=fv)
  flags.register_validator(
      "checkpoint", rundir.is_checkpoint_name,
      "--checkpoint must be 'latest', 'final' or a step number",
      flag_values=fv)
  flags.mark_flag_as_required("output", flag_values=fv)


def data_flags(fv: flags.FlagValues = flags.FLAGS) -> dict:
  """The data flags (`rundir.DATA_FLAGS`) given, for a `rundir.Request`."""
  return {name: fv[name].value for name in rundir.DATA_FLAGS
          if fv[name].value is not None}


def request_from_flags(fv: flags.FlagValues = flags.FLAGS) -> rundir.Request:
  """The `rundir.Request` of the tool's flags, validated (no TensorFlow).

  Raises:
    UserError: see `rundir.Request.validate`.
  """
  request = rundir.Request(
      model_dir=fv.model_dir, checkpoint=fv.checkpoint,
      saved_model=fv.saved_model, keras_model=fv.keras_model,
      dataset=fv.dataset, split=fv.split, num_examples=fv.num_examples,
      shuffle=fv.shuffle, seed=fv.seed, data_flags=data_flags(fv),
      loss=fv.loss, at_init=fv.at_init, dtype=fv.dtype)
  request.validate()
  return request


def check_output(path: str, flag: str = "--output") -> None:
  """Raises UserError unless `path` can be written as a file.

  Checked before any computation, by creating (and removing) a temporary
  file beside it: permission bits, read-only mounts and full quotas all
  show, where `os.access` would not for root.
  """
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UserError(f"{flag}={path} is a directory; name a .json file")
  if not os.path.isdir(directory):
    what = ("is a file" if os.path.exists(directory) else "does not exist; "
            "create it first")
    raise UserError(f"{flag}={path}: directory {directory} {what}")
  try:
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".tfcapacity-probe-")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise UserError(f"{flag}={path}: cannot write in {directory} "
                    f"({e.strerror}); choose a writable directory") from None


def os_error_line(e: OSError) -> str:
  """One line for a file-system refusal met while writing (read-only,
  full disk, permissions), naming the file."""
  where = f" {e.filename}" if e.filename else ""
  return (f"cannot access{where}: {e.strerror or e}; check that the "
          f"directory is writable and has space")


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
  """Ends the program with one line and status 2 for a user's mistake.

  Catches `UserError`, a UserError that TensorFlow carried out of a
  tf.data pipeline (`errors.user_error_from`), and `OSError` (the file
  system refused: read-only, full, permissions); anything else is a bug and
  keeps its traceback.
  """
  try:
    yield
  except UserError as e:
    fail(prog, str(e))
  except OSError as e:
    logging.debug("OSError", exc_info=True)
    fail(prog, os_error_line(e))
  except Exception as e:  # pylint: disable=broad-except
    found = errors.user_error_from(e)
    if found is None:
      raise
    fail(prog, str(found))


def run_tool(prog: str, fv: flags.FlagValues, compute, summary, *,
             check=None) -> None:
  """The body of the analysis mains.

  Checks what needs no TensorFlow first (`check`, default
  `request_from_flags`, and the output path), builds the strategy with
  TensorFlow's load-time lines hidden, runs `compute(fv, strategy)`, and on
  the chief writes the JSON atomically and logs `summary(result)`. A
  UserError ends the program with one line and status 2.
  """
  with one_line_errors(prog):
    (check or request_from_flags)(fv)
    check_output(fv.output)
    with quiet_native_stderr():  # TF's load-time and device-probe lines.
      from tfcapacity import distribute  # pylint: disable=g-import-not-at-top
      strategy = distribute.make_strategy(fv.strategy, fv.cpu_replicas)
    quiet_tensorflow_logs()
    result = compute(fv, strategy)
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
    no_arguments(prog, argv)
    run_tool(prog, fv, compute, summary, check=check)

  app.run(program, flags_parser=flags_parser(prog, fv))


class _NoLibraryInfo(std_logging.Filter):
  """Drops INFO (and DEBUG) records logged from inside TensorFlow, Keras,
  TensorBoard or TensorFlow Datasets (they log through absl too)."""

  _LIBRARIES = tuple(f"{os.sep}{name}{os.sep}" for name in (
      "tensorflow", "keras", "tensorboard", "tensorflow_datasets"))

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        lib in record.pathname for lib in self._LIBRARIES)


def quiet_tensorflow_logs(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Hides the libraries' own INFO lines (checkpoint sharding, SavedModel
  assets and fingerprints) unless --verbosity is 1 or more; their
  warnings and errors still show."""
  verbosity = fv["verbosity"].value if "verbosity" in fv else 0
  if verbosity >= 1:
    return
  std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _NoLibraryInfo) for f in handler.filters):
    handler.addFilter(_NoLibraryInfo())
