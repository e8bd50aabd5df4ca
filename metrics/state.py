"""The aggregator's state: plain counters, applied record by record.

:class:`State` holds everything the aggregator knows. Deltas from the wire
(:mod:`metrics.wire`) are added to cumulative totals; snapshots (CPU, memory, open
connections and associations, index lag, spool backlog) live on the sender's
:class:`Source` and go when its connection closes. Every label value that comes from
the network goes through a :class:`~metrics.wire.LabelLimiter` here, so what
:mod:`metrics.exposition` reads is already bounded.

No prometheus-client here: this module only counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.engine import dimse

from . import wire as w

__all__ = ["Limits", "Source", "State", "WorkerTotals"]

# -- names of wire codes (label values) ----------------------------------------------

PDU_TYPES = {
    1: "associate_rq",
    2: "associate_ac",
    3: "associate_rj",
    4: "p_data_tf",
    5: "release_rq",
    6: "release_rp",
    7: "abort",
}
DIRECTIONS = {0: "received", 1: "sent"}
COMMANDS = {
    0x0001: "C-STORE-RQ",
    0x8001: "C-STORE-RSP",
    0x0010: "C-GET-RQ",
    0x8010: "C-GET-RSP",
    0x0020: "C-FIND-RQ",
    0x8020: "C-FIND-RSP",
    0x0021: "C-MOVE-RQ",
    0x8021: "C-MOVE-RSP",
    0x0030: "C-ECHO-RQ",
    0x8030: "C-ECHO-RSP",
    0x0100: "N-EVENT-REPORT-RQ",
    0x8100: "N-EVENT-REPORT-RSP",
    0x0110: "N-GET-RQ",
    0x8110: "N-GET-RSP",
    0x0120: "N-SET-RQ",
    0x8120: "N-SET-RSP",
    0x0130: "N-ACTION-RQ",
    0x8130: "N-ACTION-RSP",
    0x0140: "N-CREATE-RQ",
    0x8140: "N-CREATE-RSP",
    0x0150: "N-DELETE-RQ",
    0x8150: "N-DELETE-RSP",
    0x0FFF: "C-CANCEL-RQ",
}
# PS3.8 Table 9-21
REJECT_RESULTS = {1: "permanent", 2: "transient"}
REJECT_SOURCES = {
    1: "service_user",
    2: "service_provider_acse",
    3: "service_provider_presentation",
}
REJECT_REASONS = {
    (1, 1): "no_reason_given",
    (1, 2): "application_context_name_not_supported",
    (1, 3): "calling_ae_title_not_recognized",
    (1, 7): "called_ae_title_not_recognized",
    (2, 1): "no_reason_given",
    (2, 2): "protocol_version_not_supported",
    (3, 1): "temporary_congestion",
    (3, 2): "local_limit_exceeded",
}
# PS3.8 Table 9-26
ABORT_INITIATORS = {0: "unknown", 1: "peer", 2: "local", 3: "transport"}
ABORT_SOURCES = {0: "service_user", 1: "reserved", 2: "service_provider"}
ABORT_REASONS = {
    0: "not_specified",
    1: "unrecognized_pdu",
    2: "unexpected_pdu",
    4: "unrecognized_pdu_parameter",
    5: "unexpected_pdu_parameter",
    6: "invalid_pdu_parameter_value",
}
STORAGE_OPS = {int(w.StorageOp.WRITE): "write", int(w.StorageOp.FSYNC): "fsync"}
UNKNOWN = "unknown"


def status_label(status: int) -> str:
    """``0xA700`` style; ``none`` for a message without Status."""
    return "none" if status == w.NO_STATUS else f"0x{status & 0xFFFF:04X}"


def status_category(status: int) -> str:
    """PS3.7 Annex C class of a status as a label: success, warning, failure, cancel,
    pending (the engine's :func:`~workers.engine.dimse.status_category`, lower case),
    or none for a message without Status."""
    if status == w.NO_STATUS:
        return "none"
    return dimse.status_category(status).lower()


def _abort_reason(source: int, reason: int) -> str:
    if reason < 0:
        return UNKNOWN
    if source != 2:  # only a service-provider abort's reason is significant
        return "none"
    return ABORT_REASONS.get(reason, str(reason))


# -- state -----------------------------------------------------------------------------


@dataclass(slots=True)
class Limits:
    """Label bounds: distinct values kept per label before folding into "other"."""

    ae_titles: int = 100
    sop_classes: int = 100
    statuses: int = 64
    workers: int = 256
    names: int = 64  # roles, handler events, restart reasons, FSM states and events


class Source:
    """One connected sender (a worker process, the supervisor ...)."""

    __slots__ = (
        "cpu",
        "hello_at",
        "index_lag",
        "open_associations",
        "open_connections",
        "pid",
        "ready",
        "role",
        "rss",
        "s3_spool",
        "worker",
    )

    def __init__(self) -> None:
        self.ready = False
        self.role = ""
        self.worker = ""
        self.pid = 0
        self.hello_at = 0.0
        self.cpu: float | None = None
        self.rss: int | None = None
        self.open_connections = 0
        self.open_associations: dict[tuple[str, str], int] = {}
        #: index records queued in the sender's writer (None: it has no index)
        self.index_lag: int | None = None
        #: (instances, bytes) in the sender's S3 spool (None: no spool)
        self.s3_spool: tuple[int, int] | None = None


class WorkerTotals:
    """Cumulative counters of one ``worker`` label."""

    __slots__ = (
        "bytes",
        "connections",
        "dimse",
        "dropped",
        "frames",
        "handler_errors",
        "index",
        "pdus",
        "records",
        "storage",
        "transitions",
    )

    def __init__(self) -> None:
        self.connections = 0
        self.pdus = ([0] * 8, [0] * 8)
        self.bytes = [0, 0]
        self.dimse: dict[tuple[int, str, str], int] = {}
        self.storage: dict[int, list[Any]] = {}
        self.transitions: dict[tuple[str, str, str], int] = {}
        self.handler_errors: dict[str, int] = {}
        #: index records written, failed batch attempts, records dropped
        self.index = [0, 0, 0]
        self.dropped = 0
        self.frames = 0
        self.records = 0


#: Service record's service -> (metric name, help, label name)
SERVICE_METRICS = {
    "commitment_request": (
        "pacs_storage_commitment_requests",
        "Storage commitment N-ACTION requests, by outcome (accepted, refused, failed).",
        "outcome",
    ),
    "commitment_instance": (
        "pacs_storage_commitment_instances",
        "Instances decided for storage commitment, by result (committed, failed).",
        "result",
    ),
    "commitment_report": (
        "pacs_storage_commitment_reports",
        "Storage commitment N-EVENT-REPORT attempts, by outcome (same_association, "
        "new_association, retry, given_up).",
        "outcome",
    ),
    "query": ("pacs_queries", "C-FIND queries answered from the index, by level.", "level"),
    "retrieve": (
        "pacs_retrieves",
        "C-GET and C-MOVE answered from the index and the store.",
        "operation",
    ),
}


def _add(table: dict[Any, int], key: Any, n: int) -> None:
    table[key] = table.get(key, 0) + n


class State:
    """Everything the aggregator knows: plain counters, applied record by record."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits = limits or Limits()
        self.ae = w.LabelLimiter(limits.ae_titles, 16)
        self.sop = w.LabelLimiter(limits.sop_classes, 64)
        self.status = w.LabelLimiter(limits.statuses, 16)
        self.worker = w.LabelLimiter(limits.workers, 64)
        self.name = w.LabelLimiter(limits.names, 64)
        self.started = time.time()
        self.sources: set[Source] = set()
        self.workers: dict[str, WorkerTotals] = {}
        self.assoc: dict[tuple[int, str, str], int] = {}
        self.rejected: dict[tuple[str, str, str, str, str], int] = {}
        self.aborted: dict[tuple[str, str, str, str, str], int] = {}
        #: (calling, called, sop class, status) -> [instances, bytes]
        self.cstore: dict[tuple[str, str, str, str], list[int]] = {}
        #: (calling, sop class) -> [duration sum, bucket counts...]
        self.cstore_hist: dict[tuple[str, str], list[Any]] = {}
        #: (calling, called) pairs ever open: their pacs_associations_open reads 0 when
        #: idle rather than vanishing (bounded: AE labels go through the limiter)
        self.assoc_pairs: set[tuple[str, str]] = set()
        self.restarts: dict[tuple[str, str], int] = {}
        #: presentation contexts refused, by PS3.8 reason name
        self.contexts_rejected: dict[str, int] = {}
        #: audit messages by outcome ("sent", "dropped")
        self.audit: dict[str, int] = {"sent": 0, "dropped": 0}
        #: (service, label) -> count: storage commitment, queries, retrieves
        self.services: dict[tuple[str, str], int] = {}
        #: acceptor trouble by event (metrics.wire.Acceptor)
        self.acceptor: dict[str, int] = {}
        self.decode = w.DecodeStats()
        self.records_without_hello = 0
        self.oversized_frames = 0
        self._apply: dict[type[Any], Callable[[Source, Any], None]] = {
            w.Process: self._process,
            w.Gauges: self._gauges,
            w.Connections: self._connections,
            w.Pdus: self._pdus,
            w.Bytes: self._bytes,
            w.Dimse: self._dimse,
            w.Association: self._association,
            w.Rejected: self._rejected,
            w.Aborted: self._aborted,
            w.CStore: self._cstore,
            w.Storage: self._storage,
            w.Transition: self._transition,
            w.HandlerError: self._handler_error,
            w.Dropped: self._dropped,
            w.Restart: self._restart,
            w.ContextRejected: self._context_rejected,
            w.AuditMessages: self._audit_messages,
            w.Service: self._service,
            w.IndexLag: self._index_lag,
            w.IndexWrites: self._index_writes,
            w.Acceptor: self._acceptor,
            w.S3Spool: self._s3_spool,
        }

    # -- sources --

    def open_source(self) -> Source:
        source = Source()
        self.sources.add(source)
        return source

    def close_source(self, source: Source) -> None:
        """The connection closed: its snapshots (gauges, CPU, memory) go with it."""
        self.sources.discard(source)

    def totals(self, source: Source) -> WorkerTotals:
        t = self.workers.get(source.worker)
        if t is None:
            t = self.workers[source.worker] = WorkerTotals()
        return t

    # -- records --

    def feed(self, source: Source, payload: bytes) -> None:
        """Apply one frame payload from ``source``."""
        records = w.decode_payload(payload, self.decode)
        for r in records:
            self.apply(source, r)
        if source.ready:
            t = self.totals(source)
            t.frames += 1
            t.records += len(records)

    def apply(self, source: Source, r: w.Record) -> None:
        if type(r) is w.Hello:
            source.ready = True
            source.role = self.name(r.role)
            source.worker = self.worker(r.name)
            source.pid = r.pid
            source.hello_at = time.monotonic()
            return
        if not source.ready:
            self.records_without_hello += 1
            return
        self._apply[type(r)](source, r)

    def _process(self, source: Source, r: w.Process) -> None:
        source.cpu = r.cpu_seconds
        source.rss = r.rss_bytes

    def _gauges(self, source: Source, r: w.Gauges) -> None:
        source.open_connections = r.open_connections
        per_ae: dict[tuple[str, str], int] = {}
        for calling, called, n in r.open_associations:
            _add(per_ae, (self.ae(calling), self.ae(called)), n)
        source.open_associations = per_ae
        self.assoc_pairs.update(per_ae)

    def _connections(self, source: Source, r: w.Connections) -> None:
        self.totals(source).connections += r.opened

    def _pdus(self, source: Source, r: w.Pdus) -> None:
        if r.direction in (0, 1) and 1 <= r.pdu_type <= 7:
            self.totals(source).pdus[r.direction][r.pdu_type] += r.count
        else:
            self.decode.invalid_records += 1

    def _bytes(self, source: Source, r: w.Bytes) -> None:
        if r.direction in (0, 1):
            self.totals(source).bytes[r.direction] += r.count
        else:
            self.decode.invalid_records += 1

    def _dimse(self, source: Source, r: w.Dimse) -> None:
        if r.direction not in (0, 1):
            self.decode.invalid_records += 1
            return
        command = COMMANDS.get(r.command_field)
        if command is None:
            command = self.name(f"0x{r.command_field & 0xFFFF:04X}")
        status = self.status(status_label(r.status))
        _add(self.totals(source).dimse, (r.direction, command, status), r.count)

    def _association(self, source: Source, r: w.Association) -> None:
        if r.outcome not in (1, 2, 3):
            self.decode.invalid_records += 1
            return
        _add(self.assoc, (r.outcome, self.ae(r.calling_ae), self.ae(r.called_ae)), r.count)

    def _rejected(self, source: Source, r: w.Rejected) -> None:
        key = (
            self.ae(r.calling_ae),
            self.ae(r.called_ae),
            REJECT_RESULTS.get(r.result) or self.name(str(r.result)),
            REJECT_SOURCES.get(r.source) or self.name(str(r.source)),
            REJECT_REASONS.get((r.source, r.reason)) or self.name(str(r.reason)),
        )
        _add(self.rejected, key, r.count)

    def _aborted(self, source: Source, r: w.Aborted) -> None:
        key = (
            self.ae(r.calling_ae),
            self.ae(r.called_ae),
            ABORT_INITIATORS.get(r.initiator, UNKNOWN),
            ABORT_SOURCES.get(r.source, UNKNOWN),
            _abort_reason(r.source, r.reason),
        )
        _add(self.aborted, key, r.count)

    def _cstore(self, source: Source, r: w.CStore) -> None:
        calling = self.ae(r.calling_ae)
        sop = self.sop(r.sop_class)
        key = (calling, self.ae(r.called_ae), sop, self.status(status_label(r.status)))
        instances = sum(r.buckets)
        v = self.cstore.get(key)
        if v is None:
            v = self.cstore[key] = [0, 0]
        v[0] += instances
        v[1] += r.nbytes
        h = self.cstore_hist.get((calling, sop))
        if h is None:
            h = self.cstore_hist[(calling, sop)] = [0.0] + [0] * (len(w.CSTORE_BUCKETS) + 1)
        h[0] += r.duration_sum
        for i, n in enumerate(r.buckets, 1):
            h[i] += n

    def _storage(self, source: Source, r: w.Storage) -> None:
        if r.op not in STORAGE_OPS:
            self.decode.invalid_records += 1
            return
        table = self.totals(source).storage
        h = table.get(r.op)
        if h is None:
            h = table[r.op] = [0.0] + [0] * (len(w.STORAGE_BUCKETS) + 1)
        h[0] += r.duration_sum
        for i, n in enumerate(r.buckets, 1):
            h[i] += n

    def _transition(self, source: Source, r: w.Transition) -> None:
        key = (self.name(r.state), self.name(r.event), self.name(r.next_state))
        _add(self.totals(source).transitions, key, r.count)

    def _handler_error(self, source: Source, r: w.HandlerError) -> None:
        _add(self.totals(source).handler_errors, self.name(r.event), r.count)

    def _dropped(self, source: Source, r: w.Dropped) -> None:
        self.totals(source).dropped += r.count

    def _service(self, source: Source, r: w.Service) -> None:
        if r.service in SERVICE_METRICS:
            _add(self.services, (r.service, self.name(r.label)), r.count)

    def _restart(self, source: Source, r: w.Restart) -> None:
        _add(self.restarts, (self.worker(r.worker), self.name(r.reason)), r.count)

    def _context_rejected(self, source: Source, r: w.ContextRejected) -> None:
        _add(self.contexts_rejected, self.name(r.reason), r.count)

    def _audit_messages(self, source: Source, r: w.AuditMessages) -> None:
        if r.outcome in self.audit:  # two names only: nothing else becomes a series
            self.audit[r.outcome] += r.count

    def _index_lag(self, source: Source, r: w.IndexLag) -> None:
        source.index_lag = r.records

    def _s3_spool(self, source: Source, r: w.S3Spool) -> None:
        source.s3_spool = (r.instances, r.bytes)

    def _index_writes(self, source: Source, r: w.IndexWrites) -> None:
        totals = self.totals(source).index
        totals[0] += r.written
        totals[1] += r.errors
        totals[2] += r.dropped

    def _acceptor(self, source: Source, r: w.Acceptor) -> None:
        _add(self.acceptor, self.name(r.event), r.count)
