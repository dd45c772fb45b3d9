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
import sys
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from tfcapacity import cli  # noqa: E402
from tfcapacity.errors import UserError  # noqa: E402
from tfcapacity.studies import common  # noqa: E402
from tfcapacity.studies import random_labels  # noqa: E402
from tfcapacity.studies import sweep  # noqa: E402
from tfcapacity import rundir  # noqa: E402

common.define_study_flags()
flags.DEFINE_float("residual_scale_c", 1.0,
                   "c_res: fc_resnet cells get --residual_scale=c_res/depth; "
                   "0 keeps the flagfile's --residual_scale.", lower_bound=0)
flags.DEFINE_float("threshold", random_labels.THRESHOLD,
                   "Training loss that counts as fitted (steps to reach it).")
FLAGS = flags.FLAGS
PROG = "random_labels_study"


def fail(message: str):
  cli.fail(PROG, message)



def main(argv):
  cli.no_arguments(PROG, argv)
  if not FLAGS.threshold > 0:
    fail(f"--threshold must be positive; got {FLAGS.threshold}")
  spec = sweep.grid_from_flagfile(common.read_base_flagfile(
      PROG, "flags/random_labels_mnist1d_cpu.flags"))
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
    threads = common.threads_per_cell(FLAGS.threads_per_cell, FLAGS.parallel)
    logging.info("random-labels study: %d cells in %s", len(cells),
                 FLAGS.study_dir)
    common.exit_on_sigterm()
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
  common.write_figures(out_dir, pngs, "random_labels", FLAGS.tensorboard)
  print(table)
  print(f"{summary['reached']} of {summary['settings']} settings reached "
        f"training loss < {FLAGS.threshold:g}; {len(runs)} runs finished, "
        f"{len(unfinished)} unfinished; {time.time() - started:.0f} s. "
        f"Written to {out_dir}")
  common.exit_if_unfinished(PROG, states, "cells")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROG, rewrite=common.base_flagfile_arg))
