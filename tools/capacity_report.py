"""The capacity study's report from a sweep directory.

  python tools/capacity_report.py --sweep_dir=runs/capacity_mnist1d \
      --metric=top1

For each width, the learning rate with the lowest final training error
(mean over seeds), its spread, the return on investment between consecutive
widths with seed-paired 95% t-intervals, and Figs. 1-3 of Dauphin & Bengio
(2013). Writes to --output_dir (default SWEEP_DIR/report): capacity.md and
capacity.csv (the table), capacity.json (best rates, ROI), claims.md and
claims.csv (the paper's claims, each with the rule that gives its verdict;
the same as tools/capacity_study.py, which also trains the grid and its
comparison), fig1/fig2/fig3 PNGs, and the figures as TensorBoard images.
The markdown table is also printed.

Exit status: 0 done, 2 bad input.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from tfcapacity import cli  # noqa: E402
from tfcapacity.errors import UserError  # noqa: E402
from tfcapacity.studies import capacity  # noqa: E402
from tfcapacity.studies import common  # noqa: E402
from tfcapacity import rundir  # noqa: E402

flags.DEFINE_string("sweep_dir", None, "The sweep's directory.")
flags.DEFINE_enum("metric", "top5", capacity.METRICS,
                  "Which training error picks the rate and is plotted.")
flags.DEFINE_string("x_flag", "width", "The capacity flag (x axis).")
flags.DEFINE_multi_string("where", [],
                          "flag=value: report only runs with this value.")
flags.DEFINE_string("output_dir", None,
                    "Where to write (default: SWEEP_DIR/report).")
flags.DEFINE_bool("tensorboard", True,
                  "Also write the figures as TensorBoard images.")
FLAGS = flags.FLAGS
PROG = "capacity_report"


def fail(message: str):
  cli.fail(PROG, message)


def main(argv):
  cli.no_arguments(PROG, argv)
  if not FLAGS.sweep_dir:
    fail("--sweep_dir is required: the directory of a finished sweep "
         "(tools/sweep.py --sweep_dir), whose runs are reported; e.g. "
         "--sweep_dir=runs/capacity")
  try:
    runs, unfinished = capacity.load_runs(FLAGS.sweep_dir)
    runs = capacity.filter_runs(runs, FLAGS.where)
    report = capacity.summarize(runs, x_flag=FLAGS.x_flag,
                                metric=FLAGS.metric, unfinished=unfinished)
  except UserError as e:
    fail(str(e))
  out_dir = FLAGS.output_dir or os.path.join(FLAGS.sweep_dir, "report")
  os.makedirs(out_dir, exist_ok=True)
  table = capacity.markdown(report)
  falls = capacity.roi_falls(report)
  counts = capacity.counts(report)
  study = capacity.Study(report.metric, report, {}, {}, report.unfinished,
                         counts["finished"] + counts["diverged"])
  claims = capacity.evaluate(study)
  common.write_claims(out_dir, claims, capacity.claims_markdown(claims, study))
  rundir.atomic_write(os.path.join(out_dir, "capacity.md"), table)
  capacity.write_csv(report, os.path.join(out_dir, "capacity.csv"))
  rundir.write_json(os.path.join(out_dir, "capacity.json"), {
      "metric": report.metric, "x_flag": report.x_flag,
      "rows": capacity.table_rows(report), "roi": report.roi,
      "roi_intervals": capacity.roi_intervals(report), "roi_falls": falls,
      "counts": dict(counts),
      "unfinished": report.unfinished})
  pngs = capacity.figures(report)
  common.write_figures(out_dir, pngs, "capacity", FLAGS.tensorboard)
  print(table)
  print(f"ROI: {falls['first']:.4g} points/unit at the first step, "
        f"{falls['last']:.4g} at the last; it fell at {falls['falling_steps']}"
        f" of {falls['steps']} steps. Written to {out_dir}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG))
