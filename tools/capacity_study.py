"""The capacity study (Dauphin & Bengio 2013, papers/000): runs and report.

  python tools/capacity_study.py --flagfile=flags/capacity_mnist1d_cpu.flags \
      --study_dir=runs/capacity --parallel=2

`--flagfile` is the training runs' base flagfile. Its `# sweep.grid:` lines
give the main grid (width x learning rate x seed), trained into
STUDY_DIR/<cell>; its `# capacity.compare:` lines (same syntax) give a
comparison grid whose axes replace or extend the main grid's (e.g.
`kernel_init=glorot_uniform; seed=0`), trained into STUDY_DIR/compare/<cell>.
Every run is trained by the sweep library (tfcapacity.studies.sweep):
rerunning the same command skips finished runs and resumes interrupted ones.
`--shard_index=i --num_shards=k` trains only the cells i, i+k, ... of the
fixed order (main grid, then comparison) and writes a report only when k is
1; run once more with `--report_only` after all shards are done.

The report goes to --output_dir (default STUDY_DIR/report): capacity.md (the
tables), capacity.csv and capacity_compare.csv, claims.md and claims.csv
(each claim of the paper, the rule that decides its verdict, the numbers),
capacity.json, the figures capacity_fig*.png (also to --figures_dir) and the
same as TensorBoard images. `--docs_page=PATH` writes the claims and tables
between `<!-- capacity:claims:begin/end -->` and
`<!-- capacity:tables:begin/end -->` in PATH.

Exit status: 0 every run (of this shard) finished, 1 some did not (the report
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
from tfcapacity.studies import capacity  # noqa: E402
from tfcapacity.studies import common  # noqa: E402
from tfcapacity.studies import sweep  # noqa: E402

common.define_study_flags()
flags.DEFINE_enum("metric", None, capacity.METRICS,
                  "Which training error picks the rate and is reported "
                  "(default: top1 for mnist1d and digits, else top5).")
flags.DEFINE_integer("shard_index", 0,
                     "This job's shard, in [0, --num_shards).")
flags.DEFINE_integer("num_shards", 1, "Shards the runs are split into.",
                     lower_bound=1)
flags.DEFINE_string("docs_page", None,
                    "Also write the claims and tables into this Markdown "
                    "page, between its capacity:claims and capacity:tables "
                    "begin/end markers.")
flags.DEFINE_string("figures_dir", None,
                    "Also write the PNGs here (e.g. docs/figures/capacity).")
FLAGS = flags.FLAGS
PROG = "capacity_study"
DOCS_SECTIONS = ("capacity:claims", "capacity:tables")


def fail(message: str):
  cli.fail(PROG, message)


def main(argv):
  cli.no_arguments(PROG, argv)
  text = common.read_base_flagfile(PROG, "flags/capacity_mnist1d_cpu.flags")
  started = time.time()
  try:
    grid = sweep.flagfile_grid(text, FLAGS.base_flagfile)
    for axis in ("width", "learning_rate"):
      if axis not in dict(grid):
        raise UserError(f"the grid of {FLAGS.base_flagfile} has no {axis} "
                        f"axis; add '# sweep.grid: {axis}=v1,v2,...'")
    comparison = capacity.compare_grid(text, grid)
    all_cells = capacity.study_cells(grid, comparison)
    base_args = [f"--flagfile={FLAGS.base_flagfile}"]
    from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
    base = config_lib.parse_args(base_args)
    configs = sweep.validate(base_args, all_cells)
    mine = sweep.shard(all_cells, FLAGS.shard_index, FLAGS.num_shards)
    metric = FLAGS.metric or capacity.default_metric(base.dataset)
    if FLAGS.docs_page:
      common.check_markers(FLAGS.docs_page, DOCS_SECTIONS)
    if not FLAGS.report_only:
      sweep.prepare_sweep_dir(FLAGS.study_dir, base, grid)
  except UserError as e:
    fail(str(e))

  states = {}
  if not FLAGS.report_only:
    threads = common.threads_per_cell(FLAGS.threads_per_cell, FLAGS.parallel)
    logging.info("capacity study: %d main runs and %d comparison runs (%d in "
                 "shard %d of %d) in %s", len(all_cells) - (
                     len(sweep.cells(comparison)) if comparison else 0),
                 len(sweep.cells(comparison)) if comparison else 0,
                 len(mine), FLAGS.shard_index, FLAGS.num_shards,
                 FLAGS.study_dir)
    common.exit_on_sigterm()
    states = sweep.run(FLAGS.study_dir, all_cells, capacity.cost_order(mine),
                       configs, parallel=FLAGS.parallel,
                       threads_per_cell=threads, progress=FLAGS.progress)
  trained = time.time() - started
  if FLAGS.num_shards > 1:
    done = sum(s in sweep.FINISHED for s in states.values())
    print(f"shard {FLAGS.shard_index} of {FLAGS.num_shards}: {done} of "
          f"{len(mine)} runs finished; no report (rerun with --report_only "
          f"--num_shards=1 when every shard is done)")
    common.exit_if_unfinished(PROG, states, "runs")
    return

  try:
    study = capacity.load_study(FLAGS.study_dir, all_cells, metric=metric)
    study.training_seconds = None if FLAGS.report_only else trained
    out_dir = FLAGS.output_dir or os.path.join(FLAGS.study_dir, "report")
    written = capacity.write_report(study, out_dir,
                                    tensorboard=FLAGS.tensorboard,
                                    figures_dir=FLAGS.figures_dir)
    if FLAGS.docs_page:
      common.fill_markers(FLAGS.docs_page, dict(zip(DOCS_SECTIONS, (
          written["claims_md"], written["tables_md"]))))
  except UserError as e:
    fail(str(e))
  print(written["tables_md"])
  print(written["claims_md"])
  verdicts = [c.verdict for c in written["claims"]]
  print(f"{study.finished} runs finished, {len(study.unfinished)} "
        f"unfinished; claims: " + ", ".join(
            f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
        + f"; {time.time() - started:.0f} s. Written to {out_dir}")
  common.exit_if_unfinished(PROG, states, "runs")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROG, rewrite=common.base_flagfile_arg))
