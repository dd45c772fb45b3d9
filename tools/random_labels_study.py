"""Random labels vs depth and width (Du et al. 2019): runs the grid, reports.

  python tools/random_labels_study.py \
      --flagfile=flags/random_labels_mnist1d_cpu.flags \
      --study_dir=runs/random_labels --parallel=2

`--flagfile` is the training runs' base flagfile; its `# sweep.grid:` lines
give the grid. Each cell is a training run in STUDY_DIR/<cell>, run by the
sweep library (tfcapacity.studies.sweep): rerunning the same command skips
finished cells and resumes interrupted ones. fc_resnet cells get
--residual_scale=c_res/depth (Du et al.'s c_res/H; --residual_scale_c).

Then the report, in --output_dir (default STUDY_DIR/report): per run
random_labels_runs.csv, per (model, depth, width) with the best learning rate
random_labels.csv, random_labels.md (the tables), random_labels.json, the
figures random_labels_*.png and the same as TensorBoard images.
`--report_only` skips training and reports the finished cells.

Exit status: 0 every cell finished, 1 some cell did not (the report covers
the finished ones), 2 bad input.
"""

import os
import signal
import sys
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from tfcapacity import cli  # noqa: E402
from tfcapacity.errors import UserError  # noqa: E402
from tfcapacity.studies import random_labels  # noqa: E402
from tfcapacity.studies import sweep  # noqa: E402
from tfcapacity.training import rundir  # noqa: E402

flags.DEFINE_string("base_flagfile", None,
                    "The training runs' base flagfile (also --flagfile).")
flags.DEFINE_string("study_dir", None, "Directory of the study's runs.")
flags.DEFINE_integer("parallel", 2, "Training processes at once.",
                     lower_bound=1)
flags.DEFINE_integer("threads_per_cell", None,
                     "TensorFlow threads per training process (default: the "
                     "CPU count divided by --parallel).", lower_bound=1)
flags.DEFINE_float("residual_scale_c", 1.0,
                   "c_res: fc_resnet cells get --residual_scale=c_res/depth; "
                   "0 keeps the flagfile's --residual_scale.", lower_bound=0)
flags.DEFINE_float("threshold", random_labels.THRESHOLD,
                   "Training loss that counts as fitted (steps to reach it).")
flags.DEFINE_string("output_dir", None,
                    "Where the report goes (default: STUDY_DIR/report).")
flags.DEFINE_bool("report_only", False,
                  "Do not train; report the cells that have finished.")
flags.DEFINE_bool("tensorboard", True,
                  "Also write the figures as TensorBoard images.")
flags.DEFINE_bool("progress", None,
                  "Progress bar over cells (default: on a terminal).")
FLAGS = flags.FLAGS
PROG = "random_labels_study"


def fail(message: str):
  cli.fail(PROG, message)


def _terminate(signum, frame):
  del frame
  raise SystemExit(128 + signum)


def main(argv):
  cli.no_arguments(PROG, argv)
  if not FLAGS.study_dir:
    fail("--study_dir is required: the directory that holds the runs")
  if not FLAGS.base_flagfile:
    fail("--flagfile is required: the training runs' base flagfile, e.g. "
         "flags/random_labels_mnist1d_cpu.flags")
  if not FLAGS.threshold > 0:
    fail(f"--threshold must be positive; got {FLAGS.threshold}")
  try:
    with open(FLAGS.base_flagfile) as f:
      spec = sweep.grid_from_flagfile(f.read())
  except OSError as e:
    fail(f"cannot read --flagfile={FLAGS.base_flagfile}: {e.strerror}")
  started = time.time()
  try:
    if spec is None:
      raise UserError(f"{FLAGS.base_flagfile} has no '# sweep.grid: "
                      f"flag=v1,v2' lines; add the study's grid there")
    grid = sweep.parse_grid(spec)
    base_args = [f"--flagfile={FLAGS.base_flagfile}"]
    from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
    base = config_lib.parse_args(base_args)
    cells = random_labels.study_cells(grid, FLAGS.residual_scale_c,
                                      base_depth=base.depth)
    configs = sweep.validate(base_args, cells)
    if not FLAGS.report_only:
      sweep.prepare_sweep_dir(FLAGS.study_dir, base, grid)
  except UserError as e:
    fail(str(e))

  states = {}
  if not FLAGS.report_only:
    threads = FLAGS.threads_per_cell or max(
        1, (os.cpu_count() or 1) // FLAGS.parallel)
    logging.info("random-labels study: %d cells in %s", len(cells),
                 FLAGS.study_dir)
    signal.signal(signal.SIGTERM, _terminate)
    states = sweep.run(FLAGS.study_dir, cells, cells, configs,
                       parallel=FLAGS.parallel, threads_per_cell=threads,
                       progress=FLAGS.progress)
  trained_seconds = time.time() - started

  try:
    with cli.quiet_native_stderr():  # Reading events loads TensorFlow.
      runs, unfinished = random_labels.load_runs(FLAGS.study_dir, cells,
                                                 FLAGS.threshold)
      best = random_labels.best_runs(runs)
      pngs = random_labels.figures(best, FLAGS.threshold)
    out_dir = FLAGS.output_dir or os.path.join(FLAGS.study_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
  except UserError as e:
    fail(str(e))
  table = random_labels.markdown(best, FLAGS.threshold, unfinished)
  rundir.atomic_write(os.path.join(out_dir, "random_labels.md"), table)
  random_labels.write_csv(os.path.join(out_dir, "random_labels_runs.csv"),
                          runs, FLAGS.threshold)
  random_labels.write_csv(os.path.join(out_dir, "random_labels.csv"),
                          list(best.values()), FLAGS.threshold)
  summary = random_labels.summary_json(runs, best, unfinished,
                                       FLAGS.threshold)
  summary["seconds_this_invocation"] = time.time() - started
  summary["training_seconds_this_invocation"] = (
      0.0 if FLAGS.report_only else trained_seconds)
  rundir.write_json(os.path.join(out_dir, "random_labels.json"), summary)
  for name, data in pngs.items():
    rundir.atomic_write(os.path.join(out_dir, name), data)
  if FLAGS.tensorboard:
    with cli.quiet_native_stderr():
      random_labels.write_tensorboard_images(pngs, out_dir)
  print(table)
  print(f"{summary['reached']} of {summary['settings']} settings reached "
        f"training loss < {FLAGS.threshold:g}; {len(runs)} runs finished, "
        f"{len(unfinished)} unfinished; {time.time() - started:.0f} s. "
        f"Written to {out_dir}")
  not_done = [n for n, s in states.items() if s not in sweep.FINISHED]
  if not_done:
    print(f"{PROG}: {len(not_done)} of {len(states)} cells did not finish; "
          f"rerun the same command to retry them", file=sys.stderr)
    sys.exit(1)


def base_flagfile_arg(argv):
  """--flagfile names the runs' base flagfile, not one of this tool's."""
  renamed = []
  args = iter(argv)
  for arg in args:
    if arg in ("--flagfile", "-flagfile"):
      arg = "--base_flagfile=" + next(args, "")
    elif arg.startswith(("--flagfile=", "-flagfile=")):
      arg = "--base_flagfile=" + arg.split("=", 1)[1]
    renamed.append(arg)
  return renamed


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG,
                                              rewrite=base_flagfile_arg))
