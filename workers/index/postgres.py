"""The shared index: PostgreSQL, for several receivers writing to one index.

Same schema and statements as SQLite (``?`` becomes ``%s``). The primary key on
the SOP Instance UID is the one row per instance across every node; the duplicate
policy decides whether a later copy replaces it (see :meth:`Index.add_many`).
Migrations take a transaction-scoped advisory lock, so that receivers starting
together do not both create the tables. Needs the ``postgresql`` extra (psycopg 3).
"""

from __future__ import annotations

from typing import Any

from .base import Index, IndexUnavailable

__all__ = ["PostgresIndex"]

# pg_advisory_xact_lock key for migrations: any constant shared by every receiver.
_MIGRATION_LOCK = 0x50414353  # "PACS"


class PostgresIndex(Index):
    """The instance index in a PostgreSQL database given by a libpq URL."""

    backend = "postgresql"
    _now_sql = "extract(epoch from clock_timestamp())"
    # The database's collation may be a locale's, where punctuation hardly counts.
    _collate_c = ' COLLATE "C"'

    def __init__(self, url: str, node: str = "") -> None:
        super().__init__(node)
        try:
            import psycopg
        except ImportError as exc:
            raise IndexUnavailable(
                "a postgresql:// index needs psycopg: pip install 'pacs-receiver[postgresql]'"
            ) from exc
        self._errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        try:
            self._writer = psycopg.connect(url, connect_timeout=10)
            self._migrate()
            # Reads see the last committed state; autocommit: no transaction left
            # open between queries (it would hold back VACUUM).
            self._reader = psycopg.connect(url, connect_timeout=10, autocommit=True)
        except psycopg.Error as exc:
            self._close_connections()
            raise IndexUnavailable(f"cannot open index {_redact(url)}: {exc}") from exc

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def _blob_type(self) -> str:
        return "BYTEA"

    def _lock_schema(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))


def _redact(url: str) -> str:
    """The URL without its password (error messages go to logs and stderr)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
