"""The content digest of a stored instance: SHA-256 of the data set as stored.

The receiver computes it while streaming (the fragments it writes after the Part 10
header); :func:`dataset_digest` computes the same from a file, for reconcile and for
storage commitment's check that the file was not altered.
"""

from __future__ import annotations

import hashlib
import struct
from typing import BinaryIO

__all__ = ["dataset_digest", "dataset_offset", "stream_digest"]

_PREAMBLE = 128
_CHUNK = 1 << 20
_HEAD = 64 * 1024
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                       b"UN", b"UR", b"UT", b"UV"})  # fmt: skip


def dataset_offset(head: bytes) -> int:
    """Where the data set starts in a Part 10 file whose first bytes are ``head``
    (the file meta elements, group 0002, are walked; Explicit VR Little Endian,
    PS3.10 7.1). Raises ``ValueError`` if ``head`` is not a Part 10 header or is
    too short to hold all of it."""
    if head[_PREAMBLE : _PREAMBLE + 4] != b"DICM":
        raise ValueError("not a DICOM Part 10 file")
    i = _PREAMBLE + 4
    while i + 8 <= len(head):
        group, _elem = struct.unpack_from("<HH", head, i)
        if group != 0x0002:
            return i
        vr = head[i + 4 : i + 6]
        if vr in _LONG_VRS:
            if i + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, i + 8)
            i += 12 + length
        else:
            (length,) = struct.unpack_from("<H", head, i + 6)
            i += 8 + length
    if i >= len(head):
        # Only file meta (an empty data set) or a header longer than ``head``.
        if i == len(head):
            return i
        raise ValueError("file meta longer than the bytes given")
    raise ValueError("truncated file meta")


def dataset_digest(path: str) -> tuple[int, str]:
    """(data-set size in bytes, hex SHA-256 of the data set) of a Part 10 file.

    Raises ``OSError`` or ``ValueError`` (not Part 10)."""
    with open(path, "rb") as f:
        return stream_digest(f)


def stream_digest(f: BinaryIO) -> tuple[int, str]:
    """:func:`dataset_digest` of a Part 10 file read from ``f`` (a file, or an object
    store's response body), in chunks: never the whole file in memory."""
    head = b""
    while len(head) < _HEAD:
        # A network body may answer short reads: gather the header's bytes first.
        more = f.read(_HEAD - len(head))
        if not more:
            break
        head += more
    start = dataset_offset(head)
    digest = hashlib.sha256(memoryview(head)[start:])
    size = len(head) - start
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()
