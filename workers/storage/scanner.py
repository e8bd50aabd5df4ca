"""An incremental scanner for the few data-set tags the storage layout needs.

Theory of operation
-------------------
The storage layer writes a C-STORE data set to disk as its P-DATA fragments arrive and
never holds the whole thing. To file the instance under its study
and series it still needs (0020,000D) StudyInstanceUID and (0020,000E)
SeriesInstanceUID, which sit near the start of the data set: top-level elements are in
ascending tag order (PS3.5 7.1), so once the walk has passed (0020,000E) nothing it
looks for can follow. The walk also takes, for the instance index, the patient and
study attributes on the way there: (0008,0020) StudyDate, (0008,0030) StudyTime,
(0008,0050) AccessionNumber, (0008,0060) Modality, (0010,0010) PatientName,
(0010,0020) PatientID (and (0008,0018) SOPInstanceUID): one set lookup per element
of those groups, no second pass. :class:`TagScanner` is fed the same fragments as
the file, in any split (an element header may straddle two fragments, down to one
byte per fragment), and stops at the first of:

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

Speed: this runs in the worker's event loop for every instance, and a typical data set
has 100-150 element headers before (0020,000E), so the per-header cost is what counts.
The walk is one tight loop per level (top level, then open sequences/items) that reads
each header with a single precompiled ``struct`` call straight from the caller's
buffer (no copy of the fragment), classifies the VR with one dict lookup, skips values
by adding their length to an offset, and makes no other call per element (nor creates
an object beyond the decoded header). The UIDs usually
arrive in the first fragment, so the common case is a single pass over one buffer;
only what straddles a fragment boundary takes the slow path: a pending skip (a count),
a wanted value being collected (at most :data:`MAX_VALUE_LENGTH` bytes), or a split
header (fewer than 12 bytes), which is completed from the next fragment and decoded on
its own before the loop resumes in place.

Transfer syntaxes (PS3.5 A.1-A.5): Implicit VR Little Endian; Explicit VR Big Endian;
the deflated ones (raw deflate, RFC 1951, of an Explicit VR Little Endian data set),
inflated here with a bounded ``zlib.decompressobj(-15)``; every other syntax
(uncompressed and all encapsulated/compressed ones) is Explicit VR Little Endian.
Inflated output is asked for in steps that start at 2 KiB and double, so that a scan
that completes in the first few KiB does not pay for inflating the rest. A corrupt
deflate stream is scanned as the output of its longest prefix that inflates without
error: the walk sees those bytes, then ends ``"malformed"`` (unless it ended first),
so what was found before the corruption is kept, and the result depends on the bytes
only, never on where the fragments split them (zlib drops the output of a call that
fails; :meth:`TagScanner._recover` replays the failing slice to get it back).

Memory: the scanner copies at most one element header (12 bytes) and one wanted value
(at most :data:`MAX_VALUE_LENGTH` bytes). With deflate, zlib is never asked for more
output than the budget has room for (a deflate bomb inflates no further than that),
the scan takes at most ``2 * budget + 1024`` bytes of compressed input (a stream of
empty blocks inflates to nothing), and during a call at most 16 KiB of compressed
input, ``budget`` bytes of inflated output and two inflater states (zlib's 32 KiB
window each: the live one and, past the first slice of input, a copy to replay a
corrupt slice from) exist at a time.
The stack of open undefined-length levels grows by one entry per at least 8 walked
bytes, so ``budget`` bounds it too.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal

from .elements import (
    _ACCESSION_NUMBER,
    _CODECS,
    _EXPLICIT_BE,
    _EXPLICIT_LE,
    _IMPLICIT_LE,
    _ITEM,
    _ITEM_DELIMITER,
    _ITEM_GROUP,
    _LONG_NESTS,
    _LONG_UN,
    _MODALITY,
    _PATIENT_ID,
    _PATIENT_NAME,
    _SEQUENCE_DELIMITER,
    _SERIES_INSTANCE_UID,
    _SHORT,
    _SOP_INSTANCE_UID,
    _STUDY_DATE,
    _STUDY_INSTANCE_UID,
    _STUDY_TIME,
    _UNDEFINED,
    _WANTED,
    MAX_VALUE_LENGTH,
    _Buffer,
    _text,
)
from .skeletons import SKELETONS as _SKELETONS

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

StopReason = Literal["scanning", "complete", "budget", "malformed", "end"]

# Deflate input is handed to zlib in slices this big so that zlib's unconsumed_tail
# (a copy) stays small even when the caller passes a multi-megabyte fragment.
_INFLATE_SLICE = 16 * 1024
# Output is asked for in steps that start here and double (bounded by the budget): the
# UIDs are usually within the first few KiB, and inflating a whole slice's worth (up to
# the budget) would cost more than walking the headers in it.
_INFLATE_FIRST_STEP = 2 * 1024

# Stack entry kinds.
_DATASET = 0  # top level: elements in ascending order
_ITEM_OPEN = 1  # inside an undefined-length item: elements until an item delimiter
_SEQ_OPEN = 2  # inside an undefined-length sequence: items until a sequence delimiter


class _Malformed(Exception):
    """Internal: the bytes are not a data set; ends the scan."""


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
    #: (0010,0010); decoded as UTF-8 when it is valid UTF-8, else as Latin-1 (the
    #: Specific Character Set is not consulted: a best effort for the index)
    patient_name: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
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
        "_codec",
        "_found",
        "_header",
        "_in_bytes",
        "_inflater",
        "_out_step",
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
        self._out_step = _INFLATE_FIRST_STEP  # next inflate output limit (deflate only)
        self._skip = 0  # bytes of the current value still to skip
        self._header = b""  # a partial element header split across fragments
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
        self._codec = _CODECS[encoding]  # the top level's
        # Open levels, innermost last: (kind, encoding). Never empty.
        self._stack: list[tuple[int, int]] = [(_DATASET, encoding)]
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
                if self._pos == 0 and len(self._stack) == 1 and not self._header:
                    # The first fragment: a data set laid out like a recent one is
                    # matched in one call (see .skeletons); else walked and learnt.
                    encoding = self._stack[0][1]
                    if _SKELETONS.match(self, encoding, view):
                        return True
                    self._walk(view)
                    if self._stop == "complete" and _SERIES_INSTANCE_UID in self._found:
                        _SKELETONS.missed(encoding, view, self._pos, self._budget)
                else:
                    self._walk(view)
            else:
                self._inflate(view)
        except (_Malformed, struct.error, zlib.error, KeyError, ValueError, TypeError):
            # KeyError: an unknown VR (the VR class lookup). The others: anything else
            # the bytes could make the decoders or zlib refuse.
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
            patient_name=found.get(_PATIENT_NAME),
            study_date=found.get(_STUDY_DATE),
            study_time=found.get(_STUDY_TIME),
            accession_number=found.get(_ACCESSION_NUMBER),
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
        self._header = b""
        self._value = bytearray()
        self._inflater = None
        del self._stack[1:]

    def _inflate(self, view: memoryview) -> None:
        # The compressed input a scan may take (see the check at the end of a slice).
        limit = 2 * self._budget + 1024
        for start in range(0, len(view), _INFLATE_SLICE):
            inflater = self._inflater
            if inflater is None:  # the walk ended the scan
                return
            end = min(start + _INFLATE_SLICE, start + limit - self._in_bytes)
            piece: bytes | memoryview = view[start:end]
            # zlib raises on a corrupt stream and drops what the failing call inflated
            # before the error; _recover replays from the state before this slice, so
            # keep it (a fresh inflater needs no copy: the common one-fragment case).
            before = inflater.copy() if self._in_bytes else None
            self._in_bytes += len(piece)
            produced = 0  # output of this slice already walked
            chunk = piece
            try:
                while True:
                    # max_length bounds the output: a deflate bomb cannot make us hold
                    # more than the remaining budget (never 0 here, which would mean
                    # "unbounded" to zlib: the walk ends the scan at the budget).
                    step = self._out_step
                    room = self._budget - self._pos
                    if step < room:
                        self._out_step = step * 2
                    else:
                        step = room
                    out = inflater.decompress(chunk, step)
                    tail = inflater.unconsumed_tail
                    if out:
                        produced += len(out)
                        self._walk(out)
                    if self._stop != "scanning":
                        return
                    if inflater.eof:
                        self._finish("end")
                        return
                    # Output that filled the limit may have more behind it even when
                    # all input was taken (zlib can stop in the middle of a match): ask
                    # again, or the end of this fragment's data would wait for the next.
                    if len(out) < step and (not tail or len(tail) == len(chunk)):
                        break  # all this slice gives for now (or no progress possible)
                    chunk = tail
            except zlib.error:
                self._recover(before, piece, len(piece) - len(inflater.unconsumed_tail), produced)
                return
            # Stored (uncompressed) deflate blocks expand by a few bytes per 64 KiB at
            # most, so compressed input well past the budget means the output is too
            # (or the stream is padding itself out with empty blocks). Counted to the
            # byte, so that the scan stops at the same point of the stream however it
            # was split.
            if self._in_bytes >= limit:
                self._finish("budget")
                return

    def _recover(
        self, before: zlib._Decompress | None, piece: _Buffer, consumed: int, produced: int
    ) -> None:
        """The stream is corrupt somewhere in ``piece``: walk what it inflated before.

        What a corrupt stream yields must not depend on how it was split into
        fragments, so it is defined on the bytes: the data set is the output of the
        longest prefix of the stream that inflates without error, and the scan ends
        ``"malformed"`` at its end (unless the walk stops first). zlib raised without
        returning the output of the failing call, so replay ``piece`` from the state
        before it (``before``; ``None``: a fresh stream), searching for that prefix:
        prefixes that fail are exactly those that reach the error, and zlib stops
        taking input at the error (``consumed``), so the search starts just below it.
        The output asked for is bounded by what the budget still allows.
        """
        self._inflater = None
        cap = produced + self._budget - self._pos  # > produced: the scan is not done

        def inflate(length: int) -> bytes | None:
            inflater = before.copy() if before is not None else zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                return inflater.decompress(piece[:length], cap)
            except zlib.error:
                return None

        good, bad = 0, min(max(consumed, 0), len(piece))
        if inflate(bad) is not None:  # not where zlib stopped: search above it
            good, bad = bad, len(piece)
        # Gallop down from `bad` (the error is usually in the last byte or two zlib
        # took), then bisect.
        gap = 1
        while bad - gap > good:
            if inflate(bad - gap) is not None:
                good = bad - gap
                break
            bad -= gap
            gap *= 2
        while bad - good > 1:
            mid = (good + bad) // 2
            if inflate(mid) is not None:
                good = mid
            else:
                bad = mid
        out = inflate(good) if good else b""
        if out is not None and len(out) > produced:
            self._walk(memoryview(out)[produced:])
        self._finish("malformed")

    def _walk(self, data: _Buffer) -> None:
        """Advance the scan over ``data`` (uncompressed data-set bytes, in place)."""
        n = len(data)
        room = self._budget - self._pos
        if n > room:
            n = room
        i = 0
        # Each step either finishes what the previous fragment left pending or uses up
        # the buffer; the last one is normally the in-place walk over the rest.
        while i < n and self._stop == "scanning":
            if self._skip:
                skip = self._skip
                if skip >= n - i:
                    self._skip = skip - (n - i)
                    i = n
                else:
                    self._skip = 0
                    i += skip
            elif self._value_tag:
                i = self._collect(data, i, n)
            elif self._header:
                i = self._join_header(data, i, n)
            else:
                i = self._scan(data, i, n)
        self._pos += i
        if self._stop == "scanning" and self._pos >= self._budget:
            self._finish("budget")

    def _scan(self, buf: _Buffer, i: int, n: int) -> int:
        """Walk complete elements in ``buf[i:n]`` in place, alternating levels.

        Returns ``n`` once the buffer is used up (leaving a pending skip, value or
        partial header behind), or where the scan stopped.
        """
        stack = self._stack
        implicit = self._codec.implicit
        while True:
            if len(stack) > 1:
                i = self._walk_nested(buf, i, n)
                if len(stack) > 1:
                    return i  # used up
            if implicit:
                i = self._walk_top_implicit(buf, i, n)
            else:
                i = self._walk_top_explicit(buf, i, n)
            if len(stack) == 1 or self._stop != "scanning":
                return i

    # The three loops below are the hot path: locals only, and no call per element but
    # the header decoder (two for a long-VR header). Each ends by leaving its state for
    # the next fragment (_pending) unless it stopped or opened/closed a level.

    def _walk_top_explicit(self, buf: _Buffer, i: int, n: int) -> int:
        _, header, u32, vr_class = self._codec
        wanted = _WANTED
        last = n - 8
        while i <= last:
            group, elem, vr, length = header(buf, i)
            cls = vr_class[vr]  # KeyError: not a VR (or an item tag at the top level)
            if cls:
                if i + 12 > n:
                    if group == _ITEM_GROUP:
                        raise _Malformed
                    break  # header split across fragments
                (length,) = u32(buf, i + 8)
                i += 12
                if length == _UNDEFINED:
                    return self._open_top(group << 16 | elem, cls, i)
            else:
                i += 8
            # Only groups 0008, 0010 and 0020 hold wanted tags, and the scan ends past
            # (0020,000E): three int compares spare most elements the tag arithmetic.
            if group >= 0x0020 or group == 0x0008 or group == 0x0010:
                tag = group << 16 | elem
                if tag > 0x0020000E:  # past (0020,000E): nothing wanted can follow
                    if group == _ITEM_GROUP:
                        raise _Malformed  # an item or delimiter where an element belongs
                    self._finish("complete")
                    return i
                if tag in wanted and length <= MAX_VALUE_LENGTH:
                    end = i + length
                    if end > n:
                        return self._start_value(tag, length, buf, i, n)
                    self._take(tag, buf[i:end])
                    if tag == _SERIES_INSTANCE_UID:
                        return end
                    i = end
                    continue
            i += length
        return self._pending(buf, i, n)

    def _walk_top_implicit(self, buf: _Buffer, i: int, n: int) -> int:
        header = _CODECS[_IMPLICIT_LE].header
        wanted = _WANTED
        last = n - 8
        while i <= last:
            group, elem, length = header(buf, i)
            i += 8
            if length == _UNDEFINED:
                return self._open_top(group << 16 | elem, _LONG_NESTS, i)
            if group >= 0x0020 or group == 0x0008 or group == 0x0010:
                tag = group << 16 | elem
                if tag > 0x0020000E:
                    if group == _ITEM_GROUP:
                        raise _Malformed
                    self._finish("complete")
                    return i
                if tag in wanted and length <= MAX_VALUE_LENGTH:
                    end = i + length
                    if end > n:
                        return self._start_value(tag, length, buf, i, n)
                    self._take(tag, buf[i:end])
                    if tag == _SERIES_INSTANCE_UID:
                        return end
                    i = end
                    continue
            i += length
        return self._pending(buf, i, n)

    def _walk_nested(self, buf: _Buffer, i: int, n: int) -> int:
        """Walk inside undefined-length sequences/items until back at the top level."""
        stack = self._stack
        kind, encoding = stack[-1]
        implicit, header, u32, vr_class = _CODECS[encoding]
        last = n - 8
        while i <= last:
            if implicit:
                group, elem, length = header(buf, i)
                cls = _LONG_NESTS  # undefined length means a sequence
                i += 8
            else:
                group, elem, vr, length = header(buf, i)
                if group == _ITEM_GROUP:
                    # Items and delimiters have no VR in any syntax (PS3.5 7.5).
                    (length,) = u32(buf, i + 4)
                    cls = _SHORT
                    i += 8
                else:
                    cls = vr_class[vr]
                    if cls:
                        if i + 12 > n:
                            break
                        (length,) = u32(buf, i + 8)
                        i += 12
                    else:
                        i += 8
            if kind == _SEQ_OPEN:
                if group != _ITEM_GROUP:
                    raise _Malformed
                if elem == _ITEM:
                    if length == _UNDEFINED:
                        stack.append((_ITEM_OPEN, encoding))
                        kind = _ITEM_OPEN
                    else:
                        i += length  # a defined-length item (or pixel data fragment)
                elif elem == _SEQUENCE_DELIMITER:
                    stack.pop()
                    if len(stack) == 1:
                        return i
                    kind, encoding = stack[-1]
                    implicit, header, u32, vr_class = _CODECS[encoding]
                else:
                    raise _Malformed
            elif group == _ITEM_GROUP:  # in an item
                if elem != _ITEM_DELIMITER:
                    raise _Malformed
                stack.pop()
                kind = _SEQ_OPEN  # items only open in sequences, same encoding
            elif length == _UNDEFINED:
                if cls == _LONG_UN:
                    stack.append((_SEQ_OPEN, _IMPLICIT_LE))
                    implicit, header, u32, vr_class = _CODECS[_IMPLICIT_LE]
                elif cls == _LONG_NESTS:
                    stack.append((_SEQ_OPEN, encoding))
                else:
                    raise _Malformed
                kind, encoding = stack[-1]
            else:
                i += length
        return self._pending(buf, i, n)

    # -- the slow path: state across fragments ------------------------------------------

    def _pending(self, buf: _Buffer, i: int, n: int) -> int:
        """The loop ran out of buffer at ``i``: remember what the next fragment continues."""
        if i > n:
            self._skip = i - n  # a value that goes on into the next fragment(s)
        elif i < n:
            self._header = bytes(buf[i:n])  # fewer than 12 bytes of a header
        return n

    def _open_top(self, tag: int, cls: int, i: int) -> int:
        """A top-level element of undefined length: open a sequence level."""
        if tag >> 16 == _ITEM_GROUP:
            raise _Malformed
        if tag > _SERIES_INSTANCE_UID:
            self._finish("complete")
        elif cls == _LONG_UN:
            self._stack.append((_SEQ_OPEN, _IMPLICIT_LE))
        elif cls == _LONG_NESTS:
            self._stack.append((_SEQ_OPEN, self._stack[0][1]))
        else:
            raise _Malformed
        return i

    def _start_value(self, tag: int, length: int, buf: _Buffer, i: int, n: int) -> int:
        """A wanted value that goes on into the next fragment(s): start collecting."""
        self._value = bytearray(buf[i:n])
        self._value_tag = tag
        self._value_length = length
        return n

    def _collect(self, data: _Buffer, i: int, n: int) -> int:
        value = self._value
        k = min(self._value_length - len(value), n - i)
        value += data[i : i + k]
        if len(value) == self._value_length:
            self._take(self._value_tag, value)
        return i + k

    def _join_header(self, data: _Buffer, i: int, n: int) -> int:
        """Complete a header split across fragments, then act on it alone."""
        head = self._header
        if len(head) < 8:
            take = min(8 - len(head), n - i)
            head += data[i : i + take]
            i += take
            if len(head) < 8:
                self._header = head
                return i
        size = self._header_size(head)
        if len(head) < size:
            take = min(size - len(head), n - i)
            head += data[i : i + take]
            i += take
            if len(head) < size:
                self._header = head
                return i
        self._header = b""
        # `head` is exactly one header: the walk decodes it and leaves the value (all
        # of it in `data`) pending as a skip or a value to collect.
        self._scan(head, 0, size)
        return i

    def _header_size(self, head: bytes) -> int:
        implicit, header, _, vr_class = _CODECS[self._stack[-1][1]]
        if implicit:
            return 8
        group, _, vr, _ = header(head, 0)
        if group == _ITEM_GROUP:
            return 8
        return 12 if vr_class[vr] else 8

    def _take(self, tag: int, raw: _Buffer) -> None:
        self._value_tag = 0
        text = _text(tag, raw)
        if self._value:
            self._value = bytearray()
        if text:
            self._found[tag] = text
        if tag == _SERIES_INSTANCE_UID:
            self._finish("complete")
