"""The embedded index: SQLite in WAL mode, one file under the storage root.

WAL lets readers (C-FIND, storage commitment) read while a writer commits, and a
commit is one append to the log. ``synchronous=NORMAL`` skips the fsync per commit
(the log is fsynced at checkpoints): a power cut may lose the last batches, which
the start-up reconcile puts back from the files, while the instances themselves
were made durable by the store before they were acknowledged. Several workers write
to the same file, each a batch per transaction; ``busy_timeout`` makes one wait for
another's commit (milliseconds) instead of failing.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from .base import Index, IndexUnavailable

__all__ = ["DEFAULT_INDEX_PATH", "SQLiteIndex"]

#: Where the index lives, relative to the storage root (a dot directory: the store's
#: layout never renders into one, and reconcile does not walk them).
DEFAULT_INDEX_PATH = ".index/index.db"
_BUSY_TIMEOUT_MS = 30_000
_MMAP_SIZE = 1 << 30


class SQLiteIndex(Index):
    """The instance index in one SQLite file (created, with its directory, if absent)."""

    backend = "sqlite"

    def __init__(self, path: str, node: str = "") -> None:
        super().__init__(node)
        self.path = path
        try:
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._writer = self._connect()
            # WAL is a property of the file: set once, kept across connections.
            mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise IndexUnavailable(f"{path}: cannot use WAL mode (got {mode!r})")
            self._migrate()
            self._reader = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise IndexUnavailable(f"cannot open index {path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; _transaction says BEGIN.
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            check_same_thread=False,
        )  # fmt: skip
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=NORMAL")
        # Pages read through a memory map, not read(2) into a private cache: when the
        # workers take turns writing, each one's cache is invalidated by the others'
        # commits, and re-reading the B-tree pages it touches is then a memory access.
        conn.execute(f"PRAGMA mmap_size={_MMAP_SIZE}")
        return conn

    def _blob_type(self) -> str:
        return "BLOB"

    def _begin(self, cur: Any) -> None:
        # IMMEDIATE: take the write lock now (waiting up to busy_timeout), rather than
        # at the first write, where a lock upgrade can fail at once with SQLITE_BUSY.
        cur.execute("BEGIN IMMEDIATE")
