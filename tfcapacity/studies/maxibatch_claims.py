"""The claims of the maxi-batch paper (papers/003), checked on a study.

Each claim of the paper becomes one row: the claim in our words, the
figure or section it comes from, a rule stated before looking at the data,
the numbers the rule reads (mean ± std [min, max] over seeds, n seeds) and
a verdict computed by the rule alone:

  agrees        the rule's condition holds in every seed (every pair);
  disagrees     it holds in none;
  mixed         it holds in some;
  not measured  the runs lack what the rule reads (an older run without
                the key, a missing variant, no interpolation yet);
  measured      a number the paper gives no direction for (the stability
                ratio), reported as found.

Comparisons are paired by seed: the run of seed s of one group against the
run of seed s of the other. The "small m" is the paper's best batch size,
m=50, when the grid has it (else the smallest m); the "large m" is the
largest; "best rate" is the report's (`maxibatch.summarize`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

from tfcapacity.studies import common
from tfcapacity.studies import maxibatch as mb
from tfcapacity.studies import sweep

AGREES, DISAGREES, MIXED = common.AGREES, common.DISAGREES, common.MIXED
NOT_MEASURED, MEASURED = common.NOT_MEASURED, common.MEASURED
JUMP_FACTOR = 1.2  # Figs. 3-4: a jump at the drop is a rise by > 20%.
Claim = common.Claim
verdict = common.verdict
to_csv = common.claims_csv


def paired(a: dict, b: dict, holds: Callable[[float, float], bool]
           ) -> dict[int, bool]:
  """{seed: holds(a[seed], b[seed])} over the seeds both have."""
  return {s: bool(holds(a[s], b[s])) for s in sorted(set(a) & set(b))}


def _stat(values: dict | Iterable[float], digits: int = 2) -> str:
  values = values.values() if isinstance(values, dict) else values
  s = common.spread(values)
  return f"{s.text(digits)} (n={s.n})" if s.n else "none"


def _pct(run_error: Callable[[mb.Run], float]) -> Callable[[mb.Run], float]:
  return lambda r: 100 * run_error(r)


# --- The rules ---------------------------------------------------------------


class _Checker:
  """Builds the claims of one report."""

  def __init__(self, report: mb.Report):
    self.r = report
    self.small = report.best.get(report.small_m) if report.small_m else None
    self.large = report.best.get(report.large_m) if report.large_m else None
    self.base = report.baseline()
    self.train_err = report.error_key("train")
    self.test_err = report.error_key("test")

  def final(self, key: str, scale: float = 1.0):
    return lambda r: scale * r.final(key)

  def _m(self, g: mb.Group | None) -> str:
    return (f"m={g.batch_size} (lr={g.learning_rate:g})" if g is not None
            else "?")

  def larger_at_large_m(self, id_: str, claim: str, paper: str, key: str,
                        what: str, scale: float = 1.0, digits: int = 2,
                        larger: bool = True) -> Claim:
    """Per seed: `key`'s final value at the large m's best rate is larger
    (or with larger=False smaller) than at the small m's best rate."""
    word = "exceeds" if larger else "is below"
    rule = (f"in every seed, the final {what} at the largest m's best rate "
            f"{word} the small m's (m={self.r.small_m}, its best rate)")
    if self.small is None or self.large is None or self.small is self.large:
      return Claim(id_, claim, paper, rule, "fewer than two batch sizes", 0,
                   NOT_MEASURED)
    values = {m: self.r.best[m].by_seed(self.final(key, scale))
              for m in self.r.ms}
    holds = paired(values[self.r.large_m], values[self.r.small_m],
                   (lambda a, b: a > b) if larger else (lambda a, b: a < b))
    measured = "; ".join(f"m={m}: {_stat(v, digits)}"
                         for m, v in values.items() if v)
    return Claim(id_, claim, paper, rule, measured or "none", len(holds),
                 verdict(holds.values()))

  def drop_jump(self, id_: str, claim: str, paper: str, key: str,
                group: mb.Group | None, jumps: bool) -> Claim:
    """lambda_max after / before the first lr drop, per seed."""
    drops = self.r.lr_drop_epochs
    rel = ">" if jumps else "<="
    rule = (f"after/before ratio {rel} {JUMP_FACTOR:g} in every seed, where "
            f"before is the last measurement at epoch <= D (the drop's "
            f"epoch; a row's epoch is step // steps_per_epoch, so the row "
            f"at D precedes any step at the dropped rate) and after the "
            f"first at epoch > D")
    if group is None or not drops:
      return Claim(id_, claim, paper, rule, "no lr drop or no such run", 0,
                   NOT_MEASURED)
    drop = drops[0]

    def ratio(run):
      before, after = run.around(key, drop)
      return after / before if before > 0 else math.nan

    ratios = group.by_seed(ratio)
    holds = {s: (v > JUMP_FACTOR) == jumps for s, v in ratios.items()}
    measured = (f"{self._m(group)}, drop at epoch {drop:g}: ratio "
                f"{_stat(ratios)}")
    return Claim(id_, claim, paper, rule, measured, len(holds),
                 verdict(holds.values()))

  def above_small(self, id_: str, claim: str, paper: str,
                  groups: Sequence[mb.Group], which: str) -> Claim:
    """Per seed: the group's final test error exceeds the small m's best by
    more than the small m's seed spread (max - min)."""
    rule = (f"in every seed, the final test error of {which} exceeds the "
            f"m={self.r.small_m} best run's of that seed by more than the "
            f"m={self.r.small_m} best's spread over seeds (max - min)")
    if self.small is None or not groups:
      return Claim(id_, claim, paper, rule, "no such runs", 0, NOT_MEASURED)
    err = _pct(lambda r: r.final(self.test_err))
    ref = self.small.by_seed(err)
    spread = common.spread(ref.values()).range
    best = min(groups, key=lambda g: (
        common.spread(g.by_seed(err).values()).mean
        if g.by_seed(err) else math.inf))
    holds = paired(best.by_seed(err), ref, lambda a, b: a - b > spread)
    measured = "; ".join(
        [f"m={self.r.small_m} best: {_stat(ref)}, spread {spread:.2f}"]
        + [f"{g.name}{' (best)' if g is best else ''}: "
           f"{_stat(g.by_seed(err))}" for g in groups]) + " (test err %)"
    return Claim(id_, claim, paper, rule, measured, len(holds),
                 verdict(holds.values()))

  def against_base(self, id_: str, claim: str, paper: str,
                   groups: Sequence[mb.Group], value: Callable, what: str,
                   lower: bool, digits: int = 2,
                   diverged_holds: bool | None = None) -> Claim:
    """Per (variant, seed): `value` lower (or higher) than the plain run's
    at the same seed; a diverged variant seed counts as `diverged_holds`
    (None: left out)."""
    word = "below" if lower else "above"
    rule = (f"{what} {word} the plain largest-m run's (same seed), for "
            f"every variant listed and every seed")
    if self.base is None or not groups:
      return Claim(id_, claim, paper, rule, "no such runs", 0, NOT_MEASURED)
    ref = self.base.by_seed(value)
    holds, parts = [], [f"plain {self.base.name}: {_stat(ref, digits)}"]
    for g in groups:
      mine = g.by_seed(value)
      holds += paired(mine, ref, (lambda a, b: a < b) if lower
                      else (lambda a, b: a > b)).values()
      diverged = [run.seed for run in g.runs
                  if run.state == sweep.DIVERGED and run.seed in ref]
      if diverged_holds is not None:
        holds += [diverged_holds] * len(diverged)
      parts.append(f"{g.name}: {_stat(mine, digits)}" + (
          f", diverged in seeds {diverged}" if diverged else ""))
    return Claim(id_, claim, paper, rule, "; ".join(parts), len(holds),
                 verdict(holds))

  # --- Fig. 2 ----------------------------------------------------------------

  def lines_to(self, end: mb.Group | None, bn_stats: str) -> dict:
    """{seed: line data} from the small-m start to `end`'s run per seed."""
    if end is None:
      return {}
    names = {r.name for r in end.runs}
    return {ln.seed: ln.data for ln in self.r.lines
            if ln.bn_stats == bn_stats and ln.end.name in names}

  def barrier(self, bn_stats: str) -> Claim:
    rule = (f"a barrier exists if the maximum of the training loss for α "
            f"strictly in (0, 1) exceeds max(loss at α=0, loss at α=1) by "
            f"more than {100 * mb.BARRIER_MARGIN:.0f}%; agrees if it does in "
            f"every seed (line from the smallest m's best run to the "
            f"largest m's best rate, same seed, --bn_stats={bn_stats})")
    lines = self.lines_to(self.large, bn_stats)
    holds = {s: mb.has_barrier(d) for s, d in lines.items()}
    ratios = {s: mb.line_summary(d)["barrier_ratio"]
              for s, d in lines.items()}
    measured = (f"max between / max at the ends: {_stat(ratios, 3)}"
                if lines else "no interpolation")
    return Claim(f"fig2_barrier_{bn_stats}",
                 "Between the small-m and the large-m minimum the training "
                 "loss rises (a barrier)", "Fig. 2, Sec. 2.2", rule,
                 measured, len(holds), verdict(holds.values()))

  def sharper_along_line(self) -> Claim:
    rule = ("in every seed, the training loss rises more over the "
            "half-length beyond the large-m end (α 1 → 1.5) than beyond the "
            "small-m end (α 0 → -0.5), on the line from the smallest m's "
            "best run to the largest m's best rate, same seed "
            "(--bn_stats=recompute)")
    lines = self.lines_to(self.large, "recompute")
    sums = {s: mb.line_summary(d) for s, d in lines.items()}
    holds = {s: v["rise_beyond_1"] > v["rise_beyond_0"]
             for s, v in sums.items() if math.isfinite(v["rise_beyond_1"])
             and math.isfinite(v["rise_beyond_0"])}
    measured = (f"rise beyond the large-m end "
                f"{_stat([v['rise_beyond_1'] for v in sums.values()], 3)}; "
                f"beyond the small-m end "
                f"{_stat([v['rise_beyond_0'] for v in sums.values()], 3)}"
                if sums else "no interpolation")
    return Claim("fig2_sharper", "The large-m minimum is sharper than the "
                 "small-m one along the line between them",
                 "Fig. 2 (top), Sec. 2.2", rule, measured, len(holds),
                 verdict(holds.values()))

  def larger_lr_flatter(self) -> Claim:
    rule = ("at the largest m, in every seed, the training loss rises less "
            "beyond α=1 (α 1 → 1.5) on the line to the run at the highest "
            "learning rate that completed in every seed than on the line to "
            "the lowest rate's run (--bn_stats=recompute)")
    groups = [g for (m, _), g in sorted(self.r.grid.items())
              if m == self.r.large_m and g.completed and not g.diverged]
    if len(groups) < 2:
      return Claim("fig2_larger_lr", "A larger learning rate gives a flatter "
                   "minimum at the largest m", "Fig. 2 (bottom), Sec. 2.2",
                   rule, "fewer than two rates completed at the largest m",
                   0, NOT_MEASURED)
    low, high = groups[0], groups[-1]
    rise = {g.learning_rate: {s: mb.line_summary(d)["rise_beyond_1"]
                              for s, d in self.lines_to(g,
                                                        "recompute").items()}
            for g in (low, high)}
    holds = paired(rise[high.learning_rate], rise[low.learning_rate],
                   lambda a, b: a < b)
    err = _pct(lambda r: r.final(self.test_err))
    measured = (f"rise beyond α=1: lr={low.learning_rate:g} "
                f"{_stat(rise[low.learning_rate], 3)}, lr="
                f"{high.learning_rate:g} {_stat(rise[high.learning_rate], 3)}"
                f"; final test err %: lr={low.learning_rate:g} "
                f"{_stat(low.by_seed(err))}, lr={high.learning_rate:g} "
                f"{_stat(high.by_seed(err))}")
    return Claim("fig2_larger_lr", "A larger learning rate gives a flatter "
                 "minimum at the largest m", "Fig. 2 (bottom), Sec. 2.2",
                 rule, measured, len(holds), verdict(holds.values()))

  # --- Stability and sharpness -----------------------------------------------

  def stability(self) -> Claim:
    rule = ("no rule: the range over epochs and seeds of lambda_max / "
            "(2(1+β)/η at the current rate) at the largest m, per rate "
            "(a ratio near 1 is the edge of stability of heavy-ball SGD on "
            "a quadratic)")
    groups = [g for (m, _), g in sorted(self.r.grid.items())
              if m == self.r.large_m and g.has(mb.RATIO)]
    if not groups:
      return Claim("stability_ratio", "lambda_max against the stability "
                   "threshold of the optimiser", "(not in the paper)", rule,
                   f"{mb.RATIO} not logged", 0, NOT_MEASURED)
    parts = []
    for g in groups:
      _, _, lo, hi, _ = g.band(mb.RATIO)
      finals = g.by_seed(lambda r: r.final(mb.RATIO))
      parts.append(f"lr={g.learning_rate:g}: [{lo.min():.3g}, "
                   f"{hi.max():.3g}] over training, final "
                   f"{_stat(finals, 3)}")
    return Claim("stability_ratio", "lambda_max against the stability "
                 "threshold of the optimiser", "(not in the paper)", rule,
                 f"m={self.r.large_m}: " + "; ".join(parts),
                 len(groups[0].completed), MEASURED)

  def keskar(self) -> Claim:
    rule = (f"in every seed, Keskar et al.'s phi (epsilon 1e-3, final "
            f"checkpoint) at the largest m's best rate exceeds the "
            f"m={self.r.small_m} best run's")
    claim = "Keskar et al.'s sharpness phi is larger at large m"
    if self.small is None or self.large is None or not self.r.sharpness:
      return Claim("keskar_phi", claim, "Sec. 2.3 (Keskar et al. [7])",
                   rule, "not computed", 0, NOT_MEASURED)
    values = {m: self.r.best[m].by_seed(
        lambda r: self.r.sharpness.get(r.name, math.nan))
              for m in self.r.ms}
    holds = paired(values[self.r.large_m], values[self.r.small_m],
                   lambda a, b: a > b)
    measured = "; ".join(f"m={m}: {_stat(v, 3)}" for m, v in values.items()
                         if v) + " (phi, %)"
    return Claim("keskar_phi", claim, "Sec. 2.3 (Keskar et al. [7])", rule,
                 measured, len(holds), verdict(holds.values()))


def evaluate(report: mb.Report) -> list[Claim]:
  """Every claim of the paper, checked on `report`."""
  c = _Checker(report)
  r = report
  early = lambda run: run.mean_over(mb.LAMBDA_TRAIN, 0,  # noqa: E731
                                    mb.EARLY_EPOCHS)
  gap = lambda run: 100 * (run.final(c.test_err)  # noqa: E731
                           - run.final(c.train_err))
  test_err = _pct(lambda run: run.final(c.test_err))
  train_err = _pct(lambda run: run.final(c.train_err))
  noise = r.variants_of(mb.NOISE)
  linear = r.variants_of(mb.LINEARIZATION)
  ghost = r.variants_of(mb.GHOST)
  worst_noise = sorted(noise, key=lambda g: (
      g.diverged, common.spread(g.by_seed(train_err).values()).mean))[-1:]
  out = [
      c.larger_at_large_m(
          "fig1_train_error", "Training error rises with the batch size",
          "Fig. 1", c.train_err, "training top-1 error (%)", 100),
      c.larger_at_large_m(
          "fig1_test_error", "Test error rises with the batch size",
          "Fig. 1", c.test_err, "test top-1 error (%)", 100),
      c.sharper_along_line(),
      c.barrier("recompute"),
      c.barrier("interpolate"),
      c.larger_lr_flatter(),
      c.larger_at_large_m(
          "fig3_lambda_end", "lambda_max on training examples at the end "
          "is higher for large m", "Fig. 3, Sec. 2.3", mb.LAMBDA_TRAIN,
          "lambda_max (training examples)", digits=2),
      c.drop_jump("fig3_drop_jump_small_m", "lambda_max jumps when the "
                  "learning rate drops, at small m", "Fig. 3, Sec. 2.3",
                  mb.LAMBDA_TRAIN, c.small, True),
      c.drop_jump("fig3_drop_jump_large_m", "lambda_max does not jump at "
                  "the drop at large m", "Sec. 2.3", mb.LAMBDA_TRAIN,
                  c.large, False),
      c.larger_at_large_m(
          "fig4_lambda_test_end", "lambda_max averaged over test batches is "
          "higher for large m", "Fig. 4, Sec. 2.3", mb.LAMBDA_TEST,
          "lambda_max (test examples)", digits=2),
      c.drop_jump("fig4_drop_jump_small_m", "Test lambda_max jumps when the "
                  "learning rate drops, at small m", "Fig. 4",
                  mb.LAMBDA_TEST, c.small, True),
      c.larger_at_large_m(
          "fig5_distance", "Large-m parameters end closer to their initial "
          "values", "Fig. 5", mb.DISTANCE, "||θ − θ0||", digits=2,
          larger=False),
      c.larger_at_large_m(
          "fig5_norm", "Large-m parameters end with a smaller norm",
          "Fig. 5", mb.NORM, "||θ||", digits=2, larger=False),
      c.larger_at_large_m(
          "fig5_path_length", "Large-m parameters travel a shorter path",
          "Fig. 5", mb.PATH, "path length", digits=2, larger=False),
      c.above_small("sec21_ghost_gap", "Ghost batch norm (50) at the "
                    "largest m does not close the gap to small m",
                    "Sec. 2.1", ghost, "the ghost-batch-norm variant"),
      c.against_base("sec21_ghost_worse", "Ghost batch norm at the largest "
                     "m slightly lowers performance", "Sec. 2.1", ghost,
                     test_err, "final test error (%)", lower=False),
      c.above_small("sec24_noise", "Gradient noise (fixed, empirical, "
                    "annealed) does not rescue the largest m", "Sec. 2.4",
                    noise, "the best noise variant (lowest mean test error)"),
      c.against_base("sec24_noise_worse", "The worst gradient-noise "
                     "setting makes the largest m train worse, or unstable",
                     "Sec. 2.4", worst_noise, train_err,
                     "the final training error (%) of the noise variant "
                     "with the most diverged seeds, then the highest mean "
                     "training error, (a diverged seed counts as above)",
                     lower=False, diverged_holds=True),
      c.against_base("sec25_early_lambda", "Adaptive linearisation lowers "
                     "the early lambda_max", "Sec. 2.5", linear, early,
                     f"mean lambda_max over epochs (0, {mb.EARLY_EPOCHS}]",
                     lower=True),
      c.against_base("sec25_gap", "Adaptive linearisation lowers the "
                     "generalisation gap slightly", "Sec. 2.5", linear, gap,
                     "final test minus training error (points)",
                     lower=True),
      c.against_base("sec25_accuracy_cost", "... at the cost of slightly "
                     "lower accuracy", "Sec. 2.5", linear, test_err,
                     "final test error (%)", lower=False),
      c.keskar(),
      c.stability(),
  ]
  return out


# --- Output ------------------------------------------------------------------


def markdown(claims: Sequence[Claim], report: mb.Report) -> str:
  """The claims as a Markdown table with its reading notes."""
  lines = [
      f"Tier: {report.tier}. Errors with {report.bn_eval}. Numbers: mean ± "
      f"std [min, max] over seeds (n). Verdicts come from the rule alone: "
      f"agrees = it holds in every seed, disagrees = in none, mixed = in "
      f"some; checked: the seeds (or variant-seed pairs) the rule was "
      f"checked on; the small m is m={report.small_m}, the large m "
      f"m={report.large_m}.", "",
      *common.claims_table(claims)]
  return "\n".join(lines) + "\n"
