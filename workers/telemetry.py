"""The telemetry emitter of a worker process: counts what happens, ships it to the
metrics aggregator, and never gets in the way of an association.

Theory of operation
-------------------
Every call below runs on the worker's event loop and only bumps a counter in a local
table: no I/O, no allocation beyond a new table key, a few hundred nanoseconds.
Every ``interval`` seconds a timer turns the tables into *delta* records
(:mod:`metrics.wire`), empties them, and writes them as frames to the aggregator's
unix socket, which is non-blocking: whatever the kernel does not take at once goes
out when the socket is writable again (``loop.add_writer``). The connection, the
batches and the reconnection are :class:`metrics.sender.FrameSender`'s, which this
class extends with the counting.

Nothing is queued per event. While a batch is still going out (the aggregator is
slow) or while there is no aggregator (it is being restarted), the next counts simply
keep adding up in the tables, whose size is bounded by the number of distinct label
combinations (AE titles and SOP classes fold into ``"other"`` past their limits) and,
as a last resort, by ``max_pending`` keys. A batch that was not completely written when
the connection broke is merged back into the tables and sent on the next connection;
so counts are only lost (and then counted, and reported as ``Dropped``) when the
tables are full, when the aggregator dies holding bytes it had not yet read, or when
an internal error hits a call. Reconnection is retried on the timer with back-off
(``interval`` doubling up to ``reconnect_max``); a connection that takes no bytes for
``stall_timeout`` seconds is dropped and retried. Snapshot records (:class:`Process`,
:class:`Gauges`: CPU, memory, open connections and associations) are sent fresh on
every tick and never merged back.

PDUs and bytes are not counted per event (PDU events are only produced when a local
handler is bound): the engine's ``Connection`` keeps ``pdus_received``/``pdus_sent``
(by PDU type) and ``bytes_received``/``bytes_sent``; they are read on every tick for
open connections and one last time at EVT_CONN_CLOSE, so every PDU and byte counts.

The path from events to telemetry
---------------------------------
A worker's :class:`~workers.association.AssociationProtocol` (its storing and trail
parts included) reports through one object, its ``reporter``: the
:class:`~workers.session.Reporter` port, which this class implements
(:data:`~workers.session.NULL_REPORTER` when metrics are off). Nothing else in the
association calls the telemetry. What it reports comes three ways, each chosen for
its cost:

* notification events, all through :meth:`Telemetry.record` (``_emit`` calls it for
  every event it emits, handlers bound or not): connections, association milestones,
  FSM transitions;
* the four facts that have no notification event, or whose event would cost an
  object per message (EVT_DIMSE_* carry a decoded ``Command``): DIMSE messages
  (:meth:`Telemetry.dimse`), C-STORE answers (:meth:`Telemetry.stored`), failed
  handlers, refused presentation contexts: one typed call each, no ``attrs`` dict;
* PDUs and bytes, never reported per PDU: the telemetry reads the engine's
  connection counters on each tick and at EVT_CONN_CLOSE.

Outside the association: storage system-call timings come from the store itself
(:meth:`Telemetry.file_ops`, :mod:`workers.telemetry_timings`), in any thread; the
index-backed services call :meth:`Telemetry.service`; the audit sender, the index
writer and the S3 spool are read on each tick (``watch_audit``, ``index_writer``,
``object_store``).

What the worker calls
---------------------
Create one per worker process, in its event loop::

    telemetry = Telemetry(socket_path, worker_id)
    await telemetry.start()            # connects if it can, arms the timer; never waits
    server = AssociationServer(config, telemetry=telemetry,
                               store_ops=telemetry.file_ops())   # storage timings
    ...
    await telemetry.close()            # at shutdown: last batch, at most 1 s

and then, from the event loop:

``telemetry.record(event, protocol, attrs)``
    for every notification event emitted (what ``AssociationProtocol._emit`` does):
    counts connections (EVT_CONN_OPEN/CLOSE), associations requested, accepted,
    rejected (``attrs["response"]``: the A-ASSOCIATE-RJ), released, aborted, and FSM
    transitions (EVT_FSM_TRANSITION; see ``trace_transitions``). EVT_ABORTED may carry
    ``source``/``reason``/``by_peer`` (the engine's ``Aborted`` indication): then the
    abort is labelled with them; without them the initiator is inferred from the
    connection's A-ABORT PDU counters and the source is "unknown". EVT_ACSE_*,
    EVT_DIMSE_*, EVT_PDU_* and EVT_DATA_* are ignored here: they are counted by
    :meth:`dimse` and the connection counters, which see every message.
``telemetry.dimse(direction, command_field, status)``
    for every DIMSE message received or sent, handlers bound or not: ``direction`` is
    :data:`RECEIVED` or :data:`SENT`, ``command_field`` the (0000,0100) value,
    ``status`` the (0000,0900) value of a response or None for a request. Where:
    ``AssociationProtocol._on_command`` (received: ``cmd.CommandField, cmd.Status``)
    and ``AssociationProtocol.send`` (sent).
``telemetry.stored(protocol, op, result, duration_seconds)``
    once per C-STORE answered: ``result`` has ``status`` and ``bytes_written`` (a
    :class:`~workers.storage.store.StoreResult`, or any object with those two for a
    user handler's answer, e.g. the status and the spooled size);
    ``duration_seconds`` from the C-STORE-RQ command set's arrival (note
    ``loop.time()`` on the ``Operation``) to the response being sent.
``telemetry.handler_error(event_name)``
    when a user handler raises, times out or returns something unusable.
``telemetry.observe_write(seconds)`` / ``telemetry.observe_fsync(seconds)``
    one storage system call each; thread-safe (fsync runs in the I/O pool).
    :meth:`file_ops` wraps :class:`~workers.storage.config.FileOps` so the store
    calls them itself.
``telemetry.trace_transitions``
    False by default: FSM transitions are only counted while the engine traces them
    (a bound EVT_FSM_TRANSITION handler). Tracing costs about a microsecond per PDU;
    a worker that wants the counts regardless ORs this flag into
    ``AssociationProtocol.refresh_tracing``'s ``cfg.trace_transitions``.

What the supervisor calls
-------------------------
The supervisor may run its own ``Telemetry(socket_path, "supervisor",
role="supervisor")`` (which reports its CPU and memory too) and call
``worker_restarted(worker_id, reason)`` whenever it respawns a worker (or the
aggregator: ``worker_restarted("aggregator", reason)``; the count is delivered once
the new aggregator is up).
"""

from __future__ import annotations

import logging
import os
import socket
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from metrics import procstat
from metrics import wire as w
from metrics.sender import FrameSender

from .engine import events as evt
from .telemetry_timings import STORAGE_WIDTH, StorageTimings

if TYPE_CHECKING:
    from .association import AssociationProtocol, Operation
    from .index.writer import IndexWriter

__all__ = ["RECEIVED", "SENT", "Telemetry"]

log = logging.getLogger("workers.telemetry")

#: ``direction`` values of :meth:`Telemetry.dimse`.
RECEIVED = int(w.Direction.RECEIVED)
SENT = int(w.Direction.SENT)

_NO_STATUS = w.NO_STATUS
_CSTORE_BOUNDS = w.CSTORE_BUCKETS
_CSTORE_WIDTH = len(w.CSTORE_BUCKETS) + 1
_ABORT_PDU = 7
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


class StoreOutcome(Protocol):
    """What :meth:`Telemetry.stored` reads of a C-STORE's result."""

    @property
    def status(self) -> int: ...

    @property
    def bytes_written(self) -> int: ...


class _Conn:
    """What the emitter remembers of one open connection."""

    __slots__ = ("brx", "btx", "called", "calling", "ended", "labelled", "open", "rx", "tx")

    def __init__(self) -> None:
        self.calling = ""
        self.called = ""
        self.labelled = False
        self.open = False  # association established and not yet over
        self.ended = False  # released or aborted (counted once)
        self.rx = [0] * 8  # PDU counters already accounted for
        self.tx = [0] * 8
        self.brx = 0
        self.btx = 0


class Telemetry(FrameSender, StorageTimings):
    """Counts worker activity and ships it to the aggregator (see the module doc).

    ``worker_id`` is the ``worker`` label; ``role`` says what kind of
    process reports ("worker", "supervisor"). AE titles and SOP classes beyond
    ``max_ae_titles`` / ``max_sop_classes`` distinct values fold into "other".
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        worker_id: str | int,
        *,
        role: str = "worker",
        interval: float = 0.5,
        max_ae_titles: int = 100,
        max_sop_classes: int = 100,
        max_pending: int = 20_000,
        stall_timeout: float = 10.0,
        reconnect_max: float = 5.0,
        trace_transitions: bool = False,
    ) -> None:
        super().__init__(
            socket_path,
            interval=interval,
            stall_timeout=stall_timeout,
            reconnect_max=reconnect_max,
            log=log,
        )
        self.name = str(worker_id)
        self.role = role
        self.max_pending = max_pending
        #: see the module doc: the worker may OR this into its transition tracing
        self.trace_transitions = trace_transitions
        self._ae = w.LabelLimiter(max_ae_titles, 16)
        self._sop = w.LabelLimiter(max_sop_classes, 64)
        self._sop_labels = self._sop.known  # read-only fast path of _sop

        # -- the tables: deltas since the last batch --
        self._keys = 0  # distinct keys held in the dict tables below
        self._opened = 0
        self._pdus = ([0] * 8, [0] * 8)  # by direction, by PDU type
        self._bytes = [0, 0]
        self._dimse: dict[tuple[int, int, int], int] = {}
        self._assoc: dict[tuple[int, str, str], int] = {}
        self._rejected: dict[tuple[str, str, int, int, int], int] = {}
        self._aborted: dict[tuple[str, str, int, int, int], int] = {}
        self._cstore: dict[tuple[str, str, str, int], list[Any]] = {}
        self._transitions: dict[tuple[str, str, str], int] = {}
        self._handler_errors: dict[str, int] = {}
        self._restarts: dict[tuple[str, str], int] = {}
        self._contexts_rejected: dict[str, int] = {}
        self._audit: dict[str, int] = {}
        #: the audit sender whose sent/dropped totals are reported (watch_audit)
        self._audit_source: Any = None
        self._audit_seen = (0, 0)
        self._services: dict[tuple[str, str], int] = {}
        self._acceptor: dict[str, int] = {}
        self._dropped = 0  # not yet reported
        #: the worker's index writer (workers/index/writer.py): its lag and counters
        #: are read on every tick; None: no index
        self.index_writer: IndexWriter | None = None
        self._index_sent = [0, 0, 0]  # (written, errors, dropped) already reported
        #: the object store in spool mode (workers/storage/objectstore.py): its
        #: backlog is read on every tick; None: local storage
        self.object_store: Any = None
        #: the supervisor's readiness, sent on every tick (metrics.wire.Readiness):
        #: None (workers: nothing to say), 0 accepting, 1 draining
        self.readiness: int | None = None
        StorageTimings.__init__(self)  # _writes, _fsyncs, _storage

        self._conns: dict[Any, _Conn] = {}
        self._dispatch: dict[str, Callable[[Any, dict[str, Any]], None]] = {
            evt.EVT_CONN_OPEN.name: self._on_conn_open,
            evt.EVT_CONN_CLOSE.name: self._on_conn_close,
            evt.EVT_REQUESTED.name: self._on_requested,
            evt.EVT_ACCEPTED.name: self._on_accepted,
            evt.EVT_ESTABLISHED.name: self._on_established,
            evt.EVT_REJECTED.name: self._on_rejected,
            evt.EVT_RELEASED.name: self._on_released,
            evt.EVT_ABORTED.name: self._on_aborted,
            evt.EVT_FSM_TRANSITION.name: self._on_transition,
        }

        self._error_logged = False

    # ------------------------------------------------------- event-loop calls

    def record(
        self, event: evt.NotificationEvent, protocol: AssociationProtocol, attrs: dict[str, Any]
    ) -> None:
        """Count a notification event (see the module doc for which are counted)."""
        handler = self._dispatch.get(event.name)
        if handler is not None:
            try:
                handler(protocol, attrs)
            except Exception:
                self._lost(1, "record")

    def dimse(self, direction: int, command_field: int, status: int | None = None) -> None:
        """Count one DIMSE message received or sent (``status`` None for requests)."""
        key = (direction, command_field, _NO_STATUS if status is None else status)
        table = self._dimse
        n = table.get(key)
        if n is not None:
            table[key] = n + 1
        elif self._keys < self.max_pending:
            self._keys += 1
            table[key] = 1
        else:
            self._lost(1)

    def stored(
        self,
        protocol: AssociationProtocol,
        op: Operation,
        result: StoreOutcome,
        duration_seconds: float,
    ) -> None:
        """Count one C-STORE answered (status, data-set bytes, duration)."""
        try:
            st = self._conns.get(protocol)
            if st is None or not st.labelled:
                st = self._labels(protocol)
            uid = op.command.AffectedSOPClassUID or ""
            sop = self._sop_labels.get(uid)
            if sop is None:
                sop = self._sop(uid)
            key = (st.calling, st.called, sop, result.status)
            v = self._cstore.get(key)
            if v is None:
                if self._keys >= self.max_pending:
                    self._lost(1)
                    return
                self._keys += 1
                v = self._cstore[key] = [0, 0.0] + [0] * _CSTORE_WIDTH
            d = duration_seconds if duration_seconds > 0.0 else 0.0
            v[0] += result.bytes_written
            v[1] += d
            v[2 + bisect_left(_CSTORE_BOUNDS, d)] += 1
        except Exception:
            self._lost(1, "stored")

    def handler_error(self, event_name: str) -> None:
        """Count a user handler that failed (raised, timed out, unusable answer)."""
        self._bump(self._handler_errors, event_name)

    def context_rejected(self, reason: str) -> None:
        """Count a presentation context refused in an A-ASSOCIATE-AC (its PS3.8
        Table 9-18 reason name)."""
        self._bump(self._contexts_rejected, reason)

    def watch_audit(self, sender: Any) -> None:
        """Report the ``sent`` and ``dropped`` totals of an audit sender
        (workers.audit.syslog.SyslogSender), read on every tick: it counts in its
        own thread, this turns the totals into deltas."""
        self._audit_source = sender
        self._audit_seen = (0, 0)

    def service(self, service: str, label: str, n: int = 1) -> None:
        """Count ``n`` operations of an index-backed service (storage commitment,
        queries, retrieves: workers/indexed.py); on the loop."""
        if n:
            self._bump(self._services, (service, label), n)

    def worker_restarted(self, worker: str | int, reason: str) -> None:
        """Supervisor: count a restart of ``worker`` (a worker id, or "aggregator")."""
        self._bump(self._restarts, (str(worker), reason))

    def acceptor_event(self, event: str, n: int = 1) -> None:
        """Supervisor: count acceptor trouble (see metrics.wire.Acceptor)."""
        self._bump(self._acceptor, event, n)

    def association_rejected(
        self, calling_ae: str, called_ae: str, result: int, source: int, reason: int
    ) -> None:
        """Acceptor: count an A-ASSOCIATE-RJ it sent itself (limits, --allow-ip ...);
        the AE titles are those of the A-ASSOCIATE-RQ, "" when it never came."""
        key = (self._ae(calling_ae.strip()), self._ae(called_ae.strip()), result, source, reason)
        self._bump(self._rejected, key)

    # ------------------------------------------------------- event handlers

    def _on_conn_open(self, protocol: Any, attrs: dict[str, Any]) -> None:
        if protocol not in self._conns:
            self._conns[protocol] = _Conn()
            self._opened += 1

    def _on_conn_close(self, protocol: Any, attrs: dict[str, Any]) -> None:
        # Not seen open (telemetry started later): account for all its counters.
        st = self._conns.pop(protocol, None) or _Conn()
        self._account(protocol, st)

    def _on_requested(self, protocol: Any, attrs: dict[str, Any]) -> None:
        st = self._labels(protocol)
        self._bump(self._assoc, (int(w.Outcome.REQUESTED), st.calling, st.called))

    def _on_accepted(self, protocol: Any, attrs: dict[str, Any]) -> None:
        st = self._labels(protocol)
        st.open = True
        self._bump(self._assoc, (int(w.Outcome.ACCEPTED), st.calling, st.called))

    def _on_established(self, protocol: Any, attrs: dict[str, Any]) -> None:
        st = self._labels(protocol)
        if not st.ended:
            st.open = True

    def _on_rejected(self, protocol: Any, attrs: dict[str, Any]) -> None:
        st = self._labels(protocol)
        rj = attrs.get("response")
        result = int(getattr(rj, "result", -1))
        source = int(getattr(rj, "source", -1))
        reason = int(getattr(rj, "reason", -1))
        st.ended = True
        self._bump(self._rejected, (st.calling, st.called, result, source, reason))

    def _on_released(self, protocol: Any, attrs: dict[str, Any]) -> None:
        st = self._labels(protocol)
        if st.ended:
            return
        st.ended = True
        st.open = False
        self._bump(self._assoc, (int(w.Outcome.RELEASED), st.calling, st.called))

    def _on_aborted(self, protocol: Any, attrs: dict[str, Any]) -> None:
        st = self._labels(protocol)
        if st.ended:
            return
        st.ended = True
        st.open = False
        source = attrs.get("source")
        reason = attrs.get("reason")
        by_peer = attrs.get("by_peer")
        if by_peer is None:
            conn = protocol.conn
            if conn.pdus_received[_ABORT_PDU]:
                initiator = w.AbortInitiator.PEER
            elif conn.pdus_sent[_ABORT_PDU]:
                initiator = w.AbortInitiator.LOCAL
            else:
                initiator = w.AbortInitiator.TRANSPORT
        elif by_peer:
            # A peer abort without an A-ABORT's fields is the transport closing (AA-4).
            initiator = w.AbortInitiator.PEER if source is not None else w.AbortInitiator.TRANSPORT
        else:
            initiator = w.AbortInitiator.LOCAL
        key = (
            st.calling,
            st.called,
            int(initiator),
            -1 if source is None else int(source),
            -1 if reason is None else int(reason),
        )
        self._bump(self._aborted, key)

    def _on_transition(self, protocol: Any, attrs: dict[str, Any]) -> None:
        key = (
            str(attrs.get("current_state", "")),
            str(attrs.get("fsm_event", "")),
            str(attrs.get("next_state", "")),
        )
        self._bump(self._transitions, key)

    # --------------------------------------------------------------- helpers

    def _bump(self, table: dict[Any, int], key: Any, n: int = 1) -> None:
        have = table.get(key)
        if have is not None:
            table[key] = have + n
        elif self._keys < self.max_pending:
            self._keys += 1
            table[key] = n
        else:
            self._lost(n)

    def _lost(self, n: int, where: str | None = None) -> None:
        # From pool threads (storage timings) this may race and miss one: it is a
        # count of losses, not worth a lock on the hot path.
        self._dropped += n
        self.dropped_total += n
        if where is not None and not self._error_logged:
            self._error_logged = True
            log.exception("telemetry: internal error in %s (counted as dropped)", where)

    def _labels(self, protocol: Any) -> _Conn:
        """The connection's state with its AE-title labels, known once requested."""
        st = self._conns.get(protocol)
        if st is None:  # telemetry started after the connection opened
            st = self._conns[protocol] = _Conn()
        if not st.labelled:
            request = getattr(protocol.conn, "request", None)
            if request is not None:
                st.calling = self._ae(str(request.calling_ae).strip())
                st.called = self._ae(str(request.called_ae).strip())
                st.labelled = True
            else:
                st.calling = self._ae(str(protocol.assoc.requestor.ae_title or "").strip())
        return st

    def _account(self, protocol: Any, st: _Conn) -> None:
        """Add what the connection's counters grew by since last time."""
        conn = protocol.conn
        rx, tx = conn.pdus_received, conn.pdus_sent
        if rx != st.rx:
            mine = self._pdus[0]
            seen = st.rx
            for i in range(1, 8):
                d = rx[i] - seen[i]
                if d:
                    mine[i] += d
                    seen[i] = rx[i]
        if tx != st.tx:
            mine = self._pdus[1]
            seen = st.tx
            for i in range(1, 8):
                d = tx[i] - seen[i]
                if d:
                    mine[i] += d
                    seen[i] = tx[i]
        b = conn.bytes_received
        if b != st.brx:
            self._bytes[0] += b - st.brx
            st.brx = b
        b = conn.bytes_sent
        if b != st.btx:
            self._bytes[1] += b - st.btx
            st.btx = b

    # ------------------------------------------------------------ batching

    def _collect(self) -> list[w.Record]:
        """The tables as records (deltas), emptied; snapshots added."""
        out: list[w.Record] = []
        if self._hello_due:
            out.append(w.Hello(self.role, self.name, os.getpid()))
            self._hello_due = False
        out.append(w.Process(procstat.cpu_seconds(), procstat.rss_bytes()))
        if self.role == "worker" or self._conns:
            per_ae: dict[tuple[str, str], int] = {}
            for st in self._conns.values():
                if st.open:
                    k = (st.calling, st.called)
                    per_ae[k] = per_ae.get(k, 0) + 1
            out.append(w.Gauges(len(self._conns), tuple((a, b, n) for (a, b), n in per_ae.items())))
        if self._opened:
            out.append(w.Connections(self._opened))
            self._opened = 0
        for direction in (0, 1):
            counts = self._pdus[direction]
            for pdu_type in range(1, 8):
                if counts[pdu_type]:
                    out.append(w.Pdus(direction, pdu_type, counts[pdu_type]))
                    counts[pdu_type] = 0
            if self._bytes[direction]:
                out.append(w.Bytes(direction, self._bytes[direction]))
                self._bytes[direction] = 0
        for (direction, cf, status), n in self._dimse.items():
            out.append(w.Dimse(int(direction), int(cf), int(status), n))
        for (outcome, calling, called), n in self._assoc.items():
            out.append(w.Association(outcome, calling, called, n))
        for (calling, called, result, source, reason), n in self._rejected.items():
            out.append(w.Rejected(calling, called, result, source, reason, n))
        for (calling, called, initiator, source, reason), n in self._aborted.items():
            out.append(w.Aborted(calling, called, initiator, source, reason, n))
        for (calling, called, sop, status), v in self._cstore.items():
            out.append(w.CStore(calling, called, sop, int(status), v[0], v[1], tuple(v[2:])))
        for op, v in self._storage.items():
            out.append(w.Storage(int(op), v[0], tuple(v[1:])))
        for (state, event, nxt), n in self._transitions.items():
            out.append(w.Transition(state, event, nxt, n))
        for name, n in self._handler_errors.items():
            out.append(w.HandlerError(name, n))
        for (worker, why), n in self._restarts.items():
            out.append(w.Restart(worker, why, n))
        for why, n in self._contexts_rejected.items():
            out.append(w.ContextRejected(why, n))
        source = self._audit_source
        if source is not None:
            sent, dropped = source.sent, source.dropped
            seen_sent, seen_dropped = self._audit_seen
            self._audit_seen = (sent, dropped)
            for word, n in (("sent", sent - seen_sent), ("dropped", dropped - seen_dropped)):
                if n > 0:
                    self._audit[word] = self._audit.get(word, 0) + n
        for word, n in self._audit.items():
            out.append(w.AuditMessages(word, n))
        for (service, label), n in self._services.items():
            out.append(w.Service(service, label, n))
        for event, n in self._acceptor.items():
            out.append(w.Acceptor(event, n))
        if self._dropped:
            out.append(w.Dropped(self._dropped))
            self._dropped = 0
        self._collect_index(out)
        uploader = getattr(self.object_store, "uploader", None)
        if uploader is not None:
            out.append(w.S3Spool(uploader.backlog_instances, uploader.backlog_bytes))
        if self.readiness is not None:
            out.append(w.Readiness(self.readiness))
        for table in (
            self._dimse,
            self._assoc,
            self._rejected,
            self._aborted,
            self._cstore,
            self._storage,
            self._transitions,
            self._handler_errors,
            self._restarts,
            self._contexts_rejected,
            self._audit,
            self._services,
            self._acceptor,
        ):
            table.clear()
        self._keys = 0
        return out

    def _collect_index(self, out: list[w.Record]) -> None:
        """The index writer's lag, and what its counters grew by since the last tick."""
        writer = self.index_writer
        if writer is None:
            return
        out.append(w.IndexLag(writer.lag))
        totals = (writer.written, writer.errors, writer.dropped)
        sent = self._index_sent
        delta = [now - before for now, before in zip(totals, sent, strict=True)]
        if any(delta):
            out.append(w.IndexWrites(*delta))
            self._index_sent = list(totals)

    def _merge(self, r: w.Record) -> None:
        """Put back the counts of a record that was not delivered."""
        if isinstance(r, w.IndexWrites):
            # Not delivered: the next tick's delta includes it again.
            sent = self._index_sent
            sent[0] -= r.written
            sent[1] -= r.errors
            sent[2] -= r.dropped
            return
        if isinstance(r, w.Dimse):
            self._bump(self._dimse, (r.direction, r.command_field, r.status), r.count)
        elif isinstance(r, w.Pdus):
            if 1 <= r.pdu_type <= 7:
                self._pdus[r.direction][r.pdu_type] += r.count
        elif isinstance(r, w.Bytes):
            self._bytes[r.direction] += r.count
        elif isinstance(r, w.Connections):
            self._opened += r.opened
        elif isinstance(r, w.Association):
            self._bump(self._assoc, (r.outcome, r.calling_ae, r.called_ae), r.count)
        elif isinstance(r, w.Rejected):
            self._bump(
                self._rejected, (r.calling_ae, r.called_ae, r.result, r.source, r.reason), r.count
            )
        elif isinstance(r, w.Aborted):
            self._bump(
                self._aborted, (r.calling_ae, r.called_ae, r.initiator, r.source, r.reason), r.count
            )
        elif isinstance(r, w.CStore):
            ckey = (r.calling_ae, r.called_ae, r.sop_class, r.status)
            v = self._cstore.get(ckey)
            if v is None:
                if self._keys >= self.max_pending:
                    self._lost(sum(r.buckets))
                    return
                self._keys += 1
                v = self._cstore[ckey] = [0, 0.0] + [0] * _CSTORE_WIDTH
            v[0] += r.nbytes
            v[1] += r.duration_sum
            for i, n in enumerate(r.buckets):
                v[2 + i] += n
        elif isinstance(r, w.Storage):
            v = self._storage.get(r.op)
            if v is None:
                v = self._storage[r.op] = [0.0] + [0] * STORAGE_WIDTH
            v[0] += r.duration_sum
            for i, n in enumerate(r.buckets):
                v[1 + i] += n
        elif isinstance(r, w.Transition):
            self._bump(self._transitions, (r.state, r.event, r.next_state), r.count)
        elif isinstance(r, w.HandlerError):
            self._bump(self._handler_errors, r.event, r.count)
        elif isinstance(r, w.Restart):
            self._bump(self._restarts, (r.worker, r.reason), r.count)
        elif isinstance(r, w.ContextRejected):
            self._bump(self._contexts_rejected, r.reason, r.count)
        elif isinstance(r, w.AuditMessages):
            # Not _bump: at most two keys, and an audit count must not be lost.
            self._audit[r.outcome] = self._audit.get(r.outcome, 0) + r.count
        elif isinstance(r, w.Service):
            self._bump(self._services, (r.service, r.label), r.count)
        elif isinstance(r, w.Acceptor):
            self._bump(self._acceptor, r.event, r.count)
        elif isinstance(r, w.Dropped):
            self._dropped += r.count  # already in dropped_total
        # Hello, Process, Gauges: snapshots, sent fresh on the next connection/tick.

    def _prepare(self) -> None:
        """Before each batch: bucket the storage timings, read the connection counters."""
        self._drain_timings()
        for protocol, st in self._conns.items():
            self._account(protocol, st)
