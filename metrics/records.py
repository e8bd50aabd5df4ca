"""The telemetry records: what a worker tells the aggregator, field by field.

Every record is a frozen dataclass naming its :class:`Kind` and listing its fields in
wire order; :mod:`metrics.wire` puts them on the wire (framing, msgpack, validation) and
re-exports every name here, so ``from metrics import wire as w; w.CStore`` keeps
working.

A record is either

* a **delta**: how much a counter (or the buckets of a histogram) grew since the
  previous record with the same key from the same process. The aggregator adds deltas
  to cumulative totals, so the exact sum survives any batching, any number of
  reconnects and any number of worker restarts (a new process just sends new deltas);
* a **snapshot**: the current absolute value of something that goes up and down
  (:class:`Process`, :class:`Gauges`), replaced whole on each report and forgotten when
  the connection closes.

Histograms are pre-bucketed by the sender with the bounds fixed below for this schema
version (``CSTORE_BUCKETS``, ``STORAGE_BUCKETS``): a histogram field holds one count per
bucket, *not* cumulative, the last one for observations above the largest bound.

Fields may be appended to a kind without a version bump (receivers ignore fields past
the ones they know). Changing a field's meaning or a bucket bound needs a new
``VERSION``. Kind numbers never change; new kinds take numbers from 41 up.

No dependency beyond the standard library.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

__all__ = [
    "COUNT",
    "CSTORE_BUCKETS",
    "NO_STATUS",
    "OTHER",
    "RECORD_TYPES",
    "STORAGE_BUCKETS",
    "VERSION",
    "AbortInitiator",
    "Aborted",
    "Acceptor",
    "Association",
    "AuditMessages",
    "Bytes",
    "CStore",
    "Connections",
    "ContextRejected",
    "Dimse",
    "Direction",
    "Dropped",
    "Gauges",
    "HandlerError",
    "Hello",
    "IndexLag",
    "IndexWrites",
    "Kind",
    "Outcome",
    "Pdus",
    "Process",
    "Record",
    "Rejected",
    "Restart",
    "S3Spool",
    "Service",
    "Storage",
    "StorageOp",
    "Transition",
    "bucket_index",
]

#: Schema version carried by every record.
VERSION = 1

#: Label value that stands for every value past a limiter's bound.
OTHER = "other"

#: ``Dimse.status`` of a message that carries no Status (requests).
NO_STATUS = -1

#: Upper bounds (seconds) of the C-STORE duration histogram buckets: from the command
#: set's arrival to the response being sent.
CSTORE_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: Upper bounds (seconds) of the storage write(2) and fsync(2) histogram buckets.
STORAGE_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)


def bucket_index(bounds: Sequence[float], value: float) -> int:
    """Index of the bucket ``value`` falls in (``len(bounds)`` for the overflow bucket).

    Buckets are upper-inclusive, as in Prometheus (``le``).
    """
    return bisect_left(bounds, value)


class Kind(IntEnum):
    """Record kinds (the second element of every record)."""

    HELLO = 1
    PROCESS = 2
    GAUGES = 3
    CONNECTIONS = 4
    PDUS = 5
    BYTES = 6
    DIMSE = 7
    ASSOCIATION = 8
    REJECTED = 9
    ABORTED = 10
    CSTORE = 11
    STORAGE = 12
    TRANSITION = 13
    HANDLER_ERROR = 14
    DROPPED = 15
    RESTART = 16
    CONTEXT_REJECTED = 17
    AUDIT_MESSAGES = 18
    #: services over the instance index (workers/indexed.py); numbered apart from
    #: the kinds above so that other additions do not collide with it
    SERVICE = 20
    # The instance index (workers/index); numbered apart so that kinds added on other
    # branches meanwhile do not collide.
    INDEX_LAG = 32
    INDEX_WRITES = 33
    #: acceptor trouble reported by the supervisor (refusals unanswered, accept back-off)
    ACCEPTOR = 21
    # The object store's spool (workers/storage/spool.py), numbered apart likewise.
    S3_SPOOL = 40


class Direction(IntEnum):
    """Which way a PDU, byte or DIMSE message went, seen from the receiver."""

    RECEIVED = 0
    SENT = 1


class Outcome(IntEnum):
    """``Association.outcome``: the association milestones counted without details."""

    REQUESTED = 1
    ACCEPTED = 2
    RELEASED = 3


class AbortInitiator(IntEnum):
    """Who ended the association abnormally (``Aborted.initiator``)."""

    UNKNOWN = 0
    #: the peer sent an A-ABORT
    PEER = 1
    #: we sent an A-ABORT (a handler, a protocol fault, a timeout, shutdown)
    LOCAL = 2
    #: the transport closed under an open association (A-P-ABORT, PS3.8 AA-4)
    TRANSPORT = 3


class StorageOp(IntEnum):
    """``Storage.op``: which system call a storage histogram times."""

    WRITE = 1
    FSYNC = 2


# -- records ---------------------------------------------------------------------------
#
# Each record class lists its fields in wire order. ``_SPEC`` gives each field's check:
# int, float (finite, >= 0), str, COUNT (an int >= 0), or the name of a structured check (bucket
# lists, gauge tuples).

COUNT = "count"


@dataclass(slots=True, frozen=True)
class Hello:
    """First record of a connection. ``role``: "worker", "supervisor" ...; ``name``:
    the worker id (the ``worker`` label); ``pid``: the sending process."""

    role: str
    name: str
    pid: int

    KIND: ClassVar[Kind] = Kind.HELLO
    _SPEC: ClassVar[tuple[Any, ...]] = (str, str, int)


@dataclass(slots=True, frozen=True)
class Process:
    """Snapshot: the sender's CPU time (user + system, seconds since it started) and
    resident memory (bytes)."""

    cpu_seconds: float
    rss_bytes: int

    KIND: ClassVar[Kind] = Kind.PROCESS
    _SPEC: ClassVar[tuple[Any, ...]] = (float, COUNT)


@dataclass(slots=True, frozen=True)
class Gauges:
    """Snapshot: open transport connections and open (established) associations by
    (calling AE, called AE)."""

    open_connections: int
    open_associations: tuple[tuple[str, str, int], ...]

    KIND: ClassVar[Kind] = Kind.GAUGES
    _SPEC: ClassVar[tuple[Any, ...]] = (COUNT, "assoc_gauges")


@dataclass(slots=True, frozen=True)
class Connections:
    """Delta: transport connections opened."""

    opened: int

    KIND: ClassVar[Kind] = Kind.CONNECTIONS
    _SPEC: ClassVar[tuple[Any, ...]] = (COUNT,)


@dataclass(slots=True, frozen=True)
class Pdus:
    """Delta: PDUs of ``pdu_type`` (PS3.8 Table 9-11, 1..7) received or sent."""

    direction: int
    pdu_type: int
    count: int

    KIND: ClassVar[Kind] = Kind.PDUS
    _SPEC: ClassVar[tuple[Any, ...]] = (int, int, COUNT)


@dataclass(slots=True, frozen=True)
class Bytes:
    """Delta: transport bytes received or sent (PDU headers included)."""

    direction: int
    count: int

    KIND: ClassVar[Kind] = Kind.BYTES
    _SPEC: ClassVar[tuple[Any, ...]] = (int, COUNT)


@dataclass(slots=True, frozen=True)
class Dimse:
    """Delta: DIMSE messages by (0000,0100) Command Field and (0000,0900) Status
    (:data:`NO_STATUS` for requests)."""

    direction: int
    command_field: int
    status: int
    count: int

    KIND: ClassVar[Kind] = Kind.DIMSE
    _SPEC: ClassVar[tuple[Any, ...]] = (int, int, int, COUNT)


@dataclass(slots=True, frozen=True)
class Association:
    """Delta: associations that reached ``outcome`` (:class:`Outcome`)."""

    outcome: int
    calling_ae: str
    called_ae: str
    count: int

    KIND: ClassVar[Kind] = Kind.ASSOCIATION
    _SPEC: ClassVar[tuple[Any, ...]] = (int, str, str, COUNT)


@dataclass(slots=True, frozen=True)
class Rejected:
    """Delta: associations rejected, by the A-ASSOCIATE-RJ's Result, Source and
    Reason/Diag. (PS3.8 Table 9-21)."""

    calling_ae: str
    called_ae: str
    result: int
    source: int
    reason: int
    count: int

    KIND: ClassVar[Kind] = Kind.REJECTED
    _SPEC: ClassVar[tuple[Any, ...]] = (str, str, int, int, int, COUNT)


@dataclass(slots=True, frozen=True)
class Aborted:
    """Delta: associations aborted, by :class:`AbortInitiator` and the A-ABORT's
    Source and Reason/Diag. (PS3.8 Table 9-26; -1 when unknown)."""

    calling_ae: str
    called_ae: str
    initiator: int
    source: int
    reason: int
    count: int

    KIND: ClassVar[Kind] = Kind.ABORTED
    _SPEC: ClassVar[tuple[Any, ...]] = (str, str, int, int, int, COUNT)


@dataclass(slots=True, frozen=True)
class CStore:
    """Delta: C-STORE operations answered, by (calling AE, called AE, SOP class,
    response status): data-set bytes received, the sum of their durations (seconds)
    and their duration histogram over :data:`CSTORE_BUCKETS`. The number of
    instances is ``sum(buckets)``."""

    calling_ae: str
    called_ae: str
    sop_class: str
    status: int
    nbytes: int
    duration_sum: float
    buckets: tuple[int, ...]

    KIND: ClassVar[Kind] = Kind.CSTORE
    _SPEC: ClassVar[tuple[Any, ...]] = (str, str, str, int, COUNT, float, "cstore_buckets")


@dataclass(slots=True, frozen=True)
class Storage:
    """Delta: storage system calls timed (:class:`StorageOp`): the sum of their
    durations (seconds) and their histogram over :data:`STORAGE_BUCKETS`."""

    op: int
    duration_sum: float
    buckets: tuple[int, ...]

    KIND: ClassVar[Kind] = Kind.STORAGE
    _SPEC: ClassVar[tuple[Any, ...]] = (int, float, "storage_buckets")


@dataclass(slots=True, frozen=True)
class Transition:
    """Delta: PS3.8 state machine transitions ("Sta6", "Evt10", "Sta6")."""

    state: str
    event: str
    next_state: str
    count: int

    KIND: ClassVar[Kind] = Kind.TRANSITION
    _SPEC: ClassVar[tuple[Any, ...]] = (str, str, str, COUNT)


@dataclass(slots=True, frozen=True)
class HandlerError:
    """Delta: user handlers that raised, timed out or answered unusably, by event."""

    event: str
    count: int

    KIND: ClassVar[Kind] = Kind.HANDLER_ERROR
    _SPEC: ClassVar[tuple[Any, ...]] = (str, COUNT)


@dataclass(slots=True, frozen=True)
class Dropped:
    """Delta: telemetry the sender had to throw away (see workers.telemetry)."""

    count: int

    KIND: ClassVar[Kind] = Kind.DROPPED
    _SPEC: ClassVar[tuple[Any, ...]] = (COUNT,)


@dataclass(slots=True, frozen=True)
class Restart:
    """Delta (from the supervisor): a process was restarted; ``reason`` names why
    ("exit_1", "SIGKILL", "heartbeat" ...)."""

    worker: str
    reason: str
    count: int

    KIND: ClassVar[Kind] = Kind.RESTART
    _SPEC: ClassVar[tuple[Any, ...]] = (str, str, COUNT)


@dataclass(slots=True, frozen=True)
class ContextRejected:
    """Delta: presentation contexts refused in an A-ASSOCIATE-AC, by the PS3.8
    Table 9-18 reason ("abstract-syntax-not-supported" ...)."""

    reason: str
    count: int

    KIND: ClassVar[Kind] = Kind.CONTEXT_REJECTED
    _SPEC: ClassVar[tuple[Any, ...]] = (str, COUNT)


@dataclass(slots=True, frozen=True)
class AuditMessages:
    """Delta: DICOM audit messages handed to the syslog collector ("sent") or
    thrown away ("dropped": queue full, collector down or too slow)."""

    outcome: str
    count: int

    KIND: ClassVar[Kind] = Kind.AUDIT_MESSAGES
    _SPEC: ClassVar[tuple[Any, ...]] = (str, COUNT)


@dataclass(slots=True, frozen=True)
class Service:
    """Delta: operations of the services answered from the instance index, by
    ``service`` ("commitment_request", "commitment_instance", "commitment_report",
    "query", "retrieve") and ``label`` (outcome, query level, C-GET / C-MOVE)."""

    service: str
    label: str
    count: int

    KIND: ClassVar[Kind] = Kind.SERVICE
    _SPEC: ClassVar[tuple[Any, ...]] = (str, str, COUNT)


@dataclass(slots=True, frozen=True)
class IndexLag:
    """Snapshot: index records accepted by the worker's writer, not yet written."""

    records: int

    KIND: ClassVar[Kind] = Kind.INDEX_LAG
    _SPEC: ClassVar[tuple[Any, ...]] = (COUNT,)


@dataclass(slots=True, frozen=True)
class IndexWrites:
    """Delta: index records written, batch attempts that failed, records dropped
    (writer queue full; the start-up reconcile indexes them)."""

    written: int
    errors: int
    dropped: int

    KIND: ClassVar[Kind] = Kind.INDEX_WRITES
    _SPEC: ClassVar[tuple[Any, ...]] = (COUNT, COUNT, COUNT)


@dataclass(slots=True, frozen=True)
class Acceptor:
    """Delta (from the supervisor): acceptor trouble by ``event``: "unanswered" (a
    refused connection closed without its A-ASSOCIATE-RJ: too many refusals in
    flight), "backoff_EMFILE" / "backoff_ENFILE" / ... (accepting paused for want of
    file descriptors or memory)."""

    event: str
    count: int

    KIND: ClassVar[Kind] = Kind.ACCEPTOR
    _SPEC: ClassVar[tuple[Any, ...]] = (str, COUNT)


@dataclass(slots=True, frozen=True)
class S3Spool:
    """Snapshot: instances and bytes in the worker's spool, not yet uploaded."""

    instances: int
    bytes: int

    KIND: ClassVar[Kind] = Kind.S3_SPOOL
    _SPEC: ClassVar[tuple[Any, ...]] = (COUNT, COUNT)


Record = (
    Hello
    | Process
    | Gauges
    | Connections
    | Pdus
    | Bytes
    | Dimse
    | Association
    | Rejected
    | Aborted
    | CStore
    | Storage
    | Transition
    | HandlerError
    | Dropped
    | Restart
    | ContextRejected
    | AuditMessages
    | Service
    | IndexLag
    | IndexWrites
    | Acceptor
    | S3Spool
)

#: Record class by kind.
RECORD_TYPES: dict[int, type[Any]] = {
    cls.KIND: cls
    for cls in (
        Hello,
        Process,
        Gauges,
        Connections,
        Pdus,
        Bytes,
        Dimse,
        Association,
        Rejected,
        Aborted,
        CStore,
        Storage,
        Transition,
        HandlerError,
        Dropped,
        Restart,
        ContextRejected,
        AuditMessages,
        Service,
        IndexLag,
        IndexWrites,
        Acceptor,
        S3Spool,
    )
}
