"""Reproduces the four studies with one command and writes one report.

  python tools/reproduce.py --out=runs/reproduce_quick --tier=quick
  python tools/reproduce.py --out=runs/reproduce_cpu --tier=cpu --parallel=2
  python tools/reproduce.py --out=runs/reproduce_paper --tier=paper --dry_run

Each study runs through its own tool (tools/capacity_study.py,
tools/confusion_study.py, tools/global_minima_study.py,
tools/maxibatch_study.py) in OUT/<study>/, from a base flagfile that the
tier derives from the study's flagfile (OUT/plans/<study>.flags; see
tfcapacity.studies.reproduce for the tiers). A tool's output goes to
OUT/logs/<study>.log; its invocations (wall time, exit status, runs
trained) to OUT/ledger/<study>.jsonl.

Then OUT/report.md, OUT/report.html (the figures inline, no network
assets) and OUT/verdicts.csv: for each paper its claims with the rules and
the numbers over seeds, a verdict (REPRODUCED / PARTLY / NOT REPRODUCED)
computed from the claims by the rule printed beside it, the figures and the
wall time. `--docs` also writes each study's claims and tables into its
docs page, its figures under docs/figures, and the report to
docs/reproduce/<tier>/.

Rerunning the same command redoes nothing finished: finished runs are
skipped, interrupted ones resume from their checkpoints. Across machines,
run `--shard_index=$i --num_shards=$n` on a shared --out (each shard trains
its share of every study's runs and writes no report), then the command
without the shard flags, which trains what is left and reports.

Tiers: quick (1 seed, reduced grids, about 15 minutes on 2 cores; a smoke
test of the pipeline), cpu (3 seeds, the studies' CPU grids, under 3 hours
on 2 cores), paper (the paper-scale flagfiles: SBOW features and CIFAR-10;
without --dry_run it refuses if the data are missing; with --dry_run it
validates every run and prints the plan and an estimate of GPU-hours).

Exit status: 0 every study finished, 1 some runs did not finish (rerun to
resume them), 2 bad input.
"""

import os
import shlex
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from tfcapacity import cli  # noqa: E402
from tfcapacity.errors import UserError  # noqa: E402
from tfcapacity.studies import common  # noqa: E402
from tfcapacity.studies import reproduce as lib  # noqa: E402
from tfcapacity.studies import sweep  # noqa: E402
from tfcapacity import rundir  # noqa: E402

flags.DEFINE_string("out", None, "Directory of the reproduction: one "
                    "subdirectory per study, the report at its top.")
flags.DEFINE_enum("tier", "quick", lib.TIERS,
                  "quick: 1 seed, reduced grids (smoke test); cpu: 3 seeds, "
                  "the CPU grids; paper: the paper-scale flagfiles.")
flags.DEFINE_list("only", [], "Studies to run and report (default: all "
                  f"of the tier): {', '.join(lib.STUDIES)}.")
flags.DEFINE_string("plan", None,
                    "A JSON plan that replaces the tier's (see "
                    "tfcapacity.studies.reproduce.read_plan_file).")
flags.DEFINE_integer("parallel", 2, "Training processes at once.",
                     lower_bound=1)
flags.DEFINE_integer("shard_index", 0,
                     "This machine's shard, in [0, --num_shards).",
                     lower_bound=0)
flags.DEFINE_integer("num_shards", 1, "Machines the runs are split over.",
                     lower_bound=1)
flags.DEFINE_bool("dry_run", False,
                  "Validate every run of the plan and print it (paper tier: "
                  "with an estimate of GPU-hours); run nothing.")
flags.DEFINE_float("gpu_tflops", 10.0,
                   "Sustained float32 TFLOP/s of one GPU, for the paper "
                   "tier's estimate (10: about two thirds of a V100's "
                   "peak).", lower_bound=0.001)
flags.DEFINE_bool("docs", False,
                  "Also write the studies' docs pages (between their "
                  "markers), their figures under docs/figures, and the "
                  "report under docs/reproduce/<tier>/.")
flags.DEFINE_integer("progress_seconds", 60,
                     "Print the count of finished runs this often while a "
                     "study runs.", lower_bound=1)
FLAGS = flags.FLAGS
PROG = "reproduce"


def fail(message: str):
  cli.fail(PROG, message)


def say(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_plan() -> lib.Plan:
  plan = (lib.read_plan_file(FLAGS.plan, FLAGS.tier) if FLAGS.plan
          else lib.tier_plan(FLAGS.tier))
  plan = lib.select(plan, FLAGS.only)
  if not plan.studies:
    raise UserError(f"the plan of the {plan.tier} tier has no studies")
  for study in plan.studies:
    if not os.path.exists(study.tool_path()):
      raise UserError(f"{study.name}'s tool {study.tool} is missing")
    if not os.access(study.flagfile_path(), os.R_OK):
      raise UserError(f"cannot read {study.name}'s flagfile "
                      f"{study.flagfile}")
  return plan


def check_out_dir(path: str) -> None:
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--out={path} is a file; give a directory")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent if not os.path.isdir(path) else path, os.W_OK):
    raise UserError(f"--out={path} is not writable")


def dry_run(plan: lib.Plan) -> None:
  """Validates every run of the plan and prints it; trains nothing. With
  --docs, the paper tier's plan also goes to docs/reproduce/paper/plan.md."""
  out = []
  for study in plan.studies:
    study_dir = os.path.join(FLAGS.out, study.name)
    if plan.tier != "paper":
      out.append(f"{study.name}: {study.tool} --flagfile="
                 f"{os.path.join(FLAGS.out, lib.PLANS_DIR, study.name)}.flags "
                 f"{' '.join(study.args)} (the tool validates its runs when "
                 f"it starts)")
      continue
    with cli.quiet_native_stderr():
      cells = lib.paper_cells(study, study_dir)
      cache = {}
      estimates = [lib.estimate(study, c.name, cfg, cache)
                   for c, cfg in cells]
      missing = lib.data_missing(cells[0][1])
    out += [f"\n## {study.title}\n", f"{len(cells)} runs of "
            f"`{study.flagfile}`, all valid. Data: {missing or 'present'}."
            "\n"]
    out += lib.estimate_table(estimates, FLAGS.gpu_tflops)
  if plan.tier == "paper":
    out += [f"\n{name}: {why}." for name, why in lib.NO_PAPER_PLAN.items()
            if not FLAGS.only]
    out += ["\n" + lib.ESTIMATE_NOTE + f" Here --gpu_tflops="
            f"{FLAGS.gpu_tflops:g}."]
  text = "\n".join(out).strip() + "\n"
  print(text)
  if FLAGS.docs and plan.tier == "paper":
    path = os.path.join(lib.ROOT, "docs", "reproduce", "paper", "plan.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    command = shlex.join(["python", "tools/reproduce.py", *sys.argv[1:]])
    rundir.atomic_write(path, f"# The paper tier's plan\n\nWritten by `"
                        f"{command}`.\n\n{text}")
    print(f"written to {path}")


def run_study(study: lib.Study, flagfile: str) -> int:
  """Runs the study's tool to its end; records the invocation; its exit
  status."""
  study_dir = os.path.join(FLAGS.out, study.name)
  cmd = lib.tool_command(sys.executable, study, FLAGS.out, flagfile,
                         parallel=FLAGS.parallel,
                         shard_index=FLAGS.shard_index,
                         num_shards=FLAGS.num_shards, docs=FLAGS.docs)
  os.makedirs(os.path.join(FLAGS.out, lib.LOGS_DIR), exist_ok=True)
  log_path = os.path.join(FLAGS.out, lib.LOGS_DIR, f"{study.name}.log")
  before = lib.run_fingerprints(study_dir)
  say(f"{study.name}: {len(before)} runs finished before; running "
      f"{study.tool} (log: {log_path})")
  started = time.time()
  code = None
  with open(log_path, "a") as log:
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
              f"{shlex.join(cmd)}\n")
    log.flush()
    process = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        preexec_fn=sweep.die_with_parent(os.getpid()))
    try:
      last = time.time()
      while code is None:
        try:
          code = process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
          if time.time() - last >= FLAGS.progress_seconds:
            last = time.time()
            say(f"{study.name}: {len(lib.finished_runs(study_dir))} runs "
                f"finished, {time.time() - started:.0f} s")
    finally:
      if code is None:  # Interrupted: the tool stops its runs and exits.
        process.terminate()
        try:
          process.wait(timeout=60)
        except subprocess.TimeoutExpired:
          process.kill()
      after = lib.run_fingerprints(study_dir)
      trained = sum(1 for k, v in after.items() if before.get(k) != v)
      lib.record_invocation(FLAGS.out, study.name, {
          "tier": FLAGS.tier, "started": started,
          "seconds": time.time() - started,
          "exit_code": code if code is not None else "interrupted",
          "shard": [FLAGS.shard_index, FLAGS.num_shards],
          "runs_trained": trained, "runs_finished": len(after),
          "command": cmd})
  seconds = time.time() - started
  if code == 0:
    say(f"{study.name}: done in {seconds:.0f} s ({trained} runs trained)")
  else:
    say(f"{study.name}: exit {code} after {seconds:.0f} s: "
        f"{sweep.last_error_line(log_path) or 'see ' + log_path}")
  return code


def main(argv):
  cli.no_arguments(PROG, argv)
  started = time.time()
  if not FLAGS.out:
    fail("--out is required: the directory that holds the studies' runs "
         "and the report")
  try:
    plan = load_plan()
    check_out_dir(FLAGS.out)
    sweep.shard([], FLAGS.shard_index, FLAGS.num_shards)
    if plan.tier == "paper" and not FLAGS.dry_run:
      for study in plan.studies:
        cells = lib.paper_cells(study, os.path.join(FLAGS.out, study.name))
        missing = lib.data_missing(cells[0][1])
        if missing:
          raise UserError(f"the paper tier needs the real data: {missing}; "
                          f"--dry_run prints the plan without them")
  except UserError as e:
    fail(str(e))
  if FLAGS.dry_run:
    try:
      dry_run(plan)
    except UserError as e:
      fail(str(e))
    return
  common.exit_on_sigterm()
  os.makedirs(FLAGS.out, exist_ok=True)
  codes = {}
  for study in plan.studies:
    try:
      flagfile = lib.write_plan_flagfile(FLAGS.out, study)
    except UserError as e:
      fail(str(e))
    codes[study.name] = run_study(study, flagfile)
    if codes[study.name] == 2:
      fail(f"{study.name}'s tool refused its input; see "
           f"{os.path.join(FLAGS.out, lib.LOGS_DIR, study.name)}.log")
  if FLAGS.num_shards > 1:
    say(f"shard {FLAGS.shard_index} of {FLAGS.num_shards} done; run the "
        f"command without the shard flags to finish and report")
  else:
    sections = [lib.section(FLAGS.out, s, codes.get(s.name))
                for s in plan.studies]
    command = shlex.join(["python", "tools/reproduce.py", *sys.argv[1:]])
    docs_dir = (os.path.join(lib.ROOT, "docs", "reproduce", plan.tier)
                if FLAGS.docs else None)
    md_path, html_path = lib.write_report(
        FLAGS.out, plan, sections, command, time.time() - started, docs_dir)
    print("\n".join(lib.summary_table(sections, plan.quick)))
    say(f"report: {md_path} and {html_path}")
  if any(c != 0 for c in codes.values()):
    print(f"{PROG}: some studies did not finish "
          f"({', '.join(n for n, c in codes.items() if c != 0)}); rerun the "
          f"same command to resume them", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG))
