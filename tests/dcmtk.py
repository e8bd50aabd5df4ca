"""DCMTK's command-line tools for every test: the one place that finds them.

pynetdicom installs Python scripts named ``storescu``, ``echoscu``, ``storescp``,
``findscu`` ... into the virtualenv's ``bin``, which comes first on PATH when the venv
is active: a test that runs ``"storescu"`` by name can silently get pynetdicom instead
of the independent peer it means. :func:`dcmtk` returns DCMTK's own executable (an
ELF binary, looked for in /usr/bin and /usr/local/bin before PATH) or None.
"""

from __future__ import annotations

import os

import pytest

#: where Debian's dcmtk package (``make system-deps``) puts the tools, searched first
DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")


def dcmtk(name: str) -> str | None:
    """The path of DCMTK's ``name`` (``storescu`` ...), or None when not installed."""
    path_dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for d in (*DCMTK_DIRS, *path_dirs):
        candidate = os.path.join(d, name)
        try:
            with open(candidate, "rb") as f:
                if f.read(4) == b"\x7fELF" and os.access(candidate, os.X_OK):
                    return candidate
        except OSError:
            continue
    return None


def require(name: str) -> str:
    """:func:`dcmtk`, skipping the calling test when the tool is not installed."""
    path = dcmtk(name)
    if path is None:
        pytest.skip(f"DCMTK {name} is not installed (make system-deps)")
    return path


def needs(*names: str) -> pytest.MarkDecorator:
    """A skip marker for tests that run the DCMTK tools ``names``."""
    missing = [n for n in names if dcmtk(n) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"DCMTK {', '.join(missing)} not installed (make system-deps)"
    )
