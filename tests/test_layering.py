"""The package's import graph, read with the standard library's ast: no import
circles, and dependencies point one way (entry points -> trainer / evaluation /
generation -> models, data, hf -> layers). Function-level imports count too:
a lazy import hides a circle, it does not remove it."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "speechjax")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        out[_module_name(path)] = path
  return out


def _imports(path: str, module: str, known: set[str]) -> set[str]:
  """speechjax modules `module` imports (a package import counts as its __init__)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      # `from pkg import mod` imports pkg.mod when that is a module.
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
               for alias in node.names]
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != module and name.startswith("speechjax"):
        found.add(name)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  known = set(modules)
  return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
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

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_circles():
  cycles = _cycles(_graph())
  assert not cycles, f"import circles: {cycles}"


# (importer prefix, forbidden prefixes, why)
RULES = [
    ("speechjax.models", ("speechjax.data", "speechjax.trainer", "speechjax.hf",
                          "speechjax.model_builder", "speechjax.evaluation", "speechjax.generation"),
     "models are pure: they never read data, checkpoints or the trainer"),
    ("speechjax.data", ("speechjax.models", "speechjax.trainer", "speechjax.model_builder",
                        "speechjax.generation"),
     "data produces what the encoder declares, given as plain values"),
    ("speechjax.trainer", ("speechjax.model_builder", "speechjax.data",
                           "speechjax.projects"),
     "the trainer receives the model bundle and the data; it builds neither"),
    ("speechjax.conventions", ("speechjax",), "a leaf both sides share"),
    ("speechjax.registry", ("speechjax",), "a leaf every registry shares"),
]


@pytest.mark.parametrize("importer,forbidden,why", RULES, ids=[r[0] for r in RULES])
def test_dependencies_point_one_way(importer, forbidden, why):
  bad = []
  for module, deps in _graph().items():
    if module == importer or module.startswith(importer + "."):
      bad += [f"{module} -> {d}" for d in sorted(deps)
              if any(d == f or d.startswith(f + ".") for f in forbidden)]
  assert not bad, f"{why}: {bad}"


def test_the_checker_sees_a_circle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert not _cycles({"a": {"b"}, "b": set()})
