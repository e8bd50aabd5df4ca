"""Fuzzing the storage tag scanner (workers.storage.scanner.TagScanner) for every
transfer syntax: random bytes, mutated well-formed data sets (sequences and items of
defined and undefined length, undefined-length UN, encapsulated pixel data), deflate
streams and deflate bombs, in arbitrary fragment splits.

Properties: feed() never raises, the scan never walks past its budget nor keeps more
than one header and one wanted value, and the result does not depend on how the
data set was split into fragments (the same bytes file the instance in the same
place whatever the network did)."""

from __future__ import annotations

import dataclasses
import struct
import zlib

from hypothesis import example, given
from hypothesis import strategies as st

from workers.storage.scanner import (
    DEFLATED_TRANSFER_SYNTAXES,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    TagScanner,
)

from . import harness as h
from . import strategies as fz

DEFLATED = sorted(DEFLATED_TRANSFER_SYNTAXES)[0]
UNDEFINED = 0xFFFFFFFF


class Enc:
    """A tiny data-set encoder for one of the three encodings."""

    def __init__(self, encoding: str) -> None:
        self.implicit = encoding == "implicit"
        self.big = encoding == "big"
        self.o = ">" if self.big else "<"

    def el(self, tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
        group, elem = tag >> 16, tag & 0xFFFF
        n = len(value) if length is None else length
        if self.implicit:
            return struct.pack("<HHI", group, elem, n) + value
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"UC"):
            return struct.pack(self.o + "HH2s2xI", group, elem, vr, n) + value
        return struct.pack(self.o + "HH2sH", group, elem, vr, n) + value

    def delim(self, elem: int, length: int = 0) -> bytes:
        # Items and delimiters: no VR in any encoding.
        return struct.pack(self.o + "HHI", 0xFFFE, elem, length)

    def text(self, tag: int, vr: bytes, s: str) -> bytes:
        raw = s.encode()
        if len(raw) & 1:
            raw += b"\0" if vr == b"UI" else b" "
        return self.el(tag, vr, raw)


def dataset(encoding: str, variant: int) -> bytes:
    """Well-formed data sets with the wanted tags behind various obstacles."""
    e = Enc(encoding)
    head = e.text(0x00080016, b"UI", "1.2.840.10008.5.1.4.1.1.2") + e.text(
        0x00080018, b"UI", "1.2.3.4.5"
    )
    item = e.text(0x00081150, b"UI", "1.2.3") + e.text(0x00081155, b"UI", "1.2.3.4")
    seqs = [
        # defined-length sequence of one defined-length item
        e.el(0x00081140, b"SQ", e.delim(0xE000, len(item)) + item),
        # undefined-length sequence, undefined-length item
        e.el(0x00081140, b"SQ", b"", UNDEFINED)
        + e.delim(0xE000, UNDEFINED)
        + item
        + e.delim(0xE00D)
        + e.delim(0xE0DD),
        # nested undefined-length sequences
        e.el(0x00081140, b"SQ", b"", UNDEFINED)
        + e.delim(0xE000, UNDEFINED)
        + e.el(0x00081199, b"SQ", b"", UNDEFINED)
        + e.delim(0xE000, UNDEFINED)
        + item
        + e.delim(0xE00D)
        + e.delim(0xE0DD)
        + e.delim(0xE00D)
        + e.delim(0xE0DD),
        b"",
    ]
    if not e.implicit:
        # an undefined-length UN: Implicit VR LE inside (PS3.5 6.2.2)
        imp = Enc("implicit")
        seqs.append(
            e.el(0x00091010, b"UN", b"", UNDEFINED)
            + imp.delim(0xE000, UNDEFINED)
            + imp.text(0x00081150, b"UI", "1.2.3")
            + imp.delim(0xE00D)
            + imp.delim(0xE0DD)
        )
    body = (
        e.text(0x00080060, b"CS", "MR")
        + seqs[variant % len(seqs)]
        + e.text(0x00100010, b"PN", "Doe^J")
        + e.text(0x00100020, b"LO", "PAT-" + "9" * (variant % 7))
        + e.el(0x00181030, b"LO", b"x" * (2 * variant))
        + e.text(0x0020000D, b"UI", "1.2.3.5." + str(variant))
        + e.text(0x0020000E, b"UI", "1.2.3.6")
        + e.el(0x00280010, b"US", b"\x00\x01")
    )
    if not e.implicit and variant % 2:
        # encapsulated pixel data after everything (never reached, but walkable)
        body += (
            e.el(0x7FE00010, b"OB", b"", UNDEFINED)
            + e.delim(0xE000, 0)
            + e.delim(0xE000, 4)
            + b"abcd"
            + e.delim(0xE0DD)
        )
    return head + body


def deflate(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


ENCODINGS = {
    IMPLICIT_VR_LITTLE_ENDIAN: "implicit",
    EXPLICIT_VR_LITTLE_ENDIAN: "little",
    EXPLICIT_VR_BIG_ENDIAN: "big",
    DEFLATED: "little",
    "1.2.840.10008.1.2.4.50": "little",
}


def encoded(ts: str, variant: int) -> bytes:
    raw = dataset(ENCODINGS.get(ts, "little"), variant)
    return deflate(raw) if ts in DEFLATED_TRANSFER_SYNTAXES else raw


SEEDS = {ts: [encoded(ts, v) for v in range(10)] for ts in ENCODINGS}
SYNTAXES = st.sampled_from(h.SCANNER_TRANSFER_SYNTAXES)
BUDGETS = st.sampled_from([0, 1, 7, 64, 200, 4096, 64 * 1024])


def scan(ts: str, data: bytes, splits: list[int], budget: int) -> object:
    scanner = TagScanner(ts, budget=budget)
    for chunk in h._chunks(data, splits):
        if scanner.feed(chunk):
            break
    return scanner.close()


# -------------------------------------------------------------------------- tests


def test_seeds_are_found() -> None:
    for ts, seeds in SEEDS.items():
        for variant, data in enumerate(seeds):
            result = scan(ts, data, [0], 64 * 1024)
            assert result.stop_reason == "complete", (ts, variant, result)  # type: ignore[attr-defined]
            assert result.series_instance_uid == "1.2.3.6", (ts, variant, result)  # type: ignore[attr-defined]
            assert result.study_instance_uid == f"1.2.3.5.{variant}", (ts, variant, result)  # type: ignore[attr-defined]


@fz.fuzz_settings(300)
@given(SYNTAXES, st.binary(max_size=2000), fz.splits, BUDGETS)
def test_scanner_random_bytes(ts: str, data: bytes, splits: list[int], budget: int) -> None:
    h.run_scanner(ts, data, splits, budget=budget)


@st.composite
def mutated_dataset(draw: st.DrawFn) -> tuple[str, bytes]:
    ts = draw(st.sampled_from(sorted(SEEDS)))
    if ts in DEFLATED_TRANSFER_SYNTAXES and draw(st.booleans()):
        # mutate the inflated data set, then deflate it (the walk, not zlib, is fuzzed)
        raw = draw(fz.mutated([dataset("little", v) for v in range(10)]))
        return ts, deflate(raw, draw(st.sampled_from([0, 1, 9])))
    return ts, draw(fz.mutated(SEEDS[ts]))


@fz.fuzz_settings(500)
@given(mutated_dataset(), fz.splits, BUDGETS)
def test_scanner_mutated_datasets(case: tuple[str, bytes], splits: list[int], budget: int) -> None:
    h.run_scanner(case[0], case[1], splits, budget=budget)


@fz.fuzz_settings(300)
@given(mutated_dataset(), fz.splits, st.sampled_from([64, 4096, 64 * 1024]))
@example((IMPLICIT_VR_LITTLE_ENDIAN, SEEDS[IMPLICIT_VR_LITTLE_ENDIAN][2]), [1], 4096)
@example((EXPLICIT_VR_BIG_ENDIAN, SEEDS[EXPLICIT_VR_BIG_ENDIAN][4]), [3], 4096)
def test_scanner_result_does_not_depend_on_fragmentation(
    case: tuple[str, bytes], splits: list[int], budget: int
) -> None:
    ts, data = case
    whole = scan(ts, data, [0], budget)
    pieces = scan(ts, data, splits, budget)
    if whole.stop_reason == "malformed":  # type: ignore[attr-defined]
        # bytes_scanned counts whole fragments before the one that failed to parse
        pieces = dataclasses.replace(pieces, bytes_scanned=whole.bytes_scanned)  # type: ignore[attr-defined,type-var]
    assert pieces == whole, (splits, whole, pieces)


@fz.fuzz_settings(100)
@given(
    st.sampled_from(sorted(DEFLATED_TRANSFER_SYNTAXES)),
    st.integers(1, 8 * 1024 * 1024),
    fz.splits,
    BUDGETS,
)
def test_scanner_deflate_bomb(ts: str, size: int, splits: list[int], budget: int) -> None:
    """A few KiB of deflate that inflate to megabytes of zeros (an undefined-length
    nothing): the scan stops at its budget, having inflated no more than it."""
    bomb = deflate(b"\0" * size, 9)
    h.run_scanner(ts, bomb, splits, budget=budget)


def test_corrupt_deflate_after_the_uids_is_scanned_the_same() -> None:
    head = dataset("little", 1)  # the UIDs, up to (0028,0010)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    # a sync flush, then a final block of the reserved type 11: "invalid block type"
    stream = c.compress(head) + c.flush(zlib.Z_SYNC_FLUSH) + b"\x07" + bytes(8)
    whole = scan(DEFLATED, stream, [0], 64 * 1024)
    assert whole.series_instance_uid == "1.2.3.6", whole  # type: ignore[attr-defined]
    assert whole.stop_reason == "complete", whole  # type: ignore[attr-defined]
    for splits in ([16], [1], [len(stream) - 1], [len(stream) - 9, 1], [7, 3]):
        assert scan(DEFLATED, stream, splits, 64 * 1024) == whole, splits


def test_corrupt_deflate_before_the_uids_keeps_what_came_before() -> None:
    """The stream breaks between (0008,0018) and the UIDs: what inflated before the
    error is walked (the SOP Instance UID is found), the rest is unknown, however
    the stream was split."""
    raw = dataset("little", 3)
    cut = raw.index(struct.pack("<HH", 0x0008, 0x0060))  # after (0008,0018)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = c.compress(raw[:cut]) + c.flush(zlib.Z_SYNC_FLUSH) + b"\x07" + bytes(8)
    whole = scan(DEFLATED, stream, [0], 64 * 1024)
    assert whole.stop_reason == "malformed", whole  # type: ignore[attr-defined]
    assert whole.sop_instance_uid == "1.2.3.4.5", whole  # type: ignore[attr-defined]
    assert whole.study_instance_uid is None, whole  # type: ignore[attr-defined]
    assert whole.bytes_scanned == cut, whole  # type: ignore[attr-defined]
    for splits in ([1], [2, 5], [len(stream) - 1], [len(stream) - 9, 1]):
        assert scan(DEFLATED, stream, splits, 64 * 1024) == whole, splits


def inflate_prefix(stream: bytes, limit: int) -> tuple[bytes, str]:
    """The reference for a deflated scan: the output of the longest prefix of
    ``stream`` (at most ``limit`` bytes) that inflates without error, one byte at a
    time, and how the inflation ended: ``"end"`` (end of stream or of the bytes),
    ``"malformed"`` (the next byte makes zlib fail), ``"budget"`` (``limit`` bytes
    taken, still inside the stream)."""
    d = zlib.decompressobj(-15)
    out = bytearray()
    for k in range(min(len(stream), limit)):
        try:
            out += d.decompress(stream[k : k + 1])
        except zlib.error:
            return bytes(out), "malformed"
        if d.eof:
            return bytes(out), "end"
    return bytes(out), "budget" if len(stream) >= limit else "end"


def reference_scan(stream: bytes, budget: int) -> tuple[object, bool]:
    """What scanning the deflated ``stream`` must give (see TagScanner._recover): the
    Explicit VR Little Endian scan of :func:`inflate_prefix`'s output, ending as the
    inflation did if the walk has not ended first. Also: whether ``bytes_scanned`` is
    exact (not after a walk that found the inflated bytes malformed)."""
    out, reason = inflate_prefix(stream, 2 * budget + 1024)
    scanner = TagScanner(EXPLICIT_VR_LITTLE_ENDIAN, budget=budget)
    if out:
        scanner.feed(out)
    if scanner.done:
        result = scanner.result()
        return result, result.stop_reason != "malformed"
    return dataclasses.replace(scanner.result(), stop_reason=reason), True  # type: ignore[arg-type]


@st.composite
def corrupt_deflate(draw: st.DrawFn) -> bytes:
    """A deflated data set (maybe sync-flushed at a random point, maybe followed by
    pixel data), then broken: bits flipped, bytes overwritten, a reserved block type
    after a flush, garbage or a stream end spliced in, or truncated."""
    raw = dataset("little", draw(st.integers(0, 9)))
    if draw(st.booleans()):
        raw += struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", 4000) + bytes(range(250)) * 16
    c = zlib.compressobj(draw(st.sampled_from([0, 1, 6, 9])), zlib.DEFLATED, -15)
    cut = draw(st.integers(0, len(raw)))
    flush = draw(st.sampled_from([zlib.Z_NO_FLUSH, zlib.Z_SYNC_FLUSH, zlib.Z_FULL_FLUSH]))
    stream = bytearray(c.compress(raw[:cut]) + c.flush(flush))
    stream += c.compress(raw[cut:]) + c.flush()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 4))
        at = draw(st.integers(0, len(stream)))
        if op == 0 and at < len(stream):
            stream[at] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and at < len(stream):
            stream[at] = draw(st.integers(0, 255))
        elif op == 2:
            # a final block of the reserved type 11 ("invalid block type")
            stream[at:at] = draw(st.sampled_from([b"\x07", b"\x06", b"\x07\xff\xff"]))
        elif op == 3:
            stream[at:] = draw(st.binary(min_size=1, max_size=32))
        else:
            del stream[at:]
    return bytes(stream)


@fz.fuzz_settings(300)
@given(corrupt_deflate(), fz.splits, BUDGETS)
@example(
    bytes(zlib.compressobj(6, zlib.DEFLATED, -15).compress(dataset("little", 1)))
    + b"\x07"
    + bytes(8),
    [16],
    64 * 1024,
)
def test_corrupt_deflate_scan_is_a_function_of_the_bytes(
    stream: bytes, splits: list[int], budget: int
) -> None:
    """Whatever the split, a corrupt deflate stream scans like the output of its
    longest prefix that inflates without error (and so the same for every split)."""
    expected, exact = reference_scan(stream, budget)
    h.run_scanner(DEFLATED, stream, splits, budget=budget)
    for cut in ([0], splits):
        result = scan(DEFLATED, stream, cut, budget)
        if not exact:
            result = dataclasses.replace(result, bytes_scanned=expected.bytes_scanned)  # type: ignore[attr-defined,type-var]
        assert result == expected, (cut, expected, result)
