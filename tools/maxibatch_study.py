"""The maxi-batch study (papers/003): runs the grid and variants, reports.

  python tools/maxibatch_study.py \
      --flagfile=flags/maxibatch_resnet_digits_cpu.flags \
      --study_dir=runs/maxibatch_digits --parallel=2

`--flagfile` is the training runs' base flagfile. Its `# sweep.grid:` lines
give the grid (batch size x learning rate) and its `# maxibatch.variant: NAME
flag=value ...` lines single runs beyond it (gradient noise, linearisation);
`@CELL` in a value is that cell's run directory, and the variant waits for
it. With a `seed` axis in the grid, a variant line without `seed=` runs
once per seed (`NAME,seed=S`) and its `@CELL` references resolve at that
seed; `--quick` keeps only the axis's first seed (the 1-seed tier). Each run is trained by the sweep library (tfcapacity.studies.sweep) in
STUDY_DIR/<cell>: rerunning the same command skips finished runs and resumes
interrupted ones.

Then Fig. 2's interpolations (tfcapacity.interpolate, from the smallest
batch size's best run to each run of the largest batch size), cached in
STUDY_DIR/interpolation/*.json, and the report in --output_dir (default
STUDY_DIR/report): maxibatch.md (tables), maxibatch.csv (one row per run),
maxibatch.json (best rates, the paper's claims checked, interpolation
summaries), the figures maxibatch_fig*.png and the same as TensorBoard
images. `--report_only` trains nothing and computes no interpolation that
is not cached.

Exit status: 0 every run finished, 1 some run did not (the report covers
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
from tfcapacity.studies import maxibatch  # noqa: E402
from tfcapacity.studies import sweep  # noqa: E402
from tfcapacity import rundir  # noqa: E402

common.define_study_flags()
flags.DEFINE_integer("interpolation_points", 25,
                     "Points on each interpolation line (Fig. 2).",
                     lower_bound=2)
flags.DEFINE_bool("quick", False,
                  "The 1-seed tier: only the first seed of the grid's seed "
                  "axis, for the grid and the variants.")
flags.DEFINE_integer("interpolation_examples", -1,
                     "Examples per split for the interpolation (-1: all).",
                     lower_bound=-1)
FLAGS = flags.FLAGS
PROG = "maxibatch_study"
ALPHA_RANGE = "-0.5,1.5"


def fail(message: str):
  cli.fail(PROG, message)



def interpolate(a_dir: str, b_dir: str, path: str) -> dict:
  """Runs tfcapacity.interpolate's library on (A, B); writes `path`."""
  from tfcapacity import interpolate as interp  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  interp.define_flags(fv)
  fv(["interpolate", f"--from={a_dir}", f"--to={b_dir}",
      f"--num_points={FLAGS.interpolation_points}",
      f"--alpha_range={ALPHA_RANGE}",
      f"--num_examples={FLAGS.interpolation_examples}",
      f"--output={path}", "--nofigure", "--noprogress_bar"])
  result = interp.compute(fv)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rundir.write_json(path, result)
  return result


def main(argv):
  cli.no_arguments(PROG, argv)
  text = common.read_base_flagfile(
      PROG, "flags/maxibatch_resnet_digits_cpu.flags")
  started = time.time()
  try:
    spec = sweep.grid_from_flagfile(text)
    if spec is None:
      raise UserError(f"{FLAGS.base_flagfile} has no '# sweep.grid: "
                      f"flag=v1,v2' lines; add the study's grid there")
    grid = sweep.parse_grid(spec)
    grid_cells = sweep.cells(maxibatch.first_seed_only(grid) if FLAGS.quick
                             else grid)
    variants = maxibatch.parse_variants(text, grid_cells, FLAGS.study_dir)
    all_cells = [*grid_cells, *variants]
    base_args = [f"--flagfile={FLAGS.base_flagfile}"]
    from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
    base = config_lib.parse_args(base_args)
    configs = sweep.validate(base_args, all_cells)
    if not FLAGS.report_only:
      sweep.prepare_sweep_dir(FLAGS.study_dir, base, grid)
  except UserError as e:
    fail(str(e))

  states = {}
  if not FLAGS.report_only:
    threads = common.threads_per_cell(FLAGS.threads_per_cell, FLAGS.parallel)
    first, second = maxibatch.run_order(grid_cells, variants)
    logging.info("maxi-batch study: %d grid runs and %d variants in %s",
                 len(grid_cells), len(variants), FLAGS.study_dir)
    common.exit_on_sigterm()
    run = dict(parallel=FLAGS.parallel, threads_per_cell=threads,
               progress=FLAGS.progress)
    states = sweep.run(FLAGS.study_dir, all_cells, first, configs, **run)
    pending = maxibatch.run_in_rounds(
        second, states, lambda ready: sweep.run(
            FLAGS.study_dir, all_cells, ready, configs, **run))
    for v in pending:
      logging.error("variant %s not run: %s did not complete", v.name,
                    ", ".join(v.depends_on))
      states[v.name] = sweep.cell_state(os.path.join(FLAGS.study_dir,
                                                     v.name))
  trained = time.time() - started

  try:
    runs, unfinished = maxibatch.load_runs(FLAGS.study_dir, all_cells)
    report = maxibatch.summarize(runs, unfinished)
    interpolations, missing = {}, []
    for a, b in maxibatch.interpolation_pairs(report):
      path = maxibatch.interpolation_path(FLAGS.study_dir, a, b)
      if not os.path.exists(path):
        if FLAGS.report_only:
          missing.append(os.path.basename(path))
          continue
        logging.info("interpolating %s -> %s", a.name, b.name)
        with cli.quiet_native_stderr():
          interpolate(os.path.join(FLAGS.study_dir, a.name),
                      os.path.join(FLAGS.study_dir, b.name), path)
      interpolations[path] = maxibatch.read_interpolation(path)
    pngs = maxibatch.figures(report, interpolations)
    out_dir = FLAGS.output_dir or os.path.join(FLAGS.study_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
  except UserError as e:
    fail(str(e))
  table = maxibatch.markdown(report)
  rundir.atomic_write(os.path.join(out_dir, "maxibatch.md"), table)
  sweep.write_csv(os.path.join(out_dir, "maxibatch.csv"),
                  maxibatch.table_rows(report))
  summary = maxibatch.summary_json(report, interpolations)
  summary["interpolations_missing"] = missing
  summary["seconds_this_invocation"] = time.time() - started
  summary["training_seconds_this_invocation"] = (
      0.0 if FLAGS.report_only else trained)
  rundir.write_json(os.path.join(out_dir, "maxibatch.json"), summary)
  common.write_figures(out_dir, pngs, "maxibatch", FLAGS.tensorboard)
  print(table)
  print(f"{len(runs)} runs finished, {len(unfinished)} unfinished, "
        f"{len(interpolations)} interpolations"
        + (f" ({len(missing)} not computed: --report_only)" if missing
           else "") + f"; {time.time() - started:.0f} s. Written to {out_dir}")
  common.exit_if_unfinished(PROG, states, "runs")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROG, rewrite=common.base_flagfile_arg))
