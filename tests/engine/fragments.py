"""P-DATA-TF fragmentation of whole DIMSE messages (PS3.8 9.3.5, Annex D.1 and E).

Used only by tests (tests/engine/test_dimse.py checks it against pynetdicom's own
fragmentation); the engine fragments as it sends, in ``Connection._send_pdata``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Protocol

# --------------------------------------------------------------------------------------
# P-DATA-TF fragmentation (PS3.8 9.3.5, Annex D.1 and E)
# --------------------------------------------------------------------------------------

#: Message control header bit 0: the fragment is command information (PS3.8 E.2).
CONTROL_COMMAND = 0x01
#: Message control header bit 1: the last fragment of the command or data set.
CONTROL_LAST = 0x02

#: Largest P-DATA-TF variable field we send, whatever the peer allows: with a peer
#: Maximum Length of 0 ("unlimited", PS3.8 D.1) or in the gigabytes, one PDU per data
#: set would need a buffer as large as the data set.
MAX_PDU_CAP = 16 * 1024 * 1024

_P_DATA_TF = 0x04
# PDU type, reserved, PDU length | PDV item length, presentation context ID, control
_PDATA_HEADER = struct.Struct(">BBIIBB")
_PDATA_HEADER_LENGTH = _PDATA_HEADER.size  # 12
# Per PDV the variable field also holds the 4-byte item length, the context ID and
# the control header: a fragment of n bytes takes n + 6 bytes of the Maximum Length.
_PDV_OVERHEAD = 6


class Readable(Protocol):
    """A source of data-set bytes read in place, such as an open binary file."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def pdata_header(context_id: int, control: int, data_length: int) -> bytes:
    """The 12 bytes before a ``data_length``-byte fragment in a single-PDV P-DATA-TF.

    PDU type 04H, reserved, PDU length (data_length + 6), PDV item length
    (data_length + 2), presentation context ID, message control header; all big
    endian (PS3.8 9.3.5, 9.3.5.1). ``writev(header, payload)`` then sends the PDU
    without copying the payload.
    """
    return _PDATA_HEADER.pack(
        _P_DATA_TF, 0, data_length + _PDV_OVERHEAD, data_length + 2, context_id, control
    )


def max_fragment_length(max_pdu_length: int, pdu_cap: int = MAX_PDU_CAP) -> int:
    """Largest PDV fragment that fits a P-DATA-TF within the peer's Maximum Length.

    ``max_pdu_length`` is the Maximum Length sub-item the peer sent (PS3.8 D.1): the
    bound on the PDU's variable field, PDV item headers included; 0 means unlimited,
    which ``pdu_cap`` bounds anyway.
    """
    if max_pdu_length < 0 or pdu_cap < 0:
        raise ValueError(f"negative maximum length {min(max_pdu_length, pdu_cap)}")
    limit = min(max_pdu_length, pdu_cap) if max_pdu_length else pdu_cap
    # Even, like the engine's fragments: DCMTK refuses odd fragment lengths.
    if limit < _PDV_OVERHEAD + 2:
        raise ValueError(f"maximum length {limit} cannot carry an even PDV fragment")
    return (limit - _PDV_OVERHEAD) & ~1


def iter_fragments(
    context_id: int,
    command: bytes | memoryview,
    dataset: bytes | bytearray | memoryview | Readable | None,
    max_pdu_length: int,
    *,
    dataset_length: int | None = None,
    pdu_cap: int = MAX_PDU_CAP,
) -> Iterator[bytes | bytearray]:
    """Yield the P-DATA-TF PDUs of one message, each a complete PDU with one PDV.

    Command fragments first (control 01H, the last 03H), then data-set fragments
    (00H, the last 02H), each PDU's variable field at most ``max_pdu_length`` (see
    :func:`max_fragment_length`). ``dataset`` is ``None`` (no data set), bytes-like,
    or an object with ``readinto`` (e.g. a file opened ``rb``), which is read
    straight into each PDU's buffer so the data set is never held whole. For such a
    reader give ``dataset_length`` when known; else a seekable reader is measured
    from its current position, and other readers are read one fragment ahead to
    find the last one. An empty data set is sent as one empty last fragment.
    """
    if not 1 <= context_id <= 255 or not context_id & 1:
        raise ValueError(f"presentation context ID {context_id} is not an odd 1..255")
    fragment = max_fragment_length(max_pdu_length, pdu_cap)
    yield from _fragment_buffer(context_id, CONTROL_COMMAND, command, fragment)
    if dataset is None:
        return
    if isinstance(dataset, bytes | bytearray | memoryview):
        yield from _fragment_buffer(context_id, 0, dataset, fragment)
    else:
        yield from _fragment_reader(context_id, dataset, fragment, dataset_length)


def fragment_message(
    context_id: int,
    command: bytes,
    dataset: bytes | memoryview | None,
    max_pdu_length: int,
    *,
    pdu_cap: int = MAX_PDU_CAP,
) -> list[bytes]:
    """All P-DATA-TF PDUs of one message as a list; see :func:`iter_fragments`."""
    return [
        pdu if type(pdu) is bytes else bytes(pdu)
        for pdu in iter_fragments(context_id, command, dataset, max_pdu_length, pdu_cap=pdu_cap)
    ]


def _fragment_buffer(
    context_id: int, control: int, data: bytes | bytearray | memoryview, fragment: int
) -> Iterator[bytes]:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    total = len(view)
    if total == 0:
        yield pdata_header(context_id, control | CONTROL_LAST, 0)
        return
    for start in range(0, total, fragment):
        stop = start + fragment
        if stop >= total:
            stop = total
            flags = control | CONTROL_LAST
        else:
            flags = control
        yield b"".join((pdata_header(context_id, flags, stop - start), view[start:stop]))


def _read_full(source: Readable, buffer: bytearray, offset: int) -> int:
    """Fill ``buffer[offset:]`` from ``source``; return how many bytes were read."""
    with memoryview(buffer) as whole, whole[offset:] as view:
        size = len(view)
        got = 0
        while got < size:
            with view[got:] as rest:
                n = source.readinto(rest)
            if n is None:
                raise ValueError("data set reader has no data ready (non-blocking?)")
            if n == 0:
                break
            got += n
        return got


def _remaining_length(source: Readable) -> int | None:
    """Bytes left in a seekable ``source``, or None when it cannot tell."""
    seekable = getattr(source, "seekable", None)
    if seekable is None or not seekable():
        return None
    here: int = source.tell()  # type: ignore[attr-defined]
    end: int = source.seek(0, 2)  # type: ignore[attr-defined]
    source.seek(here)  # type: ignore[attr-defined]
    return max(end - here, 0)


def _fragment_reader(
    context_id: int, source: Readable, fragment: int, length: int | None
) -> Iterator[bytearray]:
    if length is None:
        length = _remaining_length(source)
    if length is not None:
        # Known size: each PDU buffer is exactly as large as its fragment.
        remaining = length
        while True:
            size = min(fragment, remaining)
            pdu = bytearray(_PDATA_HEADER_LENGTH + size)
            got = _read_full(source, pdu, _PDATA_HEADER_LENGTH)
            if got < size:
                raise ValueError(f"data set ended {remaining - got} bytes early")
            remaining -= size
            flags = CONTROL_LAST if remaining == 0 else 0
            _PDATA_HEADER.pack_into(
                pdu, 0, _P_DATA_TF, 0, size + _PDV_OVERHEAD, size + 2, context_id, flags
            )
            yield pdu
            if remaining == 0:
                return
    # Unknown size: read one fragment ahead; a fragment is the last when the next
    # read finds nothing more.
    pdu = bytearray(_PDATA_HEADER_LENGTH + fragment)
    got = _read_full(source, pdu, _PDATA_HEADER_LENGTH)
    while True:
        if got == fragment:
            following = bytearray(_PDATA_HEADER_LENGTH + fragment)
            got_next = _read_full(source, following, _PDATA_HEADER_LENGTH)
            last = got_next == 0
        else:
            del pdu[_PDATA_HEADER_LENGTH + got :]
            last = True
        _PDATA_HEADER.pack_into(
            pdu,
            0,
            _P_DATA_TF,
            0,
            got + _PDV_OVERHEAD,
            got + 2,
            context_id,
            CONTROL_LAST if last else 0,
        )
        yield pdu
        if last:
            return
        pdu, got = following, got_next
