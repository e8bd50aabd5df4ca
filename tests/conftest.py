"""Session-wide test setup."""

from __future__ import annotations

import os
import sys

# pg_server: a throw-away PostgreSQL server for the session (tests/pgserver.py).
from tests.pgserver import pg_server

__all__ = ["pg_server"]

# pynetdicom installs apps named like DCMTK's (storescu, echoscu, storescp ...) into
# the virtual environment's bin directory. Tests that run DCMTK by name must get
# DCMTK's, also when the environment is activated: move that directory to the end
# of PATH for the whole session (our own commands are called by full path).
_venv_bin = os.path.join(sys.prefix, "bin")
_parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
if _venv_bin in _parts:
    os.environ["PATH"] = os.pathsep.join([p for p in _parts if p != _venv_bin] + [_venv_bin])
