"""The index API shared by both backends (:class:`Index`).

Theory of operation
-------------------
An :class:`Index` holds two connections to its database: one for writes (the
worker's writer thread, reconcile) and one for reads (C-FIND, storage commitment),
each behind its own lock, so that a query never waits for a batch being written
(SQLite in WAL mode and PostgreSQL both let a reader see the last committed state
while a writer works). Every statement is written once with ``?`` placeholders;
the PostgreSQL backend turns them into ``%s``. Writes are one transaction per call:
:meth:`Index.add_many` is how the receiver writes, a batch at a time (see
:mod:`.writer`), never one instance per transaction.

Column names that reach SQL text (``select``'s keys) are checked against
:data:`~.record.COLUMNS`; values are always bound parameters.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from .pending import PendingReport, PendingReports
from .query import Condition, where_clauses
from .record import COLUMNS, LEVEL_KEYS, IndexRecord, Row
from .schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["Index", "IndexUnavailable", "PendingReport"]

_COLUMN_SET = frozenset(COLUMNS)
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM instances"
_ROW = f"({', '.join('?' * len(COLUMNS))})"
# PS3.4 leaves the duplicate policy to the receiver: "overwrite" (the store's
# default) replaces the row, "keep"/"reject" keep the first one.
_ON_CONFLICT = {
    True: " ON CONFLICT (sop_instance_uid) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "sop_instance_uid"),
    False: " ON CONFLICT (sop_instance_uid) DO NOTHING",
}
# Rows per INSERT statement. One statement per row (executemany) would let go of the
# GIL and take it back once per row (the sqlite3 module releases it around each step):
# in a worker, that is a hand-off with the event loop thread per instance. Several
# rows per statement make it one per this many (and cost a little less CPU).
# 32 rows x 19 columns stays far below SQLite's 32766 bound parameters.
_ROWS_PER_INSERT = 32
# Rows per statement for IN (...) lists (SQLite's default variable limit is 32766).
_CHUNK = 500


class IndexUnavailable(Exception):
    """The index cannot be opened or used (bad URL, unreachable server, newer
    schema, missing driver). At start-up: one line on stderr, exit status 2."""


class Index(PendingReports):
    """The instance index; made by :func:`workers.index.open_index`.

    Thread-safe: any thread may call any method. ``node`` names this receiver's
    store (rows it writes carry it; :meth:`node_paths` and reconcile look at
    these rows only).
    """

    #: "sqlite" or "postgresql"
    backend = "abstract"
    #: what makes a text comparison use code point order ("": the backend's default)
    _collate_c = ""

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._statements: dict[tuple[int, bool], str] = {}

    # -- to be provided by a backend -------------------------------------------------

    #: the backend's connections (DB-API 2), set by its constructor
    _writer: Any = None
    _reader: Any = None

    def _writer_conn(self) -> Any:
        return self._writer

    def _reader_conn(self) -> Any:
        return self._reader

    def _sql(self, statement: str) -> str:
        """The backend's form of a statement written with ``?`` placeholders."""
        return statement

    def _begin(self, cur: Any) -> None:
        """Open the write transaction on ``cur`` (PostgreSQL: the first statement
        does, the connection not being in autocommit mode)."""

    @contextlib.contextmanager
    def _transaction(self, conn: Any) -> Iterator[Any]:
        """A write transaction on ``conn`` (committed on success, else rolled back)."""
        cur = conn.cursor()
        self._begin(cur)
        try:
            yield cur
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def _lock_schema(self, cur: Any) -> None:
        """Serialise migrations between processes (inside the transaction)."""

    def _close_connections(self) -> None:
        for name in ("_reader", "_writer"):
            conn = getattr(self, name, None)
            if conn is not None:
                # closing: a connection that fails to close is gone all the same
                with contextlib.suppress(Exception):
                    conn.close()

    def _blob_type(self) -> str:
        raise NotImplementedError

    # -- schema ------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Create or upgrade the schema to :data:`SCHEMA_VERSION` (one transaction)."""
        with self._write_lock, self._transaction(self._writer_conn()) as cur:
            self._lock_schema(cur)
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            version = int(row[0]) if row is not None else 0
            if version > SCHEMA_VERSION:
                raise IndexUnavailable(
                    f"index schema version {version} is newer than this receiver's "
                    f"({SCHEMA_VERSION})"
                )
            for step in MIGRATIONS[version:]:
                for statement in step:
                    cur.execute(statement.format(blob=self._blob_type()))
            if row is None:
                cur.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"),
                            (SCHEMA_VERSION,))  # fmt: skip
            elif version != SCHEMA_VERSION:
                cur.execute(self._sql("UPDATE schema_version SET version = ?"), (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        """The schema version of the database."""
        with self._read_lock:
            cur = self._reader_conn().cursor()
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            self._end_read()
            return int(row[0]) if row is not None else 0

    def _end_read(self) -> None:
        """Finish a read (PostgreSQL: end the implicit transaction)."""

    # -- instances ---------------------------------------------------------------------

    def add_many(self, records: Iterable[IndexRecord | Row], *, replace: bool = True) -> int:
        """Record instances in one transaction; returns how many were given.

        An instance already indexed (same SOP Instance UID, from any receiver
        sharing the index) is replaced when ``replace`` (the ``overwrite`` duplicate
        policy), else kept as it is (``keep`` / ``reject``). Raises on database
        errors (the writer retries the batch). A record may be given as its
        :data:`~.record.Row`.
        """
        rows = [r if type(r) is tuple else r.as_row() for r in records]  # type: ignore[union-attr]
        if not rows:
            return 0
        step = _ROWS_PER_INSERT
        with self._write_lock, self._transaction(self._writer_conn()) as cur:
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                # A UID twice in one statement is an error in PostgreSQL ("cannot
                # affect row a second time"): such a chunk goes row by row, in order.
                if len({row[0] for row in chunk}) < len(chunk):
                    one = self._insert_statement(1, replace)
                    for row in chunk:
                        cur.execute(one, row)
                    continue
                cur.execute(
                    self._insert_statement(len(chunk), replace),
                    [value for row in chunk for value in row],
                )
        return len(rows)

    def _insert_statement(self, rows: int, replace: bool) -> str:
        key = (rows, replace)
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = self._sql(
                f"INSERT INTO instances ({', '.join(COLUMNS)}) VALUES "
                + ", ".join([_ROW] * rows)
                + _ON_CONFLICT[replace]
            )
        return statement

    def get(self, sop_instance_uid: str) -> IndexRecord | None:
        """The record of one instance (present or missing), or None."""
        rows = self._query(_SELECT + " WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return rows[0] if rows else None

    def get_many(self, sop_instance_uids: Iterable[str]) -> dict[str, IndexRecord]:
        """Records of the given instances that are indexed, by SOP Instance UID."""
        uids = list(dict.fromkeys(sop_instance_uids))
        found: dict[str, IndexRecord] = {}
        for start in range(0, len(uids), _CHUNK):
            chunk = uids[start : start + _CHUNK]
            where = f" WHERE sop_instance_uid IN ({', '.join('?' * len(chunk))})"
            for record in self._query(_SELECT + where, chunk):
                found[record.sop_instance_uid] = record
        return found

    def select(
        self,
        level: str,
        equal: Mapping[str, object] | None = None,
        conditions: Iterable[Condition] = (),
        *,
        include_missing: bool = False,
        limit: int | None = None,
    ) -> list[IndexRecord]:
        """Instance records whose columns equal ``equal`` and that meet every one of
        ``conditions`` (:mod:`.query`: a prefilter, the caller's matcher has the last
        word), ordered by the level's unique key (:data:`~.record.LEVEL_KEYS`) then
        SOP Instance UID.

        ``level`` is one of PATIENT, STUDY, SERIES, IMAGE; the rows are instances at
        every level (the caller groups them). Records marked missing are left out
        unless ``include_missing``. Raises ``ValueError`` for an unknown level or
        column.
        """
        key = LEVEL_KEYS.get(level)
        if key is None:
            raise ValueError(f"unknown query level {level!r}")
        clauses: list[str] = []
        params: list[object] = []
        for column, value in (equal or {}).items():
            if column not in _COLUMN_SET:
                raise ValueError(f"unknown index column {column!r}")
            clauses.append(f"{column} = ?")
            params.append(value)
        more, more_params = where_clauses(conditions, _COLUMN_SET, self._collate_c)
        clauses += more
        params += more_params
        if not include_missing:
            clauses.append("state = 'present'")
        statement = _SELECT
        if clauses:
            statement += " WHERE " + " AND ".join(clauses)
        statement += f" ORDER BY {key}, sop_instance_uid"
        if limit is not None:
            statement += f" LIMIT {int(limit)}"
        return self._query(statement, params)

    def count(self, *, include_missing: bool = True) -> int:
        """Number of instance records."""
        where = "" if include_missing else " WHERE state = 'present'"
        with self._read_lock:
            cur = self._reader_conn().cursor()
            cur.execute("SELECT COUNT(*) FROM instances" + where)
            row = cur.fetchone()
            self._end_read()
        return int(row[0])

    def mark_missing(self, sop_instance_uids: Iterable[str]) -> int:
        """Mark records whose file is gone; returns how many were given."""
        return self._set_state(sop_instance_uids, "missing")

    def mark_present(self, sop_instance_uids: Iterable[str]) -> int:
        """Mark records whose file is back (reconcile); returns how many were given."""
        return self._set_state(sop_instance_uids, "present")

    def node_paths(self) -> dict[str, tuple[str, str, float]]:
        """``{path: (sop_instance_uid, state, received_at)}`` of every record of this
        node (what reconcile compares the store with)."""
        with self._read_lock:
            cur = self._reader_conn().cursor()
            cur.execute(
                self._sql(
                    "SELECT path, sop_instance_uid, state, received_at FROM instances"
                    " WHERE node = ?"
                ),
                (self.node,),
            )
            rows = cur.fetchall()
            self._end_read()
        return {path: (uid, state, float(received)) for path, uid, state, received in rows}

    def paths_under(self, prefix: str) -> set[str]:
        """Paths of every record, of any node, that start with ``prefix`` (the S3
        reconcile's view of a shared bucket: workers/index/reconcile_s3.py)."""
        with self._read_lock:
            cur = self._reader_conn().cursor()
            # substr, not LIKE: no escaping of "%" and "_" in bucket or prefix names.
            cur.execute(
                self._sql("SELECT path FROM instances WHERE substr(path, 1, ?) = ?"),
                (len(prefix), prefix),
            )
            rows = cur.fetchall()
            self._end_read()
        return {str(row[0]) for row in rows}

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections. Idempotent."""
        with self._write_lock, self._read_lock:
            if not self._closed:
                self._closed = True
                self._close_connections()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _query(self, statement: str, params: Sequence[object]) -> list[IndexRecord]:
        with self._read_lock:
            cur = self._reader_conn().cursor()
            cur.execute(self._sql(statement), params)
            rows = cur.fetchall()
            self._end_read()
        return [IndexRecord(*row) for row in rows]

    def _set_state(self, sop_instance_uids: Iterable[str], state: str) -> int:
        uids = list(sop_instance_uids)
        if not uids:
            return 0
        statement = self._sql("UPDATE instances SET state = ? WHERE sop_instance_uid = ?")
        with self._write_lock, self._transaction(self._writer_conn()) as cur:
            cur.executemany(statement, [(state, uid) for uid in uids])
        return len(uids)
