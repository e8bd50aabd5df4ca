"""The engine is sans-IO: no module of workers/engine imports pydicom, asyncio, socket,
os or time, nor any project package but the engine itself and the data plane.

Read from the source with :mod:`ast` (every import statement that can run, at module
level or inside a function), as tests/test_layout.py reads the import graph.
``events.py`` is the handler contract, which is moving out of the engine (it reads the
clock and decodes data sets with pydicom): it is left out by name until it has gone.
"""

from __future__ import annotations

import ast

from tests.test_layout import ROOT, _imports

ENGINE = ROOT / "workers" / "engine"
#: Top-level modules the engine must not import: I/O, clocks, pydicom.
FORBIDDEN = frozenset({"pydicom", "asyncio", "socket", "os", "time", "uvloop", "selectors"})
#: Project packages the engine may import: itself and the data plane it hands P-DATA to.
ALLOWED_PROJECT = ("workers.engine", "workers.dataplane")
PROJECT_ROOTS = frozenset({"receiver", "workers", "metrics", "loadtest", "tests"})
NOT_YET_MOVED = frozenset({"events.py"})
#: Imports of FORBIDDEN modules that exist today, as (file, name). May only shrink.
KNOWN_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()


def _imported(path_text: str, module: str) -> set[str]:
    """Absolute names of everything imported by the module ``module``."""
    names: set[str] = set()
    for node in _imports(ast.parse(path_text), type_checking=True):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        else:
            if node.level:
                base = module.split(".")[: -node.level]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            # ``from workers import dataplane`` imports workers.dataplane
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def _engine_imports() -> dict[str, set[str]]:
    found = {}
    for path in sorted(ENGINE.rglob("*.py")):
        if path.name in NOT_YET_MOVED:
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[path.name] = _imported(path.read_text("utf-8"), ".".join(parts))
    return found


def test_the_check_sees_imports() -> None:
    names = _imported("import os.path\nfrom time import monotonic\nfrom . import fsm\n", "a.b.c")
    assert names == {"os.path", "time.monotonic", "a.b.fsm"}
    found = _engine_imports()
    assert "connection.py" in found and "events.py" not in found
    assert "workers.dataplane" in found["receiving.py"]


def test_the_engine_does_no_io_and_reads_no_clock() -> None:
    found = _engine_imports()
    problems = [
        f"workers/engine/{name} imports {imported}"
        for name, names in found.items()
        for imported in sorted(names)
        if (name, imported) not in KNOWN_EXCEPTIONS
        and (
            imported.split(".")[0] in FORBIDDEN
            or (
                imported.split(".")[0] in PROJECT_ROOTS and not imported.startswith(ALLOWED_PROJECT)
            )
        )
    ]
    problems += [
        f"known exception {name}: {imported} is gone: remove it from KNOWN_EXCEPTIONS"
        for name, imported in sorted(KNOWN_EXCEPTIONS)
        if imported not in found.get(name, set())
    ]
    assert not problems, "\n".join(problems)
