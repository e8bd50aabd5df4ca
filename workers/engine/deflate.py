"""Deflated Explicit VR Little Endian (PS3.5 A.5): raw deflate, bounded inflate, padding.

A deflated data set is a few bytes on the wire and can inflate a thousand-fold: a
1 MiB identifier may stand for a gigabyte. Inflating it without a bound lets one peer
exhaust a worker's memory, so every inflate here stops at a limit (the same
``max_dataset_in_memory`` that bounds a reassembled data set in the engine) and
raises :class:`DatasetTooLarge` past it. Callers turn that into the protocol's answer:
a handler that reads such a data set raises, and the request gets the failure status
of the event contract (the association itself goes on).
"""

from __future__ import annotations

import zlib

__all__ = ["DatasetTooLarge", "deflate", "inflate"]


class DatasetTooLarge(ValueError):
    """An inflated data set would exceed the configured in-memory bound."""


def inflate(data: bytes | bytearray | memoryview, limit: int) -> bytes:
    """Raw-inflate ``data``; raise :class:`DatasetTooLarge` past ``limit`` bytes.

    Trailing bytes after the end of the deflate stream (PS3.5 A.5's pad byte) are
    ignored. A truncated or corrupt stream raises ``zlib.error``.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    # max_length = limit + 1: one byte more than allowed proves the bound is passed
    # without ever holding more than limit + 1 bytes of output.
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise DatasetTooLarge(f"deflated data set inflates past {limit} bytes")
    out += inflater.flush()
    if len(out) > limit:
        raise DatasetTooLarge(f"deflated data set inflates past {limit} bytes")
    return out


def deflate(data: bytes | bytearray | memoryview) -> bytes:
    """Raw-deflate ``data``, padded to even length.

    PS3.5 A.5: the deflated stream is the value of the data set and a data set has
    even length, so an odd-length stream gets one trailing NUL byte (DCMTK aborts on
    an odd data-set fragment).
    """
    deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = deflater.compress(data) + deflater.flush()
    if len(out) & 1:
        out += b"\x00"
    return out
