"""An incremental scanner for the few data-set tags the storage layout needs.

Theory of operation
-------------------
The storage layer writes a C-STORE data set to disk as its P-DATA fragments arrive and
never holds the whole thing (DESIGN principle 3). To file the instance under its study
and series it still needs (0020,000D) StudyInstanceUID and (0020,000E)
SeriesInstanceUID, which sit near the start of the data set: top-level elements are in
ascending tag order (PS3.5 7.1), so once the walk has passed (0020,000E) nothing it
looks for can follow. :class:`TagScanner` is fed the same fragments as the file, in any
split (an element header may straddle two fragments, down to one byte per fragment),
and stops at the first of:

* it has read (0020,000E), or met a top-level tag after it: ``"complete"``;
* it has walked ``budget`` bytes of the (inflated) data set: ``"budget"``;
* the bytes do not parse as a data set: ``"malformed"``;
* the data set ended first (a deflate stream's end, or :meth:`TagScanner.close`): ``"end"``.

Whatever was not found by then is ``None``, which the layout turns into "unknown".
The scanner never raises on peer input: garbage just ends the scan (``feed`` catches
the decoding errors and reports ``"malformed"``).

What it walks: top-level elements only. Values it does not want are skipped by count
without being copied, including sequences of defined length. Undefined-length
sequences and items (PS3.5 7.5) cannot be skipped by count, so the scanner keeps a small
stack of open sequences/items and walks their element headers until the matching
delimiter; encapsulated Pixel Data (undefined-length OB of fragment items) is walked the
same way. A UN element of undefined length holds a sequence encoded in Implicit VR
Little Endian whatever the transfer syntax (PS3.5 6.2.2), so the stack records the
encoding per level.

Transfer syntaxes (PS3.5 A.1-A.5): Implicit VR Little Endian; Explicit VR Big Endian;
the deflated ones (raw deflate, RFC 1951, of an Explicit VR Little Endian data set),
inflated here with a bounded ``zlib.decompressobj(-15)``; every other syntax
(uncompressed and all encapsulated/compressed ones) is Explicit VR Little Endian.

Memory: the scanner copies at most one element header (12 bytes) and one wanted value
(at most :data:`MAX_VALUE_LENGTH` bytes); with deflate, at most 16 KiB of compressed
input and ``budget`` bytes of inflated output exist at a time, and only during a call.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_SCAN_BUDGET",
    "DEFLATED_TRANSFER_SYNTAXES",
    "EXPLICIT_VR_BIG_ENDIAN",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "MAX_VALUE_LENGTH",
    "ScanResult",
    "StopReason",
    "TagScanner",
]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: Transfer syntaxes whose data set is a raw deflate of Explicit VR Little Endian:
#: Deflated Explicit VR LE, JPIP Referenced Deflate, JPIP HTJ2K Referenced Deflate.
DEFLATED_TRANSFER_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)

#: Default number of data-set bytes the scanner walks before giving up.
DEFAULT_SCAN_BUDGET = 64 * 1024
#: Longest value the scanner will copy; UIDs and LO/CS values are at most 64 bytes, so
#: anything longer is not a value worth filing under and is skipped.
MAX_VALUE_LENGTH = 1024

StopReason = Literal["scanning", "complete", "budget", "malformed", "end"]

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD

_SOP_INSTANCE_UID = 0x00080018
_MODALITY = 0x00080060
_PATIENT_ID = 0x00100020
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_WANTED = frozenset(
    {_SOP_INSTANCE_UID, _MODALITY, _PATIENT_ID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID}
)

# Explicit VR: these use 2 reserved bytes + a 32-bit length, all others a 16-bit length
# (PS3.5 Table 7.1-1 and 7.1-2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
# VRs that may legitimately have undefined length: SQ, UN (PS3.5 6.2.2), and OB/OW
# for encapsulated Pixel Data (PS3.5 A.4).
_UNDEFINED_OK_VRS = frozenset({b"SQ", b"UN", b"OB", b"OW"})

# Deflate input is handed to zlib in slices this big so that zlib's unconsumed_tail
# (a copy) stays small even when the caller passes a multi-megabyte fragment.
_INFLATE_SLICE = 16 * 1024

# Stack entry kinds.
_DATASET = 0  # top level: elements in ascending order
_ITEM_OPEN = 1  # inside an undefined-length item: elements until an item delimiter
_SEQ_OPEN = 2  # inside an undefined-length sequence: items until a sequence delimiter


class _Malformed(Exception):
    """Internal: the bytes are not a data set; ends the scan."""


@dataclass(slots=True, frozen=True)
class _Encoding:
    implicit: bool
    implicit_header: struct.Struct  # tag group, tag element, 32-bit length
    explicit_header: struct.Struct  # tag group, tag element, VR, 16-bit length
    u32: struct.Struct


_IMPLICIT_LE = _Encoding(True, struct.Struct("<HHI"), struct.Struct("<HH2sH"), struct.Struct("<I"))
_EXPLICIT_LE = _Encoding(False, struct.Struct("<HHI"), struct.Struct("<HH2sH"), struct.Struct("<I"))
_EXPLICIT_BE = _Encoding(False, struct.Struct(">HHI"), struct.Struct(">HH2sH"), struct.Struct(">I"))


@dataclass(slots=True, frozen=True)
class ScanResult:
    """What the scanner found; ``None`` means not found (or not reached).

    Values are as encoded with padding and insignificant leading/trailing spaces
    removed. They are peer data: validate (UIDs) or sanitise (the others) before use.
    """

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    #: why the scan ended (``"scanning"`` if it has not yet)
    stop_reason: StopReason = "scanning"
    #: data-set bytes walked (inflated bytes for deflated syntaxes)
    bytes_scanned: int = 0


class TagScanner:
    """Incrementally find the storage-relevant tags in a data set's leading bytes.

    Feed it fragments with :meth:`feed` until it returns ``True`` (done), then read
    :meth:`result`. Fragments are never retained. Not thread-safe; one per instance.
    """

    __slots__ = (
        "_budget",
        "_found",
        "_header",
        "_in_bytes",
        "_inflater",
        "_pos",
        "_skip",
        "_stack",
        "_stop",
        "_value",
        "_value_length",
        "_value_tag",
    )

    def __init__(self, transfer_syntax_uid: str, *, budget: int = DEFAULT_SCAN_BUDGET) -> None:
        self._budget = max(0, budget)
        self._stop: StopReason = "scanning"
        self._pos = 0  # data-set bytes walked so far
        self._in_bytes = 0  # compressed bytes consumed (deflate only)
        self._skip = 0  # bytes of the current value still to skip
        self._header = bytearray()  # a partial element header split across fragments
        self._value = bytearray()  # a wanted value being collected
        self._value_tag = 0  # tag of that value; 0 when not collecting
        self._value_length = 0
        self._found: dict[int, str] = {}
        self._inflater: zlib._Decompress | None = None
        if transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN:
            encoding = _IMPLICIT_LE
        elif transfer_syntax_uid == EXPLICIT_VR_BIG_ENDIAN:
            encoding = _EXPLICIT_BE
        else:
            encoding = _EXPLICIT_LE
            if transfer_syntax_uid in DEFLATED_TRANSFER_SYNTAXES:
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._stack: list[tuple[int, _Encoding]] = [(_DATASET, encoding)]
        if self._budget == 0:
            self._stop = "budget"

    @property
    def done(self) -> bool:
        """True once the scan has ended; further :meth:`feed` calls are no-ops."""
        return self._stop != "scanning"

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Scan the next fragment of the data set; return :attr:`done`. Never raises."""
        if self._stop != "scanning":
            return True
        try:
            view = memoryview(data)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            if self._inflater is None:
                self._walk(view)
            else:
                self._inflate(view)
        except (_Malformed, struct.error, zlib.error, ValueError, TypeError):
            self._stop = "malformed"
            self._release()
        return self._stop != "scanning"

    def close(self) -> ScanResult:
        """The data set has ended: stop (``"end"`` if still scanning) and return the result."""
        self._finish("end")
        return self.result()

    def result(self) -> ScanResult:
        """The tags found so far (complete once :attr:`done`)."""
        found = self._found
        return ScanResult(
            study_instance_uid=found.get(_STUDY_INSTANCE_UID),
            series_instance_uid=found.get(_SERIES_INSTANCE_UID),
            sop_instance_uid=found.get(_SOP_INSTANCE_UID),
            patient_id=found.get(_PATIENT_ID),
            modality=found.get(_MODALITY),
            stop_reason=self._stop,
            bytes_scanned=self._pos,
        )

    # -- internals -------------------------------------------------------------------

    def _finish(self, reason: StopReason) -> None:
        if self._stop == "scanning":
            self._stop = reason
        self._release()

    def _release(self) -> None:
        # Drop every buffer (and zlib's window) as soon as the scan ends: the writer
        # may live for minutes while a large instance streams in.
        self._header = bytearray()
        self._value = bytearray()
        self._inflater = None

    def _inflate(self, view: memoryview) -> None:
        assert self._inflater is not None
        for start in range(0, len(view), _INFLATE_SLICE):
            chunk: bytes | memoryview = view[start : start + _INFLATE_SLICE]
            self._in_bytes += len(chunk)
            while chunk:
                inflater = self._inflater
                if inflater is None:  # the walk ended the scan
                    return
                # max_length bounds the output: a deflate bomb cannot make us hold
                # more than the remaining budget.
                out = inflater.decompress(chunk, self._budget - self._pos)
                tail = inflater.unconsumed_tail
                if out:
                    self._walk(memoryview(out))
                elif len(tail) == len(chunk):
                    break  # no progress possible (cannot happen with max_length > 0)
                if self._stop != "scanning":
                    return
                if inflater.eof:
                    self._finish("end")
                    return
                chunk = tail
            # Stored (uncompressed) deflate blocks expand by a few bytes per 64 KiB at
            # most, so compressed input well past the budget means the output is too.
            if self._in_bytes > 2 * self._budget + 1024:
                self._finish("budget")
                return

    def _walk(self, data: memoryview) -> None:
        """Advance the element walk over ``data`` (uncompressed data-set bytes)."""
        room = self._budget - self._pos
        if len(data) >= room:
            data = data[:room]
        n = len(data)
        i = 0
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            if self._value_tag:
                k = min(self._value_length - len(self._value), n - i)
                self._value += data[i : i + k]
                i += k
                if len(self._value) == self._value_length:
                    self._take_value()
                    if self._stop != "scanning":
                        break
                continue
            header = self._header
            if header:
                # Finish a header split across fragments: join the saved prefix with
                # up to 12 more bytes, parse, and consume only what the header used.
                have = len(header)
                joined = bytes(header) + bytes(data[i : i + 12 - have])
                parsed = self._parse_header(joined, 0, len(joined))
                if parsed is None:
                    header += data[i:]
                    i = n
                    break
                size, tag, vr, length = parsed
                header.clear()
                i += size - have
            else:
                parsed = self._parse_header(data, i, n - i)
                if parsed is None:
                    header += data[i:]
                    i = n
                    break
                size, tag, vr, length = parsed
                i += size
            self._element(tag, vr, length)
            if self._stop != "scanning":
                break
        self._pos += i
        if self._stop == "scanning" and self._pos >= self._budget:
            self._finish("budget")

    def _parse_header(
        self, buf: bytes | memoryview, off: int, avail: int
    ) -> tuple[int, int, bytes | None, int] | None:
        """Decode one element header at ``buf[off:]``: (size, tag, VR, length).

        Returns ``None`` when ``avail`` bytes are not enough yet.
        """
        if avail < 8:
            return None
        encoding = self._stack[-1][1]
        if encoding.implicit:
            group, elem, length = encoding.implicit_header.unpack_from(buf, off)
            return 8, (group << 16) | elem, None, length
        group, elem, vr, length16 = encoding.explicit_header.unpack_from(buf, off)
        if group == 0xFFFE:
            # Item and delimiter tags have no VR in any transfer syntax (PS3.5 7.5).
            (length,) = encoding.u32.unpack_from(buf, off + 4)
            return 8, (group << 16) | elem, None, length
        if vr in _LONG_VRS:
            if avail < 12:
                return None
            (length,) = encoding.u32.unpack_from(buf, off + 8)
            return 12, (group << 16) | elem, vr, length
        if vr not in _SHORT_VRS:
            raise _Malformed
        return 8, (group << 16) | elem, vr, length16

    def _element(self, tag: int, vr: bytes | None, length: int) -> None:
        """Act on one decoded element header: skip, collect, or open/close a level."""
        kind, encoding = self._stack[-1]
        if kind == _SEQ_OPEN:
            if tag == _ITEM:
                if length == _UNDEFINED:
                    self._stack.append((_ITEM_OPEN, encoding))
                else:
                    self._skip = length
            elif tag == _SEQUENCE_DELIMITER:
                self._stack.pop()
            else:
                raise _Malformed
            return
        if tag == _ITEM_DELIMITER and kind == _ITEM_OPEN:
            self._stack.pop()
            return
        if tag >> 16 == 0xFFFE:
            raise _Malformed  # an item or delimiter where an element belongs
        if kind == _DATASET and tag > _SERIES_INSTANCE_UID:
            self._finish("complete")  # ascending order: nothing wanted can follow
            return
        if length == _UNDEFINED:
            if vr == b"UN":
                self._stack.append((_SEQ_OPEN, _IMPLICIT_LE))
            elif vr is None or vr in _UNDEFINED_OK_VRS:
                self._stack.append((_SEQ_OPEN, encoding))
            else:
                raise _Malformed
            return
        if kind == _DATASET and tag in _WANTED and length <= MAX_VALUE_LENGTH:
            if length == 0:
                self._value_tag = tag
                self._value_length = 0
                self._take_value()
            else:
                self._value_tag = tag
                self._value_length = length
            return
        self._skip = length

    def _take_value(self) -> None:
        tag = self._value_tag
        raw = bytes(self._value)
        self._value.clear()
        self._value_tag = 0
        # UI pads with NUL, the text VRs with space; leading/trailing spaces are not
        # significant in LO/CS/UI. ASCII with replacement: these values only ever name
        # files (after sanitising) or get compared with command-set UIDs.
        text = raw.decode("ascii", "replace").strip(" \0")
        if text:
            self._found[tag] = text
        if tag == _SERIES_INSTANCE_UID:
            self._finish("complete")
