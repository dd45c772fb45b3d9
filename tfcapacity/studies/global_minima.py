"""Du et al. in their own regime: the width that gradient descent needs.

Du, Lee, Li, Wang and Zhai, "Gradient descent finds global minima of deep
neural networks" (ICML 2019; papers/002 summarises it, papers/README.md
writes out its definitions). The runs are theirs at CPU scale: random +-1
labels on n unit-norm inputs (`--task=random_sign --unit_norm_inputs`), the
squared loss on one output, every weight N(0, 1) with the scale in the
forward pass (`--parametrization=ntk`; fc_resnet's branch
c_res/(H sqrt(m))), full-batch gradient descent with the constant step
eta = c n / lambda_max(Theta(0)) (`--learning_rate_from=gram`), float64.

A study is a grid model x depth x width x seed, run width by width from the
narrowest (`schedule`): a (model, depth, seed) stops at the first width that
fits its labels (`FITTED`: every training sign right at some evaluation
within the step budget), except at the drift depths, where every width runs
(figure c). Cells above a parameter cap are not run and are reported as such.

From each run (`load_run`): the evaluation rows, the per-step full-batch
loss, the NTK spectra over training (`gradients/ntk_*`, all n examples) and
the drift ||Theta(t) - Theta(0)||_2 / lambda_min(Theta(0)), the relative
weight change per layer, the step size used and lambda_max(Theta(0)), and
from Theta(0) and f(0) (`ntk_init.npz`) the linearised model's prediction:
the steps gradient descent on f(0) + J(0)(theta - theta_0) needs to fit the
same labels with the same step (`linearised_steps_to_fit`).

Then (`summarize`) per (model, depth, seed) the width needed, and the
claims (`claims`), tables (`markdown`) and figures (`figures`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterable, Sequence

import numpy as np

from tfcapacity import rundir
from tfcapacity.errors import UserError
from tfcapacity.studies import common
from tfcapacity.studies import random_labels
from tfcapacity.studies import sweep

MODELS = ("mlp", "fc_resnet")
LOSS_THRESHOLD = 1e-3
NTK_FILE = "ntk_init.npz"  # gradients.callback.NTK_INIT_FILE
# The linearised prediction looks this many budgets ahead before giving up.
LINEARISED_HORIZON = 100
# Du et al.'s proofs keep ||Theta(t) - Theta(0)||_2 below lambda_0 / 2.
DRIFT_BOUND = 0.5
# Where the claims come from (the paper's theorem numbers differ between
# its versions).
THEOREMS = "the FC and ResNet theorems"
LEMMAS = "the proofs' stability lemmas"


# --- The grid -----------------------------------------------------------------


def layers_below_output(model: str, depth: int) -> int:
  """Du et al.'s H: hidden layers of the mlp; fc_resnet's input layer plus
  its residual blocks."""
  return depth + 1 if model == "fc_resnet" else depth


def num_parameters(model: str, depth: int, width: int, inputs: int,
                   outputs: int = 1) -> int:
  """Weights of the ntk-parametrised model (no biases)."""
  hidden = depth - 1 if model == "mlp" else depth
  return inputs * width + hidden * width * width + width * outputs


@dataclasses.dataclass(frozen=True)
class Key:
  """One line of the search for the width needed."""
  model: str
  depth: int
  seed: int


def cell(key: Key, width: int) -> sweep.Cell:
  return sweep.Cell(0, (("model", key.model), ("depth", str(key.depth)),
                        ("width", str(width)), ("seed", str(key.seed))))


def parse_ints(text: str, name: str) -> list[int]:
  """'1,2,4' -> [1, 2, 4], sorted, positive, no repeats.

  Raises:
    UserError: an empty list, a non-integer or a value below 0 (seeds) / 1.
  """
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise UserError(f"--{name} must be comma-separated integers; got "
                    f"{text!r}") from None
  low = 0 if name == "seeds" else 1
  if not values or min(values) < low or len(set(values)) != len(values):
    raise UserError(f"--{name} must be distinct integers >= {low}; got "
                    f"{text!r}")
  return sorted(values)


@dataclasses.dataclass
class Plan:
  """What the study runs: the keys, the widths, the drift depths, the cap."""
  models: list[str]
  depths: list[int]
  widths: list[int]
  seeds: list[int]
  drift_depths: list[int]
  max_parameters: int
  inputs: int

  def keys(self) -> list[Key]:
    return [Key(m, d, s) for m in self.models for d in self.depths
            for s in self.seeds]

  def allowed(self, key: Key, width: int) -> bool:
    return num_parameters(key.model, key.depth, width,
                          self.inputs) <= self.max_parameters

  def over_cap(self) -> list[sweep.Cell]:
    return [cell(k, w) for k in self.keys() for w in self.widths
            if not self.allowed(k, w)]


def schedule(plan: Plan, fitted: dict[str, bool | None]
             ) -> list[sweep.Cell]:
  """The cells to run next: for each key, the narrowest allowed width not
  yet run, unless a narrower one fitted (drift depths run every width).

  `fitted[name]` is True/False for finished cells (a diverged run did not
  fit); cells missing from it have not finished and are run (again).
  """
  out = []
  for key in plan.keys():
    for width in plan.widths:
      if not plan.allowed(key, width):
        break
      c = cell(key, width)
      state = fitted.get(c.name)
      if state is None:
        out.append(c)
        break
      if state and key.depth not in plan.drift_depths:
        break
  return out


# --- One run ------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """What the study reads from one finished run."""
  name: str
  state: str
  model: str
  depth: int
  width: int
  seed: int
  n: int
  steps: int
  learning_rate: float
  lambda_max0: float | None
  history: list  # [(step, train loss, train error)]
  curve_steps: np.ndarray
  curve_losses: np.ndarray
  ntk: list  # [(step, lambda_min, lambda_max, below float32, drift)]
  relative_change: dict  # layer -> ||W_T - W_0|| / ||W_0|| at the end
  linearised_steps: int | None
  linearised_bound_holds: bool | None
  linearised_losses: np.ndarray  # at steps 0..budget
  num_parameters: int
  wall_seconds: float

  @property
  def key(self) -> Key:
    return Key(self.model, self.depth, self.seed)

  @property
  def H(self) -> int:  # pylint: disable=invalid-name
    return layers_below_output(self.model, self.depth)

  @property
  def steps_to_fit(self) -> int | None:
    """The first evaluation step with every training sign right."""
    return steps_to_fit(self.history)

  @property
  def fitted(self) -> bool:
    return self.state == sweep.COMPLETED and self.steps_to_fit is not None

  @property
  def final_loss(self) -> float:
    return self.history[-1][1] if self.history else math.nan

  @property
  def steps_to_loss(self) -> int | None:
    return random_labels.steps_to_threshold(
        self.curve_steps, self.curve_losses, LOSS_THRESHOLD)

  def ntk_at(self, index: int, field: int) -> float:
    return self.ntk[index][field] if self.ntk else math.nan

  @property
  def max_drift(self) -> float:
    drifts = [row[4] for row in self.ntk if row[4] is not None]
    return max(drifts) if drifts else math.nan

  @property
  def max_relative_change(self) -> float:
    return max(self.relative_change.values(), default=math.nan)

  @property
  def least_eigenvalue_ratio(self) -> float:
    """lambda_min(Theta(0)) / lambda_max(Theta(0)) (all n examples)."""
    return self.ntk_at(0, 1) / self.ntk_at(0, 2) if self.ntk else math.nan


def steps_to_fit(history) -> int | None:
  """The first evaluation step with training error 0 in `history`, rows
  (step, train loss, train error); None if there is none."""
  for step, _, error in history:
    if error == 0:
      return step
  return None


def _history(results: dict) -> list:
  return [(int(r["step"]), rundir.row_number(r, "train_loss"),
           rundir.row_number(r, "train_top1_error"))
          for r in results.get("history", [])]


def fitted(cell_dir: str) -> bool | None:
  """Whether the run in `cell_dir` fitted (a diverged run did not); None if
  it has not finished. Reads results.json alone (the scheduler's question;
  `load_run` reads everything)."""
  results = rundir.read_results(cell_dir)
  state = sweep.cell_state(cell_dir, results)
  if state not in sweep.FINISHED:
    return None
  return (state == sweep.COMPLETED
          and steps_to_fit(_history(results)) is not None)


def linearised_fit(gram: np.ndarray, outputs: np.ndarray, labels: np.ndarray,
                   learning_rate: float, horizon: int
                   ) -> tuple[int | None, np.ndarray]:
  """Gradient descent on the model linearised at theta_0, in closed form.

  With the mean loss (1/n) sum_i 1/2 (f_i - y_i)^2, the residual
  r = f - y evolves as r_t = (I - (eta/n) Theta)^t r_0. Returns the first
  t <= horizon with every |r_t,i| < 1 (every sign right), or None, and the
  losses at t = 0..horizon.
  """
  n = len(labels)
  target = 2.0 * np.asarray(labels, np.float64).reshape(-1) - 1.0
  r0 = np.asarray(outputs, np.float64).reshape(-1) - target
  w, v = np.linalg.eigh((gram + gram.T) / 2)
  factor = 1.0 - learning_rate / n * w
  coef = v.T @ r0
  losses, first = [], None
  for start in range(0, horizon + 1, 4096):  # Bounded memory.
    t = np.arange(start, min(start + 4096, horizon + 1))
    residuals = (factor[None, :] ** t[:, None] * coef[None, :]) @ v.T
    losses.append(0.5 * np.sum(residuals ** 2, axis=1) / n)
    fits = np.all(np.abs(residuals) < 1, axis=1)
    if first is None and fits.any():
      first = int(t[np.argmax(fits)])
  return first, np.concatenate(losses)


def rate_bound_holds(curve_steps, curve_losses, lambda_min: float,
                     learning_rate: float, n: int) -> bool | None:
  """Whether L(t) <= (1 - eta lambda_0 / (2 n))^t L(0) at every logged t
  (Du et al.'s linear rate, for the mean loss); None without data."""
  steps = np.asarray(curve_steps)
  losses = np.asarray(curve_losses)
  if not len(steps) or steps[0] != 0 or not lambda_min > 0:
    return None
  rate = 1.0 - learning_rate * lambda_min / (2 * n)
  bound = losses[0] * rate ** steps
  return bool(np.all(losses <= bound * (1 + 1e-9)))


def load_run(cell_dir: str) -> Run | None:
  """The finished run in `cell_dir`, or None."""
  results = rundir.read_results(cell_dir)
  state = sweep.cell_state(cell_dir, results)
  if state not in sweep.FINISHED:
    return None
  flags = rundir.load_config(cell_dir)
  history = _history(results)
  batch = random_labels.read_scalar_events(
      os.path.join(cell_dir, "train"), random_labels.LOSS_TAGS)
  steps, losses = random_labels.loss_curve(results.get("history", []), batch)
  mins = dict(random_labels.measurement_series(
      results, "gradients/ntk_min_eigenvalue"))
  maxs = dict(random_labels.measurement_series(
      results, "gradients/ntk_max_eigenvalue"))
  below = dict(random_labels.measurement_series(
      results, "gradients/ntk_min_below_float32"))
  drift = dict(random_labels.measurement_series(
      results, "gradients/ntk_drift"))
  ntk = [(s, mins[s], maxs.get(s, math.nan), bool(below.get(s, 0.0)),
          drift.get(s)) for s in sorted(mins)]
  change = {}
  for row in results.get("measurements", []):
    for key, value in row.items():
      if key.startswith("relative_distance/"):
        change[key.split("/", 1)[1]] = rundir.row_number(row, key)
  n = int(results.get("global_batch_size", 0))
  lr = float(results.get("learning_rate_used", flags.learning_rate))
  linear_steps, bound, linear_losses = None, None, np.zeros(0)
  path = os.path.join(cell_dir, NTK_FILE)
  if os.path.exists(path):
    with np.load(path) as saved:
      gram, outputs, labels = saved["gram"], saved["outputs"], saved["labels"]
    if len(labels) == n:
      budget = max(1, int(results.get("total_steps", 1)))
      linear_steps, linear_losses = linearised_fit(
          gram, outputs, labels, lr, LINEARISED_HORIZON * budget)
      linear_losses = linear_losses[:budget + 1]
      bound = rate_bound_holds(steps, losses,
                               float(np.linalg.eigvalsh(gram)[0]), lr, n)
  final = results.get("final") or {}
  return Run(
      name=os.path.basename(os.path.normpath(cell_dir)), state=state,
      model=flags.model, depth=int(flags.depth), width=int(flags.width),
      seed=int(flags.seed), n=n, steps=int(results.get("steps", 0)),
      learning_rate=lr,
      lambda_max0=results.get("gram_max_eigenvalue_at_init"),
      history=history, curve_steps=steps, curve_losses=losses, ntk=ntk,
      relative_change=change, linearised_steps=linear_steps,
      linearised_bound_holds=bound, linearised_losses=linear_losses,
      num_parameters=int(results.get("num_parameters", 0)),
      wall_seconds=rundir.number(final.get("wall_seconds")))


def load_runs(study_dir: str, cells: Iterable[sweep.Cell]
              ) -> tuple[list[Run], list[str]]:
  """The finished runs among `cells`, and the names of the others."""
  return common.load_runs(study_dir, cells, lambda c: load_run(
      os.path.join(study_dir, c.name)))


# --- The summary -------------------------------------------------------------


@dataclasses.dataclass
class Report:
  plan: Plan
  runs: list
  unfinished: list
  budget: int = 0
  learning_rate_c: float = math.nan
  tier: str = "full"
  training_seconds: float | None = None

  def run(self, key: Key, width: int) -> Run | None:
    for r in self.runs:
      if r.key == key and r.width == width:
        return r
    return None

  def width_needed(self, key: Key) -> tuple[int | None, int | None]:
    """(the narrowest width that fitted, the widest width run)."""
    runs = sorted((r for r in self.runs if r.key == key),
                  key=lambda r: r.width)
    fitted = [r.width for r in runs if r.fitted]
    return (fitted[0] if fitted else None,
            runs[-1].width if runs else None)

  def needed_by_seed(self, model: str, depth: int) -> dict[int, float]:
    """{seed: width needed}, inf where no width run fitted."""
    out = {}
    for seed in self.plan.seeds:
      needed, widest = self.width_needed(Key(model, depth, seed))
      if widest is not None:
        out[seed] = float(needed) if needed is not None else math.inf
    return out


def summarize(plan: Plan, runs: Sequence[Run], unfinished: Sequence[str],
              quick: bool = False) -> Report:
  if not runs:
    raise UserError("no finished runs to report yet; run the study first")
  report = Report(plan, sorted(runs, key=lambda r: (
      r.model, r.depth, r.seed, r.width)), list(unfinished))
  report.budget = max(r.steps for r in runs)
  report.tier = "quick (1 seed)" if quick else f"{len(plan.seeds)} seeds"
  return report


def _width_text(values: dict[int, float]) -> str:
  if not values:
    return "-"
  parts = [("> grid" if math.isinf(v) else str(int(v)))
           for _, v in sorted(values.items())]
  return " / ".join(parts)


def run_rows(report: Report) -> list[dict]:
  """One CSV row per run."""
  rows = []
  for r in report.runs:
    rows.append({
        "model": r.model, "depth": r.depth, "H": r.H, "width": r.width,
        "seed": r.seed, "n": r.n, "state": r.state, "steps": r.steps,
        "learning_rate_used": r.learning_rate,
        "ntk_max_eigenvalue_init": r.ntk_at(0, 2),
        "ntk_min_eigenvalue_init": r.ntk_at(0, 1),
        "ntk_min_below_float32_init": r.ntk[0][3] if r.ntk else "",
        "ntk_min_eigenvalue_end": r.ntk_at(-1, 1),
        "max_ntk_drift": r.max_drift,
        "max_relative_weight_change": r.max_relative_change,
        "fitted": r.fitted, "steps_to_fit": r.steps_to_fit or "",
        "final_train_loss": r.final_loss,
        "steps_to_loss_1e-3": r.steps_to_loss or "",
        "linearised_steps_to_fit": r.linearised_steps or "",
        "rate_bound_holds": ("" if r.linearised_bound_holds is None
                             else r.linearised_bound_holds),
        "num_parameters": r.num_parameters, "wall_seconds": r.wall_seconds,
        "run": r.name})
  return rows


def needed_rows(report: Report) -> list[dict]:
  """One CSV row per (model, depth, seed): the width needed."""
  rows = []
  for key in report.plan.keys():
    needed, widest = report.width_needed(key)
    if widest is None:
      continue
    rows.append({"model": key.model, "depth": key.depth,
                 "H": layers_below_output(key.model, key.depth),
                 "seed": key.seed, "width_needed": needed or "",
                 "widest_run": widest})
  return rows


def markdown(report: Report) -> str:
  """The tables: width needed per (model, H), and per run."""
  lines = [
      f"Tier: {report.tier}; budget {report.budget} full-batch GD steps; "
      f"step c n / lambda_max(Theta(0)), c = {report.learning_rate_c:g}. "
      f"Width needed: the narrowest width in the grid at which every "
      f"training sign is right at some evaluation, per seed (> grid: no "
      f"width run fitted; {min(report.plan.widths)}, the narrowest of the "
      f"grid, means at most {min(report.plan.widths)}). Linearised: the "
      f"steps the linearised model needs at the same step size (median over "
      f"the runs of the row).", "",
      "| model | H | width needed (per seed) | lambda_min/lambda_max of "
      "Theta(0) (median) | linearised steps to fit (median) |",
      "|---|---|---|---|---|"]
  for model in report.plan.models:
    for depth in report.plan.depths:
      runs = [r for r in report.runs if r.model == model and r.depth == depth]
      if not runs:
        continue
      ratio = np.median([r.least_eigenvalue_ratio for r in runs])
      lin = [r.linearised_steps for r in runs]
      lin_known = [s for s in lin if s is not None]
      lin_text = (f"{np.median(lin_known):.0f}" if len(lin_known) == len(lin)
                  else f"> {LINEARISED_HORIZON * report.budget}"
                  if not lin_known else
                  f"{len(lin) - len(lin_known)} of {len(lin)} runs > "
                  f"{LINEARISED_HORIZON * report.budget}")
      lines.append(f"| {model} | {layers_below_output(model, depth)} | "
                   f"{_width_text(report.needed_by_seed(model, depth))} | "
                   f"{ratio:.3g} | {lin_text} |")
  lines += ["", "| run | fitted at step | final loss | lambda_min(Theta(0)) "
            "| max drift | max rel. weight change | linearised steps |",
            "|---|---|---|---|---|---|---|"]
  for r in report.runs:
    lines.append(
        f"| {r.name} | {r.steps_to_fit if r.fitted else 'no'} | "
        f"{r.final_loss:.3g} | {r.ntk_at(0, 1):.3g}"
        f"{' (below float32)' if r.ntk and r.ntk[0][3] else ''} | "
        f"{r.max_drift:.3g} | {r.max_relative_change:.3g} | "
        f"{r.linearised_steps if r.linearised_steps is not None else '-'} |")
  if report.plan.over_cap():
    lines += ["", f"Not run, above the cap of {report.plan.max_parameters:,} "
              f"weights: " + ", ".join(c.name for c in report.plan.over_cap())
              + "."]
  if report.unfinished:
    lines += ["", "Unfinished and left out: " + ", ".join(report.unfinished)]
  return "\n".join(lines) + "\n"


# --- The claims --------------------------------------------------------------


def _deepest_pair(report: Report, model: str) -> tuple[int, int] | None:
  depths = [d for d in report.plan.depths
            if any(r.model == model and r.depth == d for r in report.runs)]
  return (depths[0], depths[-1]) if len(depths) > 1 else None


def _ratio_at_init(report: Report, model: str, depth: int, seed: int
                   ) -> float:
  """lambda_min/lambda_max of Theta(0) of the widest run of the key."""
  runs = [r for r in report.runs if r.key == Key(model, depth, seed)]
  return max(runs, key=lambda r: r.width).least_eigenvalue_ratio if runs \
      else math.nan


def _deep_over_shallow(report: Report, seed: int, value) -> dict:
  """{model: value(model, deepest depth, seed) / value(model, shallowest
  depth, seed)}; NaN when the shallow value is missing, zero or infinite."""
  out = {}
  for model in ("mlp", "fc_resnet"):
    pair = _deepest_pair(report, model)
    if pair:
      shallow, deep = (value(model, depth, seed) for depth in pair)
      out[model] = (deep / shallow if math.isfinite(shallow) and shallow
                    else math.nan)
  return out


def claims(report: Report) -> list[common.Claim]:
  """The paper's claims, each with its rule, numbers and verdict."""
  out = []
  keys = [k for k in report.plan.keys() if report.width_needed(k)[1]]
  fits = {k: report.width_needed(k)[0] is not None for k in keys}
  out.append(common.Claim(
      "fits", "A wide enough network fits random labels under gradient "
      "descent.", THEOREMS, "per (model, depth, seed): some width "
      "in the grid gets every training sign right within the budget",
      f"{sum(fits.values())} of {len(fits)} (model, depth, seed) fitted",
      len(fits), common.verdict(fits.values())))

  widest = {}
  for r in report.runs:
    if r.key not in widest or r.width > widest[r.key].width:
      widest[r.key] = r
  zero = {k: r.steps_to_loss is not None for k, r in widest.items()}
  out.append(common.Claim(
      "zero_loss", f"The training loss goes to zero (here: below "
      f"{LOSS_THRESHOLD:g}).", THEOREMS, f"the widest run of each "
      f"(model, depth, seed) reaches loss < {LOSS_THRESHOLD:g} within "
      f"{report.budget} steps",
      f"{sum(zero.values())} of {len(zero)}; final losses of the widest "
      f"runs: median {np.median([r.final_loss for r in widest.values()]):.3g}",
      len(zero), common.verdict(zero.values())))

  bound = {k: r.linearised_bound_holds for k, r in widest.items()
           if k.depth in report.plan.drift_depths}
  every = [r.linearised_bound_holds for r in report.runs
           if r.linearised_bound_holds is not None]
  out.append(common.Claim(
      "linear_rate", "The loss of a wide net falls at least as fast as "
      "(1 - eta lambda_0 / 2)^k.", THEOREMS, "at the drift depths "
      "(every width run), for the widest run of each (model, depth, seed), "
      "with lambda_0 = lambda_min(Theta(0)) on the n examples: L(k) <= "
      "(1 - eta lambda_0 / (2n))^k L(0) at every step (mean loss)",
      f"holds in {sum(bool(b) for b in bound.values())} of "
      f"{sum(b is not None for b in bound.values())}; over all runs, of "
      f"every width and depth: {sum(every)} of {len(every)}",
      sum(b is not None for b in bound.values()),
      common.verdict(bound.values())))

  holds, texts = {}, []
  for seed in report.plan.seeds:
    ratios = _deep_over_shallow(report, seed, lambda m, d, s: _ratio_at_init(
        report, m, d, s))
    if len(ratios) == 2 and all(math.isfinite(v) for v in ratios.values()):
      holds[seed] = ratios["mlp"] < 1e-2 and ratios["fc_resnet"] > 0.1
      texts.append(f"seed {seed}: mlp x{ratios['mlp']:.2g}, fc_resnet "
                   f"x{ratios['fc_resnet']:.2g}")
  out.append(common.Claim(
      "lambda0_depth", "The least Gram eigenvalue at initialisation "
      "collapses with depth for fully-connected nets, not for ResNets.",
      "the width bounds' lambda_0 (2^O(H) against poly(H) factors)",
      "lambda_min/lambda_max of "
      "Theta(0) from the shallowest to the deepest depth (widest run) "
      "shrinks by more than 100x for mlp and by less than 10x for fc_resnet",
      "; ".join(texts) or "-", len(holds), common.verdict(holds.values())))

  holds, texts = {}, []
  for seed in report.plan.seeds:
    # inf: the deep end fitted at no width run; NaN: the shallow end neither.
    growth = _deep_over_shallow(
        report, seed,
        lambda m, d, s: report.needed_by_seed(m, d).get(s, math.nan))
    if len(growth) == 2 and not any(math.isnan(g) for g in growth.values()):
      if math.isinf(growth["mlp"]) and math.isinf(growth["fc_resnet"]):
        continue
      holds[seed] = growth["mlp"] > growth["fc_resnet"]
      texts.append(f"seed {seed}: mlp x{growth['mlp']:g}, fc_resnet "
                   f"x{growth['fc_resnet']:g}")
  out.append(common.Claim(
      "width_vs_depth", "The width needed grows faster with depth for "
      "fully-connected nets than for ResNets.", "the FC and ResNet theorems",
      "per seed, width needed at the deepest over the shallowest depth "
      "(inf: the deepest fitted at no width in the grid) is larger for mlp "
      "than for fc_resnet", "; ".join(texts) or "-", len(holds),
      common.verdict(holds.values())))

  holds, texts = {}, []
  for depth in report.plan.drift_depths:
    for model in report.plan.models:
      for seed in report.plan.seeds:
        runs = [r for r in report.runs if r.key == Key(model, depth, seed)
                and math.isfinite(r.max_drift)]
        if runs:
          r = max(runs, key=lambda r: r.width)
          holds[(model, depth, seed)] = r.max_drift < DRIFT_BOUND
          texts.append(f"{model} H={r.H} seed {seed} width {r.width}: "
                       f"{r.max_drift:.3g}")
  out.append(common.Claim(
      "gram_drift_bound", "The Gram matrix stays within lambda_0/2 of its "
      "start throughout training (what the proofs need).",
      LEMMAS, f"at the drift depths, the widest run's max_t "
      f"||Theta(t) - Theta(0)||_2 / lambda_min(Theta(0)) is below "
      f"{DRIFT_BOUND:g}", "; ".join(texts) or "-", len(holds),
      common.verdict(holds.values())))

  for claim_id, text, measure, rule_text in (
      ("gram_drift", "The Gram matrix moves less, relative to lambda_0, "
       "the wider the net.", lambda r: r.max_drift,
       "max_t ||Theta(t) - Theta(0)||_2 / lambda_min(Theta(0))"),
      ("weight_change", "The weights move less, relative to their start, "
       "the wider the net.", lambda r: r.max_relative_change,
       "the largest per-layer ||W_T - W_0||_F / ||W_0||_F")):
    holds, texts = {}, []
    for depth in report.plan.drift_depths:
      for model in report.plan.models:
        for seed in report.plan.seeds:
          runs = sorted((r for r in report.runs
                         if r.key == Key(model, depth, seed)),
                        key=lambda r: r.width)
          values = [(r.width, measure(r)) for r in runs
                    if math.isfinite(measure(r)) and measure(r) > 0]
          if len(values) < 2:
            continue
          slope = float(np.polyfit(np.log([w for w, _ in values]),
                                   np.log([v for _, v in values]), 1)[0])
          holds[(model, depth, seed)] = slope < 0
          texts.append(f"{model} H={layers_below_output(model, depth)} seed "
                       f"{seed}: slope {slope:.2f}, widest {values[-1][1]:.2g}")
    out.append(common.Claim(
        claim_id, text, LEMMAS, f"at the drift depths, the "
        f"log-log slope of {rule_text} against width is negative, per "
        f"(model, depth, seed)", "; ".join(texts) or "-", len(holds),
        common.verdict(holds.values())))

  diverged = [r.name for r in report.runs if r.state == sweep.DIVERGED]
  out.append(common.Claim(
      "step_size", "A constant step tied to the Gram matrix is stable.",
      THEOREMS + " (eta of order lambda_0 / n^2)", f"measured: runs "
      f"that diverged at eta = c n / lambda_max(Theta(0)), c = "
      f"{report.learning_rate_c:g}", f"{len(diverged)} of "
      f"{len(report.runs)} diverged" + (f": {', '.join(diverged)}"
                                        if diverged else ""),
      len(report.runs), common.MEASURED))
  return out


def claims_markdown(found: Sequence[common.Claim], report: Report) -> str:
  lines = [
      f"Tier: {report.tier}. Verdicts come from the rule alone: agrees = it "
      f"holds in every case checked, disagrees = in none, mixed = in some; "
      f"checked: the cases (seeds, or (model, depth, seed)) the rule read.",
      "", *common.claims_table(found)]
  return "\n".join(lines) + "\n"
