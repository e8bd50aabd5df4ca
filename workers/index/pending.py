"""Reports owed to peers (storage commitment N-EVENT-REPORTs), kept in the index
until delivered, and the lease that makes sure only one claimant sends each.

Theory of operation
-------------------
A pending report is a row of ``pending_reports``: a unique key, the ``owner`` (the
node whose store the report speaks for: receivers sharing a PostgreSQL index each
deal with their own), an opaque payload, ``due`` (epoch time of the next delivery
attempt) and ``attempts``. Several claimants may look at the same rows: the workers
of one receiver, a receiver and its restarted self, two nodes configured with the
same name. Whoever sends a report first takes its *lease*: ``lease_owner`` (a name
unique to the claimant) and ``lease_until`` (epoch seconds on the database's clock,
so that nodes with skewed clocks still agree on when a lease has run out).

A claim is one conditional ``UPDATE``: it succeeds only if the lease is free (run
out) or already the claimant's, and the claimant learns which from the row count.
SQLite serialises write transactions (``BEGIN IMMEDIATE``); PostgreSQL re-checks
the ``WHERE`` of an ``UPDATE`` against the row version a concurrent transaction
committed before it got the row lock. Either way, of two claimants racing for one
report exactly one updates it. A claimant renews its lease before every attempt,
for longer than the attempt can take, and stops (without sending) when the renewal
fails: the report is someone else's now. A claimant that dies simply lets its
leases run out. At most one claimant holds a live lease, so two never send the same
report at the same time; a crash between sending and forgetting a report makes it
be sent again later by the next claimant (at least once, never concurrently).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["PendingReport", "PendingReports"]

_COLUMNS = "report_key, owner, payload, due, attempts, lease_owner, lease_until"


@dataclass(slots=True, frozen=True)
class PendingReport:
    """A report owed to a peer (see :meth:`PendingReports.put_pending`)."""

    key: str
    owner: str
    payload: bytes
    due: float
    attempts: int
    #: who holds the lease ("" when nobody ever claimed it)
    lease_owner: str = ""
    #: until when (epoch seconds, database clock); free once past
    lease_until: float = 0.0


class PendingReports:
    """The pending-report half of :class:`~.base.Index` (which provides the hooks)."""

    #: SQL expression for the database's current epoch time (seconds, fractional)
    _now_sql = "(julianday('now') - 2440587.5) * 86400.0"
    _write_lock: threading.Lock
    _read_lock: threading.Lock

    def _sql(self, statement: str) -> str:
        raise NotImplementedError

    def _writer_conn(self) -> Any:
        raise NotImplementedError

    def _reader_conn(self) -> Any:
        raise NotImplementedError

    def _end_read(self) -> None:
        raise NotImplementedError

    def _transaction(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        with self._write_lock, self._transaction(self._writer_conn()) as cur:
            yield cur

    # -- the reports -------------------------------------------------------------------

    def put_pending(
        self,
        key: str,
        payload: bytes,
        due: float,
        *,
        owner: str = "",
        claimant: str = "",
        lease: float = 0.0,
    ) -> None:
        """Keep a report owed to a peer until :meth:`delete_pending`: ``key`` is
        unique (e.g. the Transaction UID), ``payload`` opaque bytes (the caller's
        encoding), ``due`` the epoch time of the next attempt, ``owner`` who sends it
        (the node, so that receivers sharing an index each send their own). With a
        ``claimant``, it holds the report's lease for ``lease`` seconds from now.
        Replaces a report with the same key (attempts back to 0)."""
        until = f"{self._now_sql} + ?" if claimant else "?"
        statement = self._sql(
            f"INSERT INTO pending_reports ({_COLUMNS}) VALUES (?, ?, ?, ?, 0, ?, {until})"
            " ON CONFLICT (report_key) DO UPDATE SET owner = excluded.owner,"
            " payload = excluded.payload, due = excluded.due, attempts = 0,"
            " lease_owner = excluded.lease_owner, lease_until = excluded.lease_until"
        )
        with self._write() as cur:
            cur.execute(
                statement, (key, owner, bytes(payload), due, claimant, lease if claimant else 0.0)
            )

    def due_pending(self, now: float | None = None, *, owner: str = "") -> list[PendingReport]:
        """``owner``'s reports due at ``now`` (all of them when None), earliest first,
        leased or not (what is there; :meth:`claim_due` is how a sender takes them)."""
        statement = f"SELECT {_COLUMNS} FROM pending_reports WHERE owner = ?"
        params: list[object] = [owner]
        if now is not None:
            statement += " AND due <= ?"
            params.append(now)
        statement += " ORDER BY due, report_key"
        with self._read_lock:
            cur = self._reader_conn().cursor()
            cur.execute(self._sql(statement), params)
            rows = cur.fetchall()
            self._end_read()
        return [_report(row) for row in rows]

    def claim_pending(self, key: str, claimant: str, lease: float) -> bool:
        """Take (or renew) the lease of one report for ``lease`` seconds from now;
        False if another claimant holds a lease that has not run out, or the report
        is gone. ``claimant`` must be unique to the caller (and not empty)."""
        if not claimant:
            raise ValueError("a claimant needs a name")
        with self._write() as cur:
            return self._claim(cur, key, claimant, lease)

    def claim_due(
        self, now: float, *, owner: str, claimant: str, lease: float, limit: int = 100
    ) -> list[PendingReport]:
        """Claim ``owner``'s reports due at ``now`` whose lease has run out (whoever
        held it), at most ``limit``, earliest first; returns those claimed (each now
        leased to ``claimant`` for ``lease`` seconds). Reports under a live lease,
        the claimant's own included, are left alone: their holder is sending them."""
        if not claimant:
            raise ValueError("a claimant needs a name")
        statement = self._sql(
            f"SELECT {_COLUMNS} FROM pending_reports WHERE owner = ? AND due <= ?"
            f" AND lease_until <= {self._now_sql} ORDER BY due, report_key LIMIT ?"
        )
        claimed: list[PendingReport] = []
        with self._write() as cur:
            cur.execute(statement, (owner, now, int(limit)))
            for row in cur.fetchall():
                # The SELECT only proposes: the conditional UPDATE decides, row by row.
                if self._claim(cur, row[0], claimant, lease):
                    claimed.append(_report(row))
        return claimed

    def release_pending(
        self, keys: Iterable[str], claimant: str, *, due: float | None = None
    ) -> int:
        """Give back ``claimant``'s leases on ``keys`` (optionally due at ``due``),
        so that the next claimant takes them up at once; returns how many."""
        statement = self._sql(
            "UPDATE pending_reports SET lease_until = 0"
            + (", due = ?" if due is not None else "")
            + " WHERE report_key = ? AND lease_owner = ?"
        )
        released = 0
        with self._write() as cur:
            for key in keys:
                params = (key, claimant) if due is None else (due, key, claimant)
                cur.execute(statement, params)
                released += max(cur.rowcount, 0)
        return released

    def reschedule_pending(self, key: str, due: float) -> None:
        """A delivery attempt failed: try again at ``due`` (attempts + 1)."""
        statement = self._sql(
            "UPDATE pending_reports SET due = ?, attempts = attempts + 1 WHERE report_key = ?"
        )
        with self._write() as cur:
            cur.execute(statement, (due, key))

    def delete_pending(self, key: str) -> None:
        """The report was delivered (or given up): forget it."""
        statement = self._sql("DELETE FROM pending_reports WHERE report_key = ?")
        with self._write() as cur:
            cur.execute(statement, (key,))

    def _claim(self, cur: Any, key: str, claimant: str, lease: float) -> bool:
        cur.execute(
            self._sql(
                f"UPDATE pending_reports SET lease_owner = ?, lease_until = {self._now_sql} + ?"
                f" WHERE report_key = ? AND (lease_owner = ? OR lease_until <= {self._now_sql})"
            ),
            (claimant, lease, key, claimant),
        )
        return bool(cur.rowcount == 1)


def _report(row: tuple[Any, ...]) -> PendingReport:
    key, owner, payload, due, attempts, lease_owner, lease_until = row
    return PendingReport(
        key, owner, bytes(payload), float(due), int(attempts), lease_owner, float(lease_until)
    )
