"""Tests for metrics.wire: the frame schema shared by workers and the aggregator."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics import wire as w

counts = st.integers(min_value=0, max_value=2**63 - 1)
ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)
texts = st.text(max_size=70)
seconds = st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False)


def _buckets(n: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(counts, min_size=n, max_size=n).map(tuple)


RECORDS: st.SearchStrategy[Any] = st.one_of(
    st.builds(w.Hello, texts, texts, counts),
    st.builds(w.Process, seconds, counts),
    st.builds(
        w.Gauges,
        counts,
        st.lists(st.tuples(texts, texts, counts), max_size=5).map(tuple),
    ),
    st.builds(w.Connections, counts),
    st.builds(w.Pdus, ints, ints, counts),
    st.builds(w.Bytes, ints, counts),
    st.builds(w.Dimse, ints, ints, ints, counts),
    st.builds(w.Association, ints, texts, texts, counts),
    st.builds(w.Rejected, texts, texts, ints, ints, ints, counts),
    st.builds(w.Aborted, texts, texts, ints, ints, ints, counts),
    st.builds(
        w.CStore,
        texts,
        texts,
        texts,
        ints,
        counts,
        seconds,
        _buckets(len(w.CSTORE_BUCKETS) + 1),
    ),
    st.builds(w.Storage, ints, seconds, _buckets(len(w.STORAGE_BUCKETS) + 1)),
    st.builds(w.Transition, texts, texts, texts, counts),
    st.builds(w.HandlerError, texts, counts),
    st.builds(w.Dropped, counts),
    st.builds(w.Restart, texts, texts, counts),
    st.builds(w.ContextRejected, texts, counts),
    st.builds(w.AuditMessages, texts, counts),
    st.builds(w.Acceptor, texts, counts),
)


def _payloads(frame: bytes) -> list[bytes]:
    return w.FrameDecoder().feed(frame)


def test_every_kind_has_a_record_class() -> None:
    assert set(w.RECORD_TYPES) == set(w.Kind)
    for kind, cls in w.RECORD_TYPES.items():
        assert kind == cls.KIND
        assert len(cls._SPEC) == len(cls.__slots__)


@settings(max_examples=300)
@given(st.lists(RECORDS, max_size=30))
def test_round_trip(records: list[Any]) -> None:
    frame = w.encode_frame(records)
    (payload,) = _payloads(frame)
    stats = w.DecodeStats()
    assert w.decode_payload(payload, stats) == records
    assert stats == w.DecodeStats()


@given(st.lists(RECORDS, min_size=1, max_size=20), st.data())
def test_frames_split_anywhere(records: list[Any], data: st.DataObject) -> None:
    """Feeding a stream in arbitrary pieces yields the same payloads."""
    stream = b"".join(w.encode_frame([r]) for r in records)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = w.FrameDecoder()
    out: list[Any] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        for payload in decoder.feed(stream[prev:cut]):
            out.extend(w.decode_payload(payload))
        prev = cut
    assert out == records
    assert decoder.buffered == 0


def test_byte_by_byte() -> None:
    records = [w.Hello("worker", "3", 42), w.Pdus(0, 4, 7), w.Dropped(1)]
    frame = w.encode_frame(records)
    decoder = w.FrameDecoder()
    payloads: list[bytes] = []
    for i in range(len(frame)):
        payloads += decoder.feed(frame[i : i + 1])
    assert len(payloads) == 1
    assert w.decode_payload(payloads[0]) == records


def test_wire_layout_is_the_documented_one() -> None:
    """[version, kind, fields...] in a length-prefixed msgpack array."""
    frame = w.encode_frame([w.Dimse(1, 0x8001, 0xA700, 5)])
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == [[w.VERSION, w.Kind.DIMSE, 1, 0x8001, 0xA700, 5]]


def test_encode_frames_splits_and_indexes() -> None:
    records = [w.Dimse(0, i, -1, i) for i in range(10)]
    frames = list(w.encode_frames(records, max_records=4))
    assert [(start, stop) for _, start, stop in frames] == [(0, 4), (4, 8), (8, 10)]
    decoded = []
    for frame, _, _ in frames:
        for payload in _payloads(frame):
            decoded += w.decode_payload(payload)
    assert decoded == records


def test_encode_frames_respects_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(w, "MAX_FRAME_BYTES", 1000)
    records = [w.HandlerError("x" * 100, i) for i in range(50)]
    frames = list(w.encode_frames(records))
    assert len(frames) > 1
    assert all(len(f) - 4 <= 1000 for f, _, _ in frames)
    assert frames[-1][2] == 50
    with pytest.raises(ValueError):
        w.encode_frame(records)


def test_oversized_frame_is_refused() -> None:
    decoder = w.FrameDecoder(max_frame=100)
    with pytest.raises(w.FrameError):
        decoder.feed(struct.pack(">I", 101))


def test_trailing_fields_are_ignored() -> None:
    """Fields appended to a kind later in the same version do not break old readers."""
    payload = msgpack.packb([[w.VERSION, w.Kind.PDUS, 0, 4, 9, "future", 1.5]])
    assert w.decode_payload(payload) == [w.Pdus(0, 4, 9)]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([w.VERSION + 1, w.Kind.PDUS, 0, 4, 9], "unsupported_records"),
        ([w.VERSION, 999, 1], "unsupported_records"),
        ([w.VERSION, w.Kind.PDUS, 0, 4], "invalid_records"),  # a field short
        ([w.VERSION, w.Kind.PDUS, 0, 4, -1], "invalid_records"),  # negative delta
        ([w.VERSION, w.Kind.PDUS, 0, 4, "9"], "invalid_records"),
        ([w.VERSION, w.Kind.PDUS, 0, 4, True], "invalid_records"),
        ([w.VERSION, w.Kind.PROCESS, float("nan"), 1], "invalid_records"),
        ([w.VERSION, w.Kind.STORAGE, 1, 0.5, [1, 2]], "invalid_records"),  # bucket count
        ([w.VERSION, w.Kind.GAUGES, 1, [["A", "B"]]], "invalid_records"),
        ("not a record", "invalid_records"),
        ([], "invalid_records"),
    ],
)
def test_bad_records_are_skipped_and_counted(raw: Any, field: str) -> None:
    good = [w.VERSION, w.Kind.DROPPED, 3]
    stats = w.DecodeStats()
    assert w.decode_payload(msgpack.packb([raw, good]), stats) == [w.Dropped(3)]
    assert getattr(stats, field) == 1


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb({"a": 1}), msgpack.packb(3), b""])
def test_bad_frames_are_counted(payload: bytes) -> None:
    stats = w.DecodeStats()
    assert w.decode_payload(payload, stats) == []
    assert stats.invalid_frames == 1


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_never_raises(data: bytes) -> None:
    w.decode_payload(data, w.DecodeStats())


@settings(max_examples=200)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text()
        | st.binary(),
        lambda inner: st.lists(inner, max_size=6),
        max_leaves=30,
    )
)
def test_any_msgpack_value_never_raises(value: Any) -> None:
    w.decode_payload(msgpack.packb([value, [1, value]]), w.DecodeStats())


def test_label_limiter_folds_past_its_limit() -> None:
    limit = w.LabelLimiter(2, max_length=4)
    assert limit("A") == "A"
    assert limit(w.OTHER) == w.OTHER  # takes no slot
    assert limit("LONGNAME") == "LONG"
    assert limit("C") == w.OTHER
    assert limit("A") == "A"  # kept ones stay
    assert limit("LONGNAME") == "LONG"
    assert len(limit) == 2


@pytest.mark.parametrize(
    ("value", "index"),
    [(0.0, 0), (0.001, 0), (0.0011, 1), (60.0, len(w.CSTORE_BUCKETS) - 1), (61.0, 15)],
)
def test_buckets_are_upper_inclusive(value: float, index: int) -> None:
    assert w.bucket_index(w.CSTORE_BUCKETS, value) == index
