"""Progress of a long measurement: a tqdm bar on a terminal, else log lines.

The eigen-solvers, the sharpness search and the loss landscape call
`progress(iteration, info)` as they go (`eigen.Progress`); `Progress` shows
those calls to a person. A bar on stderr only when it is a terminal, so that
logs of batch jobs hold an absl line every `every` iterations instead of
carriage-return noise.
"""

from __future__ import annotations

import sys

from absl import logging


class Progress:
  """`progress(iteration, info)` callbacks shown as a bar or as log lines.

  A tqdm bar on stderr when it is a terminal (and `bar` is on); otherwise an
  absl log line every `every` iterations. A context manager: the bar is
  closed on exit.
  """

  def __init__(self, desc: str, total: int | None = None, *,
               bar: bool = True, every: int = 10):
    self.desc = desc
    self.every = every
    self._bar = None
    if bar and sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                       dynamic_ncols=True)

  def __call__(self, iteration: int, info: dict) -> None:
    shown = {k: f"{v:.4g}" if isinstance(v, float) else v
             for k, v in info.items() if isinstance(v, (int, float, str))}
    if self._bar is not None:
      self._bar.update(max(0, iteration - self._bar.n))
      self._bar.set_postfix(shown, refresh=False)
    elif iteration % self.every == 0:
      logging.info("%s: %d %s", self.desc, iteration,
                   " ".join(f"{k}={v}" for k, v in shown.items()))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
