"""The association requestor (SCU) API: asyncio over the sans-IO engine.

Used by the load generator (pipelined C-STOREs of bytes or files, no pydicom), by the
worker for C-MOVE sub-operations, and by users::

    from workers.engine.acse import Requested
    from workers.scu import associate

    async with await associate(
        "127.0.0.1", 11112, called_ae="STORESCP", contexts=[Requested(CT_IMAGE_STORAGE)]
    ) as assoc:
        rsp = await assoc.send_c_store("/data/ct/1.dcm")

Modules: :mod:`.requestor` (``associate``, ``Requestor``), :mod:`.operations`
(errors, C-FIND/GET/MOVE iterators), :mod:`.protocol` (the asyncio protocol),
:mod:`.part10` (Part 10 header parsing), :mod:`.codec` (pydicom, lazily).
"""

from workers.engine.acse import Requested
from workers.engine.connection import PresentationContext
from workers.engine.dimse import Command, Priority, Status
from workers.engine.pdu import (
    AsyncOpsWindow,
    RoleSelection,
    SOPClassCommonExtended,
    SOPClassExtended,
    UserIdentityRQ,
)

from .operations import (
    AssociationAborted,
    AssociationError,
    AssociationRejected,
    DIMSEOperation,
)
from .part10 import Part10Header, parse_part10_header
from .requestor import EventReportHandler, Requestor, StoreHandler, associate

__all__ = [
    "AssociationAborted",
    "AssociationError",
    "AssociationRejected",
    "AsyncOpsWindow",
    "Command",
    "DIMSEOperation",
    "EventReportHandler",
    "Part10Header",
    "PresentationContext",
    "Priority",
    "Requested",
    "Requestor",
    "RoleSelection",
    "SOPClassCommonExtended",
    "SOPClassExtended",
    "Status",
    "StoreHandler",
    "UserIdentityRQ",
    "associate",
    "parse_part10_header",
]
