"""Runs a grid of tfcapacity training runs: one model_dir per cell.

  python tools/sweep.py --flagfile=flags/capacity_mnist1d_cpu.flags \
      --grid='width=16,64,256;learning_rate=0.1,0.01;seed=0,1' \
      --sweep_dir=runs/capacity --parallel=2

`--flagfile` is the base flagfile of the training runs (not a flagfile of
this tool's own flags). Without `--grid`, the grid is read from the base
flagfile's `# sweep.grid: flag=v1,v2` comment lines. Rerunning the same
command skips finished cells and resumes interrupted ones; a job array runs
one sweep across machines with `--shard_index=$i --num_shards=$n` on a
shared --sweep_dir. `sweep.csv` in --sweep_dir has one row per cell, and
`tensorboard --logdir=SWEEP_DIR` shows the sweep in the HParams dashboard.

A cell that another sweep on the same --sweep_dir is running is waited for
(and run here if that sweep stops before it finishes), so two sweeps started
on one directory both end with every cell's state. A damaged sweep.json,
base.flags, or a cell's sweep_attempts.json or results.json stops the sweep
before it writes anything, with one line naming the file and the fix.

Exit status: 0 every cell of this shard finished (completed or diverged),
1 some cell did not (it failed, or its records were damaged while the sweep
ran), 2 bad input (one line on stderr).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from tfcapacity import cli  # noqa: E402
from tfcapacity.errors import UserError  # noqa: E402
from tfcapacity.studies import common  # noqa: E402
from tfcapacity.studies import sweep  # noqa: E402

flags.DEFINE_string("base_flagfile", None,
                    "The training runs' base flagfile (also --flagfile).")
flags.DEFINE_string("grid", None,
                    "flag=v1,v2;flag2=v1,v2 ... (default: the base "
                    "flagfile's '# sweep.grid:' lines).")
flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's cells.")
flags.DEFINE_integer("parallel", 1, "Training processes at once.",
                     lower_bound=1)
flags.DEFINE_integer(
    "threads_per_cell", None,
    "TensorFlow threads per training process (default: the CPU count "
    "divided by --parallel when --parallel > 1, else TF's default).",
    lower_bound=1)
flags.DEFINE_integer("shard_index", 0, "This job's shard, in [0, "
                     "--num_shards).")
flags.DEFINE_integer("num_shards", 1, "Shards the grid is split into.",
                     lower_bound=1)
flags.DEFINE_bool("dry_run", False,
                  "List the cells of this shard and their states; run "
                  "nothing.")
flags.DEFINE_bool("progress", None,
                  "Progress bar over cells (default: on a terminal).")
FLAGS = flags.FLAGS
PROG = "sweep"


def fail(message: str):
  cli.fail(PROG, message)



def main(argv):
  cli.no_arguments(PROG, argv)
  if not FLAGS.sweep_dir:
    fail("--sweep_dir is required: the directory that holds the cells")
  if not FLAGS.base_flagfile:
    fail("--flagfile is required: the base flagfile of the training runs")
  try:
    with open(FLAGS.base_flagfile) as f:
      base_text = f.read()
  except OSError as e:
    fail(f"cannot read --flagfile={FLAGS.base_flagfile}: {e.strerror}")
  except ValueError as e:  # Not text.
    fail(f"cannot read --flagfile={FLAGS.base_flagfile}: not a text file "
         f"({e.__class__.__name__})")
  try:
    spec = FLAGS.grid or sweep.grid_from_flagfile(base_text)
    if spec is None:
      raise UserError(f"no --grid given and {FLAGS.base_flagfile} has no "
                      f"'# sweep.grid: flag=v1,v2' lines")
    grid = sweep.parse_grid(spec)
    all_cells = sweep.cells(grid)
    base_args = [f"--flagfile={FLAGS.base_flagfile}"]
    configs = sweep.validate(base_args, all_cells)
    mine = sweep.shard(all_cells, FLAGS.shard_index, FLAGS.num_shards)
    from tfcapacity import config as config_lib  # pylint: disable=g-import-not-at-top
    base = config_lib.parse_args(base_args)
    if FLAGS.dry_run:
      sweep.check_sweep_dir(FLAGS.sweep_dir, [c.name for c in all_cells])
      states = [sweep.cell_state(os.path.join(FLAGS.sweep_dir, cell.name))
                for cell in mine]  # All read before any line is printed.
      for cell, state in zip(mine, states):
        print(f"{cell.index:4d}  {state:11s}  {cell.name}")
      return
    sweep.prepare_sweep_dir(FLAGS.sweep_dir, base, grid, all_cells)
  except UserError as e:
    fail(str(e))
  threads = common.threads_per_cell(FLAGS.threads_per_cell, FLAGS.parallel)
  logging.info("sweep of %d cells (%d in shard %d of %d) in %s",
               len(all_cells), len(mine), FLAGS.shard_index,
               FLAGS.num_shards, FLAGS.sweep_dir)
  common.exit_on_sigterm()
  try:
    states = sweep.run(FLAGS.sweep_dir, all_cells, mine, configs,
                       parallel=FLAGS.parallel,
                       threads_per_cell=threads,
                       progress=FLAGS.progress)
  finally:
    # After the cells: it imports TensorFlow, which the runner's forks avoid.
    # Rewritten each time: its metrics are those the cells measured.
    with cli.quiet_native_stderr():
      sweep.write_hparams_config(FLAGS.sweep_dir, grid, configs)
  counts = {}
  for state in states.values():
    counts[state] = counts.get(state, 0) + 1
  summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
  logging.info("sweep done: %s; table in %s", summary,
               os.path.join(FLAGS.sweep_dir, sweep.CSV_FILE))
  unfinished = [n for n, s in states.items() if s not in sweep.FINISHED]
  if unfinished:
    print(f"sweep: {len(unfinished)} of {len(states)} cells did not finish "
          f"({summary}); rerun the same command to retry them",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      PROG, rewrite=common.base_flagfile_arg))
