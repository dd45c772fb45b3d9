"""The maxi-batch study's figures, drawn from a `maxibatch.Report`.

Curves and points are means over seeds with a min-max band (Fig. 2b
draws one model per panel):
  Fig. 1   final training and test error against m, per learning rate and
           at the best rate per m;
  Fig. 2   loss and error along the line from the smallest m's best model
           to each largest-m model (same seed), with batch-norm statistics
           recomputed and interpolated (tfcapacity.interpolate); Fig. 2b
           the training loss on a filter-normalised plane around two models;
  Fig. 3   lambda_max on fixed training examples over epochs per m (best
           rate) and per rate at the largest m, with the stability
           threshold 2(1+beta)/eta and the learning-rate drop;
  Fig. 4   the same on test examples;
  Fig. 5   ||theta_t - theta_0||, ||theta_t|| and the path length per m;
  Fig. 6   the variants against the plain largest-m run: errors and
           lambda_max over epochs, final test error per variant, the
           rectifier slopes and the gradient-noise scale.
A panel whose key is missing from the runs says "not measured".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tfcapacity import data as data_lib
from tfcapacity import figures as figures_lib
from tfcapacity.studies import common
from tfcapacity.studies import maxibatch as mb


def _not_measured(ax, what: str) -> None:
  ax.text(0.5, 0.5, f"not measured\n({what} not in these runs)",
          ha="center", va="center", transform=ax.transAxes, color="0.4")
  ax.set_xticks([])
  ax.set_yticks([])


def _draw_band(ax, band, color, label=None, marker=".", ls="-",
               alpha=0.18) -> None:
  x, mean, lo, hi, _ = band
  if not len(x):
    return
  ax.plot(x, mean, ls=ls, marker=marker, ms=4, color=color, label=label)
  if np.any(hi > lo):
    ax.fill_between(x, lo, hi, color=color, alpha=alpha, lw=0)


class _Style:
  """Colours shared by a report's figures, and the lr-drop markers."""

  def __init__(self, report: mb.Report, plt):
    self.report = report
    self.ms = report.ms
    self.lrs = report.learning_rates
    self.cmap = plt.get_cmap("viridis")
    self.tab = plt.get_cmap("tab20")

  def m(self, m: int):
    if m not in self.ms:
      return "0.3"
    return self.cmap(0.85 * self.ms.index(m) / max(1, len(self.ms) - 1))

  def lr(self, lr: float):
    return f"C{self.lrs.index(lr)}" if lr in self.lrs else "0.3"

  def variant(self, j: int):
    return self.tab((2 * j) % 20 / 20 + (0.05 if j >= 10 else 0))

  def drops(self, ax, label: bool = True) -> None:
    for i, epoch in enumerate(self.report.lr_drop_epochs):
      ax.axvline(epoch, color="0.45", lw=1, ls=":",
                 label=f"lr drop (epoch {epoch:g})" if label and i == 0
                 else None)


def _thresholds(ax, groups: Sequence[mb.Group], color) -> None:
  """The stability threshold 2(1+beta)/eta of each group's learning rate,
  dashed and step-shaped: a row's value is that of the rate of the steps
  before it, so it holds over the interval that ends at the row."""
  for g in groups:
    if not g.has(mb.THRESHOLD):
      continue
    x, mean, _, _, _ = g.band(mb.THRESHOLD)
    ax.plot(x, mean, ls="--", lw=1.2, drawstyle="steps-pre",
            color=color(g), alpha=0.9,
            label=f"2(1+β)/η, lr={g.learning_rate:g}")


def _fig1(report: mb.Report, style: _Style, plt) -> bytes:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  lrs = report.learning_rates
  for ax, split in zip(axes, data_lib.SPLITS):
    key = report.error_key(split)
    for i, lr in enumerate(lrs):
      groups = [g for (_, glr), g in sorted(report.grid.items())
                if glr == lr and g.completed]
      if not groups:
        continue
      stats = [g.final(key, 100) for g in groups]
      shift = 1 + 0.05 * (i - (len(lrs) - 1) / 2)
      mean = np.array([s.mean for s in stats])
      ax.errorbar([g.batch_size * shift for g in groups], mean,
                  yerr=[mean - [s.min for s in stats],
                        [s.max for s in stats] - mean],
                  fmt="--o", ms=4, capsize=3, alpha=0.75,
                  color=style.lr(lr), label=f"lr={lr:g}")
    if style.ms:
      stats = [report.best[m].final(key, 100) for m in style.ms]
      ax.plot(style.ms, [s.mean for s in stats], "k-s", ms=5,
              label="best lr per m")
      ax.fill_between(style.ms, [s.min for s in stats],
                      [s.max for s in stats], color="k", alpha=0.12, lw=0)
      for m, s in zip(style.ms, stats):
        ax.annotate(f"lr {report.best[m].learning_rate:g}", (m, s.mean),
                    textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=7)
    ax.set_xscale("log")
    ax.set_xticks(style.ms or [1])
    ax.set_xticklabels([str(m) for m in style.ms] or [""])
    ax.minorticks_off()
    ax.set_xlabel("batch size m (log scale)")
    ax.set_ylabel(f"final {split} top-1 error (%)")
    noise = max((float(g.flags.get("label_noise") or 0.0)
                 for g in report.grid.values()), default=0.0)
    ax.set_title(f"{split.capitalize()} error" + (
        f" (labels as trained: {noise:.0%} replaced at random)"
        if split == "train" and noise else
        " (clean labels)" if noise else ""), fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Fig. 1: final error vs batch size, same epochs for every m "
               f"({report.bn_eval})\nmean over seeds; bars and band: min–max "
               f"over seeds; numbers: the best lr", fontsize=10)
  return figures_lib.png(fig)


def _fig2(report: mb.Report, style: _Style, plt) -> bytes:
  fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
  groups = mb.line_groups(report)
  for col, bn in enumerate(mb.LINE_BN_STATS):
    shown = [(label, lines) for (b, label), lines in groups.items()
             if b == bn]
    for ax in axes[:, col]:
      for x in (0, 1):
        ax.axvline(x, color="0.6", lw=0.8, ls=":")
      ax.grid(alpha=0.3)
    if not shown:
      for ax in axes[:, col]:
        _not_measured(ax, f"--bn_stats={bn} lines")
      continue
    for i, (label, lines) in enumerate(shown):
      color = style.lr(lines[0].end.learning_rate) if not lines[0].end.group \
          else style.variant(i + 4)
      for row_, (key, scale) in enumerate((("loss", 1), ("top1_error", 100))):
        ax = axes[row_, col]
        for split, ls in (("train", "-"), ("test", "--")):
          curves = [(ln.data["alphas"], scale * np.asarray(
              ln.data[f"{split}_{key}"], float)) for ln in lines]
          _draw_band(ax, common.band(curves), color, marker=None, ls=ls,
                     label=(f"→ {label.split(' → ')[1]} ({len(lines)} "
                            f"seeds)" if row_ == 0 and split == "train"
                            else None),
                     alpha=0.18 if split == "train" else 0.08)
    axes[0, col].set_yscale("log")
    start = shown[0][1][0].start
    axes[0, col].set_title(f"--bn_stats={bn}; from m={start.batch_size}, "
                           f"lr={start.learning_rate:g}", fontsize=10)
    axes[0, col].legend(fontsize=7)
  axes[0, 0].set_ylabel("cross-entropy loss (log scale)")
  axes[1, 0].set_ylabel("top-1 error (%)")
  for ax in axes[1]:
    ax.set_xlabel("α (0: small-m model, 1: large-m model)")
  fig.suptitle("Fig. 2: loss along (1−α)·θ_small + α·θ_large, mean over "
               "seeds (band: min–max); solid: train, dashed: test\n"
               "recompute: batch-norm statistics recomputed at every point; "
               "interpolate: the end points' statistics interpolated",
               fontsize=10)
  return figures_lib.png(fig)


def _fig2b(report: mb.Report, plt) -> bytes:
  fig, axes = plt.subplots(1, len(report.planes), figsize=(
      5.6 * len(report.planes), 4.8), squeeze=False)
  grids = [np.log10(np.maximum(np.asarray(data["train_loss"], float),
                               1e-12)) for _, data in report.planes]
  finite = np.concatenate([g[np.isfinite(g)] for g in grids])
  levels = np.linspace(finite.min(), finite.max(), 21) if (
      finite.size and finite.max() > finite.min()) else 20
  for ax, (run, data), z in zip(axes[0], report.planes, grids):
    a, b = np.asarray(data["alphas"], float), np.asarray(data["betas"], float)
    filled = ax.contourf(a, b, z.T, levels=levels, cmap="magma_r")
    ax.contour(a, b, z.T, levels=levels, colors="k", linewidths=0.3)
    ax.plot(0, 0, "c*", ms=12, label="trained model")
    ax.locator_params(nbins=5)
    ax.set_xlabel("α (filter-normalised direction 1)")
    ax.set_ylabel("β (filter-normalised direction 2)")
    ax.set_title(f"m={run.batch_size}, lr={run.learning_rate:g}, seed "
                 f"{run.seed} ({data.get('bn_stats', 'recompute')} BN)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
  fig.colorbar(filled, ax=axes[0][-1], label="log10 training loss",
               format="%.2f")
  fig.suptitle("Fig. 2b: training loss on a random plane around each model "
               "(Li et al. 2018), same colour scale", fontsize=10)
  buf = figures_lib.png(fig)
  return buf


def _fig_lambda(report: mb.Report, style: _Style, plt, number: int, key: str,
                what: str) -> bytes:
  fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.6), sharey=True)
  large = report.large_m
  groups_left = [report.best[m] for m in style.ms]
  groups_right = [g for (m, _), g in sorted(report.grid.items())
                  if m == large and g.completed]
  if not any(g.has(key) for g in groups_left + groups_right):
    for ax in axes:
      _not_measured(ax, key)
  else:
    for g in groups_left:
      _draw_band(axes[0], g.band(key), style.m(g.batch_size),
                 label=f"m={g.batch_size} (lr={g.learning_rate:g})")
    seen = {}
    for g in groups_left:
      seen.setdefault(g.learning_rate, g)
    _thresholds(axes[0], list(seen.values()),
                lambda g: style.lr(g.learning_rate))
    for g in groups_right:
      _draw_band(axes[1], g.band(key), style.lr(g.learning_rate),
                 label=f"lr={g.learning_rate:g}")
    _thresholds(axes[1], groups_right,
                lambda g: style.lr(g.learning_rate))
    for ax in axes:
      style.drops(ax)
      ax.set_yscale("log")
      ax.set_xlabel("epoch")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("λ_max, top Hessian eigenvalue (log scale)")
  axes[0].set_title("best lr per m")
  axes[1].set_title(f"m={large}: every learning rate")
  modes = report.curvature_bn_modes()
  how = (f"; batch norm: {', '.join(modes)}" if modes else "")
  fig.suptitle(f"Fig. {number}: λ_max on {what} over training, mean over "
               f"seeds (band: min–max){how}\ndashed: stability threshold "
               f"2(1+β)/η at the current rate; dotted: lr drop", fontsize=10)
  return figures_lib.png(fig)


def _fig5(report: mb.Report, style: _Style, plt) -> bytes:
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
  for ax, (key, label) in zip(axes, (
      (mb.DISTANCE, "||θ_t − θ_0|| (distance from init)"),
      (mb.NORM, "||θ_t|| (parameter norm)"),
      (mb.PATH, "path length Σ||θ_{t+1} − θ_t||"))):
    groups = [report.best[m] for m in style.ms]
    if not any(g.has(key) for g in groups):
      _not_measured(ax, key)
      ax.set_title(label, fontsize=9)
      continue
    for g in groups:
      _draw_band(ax, g.band(key), style.m(g.batch_size), marker=None,
                 label=f"m={g.batch_size} (lr={g.learning_rate:g})")
    style.drops(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel(label + " (L2, trainable weights)", fontsize=8)
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
  if axes[0].get_legend_handles_labels()[0]:
    axes[0].legend(fontsize=7)
  fig.suptitle("Fig. 5: how far the parameters travel, best lr per m, mean "
               "over seeds (band: min–max)", fontsize=10)
  return figures_lib.png(fig)


def _fig6(report: mb.Report, style: _Style, plt) -> bytes | None:
  base = report.baseline()
  shown = [g for g in report.variants.values() if g.completed]
  if not shown or base is None:
    return None
  fig, axes = plt.subplots(2, 4, figsize=(16, 8.5),
                           width_ratios=(1, 1, 1, 0.42))
  for ax in axes[:, 3]:
    ax.axis("off")
  colors = {g.name: style.variant(j) for j, g in enumerate(shown)}
  colors[base.name] = "k"
  for ax, key, name in ((axes[0, 0], report.error_key("train"),
                         "training top-1 error (%)"),
                        (axes[0, 1], report.error_key("test"),
                         "test top-1 error (%)"),
                        (axes[0, 2], mb.LAMBDA_TRAIN,
                         "λ_max on training examples (log)")):
    scale = 1 if key == mb.LAMBDA_TRAIN else 100
    if not any(g.has(key) for g in [base] + shown):
      _not_measured(ax, key)
      continue
    for g in [base] + shown:
      _draw_band(ax, g.band(key, scale), colors[g.name],
                 marker=None, alpha=0.1,
                 label=(f"plain {g.name}" if g is base else g.name))
    style.drops(ax, label=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    if key == mb.LAMBDA_TRAIN:
      ax.set_yscale("log")
  # Final test error per variant, each seed a dot.
  ax = axes[1, 0]
  key = report.error_key("test")
  small = report.best.get(report.small_m) if report.small_m else None
  rows = ([small] if small is not None else []) + [base] + shown
  for y, g in enumerate(rows):
    s = g.final(key, 100)
    if not s.n:
      continue
    ax.errorbar(s.mean, y, xerr=[[s.mean - s.min], [s.max - s.mean]],
                fmt="o", color=colors.get(g.name, "C0"), capsize=3)
    ax.plot(s.values, [y] * s.n, "x", color="0.4", ms=4)
  if small is not None:
    s = small.final(key, 100)
    ax.axvspan(s.min, s.max, color="C0", alpha=0.12, lw=0)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([(f"m={g.batch_size} best (lr={g.learning_rate:g})"
                       if g is small else f"plain {g.name}" if g is base
                       else g.name) for g in rows], fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel(f"final test top-1 error (%); o: mean, bars: min–max, "
                f"x: seeds", fontsize=8)
  ax.grid(alpha=0.3, axis="x")
  for ax, key, kind, name in (
      (axes[1, 1], mb.SLOPE, mb.LINEARIZATION, "mean rectifier slope (x<0)"),
      (axes[1, 2], mb.GRAD_NOISE_STD, mb.NOISE, "gradient-noise std")):
    groups = [g for g in shown
              if mb.variant_kind(g.runs[0]) == kind and g.has(key)]
    if not groups:
      _not_measured(ax, key)
      ax.set_title(name, fontsize=9)
      continue
    for g in groups:
      _draw_band(ax, g.band(key), colors[g.name], marker=None)
    style.drops(ax, label=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel(name)
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
    if key == mb.GRAD_NOISE_STD:
      ax.set_yscale("log")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  axes[0, 3].legend(handles, labels, loc="upper left", fontsize=8,
                    title="runs (mean; band: min–max)", title_fontsize=8)
  fig.suptitle(f"Fig. 6: m={base.batch_size} at lr={base.learning_rate:g} "
               f"with ghost batch norm (Sec. 2.1), gradient noise "
               f"(Sec. 2.4) and adaptive linearisation (Sec. 2.5); "
               f"errors with {report.bn_eval}", fontsize=10)
  return figures_lib.png(fig)


def figures(report: mb.Report) -> dict[str, bytes]:
  """Figs. 1-6 as PNG bytes by file name (Fig. 2 with interpolation lines,
  2b with planes, 6 with variants)."""
  plt = figures_lib.pyplot()
  style = _Style(report, plt)
  out = {"maxibatch_fig1_error_vs_batch_size.png": _fig1(report, style, plt)}
  if report.lines:
    out["maxibatch_fig2_interpolation.png"] = _fig2(report, style, plt)
  if report.planes:
    out["maxibatch_fig2b_planes.png"] = _fig2b(report, plt)
  out["maxibatch_fig3_lambda_max_train.png"] = _fig_lambda(
      report, style, plt, 3, mb.LAMBDA_TRAIN, "training examples")
  out["maxibatch_fig4_lambda_max_test.png"] = _fig_lambda(
      report, style, plt, 4, mb.LAMBDA_TEST, "test examples")
  out["maxibatch_fig5_distance.png"] = _fig5(report, style, plt)
  fig6 = _fig6(report, style, plt)
  if fig6 is not None:
    out["maxibatch_fig6_variants.png"] = fig6
  return out
