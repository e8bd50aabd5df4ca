"""The instance index: what was received, where it is, and its digest.

- :mod:`.record`: :class:`IndexRecord`, one row per SOP Instance.
- :mod:`.base`: :class:`Index`, the API (add_many, get, select, mark_missing,
  pending reports); :mod:`.sqlite` (embedded default, WAL, under the storage root)
  and :mod:`.postgres` (shared by several receivers) implement it.
- :mod:`.schema`: the versioned schema, as migration steps.
- :mod:`.writer`: :class:`IndexWriter`, the batching writer thread of a worker.
- :mod:`.reconcile`: start-up repair of the index against the store.
"""

from __future__ import annotations

import os

from .base import Index, IndexUnavailable, PendingReport
from .record import COLUMNS, LEVEL_KEYS, IndexRecord
from .sqlite import DEFAULT_INDEX_PATH, SQLiteIndex

__all__ = [
    "COLUMNS",
    "DEFAULT_INDEX_PATH",
    "LEVEL_KEYS",
    "Index",
    "IndexRecord",
    "IndexUnavailable",
    "PendingReport",
    "SQLiteIndex",
    "open_index",
]


def open_index(url_or_path: str | None, storage_root: str, *, node: str = "") -> Index:
    """Open (creating and migrating as needed) the index.

    ``url_or_path``: None or ``""`` for the embedded default
    (``<storage_root>/.index/index.db``); ``postgresql://...`` (or ``postgres://``)
    for a shared PostgreSQL index; anything else is a path to an SQLite file (a
    relative one is under ``storage_root``; ``sqlite:///abs/path`` also works).
    ``node`` names this receiver's store in a shared index. Raises
    :class:`IndexUnavailable`.
    """
    target = url_or_path or ""
    if target.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresIndex

        return PostgresIndex(target, node)
    if target.startswith("sqlite://"):
        target = target[len("sqlite://") :]
    path = os.path.join(storage_root, target or DEFAULT_INDEX_PATH)
    return SQLiteIndex(path, node)
