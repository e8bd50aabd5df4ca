"""The telemetry wire format: the one contract between workers and the aggregator.

Theory of operation
-------------------
A worker (or the supervisor) connects to the aggregator's unix stream socket and sends
*frames*; nothing ever comes back. A frame is a 4-byte big-endian payload length
followed by a msgpack array of *records*; a record is a msgpack array::

    [schema_version, kind, field, field, ...]

The first record on every connection is a :class:`Hello` (who is talking). The records
themselves -- kinds, fields, deltas and snapshots, histogram bounds -- are defined in
:mod:`metrics.records`; this module is their codec and re-exports every record name, so
``from metrics import wire as w`` is all a sender or the aggregator needs.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from .records import (
    COUNT,
    CSTORE_BUCKETS,
    NO_STATUS,
    OTHER,
    RECORD_TYPES,
    STORAGE_BUCKETS,
    VERSION,
    Aborted,
    AbortInitiator,
    Acceptor,
    Association,
    AuditMessages,
    Bytes,
    Connections,
    ContextRejected,
    CStore,
    Dimse,
    Direction,
    Dropped,
    Gauges,
    HandlerError,
    Hello,
    IndexLag,
    IndexWrites,
    Kind,
    Outcome,
    Pdus,
    Process,
    Record,
    Rejected,
    Restart,
    S3Spool,
    Service,
    Storage,
    StorageOp,
    Transition,
    bucket_index,
)

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
    "Acceptor",
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
    "S3Spool",
    "Service",
    "Storage",
    "StorageOp",
    "Transition",
    "bucket_index",
    "decode_payload",
    "encode_frame",
    "encode_frames",
]

#: Largest frame payload a receiver accepts; a sender never builds a larger one.
MAX_FRAME_BYTES = 4 * 1024 * 1024

_LENGTH = struct.Struct(">I")


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
