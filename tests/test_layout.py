"""The shape of the code: no import cycles, no module over about 700 lines.

The import graph is computed from the source with :mod:`ast`, not by importing: every
``import`` and ``from ... import`` of the project packages counts, at module level and
inside functions (a deferred import is still a dependency, and a cycle through one only
waits for the first call to bite); relative imports are resolved; imports under
``if TYPE_CHECKING:`` do not count (they never run). ``from package import name`` is an
edge to ``package.name`` when that is a module, else to the package itself.

The graph is checked twice: as it runs, and as the type checker sees it (with the
``if TYPE_CHECKING:`` imports), where modules that only know each other's types still
form one unit in all but name. Known exceptions are listed here, explicitly; the lists
must only shrink. A new cycle (printed as a path) or a new long module fails; an entry
that no longer applies fails too, so that it is removed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("receiver", "workers", "metrics", "loadtest")
MAX_LINES = 700

#: Cycles that exist today, each as the set of modules of its strongly connected
#: component. Only entries may be removed. Those of the import graph as it runs:
KNOWN_CYCLES: list[frozenset[str]] = []
#: ... and those of the graph the type checker sees (``if TYPE_CHECKING:`` imports
#: too): modules that know each other's types are one unit in all but name.
KNOWN_TYPE_CYCLES: list[frozenset[str]] = []

#: Modules over MAX_LINES today. Only entries may be removed.
KNOWN_LONG_MODULES: set[str] = {
    "workers/storage/scanner.py",
    "workers/storage/store.py",
}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project packages."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_checking: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all but the bodies of ``if TYPE_CHECKING``
    (those too with ``type_checking``)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
            return
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """module -> the project modules it imports (at run time; with ``type_checking``,
    for the type checker too)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text("utf-8"), str(path))
        for node in _imports(tree, type_checking):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".")
                    drop = node.level - 1 if is_package else node.level
                    base = base[: len(base) - drop] if drop else base
                    origin = ".".join([*base, node.module] if node.module else base)
                else:
                    origin = node.module or ""
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    targets.append(sub if sub in modules else origin)
            for target in targets:
                # ``import a.b.c`` of a non-module name: its nearest module ancestor
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(component)
    return out


def a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through ``component``, as a path that ends where it starts."""
    start = min(component)
    # breadth-first from start's successors back to start, inside the component
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_the_graph_sees_what_it_should() -> None:
    """The checks below are only as good as the graph: spot-check it."""
    graph = import_graph()
    assert "workers.engine.acse" in graph["workers.scu.requestor"]  # absolute
    assert "workers.scu.cstore" in graph["workers.scu.requestor"]  # relative
    assert "workers.scu.codec" in graph["workers.scu.requestor"]  # from . import codec
    assert "loadtest.compare" in graph["loadtest.cli"]  # inside a function
    assert "workers.scu.requestor" not in graph["workers.scu.operations"]
    assert "metrics.http" in graph["metrics.aggregator"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n")
    assert _imports(tree)[1:] == []  # TYPE_CHECKING imports never run
    assert len(_imports(tree, type_checking=True)) == 2
    # server.py imports workers.indexed only under TYPE_CHECKING
    assert "workers.indexed" in import_graph(type_checking=True)["workers.server"]
    assert "workers.indexed" not in graph["workers.server"]
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(toy) == [{"a", "b", "c"}]
    assert a_cycle(toy, {"a", "b", "c"}) == ["a", "b", "c", "a"]


def _cycle_problems(graph: dict[str, set[str]], known: list[frozenset[str]], name: str) -> str:
    components = strongly_connected(graph)
    new = [c for c in components if frozenset(c) not in known]
    gone = [k for k in known if k not in {frozenset(c) for c in components}]
    problems = [
        "import cycle: " + " -> ".join(a_cycle(graph, c)) + f" (modules: {sorted(c)})" for c in new
    ]
    problems += [f"known cycle {sorted(k)} is gone: remove it from {name}" for k in gone]
    return "\n".join(problems)


def test_no_new_import_cycles() -> None:
    problems = _cycle_problems(import_graph(), KNOWN_CYCLES, "KNOWN_CYCLES")
    assert not problems, problems


def test_no_new_import_cycles_through_type_checking_imports() -> None:
    graph = import_graph(type_checking=True)
    problems = _cycle_problems(graph, KNOWN_TYPE_CYCLES, "KNOWN_TYPE_CYCLES")
    assert not problems, problems


def test_no_new_long_modules() -> None:
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text("utf-8").splitlines())
        for path in project_modules().values()
    }
    long = {path for path, n in lengths.items() if n > MAX_LINES}
    problems = [
        f"{path} has {lengths[path]} lines (over {MAX_LINES}): split it"
        for path in sorted(long - KNOWN_LONG_MODULES)
    ]
    problems += [
        f"{path} is within {MAX_LINES} lines now: remove it from KNOWN_LONG_MODULES"
        for path in sorted(KNOWN_LONG_MODULES - long)
    ]
    assert not problems, "\n".join(problems)
