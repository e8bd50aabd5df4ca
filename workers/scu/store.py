"""Where a C-STORE's data set comes from: a Part 10 file or a pydicom Dataset.

A file is opened unbuffered and its header parsed by hand (:mod:`.part10`). Files up to
:data:`SMALL_FILE` are read whole in one system call and sent as one buffer; larger
ones are left open at the data set for the requestor to stream in chunks, so a 2 GB
file never sits in memory. Reading a small file happens on the event loop's thread: a
page-cache read of a few hundred KiB is cheaper than a hop to a worker thread.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from workers.engine.connection import PresentationContext

from . import codec
from .part10 import NeedMoreData, Part10Header, parse_part10_header

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["SMALL_FILE", "Part10Source", "dataset_context", "open_part10", "read_exact"]

#: Files up to this size are read whole and sent as one buffer; larger ones stream.
SMALL_FILE = 4 * 1024 * 1024
#: First read of a large file: enough for any real file meta group.
_HEAD_READ = 64 * 1024


@dataclass(slots=True)
class Part10Source:
    """An open Part 10 file: its header, and the data set or where to read it."""

    path: str
    header: Part10Header
    file: io.FileIO  # positioned at the data set when ``data`` is None
    length: int  # bytes in the data set
    data: memoryview | None  # the whole data set, for a small file

    def __enter__(self) -> Part10Source:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.file.close()


def open_part10(
    path: str,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
    transfer_syntax: str | None = None,
) -> Part10Source:
    """Open the Part 10 file at ``path`` for a C-STORE.

    UIDs and transfer syntax given by the caller must agree with the file meta
    (``ValueError`` otherwise): sending a data set under another name is a bug.
    """
    f = io.FileIO(path, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        whole = size <= SMALL_FILE
        head = read_exact(f, size if whole else min(size, _HEAD_READ))
        while True:
            try:
                header = parse_part10_header(head, eof=len(head) >= size)
                break
            except NeedMoreData as more:
                head += read_exact(f, max(more.needed, 2 * len(head)) - len(head))
        for given, found, what in (
            (sop_class_uid, header.sop_class_uid, "SOP class UID"),
            (sop_instance_uid, header.sop_instance_uid, "SOP instance UID"),
            (transfer_syntax, header.transfer_syntax, "transfer syntax"),
        ):
            if given is not None and given != found:
                raise ValueError(f"{path}: {what} is {found}, not {given} as given")
        length = size - header.dataset_offset
        if whole:
            data = memoryview(head)[header.dataset_offset :]
            return Part10Source(path, header, f, length, data)
        f.seek(header.dataset_offset)
        return Part10Source(path, header, f, length, None)
    except BaseException:
        f.close()
        raise


def read_exact(f: io.FileIO, n: int) -> bytes:
    """``n`` bytes from an unbuffered file, fewer only at its end.

    ``FileIO.read`` allocates the result and reads into it: one copy from the kernel,
    no zero-fill, and an immutable object the transport may keep until it is sent.
    """
    data = f.read(n)
    if data is None:  # pragma: no cover - only for non-blocking files
        raise OSError(f"{f.name!r} has no data ready")
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def dataset_context(
    ds: Dataset,
    sop_class_uid: str,
    transfer_syntax: str | None,
    context_for: Callable[[str, str | None], PresentationContext],
    candidates: Sequence[PresentationContext],
) -> PresentationContext:
    """The context to send pydicom Dataset ``ds`` on.

    An explicit ``transfer_syntax``, or the encapsulated one of ``ds.file_meta``, must
    be accepted as is. An uncompressed data set may go in any accepted uncompressed
    syntax (pydicom re-encodes it; pixel data is untouched), preferring its own.
    ``candidates`` are the accepted contexts of the SOP class, in ID order.
    """
    meta = getattr(ds, "file_meta", None)
    stored = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    stored = str(stored) if stored else None
    if transfer_syntax is not None:
        return context_for(sop_class_uid, transfer_syntax)
    if stored is not None and stored not in codec.NATIVE_TRANSFER_SYNTAXES:
        return context_for(sop_class_uid, stored)
    context_for(sop_class_uid, None)  # raises when the class has no context
    native = [c for c in candidates if c.transfer_syntax in codec.NATIVE_TRANSFER_SYNTAXES]
    if not native:
        raise ValueError(
            f"SOP class {sop_class_uid} was accepted only with encapsulated transfer "
            "syntaxes; give transfer_syntax and a data set with encapsulated pixel data"
        )
    return next((c for c in native if c.transfer_syntax == stored), native[0])
