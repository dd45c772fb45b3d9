"""The one PNG writer: matplotlib figures to PNG bytes or files.

Every figure tfcapacity draws (interpolation lines and planes, spectral
densities, the studies' panels) goes through here: a headless backend, a
tight layout, 120 dpi by default, the figure closed after rendering, and
files written atomically (temp file and rename), so a killed run never
leaves half a PNG under the final name.
"""

from __future__ import annotations

import io

from tfcapacity import rundir


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def png(fig, dpi: int = 120) -> bytes:
  """The figure as PNG bytes (tight layout); the figure is closed."""
  plt = pyplot()
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=dpi)
  plt.close(fig)
  return buf.getvalue()


def save_png(fig, path: str, dpi: int = 120) -> str:
  """Writes the figure to `path` atomically and closes it; returns path."""
  rundir.atomic_write(path, png(fig, dpi))
  return path
