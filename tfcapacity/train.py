"""Trains one model from flags: `python -m tfcapacity.train --flagfile=...`.

A thin absl main: parses and validates flags, builds the strategy first (as
MultiWorkerMirroredStrategy requires), and hands over to
`tfcapacity.measurements.train` (training with the measurements the flags
ask for). Rerunning the same command in the same --model_dir resumes from
the latest checkpoint.

Exit status: 0 completed, 2 bad input (one line on stderr), 3 diverged.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from tfcapacity import cli  # noqa: E402
from tfcapacity import config  # noqa: E402
from tfcapacity import data  # noqa: E402
from tfcapacity import rundir  # noqa: E402

PROG = "tfcapacity.train"
config.define_flags()
cli.require(
    "model_dir", "the run directory (flags.txt, checkpoints, results.json, "
    "TensorBoard events; rerunning the command there resumes); e.g. "
    "--model_dir=runs/quickstart")
FLAGS = flags.FLAGS


def main(argv):
  cli.no_arguments(PROG, argv)
  with cli.one_line_errors(PROG):
    cfg = config.from_flag_values(FLAGS)
    # The dataset's name and files, and the run directory's own checks,
    # need no TensorFlow: a mistyped name, a missing file or a damaged or
    # mismatched run is refused in a second.
    data.check_name(cfg.dataset, cfg)
    rundir.check_run(cfg.model_dir, cfg)
    with cli.quiet_native_stderr():  # TF's load-time and device-probe lines.
      from tfcapacity import distribute  # pylint: disable=g-import-not-at-top
      strategy = distribute.make_strategy(cfg.strategy, cfg.cpu_replicas)
      # After the strategy: no module may run a TF op before it exists.
      from tfcapacity import measurements  # pylint: disable=g-import-not-at-top
    cli.quiet_tensorflow_logs()
    results = measurements.train(cfg, strategy)
  if results["status"] == "diverged":
    cli.fail(PROG, f"the run diverged at step "
             f"{results.get('diverged_at_step')} (loss became NaN or Inf); "
             f"the last good checkpoint is kept in {cfg.model_dir}; lower "
             f"--learning_rate", status=3)
  final = results["final"]
  logging.info("Done: train top-1 error %.4f, test top-1 error %.4f, %s",
               final["train_top1_error"], final["test_top1_error"],
               cfg.model_dir)


def run():
  """Console-script entry point (tfcapacity-train)."""
  app.run(main, flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  run()
