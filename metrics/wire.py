"""The telemetry wire format: the one contract between workers and the aggregator.

Theory of operation
-------------------
A worker (or the supervisor) connects to the aggregator's unix stream socket and sends
*frames*; nothing ever comes back. A frame is a 4-byte big-endian payload length
followed by a msgpack array of *records*; a record is a msgpack array::

    [schema_version, kind, field, field, ...]

The first record on every connection is a :class:`Hello` (who is talking). Every other
record is either

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

Compatibility rules: a receiver ignores fields past the ones it knows (so fields may be
appended to a kind without a version bump), skips and counts records of an unknown
kind or of another schema version, and never fails on malformed input (the record is
skipped and counted). Changing a field's meaning or a bucket bound needs a new
``VERSION``.

Label values are bounded on both sides with :class:`LabelLimiter`: past a configured
number of distinct values (AE titles, SOP classes ...) new ones fold into
:data:`OTHER`.

This module has no dependency beyond msgpack: workers import it, and so does the
aggregator. Only the aggregator imports prometheus-client.
"""

from __future__ import annotations

import math
import struct
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

import msgpack

__all__ = [
    "CSTORE_BUCKETS",
    "MAX_FRAME_BYTES",
    "NO_STATUS",
    "OTHER",
    "RECORD_TYPES",
    "STORAGE_BUCKETS",
    "VERSION",
    "AbortInitiator",
    "Aborted",
    "Association",
    "AuditMessages",
    "Bytes",
    "CStore",
    "Connections",
    "ContextRejected",
    "DecodeStats",
    "Dimse",
    "Direction",
    "Dropped",
    "FrameDecoder",
    "FrameError",
    "Gauges",
    "HandlerError",
    "Hello",
    "IndexLag",
    "IndexWrites",
    "Kind",
    "LabelLimiter",
    "Outcome",
    "Pdus",
    "Process",
    "Record",
    "Rejected",
    "Restart",
    "Service",
    "Storage",
    "StorageOp",
    "Transition",
    "bucket_index",
    "decode_payload",
    "encode_frame",
    "encode_frames",
]

#: Schema version carried by every record.
VERSION = 1

#: Largest frame payload a receiver accepts; a sender never builds a larger one.
MAX_FRAME_BYTES = 4 * 1024 * 1024

_LENGTH = struct.Struct(">I")

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
    #: the supervisor's readiness (accepting / draining) for GET /readyz
    READINESS = 41


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


@dataclass(slots=True, frozen=True)
class Readiness:
    """Snapshot (from the supervisor, every tick): ``draining`` 0 while it accepts,
    1 once SIGTERM came (GET /readyz answers 503 from then on)."""

    draining: int

    KIND: ClassVar[Kind] = Kind.READINESS
    _SPEC: ClassVar[tuple[Any, ...]] = (COUNT,)


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
    | Readiness
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
        Readiness,
    )
}


# -- encoding --------------------------------------------------------------------------

_packer = msgpack.Packer(use_bin_type=True, autoreset=True)


def _to_wire(record: Record) -> list[Any]:
    out: list[Any] = [VERSION, int(record.KIND)]
    for name in record.__slots__:
        out.append(getattr(record, name))
    return out


def encode_frame(records: Iterable[Record]) -> bytes:
    """One frame (length prefix + payload) holding ``records``.

    Raises ValueError if the payload would exceed :data:`MAX_FRAME_BYTES`
    (:func:`encode_frames` splits instead).
    """
    payload = _packer.pack([_to_wire(r) for r in records])
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LENGTH.pack(len(payload)) + payload


def encode_frames(
    records: Sequence[Record], max_records: int = 2048
) -> Iterator[tuple[bytes, int, int]]:
    """Split ``records`` into frames of at most ``max_records`` records.

    Yields ``(frame, start, stop)``: the frame holds ``records[start:stop]``, so a
    sender can tell which records a frame that was not delivered carried.
    """
    start = 0
    n = len(records)
    while start < n:
        stop = min(n, start + max_records)
        chunk = [_to_wire(r) for r in records[start:stop]]
        payload = _packer.pack(chunk)
        while len(payload) > MAX_FRAME_BYTES and stop - start > 1:
            stop = start + (stop - start) // 2
            chunk = chunk[: stop - start]
            payload = _packer.pack(chunk)
        if len(payload) > MAX_FRAME_BYTES:
            raise ValueError("a single record exceeds the frame size limit")
        yield _LENGTH.pack(len(payload)) + payload, start, stop
        start = stop


# -- decoding --------------------------------------------------------------------------


class FrameError(ValueError):
    """The byte stream cannot be framed (length past the limit): drop the connection."""


class FrameDecoder:
    """Splits a byte stream into frame payloads; memory stays under one frame."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (a stream that ends here lost them)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add bytes; return every payload completed by them."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = _LENGTH.unpack_from(buf, pos)
            if size > self.max_frame:
                raise FrameError(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
            if end - pos - 4 < size:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out


@dataclass(slots=True)
class DecodeStats:
    """What :func:`decode_payload` had to skip."""

    invalid_frames: int = 0
    invalid_records: int = 0
    unsupported_records: int = 0


_BUCKET_LENGTHS = {
    "cstore_buckets": len(CSTORE_BUCKETS) + 1,
    "storage_buckets": len(STORAGE_BUCKETS) + 1,
}


def _check(spec: Any, value: Any) -> Any:
    """Value converted to the field's type; raises ValueError when it does not fit."""
    if spec is int:
        if type(value) is not int:
            raise ValueError("int expected")
        return value
    if spec is float:
        # Every float of the schema is a non-negative, finite amount (seconds).
        if type(value) is int:
            value = float(value)
        if type(value) is not float or not 0.0 <= value < math.inf:
            raise ValueError("finite non-negative float expected")
        return value
    if spec == COUNT:
        if type(value) is not int or value < 0:
            raise ValueError("non-negative int expected")
        return value
    if spec is str:
        if type(value) is not str:
            raise ValueError("str expected")
        return value
    if spec in _BUCKET_LENGTHS:
        if type(value) is not list or len(value) != _BUCKET_LENGTHS[spec]:
            raise ValueError("bucket list of the wrong shape")
        for v in value:
            if type(v) is not int or v < 0:
                raise ValueError("bucket counts are non-negative ints")
        return tuple(value)
    if spec == "assoc_gauges":
        if type(value) is not list:
            raise ValueError("list expected")
        items = []
        for item in value:
            if (
                type(item) is not list
                or len(item) != 3
                or type(item[0]) is not str
                or type(item[1]) is not str
                or type(item[2]) is not int
                or item[2] < 0
            ):
                raise ValueError("[calling, called, n] expected")
            items.append((item[0], item[1], item[2]))
        return tuple(items)
    raise AssertionError(spec)


def decode_record(raw: Any) -> Record:
    """One wire record as its class; ValueError if malformed, LookupError if it is of
    an unknown kind or schema version."""
    if type(raw) is not list or len(raw) < 2:
        raise ValueError("a record is an array [version, kind, fields...]")
    if raw[0] != VERSION or type(raw[0]) is not int:
        raise LookupError(f"schema version {raw[0]!r}")
    cls = RECORD_TYPES.get(raw[1]) if type(raw[1]) is int else None
    if cls is None:
        raise LookupError(f"record kind {raw[1]!r}")
    spec = cls._SPEC
    if len(raw) < 2 + len(spec):
        raise ValueError(f"{cls.__name__} record with {len(raw) - 2} fields")
    # Fields past the known ones are ignored: they may be appended in this version.
    fields = [_check(s, v) for s, v in zip(spec, raw[2:], strict=False)]
    record: Record = cls(*fields)
    return record


def decode_payload(payload: bytes, stats: DecodeStats | None = None) -> list[Record]:
    """The records of one frame payload. Malformed input never raises: bad frames and
    records are skipped and counted in ``stats``."""
    try:
        raw = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception:
        if stats is not None:
            stats.invalid_frames += 1
        return []
    if type(raw) is not list:
        if stats is not None:
            stats.invalid_frames += 1
        return []
    out: list[Record] = []
    for item in raw:
        try:
            out.append(decode_record(item))
        except LookupError:
            if stats is not None:
                stats.unsupported_records += 1
        except (ValueError, TypeError):
            if stats is not None:
                stats.invalid_records += 1
    return out


# -- label bounds ----------------------------------------------------------------------


class LabelLimiter:
    """Keeps at most ``limit`` distinct label values; later ones become :data:`OTHER`.

    Values are also cut to ``max_length`` characters (AE titles are 16, UIDs 64).
    First come, first kept: the set never shrinks, so a series never changes its
    label while the process lives.
    """

    __slots__ = ("_seen", "limit", "max_length")

    def __init__(self, limit: int, max_length: int = 64) -> None:
        self.limit = limit
        self.max_length = max_length
        self._seen: dict[str, str] = {OTHER: OTHER}

    def __call__(self, value: str) -> str:
        known = self._seen.get(value)
        if known is not None:
            return known
        if len(self._seen) > self.limit:  # OTHER itself takes no slot
            return OTHER
        label = value[: self.max_length]
        self._seen[value] = label
        return label

    def __len__(self) -> int:
        return len(self._seen) - 1

    @property
    def known(self) -> dict[str, str]:
        """Value -> label of the values seen so far (do not modify): ``known.get(v)``
        is a cheaper lookup than a call on hot paths."""
        return self._seen
