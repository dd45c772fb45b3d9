"""Progress of long work: a tqdm bar on a terminal, else log lines.

`TrainingBar` is the training loop's bar, with log lines printed above it.

The eigen-solvers, the sharpness search and the loss landscape call
`progress(iteration, info)` as they go (`eigen.Progress`); `Progress` shows
those calls to a person. A bar on stderr only when it is a terminal, so that
logs of batch jobs hold an absl line every `every` iterations instead of
carriage-return noise.
"""

from __future__ import annotations

import logging as std_logging
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


class _AboveBar(std_logging.Handler):
  """Passes records to `inner` with the bars cleared, then redraws them:
  log lines print above a bar instead of into it."""

  def __init__(self, inner: std_logging.Handler):
    super().__init__(inner.level)
    self.inner = inner

  def handle(self, record):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    with tqdm.external_write_mode(file=sys.stderr):
      return self.inner.handle(record)

  def emit(self, record):  # Not called: handle() delegates.
    self.inner.emit(record)


class TrainingBar:
  """The training loop's bar: steps done of `total`, with the batch loss.

  A tqdm bar on stderr when it is a terminal; while it is shown, absl's log
  lines (and any logging record) print above it, never into it. Otherwise
  nothing (the loop's epoch lines say where training is).
  """

  def __init__(self, total: int, initial: int = 0, desc: str = "train"):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm(total=total, initial=initial, desc=desc,
                     file=sys.stderr, unit="step", dynamic_ncols=True,
                     leave=True)
    root = std_logging.getLogger()
    self._swapped = [(h, _AboveBar(h)) for h in root.handlers]
    for old, new in self._swapped:
      root.removeHandler(old)
      root.addHandler(new)

  @staticmethod
  def wanted(flag: bool) -> bool:
    """Whether to show a bar: the flag is on and stderr is a terminal."""
    return bool(flag) and sys.stderr.isatty()

  def update(self, step: int, **postfix) -> None:
    self._bar.update(max(0, step - self._bar.n))
    if postfix:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()},
                            refresh=False)

  def close(self) -> None:
    if self._bar is None:
      return
    root = std_logging.getLogger()
    for old, new in self._swapped:
      root.removeHandler(new)
      root.addHandler(old)
    self._bar.close()
    self._bar = None
