"""The maxi-batch study (papers/003): runs the grid and variants, reports.

  python tools/maxibatch_study.py \
      --flagfile=flags/maxibatch_resnet_digits_cpu.flags \
      --study_dir=runs/maxibatch_digits --parallel=2

`--flagfile` is the training runs' base flagfile. Its `# sweep.grid:` lines
give the grid (batch size x learning rate x seed) and its `# maxibatch.variant:
NAME flag=value ...` lines runs beyond it (ghost batch norm, gradient noise,
linearisation); `@CELL` in a value is that cell's run directory, and the
variant waits for it. With a `seed` axis in the grid, a variant line
without `seed=` runs once per seed (`NAME,seed=S`) and its `@CELL`
references resolve at that seed; `--quick` keeps only the axis's first seed
(the 1-seed tier). Each run is trained by the sweep library
(tfcapacity.studies.sweep) in STUDY_DIR/<cell>: rerunning the same command
skips finished runs and resumes interrupted ones.

Then, cached under STUDY_DIR and computed only when missing:
  interpolation/*__<bn_stats>.json  Fig. 2's lines (tfcapacity.interpolate)
      from the smallest m's best run to each run of the largest m that
      differs only in learning rate, pairing runs of one seed, with
      --bn_stats=recompute and =interpolate;
  interpolation/plane__<cell>.json  Fig. 2b's filter-normalised planes
      around the smallest m's best run and the largest m's run at the
      variants' rate, first seed only;
  sharpness/<cell>.json  Keskar et al.'s phi (tfcapacity.sharpness,
      epsilon 1e-3, final checkpoint) of every seed of every m's best rate.

The report goes to --output_dir (default STUDY_DIR/report): maxibatch.md
(tables: mean ± std [min, max] over seeds), maxibatch.csv (one row per
run), claims.md and claims.csv (each claim of the paper, its rule, the
numbers and the verdict the rule gives), maxibatch.json (all of it), the
figures maxibatch_fig*.png (also to --figures_dir) and the same as
TensorBoard images. `--docs_page=PATH` writes the claims and the tables
between `<!-- maxibatch:claims:begin/end -->` and `<!-- maxibatch:tables:
begin/end -->` in PATH. `--report_only` trains nothing and computes
nothing that is not cached.

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
from tfcapacity.studies import maxibatch_claims  # noqa: E402
from tfcapacity.studies import maxibatch_figures  # noqa: E402
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
flags.DEFINE_integer("plane_points", 11,
                     "Points per axis of each plane (Fig. 2b).",
                     lower_bound=2)
flags.DEFINE_string("docs_page", None,
                    "Also write the claims and tables into this Markdown "
                    "page, between its maxibatch:claims and "
                    "maxibatch:tables begin/end markers.")
flags.DEFINE_string("figures_dir", None,
                    "Also write the PNGs here (e.g. docs/figures).")
flags.DEFINE_integer("shard_index", 0, "This machine's share of the runs, "
                     "in [0, --num_shards).", lower_bound=0)
flags.DEFINE_integer("num_shards", 1, "Machines the runs are split over; "
                     "with more than one, each trains its share and writes "
                     "no report (rerun without the shard flags to report).",
                     lower_bound=1)
FLAGS = flags.FLAGS
PROG = "maxibatch_study"
ALPHA_RANGE = "-0.5,1.5"
PLANE_RANGE = "-1,1"
SHARPNESS_EPSILON = 1e-3
DOCS_SECTIONS = ("maxibatch:claims", "maxibatch:tables")


def fail(message: str):
  cli.fail(PROG, message)


def _write(path: str, result: dict) -> dict:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rundir.write_json(path, result)
  return result


def interpolate(path: str, b_dir: str, a_dir: str | None = None,
                bn_stats: str = "recompute") -> dict:
  """tfcapacity.interpolate's library: the line A -> B, or without A the
  plane around B; writes `path`."""
  from tfcapacity import interpolate as interp  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  interp.define_flags(fv)
  args = ["interpolate", f"--to={b_dir}", f"--output={path}",
          f"--num_examples={FLAGS.interpolation_examples}", "--nofigure",
          "--noprogress_bar"]
  if a_dir is None:
    args += ["--plane", f"--num_points={FLAGS.plane_points}",
             f"--alpha_range={PLANE_RANGE}"]
  else:
    args += [f"--from={a_dir}", f"--bn_stats={bn_stats}",
             f"--num_points={FLAGS.interpolation_points}",
             f"--alpha_range={ALPHA_RANGE}"]
  fv(args)
  return _write(path, interp.compute(fv))


def sharpness(path: str, run_dir: str) -> dict:
  """tfcapacity.sharpness's library on the run's last checkpoint."""
  from tfcapacity import sharpness as sharpness_lib  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  sharpness_lib.define_flags(fv)
  fv(["sharpness", f"--model_dir={run_dir}", f"--epsilon={SHARPNESS_EPSILON}",
      f"--output={path}", "--noprogress_bar"])
  return _write(path, sharpness_lib.compute(fv))


def cached(path: str, compute, what: str, missing: list) -> bool:
  """Whether `path` exists, computing it first unless --report_only."""
  if os.path.exists(path):
    return True
  if FLAGS.report_only:
    missing.append(os.path.relpath(path, FLAGS.study_dir))
    return False
  logging.info("computing %s", what)
  with cli.quiet_native_stderr():
    compute()
  return True


def add_analyses(report: maxibatch.Report) -> list[str]:
  """Fig. 2's lines and planes and the sharpness into `report`, computed
  where not cached; returns the cache files missing (--report_only)."""
  study, missing = FLAGS.study_dir, []

  def run_dir(run):
    return os.path.join(study, run.name)

  for a, b in maxibatch.interpolation_pairs(report):
    for bn in maxibatch.LINE_BN_STATS:
      path = maxibatch.interpolation_path(study, a, b, bn)
      if cached(path, lambda: interpolate(path, run_dir(b), run_dir(a), bn),
                f"line {a.name} -> {b.name} ({bn})", missing):
        report.lines.append(maxibatch.Line(
            a, b, bn, maxibatch.read_interpolation(path)))
  for run in maxibatch.plane_runs(report):
    path = maxibatch.plane_path(study, run)
    if cached(path, lambda: interpolate(path, run_dir(run)),
              f"plane around {run.name}", missing):
      report.planes.append((run, maxibatch.read_interpolation(path, True)))
  for run in maxibatch.sharpness_runs(report):
    path = maxibatch.sharpness_path(study, run)
    if cached(path, lambda: sharpness(path, run_dir(run)),
              f"sharpness of {run.name}", missing):
      report.sharpness[run.name] = maxibatch.read_sharpness(path)
  return missing


def main(argv):
  cli.no_arguments(PROG, argv)
  text = common.read_base_flagfile(
      PROG, "flags/maxibatch_resnet_digits_cpu.flags")
  started = time.time()
  try:
    grid = sweep.flagfile_grid(text, FLAGS.base_flagfile)
    grid_cells = sweep.cells(maxibatch.first_seed_only(grid) if FLAGS.quick
                             else grid)
    variants = maxibatch.parse_variants(text, grid_cells, FLAGS.study_dir)
    all_cells = [*grid_cells, *variants]
    base_args = [f"--flagfile={FLAGS.base_flagfile}"]
    from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
    base = config_lib.parse_args(base_args)
    configs = sweep.validate(base_args, all_cells)
    sweep.shard([], FLAGS.shard_index, FLAGS.num_shards)
    if FLAGS.docs_page:
      common.check_markers(FLAGS.docs_page, DOCS_SECTIONS)
    if not FLAGS.report_only:
      sweep.prepare_sweep_dir(FLAGS.study_dir, base, grid)
  except UserError as e:
    fail(str(e))

  states, mine = {}, set()
  if not FLAGS.report_only:
    threads = common.threads_per_cell(FLAGS.threads_per_cell, FLAGS.parallel)
    first, second = (sweep.shard(cells, FLAGS.shard_index, FLAGS.num_shards)
                     for cells in maxibatch.run_order(grid_cells, variants))
    mine = {c.name for c in [*first, *second]}
    logging.info("maxi-batch study: %d grid runs and %d variants in %s",
                 len(grid_cells), len(variants), FLAGS.study_dir)
    common.exit_on_sigterm()
    run = dict(parallel=FLAGS.parallel, threads_per_cell=threads,
               progress=FLAGS.progress)
    states = sweep.run(FLAGS.study_dir, all_cells, first, configs, **run)
    for v in second:  # References trained by other shards or invocations.
      for d in v.depends_on:
        if d not in states:
          states[d] = sweep.cell_state(os.path.join(FLAGS.study_dir, d))
    pending = maxibatch.run_in_rounds(
        second, states, lambda ready: sweep.run(
            FLAGS.study_dir, all_cells, ready, configs, **run))
    for v in pending:
      logging.error("variant %s not run: %s did not complete", v.name,
                    ", ".join(v.depends_on))
      states[v.name] = sweep.cell_state(os.path.join(FLAGS.study_dir,
                                                     v.name))
  trained = time.time() - started
  if FLAGS.num_shards > 1:
    common.exit_if_unfinished(PROG, {
        n: s for n, s in states.items() if n in mine}, "runs of this shard")
    return

  try:
    runs, unfinished = maxibatch.load_runs(FLAGS.study_dir, all_cells)
    report = maxibatch.summarize(runs, unfinished, quick=FLAGS.quick)
    report.training_seconds = None if FLAGS.report_only else trained
    missing = add_analyses(report)
    claims = maxibatch_claims.evaluate(report)
    pngs = maxibatch_figures.figures(report)
    out_dir = FLAGS.output_dir or os.path.join(FLAGS.study_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    tables = maxibatch.tables(report)
    claims_md = maxibatch_claims.markdown(claims, report)
    if FLAGS.docs_page:
      common.fill_markers(FLAGS.docs_page, dict(zip(DOCS_SECTIONS, (
          claims_md, tables))))
  except UserError as e:
    fail(str(e))
  rundir.atomic_write(os.path.join(out_dir, "maxibatch.md"),
                      maxibatch.markdown(report))
  common.write_claims(out_dir, claims, claims_md)
  sweep.write_csv(os.path.join(out_dir, "maxibatch.csv"),
                  maxibatch.table_rows(report))
  summary = maxibatch.summary_json(report, [c.to_json() for c in claims])
  summary["analyses_missing"] = missing
  summary["seconds_this_invocation"] = time.time() - started
  rundir.write_json(os.path.join(out_dir, "maxibatch.json"), summary)
  common.write_figures(out_dir, pngs, "maxibatch", FLAGS.tensorboard)
  if FLAGS.figures_dir:
    os.makedirs(FLAGS.figures_dir, exist_ok=True)
    common.write_figures(FLAGS.figures_dir, pngs, "maxibatch", False)
  print(tables)
  print(claims_md)
  verdicts = [c.verdict for c in claims]
  print(f"{len(runs)} runs finished, {len(unfinished)} unfinished; "
        f"{len(report.lines)} lines, {len(report.planes)} planes, "
        f"{len(report.sharpness)} sharpness values"
        + (f" ({len(missing)} not computed: --report_only)" if missing
           else "") + "; claims: "
        + ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(
            verdicts))
        + f"; {time.time() - started:.0f} s. Written to {out_dir}")
  common.exit_if_unfinished(PROG, states, "runs")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROG, rewrite=common.base_flagfile_arg))
