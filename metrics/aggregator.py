"""The metrics aggregator: telemetry frames in, Prometheus exposition out.

Theory of operation
-------------------
One process, one event loop (uvloop when installed), two servers:

* a unix stream socket where every worker (and the supervisor) writes frames
  (:mod:`metrics.wire`). Each connection starts with a ``Hello`` naming the sender;
  its records are applied to :class:`State`, plain dicts and ints: deltas are added to
  cumulative totals, snapshots (CPU, memory, open connections and associations) are
  kept per connection and forgotten when it closes. Malformed input is skipped and
  counted, never fatal; a frame over the size limit closes that connection;
* prometheus-client's HTTP server (``GET /metrics``, plus ``GET /healthz``; see
  :mod:`metrics.http`) on 127.0.0.1 by default. The Prometheus ``Collector``
  (:class:`StateCollector`) reads :class:`State` at scrape time, and that collection
  runs on the telemetry's loop, so a scrape sees a consistent state without any lock.

Cardinality is bounded whatever the senders say: every label value coming from the
network goes through a :class:`~metrics.wire.LabelLimiter` (AE titles, SOP classes,
statuses, worker names, reasons ...); past its limit a value folds into ``"other"``.

Restarts: the aggregator keeps totals only in memory. When it restarts every counter
starts again from zero, which Prometheus' ``rate()`` handles as a counter reset;
workers keep what they could not deliver and send it to the new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from workers.engine import dimse

from . import procstat
from . import wire as w
from .http import MetricsHTTPServer

__all__ = ["Aggregator", "Limits", "Source", "State", "StateCollector"]

log = logging.getLogger("metrics.aggregator")

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
        #: GET /readyz: the supervisor said it accepts / that it drains (for good:
        #: a draining supervisor never accepts again, even if its sender reconnects)
        self.accepting = False
        self.draining = False
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
            w.Readiness: self._readiness,
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

    def _readiness(self, source: Source, r: w.Readiness) -> None:
        if r.draining:
            self.draining = True
        else:
            self.accepting = True

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for GET /readyz: ready once the supervisor said it accepts,
        until it says it drains. Read from the HTTP threads: two plain booleans."""
        if self.draining:
            return False, "draining"
        if not self.accepting:
            return False, "starting"
        return True, "ready"


# -- exposition ------------------------------------------------------------------------

_CSTORE_LE = [floatToGoString(b) for b in w.CSTORE_BUCKETS] + ["+Inf"]
_STORAGE_LE = [floatToGoString(b) for b in w.STORAGE_BUCKETS] + ["+Inf"]


def _buckets(le: list[str], counts: Iterable[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip(le, counts, strict=True):
        total += n
        out.append((bound, float(total)))
    return out


class StateCollector(Collector):
    """Reads :class:`State` at scrape time (prometheus_client custom collector)."""

    def __init__(self, state: State) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families depend on what was received

    def collect(self) -> Iterator[Metric]:
        s = self.state
        ae2 = ["calling_ae", "called_ae"]

        # -- associations --
        outcomes = {
            1: CounterMetricFamily(
                "pacs_associations_requested",
                "A-ASSOCIATE-RQs received.",
                labels=ae2,
            ),
            2: CounterMetricFamily(
                "pacs_associations_accepted",
                "Associations accepted (A-ASSOCIATE-AC sent).",
                labels=ae2,
            ),
            3: CounterMetricFamily(
                "pacs_associations_released",
                "Associations ended by an orderly A-RELEASE.",
                labels=ae2,
            ),
        }
        for (outcome, calling, called), n in s.assoc.items():
            outcomes[outcome].add_metric([calling, called], n)
        yield from outcomes.values()

        rejected = CounterMetricFamily(
            "pacs_associations_rejected",
            "Associations rejected (A-ASSOCIATE-RJ sent), by Result, Source and "
            "Reason/Diag. of PS3.8 Table 9-21.",
            labels=[*ae2, "result", "source", "reason"],
        )
        for labels5, n in s.rejected.items():
            rejected.add_metric(list(labels5), n)
        yield rejected

        aborted = CounterMetricFamily(
            "pacs_associations_aborted",
            "Associations ended abnormally: initiator peer (its A-ABORT), local (our "
            "A-ABORT) or transport (connection lost, A-P-ABORT); source and reason of "
            "the A-ABORT (PS3.8 Table 9-26) when known.",
            labels=[*ae2, "initiator", "source", "reason"],
        )
        for labels5, n in s.aborted.items():
            aborted.add_metric(list(labels5), n)
        yield aborted

        open_assocs = GaugeMetricFamily(
            "pacs_associations_open",
            "Associations established and not yet ended.",
            labels=ae2,
        )
        per_ae: dict[tuple[str, str], int] = dict.fromkeys(s.assoc_pairs, 0)
        # Pairs ever accepted too: an association shorter than one gauge interval is
        # never in a gauge snapshot, and its pair must read 0 as well.
        for outcome, calling, called in s.assoc:
            if outcome == 2:
                per_ae.setdefault((calling, called), 0)
        for src in s.sources:
            for pair, n in src.open_associations.items():
                _add(per_ae, pair, n)
        for (calling, called), n in per_ae.items():
            open_assocs.add_metric([calling, called], n)
        yield open_assocs

        # -- C-STORE --
        instances = CounterMetricFamily(
            "pacs_cstore_instances",
            "C-STORE operations answered, by response status.",
            labels=[*ae2, "sop_class", "status", "status_category"],
        )
        nbytes = CounterMetricFamily(
            "pacs_cstore_received_bytes",
            "C-STORE data-set bytes received, by response status.",
            labels=[*ae2, "sop_class", "status", "status_category"],
        )
        for (calling, called, sop, status), (count, size) in s.cstore.items():
            labels = [calling, called, sop, status, _category_of(status)]
            instances.add_metric(labels, count)
            nbytes.add_metric(labels, size)
        yield instances
        yield nbytes

        duration = HistogramMetricFamily(
            "pacs_cstore_duration_seconds",
            "C-STORE duration, from the request's command set to the response sent.",
            labels=["calling_ae", "sop_class"],
        )
        for (calling, sop), h in s.cstore_hist.items():
            duration.add_metric([calling, sop], _buckets(_CSTORE_LE, h[1:]), h[0])
        yield duration

        # -- per worker --
        connections_total = CounterMetricFamily(
            "pacs_connections",
            "Transport connections accepted.",
            labels=["worker"],
        )
        pdus = CounterMetricFamily(
            "pacs_pdus",
            "Upper Layer PDUs, by PDU type and direction.",
            labels=["worker", "pdu_type", "direction"],
        )
        net = CounterMetricFamily(
            "pacs_network_bytes",
            "Bytes on DICOM connections (PDU headers included), by direction.",
            labels=["worker", "direction"],
        )
        dimse = CounterMetricFamily(
            "pacs_dimse_messages",
            "DIMSE messages, by command, direction and status (none for requests).",
            labels=["worker", "command", "direction", "status", "status_category"],
        )
        transitions = CounterMetricFamily(
            "pacs_fsm_transitions",
            "PS3.8 state machine transitions (counted while transitions are traced).",
            labels=["worker", "state", "event", "next_state"],
        )
        handler_errors = CounterMetricFamily(
            "pacs_handler_errors",
            "User handlers that raised, timed out or answered unusably, by event.",
            labels=["worker", "event"],
        )
        dropped = CounterMetricFamily(
            "pacs_telemetry_dropped",
            "Telemetry updates a process could not keep or deliver.",
            labels=["worker"],
        )
        frames = CounterMetricFamily(
            "pacs_telemetry_frames",
            "Telemetry frames received.",
            labels=["worker"],
        )
        records = CounterMetricFamily(
            "pacs_telemetry_records",
            "Telemetry records received.",
            labels=["worker"],
        )
        storage = {
            op: HistogramMetricFamily(
                f"pacs_storage_{name}_duration_seconds",
                f"Duration of one {name}(2) system call of the storage.",
                labels=["worker"],
            )
            for op, name in STORAGE_OPS.items()
        }
        for worker, t in s.workers.items():
            connections_total.add_metric([worker], t.connections)
            for direction, dname in DIRECTIONS.items():
                counts = t.pdus[direction]
                for pdu_type, pname in PDU_TYPES.items():
                    if counts[pdu_type]:
                        pdus.add_metric([worker, pname, dname], counts[pdu_type])
                net.add_metric([worker, dname], t.bytes[direction])
            for (direction, command, status), n in t.dimse.items():
                dimse.add_metric(
                    [worker, command, DIRECTIONS[direction], status, _category_of(status)], n
                )
            for (state, event, nxt), n in t.transitions.items():
                transitions.add_metric([worker, state, event, nxt], n)
            for event, n in t.handler_errors.items():
                handler_errors.add_metric([worker, event], n)
            dropped.add_metric([worker], t.dropped)
            frames.add_metric([worker], t.frames)
            records.add_metric([worker], t.records)
            for op, h in t.storage.items():
                storage[op].add_metric([worker], _buckets(_STORAGE_LE, h[1:]), h[0])
        yield connections_total
        yield pdus
        yield net
        yield dimse
        yield transitions
        yield handler_errors
        yield from storage.values()
        yield dropped
        yield frames
        yield records

        open_conns = GaugeMetricFamily(
            "pacs_connections_open",
            "Transport connections open.",
            labels=["worker"],
        )
        per_worker: dict[str, int] = {}
        for src in s.sources:
            if src.ready and src.role == "worker":
                _add(per_worker, src.worker, src.open_connections)
        for worker, n in per_worker.items():
            open_conns.add_metric([worker], n)
        yield open_conns

        yield from _index_metrics(s)
        yield from _s3_metrics(s)

        restarts = CounterMetricFamily(
            "pacs_worker_restarts",
            "Processes restarted by the supervisor, by reason.",
            labels=["worker", "reason"],
        )
        for (worker, reason), n in s.restarts.items():
            restarts.add_metric([worker, reason], n)
        yield restarts
        families = {
            service: CounterMetricFamily(name, doc, labels=[label])
            for service, (name, doc, label) in SERVICE_METRICS.items()
        }
        for (service, value), n in s.services.items():
            families[service].add_metric([value], n)
        yield from families.values()

        contexts_rejected = CounterMetricFamily(
            "pacs_presentation_contexts_rejected",
            "Presentation contexts refused in an A-ASSOCIATE-AC, by PS3.8 Table 9-18 reason.",
            labels=["reason"],
        )
        for reason, n in s.contexts_rejected.items():
            contexts_rejected.add_metric([reason], n)
        yield contexts_rejected
        yield CounterMetricFamily(
            "pacs_audit_messages_sent",
            "DICOM audit messages handed to the syslog collector.",
            value=s.audit["sent"],
        )
        yield CounterMetricFamily(
            "pacs_audit_messages_dropped",
            "DICOM audit messages thrown away: queue full, collector down or too slow.",
            value=s.audit["dropped"],
        )

        unanswered = CounterMetricFamily(
            "pacs_acceptor_unanswered",
            "Refused connections the acceptor closed without an A-ASSOCIATE-RJ because "
            "too many refusals were already in flight.",
        )
        unanswered.add_metric([], s.acceptor.get("unanswered", 0))
        yield unanswered
        backoffs = CounterMetricFamily(
            "pacs_accept_backoffs",
            "Times the acceptor paused accepting connections, by error "
            "(EMFILE, ENFILE: out of file descriptors; ENOBUFS, ENOMEM: out of memory).",
            labels=["reason"],
        )
        for event, n in s.acceptor.items():
            if event.startswith("backoff_"):
                backoffs.add_metric([event.removeprefix("backoff_")], n)
        yield backoffs
        proxy = CounterMetricFamily(
            "pacs_proxy_protocol_rejected",
            "Connections closed by the acceptor for their PROXY protocol header, by reason "
            "(missing, malformed, too_long, truncated, timeout, untrusted).",
            labels=["reason"],
        )
        for event, n in s.acceptor.items():
            if event.startswith("proxy_"):
                proxy.add_metric([event.removeprefix("proxy_")], n)
        yield proxy

        # -- processes: the latest connection of each sender, and the aggregator --
        cpu = CounterMetricFamily(
            "pacs_process_cpu_seconds",
            "User and system CPU time of the process.",
            labels=["role", "worker"],
        )
        rss = GaugeMetricFamily(
            "pacs_process_resident_memory_bytes",
            "Resident memory of the process.",
            labels=["role", "worker"],
        )
        connected = GaugeMetricFamily(
            "pacs_telemetry_connected",
            "Telemetry connections open, by sender.",
            labels=["role", "worker"],
        )
        latest: dict[tuple[str, str], Source] = {}
        live: dict[tuple[str, str], int] = {}
        for src in s.sources:
            if not src.ready:
                continue
            key = (src.role, src.worker)
            _add(live, key, 1)
            if key not in latest or src.hello_at > latest[key].hello_at:
                latest[key] = src
        for key, src in latest.items():
            if src.cpu is not None:
                cpu.add_metric(list(key), src.cpu)
            if src.rss is not None:
                rss.add_metric(list(key), src.rss)
        cpu.add_metric(["aggregator", "aggregator"], procstat.cpu_seconds())
        rss.add_metric(["aggregator", "aggregator"], procstat.rss_bytes())
        for key, n in live.items():
            connected.add_metric(list(key), n)
        yield cpu
        yield rss
        yield connected

        invalid = CounterMetricFamily(
            "pacs_telemetry_invalid",
            "Telemetry input the aggregator skipped, by what was wrong.",
            labels=["reason"],
        )
        invalid.add_metric(["invalid_frame"], s.decode.invalid_frames)
        invalid.add_metric(["oversized_frame"], s.oversized_frames)
        invalid.add_metric(["invalid_record"], s.decode.invalid_records)
        invalid.add_metric(["unsupported_record"], s.decode.unsupported_records)
        invalid.add_metric(["no_hello"], s.records_without_hello)
        yield invalid

        start = GaugeMetricFamily(
            "pacs_aggregator_start_time_seconds",
            "When the aggregator started (Unix time); its counters start from zero then.",
        )
        start.add_metric([], s.started)
        yield start


def _s3_metrics(s: State) -> Iterator[Metric]:
    """The S3 spool's backlog (instances acknowledged, not yet in the bucket)."""
    sources = [src for src in s.sources if src.ready and src.s3_spool is not None]
    if not sources:
        return
    instances = GaugeMetricFamily(
        "pacs_s3_spool_backlog_instances",
        "Instances in the S3 spool, acknowledged and not yet uploaded.",
        labels=["worker"],
    )
    size = GaugeMetricFamily(
        "pacs_s3_spool_backlog_bytes",
        "Bytes of the instances in the S3 spool not yet uploaded.",
        labels=["worker"],
    )
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for src in sources:
        assert src.s3_spool is not None
        _add(counts, src.worker, src.s3_spool[0])
        _add(sizes, src.worker, src.s3_spool[1])
    for worker, n in counts.items():
        instances.add_metric([worker], n)
        size.add_metric([worker], sizes[worker])
    yield instances
    yield size


def _index_metrics(s: State) -> Iterator[Metric]:
    """The instance index: lag (records not yet written), written, errors, dropped."""
    lag = GaugeMetricFamily(
        "pacs_index_lag_records",
        "Index records of stored instances queued in the worker, not yet written.",
        labels=["worker"],
    )
    per_worker: dict[str, int] = {}
    for src in s.sources:
        if src.ready and src.index_lag is not None:
            _add(per_worker, src.worker, src.index_lag)
    for worker, n in per_worker.items():
        lag.add_metric([worker], n)
    families = [
        CounterMetricFamily(
            "pacs_index_records_written", "Index records written.", labels=["worker"]
        ),
        CounterMetricFamily(
            "pacs_index_errors",
            "Index batch writes that failed (each is retried).",
            labels=["worker"],
        ),
        CounterMetricFamily(
            "pacs_index_records_dropped",
            "Index records dropped (writer queue full or closing); the start-up "
            "reconcile indexes their instances.",
            labels=["worker"],
        ),
    ]
    for worker, t in s.workers.items():
        if any(t.index):
            for family, n in zip(families, t.index, strict=True):
                family.add_metric([worker], n)
    yield lag
    yield from families


def _category_of(status: str) -> str:
    """The category of a status label ("0xA700", "none" or "other")."""
    if status == "none":
        return "none"
    try:
        return status_category(int(status, 16))
    except ValueError:
        return UNKNOWN


# -- servers ---------------------------------------------------------------------------


class _TelemetryProtocol(asyncio.Protocol):
    """One sender's connection: frames in, applied to the state."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.state = aggregator.state
        self.decoder = w.FrameDecoder()
        self.source: Source | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.state.sources) >= self.aggregator.max_senders:
            log.warning("too many telemetry connections; refusing one")
            transport.close()
            return
        self.source = self.state.open_source()

    def data_received(self, data: bytes) -> None:
        source = self.source
        if source is None:
            return
        try:
            payloads = self.decoder.feed(data)
        except w.FrameError as exc:
            log.warning("telemetry from %s: %s; closing", source.worker or "?", exc)
            self.state.oversized_frames += 1
            self.source = None
            self.state.close_source(source)
            if self.transport is not None:
                self.transport.close()
            return
        for payload in payloads:
            self.state.feed(source, payload)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.source is not None:
            self.state.close_source(self.source)
            self.source = None


class Aggregator:
    """The aggregator's servers around one :class:`State`.

    ``await start()`` binds the unix socket and the HTTP port (0 picks a free port:
    see :attr:`http_port`); ``await close()`` stops both and removes the socket file.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 9464,
        limits: Limits | None = None,
        max_senders: int = 1024,
        http_timeout: float = 10.0,
        http_sock: socket.socket | None = None,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        #: a listening socket to serve HTTP on instead of binding host:port (the
        #: supervisor binds the port before it starts anything, and keeps it across
        #: our restarts: a port in use is found once, at start-up)
        self.http_sock = http_sock
        self.host = host
        self.port = port
        self.max_senders = max_senders
        self.http_timeout = http_timeout
        self.state = State(limits)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(self.state))
        self.http_port = 0
        self._unix: asyncio.AbstractServer | None = None
        self._http: MetricsHTTPServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _remove_stale_socket(self.socket_path)
        old_umask = os.umask(0o177)  # the socket file: owner only
        try:
            self._unix = await loop.create_unix_server(
                lambda: _TelemetryProtocol(self), self.socket_path, backlog=256
            )
        finally:
            os.umask(old_umask)
        self._http = MetricsHTTPServer(
            self.registry,
            self.host,
            self.port,
            self.http_timeout,
            sock=self.http_sock,
            readiness=self.state.readiness,
        )
        self._http.start(loop)
        self.http_port = self._http.port
        log.info(
            "metrics aggregator: telemetry on %s, http://%s:%d/metrics",
            self.socket_path,
            self.host,
            self.http_port,
        )

    async def close(self) -> None:
        if self._unix is not None:
            self._unix.close()
        if self._http is not None:
            await self._http.close()
        if self._unix is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._unix.wait_closed(), 2.0)
        self._unix = self._http = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def exposition(self) -> bytes:
        """The current metrics, in the Prometheus text format 0.0.4."""
        return generate_latest(self.registry)


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead aggregator; refuse to steal a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another aggregator listens on", path)
