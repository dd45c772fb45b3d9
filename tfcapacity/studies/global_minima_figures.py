"""The figures of the global-minima study (`global_minima.Report`).

  (a) global_minima_width_needed.png: width needed against H, log scales,
      mlp against fc_resnet, one marker per seed and the median; a seed that
      fitted at no width in the grid sits above the grid's widest width.
  (b) global_minima_lambda0.png: lambda_min(Theta(0)) against H (the widest
      run of each seed), with the float32 resolution n eps_32 lambda_max
      drawn below which only float64 resolves it.
  (c) global_minima_drift.png: at the drift depths, the largest Gram drift
      and the largest relative weight change against width, with a slope
      -1/2 guide.
  (d) global_minima_loss.png: training loss against step on a log scale at
      the drift depths, one line per width (first seed), the linearised
      model's loss dashed for the widest.
"""

from __future__ import annotations

import math

from matplotlib import ticker
import numpy as np

from tfcapacity import figures as figures_lib
from tfcapacity.errors import UserError
from tfcapacity.studies import global_minima as gm

COLORS = {"mlp": "tab:red", "fc_resnet": "tab:blue"}


def _log2_axis(ax, values, label):
  ax.set_xscale("log", base=2)
  ax.set_xticks(values, [str(v) for v in values])
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_xlabel(label)


def figures(report: gm.Report) -> dict[str, bytes]:
  """The PNGs by file name.

  Raises:
    UserError: no runs.
  """
  if not report.runs:
    raise UserError("no finished runs to plot yet; run the study first")
  plt = figures_lib.pyplot()
  plan = report.plan
  out = {}
  hs = sorted({r.H for r in report.runs})

  # (a) Width needed against H.
  fig, ax = plt.subplots(figsize=(6, 4.2))
  ceiling = max(plan.widths) * 2
  for k, model in enumerate(plan.models):
    xs, medians = [], []
    for depth in plan.depths:
      needed = report.needed_by_seed(model, depth)
      if not needed:
        continue
      h = gm.layers_below_output(model, depth)
      shift = 2 ** ((k - 0.5) * 0.08)
      for i, (seed, value) in enumerate(sorted(needed.items())):
        y = ceiling if math.isinf(value) else value
        ax.scatter(h * shift * 2 ** ((i - 1) * 0.03), y, color=COLORS.get(
            model, "k"), marker="^" if math.isinf(value) else "o", s=28,
                   alpha=0.8)
      xs.append(h * shift)
      medians.append(min(float(np.median(list(needed.values()))), ceiling))
    ax.plot(xs, medians, color=COLORS.get(model, "k"), label=f"{model} "
            f"(median over seeds)")
  ax.axhline(ceiling, color="0.5", ls=":", lw=1)
  ax.text(0.01, ceiling, " ^ no width run fitted (widths above the "
          "parameter cap are not run)",
          transform=ax.get_yaxis_transform(), va="bottom", fontsize=8)
  ax.text(0.01, min(plan.widths) / 1.12, " the narrowest width of the grid: "
          "the width needed is at most this",
          transform=ax.get_yaxis_transform(),
          va="top", fontsize=7, color="0.35")
  ax.set_yscale("log", base=2)
  ax.set_yticks(plan.widths, [str(w) for w in plan.widths])
  ax.yaxis.set_minor_locator(ticker.NullLocator())
  ax.set_ylim(min(plan.widths) / 1.5, ceiling * 1.8)
  _log2_axis(ax, hs, "H (layers below the output)")
  ax.set_ylabel("width needed to fit (log scale)")
  ax.set_title(f"Width at which GD fits random signs within "
               f"{report.budget} steps", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="center right")
  out["global_minima_width_needed.png"] = figures_lib.png(fig)

  # (b) The least eigenvalue of Theta(0) against H.
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for model in plan.models:
    pts, limits = [], []
    for depth in plan.depths:
      for seed in plan.seeds:
        runs = [r for r in report.runs if r.key == gm.Key(model, depth, seed)
                and r.ntk]
        if not runs:
          continue
        r = max(runs, key=lambda r: r.width)
        pts.append((r.H, r.ntk_at(0, 1)))
        limits.append((r.H, r.n * float(np.finfo(np.float32).eps)
                       * r.ntk_at(0, 2)))
    if pts:
      xs = sorted({h for h, _ in pts})
      ax.scatter([h for h, _ in pts], [max(v, 1e-300) for _, v in pts],
                 color=COLORS.get(model, "k"), s=22, alpha=0.8)
      ax.plot(xs, [np.median([v for h, v in pts if h == x]) for x in xs],
              color=COLORS.get(model, "k"), label=f"{model} lambda_min")
      ax.plot(xs, [np.median([v for h, v in limits if h == x]) for x in xs],
              color=COLORS.get(model, "k"), ls=":", lw=1,
              label=f"{model}: float32 resolution")
  ax.set_yscale("log")
  _log2_axis(ax, hs, "H (layers below the output)")
  ax.set_ylabel("least eigenvalue of Theta(0)")
  ax.set_title("The NTK Gram matrix at initialisation (widest run per seed)",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  out["global_minima_lambda0.png"] = figures_lib.png(fig)

  # (c) Drift and weight change against width at the drift depths.
  panels = [("max_drift", "max_t ||Theta(t)-Theta(0)||_2 / lambda_min(0)"),
            ("max_relative_change", "largest ||W_T-W_0||_F / ||W_0||_F")]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  any_data = False
  for ax, (attr, label) in zip(axes, panels):
    for depth in plan.drift_depths:
      for model in plan.models:
        by_width = {}
        for r in report.runs:
          if r.model == model and r.depth == depth:
            value = getattr(r, attr)
            if math.isfinite(value) and value > 0:
              by_width.setdefault(r.width, []).append(value)
        if not by_width:
          continue
        any_data = True
        ws = sorted(by_width)
        for w in ws:
          ax.scatter([w] * len(by_width[w]), by_width[w], s=16, alpha=0.7,
                     color=COLORS.get(model, "k"))
        med = [float(np.median(by_width[w])) for w in ws]
        ax.plot(ws, med, color=COLORS.get(model, "k"), label=f"{model} "
                f"H={gm.layers_below_output(model, depth)}")
        guide = med[0] * (np.asarray(ws, float) / ws[0]) ** -0.5
        ax.plot(ws, guide, color=COLORS.get(model, "k"), ls=":", lw=1)
    if attr == "max_drift":
      ax.axhline(gm.DRIFT_BOUND, color="0.4", ls="--", lw=1,
                 label="1/2 (the proofs' bound)")
    ax.set_yscale("log")
    _log2_axis(ax, plan.widths, "width m (dotted: slope -1/2)")
    ax.set_ylabel(label, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Lazy training: Gram drift and weight change shrink with "
               "width", fontsize=10)
  if any_data:
    out["global_minima_drift.png"] = figures_lib.png(fig)
  else:
    plt.close(fig)

  # (d) Loss curves at the drift depths.
  first_seed = plan.seeds[0]
  panels = [(m, d) for d in plan.drift_depths for m in plan.models
            if any(r.model == m and r.depth == d for r in report.runs)]
  if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4),
                             squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, (model, depth) in zip(axes[0], panels):
      runs = sorted((r for r in report.runs
                     if r.key == gm.Key(model, depth, first_seed)),
                    key=lambda r: r.width)
      for i, r in enumerate(runs):
        color = cmap(i / max(1, len(runs) - 1) * 0.9)
        ax.plot(r.curve_steps, r.curve_losses, color=color,
                label=f"width {r.width}")
      if runs and len(runs[-1].linearised_losses):
        lin = runs[-1].linearised_losses
        ax.plot(np.arange(len(lin)), lin, color="k", ls="--", lw=1,
                label=f"linearised, width {runs[-1].width}")
      ax.axhline(gm.LOSS_THRESHOLD, color="0.5", ls=":", lw=1)
      ax.set_yscale("log")
      ax.set_xlabel("GD step")
      ax.set_title(f"{model}, H={gm.layers_below_output(model, depth)}, "
                   f"seed {first_seed}", fontsize=10)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss (mean 1/2 (f-y)^2, log scale)")
    out["global_minima_loss.png"] = figures_lib.png(fig)
  return out
