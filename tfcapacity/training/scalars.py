"""Which measured scalars a summary writer should take: finite and resolved.

A callback returns a flat dict of scalars (`callbacks.Callback`). Some of
them may be no number a plot can show:

  * inf, -inf or NaN, e.g. a gradient diversity whose gradients sum to zero
    (`gradients.statistics`);
  * a Gram matrix's least eigenvalue or condition number beyond the
    resolution of the floating-point type the matrix was computed in. A
    spectrum keyed `<prefix>_min_eigenvalue`, `<prefix>_max_eigenvalue`,
    `<prefix>_condition_number` carries `<prefix>_resolved` (1 or 0,
    `gradients.statistics.gram_spectrum`); where it is 0, the least
    eigenvalue lies within the round-off n eps |largest| of the matrix (or
    at or below zero) and is noise, and so is the condition number.

`finite_scalars` splits a dict of scalars into what a summary writer can
take and, for the rest, why not, so that the training loop writes the first
to TensorBoard and logs the second once. It imports no TensorFlow.
"""

from __future__ import annotations

import math
from typing import Mapping

from tfcapacity import rundir

# The flag a Gram spectrum carries (`<prefix>_resolved`, 1 or 0) ...
RESOLVED_SUFFIX = "_resolved"
# ... and the scalars of the spectrum that a 0 there marks as noise.
RESOLUTION_LIMITED = ("_min_eigenvalue", "_condition_number")
# Why a value that `float` does not take is dropped.
NOT_A_NUMBER = "not a number"


def unresolved_reason(dtype: str = "float32") -> str:
  """The reason `finite_scalars` gives for an unresolved scalar."""
  return f"unresolved (beyond {dtype} resolution)"


def _resolution_flag(key: str) -> str | None:
  for suffix in RESOLUTION_LIMITED:
    if key.endswith(suffix):
      return key[:-len(suffix)] + RESOLVED_SUFFIX
  return None


def _unresolved(scalars: Mapping[str, float], key: str) -> bool:
  flag = _resolution_flag(key)
  if flag is None or flag not in scalars:
    return False
  try:
    return float(scalars[flag]) == 0.0
  except (TypeError, ValueError):
    return False


def finite_scalars(scalars: Mapping[str, float], dtype: str = "float32"
                   ) -> tuple[dict[str, float], dict[str, str]]:
  """Splits `scalars` into those a summary writer can take and the others.

  Args:
    scalars: name -> value, e.g. the scalars the callbacks returned at a
      step.
    dtype: the floating-point type the run computes in (`--dtype`); it only
      words the reason for an unresolved scalar.

  Returns:
    (kept, dropped): kept maps each finite, resolved scalar to its value as
    a float, in the order of `scalars`; dropped maps each other key to why:
    `unresolved_reason(dtype)` ("unresolved (beyond float32 resolution)")
    for a `<prefix>_min_eigenvalue` or `<prefix>_condition_number` whose
    `<prefix>_resolved` is 0, else "inf", "-inf" or "nan", or "not a
    number" for a value `float` does not take (e.g. None). The flags
    `<prefix>_resolved` themselves are kept.
  """
  kept, dropped = {}, {}
  for key, value in scalars.items():
    try:
      number = float(value)
    except (TypeError, ValueError):
      dropped[key] = NOT_A_NUMBER
      continue
    if _unresolved(scalars, key):
      dropped[key] = unresolved_reason(dtype)
    elif not math.isfinite(number):
      dropped[key] = rundir.non_finite_reason(number)
    else:
      kept[key] = number
  return kept, dropped


def describe(dropped: Mapping[str, str]) -> str:
  """One log line's worth: "key: reason; key: reason" in key order."""
  return "; ".join(f"{key}: {dropped[key]}" for key in sorted(dropped))
