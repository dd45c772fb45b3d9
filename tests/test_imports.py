"""The package's import graph: no cycle, no private name across modules.

Every `import` statement of every module under tfcapacity/ is read with
`ast`, those inside functions included (a function-level import is how a
cycle hides), and the graph of tfcapacity modules is checked:

  * no cycle (strongly connected components of size one only);
  * no module uses another tfcapacity module's `_private` name, and nobody
    walks layers through Keras' private `_flatten_layers`;
  * the layers keep their order: data and models import nothing above
    them, the objective imports no measurement or training code, and
    training knows no measurement (curvature, gradients, landscape, the
    composition root `measurements`).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tfcapacity"


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def read_modules(package: pathlib.Path = PACKAGE) -> dict[str, ast.Module]:
  return {module_name(p, package.parent): ast.parse(p.read_text(),
                                                    filename=str(p))
          for p in sorted(package.rglob("*.py"))}


def imports_of(tree: ast.Module, modules) -> tuple[set[str], list[tuple]]:
  """(tfcapacity modules imported, [(module, name)] names taken from them)."""
  edges, names = set(), []
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("tfcapacity"):
          edges.add(alias.name)
    elif (isinstance(node, ast.ImportFrom) and node.module
          and node.module.startswith("tfcapacity")):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if full in modules:
          edges.add(full)
          aliases[alias.asname or alias.name] = full
        else:
          edges.add(node.module)
          names.append((node.module, alias.name))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases):
      names.append((aliases[node.value.id], node.attr))
  return edges, names


def graph(modules) -> dict[str, set[str]]:
  return {name: {m for m in imports_of(tree, modules)[0] if m in modules}
          for name, tree in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


MODULES = read_modules()


def test_the_reader_sees_function_level_imports_and_finds_cycles(tmp_path):
  pkg = tmp_path / "tfcapacity"
  (pkg / "a").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a" / "__init__.py").write_text("")
  (pkg / "a" / "x.py").write_text("from tfcapacity.a import y\n")
  (pkg / "a" / "y.py").write_text(
      "def f():\n  from tfcapacity.a import x\n  return x._hidden\n")
  (pkg / "b.py").write_text("from tfcapacity.a import y\n")
  modules = read_modules(pkg)
  assert cycles(graph(modules)) == [["tfcapacity.a.x", "tfcapacity.a.y"]]
  _, names = imports_of(modules["tfcapacity.a.y"], modules)
  assert ("tfcapacity.a.x", "_hidden") in names


def test_the_package_is_read_whole():
  assert len(MODULES) > 40
  for name in ("tfcapacity.objective.objective", "tfcapacity.rundir",
               "tfcapacity.training.loop", "tfcapacity.curvature.hvp"):
    assert name in MODULES


def test_no_import_cycle():
  assert cycles(graph(MODULES)) == []


def test_no_private_name_crosses_a_module():
  crossing = []
  for name, tree in MODULES.items():
    for owner, used in imports_of(tree, MODULES)[1]:
      if used.startswith("_") and not used.startswith("__") and owner != name:
        crossing.append(f"{name} uses {owner}.{used}")
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and node.attr == "_flatten_layers":
        crossing.append(f"{name} walks layers with Keras' _flatten_layers")
  assert crossing == []


def _reaches(name: str, forbidden: tuple[str, ...]) -> list[str]:
  edges = graph(MODULES)
  return sorted(m for m in edges[name]
                if any(m == f or m.startswith(f + ".") for f in forbidden))


ABOVE_MODELS = ("tfcapacity.objective", "tfcapacity.training",
                "tfcapacity.curvature", "tfcapacity.gradients",
                "tfcapacity.landscape", "tfcapacity.measurements",
                "tfcapacity.studies")


@pytest.mark.parametrize("lower, forbidden", [
    ("tfcapacity.data", ABOVE_MODELS),
    ("tfcapacity.models", ABOVE_MODELS),
    ("tfcapacity.objective", ABOVE_MODELS[1:]),
    ("tfcapacity.training", ("tfcapacity.curvature", "tfcapacity.gradients",
                             "tfcapacity.landscape",
                             "tfcapacity.measurements",
                             "tfcapacity.studies")),
])
def test_layers_import_only_what_lies_below(lower, forbidden):
  found = []
  for name in MODULES:
    if name == lower or name.startswith(lower + "."):
      found += [f"{name} -> {m}" for m in _reaches(name, forbidden)]
  assert found == []
