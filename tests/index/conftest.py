"""Fixtures of the index tests: every index test runs against both backends.

``index_url`` is parametrized: ``sqlite`` (a file under a temporary storage root)
and ``postgresql`` (a fresh database on a real PostgreSQL server started once per
session from Debian's package, the ``pg_server`` fixture of tests/conftest.py;
skipped when PostgreSQL or psycopg is missing).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgserver import PostgresServer
from workers.index import Index, open_index


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """What ``open_index`` takes: None (embedded SQLite) or a PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.new_database()


@pytest.fixture
def storage_root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    return root


@pytest.fixture
def index(index_url: str | None, storage_root: Path) -> Iterator[Index]:
    ix = open_index(index_url, str(storage_root), node="node-a")
    try:
        yield ix
    finally:
        ix.close()
