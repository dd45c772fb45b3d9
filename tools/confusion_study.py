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
claims.md and claims.csv (each claim of the abstract, its rule, the numbers
as mean ± std [min, max] over seeds and the verdict the rule gives),
confusion.md (the tables: cosines first, the learning-rate grids, the raw
confusion last), confusion_at_init.csv (one row per cell and seed),
confusion_at_init_mean.csv and confusion_runs_mean.csv (mean, std, min,
max over seeds), confusion_training.csv (one row per run and measured or
evaluated step), confusion_runs.csv (one row per run), confusion_rates.csv
(mean final training loss per learning rate of a rate grid),
confusion.json, the figures confusion_NN_<part>.png and
confusion_NN_training_summary.png (also to --figures_dir) and the same as
TensorBoard images. Step 0 of batch-norm training runs is left out (see
tfcapacity.studies.confusion_study). `--docs_page=PATH` writes the claims
and the tables between `<!-- confusion:claims:begin/end -->` and
`<!-- confusion:tables:begin/end -->` in PATH. `--report_only` measures and
trains nothing and reports what is there.

`--shard_index=i --num_shards=k` splits the training runs over k machines:
this one trains cells i, i+k, ... of each train_* part, measures the
init_* parts only when i == 0, and writes no report when k > 1 (rerun
without the shard flags, or with --report_only, to report).

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
flags.DEFINE_string("docs_page", None,
                    "Also write the claims and tables into this Markdown "
                    "page, between its confusion:claims and "
                    "confusion:tables begin/end markers.")
flags.DEFINE_string("figures_dir", None,
                    "Also write the PNGs here (e.g. docs/figures).")
flags.DEFINE_integer("shard_index", 0, "This machine's share of the "
                     "training runs, in [0, --num_shards).", lower_bound=0)
flags.DEFINE_integer("num_shards", 1, "Machines the training runs are "
                     "split over; with more than one, each trains its "
                     "share (shard 0 also measures the init_* parts) and "
                     "writes no report.", lower_bound=1)
FLAGS = flags.FLAGS
PROG = "confusion_study"
DOCS_SECTIONS = ("confusion:claims", "confusion:tables")


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
    sweep.shard([], FLAGS.shard_index, FLAGS.num_shards)
    if FLAGS.docs_page:
      common.check_markers(FLAGS.docs_page, DOCS_SECTIONS)
  except UserError as e:
    fail(str(e))
  if FLAGS.report_only and not os.path.isdir(FLAGS.study_dir):
    fail(f"--study_dir={FLAGS.study_dir} is not a directory; run the study "
         f"first (without --report_only)")
  return parts, configs, base


def measure(parts, configs) -> list[dict]:
  """The at-init rows: measured where not cached (read only with
  --report_only or on a shard other than 0)."""
  rows = []
  for part in (p for p in parts if p.at_init):
    if FLAGS.report_only or FLAGS.shard_index != 0:
      rows += study.read_at_init(FLAGS.study_dir, part, configs[part.name])
      continue
    with cli.quiet_native_stderr():
      try:
        rows += study.run_at_init(
            FLAGS.study_dir, part, configs[part.name],
            calibrate_bn=FLAGS.calibrate_bn, log=logging.info)
      except UserError as e:
        fail(f"confusion.{part.name}: {e}")
  return rows


def train(train_parts, configs) -> dict[str, str]:
  """Runs this shard's cells of the training parts: {part/cell: state}."""
  states = {}
  threads = common.threads_per_cell(FLAGS.threads_per_cell, FLAGS.parallel)
  for part in train_parts:
    part_dir = os.path.join(FLAGS.study_dir, part.name)
    cells = part.cells()
    mine = sweep.shard(cells, FLAGS.shard_index, FLAGS.num_shards)
    logging.info("confusion study: %s, %d of %d runs in %s", part.name,
                 len(mine), len(cells), part_dir)
    got = sweep.run(part_dir, cells, mine, configs[part.name],
                    parallel=FLAGS.parallel, threads_per_cell=threads,
                    progress=FLAGS.progress)
    states.update({f"{part.name}/{k}": v for k, v in got.items()})
  return states


def report(parts, at_init, timing) -> tuple[list[str], dict[str, str]]:
  """Writes the report; returns (unfinished runs, their states)."""
  train_parts = [p for p in parts if not p.at_init]
  steps_rows, runs, unfinished = [], [], []
  for part in train_parts:
    s, r, u = study.training_rows(FLAGS.study_dir, part)
    steps_rows += s
    runs += r
    unfinished += [f"{part.name}/{n}" for n in u]
  out_dir = FLAGS.output_dir or os.path.join(FLAGS.study_dir, "report")
  os.makedirs(out_dir, exist_ok=True)
  with cli.quiet_native_stderr():
    pngs = study.figures(parts, at_init, steps_rows, runs)
  tables = study.tables_markdown(parts, at_init, runs, unfinished)
  claims = study.evaluate(parts, at_init, runs)
  seeds = [r["seeds"] for r in study.aggregate(at_init)] + [
      r["seeds"] for r in study.aggregate(runs, ())]
  claims_md = study.claims_markdown(claims, max(seeds, default=0))
  if FLAGS.docs_page:
    try:
      common.fill_markers(FLAGS.docs_page, dict(zip(DOCS_SECTIONS, (
          claims_md, tables))))
    except UserError as e:
      fail(str(e))
  rate_parts = study.rate_grid_parts(parts)
  rundir.atomic_write(os.path.join(out_dir, "confusion.md"), tables)
  common.write_claims(out_dir, claims, claims_md)
  study.write_csv(os.path.join(out_dir, "confusion_at_init.csv"), at_init)
  study.write_csv(os.path.join(out_dir, "confusion_at_init_mean.csv"),
                  study.aggregate(at_init))
  study.write_csv(os.path.join(out_dir, "confusion_training.csv"),
                  steps_rows)
  study.write_csv(os.path.join(out_dir, "confusion_runs.csv"), runs)
  study.write_csv(os.path.join(out_dir, "confusion_runs_mean.csv"),
                  study.aggregate(study.at_best_rate(runs, rate_parts),
                                  study.RUN_KEYS))
  study.write_csv(os.path.join(out_dir, "confusion_rates.csv"),
                  study.rate_table(runs, rate_parts))
  common.write_figures(out_dir, pngs, "confusion", FLAGS.tensorboard)
  if FLAGS.figures_dir:
    os.makedirs(FLAGS.figures_dir, exist_ok=True)
    common.write_figures(FLAGS.figures_dir, pngs, "confusion", False)
  summary = {"parts": [p.name for p in parts],
             "at_init_cells": len(at_init), "runs_finished": len(runs),
             "unfinished": unfinished, "figures": sorted(pngs),
             "claims": [c.to_json() for c in claims], **timing}
  rundir.write_json(os.path.join(out_dir, "confusion.json"), summary)
  print(claims_md)
  print(tables)
  print(f"{len(at_init)} at-init cells, {len(runs)} training runs finished, "
        f"{len(unfinished)} unfinished; written to {out_dir}")
  return unfinished, {u: "unfinished" for u in unfinished}


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

  with cli.one_line_errors(PROG):  # E.g. a damaged cell's results.json.
    at_init = measure(parts, configs)
    init_seconds = time.time() - started
    states = {} if FLAGS.report_only else train(train_parts, configs)
    train_seconds = time.time() - started - init_seconds
    if FLAGS.num_shards > 1:
      common.exit_if_unfinished(PROG, states, "training runs of this shard")
      return
    _, missing = report(parts, at_init, {
        "at_init_seconds_this_invocation": (
            0.0 if FLAGS.report_only else init_seconds),
        "training_seconds_this_invocation": (
            0.0 if FLAGS.report_only else train_seconds),
        "seconds_this_invocation": time.time() - started})
  if FLAGS.report_only:
    states.update(missing)
  print(f"{time.time() - started:.0f} s")
  common.exit_if_unfinished(PROG, states, "training runs")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROG, rewrite=common.base_flagfile_arg))
