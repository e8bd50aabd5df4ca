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

import pytest
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
    if ts in DEFLATED_TRANSFER_SYNTAXES and "malformed" in (
        whole.stop_reason,  # type: ignore[attr-defined]
        pieces.stop_reason,  # type: ignore[attr-defined]
    ):
        return  # known bug, test_corrupt_deflate_after_the_uids_is_scanned_the_same; remove
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


@pytest.mark.xfail(
    strict=True,
    reason="bug: zlib raises on a corrupt deflate stream without returning the output it "
    "produced before the error; fed in one fragment, a deflated data set whose stream "
    "breaks after the UIDs scans as 'malformed' (filed under unknown/unknown), fed in "
    "two or more fragments its UIDs are found: the filing depends on TCP segmentation",
)
def test_corrupt_deflate_after_the_uids_is_scanned_the_same() -> None:
    head = dataset("little", 1)  # the UIDs, up to (0028,0010)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    # a sync flush, then a final block of the reserved type 11: "invalid block type"
    stream = c.compress(head) + c.flush(zlib.Z_SYNC_FLUSH) + b"\x07" + bytes(8)
    in_pieces = scan(DEFLATED, stream, [16], 64 * 1024)
    assert in_pieces.series_instance_uid == "1.2.3.6"  # type: ignore[attr-defined]
    whole = scan(DEFLATED, stream, [0], 64 * 1024)
    assert whole == in_pieces, (whole, in_pieces)
