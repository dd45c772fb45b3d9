"""Trains one model from flags: `python -m tfcapacity.train --flagfile=...`.

A thin absl main: parses and validates flags, builds the strategy first (as
MultiWorkerMirroredStrategy requires), and hands over to
`tfcapacity.training.train`. Rerunning the same command in the same
--model_dir resumes from the latest checkpoint.

Exit status: 0 completed, 2 bad input (one line on stderr), 3 diverged.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from tfcapacity import config  # noqa: E402
from tfcapacity.errors import UserError  # noqa: E402

config.define_flags()
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def fail(message: str, status: int = 2):
  print(f"tfcapacity.train: error: {message}", file=sys.stderr)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; all options are --flags")
  cfg = config.from_flag_values(FLAGS)
  try:
    from tfcapacity import distribute  # pylint: disable=g-import-not-at-top
    strategy = distribute.make_strategy(cfg.strategy, cfg.cpu_replicas)
    from tfcapacity import training  # pylint: disable=g-import-not-at-top
    results = training.train(cfg, strategy)
  except UserError as e:
    fail(str(e))
  if results["status"] == "diverged":
    fail(f"the run diverged at step {results.get('diverged_at_step')} (loss "
         f"became NaN or Inf); the last good checkpoint is kept in "
         f"{cfg.model_dir}; lower --learning_rate", status=3)
  final = results["final"]
  logging.info("Done: train top-1 error %.4f, test top-1 error %.4f, %s",
               final["train_top1_error"], final["test_top1_error"],
               cfg.model_dir)


def parse_flags(argv):
  """absl's parser, but a bad flag is one line on stderr and status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(f"{e}; see --helpfull")


def run():
  """Console-script entry point (tfcapacity-train)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
