"""Du et al.'s global-minima study in their regime: runs it, reports.

  python tools/global_minima_study.py \
      --flagfile=flags/global_minima_mnist1d_cpu.flags \
      --study_dir=runs/global_minima --parallel=2

`--flagfile` is the training runs' base flagfile: random +-1 labels on n
unit-norm inputs, squared loss, `--parametrization=ntk`, full-batch gradient
descent with `--learning_rate_from=gram` (tfcapacity.studies.global_minima
says what each run measures). The grid is --models x --depths x --widths x
--seeds. Widths run from the narrowest: a (model, depth, seed) stops at the
first width that fits every training sign within the budget, except at
--drift_depths, where every width runs. Cells with more than
--max_parameters weights are not run (the report lists them). Each run is
trained by the sweep library in STUDY_DIR/<cell>; rerunning the same command
skips finished runs and resumes interrupted ones. `--quick` is the 1-seed
tier (the first of --seeds).

The report goes to --output_dir (default STUDY_DIR/report):
global_minima.md (tables), global_minima_runs.csv (one row per run),
global_minima_width_needed.csv (per model, depth, seed), claims.md and
claims.csv (the paper's claims, rules, numbers and verdicts),
global_minima.json, the figures global_minima_*.png (also to
--figures_dir) and the same as TensorBoard images. `--docs_page=PATH` writes
the claims and tables between `<!-- global_minima:claims:begin/end -->` and
`<!-- global_minima:tables:begin/end -->` in PATH. `--report_only` trains
nothing.

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
from tfcapacity.studies import global_minima as gm  # noqa: E402
from tfcapacity.studies import sweep  # noqa: E402
from tfcapacity import rundir  # noqa: E402

common.define_study_flags()
flags.DEFINE_string("models", "mlp,fc_resnet", "Models of the grid.")
flags.DEFINE_string("depths", "1,2,4,8", "Depths (--depth) of the grid.")
flags.DEFINE_string("widths", "16,64,256,1024,4096",
                    "Widths of the grid, run from the narrowest.")
flags.DEFINE_string("seeds", "0,1,2", "Seeds of the grid.")
flags.DEFINE_string("drift_depths", "1",
                    "Depths at which every width runs (figure c).")
flags.DEFINE_integer("max_parameters", 20_000_000,
                     "Cells with more weights are not run.", lower_bound=1)
flags.DEFINE_bool("quick", False, "The 1-seed tier: the first of --seeds.")
flags.DEFINE_string("docs_page", None,
                    "Also write the claims and tables into this Markdown "
                    "page, between its global_minima:claims and "
                    "global_minima:tables begin/end markers.")
flags.DEFINE_string("figures_dir", None,
                    "Also write the PNGs here (e.g. docs/figures).")
flags.DEFINE_integer("shard_index", 0, "This machine's share of the "
                     "(model, depth, seed) series, in [0, --num_shards).",
                     lower_bound=0)
flags.DEFINE_integer("num_shards", 1, "Machines the series are split over; "
                     "with more than one, each trains its share and writes "
                     "no report (rerun without the shard flags to report).",
                     lower_bound=1)
FLAGS = flags.FLAGS
PROG = "global_minima_study"
DOCS_SECTIONS = ("global_minima:claims", "global_minima:tables")


def fail(message: str):
  cli.fail(PROG, message)


def make_plan(base) -> gm.Plan:
  """The plan from the tool's flags and the base flags.

  Raises:
    UserError: a bad list, a model outside the study, or base flags that
      are not Du et al.'s regime.
  """
  models = [m.strip() for m in FLAGS.models.split(",") if m.strip()]
  if not models or set(models) - set(gm.MODELS):
    raise UserError(f"--models must name some of {', '.join(gm.MODELS)}; "
                    f"got {FLAGS.models!r}")
  for flag, want in (("parametrization", "ntk"), ("loss", "squared"),
                     ("task", "random_sign"), ("learning_rate_from", "gram")):
    if getattr(base, flag) != want:
      raise UserError(f"the study runs Du et al.'s regime: the base flagfile "
                      f"needs --{flag}={want}, not {getattr(base, flag)}")
  depths = gm.parse_ints(FLAGS.depths, "depths")
  drift = gm.parse_ints(FLAGS.drift_depths, "drift_depths")
  if set(drift) - set(depths):
    raise UserError(f"--drift_depths={FLAGS.drift_depths} must be among "
                    f"--depths={FLAGS.depths}")
  seeds = gm.parse_ints(FLAGS.seeds, "seeds")
  from tfcapacity import data  # pylint: disable=g-import-not-at-top
  info = data.get(base.dataset, "train", base).info
  inputs = 1
  for d in info.input_shape:
    inputs *= d
  return gm.Plan(models=models, depths=depths,
                 widths=gm.parse_ints(FLAGS.widths, "widths"),
                 seeds=seeds[:1] if FLAGS.quick else seeds,
                 drift_depths=drift, max_parameters=FLAGS.max_parameters,
                 inputs=inputs)


def started_cells(plan: gm.Plan) -> list[sweep.Cell]:
  """The plan's cells that have a run directory."""
  return [gm.cell(k, w) for k in plan.keys() for w in plan.widths
          if plan.allowed(k, w) and os.path.isdir(os.path.join(
              FLAGS.study_dir, gm.cell(k, w).name))]


def fitted_so_far(plan: gm.Plan) -> dict[str, bool]:
  out = {}
  for c in started_cells(plan):
    fitted = gm.fitted(os.path.join(FLAGS.study_dir, c.name))
    if fitted is not None:
      out[c.name] = fitted
  return out


def main(argv):
  cli.no_arguments(PROG, argv)
  common.read_base_flagfile(PROG, "flags/global_minima_mnist1d_cpu.flags")
  started = time.time()
  try:
    base_args = [f"--flagfile={FLAGS.base_flagfile}"]
    from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
    base = config_lib.parse_args(base_args)
    with cli.quiet_native_stderr():
      plan = make_plan(base)
    all_cells = [gm.cell(k, w) for k in plan.keys() for w in plan.widths
                 if plan.allowed(k, w)]
    configs = sweep.validate(base_args, all_cells)
    sweep.shard([], FLAGS.shard_index, FLAGS.num_shards)
    if FLAGS.docs_page:
      common.check_markers(FLAGS.docs_page, DOCS_SECTIONS)
    grid = [("model", plan.models), ("depth", [str(d) for d in plan.depths]),
            ("width", [str(w) for w in plan.widths]),
            ("seed", [str(s) for s in plan.seeds])]
    if not FLAGS.report_only:
      sweep.prepare_sweep_dir(FLAGS.study_dir, base, grid)
  except UserError as e:
    fail(str(e))

  states = {}
  if not FLAGS.report_only:
    threads = common.threads_per_cell(FLAGS.threads_per_cell, FLAGS.parallel)
    common.exit_on_sigterm()
    logging.info("global-minima study: up to %d runs in %s", len(all_cells),
                 FLAGS.study_dir)
    mine = {gm.cell(k, w).name for i, k in enumerate(plan.keys())
            for w in plan.widths if i % FLAGS.num_shards == FLAGS.shard_index}
    while True:
      pending = gm.schedule(plan, fitted_so_far(plan))
      pending = [c for c in pending
                 if states.get(c.name) is None and c.name in mine]
      if not pending:
        break
      logging.info("next: %s", ", ".join(c.name for c in pending))
      states.update(sweep.run(
          FLAGS.study_dir, all_cells, pending, configs,
          parallel=FLAGS.parallel, threads_per_cell=threads,
          progress=FLAGS.progress))
  trained = time.time() - started
  if FLAGS.num_shards > 1:
    common.exit_if_unfinished(PROG, states, "runs of this shard")
    return

  try:
    with cli.quiet_native_stderr():
      runs, unfinished = gm.load_runs(FLAGS.study_dir, started_cells(plan))
      report = gm.summarize(plan, runs, unfinished, quick=FLAGS.quick)
      report.learning_rate_c = float(base.learning_rate)
      report.training_seconds = None if FLAGS.report_only else trained
      claims = gm.claims(report)
      from tfcapacity.studies import global_minima_figures  # pylint: disable=g-import-not-at-top
      pngs = global_minima_figures.figures(report)
    out_dir = FLAGS.output_dir or os.path.join(FLAGS.study_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    tables = gm.markdown(report)
    claims_md = gm.claims_markdown(claims, report)
    if FLAGS.docs_page:
      common.fill_markers(FLAGS.docs_page, dict(zip(DOCS_SECTIONS, (
          claims_md, tables))))
  except UserError as e:
    fail(str(e))
  rundir.atomic_write(os.path.join(out_dir, "global_minima.md"), tables)
  common.write_claims(out_dir, claims, claims_md)
  sweep.write_csv(os.path.join(out_dir, "global_minima_runs.csv"),
                  gm.run_rows(report))
  sweep.write_csv(os.path.join(out_dir, "global_minima_width_needed.csv"),
                  gm.needed_rows(report))
  rundir.write_json(os.path.join(out_dir, "global_minima.json"), {
      "tier": report.tier, "budget": report.budget,
      "learning_rate_c": report.learning_rate_c,
      "plan": {"models": plan.models, "depths": plan.depths,
               "widths": plan.widths, "seeds": plan.seeds,
               "drift_depths": plan.drift_depths,
               "max_parameters": plan.max_parameters},
      "not_run_over_cap": [c.name for c in plan.over_cap()],
      "runs": gm.run_rows(report), "width_needed": gm.needed_rows(report),
      "claims": [c.to_json() for c in claims],
      "unfinished": report.unfinished,
      "training_seconds_this_invocation": report.training_seconds,
      "seconds_this_invocation": time.time() - started})
  common.write_figures(out_dir, pngs, "global_minima", FLAGS.tensorboard)
  if FLAGS.figures_dir:
    os.makedirs(FLAGS.figures_dir, exist_ok=True)
    common.write_figures(FLAGS.figures_dir, pngs, "global_minima", False)
  print(tables)
  print(claims_md)
  verdicts = [c.verdict for c in claims]
  print(f"{len(runs)} runs finished, {len(unfinished)} unfinished; claims: "
        + ", ".join(f"{verdicts.count(v)} {v}"
                    for v in dict.fromkeys(verdicts))
        + f"; {time.time() - started:.0f} s. Written to {out_dir}")
  common.exit_if_unfinished(PROG, states, "runs")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROG, rewrite=common.base_flagfile_arg))
