"""What the study tools share: figures, TensorBoard images, tool scaffolding.

The reports (capacity, confusion_study, random_labels, maxibatch) turn
matplotlib figures into PNG bytes with `tfcapacity.figures.png`, and write
them atomically and as TensorBoard images with `write_figures`. The tools
(tools/sweep.py and tools/*_study.py) take the training runs' base flagfile
as `--flagfile` (`base_flagfile_arg`), refuse a study directory with a
damaged record before they train or report (`check_study_dir`, run by
`read_base_flagfile`), exit cleanly on SIGTERM (`exit_on_sigterm`), split
the CPU between parallel training processes (`threads_per_cell`), and end
with status 1 when some run did not finish (`exit_if_unfinished`). Runs
repeated over seeds are summarised by `spread` (values) and `band` (curves
over epochs); `fill_markers` writes generated text into a docs page.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import signal
import sys
from typing import Callable, Iterable, Mapping, Sequence

from absl import flags
import numpy as np

from tfcapacity import cli
from tfcapacity.errors import UserError
from tfcapacity import rundir


# --- Figures -----------------------------------------------------------------


def write_tensorboard_images(pngs: Mapping[str, bytes], logdir: str,
                             prefix: str) -> None:
  """The figures as TensorBoard images (tag `<prefix>/<name>`).

  Event files of an earlier report in `logdir` are replaced, so a rerun
  does not show every figure twice.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if os.path.isdir(logdir):
    for entry in os.listdir(logdir):
      if entry.startswith("events.out.tfevents."):
        os.unlink(os.path.join(logdir, entry))
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default(step=0):
    for name, data in pngs.items():
      image = tf.image.decode_png(data, channels=4)[tf.newaxis]
      tf.summary.image(f"{prefix}/{os.path.splitext(name)[0]}", image)
  writer.close()


def write_figures(out_dir: str, pngs: Mapping[str, bytes], prefix: str,
                  tensorboard: bool = True) -> None:
  """Each PNG to `out_dir`/name (atomically), and to TensorBoard if asked."""
  for name, data in pngs.items():
    rundir.atomic_write(os.path.join(out_dir, name), data)
  if tensorboard and pngs:
    with cli.quiet_native_stderr():  # TensorFlow's load-time lines.
      write_tensorboard_images(pngs, out_dir, prefix)


# --- Runs ------------------------------------------------------------------


def load_runs(study_dir: str, cells: Iterable, load: Callable
              ) -> tuple[list, list[str]]:
  """`load(cell)` for every cell: (the finished runs, unfinished names).

  `load` returns None for a cell whose run has not finished.

  Raises:
    UserError: `study_dir` is not a directory.
  """
  if not os.path.isdir(study_dir):
    raise UserError(f"--study_dir={study_dir} is not a directory; run the "
                    f"study first (without --report_only)")
  runs, unfinished = [], []
  for cell in cells:
    run = load(cell)
    if run is None:
      unfinished.append(cell.name)
    else:
      runs.append(run)
  return runs, unfinished


# --- Repeats over seeds ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spread:
  """The finite values of a quantity over repeats (seeds), summarised."""
  values: tuple[float, ...]

  @property
  def n(self) -> int:
    return len(self.values)

  @property
  def mean(self) -> float:
    return float(np.mean(self.values)) if self.values else math.nan

  @property
  def std(self) -> float:
    """The sample standard deviation (n - 1); NaN below two values."""
    return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

  @property
  def min(self) -> float:
    return float(np.min(self.values)) if self.values else math.nan

  @property
  def max(self) -> float:
    return float(np.max(self.values)) if self.values else math.nan

  @property
  def range(self) -> float:
    """max - min (0 for one value, NaN for none)."""
    return self.max - self.min

  def text(self, digits: int = 2) -> str:
    """`mean ± std [min, max]`; one value alone; "" for none."""
    if not self.values:
      return ""
    if self.n == 1:
      return f"{self.mean:.{digits}f}"
    return (f"{self.mean:.{digits}f} ± {self.std:.{digits}f} "
            f"[{self.min:.{digits}f}, {self.max:.{digits}f}]")

  def to_json(self) -> dict:
    return {"mean": self.mean, "std": self.std, "min": self.min,
            "max": self.max, "n": self.n}


def spread(values: Iterable[float]) -> Spread:
  """A `Spread` of the finite numbers among `values` (NaN/inf dropped)."""
  return Spread(tuple(float(v) for v in values
                      if v is not None and math.isfinite(float(v))))


def band(curves: Sequence[tuple[Sequence[float], Sequence[float]]]
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                    np.ndarray]:
  """Curves (x, y) of several repeats, aligned on x: (x, mean, min, max, n).

  x is the sorted union of the curves' x; at each x the statistics are over
  the curves with a finite y there (n of them); x where none has one is
  dropped.
  """
  xs = np.unique(np.concatenate([np.asarray(x, float) for x, _ in curves])
                 ) if curves else np.zeros(0)
  table = np.full((len(curves), len(xs)), np.nan)
  for i, (x, y) in enumerate(curves):
    table[i, np.searchsorted(xs, np.asarray(x, float))] = np.asarray(y, float)
  table[~np.isfinite(table)] = np.nan
  n = np.sum(np.isfinite(table), axis=0)
  keep = n > 0
  table, xs, n = table[:, keep], xs[keep], n[keep]
  if not xs.size:
    empty = np.zeros(0)
    return empty, empty, empty, empty, np.zeros(0, int)
  return (xs, np.nanmean(table, axis=0), np.nanmin(table, axis=0),
          np.nanmax(table, axis=0), n)


# --- Claims ------------------------------------------------------------------
#
# A study checks each claim of its paper with a rule stated beside it; the
# verdict comes from the rule alone:
#   agrees        the rule's condition holds in every seed (every pair);
#   disagrees     it holds in none;
#   mixed         it holds in some;
#   not measured  the runs lack what the rule reads;
#   measured      a number the paper gives no direction for, reported as found.

AGREES, DISAGREES, MIXED = "agrees", "disagrees", "mixed"
NOT_MEASURED, MEASURED = "not measured", "measured"
CLAIM_COLUMNS = ("id", "claim", "paper", "rule", "measured", "seeds",
                 "verdict")


@dataclasses.dataclass
class Claim:
  """One row of a study's claims.md / claims.csv."""
  id: str
  claim: str
  paper: str
  rule: str
  measured: str
  seeds: int  # the seeds (or seed pairs) the verdict reads
  verdict: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def verdict(holds: Iterable[bool | None]) -> str:
  """agrees (all true), disagrees (all false), mixed, or not measured
  (nothing, or only None)."""
  known = [bool(h) for h in holds if h is not None]
  if not known:
    return NOT_MEASURED
  if all(known):
    return AGREES
  if not any(known):
    return DISAGREES
  return MIXED


def escape(text) -> str:
  """`text` for one cell of a Markdown table."""
  return str(text).replace("|", "\\|").replace("\n", " ")


def claims_table(claims: Sequence[Claim]) -> list[str]:
  """The Markdown table of the claims, one line per row."""
  lines = ["| claim | paper | rule | measured | checked | verdict |",
           "|---|---|---|---|---|---|"]
  for c in claims:
    lines.append("| " + " | ".join(escape(x) for x in (
        c.claim, c.paper, c.rule, c.measured, c.seeds, f"**{c.verdict}**"))
                 + " |")
  return lines


def claims_csv(claims: Sequence[Claim]) -> str:
  """claims.csv: one row per claim, columns CLAIM_COLUMNS."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=CLAIM_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for c in claims:
    writer.writerow(c.to_json())
  return buf.getvalue()


def write_claims(out_dir: str, claims: Sequence[Claim], markdown: str
                 ) -> None:
  """claims.md (`markdown` under a title) and claims.csv in `out_dir`."""
  rundir.atomic_write(os.path.join(out_dir, "claims.md"),
                      "# The paper's claims on this study\n\n" + markdown)
  rundir.atomic_write(os.path.join(out_dir, "claims.csv"),
                      claims_csv(claims))


# --- Docs pages --------------------------------------------------------------


def _marked(path: str, text: str, name: str) -> tuple[int, int]:
  """Where NAME's generated text goes: (end of begin marker, end marker)."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  i = text.find(begin)
  j = text.find(end, i + len(begin)) if i >= 0 else -1
  if j < 0:
    raise UserError(f"{path} lacks the markers {begin} ... {end}; put them "
                    f"where the generated text goes")
  return i + len(begin), j


def _read_page(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError as e:
    raise UserError(f"cannot read docs page {path}: {e.strerror}") from None


def check_markers(path: str, names: Iterable[str]) -> None:
  """Fails unless the page has `<!-- NAME:begin/end -->` for every NAME.

  Raises:
    UserError: unreadable page or a missing pair of markers.
  """
  text = _read_page(path)
  for name in names:
    _marked(path, text, name)


def fill_markers(path: str, sections: Mapping[str, str]) -> None:
  """Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
  in the file at `path` with `sections[NAME]`, for every NAME; atomic.

  Raises:
    UserError: the file is unreadable, or a pair of markers is missing or
      out of order (nothing is written then).
  """
  text = _read_page(path)
  for name, content in sections.items():
    i, j = _marked(path, text, name)
    text = text[:i] + "\n" + content.strip("\n") + "\n" + text[j:]
  rundir.atomic_write(path, text)


# --- Tool scaffolding --------------------------------------------------------


def define_study_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The flags every tools/*_study.py has."""
  flags.DEFINE_string("base_flagfile", None,
                      "The training runs' base flagfile (also --flagfile).",
                      flag_values=fv)
  flags.DEFINE_string("study_dir", None, "Directory of the study's runs.",
                      flag_values=fv)
  flags.DEFINE_integer("parallel", 2, "Training processes at once.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer(
      "threads_per_cell", None,
      "TensorFlow threads per training process (default: the CPU count "
      "divided by --parallel when --parallel > 1, else TF's default).",
      lower_bound=1, flag_values=fv)
  flags.DEFINE_string("output_dir", None,
                      "Where the report goes (default: STUDY_DIR/report).",
                      flag_values=fv)
  flags.DEFINE_bool("report_only", False,
                    "Train nothing; report what has finished.",
                    flag_values=fv)
  flags.DEFINE_bool("tensorboard", True,
                    "Also write the figures as TensorBoard images.",
                    flag_values=fv)
  flags.DEFINE_bool("progress", None,
                    "Progress bar over training runs (default: on a "
                    "terminal).", flag_values=fv)


def read_base_flagfile(prog: str, example: str,
                       fv: flags.FlagValues = flags.FLAGS) -> str:
  """The text of the study's base flagfile, after the required-flag checks.

  --study_dir and --flagfile must be given, the file readable, and the
  study directory's records intact (`check_study_dir`); anything else ends
  the tool with one line (`cli.fail`) before it reads or writes a run.
  `example` names a flagfile for the message.
  """
  if not fv.study_dir:
    cli.fail(prog, "--study_dir is required: the directory that holds the "
             "study's runs")
  if not fv.base_flagfile:
    cli.fail(prog, f"--flagfile is required: the training runs' base "
             f"flagfile, e.g. {example}")
  try:
    with open(fv.base_flagfile) as f:
      text = f.read()
  except OSError as e:
    cli.fail(prog, f"cannot read --flagfile={fv.base_flagfile}: {e.strerror}")
  except ValueError as e:  # Not text.
    cli.fail(prog, f"cannot read --flagfile={fv.base_flagfile}: not a text "
             f"file ({e.__class__.__name__})")
  try:
    check_study_dir(fv.study_dir)
  except UserError as e:
    cli.fail(prog, str(e))
  return text


def check_study_dir(study_dir: str) -> None:
  """Checks the sweep records of a study directory; reads only.

  The study directory is a sweep directory, and so is each subdirectory
  holding a sweep.json or base.flags (a study of several grids, such as
  the confusion study's parts). In each, sweep.json, base.flags and every
  cell the runner has run (its sweep_attempts.json and results.json) are
  read as `sweep.check_sweep_dir` reads them, so that neither training nor
  a report starts from a damaged file. A path that does not exist yet is
  fine; one that is a file or lies under one is not.

  Raises:
    UserError: one line naming the first damaged file and the fix.
  """
  from tfcapacity.studies import sweep  # pylint: disable=g-import-not-at-top
  sweep.check_sweep_path(study_dir, "--study_dir")
  if not os.path.isdir(study_dir):
    return
  sweep.check_sweep_dir(study_dir, flag="--study_dir")
  for entry in sorted(os.listdir(study_dir)):
    path = os.path.join(study_dir, entry)
    if any(os.path.isfile(os.path.join(path, name))
           for name in (sweep.SWEEP_FILE, sweep.BASE_FLAGS_FILE)):
      sweep.check_sweep_dir(path)


def base_flagfile_arg(argv: list[str]) -> list[str]:
  """--flagfile names the runs' base flagfile, not one of the tool's own."""
  renamed = []
  args = iter(argv)
  for arg in args:
    if arg in ("--flagfile", "-flagfile"):
      arg = "--base_flagfile=" + next(args, "")
    elif arg.startswith(("--flagfile=", "-flagfile=")):
      arg = "--base_flagfile=" + arg.split("=", 1)[1]
    renamed.append(arg)
  return renamed


def _terminate(signum, frame):
  del frame
  raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
  """SIGTERM ends the tool through SystemExit, so `finally` blocks run."""
  signal.signal(signal.SIGTERM, _terminate)


def threads_per_cell(given: int | None, parallel: int) -> int:
  """TensorFlow threads per training process; 0 leaves TF's default."""
  if given is None and parallel > 1:
    return max(1, (os.cpu_count() or 1) // parallel)
  return given or 0


def exit_if_unfinished(prog: str, states: Mapping[str, str],
                       noun: str = "runs") -> None:
  """Exit status 1, with one line on stderr, when some run did not finish."""
  from tfcapacity.studies import sweep  # pylint: disable=g-import-not-at-top
  not_done = [n for n, s in states.items() if s not in sweep.FINISHED]
  if not_done:
    print(f"{prog}: {len(not_done)} of {len(states)} {noun} did not finish; "
          f"rerun the same command to retry them", file=sys.stderr)
    sys.exit(1)
