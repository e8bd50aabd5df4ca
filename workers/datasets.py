"""Encoding and decoding DIMSE data sets with pydicom, off the hot path.

The one home of these two for every role: the acceptor's services (responses,
sub-operations), the handler contract's lazily decoded ``event.dataset``, and the
requestor's convenience paths (:mod:`workers.scu.codec` re-exports them). pydicom is
imported inside the functions, so that code that only moves bytes never imports it
(no pydicom on the hot path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO, cast

from .engine import acse
from .engine.deflate import deflate, inflate

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["decode_dataset", "encode_dataset"]


def _encoding(transfer_syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a transfer syntax's data set encoding.

    Every transfer syntax but the two named ones is Explicit VR Little Endian for the
    data set (PS3.5 A.4: encapsulated ones too; only the pixel data differs).
    """
    if transfer_syntax == acse.IMPLICIT_VR_LITTLE_ENDIAN:
        return True, True
    if transfer_syntax == acse.EXPLICIT_VR_BIG_ENDIAN:
        return False, False
    return False, True


def encode_dataset(ds: Any, transfer_syntax: str) -> bytes:
    """``ds`` (a pydicom Dataset) encoded as a DIMSE data set (no preamble, no file
    meta) in ``transfer_syntax``.

    Deflated Explicit VR Little Endian is deflated here (raw deflate, PS3.5 A.5). For
    an encapsulated syntax the pixel data must already be encapsulated in ``ds``.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    implicit, little = _encoding(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if transfer_syntax == acse.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        # Raw deflate, padded to even length (PS3.5 A.5); DCMTK aborts on an odd
        # data-set fragment.
        raw = deflate(raw)
    return bytes(raw)


#: Largest inflated Deflated data set decoded when the caller names no bound (the
#: engine's default ``max_dataset_in_memory``).
DEFAULT_MAX_DATASET = 64 * 1024 * 1024


def decode_dataset(
    data: bytes | bytearray | memoryview,
    transfer_syntax: str,
    max_length: int = DEFAULT_MAX_DATASET,
) -> Dataset:
    """Decode DIMSE data-set bytes (no file meta) encoded in ``transfer_syntax``.

    A Deflated data set is inflated up to ``max_length`` bytes; past it
    :class:`~workers.engine.deflate.DatasetTooLarge` is raised (a deflate bomb).
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    raw = data if isinstance(data, bytes) else bytes(data)
    if transfer_syntax == acse.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        raw = inflate(raw, max_length)
    implicit, little = _encoding(transfer_syntax)
    return read_dataset(cast(BinaryIO, DicomBytesIO(raw)), implicit, little)
