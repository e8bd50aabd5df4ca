"""Upper Layer PDUs and their items (PS3.8 section 9.3, Annex 9; PS3.7 Annex D.3.3).

Theory of operation
-------------------
Every PDU starts with a six byte header: PDU-type (1), reserved (1) and PDU-length
(4, big endian), the number of bytes that follow. The association engine frames PDUs
itself (``workers.engine.connection``) and only calls :func:`decode` on a complete
body for the association-control PDUs; P-DATA-TF bodies are walked by the engine in
place (:func:`iter_pdvs`) so that data-set fragments are never copied (``PDataTF`` here
is for tests, requestors and handlers that ask for the whole PDU).

Decoding is strict where the standard is strict and lenient where it asks us to be:
reserved fields are "sent with a value of 00H and not tested on receipt" (PS3.8
9.3.1); unrecognised user-information sub-items are kept (``unknown``) and otherwise
ignored; anything that cannot be framed or whose lengths disagree raises
:class:`PDUError`, whose ``reason`` is the A-ABORT reason the engine answers with
(PS3.8 Table 9-26).

The records (wire codes, PDUs, items) live in :mod:`workers.engine.pdu_records`, the
decoder in :mod:`workers.engine.pdu_decode`, the encoder in
:mod:`workers.engine.pdu_encode`; this module gathers them under the one name the rest
of the code imports (``from workers.engine import pdu as p``).
"""

from __future__ import annotations

# the memos of decode() and encode(), re-exported for the tests that bound them
from .pdu_decode import _RQ_MEMO as _RQ_MEMO
from .pdu_decode import _RQ_MEMO_ENTRIES as _RQ_MEMO_ENTRIES
from .pdu_decode import decode, iter_pdvs, parse_header
from .pdu_encode import _AC_MEMO as _AC_MEMO
from .pdu_encode import _AC_MEMO_ENTRIES as _AC_MEMO_ENTRIES
from .pdu_encode import encode
from .pdu_records import (
    APPLICATION_CONTEXT_NAME,
    PDU,
    PDU_HEADER_LENGTH,
    PDV,
    Abort,
    AbortReason,
    AbortSource,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    AsyncOpsWindow,
    ContextResult,
    ItemType,
    PDataTF,
    PDUError,
    PDUType,
    PresentationContextAC,
    PresentationContextRQ,
    RejectReason,
    RejectResult,
    RejectSource,
    ReleaseRP,
    ReleaseRQ,
    RoleSelection,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityAC,
    UserIdentityRQ,
    UserIdentityType,
    UserInformation,
)

__all__ = [
    "APPLICATION_CONTEXT_NAME",
    "PDU",
    "PDU_HEADER_LENGTH",
    "PDV",
    "Abort",
    "AbortReason",
    "AbortSource",
    "AssociateAC",
    "AssociateRJ",
    "AssociateRQ",
    "AsyncOpsWindow",
    "ContextResult",
    "ItemType",
    "PDUError",
    "PDUType",
    "PDataTF",
    "PresentationContextAC",
    "PresentationContextRQ",
    "RejectReason",
    "RejectResult",
    "RejectSource",
    "ReleaseRP",
    "ReleaseRQ",
    "RoleSelection",
    "SOPClassCommonExtended",
    "SOPClassExtended",
    "UserIdentityAC",
    "UserIdentityRQ",
    "UserIdentityType",
    "UserInformation",
    "decode",
    "encode",
    "iter_pdvs",
    "parse_header",
]
