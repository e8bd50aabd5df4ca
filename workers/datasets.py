"""Encoding data sets for responses and sub-operations (pydicom, off the hot path)."""

from __future__ import annotations

from typing import Any

from .engine.deflate import deflate

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def encode_dataset(ds: Any, transfer_syntax: str) -> bytes:
    """Encode a pydicom Dataset (no file meta) in ``transfer_syntax``.

    Compressed transfer syntaxes are explicit VR little endian for everything but the
    (already encapsulated) pixel data, so they encode like Explicit VR Little Endian.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    fp.is_little_endian = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    write_dataset(fp, ds)
    data = fp.getvalue()
    if transfer_syntax == DEFLATED:
        # padded to even length (PS3.5 A.5): a response identifier is a data set value
        return deflate(data)
    return bytes(data)
