"""Measurements: flags to callbacks, training apart from them, the reader."""

import ast
import math
import os

import pytest

from tfcapacity import config
from tfcapacity import measurements
from tfcapacity import rundir
from tfcapacity.curvature import callback as curvature_callback
from tfcapacity.curvature import linearize
from tfcapacity.gradients import callback as gradients_callback

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "tfcapacity")


def module_names():
  """Every module of tfcapacity -> its file."""
  out = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        module = os.path.relpath(path[:-3], os.path.dirname(PACKAGE))
        module = module.replace(os.sep, ".").removesuffix(".__init__")
        out[module] = path
  return out


def imports(path, modules):
  """The tfcapacity modules a file imports, inside functions too."""
  with open(path) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in modules else node.module)
  return {name for name in found if name.split(".")[0] == "tfcapacity"}


def test_training_imports_no_measurement():
  modules = module_names()
  training = {m: p for m, p in modules.items()
              if m == "tfcapacity.training" or
              m.startswith("tfcapacity.training.")}
  assert "tfcapacity.training.loop" in training
  for module, path in training.items():
    for name in imports(path, modules):
      assert not name.startswith(("tfcapacity.curvature",
                                  "tfcapacity.gradients",
                                  "tfcapacity.measurements")), (module, name)


def test_no_import_cycle_through_training_or_measurements():
  modules = module_names()
  graph = {m: imports(p, modules) & set(modules) for m, p in modules.items()}

  def reaches(start, target):
    seen, stack = set(), list(graph[start])
    while stack:
      module = stack.pop()
      if module == target:
        return True
      if module not in seen:
        seen.add(module)
        stack.extend(graph[module])
    return False

  for module in graph:
    if module.startswith(("tfcapacity.training", "tfcapacity.measurements")):
      assert not reaches(module, module), module


def test_flags_map_to_callbacks_in_a_fixed_order():
  assert measurements.from_config(config.make()) == []
  cfg = config.make(curvature_every_epochs=1, gradients_every_steps=5,
                    linearize_every_steps=3, activation="leaky_relu")
  kinds = [type(cb) for cb in measurements.from_config(cfg)]
  assert kinds == [curvature_callback.CurvatureCallback,
                   linearize.LinearizationCallback,
                   gradients_callback.GradientStatisticsCallback]


NEW = {  # As the loop writes results.json: callback rows in measurements.
    "history": [{"epoch": 0, "step": 0, "train_loss": 2.0},
                {"epoch": 1, "step": 10, "train_loss": 1.0}],
    "measurements": [{"epoch": 0, "step": 0, "curvature/lambda_max": 3.0,
                      "grad_variance/a": 0.5},
                     {"epoch": 0, "step": 5, "curvature/lambda_max": "nan"},
                     {"epoch": 1, "step": 10, "curvature/lambda_max": 4.0,
                      "grad_variance/b": 0.25}]}
OLD = {  # Before: a callback's row at an evaluation joined the evaluation.
    "history": [{"epoch": 0, "step": 0, "train_loss": 2.0,
                 "curvature/lambda_max": 3.0, "grad_variance/a": 0.5},
                {"epoch": 1, "step": 10, "train_loss": 1.0,
                 "curvature/lambda_max": 4.0, "grad_variance/b": 0.25}],
    "measurements": [{"epoch": 0, "step": 5, "curvature/lambda_max": "nan"}]}


@pytest.mark.parametrize("results", [NEW, OLD], ids=["new", "old"])
def test_series_reads_both_layouts(results):
  points = rundir.series(results, "curvature/lambda_max")
  assert [(s, e) for s, e, _ in points] == [(0, 0), (5, 0), (10, 1)]
  assert points[0][2] == 3.0 and points[2][2] == 4.0
  assert math.isnan(points[1][2])  # results.json writes NaN as "nan".
  assert rundir.series(results, "train_loss") == [(0, 0, 2.0), (10, 1, 1.0)]
  assert rundir.series(results, "nope") == []
  assert rundir.keys_with_prefix(results, "grad_variance/") == [
      "grad_variance/a", "grad_variance/b"]
  assert rundir.series({"history": []}, "train_loss") == []
