"""The one PNG writer: matplotlib figures to PNG bytes or files.

Every figure tfcapacity draws (interpolation lines and planes, spectral
densities, gradient cosines, the studies' panels) goes through here: a
headless backend, a tight layout, 120 dpi by default, the figure closed after
rendering, and files written atomically (temp file and rename), so a killed
run never leaves half a PNG under the final name. `subject` is the line
naming the model and examples in an analysis tool's titles.
"""

from __future__ import annotations

import io
import os

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


def subject(described: dict) -> str:
  """One line naming the model and examples a tool measured, for a title.

  Args:
    described: a tool's result, or `rundir.Loaded.description` (source,
      path, step, at_init, num_examples, dataset, split, loss).

  Returns:
    e.g. "w256 at step 440, 500 digits train examples, cross-entropy loss".
  """
  path = described.get("path")
  model = os.path.basename(os.path.normpath(path)) if path else "model"
  if described.get("source") == "model_dir":
    if described.get("at_init"):
      model += " at initialisation"
    elif described.get("step") is not None:
      model += f" at step {described['step']}"
  parts = [model]
  if described.get("num_examples") is not None:
    parts.append(f"{described['num_examples']} {described.get('dataset', '')} "
                 f"{described.get('split', '')} examples")
  if described.get("loss"):
    parts.append(f"{described['loss'].replace('_', '-')} loss")
  return ", ".join(" ".join(p.split()) for p in parts)
