"""pydicom at arm's length: data sets for the convenience paths of the requestor.

Identifiers (C-FIND/GET/MOVE), N-service attribute lists and C-STORE of a pydicom
``Dataset`` are encoded and decoded here. pydicom is imported lazily, inside the
functions, so that a requestor that only sends bytes or files (the load generator, the
worker's C-MOVE sub-operations) never imports it (DESIGN principle 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, cast

from workers.engine import acse
from workers.engine.deflate import deflate, inflate

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "NATIVE_TRANSFER_SYNTAXES",
    "QUERY_MODELS",
    "decode_dataset",
    "encode_dataset",
    "resolve_query_model",
]

#: Transfer syntaxes a data set can be re-encoded into without touching pixel data.
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {
        acse.IMPLICIT_VR_LITTLE_ENDIAN,
        acse.EXPLICIT_VR_LITTLE_ENDIAN,
        acse.EXPLICIT_VR_BIG_ENDIAN,
        acse.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    }
)

#: Query/Retrieve information models (PS3.4 C.6) by service and pynetdicom 1.x alias:
#: P patient root, S study root, O patient/study only (retired), W modality worklist.
QUERY_MODELS: dict[str, dict[str, str]] = {
    "find": {
        "P": "1.2.840.10008.5.1.4.1.2.1.1",
        "S": "1.2.840.10008.5.1.4.1.2.2.1",
        "O": "1.2.840.10008.5.1.4.1.2.3.1",
        "W": "1.2.840.10008.5.1.4.31",
    },
    "move": {
        "P": "1.2.840.10008.5.1.4.1.2.1.2",
        "S": "1.2.840.10008.5.1.4.1.2.2.2",
        "O": "1.2.840.10008.5.1.4.1.2.3.2",
    },
    "get": {
        "P": "1.2.840.10008.5.1.4.1.2.1.3",
        "S": "1.2.840.10008.5.1.4.1.2.2.3",
        "O": "1.2.840.10008.5.1.4.1.2.3.3",
    },
}


def resolve_query_model(service: str, query_model: str) -> str:
    """The SOP class UID for ``query_model``: an alias of :data:`QUERY_MODELS` or a UID."""
    uid = QUERY_MODELS[service].get(query_model.upper(), query_model)
    if not uid or not uid[0].isdigit():
        raise ValueError(f"unknown {service} query model {query_model!r}")
    return uid


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


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    """``ds`` encoded as a DIMSE data set (no preamble, no file meta) in the syntax.

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
        raw = deflate(raw)  # padded to even length (PS3.5 A.5)
    return raw


def decode_dataset(
    data: bytes | bytearray | memoryview,
    transfer_syntax: str,
    max_length: int = 64 * 1024 * 1024,
) -> Dataset:
    """Decode DIMSE data-set bytes encoded in ``transfer_syntax``.

    A Deflated data set inflating past ``max_length`` bytes raises
    :class:`~workers.engine.deflate.DatasetTooLarge` (a deflate bomb from the peer).
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    if transfer_syntax == acse.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        raw = inflate(data, max_length)
    else:
        raw = bytes(data)
    implicit, little = _encoding(transfer_syntax)
    return read_dataset(cast(BinaryIO, DicomBytesIO(raw)), implicit, little)
