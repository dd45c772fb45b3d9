"""The maxi-batch study: error, curvature and distance against batch size.

"Towards mini-error with maxi-batch SGD" (papers/003) trains ResNet-32 on
CIFAR-10 with batch sizes m from 50 to 10000 for the same number of epochs
and finds that large m gives worse *training* and test error, sharper
minima (a larger top Hessian eigenvalue lambda_max, on training examples and
averaged over the test set), and parameters that travel less far from their
initial values. Ghost batch norm (Sec. 2.1), gradient noise (Sec. 2.4) and
adaptive linearisation of the rectifiers (Sec. 2.5) do not repair it.

A study is a sweep (tfcapacity.studies.sweep) over the base flagfile's
`# sweep.grid:` lines (batch size x learning rate x seed) plus *variants*:
runs beyond the grid, one per flagfile line

  # maxibatch.variant: NAME flag=value flag=value ...

expanded once per seed of the grid's seed axis (`NAME,seed=S`) unless the
line sets `seed=`. A value `@CELL` stands for the run directory of another
cell or variant at the same seed, which must finish first; this is how an
empirical-noise run names the small-batch run whose gradient variances it
adds (`grad_noise_reference=@batch_size=50,learning_rate=0.1`).

The report groups the runs of one (m, lr), and the seeds of one variant,
into a `Group`: means and spreads (min-max and std) over seeds. Errors are
those with batch-norm statistics recomputed over the training set
(`*_recomputed_bn`) when every run logged them, else the moving ones.
This module makes the report's tables; its figures (Figs. 1-6: error
against m, the lines and planes between models, lambda_max, distances, the
variants) are drawn in tfcapacity.studies.maxibatch_figures, and the
paper's claims, each with its rule and verdict, are checked in
tfcapacity.studies.maxibatch_claims.

Deviation from the paper: the best learning rate of a batch size is chosen
by mean final training error over seeds, ties broken by mean final training
loss, a rate that diverged in some seed ranked after every rate that did
not (the paper reports its best model by test accuracy without saying how
rates were picked).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable, Iterable, Sequence

import numpy as np

from tfcapacity import data as data_lib
from tfcapacity.errors import UserError
from tfcapacity.studies import common
from tfcapacity.studies import sweep
from tfcapacity import rundir

VARIANT_COMMENT = re.compile(r"^\s*#\s*maxibatch\.variant:\s*(.*?)\s*$")
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
LAMBDA_TRAIN = "curvature/lambda_max"
LAMBDA_TEST = "curvature/lambda_max_test"
THRESHOLD = "curvature/stability_threshold"
RATIO = "curvature/lambda_max_over_threshold"
DISTANCE = "distance/total"
NORM = "distance/norm"
PATH = "path_length/total"
SLOPE = "linearization/mean_slope"
GRAD_NOISE_STD = "grad_noise/std"
RECOMPUTED = "_recomputed_bn"  # History keys with recomputed BN statistics.
SEED = "seed"
REFERENCE_M = 50  # The paper's best batch size: the claims' small m.
EARLY_EPOCHS = 5  # Sec. 2.5's "early" lambda_max: epochs (0, 5].
BARRIER_MARGIN = 0.1
NOISE, LINEARIZATION, GHOST = "noise", "linearization", "ghost"
LINE_BN_STATS = ("recompute", "interpolate")
INTERPOLATION_DIR = "interpolation"
SHARPNESS_DIR = "sharpness"
INTERPOLATION_KEYS = ("alphas", "train_loss", "train_top1_error",
                      "test_loss", "test_top1_error")


# --- Cells -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant(sweep.Cell):
  """A run beyond the grid: named by its flagfile line, not its values.

  `group` is the line's NAME; `label` (the run directory's name) is NAME,
  or `NAME,seed=S` when the line is expanded over the grid's seeds.
  """
  label: str = ""
  depends_on: tuple[str, ...] = ()
  group: str = ""

  @property
  def name(self) -> str:
    return self.label


def seed_axis(grid_cells: Sequence[sweep.Cell]) -> list[str]:
  """The values of the grid's `seed` axis in grid order ([]: no such axis)."""
  return list(dict.fromkeys(dict(c.overrides)[SEED] for c in grid_cells
                            if SEED in dict(c.overrides)))


def first_seed_only(grid: Sequence[tuple[str, Sequence[str]]]
                    ) -> list[tuple[str, list[str]]]:
  """The grid with its seed axis cut to its first value (--quick's tier)."""
  return [(key, list(values[:1]) if key == SEED else list(values))
          for key, values in grid]


def variant_label(name: str, seed: str) -> str:
  """The run directory of variant `name` expanded at `seed`."""
  return f"{name},{SEED}={seed}"


def _variant_lines(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
  """(NAME, [(flag, value), ...]) of each `# maxibatch.variant:` line."""
  lines = [m.group(1) for m in map(VARIANT_COMMENT.match, text.splitlines())
           if m]
  out = []
  for line in lines:
    tokens = line.split()
    if len(tokens) < 2:
      raise UserError(f"bad '# maxibatch.variant: {line}' line; write "
                      f"'# maxibatch.variant: NAME flag=value ...'")
    name = tokens[0]
    if not _VARIANT_NAME.match(name) or "=" in name:
      raise UserError(f"variant name {name!r} may hold only letters, digits "
                      f"and ._+- (no '='), so it cannot clash with a grid "
                      f"cell")
    if name in [n for n, _ in out]:
      raise UserError(f"variant name {name!r} is used twice; give each "
                      f"variant its own name")
    pairs = []
    for token in tokens[1:]:
      key, sep, value = token.partition("=")
      key = key.lstrip("-")
      if not sep or not key or not value:
        raise UserError(f"variant {name}: bad token {token!r}; write "
                        f"flag=value")
      if key in ("model_dir", "flagfile", "overwrite"):
        raise UserError(f"variant {name} may not set --{key}; the study sets "
                        f"it")
      pairs.append((key, value))
    out.append((name, pairs))
  return out


def _grid_values(target: str) -> dict | None:
  """`a=1,b=2` -> {"a": "1", "b": "2"}; None if not of that form."""
  parts = [p.partition("=") for p in target.split(",")]
  if not all(sep and key and value for key, sep, value in parts):
    return None
  return {key: value for key, _, value in parts}


def parse_variants(text: str, grid_cells: Sequence[sweep.Cell],
                   study_dir: str) -> list[Variant]:
  """The flagfile's `# maxibatch.variant:` lines as cells.

  When the grid has a `seed` axis, a line that sets no `seed=` becomes one
  variant per seed of the axis, named `NAME,seed=S` (the `=` no user name
  may hold keeps it apart from grid cells), and its `@CELL` references
  resolve at the same seed: `@batch_size=50,learning_rate=0.1` names the
  grid cell with those values and `seed=S`, `@OTHER` the variant OTHER's
  run at S. A line with `seed=` is one run, references resolved at its
  seed. Without a seed axis each line is one run named NAME.

  Args:
    text: the base flagfile.
    grid_cells: the grid's cells (names a variant may refer to with @).
    study_dir: where the cells' run directories live (@CELL resolves there).

  Raises:
    UserError: a line without a name or flags, a bad name or `flag=value`
      token, a repeated name, a flag the sweep sets, or @ naming no cell.
  """
  lines = _variant_lines(text)
  known = {c.name for c in grid_cells}
  seeds = seed_axis(grid_cells)
  instances = []  # (NAME, label, seed or None, pairs)
  for name, pairs in lines:
    own = dict(pairs).get(SEED)
    if seeds and own is None:
      instances += [(name, variant_label(name, s), s, pairs + [(SEED, s)])
                    for s in seeds]
    else:
      instances.append((name, name, own, pairs))
  labels = {label for _, label, _, _ in instances}
  expanded = {(name, seed): label for name, label, seed, _ in instances
              if label != name}
  single = {name for name, label, _, _ in instances if label == name}

  def resolve(seed: str | None, value: str) -> str | None:
    target = value[1:]
    if target in labels or target in known or target in single:
      return target
    if (target, seed) in expanded:
      return expanded[(target, seed)]
    wanted = _grid_values(target)
    if wanted is None:
      return None
    if seeds and SEED not in wanted and seed is not None:
      wanted[SEED] = seed
    for cell in grid_cells:
      if dict(cell.overrides) == wanted:
        return cell.name
    return None

  out = []
  for number, (name, label, seed, pairs) in enumerate(instances):
    overrides, depends = [], []
    for key, value in pairs:
      if value.startswith("@"):
        if value[1:] in (name, label):
          raise UserError(f"variant {name} names itself in {key}={value}; "
                          f"name the run it should wait for")
        target = resolve(seed, value)
        if target is None:
          at = f" at seed {seed}" if seeds and seed is not None else ""
          raise UserError(f"variant {name}: {value} names no cell of this "
                          f"study{at}; use a grid cell name such as "
                          f"{sorted(known)[0] if known else 'batch_size=50'}")
        depends.append(target)
        value = os.path.join(study_dir, target)
      overrides.append((key, value))
    out.append(Variant(len(grid_cells) + number, tuple(overrides),
                       label=label, depends_on=tuple(depends), group=name))
  return out


def run_order(grid_cells: Sequence[sweep.Cell],
              variants: Sequence[Variant]) -> tuple[list, list]:
  """(first, second): cells that others depend on lead the first phase;
  variants that depend on another cell make up the second."""
  needed = {d for v in variants for d in v.depends_on}
  independent = [v for v in variants if not v.depends_on]
  first = ([c for c in [*grid_cells, *independent] if c.name in needed]
           + [c for c in [*grid_cells, *independent] if c.name not in needed])
  return first, [v for v in variants if v.depends_on]


def run_in_rounds(variants: Sequence[Variant], states: dict,
                  run: Callable[[list], dict]) -> list[Variant]:
  """Runs `variants` in rounds, each once every cell it names has completed.

  Args:
    variants: the variants with references (`run_order`'s second phase).
    states: every cell's state so far, by name; updated in place.
    run: trains a list of cells and returns their states by name.

  Returns:
    The variants never started because a reference did not complete.
  """
  pending = list(variants)
  while pending:
    ready = [v for v in pending if all(
        states.get(d) == sweep.COMPLETED for d in v.depends_on)]
    if not ready:
      break
    states.update(run(ready))
    pending = [v for v in pending if v not in ready]
  return pending


# --- Runs --------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A finished run of the study."""
  name: str
  flags: dict
  state: str  # completed or diverged
  history: list[dict]  # evaluation rows
  variant: bool = False
  measurements: list[dict] = dataclasses.field(default_factory=list)
  group: str = ""  # a variant's NAME ("" for a grid run)
  callbacks: dict = dataclasses.field(default_factory=dict)

  @property
  def batch_size(self) -> int:
    return int(self.flags["batch_size"])

  @property
  def learning_rate(self) -> float:
    return float(self.flags["learning_rate"])

  @property
  def seed(self) -> int:
    return int(self.flags.get(SEED, 0))

  @property
  def completed(self) -> bool:
    return self.state == sweep.COMPLETED

  def series(self, key: str) -> list[tuple[int, int, float]]:
    """(step, epoch, value) of an evaluation or callback scalar."""
    return rundir.series({"history": self.history,
                          "measurements": self.measurements}, key)

  def has(self, key: str) -> bool:
    """Whether the run logged a finite value of `key`."""
    return any(math.isfinite(v) for _, _, v in self.series(key))

  def final(self, key: str) -> float:
    """The last logged value of `key` (NaN if never logged)."""
    points = self.series(key)
    return points[-1][2] if points else math.nan

  def last_evaluation(self, key: str) -> float:
    """`key` ("epoch", "step", ...) of the last evaluation row (or NaN)."""
    return _float(self.history[-1].get(key)) if self.history else math.nan

  def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of `key` over the run."""
    points = self.series(key)
    return (np.array([float(epoch) for _, epoch, _ in points]),
            np.array([value for _, _, value in points]))

  def mean_over(self, key: str, low: float, high: float) -> float:
    """The mean of `key`'s finite values at epochs in (low, high]."""
    epochs, values = self.curve(key)
    kept = values[(epochs > low) & (epochs <= high) & np.isfinite(values)]
    return float(kept.mean()) if kept.size else math.nan

  def around(self, key: str, epoch: float) -> tuple[float, float]:
    """`key` at the last measurement at or before `epoch` and the first
    after it (NaN where there is none). A row's epoch is its step //
    steps_per_epoch, so the row at epoch D of a drop at D was taken before
    any step at the dropped rate."""
    epochs, values = self.curve(key)
    ok = np.isfinite(values)
    before = values[ok & (epochs <= epoch)]
    after = values[ok & (epochs > epoch)]
    return (float(before[-1]) if before.size else math.nan,
            float(after[0]) if after.size else math.nan)


def _float(value) -> float:
  return rundir.number(value)  # null, and older files' "inf"/"nan" strings.


def _group_of(name: str) -> str:
  """A variant's NAME from its run directory's name (`NAME,seed=S`)."""
  return re.sub(rf",{SEED}=[^,]*$", "", name)


def load_run(cell_dir: str, variant: bool = False,
             group: str | None = None) -> Run | None:
  """The cell's finished run, or None while it is not finished.

  Raises:
    UserError: results.json exists but is not a tfcapacity results file.
  """
  if not os.path.isfile(os.path.join(cell_dir, rundir.RESULTS_FILE)):
    return None
  path = os.path.join(cell_dir, rundir.RESULTS_FILE)
  try:
    results = rundir.read_json(path)
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({e}); delete the cell's "
                    f"directory and rerun the study") from None
  if not isinstance(results, dict) or not isinstance(
      results.get("history"), list) or not isinstance(results.get("flags"),
                                                      dict):
    raise UserError(f"{path} has no 'history' list or 'flags' dict; is it a "
                    f"tfcapacity results.json?")
  state = sweep.cell_state(cell_dir, results)
  if state not in sweep.FINISHED:
    return None
  missing = [k for k in ("batch_size", "learning_rate")
             if k not in results["flags"]]
  if missing:
    raise UserError(f"{path}: 'flags' lacks {', '.join(missing)}")
  measurements = results.get("measurements", [])
  for rows, name in ((results["history"], "history"),
                     (measurements, "measurements")):
    for row in rows:
      if "epoch" not in row or "step" not in row:
        raise UserError(f"{path}: a {name} row has no 'epoch' or 'step'")
  name = os.path.basename(os.path.normpath(cell_dir))
  if group is None:
    group = _group_of(name) if variant else ""
  callbacks = results.get("callbacks")
  return Run(name, results["flags"], state, results["history"], variant,
             measurements, group,
             callbacks if isinstance(callbacks, dict) else {})


def load_runs(study_dir: str, cells: Iterable[sweep.Cell]
              ) -> tuple[list[Run], list[str]]:
  """Finished runs of `cells` under `study_dir`, and unfinished names.

  Raises:
    UserError: `study_dir` is not a directory.
  """
  return common.load_runs(study_dir, cells, lambda cell: load_run(
      os.path.join(study_dir, cell.name), isinstance(cell, Variant),
      cell.group if isinstance(cell, Variant) else None))


# --- Groups over seeds -------------------------------------------------------


@dataclasses.dataclass
class Group:
  """The runs of one grid point (m, lr) or one variant, over seeds."""
  name: str
  runs: list  # Runs, by seed

  @property
  def completed(self) -> list[Run]:
    return [r for r in self.runs if r.completed]

  @property
  def diverged(self) -> int:
    return sum(r.state == sweep.DIVERGED for r in self.runs)

  @property
  def batch_size(self) -> int:
    return self.runs[0].batch_size

  @property
  def learning_rate(self) -> float:
    return self.runs[0].learning_rate

  @property
  def flags(self) -> dict:
    return self.runs[0].flags

  def run_at(self, seed: int) -> Run | None:
    """The completed run of `seed`, if any."""
    return next((r for r in self.completed if r.seed == seed), None)

  def by_seed(self, value: Callable[[Run], float]) -> dict[int, float]:
    """{seed: value(run)} over completed runs with a finite value."""
    out = {r.seed: value(r) for r in self.completed}
    return {s: v for s, v in out.items() if math.isfinite(v)}

  def stat(self, value: Callable[[Run], float]) -> common.Spread:
    return common.spread(self.by_seed(value).values())

  def final(self, key: str, scale: float = 1.0) -> common.Spread:
    """The last logged value of `key` over seeds (times `scale`)."""
    return self.stat(lambda r: scale * r.final(key))

  def has(self, key: str) -> bool:
    return any(r.has(key) for r in self.completed)

  def band(self, key: str, scale: float = 1.0):
    """(epochs, mean, min, max, n) of `key` over the completed seeds."""
    return common.band([(x, scale * y) for x, y in
                        (r.curve(key) for r in self.completed)])


def variant_kind(run: Run) -> str:
  """noise, linearization, ghost or other: what a variant changes."""
  if str(run.flags.get("grad_noise") or "none") != "none":
    return NOISE
  if _float(run.flags.get("linearize_every_steps")) > 0:
    return LINEARIZATION
  if run.flags.get("normalization") == "ghost":
    return GHOST
  return "other"


# --- Summary -----------------------------------------------------------------


@dataclasses.dataclass
class Report:
  """The study's groups, and what the tool adds (lines, planes, phi)."""
  grid: dict  # (batch size, learning rate) -> Group
  best: dict  # batch size -> Group of the best rate (None: all diverged)
  variants: dict  # NAME -> Group, in flagfile order
  unfinished: list
  lr_drop_epochs: list
  seeds: list  # the seeds of the finished runs
  quick: bool = False
  recomputed: bool = False  # errors with recomputed batch-norm statistics
  lines: list = dataclasses.field(default_factory=list)  # Lines
  planes: list = dataclasses.field(default_factory=list)  # (Run, data)
  sharpness: dict = dataclasses.field(default_factory=dict)  # name -> phi
  training_seconds: float | None = None  # of this invocation

  @property
  def batch_sizes(self) -> list[int]:
    return sorted(self.best)

  @property
  def learning_rates(self) -> list[float]:
    return sorted({lr for _, lr in self.grid})

  @property
  def ms(self) -> list[int]:
    """The batch sizes with a best rate (some run completed)."""
    return [m for m in self.batch_sizes if self.best[m] is not None]

  @property
  def small_m(self) -> int | None:
    """The claims' small batch size: the paper's best m=50 if the grid has
    it, else the smallest."""
    if REFERENCE_M in self.ms:
      return REFERENCE_M
    return self.ms[0] if self.ms else None

  @property
  def large_m(self) -> int | None:
    return self.ms[-1] if self.ms else None

  @property
  def tier(self) -> str:
    seeds = ", ".join(str(s) for s in self.seeds)
    n = len(self.seeds)
    return (f"{'quick (1-seed tier, --quick)' if self.quick else 'full'}: "
            f"{n} seed{'s' if n != 1 else ''} ({seeds})")

  def error_key(self, split: str) -> str:
    base = f"{split}_top1_error"
    return base + RECOMPUTED if self.recomputed else base

  def loss_key(self, split: str) -> str:
    base = f"{split}_loss"
    return base + RECOMPUTED if self.recomputed else base

  @property
  def bn_eval(self) -> str:
    return ("batch-norm statistics recomputed over the training set"
            if self.recomputed else "moving batch-norm statistics")

  def runs(self) -> list[Run]:
    return ([r for g in self.grid.values() for r in g.runs]
            + [r for g in self.variants.values() for r in g.runs])

  def baseline(self) -> Group | None:
    """The grid group at the largest m with the variants' learning rate
    (else the best rate there)."""
    if self.large_m is None:
      return None
    lrs = {g.learning_rate for g in self.variants.values()
           if g.batch_size == self.large_m}
    for lr in sorted(lrs):
      if (self.large_m, lr) in self.grid:
        return self.grid[(self.large_m, lr)]
    return self.best.get(self.large_m)

  def variants_of(self, kind: str) -> list[Group]:
    return [g for g in self.variants.values()
            if variant_kind(g.runs[0]) == kind]

  def curvature_bn_modes(self) -> dict[str, int]:
    """How lambda_max was measured: batch-norm mode -> number of runs."""
    modes = {}
    for run in self.runs():
      mode = (run.callbacks.get("curvature") or {}).get("bn_mode")
      if mode:
        modes[str(mode)] = modes.get(str(mode), 0) + 1
    return dict(sorted(modes.items()))

  def wall_seconds(self) -> float:
    """The sum of the finished runs' training wall times."""
    return float(sum(w for w in (r.final("wall_seconds")
                                 for r in self.runs()) if math.isfinite(w)))


def _rank(group: Group, error: str, loss: str) -> tuple:
  """Best first: no seed diverged, then the lower mean final training
  error over seeds, then (ties are common once training error reaches 0)
  the lower mean final training loss; all seeds diverged last."""
  if not group.completed:
    return (2, math.inf, math.inf, group.learning_rate)
  e, l = group.final(error).mean, group.final(loss).mean
  return (1 if group.diverged else 0, e if math.isfinite(e) else math.inf,
          l if math.isfinite(l) else math.inf, group.learning_rate)


def summarize(runs: Sequence[Run], unfinished: Sequence[str] = (),
              quick: bool = False) -> Report:
  """Grid runs grouped by (m, lr) over seeds, the best rate per m, and the
  variants grouped by NAME.

  Raises:
    UserError: no finished grid run, or two grid runs with one (m, lr,
      seed).
  """
  grid_runs = [r for r in runs if not r.variant]
  if not grid_runs:
    raise UserError(f"no finished grid runs yet ({len(unfinished)} "
                    f"unfinished); run or wait for the study")
  grid, seen = {}, {}
  for run in grid_runs:
    key = (run.batch_size, run.learning_rate, run.seed)
    if key in seen:
      raise UserError(f"runs {seen[key].name} and {run.name} both have "
                      f"batch size {key[0]}, learning rate {key[1]:g} and "
                      f"seed {key[2]}; the grid must vary only "
                      f"--batch_size, --learning_rate and --seed")
    seen[key] = run
    grid.setdefault(key[:2], []).append(run)
  grid = {key: Group(f"m={key[0]}, lr={key[1]:g}",
                     sorted(rs, key=lambda r: r.seed))
          for key, rs in sorted(grid.items())}
  variants = {}
  for run in (r for r in runs if r.variant):
    variants.setdefault(run.group, []).append(run)
  variants = {name: Group(name, sorted(rs, key=lambda r: r.seed))
              for name, rs in variants.items()}
  done = [r for r in runs if r.completed]
  recomputed = bool(done) and all(
      r.has("train_top1_error" + RECOMPUTED) for r in done)
  error = "train_top1_error" + (RECOMPUTED if recomputed else "")
  loss = "train_loss" + (RECOMPUTED if recomputed else "")
  best = {}
  for m in sorted({m for m, _ in grid}):
    choice = min((g for (gm, _), g in grid.items() if gm == m),
                 key=lambda g: _rank(g, error, loss))
    best[m] = choice if choice.completed else None
  drops = grid_runs[0].flags.get("lr_drop_epochs") or []
  if isinstance(drops, str):
    drops = [d for d in drops.split(",") if d]
  return Report(grid, best, variants, list(unfinished),
                [float(d) for d in drops],
                sorted({r.seed for r in runs}), quick, recomputed)


# --- Interpolation, planes, sharpness ---------------------------------------


@dataclasses.dataclass
class Line:
  """One interpolation of Fig. 2: its end points and the tool's JSON."""
  start: Run
  end: Run
  bn_stats: str
  data: dict

  @property
  def seed(self) -> int:
    return self.start.seed


def interpolation_pairs(report: Report) -> list[tuple[Run, Run]]:
  """Fig. 2's pairs, per seed: the smallest m's best run to every completed
  run of the largest m at the same seed that differs from the grid's runs
  there only in its learning rate (grid runs and such variants: the paper's
  top and bottom panels)."""
  ms = report.ms
  if len(ms) < 2:
    return []
  start, last = report.best[ms[0]], ms[-1]
  pairs = []
  for a in start.completed:
    ends = [g.run_at(a.seed) for (m, _), g in report.grid.items()
            if m == last]
    ends = [r for r in ends if r is not None]
    if not ends:
      continue
    ends += [r for g in report.variants.values() for r in g.completed
             if r.seed == a.seed and r.batch_size == last
             and set(_changes(r, ends[0])) <= {"learning_rate"}]
    pairs += [(a, b) for b in ends]
  return pairs


def _changes(run: Run, base: Run) -> list[str]:
  return [k for k in sorted(set(run.flags) | set(base.flags))
          if k not in ("model_dir", SEED)
          and run.flags.get(k) != base.flags.get(k)]


def interpolation_path(study_dir: str, a: Run, b: Run,
                       bn_stats: str = "recompute") -> str:
  """The cached line A -> B with `bn_stats` (a name per statistic)."""
  return os.path.join(study_dir, INTERPOLATION_DIR,
                      f"{a.name}__to__{b.name}__{bn_stats}.json")


def plane_runs(report: Report) -> list[Run]:
  """The planes' centres: the smallest m's best run and the largest m's run
  at the variants' rate (`baseline`), first seed only."""
  if len(report.ms) < 2 or not report.seeds:
    return []
  seed = report.seeds[0]
  out = [report.best[report.ms[0]].run_at(seed)]
  base = report.baseline()
  out.append(base.run_at(seed) if base is not None else None)
  return [r for r in out if r is not None]


def plane_path(study_dir: str, run: Run) -> str:
  return os.path.join(study_dir, INTERPOLATION_DIR, f"plane__{run.name}.json")


def sharpness_runs(report: Report) -> list[Run]:
  """Every completed seed of every m's best rate."""
  return [r for m in report.ms for r in report.best[m].completed]


def sharpness_path(study_dir: str, run: Run) -> str:
  return os.path.join(study_dir, SHARPNESS_DIR, f"{run.name}.json")


def read_sharpness(path: str) -> float:
  """phi (%) of a cached `tfcapacity.sharpness` JSON.

  Raises:
    UserError: unreadable, or no number under "sharpness".
  """
  try:
    data = rundir.read_json(path)
    return float(data["sharpness"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"cannot read sharpness {path} ({e.__class__.__name__}"
                    f"); delete it and rerun the study") from None


def read_interpolation(path: str, plane: bool = False) -> dict:
  """An interpolation JSON (a line, or with `plane` a plane), checked.

  Raises:
    UserError: unreadable, or keys missing or of unequal lengths.
  """
  try:
    data = rundir.read_json(path)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read interpolation {path} ({e.__class__.__name__}"
                    f"); delete it and rerun the study") from None
  if not isinstance(data, dict):
    raise UserError(f"interpolation {path} is not a JSON object")
  keys = INTERPOLATION_KEYS + (("betas",) if plane else ())
  missing = [k for k in keys if k not in data]
  if missing:
    raise UserError(f"interpolation {path} lacks {', '.join(missing)}; "
                    f"delete it and rerun the study")
  if len({len(data[k]) for k in INTERPOLATION_KEYS}) != 1:
    raise UserError(f"interpolation {path}: its lists differ in length; "
                    f"delete it and rerun the study")
  return data


def line_summary(data: dict, key: str = "train_loss") -> dict:
  """`key` along a line: at alpha 0 and 1, its maximum for alpha strictly
  between, and its rise over the half-length beyond each end point (from
  alpha 0 to the range's low end, from 1 to its high end)."""
  alphas = np.asarray(data["alphas"], float)
  values = np.asarray(data[key], float)
  at0, at1 = (float(np.interp(a, alphas, values)) for a in (0.0, 1.0))
  inside = (alphas > 0) & (alphas < 1)
  peak = float(values[inside].max()) if inside.any() else math.nan
  return {"at_0": at0, "at_1": at1, "max_between": peak,
          "barrier_ratio": peak / max(at0, at1) if max(at0, at1) > 0
          else math.nan,
          "rise_beyond_0": float(values[0]) - at0 if alphas[0] < 0
          else math.nan,
          "rise_beyond_1": float(values[-1]) - at1 if alphas[-1] > 1
          else math.nan}


def has_barrier(data: dict) -> bool | None:
  """BARRIER_RULE on one line (None if it cannot be applied)."""
  s = line_summary(data)
  if not (math.isfinite(s["max_between"]) and math.isfinite(s["at_0"])
          and math.isfinite(s["at_1"])):
    return None
  return s["max_between"] > (1 + BARRIER_MARGIN) * max(s["at_0"], s["at_1"])


# --- Tables ------------------------------------------------------------------


def _changed_flags(run: Run, base: Run | None) -> str:
  if base is None:
    return ""
  out = []
  for key, value in sorted(run.flags.items()):
    if key in ("model_dir", SEED) or base.flags.get(key) == value:
      continue
    if key == "grad_noise_reference" and value:
      value = "@" + _group_of(os.path.basename(os.path.normpath(str(value))))
    out.append(f"{key}={value}")
  return " ".join(out)


def max_after(run: Run, key: str, epoch: float) -> float:
  epochs, values = run.curve(key)
  kept = values[(epochs >= epoch) & np.isfinite(values)]
  return float(kept.max()) if kept.size else math.nan


def row(run: Run, report: Report | None = None) -> dict:
  """A run's final numbers (errors in %; with recomputed batch-norm
  statistics where logged, and with the moving ones)."""
  out = {
      "run": run.name, "group": run.group, "seed": run.seed,
      "status": run.state,
      "batch_size": run.batch_size, "learning_rate": run.learning_rate,
      "epoch": run.last_evaluation("epoch"),
      "step": run.last_evaluation("step")}
  for split in data_lib.SPLITS:
    out[f"{split}_top1_error"] = 100 * run.final(f"{split}_top1_error")
    out[f"{split}_top1_error{RECOMPUTED}"] = 100 * run.final(
        f"{split}_top1_error{RECOMPUTED}")
    out[f"{split}_loss"] = run.final(f"{split}_loss")
    out[f"{split}_loss{RECOMPUTED}"] = run.final(f"{split}_loss{RECOMPUTED}")
  out.update({
      "lambda_max": run.final(LAMBDA_TRAIN),
      "lambda_max_peak": max_after(run, LAMBDA_TRAIN, 0),
      "lambda_max_early": run.mean_over(LAMBDA_TRAIN, 0, EARLY_EPOCHS),
      "lambda_max_test": run.final(LAMBDA_TEST),
      "lambda_max_over_threshold": run.final(RATIO),
      "distance": run.final(DISTANCE), "norm": run.final(NORM),
      "path_length": run.final(PATH),
      "sharpness": (report.sharpness.get(run.name, math.nan)
                    if report else math.nan),
      "wall_seconds": run.final("wall_seconds")})
  return out


def table_rows(report: Report) -> list[dict]:
  """One row per grid run, best rates marked, then one per variant run."""
  base = report.baseline()
  out = []
  for (m, _), group in sorted(report.grid.items()):
    for run in group.runs:
      out.append({**row(run, report), "best_lr": report.best.get(m) is group,
                  "kind": "grid", "changes": ""})
  for group in report.variants.values():
    for run in group.runs:
      ref = base.run_at(run.seed) if base else None
      out.append({**row(run, report), "best_lr": "", "kind": "variant",
                  "changes": _changed_flags(run, ref)})
  return out


def _cell(spread: common.Spread, digits: int = 2) -> str:
  return spread.text(digits) or "—"


def variant_changes(report: Report, group: Group) -> str:
  base = report.baseline()
  ref = base.runs[0] if base else None
  return _changed_flags(group.runs[0], ref) or "(none)"


def tables(report: Report) -> str:
  """The report's tables in Markdown (mean ± std [min, max] over seeds)."""
  err = {s: report.error_key(s) for s in data_lib.SPLITS}
  lines = [f"Tier: {report.tier}. Errors (%) with {report.bn_eval}; each "
           f"cell is the mean ± std [min, max] over seeds. Best learning "
           f"rate per m: the lowest mean final training error over seeds, "
           f"ties broken by the lower mean final training loss; a rate "
           f"that diverged in some seed ranks after those that did not."]
  modes = report.curvature_bn_modes()
  if modes:
    lines.append("lambda_max measured with batch-norm mode "
                 + ", ".join(f"{k} ({v} runs)" for k, v in modes.items())
                 + ".")
  lines.append(_timing(report))
  head = ["m", "best lr", "seeds", "train err %", "test err %", "gap %",
          "lambda_max", "lambda_max test", "||θ−θ0||", "||θ||",
          "path length", "phi %"]
  lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in report.batch_sizes:
    g = report.best[m]
    if g is None:
      lines.append(f"| {m} | all diverged |" + " |" * (len(head) - 2))
      continue
    cells = [str(m), f"{g.learning_rate:g}", str(len(g.completed)),
             _cell(g.final(err["train"], 100)),
             _cell(g.final(err["test"], 100)),
             _cell(g.stat(lambda r: 100 * (r.final(err["test"])
                                           - r.final(err["train"])))),
             _cell(g.final(LAMBDA_TRAIN), 1), _cell(g.final(LAMBDA_TEST), 1),
             _cell(g.final(DISTANCE), 1), _cell(g.final(NORM), 1),
             _cell(g.final(PATH), 1),
             _cell(g.stat(lambda r: report.sharpness.get(r.name, math.nan)),
                   3)]
    lines.append("| " + " | ".join(cells) + " |")
  lrs = report.learning_rates
  head = ["m"] + [f"lr={lr:g}: train / test err %" for lr in lrs]
  lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in report.batch_sizes:
    cells = [str(m)]
    for lr in lrs:
      g = report.grid.get((m, lr))
      if g is None:
        cells.append("")
        continue
      text = (f"{_cell(g.final(err['train'], 100))} / "
              f"{_cell(g.final(err['test'], 100))}") if g.completed else ""
      if g.diverged:
        text += f" ({g.diverged} diverged)"
      mark = "**" if report.best.get(m) is g else ""
      cells.append(f"{mark}{text.strip()}{mark}")
    lines.append("| " + " | ".join(cells) + " |")
  if report.variants:
    base = report.baseline()
    head = ["run", "changes", "seeds", "train err %", "test err %",
            "lambda_max", f"lambda_max, epochs 1-{EARLY_EPOCHS}",
            "||θ−θ0||"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in ([base] if base else []) + list(report.variants.values()):
      changes = "(grid run)" if g is base else variant_changes(report, g)
      seeds = str(len(g.completed)) + (f" ({g.diverged} diverged)"
                                       if g.diverged else "")
      lines.append("| " + " | ".join([
          g.name, changes, seeds, _cell(g.final(err["train"], 100)),
          _cell(g.final(err["test"], 100)), _cell(g.final(LAMBDA_TRAIN), 1),
          _cell(g.stat(lambda r: r.mean_over(LAMBDA_TRAIN, 0,
                                             EARLY_EPOCHS)), 1),
          _cell(g.final(DISTANCE), 1)]) + " |")
  if report.lines:
    head = ["line (seeds)", "bn_stats", "train loss at 0", "at 1",
            "max for 0<α<1", "barrier (rule)"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (bn, label), group in line_groups(report).items():
      sums = [line_summary(ln.data) for ln in group]
      barriers = [has_barrier(ln.data) for ln in group]
      lines.append("| " + " | ".join([
          f"{label} ({len(group)})", bn,
          _cell(common.spread(s["at_0"] for s in sums), 3),
          _cell(common.spread(s["at_1"] for s in sums), 3),
          _cell(common.spread(s["max_between"] for s in sums), 3),
          f"{sum(b is True for b in barriers)} of {len(group)} seeds"])
                   + " |")
  if report.unfinished:
    lines += ["", f"{len(report.unfinished)} runs unfinished and left out: "
              + ", ".join(report.unfinished)]
  return "\n".join(lines) + "\n"


def line_label(line: Line) -> str:
  return (f"m={line.start.batch_size} lr={line.start.learning_rate:g} → "
          f"m={line.end.batch_size} lr={line.end.learning_rate:g}"
          + (f" ({line.end.group})" if line.end.group else ""))


def line_groups(report: Report) -> dict:
  """(bn_stats, label) -> the lines of each seed, in a stable order."""
  out = {}
  for line in sorted(report.lines, key=lambda ln: (
      ln.bn_stats, ln.end.learning_rate, ln.end.group, ln.seed)):
    out.setdefault((line.bn_stats, line_label(line)), []).append(line)
  return out


def _timing(report: Report) -> str:
  wall = report.wall_seconds()
  text = (f"Training wall time: the runs' own {wall / 60:.1f} min "
          f"(sum over {len(report.runs())} runs)")
  if report.training_seconds is not None:
    text += (f"; this invocation trained for "
             f"{report.training_seconds / 60:.1f} min")
  else:
    text += "; this invocation trained nothing (--report_only)"
  return text + "."


def markdown(report: Report) -> str:
  """The report page: the tables (and the unfinished runs)."""
  return "# Maxi-batch study report\n\n" + tables(report)


def summary_json(report: Report, claims: Sequence[dict] = ()) -> dict:
  """Best rates, every group's numbers, the claims, lines and phi."""
  err = {s: report.error_key(s) for s in data_lib.SPLITS}

  def numbers(g: Group) -> dict:
    return {"runs": [r.name for r in g.runs], "diverged": g.diverged,
            "train_error": g.final(err["train"], 100).to_json(),
            "test_error": g.final(err["test"], 100).to_json(),
            "lambda_max": g.final(LAMBDA_TRAIN).to_json(),
            "lambda_max_test": g.final(LAMBDA_TEST).to_json(),
            "distance": g.final(DISTANCE).to_json(),
            "norm": g.final(NORM).to_json(),
            "path_length": g.final(PATH).to_json()}

  return {
      "tier": report.tier, "quick": report.quick, "seeds": report.seeds,
      "errors_with": report.bn_eval,
      "curvature_bn_modes": report.curvature_bn_modes(),
      "best_learning_rate": {str(m): (None if g is None else g.learning_rate)
                             for m, g in report.best.items()},
      "grid": {g.name: numbers(g) for g in report.grid.values()},
      "variants": {g.name: numbers(g) for g in report.variants.values()},
      "rows": table_rows(report), "claims": list(claims),
      "interpolations": [{"from": ln.start.name, "to": ln.end.name,
                          "bn_stats": ln.bn_stats,
                          "barrier": has_barrier(ln.data),
                          **line_summary(ln.data)} for ln in report.lines],
      "sharpness": dict(report.sharpness),
      "runs_wall_seconds": report.wall_seconds(),
      "training_seconds_this_invocation": report.training_seconds,
      "unfinished": report.unfinished}
