"""Prometheus exposition of the aggregator's :class:`~metrics.state.State`.

:class:`StateCollector` is a prometheus-client custom collector; at scrape time it
reads the state through one small function per family group (associations, C-STORE,
per-worker counters, index, S3 spool, services, acceptor, processes, the aggregator's
own health), in the order the families have always been exposed. Nothing here
changes the state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import procstat
from . import wire as w
from .state import (
    DIRECTIONS,
    PDU_TYPES,
    SERVICE_METRICS,
    STORAGE_OPS,
    UNKNOWN,
    Source,
    State,
    _add,
    status_category,
)

__all__ = ["StateCollector"]

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
        for family in _FAMILIES:
            yield from family(self.state)


_AE2 = ["calling_ae", "called_ae"]


def _association_metrics(s: State) -> Iterator[Metric]:
    """Associations requested, accepted, released, rejected, aborted and open."""
    outcomes = {
        1: CounterMetricFamily(
            "pacs_associations_requested",
            "A-ASSOCIATE-RQs received.",
            labels=_AE2,
        ),
        2: CounterMetricFamily(
            "pacs_associations_accepted",
            "Associations accepted (A-ASSOCIATE-AC sent).",
            labels=_AE2,
        ),
        3: CounterMetricFamily(
            "pacs_associations_released",
            "Associations ended by an orderly A-RELEASE.",
            labels=_AE2,
        ),
    }
    for (outcome, calling, called), n in s.assoc.items():
        outcomes[outcome].add_metric([calling, called], n)
    yield from outcomes.values()

    rejected = CounterMetricFamily(
        "pacs_associations_rejected",
        "Associations rejected (A-ASSOCIATE-RJ sent), by Result, Source and "
        "Reason/Diag. of PS3.8 Table 9-21.",
        labels=[*_AE2, "result", "source", "reason"],
    )
    for labels5, n in s.rejected.items():
        rejected.add_metric(list(labels5), n)
    yield rejected

    aborted = CounterMetricFamily(
        "pacs_associations_aborted",
        "Associations ended abnormally: initiator peer (its A-ABORT), local (our "
        "A-ABORT) or transport (connection lost, A-P-ABORT); source and reason of "
        "the A-ABORT (PS3.8 Table 9-26) when known.",
        labels=[*_AE2, "initiator", "source", "reason"],
    )
    for labels5, n in s.aborted.items():
        aborted.add_metric(list(labels5), n)
    yield aborted

    open_assocs = GaugeMetricFamily(
        "pacs_associations_open",
        "Associations established and not yet ended.",
        labels=_AE2,
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


def _cstore_metrics(s: State) -> Iterator[Metric]:
    """C-STORE instances, bytes and durations."""
    instances = CounterMetricFamily(
        "pacs_cstore_instances",
        "C-STORE operations answered, by response status.",
        labels=[*_AE2, "sop_class", "status", "status_category"],
    )
    nbytes = CounterMetricFamily(
        "pacs_cstore_received_bytes",
        "C-STORE data-set bytes received, by response status.",
        labels=[*_AE2, "sop_class", "status", "status_category"],
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


def _worker_metrics(s: State) -> Iterator[Metric]:
    """Per-worker counters: connections, PDUs, bytes, DIMSE, transitions, handler
    errors, storage system calls, telemetry received."""
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


def _open_connection_metrics(s: State) -> Iterator[Metric]:
    """Transport connections open, by worker (gauge snapshots)."""
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


def _restart_metrics(s: State) -> Iterator[Metric]:
    """Processes restarted by the supervisor."""
    restarts = CounterMetricFamily(
        "pacs_worker_restarts",
        "Processes restarted by the supervisor, by reason.",
        labels=["worker", "reason"],
    )
    for (worker, reason), n in s.restarts.items():
        restarts.add_metric([worker, reason], n)
    yield restarts


def _service_metrics(s: State) -> Iterator[Metric]:
    """Storage commitment, queries and retrieves answered from the index."""
    families = {
        service: CounterMetricFamily(name, doc, labels=[label])
        for service, (name, doc, label) in SERVICE_METRICS.items()
    }
    for (service, value), n in s.services.items():
        families[service].add_metric([value], n)
    yield from families.values()


def _negotiation_and_audit_metrics(s: State) -> Iterator[Metric]:
    """Presentation contexts refused; audit messages sent and dropped."""
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


def _acceptor_metrics(s: State) -> Iterator[Metric]:
    """The acceptor's trouble: unanswered refusals, accept back-offs."""
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


def _process_metrics(s: State) -> Iterator[Metric]:
    """CPU and memory of the latest connection of each sender, and of the aggregator."""
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


def _aggregator_metrics(s: State) -> Iterator[Metric]:
    """The aggregator's own health: skipped input, start time."""
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


#: The family groups, in exposition order.
_FAMILIES: tuple[Callable[[State], Iterator[Metric]], ...] = (
    _association_metrics,
    _cstore_metrics,
    _worker_metrics,
    _open_connection_metrics,
    _index_metrics,
    _s3_metrics,
    _restart_metrics,
    _service_metrics,
    _negotiation_and_audit_metrics,
    _acceptor_metrics,
    _process_metrics,
    _aggregator_metrics,
)
