"""pydicom at arm's length: data sets for the convenience paths of the requestor.

Identifiers (C-FIND/GET/MOVE), N-service attribute lists and C-STORE of a pydicom
``Dataset`` are encoded and decoded here. pydicom is imported lazily, inside the
functions, so that a requestor that only sends bytes or files (the load generator, the
worker's C-MOVE sub-operations) never imports it (no pydicom on the hot path).
"""

from __future__ import annotations

from workers.datasets import decode_dataset, encode_dataset  # their one home
from workers.engine import acse

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
