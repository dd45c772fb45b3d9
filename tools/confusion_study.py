"""Gradient confusion vs width, depth, init, batch norm, skips (issue 5a).

  python tools/confusion_study.py \
      --flagfile=flags/confusion_mnist1d_cpu.flags \
      --study_dir=runs/confusion --parallel=2

`--flagfile` is the training runs' base flagfile; its `# confusion.<part>:`
comment lines are the study's parts (tfcapacity.studies.confusion_study):
  * init_* parts are measured at initialisation in this process; each
    cell's statistics are cached in STUDY_DIR/at_init/<part>/<cell>.json;
  * train_* parts are sweeps of training runs in STUDY_DIR/<part>/<cell>,
    run by the sweep library, --parallel at a time.
Rerunning the same command skips what is done: cached at-init cells and
finished runs; interrupted runs resume from their checkpoints.

Then the report, in --output_dir (default STUDY_DIR/report):
confusion_at_init.csv (one row per cell and seed), confusion_at_init_mean.csv
(mean and std over seeds), confusion_training.csv (one row per run and
measured or evaluated step), confusion_runs.csv (one row per run),
confusion.md (the tables), confusion.json, the figures confusion_<part>.png
and confusion_training_summary.png
and the same as TensorBoard images. `--report_only` measures and trains
nothing and reports what is there.

Exit status: 0 everything finished, 1 some training run did not (the report
covers the finished ones), 2 bad input.
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
from tfcapacity.studies import confusion_study as study  # noqa: E402
from tfcapacity.studies import sweep  # noqa: E402
from tfcapacity import rundir  # noqa: E402

common.define_study_flags()
flags.DEFINE_list("parts", [],
                  "Parts of the flagfile to run and report (default: all).")
flags.DEFINE_bool("calibrate_bn", True,
                  "At init, set batch norm's moving statistics to the "
                  "training set's batch statistics before measuring "
                  "(otherwise batch norm in inference mode is the identity).")
FLAGS = flags.FLAGS
PROG = "confusion_study"


def fail(message: str):
  cli.fail(PROG, message)



def _setup():
  """Parts, each part's validated configs, and the base Config."""
  text = common.read_base_flagfile(PROG, "flags/confusion_mnist1d_cpu.flags")
  from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
  base_args = [f"--flagfile={FLAGS.base_flagfile}"]
  try:
    parts = study.select(study.parse_parts(text), FLAGS.parts)
    base = config_lib.parse_args(base_args)
    configs = {}
    for part in parts:
      try:
        configs[part.name] = sweep.validate(base_args, part.cells())
      except UserError as e:
        raise UserError(f"confusion.{part.name}: {e}") from None
  except UserError as e:
    fail(str(e))
  if FLAGS.report_only and not os.path.isdir(FLAGS.study_dir):
    fail(f"--study_dir={FLAGS.study_dir} is not a directory; run the study "
         f"first (without --report_only)")
  return parts, configs, base


def main(argv):
  cli.no_arguments(PROG, argv)
  parts, configs, base = _setup()
  started = time.time()
  common.exit_on_sigterm()

  # Sweep dirs are prepared first, so that a study dir holding runs of
  # other base flags fails before anything is measured.
  train_parts = [p for p in parts if not p.at_init]
  if not FLAGS.report_only:
    try:
      for part in train_parts:
        sweep.prepare_sweep_dir(os.path.join(FLAGS.study_dir, part.name),
                                base, part.grid)
    except UserError as e:
      fail(str(e))

  at_init = []
  for part in (p for p in parts if p.at_init):
    if FLAGS.report_only:
      at_init += study.read_at_init(FLAGS.study_dir, part,
                                    configs[part.name])
      continue
    with cli.quiet_native_stderr():
      try:
        at_init += study.run_at_init(
            FLAGS.study_dir, part, configs[part.name],
            calibrate_bn=FLAGS.calibrate_bn, log=logging.info)
      except UserError as e:
        fail(f"confusion.{part.name}: {e}")
  init_seconds = time.time() - started

  states = {}
  if not FLAGS.report_only:
    threads = common.threads_per_cell(FLAGS.threads_per_cell, FLAGS.parallel)
    for part in train_parts:
      part_dir = os.path.join(FLAGS.study_dir, part.name)
      cells = part.cells()
      logging.info("confusion study: %s, %d runs in %s", part.name,
                   len(cells), part_dir)
      got = sweep.run(part_dir, cells, cells, configs[part.name],
                      parallel=FLAGS.parallel, threads_per_cell=threads,
                      progress=FLAGS.progress)
      states.update({f"{part.name}/{k}": v for k, v in got.items()})
  train_seconds = time.time() - started - init_seconds

  steps_rows, runs, unfinished = [], [], []
  for part in train_parts:
    s, r, u = study.training_rows(FLAGS.study_dir, part)
    steps_rows += s
    runs += r
    unfinished += [f"{part.name}/{n}" for n in u]
    if FLAGS.report_only:
      states.update({f"{part.name}/{n}": "unfinished" for n in u})
  out_dir = FLAGS.output_dir or os.path.join(FLAGS.study_dir, "report")
  os.makedirs(out_dir, exist_ok=True)
  with cli.quiet_native_stderr():
    pngs = study.figures(parts, at_init, steps_rows, runs)
  agg = study.aggregate(at_init)
  tables = []
  for part in parts:
    if part.at_init:
      tables.append(study.markdown_at_init(part, agg))
    else:
      tables.append(study.markdown_training(
          part, [r for r in runs if r["part"] == part.name],
          [u.split("/", 1)[1] for u in unfinished
           if u.startswith(part.name + "/")]))
  text = "\n".join(tables)
  rundir.atomic_write(os.path.join(out_dir, "confusion.md"), text)
  study.write_csv(os.path.join(out_dir, "confusion_at_init.csv"), at_init)
  study.write_csv(os.path.join(out_dir, "confusion_at_init_mean.csv"), agg)
  study.write_csv(os.path.join(out_dir, "confusion_training.csv"),
                  steps_rows)
  study.write_csv(os.path.join(out_dir, "confusion_runs.csv"), runs)
  common.write_figures(out_dir, pngs, "confusion", FLAGS.tensorboard)
  summary = {"parts": [p.name for p in parts],
             "at_init_cells": len(at_init), "runs_finished": len(runs),
             "unfinished": unfinished, "figures": sorted(pngs),
             "seconds_this_invocation": time.time() - started,
             "at_init_seconds_this_invocation": (
                 0.0 if FLAGS.report_only else init_seconds),
             "training_seconds_this_invocation": (
                 0.0 if FLAGS.report_only else train_seconds)}
  rundir.write_json(os.path.join(out_dir, "confusion.json"), summary)
  print(text)
  print(f"{len(at_init)} at-init cells, {len(runs)} training runs finished, "
        f"{len(unfinished)} unfinished; {time.time() - started:.0f} s. "
        f"Written to {out_dir}")
  common.exit_if_unfinished(PROG, states, "training runs")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROG, rewrite=common.base_flagfile_arg))
