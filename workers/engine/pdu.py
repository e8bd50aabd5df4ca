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
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from struct import Struct
from typing import Any, TypeVar

__all__ = [
    "PDU",
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

#: The DICOM application context name (PS3.7 Annex A.2.1).
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

#: Size of the PDU header: type, reserved, 4-byte length.
PDU_HEADER_LENGTH = 6


class PDUType(IntEnum):
    """PDU-type field values (PS3.8 Table 9-11 and following)."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class ItemType(IntEnum):
    """Item-type values of variable items and user-information sub-items."""

    APPLICATION_CONTEXT = 0x10
    PRESENTATION_CONTEXT_RQ = 0x20
    PRESENTATION_CONTEXT_AC = 0x21
    ABSTRACT_SYNTAX = 0x30
    TRANSFER_SYNTAX = 0x40
    USER_INFORMATION = 0x50
    MAXIMUM_LENGTH = 0x51
    IMPLEMENTATION_CLASS_UID = 0x52
    ASYNC_OPS_WINDOW = 0x53
    ROLE_SELECTION = 0x54
    IMPLEMENTATION_VERSION_NAME = 0x55
    SOP_CLASS_EXTENDED = 0x56
    SOP_CLASS_COMMON_EXTENDED = 0x57
    USER_IDENTITY_RQ = 0x58
    USER_IDENTITY_AC = 0x59


class ContextResult(IntEnum):
    """Result/Reason of a presentation context AC item (PS3.8 Table 9-18)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2  # provider rejection
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3  # provider rejection
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4  # provider rejection


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 Table 9-21)."""

    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source (PS3.8 Table 9-21)."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag., meaning depends on the source (PS3.8 Table 9-21)."""

    # source 1: DICOM UL service-user
    NO_REASON = 1
    APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7
    # source 2: DICOM UL service-provider (ACSE related function)
    #   1 no-reason-given, 2 protocol-version-not-supported
    PROTOCOL_VERSION_NOT_SUPPORTED = 2
    # source 3: DICOM UL service-provider (presentation related function)
    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2


class AbortSource(IntEnum):
    """A-ABORT Source (PS3.8 Table 9-26)."""

    SERVICE_USER = 0
    RESERVED = 1
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """A-ABORT Reason/Diag. when the source is the service provider (PS3.8 Table 9-26)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER = 6


class UserIdentityType(IntEnum):
    """User-Identity-Type of the user identity RQ sub-item (PS3.7 Table D.3-14)."""

    USERNAME = 1
    USERNAME_AND_PASSCODE = 2
    KERBEROS = 3
    SAML = 4
    JWT = 5


class PDUError(ValueError):
    """A peer sent bytes that are not a valid PDU.

    ``reason`` is the A-ABORT reason (:class:`AbortReason`) the engine answers with.
    """

    def __init__(self, message: str, reason: int = AbortReason.INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


# --- items -------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class PresentationContextRQ:
    """Presentation context item of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2)."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class PresentationContextAC:
    """Presentation context item of an A-ASSOCIATE-AC (PS3.8 9.3.3.2).

    ``transfer_syntax`` is meaningful only when ``result`` is ACCEPTANCE; a rejected
    context is still sent with a transfer syntax sub-item, which may be empty.
    """

    id: int
    result: int
    transfer_syntax: str = ""


@dataclass(slots=True, frozen=True)
class AsyncOpsWindow:
    """Asynchronous operations window sub-item (PS3.7 D.3.3.3); 0 means unlimited."""

    invoked: int
    performed: int


@dataclass(slots=True, frozen=True)
class RoleSelection:
    """SCP/SCU role selection sub-item (PS3.7 D.3.3.4)."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass(slots=True, frozen=True)
class SOPClassExtended:
    """SOP class extended negotiation sub-item (PS3.7 D.3.3.5)."""

    sop_class_uid: str
    info: bytes


@dataclass(slots=True, frozen=True)
class SOPClassCommonExtended:
    """SOP class common extended negotiation sub-item (PS3.7 D.3.3.6)."""

    sop_class_uid: str
    service_class_uid: str
    related_general_sop_classes: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class UserIdentityRQ:
    """User identity negotiation sub-item, request form (PS3.7 D.3.3.7.1)."""

    type: int
    positive_response_requested: bool
    primary: bytes
    secondary: bytes = b""


@dataclass(slots=True, frozen=True)
class UserIdentityAC:
    """User identity negotiation sub-item, accept form (PS3.7 D.3.3.7.2)."""

    server_response: bytes


@dataclass(slots=True, frozen=True)
class UserInformation:
    """User information item (PS3.8 9.3.2.3) with its sub-items.

    ``max_length`` 0 means "no maximum" (PS3.8 D.1). ``unknown`` keeps sub-items of
    types this codec does not know, as (item-type, value) pairs, in wire order.
    """

    max_length: int | None = None
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None
    async_ops: AsyncOpsWindow | None = None
    roles: tuple[RoleSelection, ...] = ()
    sop_class_extended: tuple[SOPClassExtended, ...] = ()
    sop_class_common_extended: tuple[SOPClassCommonExtended, ...] = ()
    user_identity_rq: UserIdentityRQ | None = None
    user_identity_ac: UserIdentityAC | None = None
    unknown: tuple[tuple[int, bytes], ...] = ()


# --- PDUs --------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class AssociateRQ:
    """A-ASSOCIATE-RQ PDU (PS3.8 9.3.2). AE titles are kept without padding."""

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextRQ, ...]
    user_info: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT_NAME
    protocol_version: int = 1

    pdu_type = PDUType.ASSOCIATE_RQ


@dataclass(slots=True, frozen=True)
class AssociateAC:
    """A-ASSOCIATE-AC PDU (PS3.8 9.3.3). Called/calling AE echo the request."""

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextAC, ...]
    user_info: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT_NAME
    protocol_version: int = 1

    pdu_type = PDUType.ASSOCIATE_AC


@dataclass(slots=True, frozen=True)
class AssociateRJ:
    """A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""

    result: int
    source: int
    reason: int

    pdu_type = PDUType.ASSOCIATE_RJ


@dataclass(slots=True, frozen=True)
class PDV:
    """One presentation data value item (PS3.8 9.3.5.1, Annex E.2).

    ``control`` is the message control header: bit 0 set for a command fragment,
    bit 1 set for the last fragment of the command or data set.
    """

    context_id: int
    control: int
    data: bytes

    @property
    def is_command(self) -> bool:
        return bool(self.control & 0x01)

    @property
    def is_last(self) -> bool:
        return bool(self.control & 0x02)


@dataclass(slots=True, frozen=True)
class PDataTF:
    """P-DATA-TF PDU (PS3.8 9.3.5)."""

    pdvs: tuple[PDV, ...]

    pdu_type = PDUType.P_DATA_TF


@dataclass(slots=True, frozen=True)
class ReleaseRQ:
    """A-RELEASE-RQ PDU (PS3.8 9.3.6)."""

    pdu_type = PDUType.RELEASE_RQ


@dataclass(slots=True, frozen=True)
class ReleaseRP:
    """A-RELEASE-RP PDU (PS3.8 9.3.7)."""

    pdu_type = PDUType.RELEASE_RP


@dataclass(slots=True, frozen=True)
class Abort:
    """A-ABORT PDU (PS3.8 9.3.8)."""

    source: int
    reason: int = 0

    pdu_type = PDUType.ABORT


PDU = AssociateRQ | AssociateAC | AssociateRJ | PDataTF | ReleaseRQ | ReleaseRP | Abort


# --- codec -------------------------------------------------------------------------
#
# Layouts are PS3.8 section 9.3 and PS3.7 Annex D.3.3, all big endian. "x" is a
# reserved byte: "sent with a value of 00H and not tested on receipt" (PS3.8 9.3.1).

_U16 = Struct(">H")
_U32 = Struct(">L")
_TWO_U8 = Struct("BB")
_TWO_U16 = Struct(">HH")
#: PDU header: PDU-type, reserved, PDU-length (PS3.8 Table 9-11 and following).
_PDU_HEADER = Struct(">BxL")
#: Item header: item-type, reserved (sub-item-version for 57H), item-length.
_ITEM_HEADER = Struct(">BxH")
#: A-ASSOCIATE-RQ/AC fixed fields (Tables 9-11, 9-17): protocol-version, reserved (2),
#: called AE title (16), calling AE title (16), reserved (32).
_ASSOCIATE_FIXED = Struct(">H2x16s16s32x")
#: A-ASSOCIATE-RJ (Table 9-21): reserved, result, source, reason/diag.
_REJECT = Struct(">xBBB")
#: A-ABORT (Table 9-26): reserved, reserved, source, reason/diag.
_ABORT = Struct(">2xBB")
#: A-RELEASE-RQ/RP (Tables 9-24, 9-25): four reserved bytes.
_RELEASE_BODY = bytes(4)
#: Presentation context item fixed part (Tables 9-13, 9-18): context ID, reserved,
#: result/reason (reserved in the RQ item), reserved.
_CONTEXT_FIXED = Struct(">BxBx")
#: PDV item header (Table 9-23, Annex E.2): item-length, context ID, message control
#: header. The item-length counts the context ID and the control header.
_PDV_HEADER = Struct(">LBB")

# Item types as plain ints: comparing with an IntEnum member costs a class attribute
# lookup, ten times an int comparison, and the context loop does several per context.
_ABSTRACT_SYNTAX = int(ItemType.ABSTRACT_SYNTAX)
_APPLICATION_CONTEXT = int(ItemType.APPLICATION_CONTEXT)
_ASYNC_OPS_WINDOW = int(ItemType.ASYNC_OPS_WINDOW)
_IMPLEMENTATION_CLASS_UID = int(ItemType.IMPLEMENTATION_CLASS_UID)
_IMPLEMENTATION_VERSION_NAME = int(ItemType.IMPLEMENTATION_VERSION_NAME)
_MAXIMUM_LENGTH = int(ItemType.MAXIMUM_LENGTH)
_PRESENTATION_CONTEXT_AC = int(ItemType.PRESENTATION_CONTEXT_AC)
_PRESENTATION_CONTEXT_RQ = int(ItemType.PRESENTATION_CONTEXT_RQ)
_ROLE_SELECTION = int(ItemType.ROLE_SELECTION)
_SOP_CLASS_COMMON_EXTENDED = int(ItemType.SOP_CLASS_COMMON_EXTENDED)
_SOP_CLASS_EXTENDED = int(ItemType.SOP_CLASS_EXTENDED)
_TRANSFER_SYNTAX = int(ItemType.TRANSFER_SYNTAX)
_USER_IDENTITY_AC = int(ItemType.USER_IDENTITY_AC)
_USER_IDENTITY_RQ = int(ItemType.USER_IDENTITY_RQ)
_USER_INFORMATION = int(ItemType.USER_INFORMATION)

_AE_TITLE_LENGTH = 16
_MAX_ITEM_LENGTH = 0xFFFF
_MAX_VERSION_NAME_LENGTH = 16
_KNOWN_ITEM_TYPES = frozenset(int(t) for t in ItemType)
_USER_INFO_SUB_ITEM_TYPES = frozenset(range(_MAXIMUM_LENGTH, _USER_IDENTITY_AC + 1))
_CONTEXT_ITEM_TYPES = (_PRESENTATION_CONTEXT_RQ, _PRESENTATION_CONTEXT_AC)

_C = TypeVar("_C", PresentationContextRQ, PresentationContextAC)


def parse_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Return ``(pdu_type, pdu_length)`` from the 6-byte PDU header at ``offset``.

    The caller checks that six bytes are available; the type is not validated here
    (:func:`decode` does that).
    """
    pdu_type, length = _PDU_HEADER.unpack_from(data, offset)
    return pdu_type, length


# --- decoding helpers ----------------------------------------------------------------
#
# The association PDUs are decoded from one ``bytes`` object with (start, end) offsets:
# no slice is made until a value is extracted, and a bytes slice decodes faster than a
# memoryview. Every length is checked before it is used.

_Body = bytes | bytearray | memoryview


def _uid(data: bytes, start: int, end: int) -> str:
    # Latin-1 maps every byte to one character, so decoding never fails; on the ISO 646
    # repertoire the standard prescribes (PS3.8 Annex F) it is identical to ASCII.
    # UIDs are sent unpadded (Annex F), but some implementations pad odd lengths with a
    # NUL (the PS3.5 data set rule) or a space.
    return data[start:end].decode("latin-1").rstrip("\x00 ")


def _ae_title(value: bytes) -> str:
    # PS3.8 Table 9-11: leading and trailing spaces are not significant. NULs are
    # stripped too: C implementations sometimes send a NUL-terminated title.
    return value.decode("latin-1").strip(" \x00")


def _walk(data: bytes, start: int, end: int, where: str) -> list[tuple[int, int, int]]:
    """Split ``data[start:end]`` into items: (item-type, value start, value end)."""
    items: list[tuple[int, int, int]] = []
    offset = start
    while offset < end:
        if end - offset < 4:
            raise PDUError(f"{where}: {end - offset} trailing byte(s), no room for an item")
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        offset += 4
        stop = offset + length
        if stop > end:
            raise PDUError(
                f"{where}: item 0x{item_type:02X} of length {length} overruns its "
                f"container by {stop - end} byte(s)"
            )
        items.append((item_type, offset, stop))
        offset = stop
    return items


def _field(data: bytes, offset: int, end: int, where: str) -> tuple[int, int]:
    """Locate a field preceded by a 2-byte length at ``offset``: (start, end)."""
    if end - offset < 2:
        raise PDUError(f"{where}: length field missing")
    (length,) = _U16.unpack_from(data, offset)
    offset += 2
    stop = offset + length
    if stop > end:
        raise PDUError(f"{where}: field length {length} overruns its sub-item")
    return offset, stop


def _no_more(offset: int, end: int, where: str) -> None:
    if offset != end:
        raise PDUError(f"{where}: {end - offset} byte(s) after its last field")


def _unexpected(item_type: int, where: str) -> PDUError:
    # A known item type in the wrong place is "unexpected", anything else
    # "unrecognized" (PS3.8 Table 9-26).
    if item_type in _KNOWN_ITEM_TYPES:
        return PDUError(
            f"unexpected item 0x{item_type:02X} in {where}",
            AbortReason.UNEXPECTED_PDU_PARAMETER,
        )
    return PDUError(
        f"unrecognized item 0x{item_type:02X} in {where}",
        AbortReason.UNRECOGNIZED_PDU_PARAMETER,
    )


def _check_context_id_received(context_id: int, where: str) -> None:
    # PS3.8 9.3.2.2: "odd integers between 1 and 255".
    if not context_id & 1:
        raise PDUError(f"{where}: presentation context ID {context_id} is not odd")


# --- decoding: items -------------------------------------------------------------------


def _decode_context_rq(data: bytes, start: int, end: int) -> PresentationContextRQ:
    """Presentation context item, RQ form (PS3.8 Table 9-13)."""
    where = "presentation context (RQ) item"
    if end - start < 4:
        raise PDUError(f"{where}: {end - start} bytes, shorter than its 4 fixed bytes")
    context_id = data[start]
    _check_context_id_received(context_id, where)
    abstract_syntax: str | None = None
    transfer_syntaxes: list[str] = []
    # The sub-item walk is inlined: a storescu proposes a hundred contexts or more.
    offset = start + 4
    while offset < end:
        if end - offset < 4:
            raise PDUError(f"{where} {context_id}: {end - offset} trailing byte(s)")
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        offset += 4
        stop = offset + length
        if stop > end:
            raise PDUError(f"{where} {context_id}: sub-item 0x{item_type:02X} overruns it")
        if item_type == _TRANSFER_SYNTAX:
            transfer_syntaxes.append(data[offset:stop].decode("latin-1").rstrip("\x00 "))
        elif item_type == _ABSTRACT_SYNTAX:
            if abstract_syntax is not None:
                raise PDUError(f"{where} {context_id}: more than one abstract syntax")
            abstract_syntax = data[offset:stop].decode("latin-1").rstrip("\x00 ")
        else:
            raise _unexpected(item_type, f"{where} {context_id}")
        offset = stop
    if abstract_syntax is None:
        raise PDUError(f"{where} {context_id}: no abstract syntax sub-item")
    if not transfer_syntaxes:
        raise PDUError(f"{where} {context_id}: no transfer syntax sub-item")
    return PresentationContextRQ(context_id, abstract_syntax, tuple(transfer_syntaxes))


def _decode_context_ac(data: bytes, start: int, end: int) -> PresentationContextAC:
    """Presentation context item, AC form (PS3.8 Table 9-18).

    A missing transfer syntax sub-item is read as an empty one: some acceptors leave
    it out of rejected contexts, and it is not tested unless the result is acceptance.
    """
    where = "presentation context (AC) item"
    if end - start < 4:
        raise PDUError(f"{where}: {end - start} bytes, shorter than its 4 fixed bytes")
    context_id, result = _CONTEXT_FIXED.unpack_from(data, start)
    _check_context_id_received(context_id, where)
    transfer_syntax: str | None = None
    for item_type, value_start, value_end in _walk(data, start + 4, end, where):
        if item_type != _TRANSFER_SYNTAX:
            raise _unexpected(item_type, f"{where} {context_id}")
        if transfer_syntax is not None:
            raise PDUError(f"{where} {context_id}: more than one transfer syntax")
        transfer_syntax = _uid(data, value_start, value_end)
    return PresentationContextAC(context_id, result, transfer_syntax or "")


def _decode_role(data: bytes, start: int, end: int) -> RoleSelection:
    """SCP/SCU role selection sub-item (PS3.7 Table D.3-9)."""
    where = "role selection sub-item"
    uid_start, uid_end = _field(data, start, end, where)
    if end - uid_end != 2:
        raise PDUError(f"{where}: SCU/SCP role fields malformed")
    scu, scp = _TWO_U8.unpack_from(data, uid_end)
    # Values other than 0 and 1 are invalid; read leniently as "supported".
    return RoleSelection(_uid(data, uid_start, uid_end), bool(scu), bool(scp))


def _decode_sop_extended(data: bytes, start: int, end: int) -> SOPClassExtended:
    """SOP class extended negotiation sub-item (PS3.7 Table D.3-11)."""
    uid_start, uid_end = _field(data, start, end, "SOP class extended negotiation sub-item")
    return SOPClassExtended(_uid(data, uid_start, uid_end), data[uid_end:end])


def _decode_sop_common_extended(data: bytes, start: int, end: int) -> SOPClassCommonExtended:
    """SOP class common extended negotiation sub-item (PS3.7 Table D.3-12).

    The sub-item-version (the item header's second byte) is 0 and not tested.
    """
    where = "SOP class common extended negotiation sub-item"
    sop_start, sop_end = _field(data, start, end, where)
    service_start, service_end = _field(data, sop_end, end, where)
    related_start, related_end = _field(data, service_end, end, where)
    _no_more(related_end, end, where)
    related: list[str] = []
    offset = related_start
    while offset < related_end:
        uid_start, offset = _field(data, offset, related_end, f"{where}, related SOP class")
        related.append(_uid(data, uid_start, offset))
    return SOPClassCommonExtended(
        _uid(data, sop_start, sop_end), _uid(data, service_start, service_end), tuple(related)
    )


def _decode_user_identity_rq(data: bytes, start: int, end: int) -> UserIdentityRQ:
    """User identity negotiation sub-item, RQ form (PS3.7 Table D.3-14)."""
    where = "user identity (RQ) sub-item"
    if end - start < 2:
        raise PDUError(f"{where}: truncated")
    identity_type, response_requested = _TWO_U8.unpack_from(data, start)
    primary_start, primary_end = _field(data, start + 2, end, where)
    secondary_start, secondary_end = _field(data, primary_end, end, where)
    _no_more(secondary_end, end, where)
    return UserIdentityRQ(
        identity_type,
        bool(response_requested),
        data[primary_start:primary_end],
        data[secondary_start:secondary_end],
    )


def _decode_user_identity_ac(data: bytes, start: int, end: int) -> UserIdentityAC:
    """User identity negotiation sub-item, AC form (PS3.7 Table D.3-15)."""
    where = "user identity (AC) sub-item"
    response_start, response_end = _field(data, start, end, where)
    _no_more(response_end, end, where)
    return UserIdentityAC(data[response_start:response_end])


def _decode_user_information(data: bytes, start: int, end: int) -> UserInformation:
    """User information item (PS3.8 9.3.2.3, Annex D; PS3.7 D.3.3).

    Sub-items that may appear once raise PDUError when repeated. The maximum length
    sub-item is mandatory, but its absence is left to the engine (``None``).
    """
    max_length: int | None = None
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None
    async_ops: AsyncOpsWindow | None = None
    user_identity_rq: UserIdentityRQ | None = None
    user_identity_ac: UserIdentityAC | None = None
    roles: list[RoleSelection] = []
    extended: list[SOPClassExtended] = []
    common_extended: list[SOPClassCommonExtended] = []
    unknown: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    for item_type, value_start, value_end in _walk(data, start, end, "user information item"):
        if item_type == _ROLE_SELECTION:
            roles.append(_decode_role(data, value_start, value_end))
            continue
        if item_type == _SOP_CLASS_EXTENDED:
            extended.append(_decode_sop_extended(data, value_start, value_end))
            continue
        if item_type == _SOP_CLASS_COMMON_EXTENDED:
            common_extended.append(_decode_sop_common_extended(data, value_start, value_end))
            continue
        if item_type not in _USER_INFO_SUB_ITEM_TYPES:
            # PS3.7 D.3.3: unrecognised sub-items are ignored; kept for the handlers.
            unknown.append((item_type, data[value_start:value_end]))
            continue
        if item_type in seen:
            raise PDUError(f"user information item: sub-item 0x{item_type:02X} repeated")
        seen.add(item_type)
        length = value_end - value_start
        if item_type == _MAXIMUM_LENGTH:
            if length != 4:
                raise PDUError(f"maximum length sub-item: length {length}, not 4")
            (max_length,) = _U32.unpack_from(data, value_start)
        elif item_type == _IMPLEMENTATION_CLASS_UID:
            implementation_class_uid = _uid(data, value_start, value_end)
        elif item_type == _ASYNC_OPS_WINDOW:
            if length != 4:
                raise PDUError(f"asynchronous operations window sub-item: length {length}")
            async_ops = AsyncOpsWindow(*_TWO_U16.unpack_from(data, value_start))
        elif item_type == _IMPLEMENTATION_VERSION_NAME:
            # 1 to 16 characters by the standard; longer or empty names are accepted.
            # Trailing NULs and spaces are trimmed as for UIDs.
            implementation_version_name = _uid(data, value_start, value_end)
        elif item_type == _USER_IDENTITY_RQ:
            user_identity_rq = _decode_user_identity_rq(data, value_start, value_end)
        else:  # _USER_IDENTITY_AC
            user_identity_ac = _decode_user_identity_ac(data, value_start, value_end)
    return UserInformation(
        max_length=max_length,
        implementation_class_uid=implementation_class_uid,
        implementation_version_name=implementation_version_name,
        async_ops=async_ops,
        roles=tuple(roles),
        sop_class_extended=tuple(extended),
        sop_class_common_extended=tuple(common_extended),
        user_identity_rq=user_identity_rq,
        user_identity_ac=user_identity_ac,
        unknown=tuple(unknown),
    )


# --- decoding: PDUs ------------------------------------------------------------------


def _decode_associate(
    body: _Body,
    context_type: int,
    decode_context: Callable[[bytes, int, int], _C],
) -> tuple[int, str, str, tuple[_C, ...], UserInformation, str]:
    """Fixed fields and variable items shared by A-ASSOCIATE-RQ and -AC."""
    # One copy at most (none for bytes): a few kilobytes, and no view of the caller's
    # buffer outlives this call.
    data = body if type(body) is bytes else bytes(body)
    end = len(data)
    if end < _ASSOCIATE_FIXED.size:
        raise PDUError(f"body of {end} bytes, shorter than its 68 fixed bytes")
    version, called, calling = _ASSOCIATE_FIXED.unpack_from(data)
    application_context: str | None = None
    user_info: UserInformation | None = None
    contexts: list[_C] = []
    for item_type, start, stop in _walk(data, _ASSOCIATE_FIXED.size, end, "variable items"):
        if item_type == context_type:
            contexts.append(decode_context(data, start, stop))
        elif item_type == _APPLICATION_CONTEXT:
            if application_context is not None:
                raise PDUError("more than one application context item")
            application_context = _uid(data, start, stop)
        elif item_type == _USER_INFORMATION:
            if user_info is not None:
                raise PDUError("more than one user information item")
            user_info = _decode_user_information(data, start, stop)
        elif item_type in _CONTEXT_ITEM_TYPES:
            raise _unexpected(item_type, "the variable items")
        # Any other item type is ignored and skipped (PS3.8 9.3.1).
    if application_context is None:
        raise PDUError("no application context item")
    if user_info is None:
        raise PDUError("no user information item")
    return (
        version,
        _ae_title(called),
        _ae_title(calling),
        tuple(contexts),
        user_info,
        application_context,
    )


#: A-ASSOCIATE-RQs decoded already, by body: a requestor that associates again and
#: again sends the same request, and decoding it is much of the cost of answering it.
#: The PDU classes are frozen, so one object serves every connection that sends those
#: bytes. Bounded (entries and body size: the bytes come from peers); requests with a
#: user identity (passcodes) are not kept.
_RQ_MEMO: dict[bytes, AssociateRQ] = {}
_RQ_MEMO_ENTRIES = 64
_RQ_MEMO_MAX_BODY = 16 * 1024


def _decode_associate_rq(body: _Body) -> AssociateRQ:
    key = bytes(body) if len(body) <= _RQ_MEMO_MAX_BODY else None
    if key is not None:
        known = _RQ_MEMO.get(key)
        if known is not None:
            return known
    version, called, calling, contexts, user_info, application_context = _decode_associate(
        body, _PRESENTATION_CONTEXT_RQ, _decode_context_rq
    )
    rq = AssociateRQ(called, calling, contexts, user_info, application_context, version)
    if key is not None and user_info.user_identity_rq is None:
        if len(_RQ_MEMO) >= _RQ_MEMO_ENTRIES:
            del _RQ_MEMO[next(iter(_RQ_MEMO))]  # the oldest
        _RQ_MEMO[key] = rq
    return rq


def _decode_associate_ac(body: _Body) -> AssociateAC:
    version, called, calling, contexts, user_info, application_context = _decode_associate(
        body, _PRESENTATION_CONTEXT_AC, _decode_context_ac
    )
    return AssociateAC(called, calling, contexts, user_info, application_context, version)


def _check_fixed_length(body: _Body, length: int) -> None:
    if len(body) != length:
        raise PDUError(f"body of {len(body)} bytes, expected {length}")


def _decode_associate_rj(body: _Body) -> AssociateRJ:
    _check_fixed_length(body, _REJECT.size)
    return AssociateRJ(*_REJECT.unpack_from(body))


def iter_pdvs(body: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """Walk the PDV items of a P-DATA-TF body in place (PS3.8 9.3.5.1, Annex E.2).

    Yields ``(context_id, control, fragment)`` with ``fragment`` a view into ``body``
    (nothing is copied; release the views before resizing a ``bytearray``). Raises
    :class:`PDUError` on reaching a malformed item, after yielding the ones before it,
    and for a body without any PDV ("one or more" per PS3.8 Table 9-22).
    """
    view = memoryview(body)
    if view.format != "B":
        view = view.cast("B")
    end = len(view)
    if not end:
        raise PDUError("P-DATA-TF without any presentation data value item")
    offset = 0
    while offset < end:
        if end - offset < _PDV_HEADER.size:
            raise PDUError(f"{end - offset} trailing byte(s), too short for a PDV item")
        length, context_id, control = _PDV_HEADER.unpack_from(view, offset)
        if length < 2:
            raise PDUError(f"PDV item length {length} leaves no room for its header")
        stop = offset + 4 + length
        if stop > end:
            raise PDUError(f"PDV item of length {length} overruns the PDU by {stop - end}")
        _check_context_id_received(context_id, "PDV item")
        yield context_id, control, view[offset + _PDV_HEADER.size : stop]
        offset = stop


def _decode_p_data_tf(body: _Body) -> PDataTF:
    return PDataTF(tuple(PDV(cid, ctl, bytes(data)) for cid, ctl, data in iter_pdvs(body)))


def _decode_release_rq(body: _Body) -> ReleaseRQ:
    _check_fixed_length(body, len(_RELEASE_BODY))
    return ReleaseRQ()


def _decode_release_rp(body: _Body) -> ReleaseRP:
    _check_fixed_length(body, len(_RELEASE_BODY))
    return ReleaseRP()


def _decode_abort(body: _Body) -> Abort:
    _check_fixed_length(body, _ABORT.size)
    return Abort(*_ABORT.unpack_from(body))


_DECODERS: dict[int, tuple[str, Callable[[_Body], PDU]]] = {
    PDUType.ASSOCIATE_RQ: ("A-ASSOCIATE-RQ", _decode_associate_rq),
    PDUType.ASSOCIATE_AC: ("A-ASSOCIATE-AC", _decode_associate_ac),
    PDUType.ASSOCIATE_RJ: ("A-ASSOCIATE-RJ", _decode_associate_rj),
    PDUType.P_DATA_TF: ("P-DATA-TF", _decode_p_data_tf),
    PDUType.RELEASE_RQ: ("A-RELEASE-RQ", _decode_release_rq),
    PDUType.RELEASE_RP: ("A-RELEASE-RP", _decode_release_rp),
    PDUType.ABORT: ("A-ABORT", _decode_abort),
}


def decode(pdu_type: int, body: bytes | bytearray | memoryview) -> PDU:
    """Decode one PDU from its type and body (the bytes after the 6-byte header).

    Raises :class:`PDUError` for anything malformed; an unknown ``pdu_type`` raises
    with reason UNRECOGNIZED_PDU. The result holds no reference to ``body``, and
    neither does a raised error (so a ``bytearray`` may be resized in the handler).
    """
    entry = _DECODERS.get(pdu_type)
    if entry is None:
        raise PDUError(f"unrecognized PDU type {pdu_type!r}", AbortReason.UNRECOGNIZED_PDU)
    name, decoder = entry
    if isinstance(body, memoryview) and body.format != "B":
        body = body.cast("B")  # so that len() counts bytes
    try:
        return decoder(body)
    except PDUError as exc:
        error = PDUError(f"{name}: {exc}", exc.reason)
    except (struct.error, IndexError, ValueError) as exc:
        # Every length is checked before it is used, so this is a bug here; a peer
        # must still only ever cause a PDUError.
        error = PDUError(f"{name}: malformed ({exc})")
    # Raised outside the except clauses, a fresh error has no traceback into the
    # decoders' frames (which may hold views of ``body``) and no chained context.
    del body
    raise error


# --- encoding ----------------------------------------------------------------------------
#
# Encoding is strict: it raises ValueError for local misuse (values that do not fit
# their fields, even context IDs, ...). Text is encoded as Latin-1, a superset of the
# ISO 646 repertoire, so that whatever decode() returned can be sent back unchanged.


def _encode_text(value: str, what: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} is not ISO 646 / Latin-1 text") from None


def _encode_ae_title(value: str, what: str) -> bytes:
    raw = _encode_text(value, what)
    if len(raw) > _AE_TITLE_LENGTH:
        raise ValueError(f"{what} {value!r} is longer than 16 characters")
    return raw.ljust(_AE_TITLE_LENGTH, b" ")


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > _MAX_ITEM_LENGTH:
        raise ValueError(f"item 0x{item_type:02X}: {len(value)} bytes do not fit in an item")
    return _ITEM_HEADER.pack(item_type, len(value)) + value


def _prefix(value: bytes, what: str) -> bytes:
    if len(value) > _MAX_ITEM_LENGTH:
        raise ValueError(f"{what}: {len(value)} bytes do not fit a 2-byte length")
    return _U16.pack(len(value)) + value


def _check_context_id(context_id: int, what: str) -> None:
    if not (1 <= context_id <= 255 and context_id & 1):
        raise ValueError(f"{what}: presentation context ID {context_id} is not odd in 1..255")


def _encode_context_rq(context: PresentationContextRQ) -> bytes:
    _check_context_id(context.id, "presentation context (RQ)")
    if not context.transfer_syntaxes:
        raise ValueError(f"presentation context {context.id} proposes no transfer syntax")
    parts = [
        _CONTEXT_FIXED.pack(context.id, 0),
        _item(_ABSTRACT_SYNTAX, _encode_text(context.abstract_syntax, "abstract syntax")),
    ]
    for uid in context.transfer_syntaxes:
        parts.append(_item(_TRANSFER_SYNTAX, _encode_text(uid, "transfer syntax")))
    return _item(_PRESENTATION_CONTEXT_RQ, b"".join(parts))


def _encode_context_ac(context: PresentationContextAC) -> bytes:
    _check_context_id(context.id, "presentation context (AC)")
    # The transfer syntax sub-item is always sent, empty if need be (PS3.8 9.3.3.2).
    transfer_syntax = _encode_text(context.transfer_syntax, "transfer syntax")
    return _item(
        _PRESENTATION_CONTEXT_AC,
        _CONTEXT_FIXED.pack(context.id, context.result) + _item(_TRANSFER_SYNTAX, transfer_syntax),
    )


def _encode_user_information(info: UserInformation) -> bytes:
    """Sub-items in increasing item-type order, then the unknown ones as given."""
    parts: list[bytes] = []
    if info.max_length is not None:
        parts.append(_item(_MAXIMUM_LENGTH, _U32.pack(info.max_length)))
    if info.implementation_class_uid is not None:
        uid = _encode_text(info.implementation_class_uid, "implementation class UID")
        parts.append(_item(_IMPLEMENTATION_CLASS_UID, uid))
    if info.async_ops is not None:
        window = _TWO_U16.pack(info.async_ops.invoked, info.async_ops.performed)
        parts.append(_item(_ASYNC_OPS_WINDOW, window))
    for role in info.roles:
        uid = _prefix(_encode_text(role.sop_class_uid, "role SOP class UID"), "role UID")
        flags = _TWO_U8.pack(bool(role.scu_role), bool(role.scp_role))
        parts.append(_item(_ROLE_SELECTION, uid + flags))
    if info.implementation_version_name is not None:
        name = _encode_text(info.implementation_version_name, "implementation version name")
        if not 1 <= len(name) <= _MAX_VERSION_NAME_LENGTH:
            raise ValueError(
                f"implementation version name {info.implementation_version_name!r} "
                "must be 1 to 16 characters"
            )
        parts.append(_item(_IMPLEMENTATION_VERSION_NAME, name))
    for ext in info.sop_class_extended:
        uid = _prefix(_encode_text(ext.sop_class_uid, "SOP class UID"), "SOP class UID")
        parts.append(_item(_SOP_CLASS_EXTENDED, uid + bytes(ext.info)))
    for common in info.sop_class_common_extended:
        related = b"".join(
            _prefix(_encode_text(uid, "related general SOP class UID"), "related UID")
            for uid in common.related_general_sop_classes
        )
        value = (
            _prefix(_encode_text(common.sop_class_uid, "SOP class UID"), "SOP class UID")
            + _prefix(_encode_text(common.service_class_uid, "service class UID"), "UID")
            + _prefix(related, "related general SOP class identification")
        )
        # The header's second byte is the sub-item-version, 0 (PS3.7 Table D.3-12).
        parts.append(_item(_SOP_CLASS_COMMON_EXTENDED, value))
    if info.user_identity_rq is not None:
        identity = info.user_identity_rq
        value = (
            _TWO_U8.pack(identity.type, bool(identity.positive_response_requested))
            + _prefix(bytes(identity.primary), "user identity primary field")
            + _prefix(bytes(identity.secondary), "user identity secondary field")
        )
        parts.append(_item(_USER_IDENTITY_RQ, value))
    if info.user_identity_ac is not None:
        response = _prefix(bytes(info.user_identity_ac.server_response), "server response")
        parts.append(_item(_USER_IDENTITY_AC, response))
    for item_type, value in info.unknown:
        if item_type in _USER_INFO_SUB_ITEM_TYPES:
            raise ValueError(f"unknown sub-item 0x{item_type:02X} is a known type")
        parts.append(_item(item_type, bytes(value)))
    return _item(_USER_INFORMATION, b"".join(parts))


def _encode_associate(pdu: AssociateRQ | AssociateAC) -> list[bytes]:
    parts = [
        b"",  # the PDU header, filled in by encode()
        _ASSOCIATE_FIXED.pack(
            pdu.protocol_version,
            _encode_ae_title(pdu.called_ae, "called AE title"),
            _encode_ae_title(pdu.calling_ae, "calling AE title"),
        ),
        _item(
            _APPLICATION_CONTEXT,
            _encode_text(pdu.application_context, "application context name"),
        ),
    ]
    if isinstance(pdu, AssociateRQ):
        parts.extend(_encode_context_rq(context) for context in pdu.contexts)
    else:
        parts.extend(_encode_context_ac(context) for context in pdu.contexts)
    parts.append(_encode_user_information(pdu.user_info))
    return parts


def _encode_associate_rj(pdu: AssociateRJ) -> list[bytes]:
    return [b"", _REJECT.pack(pdu.result, pdu.source, pdu.reason)]


def _encode_p_data_tf(pdu: PDataTF) -> list[bytes]:
    if not pdu.pdvs:
        raise ValueError("a P-DATA-TF carries one or more presentation data values")
    parts = [b""]
    for pdv in pdu.pdvs:
        _check_context_id(pdv.context_id, "PDV")
        parts.append(_PDV_HEADER.pack(len(pdv.data) + 2, pdv.context_id, pdv.control))
        parts.append(pdv.data)
    return parts


def _encode_release(pdu: ReleaseRQ | ReleaseRP) -> list[bytes]:
    return [b"", _RELEASE_BODY]


def _encode_abort(pdu: Abort) -> list[bytes]:
    return [b"", _ABORT.pack(pdu.source, pdu.reason)]


_ENCODERS: dict[type, Callable[[Any], list[bytes]]] = {
    AssociateRQ: _encode_associate,
    AssociateAC: _encode_associate,
    AssociateRJ: _encode_associate_rj,
    PDataTF: _encode_p_data_tf,
    ReleaseRQ: _encode_release,
    ReleaseRP: _encode_release,
    Abort: _encode_abort,
}


def encode(pdu: PDU) -> bytes:
    """Encode ``pdu`` to its complete wire form, header included.

    Raises ValueError when a value does not fit its field or breaks a rule of the
    standard this side must keep (AE title over 16 characters, even context ID, ...).
    """
    kind = type(pdu)
    if kind is AssociateAC:
        # The same answer object again (acse.NegotiationCache gives one per distinct
        # request): its encoding too. Keyed by identity; the entry keeps it alive.
        known = _AC_MEMO.get(id(pdu))
        if known is not None and known[0] is pdu:
            return known[1]
    encoder = _ENCODERS.get(kind)
    if encoder is None:
        raise TypeError(f"not a PDU: {pdu!r}")
    try:
        parts = encoder(pdu)
        # parts[0] is the header's place: one copy of every fragment, in join().
        parts[0] = _PDU_HEADER.pack(pdu.pdu_type, sum(map(len, parts)))
    except struct.error as exc:
        raise ValueError(f"{type(pdu).__name__}: a value does not fit its field ({exc})") from None
    raw = b"".join(parts)
    if kind is AssociateAC:
        if len(_AC_MEMO) >= _AC_MEMO_ENTRIES:
            del _AC_MEMO[next(iter(_AC_MEMO))]  # the oldest
        _AC_MEMO[id(pdu)] = (pdu, raw)  # type: ignore[assignment]
    return raw


#: Encoded A-ASSOCIATE-ACs by id() of the object (see encode()).
_AC_MEMO: dict[int, tuple[AssociateAC, bytes]] = {}
_AC_MEMO_ENTRIES = 64
