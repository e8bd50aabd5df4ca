"""DIMSE command sets (PS3.7 chapters 9 and 10, Annex E), encoded and decoded by hand.

Theory of operation
-------------------
A DIMSE message is a command set, optionally followed by a data set, each carried as
P-DATA fragments on one presentation context. The command set is always Implicit VR
Little Endian group 0000 with (0000,0000) Command Group Length first (PS3.7 6.3.1,
E.1). It holds only a few dozen possible elements, so it is walked tag by tag here
without pydicom: this is on the hot path of every C-STORE.

:class:`Command` is one flat record for every C-* and N-* request and response. Its
attribute names are the DICOM keywords of the elements (``MessageID``,
``AffectedSOPClassUID``...), the same names pynetdicom's primitives use, so handlers
reading ``event.request.AffectedSOPInstanceUID`` work unchanged.

Its parts, gathered here under the one name the rest of the code imports
(``from workers.engine import dimse``):

* :mod:`workers.engine.dimse_codec`: :class:`Command`, its wire codes, and the codec,
  :func:`encode_command` / :func:`decode_command`, driven by one table of the
  group-0000 elements (``_ELEMENTS``). Decoding is one pass of ``struct.unpack_from``
  and raises :class:`DIMSEError` only for what makes the bytes unreadable (truncation,
  overrun, a tag outside group 0000, a bad US/UL/AT length, a duplicate, a missing or
  unknown Command Field, a missing Command Data Set Type);
* :mod:`workers.engine.dimse_messages`: :func:`validate_command`, the PS3.7 "which
  elements must be present" rules per command field, kept apart so a receiver can
  answer a semantically broken request with a failure status instead of an abort;
  :func:`response_for` and constructors for common requests;
* :mod:`workers.engine.dimse_status`: statuses (PS3.7 Annex C), :class:`Status` and
  :func:`status_category`.

P-DATA-TF fragments are made by the connection as it sends
(``Connection.send_message``); the whole-message fragmenter the tests compare with
pynetdicom's lives in tests/engine/fragments.py.
"""

from __future__ import annotations

from .dimse_codec import (
    DATASET_PRESENT,
    NO_DATASET,
    VERIFICATION_SOP_CLASS,
    Command,
    CommandField,
    DIMSEError,
    Priority,
    decode_command,
    encode_c_store_rsp,
    encode_command,
)
from .dimse_messages import (
    c_cancel_rq,
    c_echo_rq,
    c_echo_rsp,
    c_find_rq,
    c_get_rq,
    c_move_rq,
    c_store_rq,
    c_store_rsp,
    n_action_rq,
    n_create_rq,
    n_delete_rq,
    n_event_report_rq,
    n_get_rq,
    n_set_rq,
    response_for,
    validate_command,
)
from .dimse_status import (
    CANCEL,
    FAILURE,
    PENDING,
    SUCCESS,
    WARNING,
    Status,
    status_category,
)

__all__ = [
    "CANCEL",
    "DATASET_PRESENT",
    "FAILURE",
    "NO_DATASET",
    "PENDING",
    "SUCCESS",
    "VERIFICATION_SOP_CLASS",
    "WARNING",
    "Command",
    "CommandField",
    "DIMSEError",
    "Priority",
    "Status",
    "c_cancel_rq",
    "c_echo_rq",
    "c_echo_rsp",
    "c_find_rq",
    "c_get_rq",
    "c_move_rq",
    "c_store_rq",
    "c_store_rsp",
    "decode_command",
    "encode_c_store_rsp",
    "encode_command",
    "n_action_rq",
    "n_create_rq",
    "n_delete_rq",
    "n_event_report_rq",
    "n_get_rq",
    "n_set_rq",
    "response_for",
    "status_category",
    "validate_command",
]
