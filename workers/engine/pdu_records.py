"""Upper Layer PDUs and their items as records (PS3.8 section 9.3, Annex 9; PS3.7
Annex D.3.3): the wire codes, one frozen dataclass per PDU and item, and the byte
layouts that :mod:`workers.engine.pdu_decode` and :mod:`workers.engine.pdu_encode`
share. Import them from :mod:`workers.engine.pdu`, which gathers the codec too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from struct import Struct

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


def _value_hash(pdu: AssociateRQ | AssociateAC) -> int:
    """The hash of an A-ASSOCIATE-RQ/AC's value, computed once: the set-up caches
    (the decoder's memo, acse.NegotiationCache, the encoder's memo) key by value, and a
    request of a hundred contexts takes tens of microseconds to hash. Frozen, so the
    value never changes; ``_hash`` is not part of it (0: not computed yet)."""
    h = pdu._hash
    if not h:
        h = hash(
            (
                pdu.called_ae,
                pdu.calling_ae,
                pdu.contexts,
                pdu.user_info,
                pdu.application_context,
                pdu.protocol_version,
            )
        )
        h = h or 1
        object.__setattr__(pdu, "_hash", h)
    return h


@dataclass(slots=True, frozen=True)
class AssociateRQ:
    """A-ASSOCIATE-RQ PDU (PS3.8 9.3.2). AE titles are kept without padding."""

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextRQ, ...]
    user_info: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT_NAME
    protocol_version: int = 1
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    pdu_type = PDUType.ASSOCIATE_RQ

    def __hash__(self) -> int:
        return _value_hash(self)


@dataclass(slots=True, frozen=True)
class AssociateAC:
    """A-ASSOCIATE-AC PDU (PS3.8 9.3.3). Called/calling AE echo the request."""

    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextAC, ...]
    user_info: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT_NAME
    protocol_version: int = 1
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    pdu_type = PDUType.ASSOCIATE_AC

    def __hash__(self) -> int:
        return _value_hash(self)


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


# --- layouts shared by the decoder and the encoder ------------------------------
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
