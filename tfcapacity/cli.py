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
`--max_iterations`, `--figure`, `--logdir`), the tool states its meaning
there, and its help text says how it differs from `tfcapacity.train`'s flag
of that name. A tool has only the shared flags it uses, and only the values
it accepts (confusion's `--bn_mode` is `auto|inference`), so its --help
lists what it takes and its parser refuses the rest in one line.
`check_logdir` and `write_summaries` serve the tools' `--logdir`: checked
before computing, then one TensorBoard step of scalars, images (PNG bytes)
and histograms.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
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


# (id of the FlagValues, flag name) -> what a required flag is for.
_REQUIRED: dict[tuple[int, str], str] = {}


def require(name: str, purpose: str,
            fv: flags.FlagValues = flags.FLAGS) -> None:
  """Marks `--name` required; if it is missing, `flags_parser` says why.

  absl's `mark_flag_as_required` reports "flag --x must have a value other
  than None"; a missing flag here is one line that says what it names:
  `<prog>: error: --name is required: <purpose>`. An empty value counts as
  missing.

  Args:
    name: the flag, defined on `fv`.
    purpose: what the flag names, with an example value, e.g. "the run
      directory (...); e.g. --model_dir=runs/quickstart". `{tool}` is
      replaced by the program's last name part (`tfcapacity.hessian`:
      hessian).
    fv: where the flag is defined.
  """
  _REQUIRED[(id(fv), name)] = purpose
  flags.register_validator(name, lambda v: v is not None and v != "",
                           f"--{name} is required", flag_values=fv)


# The flag of one line of absl's validation error: "flag --name=value: ...".
_FLAG_OF_LINE = re.compile(r"flag --([\w-]+)=")


def parse_error_line(prog: str, error: flags.Error,
                     fv: flags.FlagValues = flags.FLAGS) -> str:
  """One line for absl's parse `error` (which may hold several lines).

  A missing required flag (`require`) is reported with its purpose; of
  several failed checks the first is shown and the other flags are named.
  A flagfile absl cannot open (one named inside another) is reported
  without absl's "ERROR::" prefix.
  """
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return f"{type(error).__name__}; see --helpfull"
  first = lines[0]
  others = [m.group(1) for m in map(_FLAG_OF_LINE.match, lines[1:]) if m]
  more = ""
  if len(others) == len(lines) - 1 and others:
    more = f" (also check {', '.join('--' + n for n in others)})"
  elif len(lines) > 1:
    more = f" (and {len(lines) - 1} more flag errors)"
  for (fv_id, name), purpose in _REQUIRED.items():
    if fv_id == id(fv) and first.endswith(f": --{name} is required"):
      tool = prog.rsplit(".", 1)[-1]
      return (f"--{name} is required: {purpose.replace('{tool}', tool)}"
              f"{more}")
  if first.startswith("ERROR:: Unable to open flagfile: "):
    return (f"cannot open a flagfile: "
            f"{first[len('ERROR:: Unable to open flagfile: '):]}; check "
            f"the path")
  return f"{first}{more}; see --helpfull"


def check_flagfiles(argv: list[str]) -> None:
  """Raises UserError for a `--flagfile` on the command line that is not a
  file, naming it and the directory a relative path was looked up in
  (absl's message gives only the OS error)."""
  args = iter(argv[1:])
  for arg in args:
    if arg == "--":
      return
    if arg in ("--flagfile", "-flagfile"):
      value = next(args, "")
    elif arg.startswith(("--flagfile=", "-flagfile=")):
      value = arg.split("=", 1)[1]
    else:
      continue
    path = os.path.expanduser(value.strip())
    if not path:
      continue
    flag = f"--flagfile={value}"
    if os.path.isdir(path):
      raise UserError(f"{flag} is a directory; name a flags file (e.g. "
                      f"flags/quickstart.flags)")
    if not os.path.isfile(path):
      where = "" if os.path.isabs(path) else f" in {os.getcwd()}"
      raise UserError(f"{flag}: no such file{where}; check the path (e.g. "
                      f"flags/quickstart.flags)")


def flags_parser(prog: str, fv: flags.FlagValues = flags.FLAGS,
                 rewrite: Callable[[list[str]], list[str]] | None = None,
                 unknown: dict[str, str] | None = None):
  """absl's parser for `app.run`, but a bad flag is one line and status 2.

  A command-line flagfile that does not exist is named, a missing required
  flag says what it is for (`require`), and of several bad flags the first
  is reported (`parse_error_line`).

  It also makes --help list tfcapacity's flags when the program is a console
  script: absl lists the flags of the module named by sys.argv[0], which for
  `tfcapacity-confusion` is the script, not the modules defining them.

  Args:
    prog: the program's name, starting the error line.
    fv: the flags.
    rewrite: applied to argv before parsing.
    unknown: {name: what to do instead} for flags the program does not
      have but a user may expect (another tool's): the error line says it.
  """
  def parse(argv):
    main = argv[0] if argv else sys.argv[0]
    for module, module_flags in fv.flags_by_module_dict().items():
      if module.startswith("tfcapacity.") and module != main:
        for flag in module_flags:
          fv.register_key_flag_for_module(main, flag)
    args = rewrite(argv) if rewrite else argv
    try:
      check_flagfiles(args)
      return fv(args)
    except UserError as e:
      fail(prog, str(e))
    except flags.UnrecognizedFlagError as e:
      hints = unknown or {}
      name = e.flagname  # --noNAME of a boolean is NAME's.
      if name not in hints and name.startswith("no"):
        name = name[2:]
      if name in hints:
        fail(prog, f"--{name} does not apply to {prog}; {hints[name]}")
      fail(prog, f"{e}; see --helpfull")
    except flags.Error as e:
      fail(prog, parse_error_line(prog, e, fv))
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


class ReasonedEnumParser(flags.EnumParser):
  """absl's enum parser, whose refusal also says why a value is missing.

  For a flag whose shared choices a tool takes only some of (confusion's
  --bn_mode): `--help` lists the accepted values, and a refused one fails
  in the parser, with one line naming the choices and `why`.
  """

  def __init__(self, enum_values, why: str | None = None):
    super().__init__(list(enum_values))
    self.why = why

  def parse(self, argument):
    try:
      return super().parse(argument)
    except ValueError as e:
      raise ValueError(f"{e} ({self.why})" if self.why else str(e)) from None


def define_enum(name: str, default: str, values, text: str,
                fv: flags.FlagValues, why: str | None = None) -> None:
  """`flags.DEFINE_enum`, with `why` added to a refusal (see above)."""
  values = list(values)
  flags.DEFINE(ReasonedEnumParser(values, why), name, default,
               f"<{'|'.join(values)}>: {text}", flag_values=fv,
               serializer=flags.ArgumentSerializer())


BN_MODE_HELP = (
    "Batch-norm statistics in the loss: auto = those the run's training "
    "steps used (per batch for --normalization=batch, per ghost sub-batch "
    "for ghost; inference without a run directory or batch norm), or "
    "moving (inference), per batch, per ghost sub-batch.")
LOSS_DEFAULT = ("with --model_dir the run's own --loss (its flags.txt), else "
                "cross_entropy")


def define_analysis_flags(fv: flags.FlagValues = flags.FLAGS, *,
                          seed: str,
                          models: bool = True,
                          num_examples: tuple[int | None, str] | None = None,
                          loss_default: str = LOSS_DEFAULT,
                          bn_modes: tuple[str, ...] | None =
                          objective.BN_MODE_CHOICES,
                          bn_mode: str = BN_MODE_HELP,
                          bn_mode_refused: str | None = None,
                          parameters: bool = True,
                          batch_size: str | None = None,
                          per_layer: str | None = None,
                          max_iterations: tuple[int, str] | None = None,
                          figure: str | None = None,
                          logdir: str | None = None) -> None:
  """Defines the flags the analysis tools share (idempotent per `fv`).

  Every tool gets the example, loss and running flags. The others exist
  only where the tool uses them, and their help says what they mean there,
  so that a tool's --help lists what it accepts and nothing else: a flag a
  tool has no use for is unknown to its parser, a value it refuses is
  refused by the parser (one line, `flags_parser`).

  Args:
    fv: where to define them.
    seed: what `--seed` seeds besides the example draw (e.g. "the random
      starts of the eigen-solvers").
    models: the flags naming one model (--model_dir, --checkpoint,
      --at_init, --saved_model, --keras_model, --split, --dtype); False
      for a tool that names its models otherwise (interpolate).
    num_examples: (default, help) of `--num_examples`; None: the curvature
      tools' (rundir.DEFAULT_NUM_EXAMPLES of one split).
    loss_default: which loss `--loss` defaults to, in words.
    bn_modes: the --bn_mode values the tool accepts, first the default;
      None: no --bn_mode (nor --ghost_batch_size, which needs ghost).
    bn_mode: the help of --bn_mode.
    bn_mode_refused: why the other `objective.BN_MODE_CHOICES` are refused,
      added to the parser's one-line refusal.
    parameters: --layers and --include_slopes (the differentiated block).
    batch_size: what one `--batch_size` batch is (e.g. "Hessian-vector-
      product batch"), with its default; None: no --batch_size.
    per_layer: the help of `--per_layer`; None: no --per_layer.
    max_iterations: (default, help) of `--max_iterations`; None: none.
    figure: the help of `--figure` (default on); None: no --figure.
    logdir: what `--logdir` logs to TensorBoard; None: no --logdir.
  """
  if "output" in fv:
    return
  # The model.
  if models:
    flags.DEFINE_string(
        "model_dir", None,
        "A tfcapacity run directory (flags.txt, checkpoints/).",
        flag_values=fv)
    flags.DEFINE_string(
        "checkpoint", None,
        "With --model_dir: 'latest' (default), a step number, or 'final' "
        "(the run's model.keras).", flag_values=fv)
    flags.DEFINE_bool(
        "at_init", False,
        "With --model_dir: the run's model freshly initialised from its "
        "flags and seed, no checkpoint (flags.txt suffices).",
        flag_values=fv)
    flags.DEFINE_string("saved_model", None,
                        "A tf_saved_model export (serve function); needs "
                        "--dataset.", flag_values=fv)
    flags.DEFINE_string("keras_model", None,
                        "A .keras model file; needs --dataset.",
                        flag_values=fv)
  # The examples.
  flags.DEFINE_string(
      "dataset", None,
      "digits | mnist1d | synthetic | hdf5:<path> | tfds:<name>. " + (
          "Required for --saved_model/--keras_model; with --model_dir it "
          "replaces the run's dataset" if models else
          "Replaces the run's dataset") +
      " (used as stored: none of the run's label transforms, subset or "
      "standardisation).", flag_values=fv)
  if models:
    flags.DEFINE_enum("split", "train", list(data_lib.SPLITS),
                      "Which split.", flag_values=fv)
  default, text = num_examples or (
      None, f"Examples of the loss (default {rundir.DEFAULT_NUM_EXAMPLES}, "
      f"or the whole split if smaller; -1 or 0: the whole split).")
  flags.DEFINE_integer("num_examples", default, text, flag_values=fv)
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
  if models:
    flags.DEFINE_enum(
        "dtype", None, list(config_lib.DTYPES),
        "With --model_dir: rebuild the run's model (mlp, fc_resnet) in this "
        "dtype and copy its weights; float64 resolves Gram and Hessian "
        "eigenvalues below float32 round-off. Default: the model's own.",
        flag_values=fv)
  # The loss and its parameters.
  flags.DEFINE_enum(
      "loss", None, list(objective.LOSSES),
      f"The per-example loss: cross_entropy, or squared = 1/2 "
      f"||logits - one_hot(label)||^2. Default: {loss_default}.",
      flag_values=fv)
  if bn_modes is not None:
    define_enum("bn_mode", bn_modes[0], bn_modes, bn_mode, fv,
                why=bn_mode_refused)
    if "ghost" in bn_modes:
      flags.DEFINE_integer(
          "ghost_batch_size", None,
          "Sub-batch of --bn_mode=ghost (default: the run's).",
          flag_values=fv)
      flags.register_validator("ghost_batch_size",
                               lambda v: v is None or v > 0,
                               "--ghost_batch_size must be positive",
                               flag_values=fv)
  if batch_size is not None:
    flags.DEFINE_integer(
        "batch_size", None,
        f"Examples per {batch_size}. Not the run's training --batch_size.",
        flag_values=fv)
    flags.register_validator("batch_size", lambda v: v is None or v > 0,
                             "--batch_size must be positive", flag_values=fv)
  if parameters:
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
  # What is written.
  flags.DEFINE_string("output", None, "The JSON file to write.",
                      flag_values=fv)
  if figure is not None:
    flags.DEFINE_bool("figure", True, figure, flag_values=fv)
  if logdir is not None:
    flags.DEFINE_string(
        "logdir", None,
        f"Also write TensorBoard event files to this directory (created if "
        f"missing), at the step of the measured checkpoint (0 without one): "
        f"{logdir}", flag_values=fv)

  flags.register_validator(
      "num_examples", lambda v: v is None or v >= -1,
      "--num_examples must be positive, or -1/0 for the whole split",
      flag_values=fv)
  flags.register_validator("cpu_replicas", lambda v: v is None or v > 0,
                           "--cpu_replicas must be positive", flag_values=fv)
  if models:
    flags.register_validator(
        "checkpoint", rundir.is_checkpoint_name,
        "--checkpoint must be 'latest', 'final' or a step number",
        flag_values=fv)
  require("output", "the JSON file this tool writes its results to (its "
          "directory must exist); e.g. --output=runs/quickstart/{tool}.json",
          fv)


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


def _probe_writable(directory: str, flag: str, path: str) -> None:
  """Raises UserError unless a file can be created (and is removed) in
  `directory`: permission bits, read-only mounts and full quotas all show,
  where `os.access` would not for root."""
  try:
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".tfcapacity-probe-")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise UserError(f"{flag}={path}: cannot write in {directory} "
                    f"({e.strerror}); choose a writable directory") from None


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
  _probe_writable(directory, flag, path)


def check_logdir(path: str, flag: str = "--logdir") -> None:
  """Raises UserError unless `path` is, or can be made, a writable directory.

  Checked before any computation and creating nothing: the nearest
  existing directory on the path must be one and take a file (as
  `check_output` probes it).
  """
  path = os.path.abspath(path)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = ("is a file" if existing == path
             else f"lies under a file, {existing}")
    raise UserError(f"{flag}={path} {where}; name a directory")
  _probe_writable(existing, flag, path)


def summary_step(result: dict) -> int:
  """The TensorBoard step of a tool's result: its checkpoint's step, or 0
  (a model file, or a run's initial model)."""
  return int(result.get("step") or 0)


def write_summaries(logdir: str, step: int, *,
                    scalars: dict[str, float] | None = None,
                    images: dict[str, bytes] | None = None,
                    histograms: dict[str, object] | None = None) -> None:
  """Writes one step of TensorBoard summaries to a new event file in logdir.

  Args:
    logdir: the directory (created if missing).
    step: their step.
    scalars: {tag: number}.
    images: {tag: PNG bytes}.
    histograms: {tag: values}; `tf.summary.histogram` of each.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(logdir, exist_ok=True)
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default(step=int(step)):
    for tag, value in (scalars or {}).items():
      tf.summary.scalar(tag, float(value))
    for tag, data in (images or {}).items():
      tf.summary.image(tag, tf.image.decode_png(data, channels=4)[tf.newaxis])
    for tag, values in (histograms or {}).items():
      tf.summary.histogram(tag, tf.constant(values, tf.float64))
  writer.close()


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
  `request_from_flags`, the output path and any --logdir), builds the
  strategy with TensorFlow's load-time lines hidden, runs `compute(fv,
  strategy)` (which may also write the tool's figures and TensorBoard
  events), and on the chief writes the JSON atomically and logs
  `summary(result)`. A UserError ends the program with one line and
  status 2.
  """
  with one_line_errors(prog):
    (check or request_from_flags)(fv)
    check_output(fv.output)
    if "logdir" in fv and fv.logdir:
      check_logdir(fv.logdir)
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
              unknown: dict[str, str] | None = None,
              fv: flags.FlagValues = flags.FLAGS) -> None:
  """The whole program of an analysis tool (its console-script entry).

  Defines the tool's flags with `define_flags(fv)`, parses them (bad flags:
  one line, status 2, with the advice of `unknown`, see `flags_parser`),
  refuses positional arguments and runs `run_tool`.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags(fv)

  def program(argv):
    no_arguments(prog, argv)
    run_tool(prog, fv, compute, summary, check=check)

  app.run(program, flags_parser=flags_parser(prog, fv, unknown=unknown))


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
