"""One command for the four studies: tiers, plans, verdicts, the report.

`tools/reproduce.py` runs each study's own tool (tools/capacity_study.py,
tools/confusion_study.py, tools/global_minima_study.py,
tools/maxibatch_study.py) as a subprocess on a *derived* base flagfile, one
study directory per study under the output directory, and then gathers what
the tools wrote (claims.csv, their tables, their PNGs) into one report.

A tier is a plan: for each study, the tool, its base flagfile, and how the
tier changes it:
  * `comments`: the flagfile's grid comment lines (`# sweep.grid:`,
    `# confusion.<part>:`, `# maxibatch.variant:`, `# capacity.compare:`)
    with a prefix in this map are replaced by the given lines; a key ending
    in `.*` replaces every prefix that starts with what precedes it, and
    its lines are `PART: grid` (giving `# X.PART: grid`);
  * `first_seed`: in every grid comment line that is kept, `seed=a,b,...`
    becomes `seed=a`;
  * `flags`: flag lines appended to the flagfile (the last value of a flag
    wins, so they override the file's);
  * `args`: the tool's own flags (e.g. `--quick`, `--depths=1,2`).
The derived flagfile is DIR/plans/<study>.flags. The tools make the runs
resumable: a rerun of the same command skips finished runs and resumes
interrupted ones from their checkpoints, and the sweep library's per-run
locks keep two machines from training one run twice.

The `quick` tier runs every study at one seed on reduced grids (a smoke
test of the pipeline; its verdicts say so), `cpu` the studies' own CPU
flagfiles at three seeds, and `paper` the paper-scale flagfiles, which need
the real data and GPUs (`paper_cells` validates every run and `estimate`
counts its FLOPs, so a dry run prints the GPU-hours without running
anything).

The paper verdict of a study is computed from its claims' verdicts by
`paper_verdict`, whose rule is `PAPER_RULE`.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
import os
import re
import time
from typing import Iterable, Mapping, Sequence

from tfcapacity.errors import UserError
from tfcapacity import rundir
from tfcapacity.studies import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
STUDIES = ("capacity", "confusion", "random_labels", "maxibatch")
TIERS = ("quick", "cpu", "paper")
REPRODUCED, PARTLY, NOT_REPRODUCED = "REPRODUCED", "PARTLY", "NOT REPRODUCED"
NOT_MEASURED = "NOT MEASURED"
PAPER_RULE = (
    "REPRODUCED: every claim that was checked (verdict agrees, disagrees or "
    "mixed) agrees, and no design check (claims named check_*) failed. "
    "NOT REPRODUCED: no claim agrees. PARTLY: anything between, including "
    "all claims agreeing while a design check failed. Claims marked "
    "'measured' or 'not measured' do not count.")
QUICK_LABEL = ("smoke test: one seed on reduced grids and short runs; the "
               "verdicts show that the pipeline works, not whether the "
               "paper holds")
GRID_COMMENT = re.compile(r"^#\s*([A-Za-z_][\w]*\.[\w]+):\s*(.*)$")
SEED_AXIS = re.compile(r"(\bseed=)([^;\s]+)")
LEDGER_DIR = "ledger"
PLANS_DIR = "plans"
LOGS_DIR = "logs"
FIGURES_DIR = "figures"
VERDICT_COLUMNS = ("study", "paper", "tier", "verdict", "why", "runs",
                   "runs_trained_by_reproduce", "wall_seconds",
                   "training_seconds")


@dataclasses.dataclass(frozen=True)
class Study:
  """One study of a tier's plan."""
  name: str
  title: str
  tool: str  # relative to the repository's root
  flagfile: str  # relative to the repository's root, or absolute
  comments: Mapping[str, tuple[str, ...]] = dataclasses.field(
      default_factory=dict)
  first_seed: bool = False
  flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
  args: tuple[str, ...] = ()
  docs_page: str | None = None
  # Why `--docs` leaves the docs page alone in this tier (None: it fills it).
  docs_kept: str | None = None
  # Paper tier only: what the GPU-hour estimate needs without the data.
  input_shape: tuple[int, ...] | None = None
  classes: int | None = None
  train_examples: int | None = None
  test_examples: int | None = None

  def flagfile_path(self) -> str:
    return (self.flagfile if os.path.isabs(self.flagfile)
            else os.path.join(ROOT, self.flagfile))

  def tool_path(self) -> str:
    return os.path.join(ROOT, self.tool)


@dataclasses.dataclass(frozen=True)
class Plan:
  tier: str
  studies: tuple[Study, ...]

  @property
  def quick(self) -> bool:
    return self.tier == "quick"


TITLES = {
    "capacity": "Dauphin & Bengio (2013), Big neural networks waste capacity",
    "confusion": ("Sankararaman et al., The impact of neural network "
                  "overparameterization on gradient confusion and SGD"),
    "random_labels": ("Du et al. (2019), Gradient descent finds global "
                      "minima of deep neural networks"),
    "maxibatch": "Towards mini-error with maxi-batch SGD",
}
TOOLS = {
    "capacity": "tools/capacity_study.py",
    "confusion": "tools/confusion_study.py",
    "random_labels": "tools/global_minima_study.py",
    "maxibatch": "tools/maxibatch_study.py",
}
CPU_FLAGFILES = {
    "capacity": "flags/capacity_mnist1d_cpu.flags",
    "confusion": "flags/confusion_mnist1d_cpu.flags",
    "random_labels": "flags/global_minima_mnist1d_cpu.flags",
    "maxibatch": "flags/maxibatch_resnet_digits_cpu.flags",
}
DOCS_PAGES = {
    "capacity": "docs/capacity.md",
    "confusion": "docs/confusion_study.md",
    "random_labels": "docs/random_labels.md",
    "maxibatch": "docs/maxibatch.md",
}
QUICK_CONFUSION_PARTS = (
    "init_width: kernel_init=glorot_normal,he_normal; width=16,64,256,1024; "
    "seed=0",
    "init_depth: kernel_init=glorot_normal,he_normal; depth=1,4,16,32; "
    "seed=0",
    "train_width: kernel_init=he_normal; width=16,256; seed=0",
    "train_depth: kernel_init=he_normal; depth=1,16; "
    "learning_rate=0.0125,0.05,0.2; seed=0",
    "init_linear: activation=linear; kernel_init=orthogonal,glorot_normal; "
    "depth=1,4,16,32; seed=0",
    "train_linear_scaled: activation=linear; "
    "kernel_init=orthogonal,glorot_normal; depth=1,32; lr_x_depth=0.08; "
    "seed=0",
    "init_norm_skip: kernel_init=he_normal; model=mlp,fc_resnet; "
    "normalization=none,batch; depth=2,32; seed=0",
    "train_norm_skip: kernel_init=he_normal; model=mlp,fc_resnet; "
    "normalization=none,batch; depth=32; lr_x_depth=0.4; seed=0")
QUICK_VARIANTS = (  # A variant with a reference run, and linearisation.
    "m1400_noise_empirical seed=0 batch_size=1400 learning_rate=0.1 "
    "grad_noise=empirical grad_noise_reference=@batch_size=50,"
    "learning_rate=0.1",
    "m1400_linearize_0.05 seed=0 batch_size=1400 learning_rate=0.1 "
    "activation=leaky_relu leaky_slope=0 linearize_every_steps=1 "
    "linearize_examples=100 delta_minus=0.1 delta_plus=0.05")
CPU_ARGS = {"random_labels": ("--widths=16,64,256,1024",)}
CPU_DOCS_KEPT = {"random_labels": (
    "its page shows the study's full grid, to width 4096 "
    "(tools/global_minima_study.py's defaults), which this tier cuts at "
    "1024 to stay under 3 hours")}
# Why a study has no paper-scale plan (the paper tier lists it as such).
NO_PAPER_PLAN = {
    "confusion": (
        "no paper-scale plan: papers/001 holds the abstract only, which "
        "names no dataset, network size or schedule to scale up to"),
    "random_labels": (
        "no paper-scale plan: the paper's results are theorems about the "
        "regime the cpu tier runs (n unit-norm inputs, NTK parametrisation, "
        "full-batch GD); its size is set by n, not by a GPU"),
}


def _study(name: str, **fields) -> Study:
  return Study(name=name, title=TITLES[name], tool=TOOLS[name],
               flagfile=fields.pop("flagfile", CPU_FLAGFILES[name]),
               docs_page=fields.pop("docs_page", DOCS_PAGES[name]), **fields)


def tier_plan(tier: str) -> Plan:
  """The built-in plan of `tier`.

  Raises:
    UserError: an unknown tier.
  """
  if tier == "cpu":
    # Width 4096 (the global-minima tool's default grid ends there) would
    # take 61% of that study's run time: 58 min of the 3 hours.
    return Plan("cpu", tuple(
        _study(n, args=CPU_ARGS.get(n, ()), docs_kept=CPU_DOCS_KEPT.get(n))
        for n in STUDIES))
  if tier == "quick":
    return Plan("quick", (
        _study("capacity", first_seed=True,
               comments={"sweep.grid": ("width=16,64,256",
                                        "learning_rate=2,0.5,0.1",
                                        "seed=0")},
               flags={"epochs": "20", "mnist1d_examples": "5000"}),
        _study("confusion", first_seed=True,
               comments={"confusion.*": QUICK_CONFUSION_PARTS},
               flags={"epochs": "3"}),
        _study("random_labels", args=(
            "--quick", "--depths=1,2", "--widths=16,64", "--drift_depths=1")),
        _study("maxibatch", first_seed=True, args=(
            "--quick", "--interpolation_points=9", "--plane_points=5",
            "--interpolation_examples=400"),
               comments={"sweep.grid": ("batch_size=50,1400",
                                        "learning_rate=0.1", "seed=0"),
                         "maxibatch.variant": QUICK_VARIANTS},
               flags={"epochs": "6", "lr_drop_epochs": "3",
                      "curvature_every_epochs": "3",
                      "curvature_around_drop": "0", "export": "false"}),
    ))
  if tier == "paper":
    return Plan("paper", (
        _study("capacity", flagfile="flags/capacity_imagenet_sbow.flags",
               input_shape=(1000,), classes=1000, train_examples=1_261_406,
               test_examples=50_000),
        _study("maxibatch", flagfile="flags/maxibatch_resnet32_cifar10.flags",
               input_shape=(32, 32, 3), classes=10, train_examples=50_000,
               test_examples=10_000),
    ))
  raise UserError(f"--tier={tier!r} is not one of {', '.join(TIERS)}")


def read_plan_file(path: str, tier: str) -> Plan:
  """A plan from a JSON file: {"tier": ..., "studies": {NAME: {...}}}.

  Each study's fields (flagfile, comments, first_seed, flags, args,
  docs_page) default to the built-in tier's study of that name (or to the
  cpu tier's when the tier lacks it); the file's studies, in its order,
  replace the tier's list.

  Raises:
    UserError: an unreadable or malformed file, an unknown study or field.
  """
  try:
    with open(path) as f:
      spec = json.load(f)
  except OSError as e:
    raise UserError(f"cannot read --plan={path}: {e.strerror}") from None
  except ValueError as e:
    raise UserError(f"--plan={path} is not JSON ({e}); fix or remove "
                    f"it") from None
  if not isinstance(spec, dict) or not isinstance(spec.get("studies"), dict):
    raise UserError(f"--plan={path} must hold an object with a \"studies\" "
                    f"object keyed by study name")
  tier = spec.get("tier", tier)
  base = {s.name: s for s in tier_plan("cpu").studies}
  if tier in TIERS:
    base.update({s.name: s for s in tier_plan(tier).studies})
  allowed = {"flagfile", "comments", "first_seed", "flags", "args",
             "docs_page"}
  studies = []
  for name, fields in spec["studies"].items():
    if name not in STUDIES:
      raise UserError(f"--plan={path}: unknown study {name!r}; studies are "
                      f"{', '.join(STUDIES)}")
    if not isinstance(fields, dict) or set(fields) - allowed:
      raise UserError(f"--plan={path}: study {name!r} may set only "
                      f"{', '.join(sorted(allowed))}")
    fields = dict(fields)
    if "comments" in fields:
      fields["comments"] = {k: tuple(v) for k, v in fields["comments"].items()}
    if "flags" in fields:
      fields["flags"] = {k: str(v) for k, v in fields["flags"].items()}
    if "args" in fields:
      fields["args"] = tuple(fields["args"])
    studies.append(dataclasses.replace(base[name], **fields))
  return Plan(tier, tuple(studies))


def select(plan: Plan, only: Sequence[str]) -> Plan:
  """The plan's studies named in `only` (all when empty).

  Raises:
    UserError: a name that is not a study, or one the plan lacks.
  """
  only = [o.strip() for o in only if o.strip()]
  unknown = sorted(set(only) - set(STUDIES))
  if unknown:
    raise UserError(f"--only names unknown studies {', '.join(unknown)}; "
                    f"choose from {', '.join(STUDIES)}")
  if not only:
    return plan
  missing = [o for o in only if o not in {s.name for s in plan.studies}]
  if missing:
    raise UserError(f"the {plan.tier} tier has no plan for "
                    f"{', '.join(missing)}: "
                    + "; ".join(NO_PAPER_PLAN.get(m, "") for m in missing))
  return Plan(plan.tier, tuple(s for s in plan.studies if s.name in only))


# --- Derived flagfiles --------------------------------------------------------


def _replaced(prefix: str, keys: Iterable[str]) -> bool:
  for key in keys:
    if key == prefix or (key.endswith(".*") and prefix.startswith(key[:-1])):
      return True
  return False


def derive_flagfile(text: str, study: Study) -> str:
  """The study's base flagfile as the tier changes it (module docstring)."""
  out = []
  for line in text.splitlines():
    m = GRID_COMMENT.match(line)
    if m and _replaced(m.group(1), study.comments):
      continue
    if m and study.first_seed:
      line = SEED_AXIS.sub(lambda s: s.group(1) + s.group(2).split(",")[0],
                           line)
    out.append(line)
  for prefix, lines in study.comments.items():
    for value in lines:  # Under `X.*` each value is `PART: grid`.
      out.append(f"# {prefix[:-1]}{value}" if prefix.endswith(".*")
                 else f"# {prefix}: {value}")
  if study.flags:
    out.append("# Set by the tier's plan (tools/reproduce.py):")
    out.extend(f"--{k}={v}" for k, v in study.flags.items())
  return "\n".join(out) + "\n"


def write_plan_flagfile(out_dir: str, study: Study) -> str:
  """DIR/plans/<study>.flags (rewritten only when it changes); its path.

  Raises:
    UserError: the study's flagfile cannot be read.
  """
  try:
    with open(study.flagfile_path()) as f:
      text = f.read()
  except OSError as e:
    raise UserError(f"cannot read {study.name}'s flagfile "
                    f"{study.flagfile}: {e.strerror}") from None
  path = os.path.join(out_dir, PLANS_DIR, f"{study.name}.flags")
  derived = derive_flagfile(text, study)
  old = None
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
  if old != derived:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.atomic_write(path, derived)
  return path


def tool_command(python: str, study: Study, out_dir: str, flagfile: str, *,
                 parallel: int, shard_index: int = 0, num_shards: int = 1,
                 docs: bool = False) -> list[str]:
  """The study tool's command line."""
  cmd = [python, study.tool_path(), f"--flagfile={flagfile}",
         f"--study_dir={os.path.join(out_dir, study.name)}",
         f"--parallel={parallel}", "--noprogress", *study.args]
  if num_shards > 1:
    cmd += [f"--shard_index={shard_index}", f"--num_shards={num_shards}"]
  if docs and study.docs_page and not study.docs_kept:
    cmd += [f"--docs_page={os.path.join(ROOT, study.docs_page)}",
            f"--figures_dir={docs_figures_dir(study.name)}"]
  return cmd


# --- What the study directories hold ------------------------------------------


def finished_runs(study_dir: str) -> dict[str, dict]:
  """Every finished run under `study_dir` (any depth): results.json by
  run directory, for runs whose status is completed or diverged."""
  out = {}
  if not os.path.isdir(study_dir):
    return out
  for path, dirs, files in os.walk(study_dir):
    dirs[:] = [d for d in dirs if d not in ("checkpoints", "saved_model",
                                            "report", "train", "eval")]
    if rundir.RESULTS_FILE in files:
      try:
        results = rundir.read_json(os.path.join(path, rundir.RESULTS_FILE))
      except (OSError, ValueError):
        continue
      if results.get("status") in ("completed", "diverged"):
        out[os.path.relpath(path, study_dir)] = results
  return out


def run_fingerprints(study_dir: str) -> dict[str, tuple[int, float]]:
  """(size, mtime) of each finished run's results.json: a rerun that trains
  nothing leaves them all unchanged."""
  out = {}
  for rel in finished_runs(study_dir):
    st = os.stat(os.path.join(study_dir, rel, rundir.RESULTS_FILE))
    out[rel] = (st.st_size, st.st_mtime)
  return out


def training_seconds(runs: Mapping[str, dict]) -> float:
  """The runs' own training wall time, summed (results.json)."""
  total = 0.0
  for results in runs.values():
    seconds = (results.get("final") or {}).get("wall_seconds")
    if isinstance(seconds, (int, float)) and math.isfinite(seconds):
      total += seconds
  return total


def record_invocation(out_dir: str, study: str, entry: dict) -> None:
  """Appends one line to DIR/ledger/<study>.jsonl (one write: shards on a
  shared directory do not interleave their lines)."""
  os.makedirs(os.path.join(out_dir, LEDGER_DIR), exist_ok=True)
  line = json.dumps(entry, sort_keys=True) + "\n"
  fd = os.open(os.path.join(out_dir, LEDGER_DIR, f"{study}.jsonl"),
               os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, line.encode())
  finally:
    os.close(fd)


def read_ledger(out_dir: str, study: str) -> list[dict]:
  path = os.path.join(out_dir, LEDGER_DIR, f"{study}.jsonl")
  if not os.path.exists(path):
    return []
  entries = []
  with open(path) as f:
    for line in f:
      try:
        entries.append(json.loads(line))
      except ValueError:
        continue  # A line cut by a crash: the others still count.
  return entries


def read_claims(path: str) -> list[common.Claim]:
  """A study's claims.csv.

  Raises:
    UserError: unreadable, or not the columns of common.CLAIM_COLUMNS.
  """
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from None
  claims = []
  for row in rows:
    if set(common.CLAIM_COLUMNS) - set(row):
      raise UserError(f"{path} lacks the columns of a claims file "
                      f"({', '.join(common.CLAIM_COLUMNS)}); rerun its study")
    seeds = row["seeds"]
    claims.append(common.Claim(
        id=row["id"], claim=row["claim"], paper=row["paper"],
        rule=row["rule"], measured=row["measured"],
        seeds=int(seeds) if seeds.strip().isdigit() else seeds,
        verdict=row["verdict"]))
  return claims


# --- Verdicts -------------------------------------------------------------------


def is_check(claim: common.Claim) -> bool:
  return claim.id.startswith("check_")


def paper_verdict(claims: Sequence[common.Claim]) -> tuple[str, str]:
  """The paper's verdict from its claims (PAPER_RULE) and why."""
  judged = [c for c in claims if not is_check(c) and c.verdict in (
      common.AGREES, common.DISAGREES, common.MIXED)]
  failed = [c for c in claims if is_check(c) and c.verdict in (
      common.DISAGREES, common.MIXED)]
  if not judged:
    return NOT_MEASURED, "no claim could be checked"
  agree = sum(c.verdict == common.AGREES for c in judged)
  counts = ", ".join(f"{n} {v}" for v, n in (
      (v, sum(c.verdict == v for c in judged)) for v in (
          common.AGREES, common.MIXED, common.DISAGREES)) if n)
  why = f"{counts} of {len(judged)} claims checked"
  if failed:
    why += "; failed design checks: " + ", ".join(c.id for c in failed)
  if agree == 0:
    return NOT_REPRODUCED, why
  if agree == len(judged) and not failed:
    return REPRODUCED, why
  return PARTLY, why


# --- The report -------------------------------------------------------------------


@dataclasses.dataclass
class Section:
  """What the report says about one study."""
  study: Study
  report_dir: str
  claims: list[common.Claim]
  verdict: str
  why: str
  figures: list[str]  # PNG paths
  tables: list[str]  # Markdown files of the study's report
  runs: int
  training_seconds: float
  invocations: list[dict]
  exit_code: int | None
  error: str | None = None

  @property
  def wall_seconds(self) -> float:
    return sum(e.get("seconds", 0.0) for e in self.invocations)

  @property
  def trained_here(self) -> int:
    return sum(e.get("runs_trained", 0) for e in self.invocations)


def report_dir(out_dir: str, study: Study) -> str:
  return os.path.join(out_dir, study.name, "report")


def section(out_dir: str, study: Study, exit_code: int | None) -> Section:
  """The study's section from what its tool wrote."""
  rdir = report_dir(out_dir, study)
  claims, error = [], None
  path = os.path.join(rdir, "claims.csv")
  if os.path.exists(path):
    try:
      claims = read_claims(path)
    except UserError as e:
      error = str(e)
  else:
    error = f"the study wrote no {os.path.relpath(path, out_dir)}"
  verdict, why = paper_verdict(claims)
  figures = tables = []
  if os.path.isdir(rdir):
    names = sorted(os.listdir(rdir))
    figures = [os.path.join(rdir, n) for n in names if n.endswith(".png")]
    tables = [os.path.join(rdir, n) for n in names
              if n.endswith(".md") and n != "claims.md"]
  runs = finished_runs(os.path.join(out_dir, study.name))
  return Section(study, rdir, claims, verdict, why, figures, tables,
                 len(runs), training_seconds(runs),
                 read_ledger(out_dir, study.name), exit_code, error)


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _timing(s: Section) -> str:
  shown = len(s.invocations)
  found = s.runs - s.trained_here
  return (f"{_minutes(s.wall_seconds)} of wall time over {shown} "
          f"invocation{'s' if shown != 1 else ''} of the study tool, which "
          f"trained {s.trained_here} of the {s.runs} finished runs"
          + (f" ({found} were found finished, trained before this output "
             f"directory's first invocation or by other shards)"
             if found > 0 else "")
          + f"; the runs' own training time adds up to "
          f"{_minutes(s.training_seconds)}")


def figure_copies(out_dir: str, s: Section) -> list[str]:
  """Copies the study's PNGs to DIR/figures/<study>/; their paths relative
  to DIR."""
  rel = []
  for png in s.figures:
    target = os.path.join(out_dir, FIGURES_DIR, s.study.name,
                          os.path.basename(png))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(png, "rb") as f:
      rundir.atomic_write(target, f.read())
    rel.append(os.path.relpath(target, out_dir))
  return rel


def summary_table(sections: Sequence[Section], quick: bool) -> list[str]:
  lines = ["| paper | verdict | claims | wall time of the tool | runs "
           "(trained by the tool) | runs' own training time |",
           "|---|---|---|---|---|---|"]
  for s in sections:
    verdict = f"**{s.verdict}**" + (" (smoke test)" if quick else "")
    lines.append(f"| {common.escape(s.study.title)} | {verdict} | "
                 f"{common.escape(s.why)} | {_minutes(s.wall_seconds)} | "
                 f"{s.runs} ({s.trained_here}) | "
                 f"{_minutes(s.training_seconds)} |")
  return lines


def markdown(plan: Plan, sections: Sequence[Section], out_dir: str,
             figures: Mapping[str, list[str]], command: str,
             seconds: float, docs_dir: str | None = None) -> str:
  """report.md; with `docs_dir`, the copy that lives there (tables are
  linked through the studies' docs pages)."""
  lines = [f"# Reproducing the four studies: the {plan.tier} tier", ""]
  if plan.quick:
    lines += [f"**This is the quick tier, a {QUICK_LABEL}.**", ""]
  lines += [f"Command: `{command}`", "",
            f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"this invocation took {_minutes(seconds)}; the studies' "
            f"invocations recorded in {LEDGER_DIR}/ add up to "
            f"{_minutes(sum(s.wall_seconds for s in sections))}.", "",
            "Paper verdict rule: " + PAPER_RULE, ""]
  lines += summary_table(sections, plan.quick) + [""]
  for s in sections:
    lines += [f"## {s.study.title}", ""]
    if plan.quick:
      lines += [f"Verdict ({QUICK_LABEL}): **{s.verdict}** ({s.why}).", ""]
    else:
      lines += [f"Verdict: **{s.verdict}** ({s.why}).", ""]
    lines += [f"Tool: `{s.study.tool}`, base flagfile `{s.study.flagfile}` "
              f"as the tier derives it ({PLANS_DIR}/{s.study.name}.flags). "
              f"Time: {_timing(s)}.", ""]
    if s.exit_code not in (0, None):
      lines += [f"The study tool exited with status {s.exit_code} in this "
                f"invocation (see {LOGS_DIR}/{s.study.name}.log); rerun the "
                f"command to finish it.", ""]
    if s.error:
      lines += [f"Not reported: {s.error}.", ""]
    if s.claims:
      lines += ["Claims (each verdict comes from the rule beside it; "
                "numbers are mean ± std [min, max] over seeds (n)):", ""]
      lines += common.claims_table(s.claims) + [""]
    if docs_dir and s.study.docs_page:
      page = os.path.join(ROOT, s.study.docs_page)
      lines += [f"Tables and discussion: [{s.study.docs_page}]"
                f"({os.path.relpath(page, docs_dir)})" + (
                    f"; {s.study.docs_kept}." if s.study.docs_kept
                    else "."), ""]
    elif s.tables:
      lines += ["Tables: " + ", ".join(
          f"[{os.path.basename(t)}]({os.path.relpath(t, out_dir)})"
          for t in s.tables) + "; claims.csv beside them.", ""]
    for rel in figures.get(s.study.name, []):
      name = os.path.splitext(os.path.basename(rel))[0]
      lines += [f"![{name}]({rel})", ""]
  return "\n".join(lines)


def _html_table(lines: Sequence[str]) -> str:
  """A Markdown table (as written by this module) as HTML."""
  rows = [re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in lines
          if not set(line.replace("|", "").strip()) <= {"-"}]
  out = ["<table>"]
  for i, row in enumerate(rows):
    tag = "th" if i == 0 else "td"
    cells = "".join(
        f"<{tag}>{_inline(c.strip().replace(chr(92) + '|', '|'))}</{tag}>"
        for c in row)
    out.append(f"<tr>{cells}</tr>")
  out.append("</table>")
  return "\n".join(out)


def _inline(text: str) -> str:
  text = html.escape(text)
  text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
  return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(markdown_text: str, out_dir: str) -> str:
  """report.html from report.md: headings, paragraphs, tables and the
  figures inlined as base64 PNGs (no network assets)."""
  body, table = [], []

  def flush():
    if table:
      body.append(_html_table(table))
      table.clear()

  for line in markdown_text.splitlines():
    if line.startswith("|"):
      table.append(line)
      continue
    flush()
    if not line.strip():
      continue
    if line.startswith("#"):
      level = len(line) - len(line.lstrip("#"))
      body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
      continue
    m = re.fullmatch(r"!\[(.*)\]\((.+\.png)\)", line.strip())
    if m:
      with open(os.path.join(out_dir, m.group(2)), "rb") as f:
        data = base64.b64encode(f.read()).decode()
      body.append(f'<figure><img alt="{html.escape(m.group(1))}" '
                  f'src="data:image/png;base64,{data}"><figcaption>'
                  f'{html.escape(m.group(1))}</figcaption></figure>')
      continue
    line = re.sub(r"\[([^\]]+)\]\(([^)]+)\)",
                  lambda k: f"\0a href=\"{k.group(2)}\"\0{k.group(1)}\0/a\0",
                  line)
    text = _inline(line).replace("\0/a\0", "</a>")
    text = re.sub(r"\0a href=&quot;(.*?)&quot;\0", r'<a href="\1">', text)
    body.append(f"<p>{text}</p>")
  flush()
  style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;"
           "line-height:1.4}table{border-collapse:collapse;font-size:90%}"
           "td,th{border:1px solid #bbb;padding:3px 6px;vertical-align:top}"
           "img{max-width:100%}figure{margin:1em 0}")
  return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
          f"<title>tfcapacity reproduction report</title><style>{style}"
          "</style></head><body>\n" + "\n".join(body)
          + "\n</body></html>\n")


DOCS_FIGURES = {"capacity": "docs/figures/capacity",
                "confusion": "docs/figures/confusion"}  # Others: docs/figures.


def docs_figures_dir(study: str) -> str:
  return os.path.join(ROOT, DOCS_FIGURES.get(study, "docs/figures"))


def write_report(out_dir: str, plan: Plan, sections: Sequence[Section],
                 command: str, seconds: float, docs_dir: str | None = None
                 ) -> tuple[str, str]:
  """DIR/report.md, DIR/report.html (figures inline), DIR/verdicts.csv and
  the figures in DIR/figures/<study>/. With `docs_dir`, also report.md and
  verdicts.csv there, whose figure links point at the PNGs the studies
  wrote under docs/figures (`--figures_dir`)."""
  figures = {s.study.name: figure_copies(out_dir, s) for s in sections}
  text = markdown(plan, sections, out_dir, figures, command, seconds)
  md_path = os.path.join(out_dir, "report.md")
  html_path = os.path.join(out_dir, "report.html")
  rundir.atomic_write(md_path, text)
  rundir.atomic_write(html_path, to_html(text, out_dir))
  csv_text = verdicts_csv(plan, sections)
  rundir.atomic_write(os.path.join(out_dir, "verdicts.csv"), csv_text)
  if docs_dir:
    os.makedirs(docs_dir, exist_ok=True)
    links = {}
    for s in sections:
      if s.study.docs_kept:  # Its docs figures are another grid's: copy.
        links[s.study.name] = [os.path.join(FIGURES_DIR, s.study.name, p)
                               for p in map(os.path.basename, s.figures)]
        for png, rel in zip(s.figures, links[s.study.name]):
          os.makedirs(os.path.join(docs_dir, os.path.dirname(rel)),
                      exist_ok=True)
          with open(png, "rb") as f:
            rundir.atomic_write(os.path.join(docs_dir, rel), f.read())
      else:  # The tool wrote them under docs/figures (--figures_dir).
        links[s.study.name] = [os.path.relpath(os.path.join(
            docs_figures_dir(s.study.name), os.path.basename(p)), docs_dir)
                               for p in s.figures]
    docs_text = markdown(plan, sections, out_dir, links, command, seconds,
                         docs_dir)
    rundir.atomic_write(os.path.join(docs_dir, "report.md"), docs_text)
    rundir.atomic_write(os.path.join(docs_dir, "verdicts.csv"), csv_text)
  return md_path, html_path


def verdicts_csv(plan: Plan, sections: Sequence[Section]) -> str:
  """verdicts.csv: one row per study, columns VERDICT_COLUMNS."""
  rows = [{"study": s.study.name, "paper": s.study.title, "tier": plan.tier,
           "verdict": s.verdict, "why": s.why, "runs": s.runs,
           "runs_trained_by_reproduce": s.trained_here,
           "wall_seconds": round(s.wall_seconds, 1),
           "training_seconds": round(s.training_seconds, 1)}
          for s in sections]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(VERDICT_COLUMNS),
                          lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


# --- The paper tier: data, validation and a GPU-hour estimate -----------------

# Assumptions of the estimate, printed with it.
EIGEN_ITERATIONS = 20  # power/Lanczos iterations per curvature measurement
HVP_FORWARDS = 6  # one Hessian-vector product ~ two gradients ~ 6 forwards
TRAIN_FORWARDS = 3  # one training step ~ forward + backward ~ 3 forwards


def data_missing(cfg) -> str | None:
  """Why the data of `cfg` (--dataset, --test_dataset) are not here, or
  None. Looks for files only: nothing is downloaded or built."""
  for flag in ("dataset", "test_dataset"):
    name = getattr(cfg, flag, None)
    if not name:
      continue
    prefix, _, arg = name.partition(":")
    if prefix == "hdf5" and not os.path.exists(arg):
      return (f"--{flag}={name}: {arg} does not exist; make it with "
              f"tools/convert_sbow.py (docs/capacity.md) or edit the "
              f"flagfile's path")
    if prefix == "tfds":
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        prepared = tfds.builder(arg, data_dir=cfg.data_dir).is_prepared()
      except Exception as e:  # pylint: disable=broad-except
        return f"--{flag}={name}: {str(e).splitlines()[0][:200]}"
      if not prepared:
        where = cfg.data_dir or "the default data_dir (~/tensorflow_datasets)"
        return (f"--{flag}={name} is not prepared in {where}; prepare it "
                f"there (tfds build {arg}) or set --data_dir in the "
                f"flagfile")
  return None


@dataclasses.dataclass
class CellEstimate:
  """The work of one run of the paper tier, in floating-point operations."""
  name: str
  parameters: int
  epochs: float
  train_flop: float
  eval_flop: float
  curvature_flop: float

  @property
  def total(self) -> float:
    return self.train_flop + self.eval_flop + self.curvature_flop


def paper_cells(study: Study, study_dir: str):
  """Every run of a paper-tier study: [(cell, Config)], validated.

  Raises:
    UserError: the flagfile has no grid or a cell the train CLI refuses.
  """
  from tfcapacity.studies import sweep  # pylint: disable=g-import-not-at-top
  with open(study.flagfile_path()) as f:
    text = derive_flagfile(f.read(), study)
  cells = sweep.cells(sweep.flagfile_grid(text, study.flagfile))
  if study.name == "maxibatch":
    from tfcapacity.studies import maxibatch  # pylint: disable=g-import-not-at-top
    cells = [*cells, *maxibatch.parse_variants(text, cells, study_dir)]
  base_args = [f"--flagfile={study.flagfile_path()}", *(
      f"--{k}={v}" for k, v in study.flags.items())]
  configs = sweep.validate(base_args, cells)
  return [(c, configs[c.name]) for c in cells]


def estimate(study: Study, cell_name: str, cfg, cache: dict) -> CellEstimate:
  """The FLOPs of one run: training steps, evaluations and curvature
  measurements (HVPs), from the model's forward FLOPs per example."""
  from tfcapacity import models  # pylint: disable=g-import-not-at-top
  key = (cfg.model, cfg.width, cfg.depth)
  if key not in cache:
    import keras  # pylint: disable=g-import-not-at-top
    model = models.from_config(cfg, study.input_shape, study.classes)
    cache[key] = (models.forward_flops(model), model.count_params())
    keras.backend.clear_session()
  fwd, params = cache[key]
  n_train, n_test = study.train_examples, study.test_examples or 0
  steps_per_epoch = max(1, n_train // cfg.global_batch_size(n_train))
  epochs = (cfg.steps / steps_per_epoch if getattr(cfg, "steps", 0)
            else cfg.epochs)
  train = TRAIN_FORWARDS * fwd * n_train * epochs
  evals = epochs / cfg.eval_every if cfg.eval_every else 0
  evaluation = fwd * (n_train + n_test) * evals
  measurements = 0.0
  if cfg.curvature_every_epochs:
    measurements = epochs / cfg.curvature_every_epochs + 2 * (
        cfg.curvature_around_drop or 0)
  test = (n_test if cfg.curvature_test_batches == -1 else min(
      n_test, cfg.curvature_test_batches * cfg.curvature_examples))
  curvature = measurements * EIGEN_ITERATIONS * HVP_FORWARDS * fwd * (
      cfg.curvature_examples + test)
  linearize_every = getattr(cfg, "linearize_every_steps", 0) or 0
  if linearize_every:
    curvature += (epochs * steps_per_epoch / linearize_every
                  * EIGEN_ITERATIONS * HVP_FORWARDS * fwd
                  * cfg.linearize_examples)
  return CellEstimate(cell_name, params, epochs, train, evaluation, curvature)


def estimate_table(estimates: Sequence[CellEstimate], gpu_tflops: float
                   ) -> list[str]:
  """The run plan as Markdown, one row per run, with GPU-hours."""
  def hours(flop):
    return flop / (gpu_tflops * 1e12) / 3600
  lines = ["| run | parameters | epochs | training PFLOP | evaluation PFLOP "
           "| curvature PFLOP | GPU-hours |", "|---|---|---|---|---|---|---|"]
  for e in estimates:
    lines.append(f"| {e.name} | {e.parameters:,} | {e.epochs:g} | "
                 f"{e.train_flop / 1e15:.1f} | {e.eval_flop / 1e15:.1f} | "
                 f"{e.curvature_flop / 1e15:.1f} | {hours(e.total):.2f} |")
  total = sum(e.total for e in estimates)
  lines.append(f"| total ({len(estimates)} runs) | | | | | | "
               f"{hours(total):.1f} |")
  return lines


ESTIMATE_NOTE = (
    f"Estimate: FLOPs counted from the Dense and Conv2D layers of each run's "
    f"model (2 per multiply-add); a training step costs {TRAIN_FORWARDS} "
    f"forward passes per example, an evaluation one per train and test "
    f"example, a curvature measurement {EIGEN_ITERATIONS} iterations of "
    f"Hessian-vector products at {HVP_FORWARDS} forward passes per example; "
    f"data loading, augmentation and batch norm are not counted. GPU-hours "
    f"divide by the sustained rate given by --gpu_tflops.")
