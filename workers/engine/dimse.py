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

The module has four parts:

* the codec, :func:`encode_command` / :func:`decode_command`, driven by one table of
  the group-0000 elements (``_ELEMENTS``). Decoding is one pass of
  ``struct.unpack_from`` and raises :class:`DIMSEError` only for what makes the bytes
  unreadable (truncation, overrun, a tag outside group 0000, a bad US/UL/AT length, a
  duplicate, a missing or unknown Command Field, a missing Command Data Set Type);
* :func:`validate_command`, the PS3.7 "which elements must be present" rules per
  command field, kept apart so a receiver can answer a semantically broken request
  with a failure status instead of an abort;
* statuses (PS3.7 Annex C): :class:`Status` and :func:`status_category`; constructors
  for common requests and :func:`response_for`;
* P-DATA-TF fragmentation (PS3.8 9.3.5, Annex E): :func:`iter_fragments`,
  :func:`fragment_message` and :func:`pdata_header`. One PDV per PDU, so a PDU is a
  12-byte header plus one contiguous payload and can go out in one write.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from operator import attrgetter
from typing import Any, Protocol

__all__ = [
    "CONTROL_COMMAND",
    "CONTROL_LAST",
    "DATASET_PRESENT",
    "MAX_PDU_CAP",
    "NO_DATASET",
    "VERIFICATION_SOP_CLASS",
    "Command",
    "CommandField",
    "DIMSEError",
    "Priority",
    "Readable",
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
    "encode_command",
    "fragment_message",
    "iter_fragments",
    "max_fragment_length",
    "n_action_rq",
    "n_create_rq",
    "n_delete_rq",
    "n_event_report_rq",
    "n_get_rq",
    "n_set_rq",
    "pdata_header",
    "response_for",
    "status_category",
    "validate_command",
]

#: CommandDataSetType value meaning "no data set follows" (PS3.7 E.1-1).
NO_DATASET = 0x0101
#: CommandDataSetType value this codec sends when a data set follows.
DATASET_PRESENT = 0x0000

#: Verification SOP Class (PS3.4 A.4), the abstract syntax of C-ECHO.
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


class CommandField(IntEnum):
    """(0000,0100) Command Field values (PS3.7 E.1-1)."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF

    @property
    def label(self) -> str:
        """The name PS3.7 uses, e.g. ``C-STORE-RQ``."""
        return self.name.replace("_", "-")


class Priority(IntEnum):
    """(0000,0700) Priority."""

    MEDIUM = 0x0000
    HIGH = 0x0001
    LOW = 0x0002


class DIMSEError(ValueError):
    """A command set that cannot be decoded, or lacks what its command field requires."""


@dataclass(slots=True)
class Command:
    """One DIMSE command set. ``None`` means the element is absent."""

    CommandField: int
    MessageID: int | None = None
    MessageIDBeingRespondedTo: int | None = None
    AffectedSOPClassUID: str | None = None
    RequestedSOPClassUID: str | None = None
    AffectedSOPInstanceUID: str | None = None
    RequestedSOPInstanceUID: str | None = None
    MoveDestination: str | None = None
    Priority: int | None = None
    CommandDataSetType: int = NO_DATASET
    Status: int | None = None
    OffendingElement: tuple[int, ...] | None = None
    ErrorComment: str | None = None
    ErrorID: int | None = None
    EventTypeID: int | None = None
    AttributeIdentifierList: tuple[int, ...] | None = None
    ActionTypeID: int | None = None
    NumberOfRemainingSuboperations: int | None = None
    NumberOfCompletedSuboperations: int | None = None
    NumberOfFailedSuboperations: int | None = None
    NumberOfWarningSuboperations: int | None = None
    MoveOriginatorApplicationEntityTitle: str | None = None
    MoveOriginatorMessageID: int | None = None
    #: group-0000 elements this codec does not know: tag -> raw value, kept in order
    extra: dict[int, bytes] = field(default_factory=dict)

    @property
    def command_set(self) -> Any:
        """The command set as a pydicom Dataset, built on demand: pynetdicom's
        ``message.command_set``, for handlers of EVT_DIMSE_RECV/SENT written for it."""
        from io import BytesIO

        from pydicom.filereader import read_dataset

        return read_dataset(
            BytesIO(encode_command(self)), is_implicit_VR=True, is_little_endian=True
        )

    @property
    def has_dataset(self) -> bool:
        """True when a data set follows this command set."""
        return self.CommandDataSetType != NO_DATASET

    @property
    def is_request(self) -> bool:
        return not self.CommandField & 0x8000


# --------------------------------------------------------------------------------------
# Statuses (PS3.7 Annex C, service-specific codes from PS3.4)
# --------------------------------------------------------------------------------------


class Status(IntEnum):
    """Common (0000,0900) Status values.

    General codes are PS3.7 C.4 and C.5; 0x0001 and the 0xA7xx/0xA9xx/0xBxxx/0xCxxx ones
    are the service-class codes of PS3.4 (C-STORE B.2.3, C-FIND/GET/MOVE C.4). The 0xC0xx-0xC5xx
    "handler" codes are the ones pynetdicom answers with when a user handler fails, kept
    identical so peers and logs see the same numbers.
    """

    SUCCESS = 0x0000
    # --- warning
    OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001
    ATTRIBUTE_LIST_ERROR = 0x0107
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    # --- failure, general (PS3.7 C.5)
    NO_SUCH_ATTRIBUTE = 0x0105
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112
    NO_SUCH_EVENT_TYPE = 0x0113
    NO_SUCH_ARGUMENT = 0x0114
    INVALID_ARGUMENT_VALUE = 0x0115
    INVALID_OBJECT_INSTANCE = 0x0117
    NO_SUCH_SOP_CLASS = 0x0118
    CLASS_INSTANCE_CONFLICT = 0x0119
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NO_SUCH_ACTION = 0x0123
    NOT_AUTHORIZED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    RESOURCE_LIMITATION = 0x0213
    # --- failure, service specific (PS3.4)
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_NUMBER_OF_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    # --- failure, handler problems (pynetdicom's numbers)
    HANDLER_STATUS_MISSING = 0xC001
    HANDLER_STATUS_INVALID = 0xC002
    STORE_DECODE_FAILED = 0xC210
    STORE_HANDLER_FAILED = 0xC211
    FIND_DECODE_FAILED = 0xC310
    FIND_HANDLER_FAILED = 0xC311
    GET_DECODE_FAILED = 0xC410
    GET_HANDLER_FAILED = 0xC411
    MOVE_DECODE_FAILED = 0xC510
    MOVE_HANDLER_FAILED = 0xC511
    # --- cancel, pending
    CANCEL = 0xFE00
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01


SUCCESS = "Success"
WARNING = "Warning"
FAILURE = "Failure"
CANCEL = "Cancel"
PENDING = "Pending"

# Warnings in the otherwise-failure 00xx/01xx range: the general ones of PS3.7 C.4
# (0107H, 0116H) and PS3.4's "requested optional attributes not supported" (0001H).
_WARNINGS_01XX = frozenset({0x0001, 0x0107, 0x0116})


def status_category(status: int) -> str:
    """The PS3.7 Annex C class of ``status``: Success, Warning, Failure, Cancel or Pending.

    0x0000 success; 0xFF00/0xFF01 pending; 0xFE00 cancel; 0x0001, 0x0107, 0x0116 and
    0xB000-0xBFFF warning; 0x01xx, 0x02xx, 0xA000-0xAFFF and 0xC000-0xCFFF failure.
    A code outside every range (pynetdicom calls it "Unknown") is reported as
    ``Failure``: an operation whose outcome cannot be understood did not succeed, and a
    caller deciding "retry / give up / count as stored" must not count it as stored.
    """
    if status == 0x0000:
        return SUCCESS
    high = status >> 12
    if high == 0xF:
        if status in (0xFF00, 0xFF01):
            return PENDING
        if status == 0xFE00:
            return CANCEL
        return FAILURE
    if high == 0xB or status in _WARNINGS_01XX:
        return WARNING
    return FAILURE


# --------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------

# Value kinds: how an element's value is encoded (PS3.5 6.2 VRs).
_UL = 0  # only (0000,0000) Command Group Length
_US = 1
_UI = 2  # padded with NUL to even length
_AE = 3  # padded with space; leading and trailing spaces insignificant
_LO = 4  # padded with space
_AT = 5  # list of (group, element) pairs
_CDST = 6  # Command Data Set Type: US, normalised to 0x0000 / 0x0101 on encode

#: The group-0000 elements of PS3.7 E.1-1 that Command carries, in ascending tag order.
_ELEMENTS: tuple[tuple[int, str, int], ...] = (
    (0x0002, "AffectedSOPClassUID", _UI),
    (0x0003, "RequestedSOPClassUID", _UI),
    (0x0100, "CommandField", _US),
    (0x0110, "MessageID", _US),
    (0x0120, "MessageIDBeingRespondedTo", _US),
    (0x0600, "MoveDestination", _AE),
    (0x0700, "Priority", _US),
    (0x0800, "CommandDataSetType", _CDST),
    (0x0900, "Status", _US),
    (0x0901, "OffendingElement", _AT),
    (0x0902, "ErrorComment", _LO),
    (0x0903, "ErrorID", _US),
    (0x1000, "AffectedSOPInstanceUID", _UI),
    (0x1001, "RequestedSOPInstanceUID", _UI),
    (0x1002, "EventTypeID", _US),
    (0x1005, "AttributeIdentifierList", _AT),
    (0x1008, "ActionTypeID", _US),
    (0x1020, "NumberOfRemainingSuboperations", _US),
    (0x1021, "NumberOfCompletedSuboperations", _US),
    (0x1022, "NumberOfFailedSuboperations", _US),
    (0x1023, "NumberOfWarningSuboperations", _US),
    (0x1030, "MoveOriginatorApplicationEntityTitle", _AE),
    (0x1031, "MoveOriginatorMessageID", _US),
)

_TAG_OF: dict[str, int] = {name: elem for elem, name, _ in _ELEMENTS}

_HEADER = struct.Struct("<HHI")  # group, element, value length
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_AT_PAIR = struct.Struct("<HH")
_GROUP_LENGTH = struct.Struct("<HHII")  # (0000,0000) UL with its value

# Encoding table: (name, kind, bytes of the tag, or of tag + length 2 for US).
_ENCODE_TABLE: tuple[tuple[str, int, bytes], ...] = tuple(
    (
        name,
        kind,
        _HEADER.pack(0, elem, 2) if kind in (_US, _CDST) else _AT_PAIR.pack(0, elem),
    )
    for elem, name, kind in _ELEMENTS
)
_GET_VALUES = attrgetter(*(name for _, name, _ in _ELEMENTS))
_CDST_NONE = _HEADER.pack(0, 0x0800, 2) + _U16.pack(NO_DATASET)
_CDST_PRESENT = _HEADER.pack(0, 0x0800, 2) + _U16.pack(DATASET_PRESENT)

# Decoding table: element -> (name, kind); (0000,0000) is checked and ignored.
_DECODE_TABLE: dict[int, tuple[str, int]] = {
    elem: (name, _US if kind == _CDST else kind) for elem, name, kind in _ELEMENTS
}
_DECODE_TABLE[0x0000] = ("CommandGroupLength", _UL)
_COMMAND_FIELDS: dict[int, CommandField] = {int(cf): cf for cf in CommandField}


# What encoding a value of the wrong type or range raises.
_ENCODE_ERRORS = (struct.error, UnicodeError, TypeError, AttributeError, OverflowError)


def _encode_value(kind: int, value: object) -> bytes:
    """The value field of one element (padded to even length), without its header."""
    if kind in (_US, _CDST):
        return _U16.pack(value)
    # Strings are ASCII; a peer's stray byte (decoded as U+FFFD) echoed in a response
    # becomes "?" rather than leaving the request unanswered.
    if kind == _UI:
        raw = value.encode("ascii", "replace")  # type: ignore[attr-defined]
        return raw + b"\x00" if len(raw) & 1 else raw
    if kind in (_AE, _LO):
        raw = value.encode("ascii", "replace")  # type: ignore[attr-defined]
        return raw + b" " if len(raw) & 1 else raw
    if kind == _AT:
        return b"".join(_AT_PAIR.pack(tag >> 16, tag & 0xFFFF) for tag in value)  # type: ignore[attr-defined]
    raise AssertionError(kind)  # pragma: no cover


def encode_command(cmd: Command) -> bytes:
    """Encode ``cmd`` as an Implicit VR Little Endian group 0000 with group length.

    Elements whose attribute is ``None`` are left out; (0000,0800) is always sent, as
    0x0101 when no data set follows and 0x0000 otherwise. ``cmd.extra`` elements are
    merged in tag order. Raises :class:`DIMSEError` for a value that cannot be encoded
    (a US outside 0..65535, a non-ASCII string, an ``extra`` tag that collides).
    """
    if cmd.extra:
        return _encode_with_extra(cmd)
    parts: list[bytes] = []
    append = parts.append
    try:
        for (_, kind, tag), value in zip(_ENCODE_TABLE, _GET_VALUES(cmd), strict=True):
            if value is None:
                continue
            if kind == _US:
                append(tag)
                append(_U16.pack(value))
            elif kind == _CDST:
                append(_CDST_NONE if value == NO_DATASET else _CDST_PRESENT)
            else:
                raw = _encode_value(kind, value)
                append(tag)
                append(_U32.pack(len(raw)))
                append(raw)
    except _ENCODE_ERRORS:
        # the slow path encodes element by element and names the culprit
        _encode_with_extra(cmd)
        raise  # pragma: no cover - the slow path fails on the same value
    body = b"".join(parts)
    return _GROUP_LENGTH.pack(0, 0, 4, len(body)) + body


# C-STORE-RSP (PS3.7 9.3.1.2) as encode_command(response_for(rq, status)) makes it:
# (0000,0002) UI, then CommandField 0x8001, MessageIDBeingRespondedTo,
# CommandDataSetType 0x0101 and Status (four US elements, one struct), then
# (0000,1000) UI. Built directly because it is sent once per stored instance.
_UI_0002 = _AT_PAIR.pack(0, 0x0002)
_UI_1000 = _AT_PAIR.pack(0, 0x1000)
_STORE_RSP_US = struct.Struct("<HHIHHHIHHHIHHHIH")
_UI_CACHE: dict[str, bytes] = {}  # SOP Class UID -> its encoded element, few distinct


def _ui_element(tag: bytes, value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    if len(raw) & 1:
        raw += b"\x00"
    return tag + _U32.pack(len(raw)) + raw


def encode_c_store_rsp(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The C-STORE-RSP to a request with these values, without an ErrorComment:
    byte for byte what ``encode_command(response_for(rq, status))`` gives for it.
    Raises :class:`DIMSEError` for a message ID or status outside 0..65535."""
    cls = _UI_CACHE.get(sop_class_uid)
    if cls is None:
        cls = _ui_element(_UI_0002, sop_class_uid)
        if len(_UI_CACHE) < 256:
            _UI_CACHE[sop_class_uid] = cls
    try:
        mid = _STORE_RSP_US.pack(
            0, 0x0100, 2, CommandField.C_STORE_RSP,
            0, 0x0120, 2, message_id,
            0, 0x0800, 2, NO_DATASET,
            0, 0x0900, 2, status,
        )  # fmt: skip
    except struct.error as exc:
        raise DIMSEError(f"cannot encode C-STORE-RSP: {exc}") from None
    inst = _ui_element(_UI_1000, sop_instance_uid)
    return _GROUP_LENGTH.pack(0, 0, 4, len(cls) + len(mid) + len(inst)) + cls + mid + inst


def _encode_with_extra(cmd: Command) -> bytes:
    """The slow path of :func:`encode_command`: known and ``extra`` elements merged."""
    elements: list[tuple[int, bytes]] = []
    for (elem, name, kind), value in zip(_ELEMENTS, _GET_VALUES(cmd), strict=True):
        if value is None:
            continue
        if kind == _CDST:
            value = NO_DATASET if value == NO_DATASET else DATASET_PRESENT
        try:
            elements.append((elem, _encode_value(kind, value)))
        except _ENCODE_ERRORS as exc:
            raise DIMSEError(f"cannot encode {name}: {exc}") from None
    for tag, raw in cmd.extra.items():
        if not 0 < tag <= 0xFFFF or tag in _DECODE_TABLE:
            raise DIMSEError(f"extra tag {tag:#010x} is not a free group-0000 element")
        elements.append((tag, bytes(raw)))
    elements.sort(key=lambda item: item[0])
    body = b"".join(_HEADER.pack(0, elem, len(raw)) + raw for elem, raw in elements)
    return _GROUP_LENGTH.pack(0, 0, 4, len(body)) + body


def decode_command(data: bytes | memoryview) -> Command:
    """Decode a complete command set; raises :class:`DIMSEError` when malformed.

    Strings lose their trailing NUL/space padding (and AE titles their leading
    spaces, PS3.5 6.2). A zero-length US or AT element counts as absent. Elements
    of group 0000 this codec does not know land in ``Command.extra``.
    """
    if type(data) is not bytes:
        data = bytes(data)
    end = len(data)
    offset = 0
    values: dict[str, object] = {}
    extra: dict[int, bytes] | None = None
    unpack = _HEADER.unpack_from
    lookup = _DECODE_TABLE.get
    while offset < end:
        if end - offset < 8:
            raise DIMSEError(f"truncated element header at offset {offset}")
        group, elem, length = unpack(data, offset)
        start = offset + 8
        offset = start + length
        if offset > end:
            raise DIMSEError(
                f"({group:04X},{elem:04X}) value length {length} overruns the command set"
                f" ({end - start} bytes left)"
            )
        if group:
            raise DIMSEError(f"({group:04X},{elem:04X}) is not a command element (group 0000)")
        spec = lookup(elem)
        if spec is None:
            if extra is None:
                extra = {}
            elif elem in extra:
                raise DIMSEError(f"(0000,{elem:04X}) appears twice")
            extra[elem] = data[start:offset]
            continue
        name, kind = spec
        if name in values:
            raise DIMSEError(f"(0000,{elem:04X}) {name} appears twice")
        if kind == _US:
            if length == 2:
                values[name] = data[start] | data[start + 1] << 8
            elif length:
                raise DIMSEError(f"(0000,{elem:04X}) {name} is US but {length} bytes long")
        elif kind == _UI:
            values[name] = data[start:offset].decode("ascii", "replace").rstrip("\x00 ")
        elif kind == _AE:
            values[name] = data[start:offset].decode("ascii", "replace").strip("\x00 ")
        elif kind == _LO:
            values[name] = data[start:offset].decode("ascii", "replace").rstrip("\x00 ")
        elif kind == _AT:
            if length & 3:
                raise DIMSEError(f"(0000,{elem:04X}) {name} is AT but {length} bytes long")
            if length:
                values[name] = tuple(
                    group << 16 | element
                    for group, element in _AT_PAIR.iter_unpack(data[start:offset])
                )
        elif length != 4:  # _UL: the group length
            raise DIMSEError(f"(0000,0000) CommandGroupLength is UL but {length} bytes long")
        # The group length's value is deliberately not checked against what follows.
        # PS3.7 E.1 makes it mandatory, but the P-DATA framing (the "last fragment" bit
        # of the command PDVs) already delimits the command set, so the value tells us
        # nothing; old and sloppy senders omit it or count it wrongly, and refusing
        # them would buy no safety, only interoperability failures.
    command_field = values.get("CommandField")
    if command_field is None:
        raise DIMSEError("no (0000,0100) CommandField")
    known = _COMMAND_FIELDS.get(command_field)  # type: ignore[call-overload]
    if known is None:
        raise DIMSEError(f"unknown CommandField {command_field:#06x}")
    values["CommandField"] = known
    # Structural, not semantic: without it the receiver cannot tell whether data-set
    # fragments are to follow, i.e. where this message ends.
    if "CommandDataSetType" not in values:
        raise DIMSEError("no (0000,0800) CommandDataSetType")
    if extra is not None:
        values["extra"] = extra
    return Command(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Semantic checks (PS3.7 9.3 and 10.3 command tables)
# --------------------------------------------------------------------------------------

# What a data set may do per command field: required, forbidden or optional.
_DS_REQUIRED = "required"
_DS_FORBIDDEN = "forbidden"
_DS_OPTIONAL = "optional"

_RSP_REQUIRED = ("MessageIDBeingRespondedTo", "Status")

#: command field -> (elements that shall be present, data set rule). Elements marked
#: M in the PS3.7 tables; U and C elements are the service user's business.
_RULES: dict[int, tuple[tuple[str, ...], str]] = {
    # PS3.7 9.3.1 C-STORE
    CommandField.C_STORE_RQ: (
        ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority"),
        _DS_REQUIRED,
    ),
    CommandField.C_STORE_RSP: (_RSP_REQUIRED, _DS_FORBIDDEN),
    # PS3.7 9.3.2 C-FIND: the identifier comes with pending responses only
    CommandField.C_FIND_RQ: (("MessageID", "AffectedSOPClassUID", "Priority"), _DS_REQUIRED),
    CommandField.C_FIND_RSP: (_RSP_REQUIRED, _DS_OPTIONAL),
    # PS3.7 9.3.3 C-GET, 9.3.4 C-MOVE: identifier in the response is U (failed UIDs)
    CommandField.C_GET_RQ: (("MessageID", "AffectedSOPClassUID", "Priority"), _DS_REQUIRED),
    CommandField.C_GET_RSP: (_RSP_REQUIRED, _DS_OPTIONAL),
    CommandField.C_MOVE_RQ: (
        ("MessageID", "AffectedSOPClassUID", "Priority", "MoveDestination"),
        _DS_REQUIRED,
    ),
    CommandField.C_MOVE_RSP: (_RSP_REQUIRED, _DS_OPTIONAL),
    # PS3.7 9.3.5 C-ECHO
    CommandField.C_ECHO_RQ: (("MessageID", "AffectedSOPClassUID"), _DS_FORBIDDEN),
    CommandField.C_ECHO_RSP: (_RSP_REQUIRED, _DS_FORBIDDEN),
    # PS3.7 9.3.2.3 C-CANCEL
    CommandField.C_CANCEL_RQ: (("MessageIDBeingRespondedTo",), _DS_FORBIDDEN),
    # PS3.7 10.3.1 N-EVENT-REPORT: event information / reply are U
    CommandField.N_EVENT_REPORT_RQ: (
        ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "EventTypeID"),
        _DS_OPTIONAL,
    ),
    CommandField.N_EVENT_REPORT_RSP: (_RSP_REQUIRED, _DS_OPTIONAL),
    # PS3.7 10.3.2 N-GET: attribute list comes back in the response (C)
    CommandField.N_GET_RQ: (
        ("MessageID", "RequestedSOPClassUID", "RequestedSOPInstanceUID"),
        _DS_FORBIDDEN,
    ),
    CommandField.N_GET_RSP: (_RSP_REQUIRED, _DS_OPTIONAL),
    # PS3.7 10.3.3 N-SET: the modification list is M
    CommandField.N_SET_RQ: (
        ("MessageID", "RequestedSOPClassUID", "RequestedSOPInstanceUID"),
        _DS_REQUIRED,
    ),
    CommandField.N_SET_RSP: (_RSP_REQUIRED, _DS_OPTIONAL),
    # PS3.7 10.3.4 N-ACTION: action information / reply are U
    CommandField.N_ACTION_RQ: (
        ("MessageID", "RequestedSOPClassUID", "RequestedSOPInstanceUID", "ActionTypeID"),
        _DS_OPTIONAL,
    ),
    CommandField.N_ACTION_RSP: (_RSP_REQUIRED, _DS_OPTIONAL),
    # PS3.7 10.3.5 N-CREATE: the instance UID may be left to the SCP
    CommandField.N_CREATE_RQ: (("MessageID", "AffectedSOPClassUID"), _DS_OPTIONAL),
    CommandField.N_CREATE_RSP: (_RSP_REQUIRED, _DS_OPTIONAL),
    # PS3.7 10.3.6 N-DELETE
    CommandField.N_DELETE_RQ: (
        ("MessageID", "RequestedSOPClassUID", "RequestedSOPInstanceUID"),
        _DS_FORBIDDEN,
    ),
    CommandField.N_DELETE_RSP: (_RSP_REQUIRED, _DS_FORBIDDEN),
}

# Maximum value lengths (PS3.5 Table 6.2-1); the UID syntax itself is not checked:
# real-world senders break it and the service layer is the better judge.
_MAX_LENGTH: tuple[tuple[str, int], ...] = (
    ("AffectedSOPClassUID", 64),
    ("RequestedSOPClassUID", 64),
    ("AffectedSOPInstanceUID", 64),
    ("RequestedSOPInstanceUID", 64),
    ("MoveDestination", 16),
    ("MoveOriginatorApplicationEntityTitle", 16),
    ("ErrorComment", 64),
)
_NON_EMPTY = frozenset(
    {
        "AffectedSOPClassUID",
        "RequestedSOPClassUID",
        "AffectedSOPInstanceUID",
        "RequestedSOPInstanceUID",
        "MoveDestination",
    }
)


def _label(command_field: int) -> str:
    cf = _COMMAND_FIELDS.get(command_field)
    return cf.label if cf is not None else f"command {command_field:#06x}"


def validate_command(cmd: Command) -> str | None:
    """Check ``cmd`` against the PS3.7 table of its command field.

    Returns a human-readable description of the first problem found, or ``None``
    when the command set carries everything its command field requires: the
    mandatory elements, non-empty UIDs and AE titles within their length limits, a
    known Priority, and a data set exactly when one is required or allowed.
    """
    rule = _RULES.get(cmd.CommandField)
    if rule is None:
        return f"unknown CommandField {cmd.CommandField:#06x}"
    required, dataset_rule = rule
    # Runs for every request: the label is only made when there is a problem to name.
    for name in required:
        value = getattr(cmd, name)
        if value is None:
            return f"{_label(cmd.CommandField)} lacks (0000,{_TAG_OF[name]:04X}) {name}"
        if not value and name in _NON_EMPTY:
            return f"{_label(cmd.CommandField)} has an empty (0000,{_TAG_OF[name]:04X}) {name}"
    for name, limit in _MAX_LENGTH:
        value = getattr(cmd, name)
        if value is not None and len(value) > limit:
            return (
                f"{_label(cmd.CommandField)}: {name} is {len(value)} characters long"
                f" (at most {limit})"
            )
    if cmd.Priority is not None and cmd.Priority not in (0, 1, 2):
        return (
            f"{_label(cmd.CommandField)}: Priority {cmd.Priority:#06x} is not LOW, MEDIUM or HIGH"
        )
    has_dataset = cmd.CommandDataSetType != NO_DATASET
    if dataset_rule == _DS_REQUIRED and not has_dataset:
        return f"{_label(cmd.CommandField)} needs a data set but CommandDataSetType is 0x0101"
    if dataset_rule == _DS_FORBIDDEN and has_dataset:
        return (
            f"{_label(cmd.CommandField)} has no data set but CommandDataSetType is"
            f" {cmd.CommandDataSetType:#06x}"
        )
    return None


# --------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------

# request command field -> response element <- request element to copy (PS3.7 9.3 and
# 10.3: "shall be equal to" the request's value where the response carries it).
_ECHOED: dict[int, tuple[tuple[str, str], ...]] = {
    CommandField.C_STORE_RQ: (
        ("AffectedSOPClassUID", "AffectedSOPClassUID"),
        ("AffectedSOPInstanceUID", "AffectedSOPInstanceUID"),
    ),
    CommandField.C_FIND_RQ: (("AffectedSOPClassUID", "AffectedSOPClassUID"),),
    CommandField.C_GET_RQ: (("AffectedSOPClassUID", "AffectedSOPClassUID"),),
    CommandField.C_MOVE_RQ: (("AffectedSOPClassUID", "AffectedSOPClassUID"),),
    CommandField.C_ECHO_RQ: (("AffectedSOPClassUID", "AffectedSOPClassUID"),),
    CommandField.N_EVENT_REPORT_RQ: (
        ("AffectedSOPClassUID", "AffectedSOPClassUID"),
        ("AffectedSOPInstanceUID", "AffectedSOPInstanceUID"),
        ("EventTypeID", "EventTypeID"),
    ),
    CommandField.N_GET_RQ: (
        ("AffectedSOPClassUID", "RequestedSOPClassUID"),
        ("AffectedSOPInstanceUID", "RequestedSOPInstanceUID"),
    ),
    CommandField.N_SET_RQ: (
        ("AffectedSOPClassUID", "RequestedSOPClassUID"),
        ("AffectedSOPInstanceUID", "RequestedSOPInstanceUID"),
    ),
    CommandField.N_ACTION_RQ: (
        ("AffectedSOPClassUID", "RequestedSOPClassUID"),
        ("AffectedSOPInstanceUID", "RequestedSOPInstanceUID"),
        ("ActionTypeID", "ActionTypeID"),
    ),
    # the SCP may assign the instance UID: pass AffectedSOPInstanceUID= then
    CommandField.N_CREATE_RQ: (
        ("AffectedSOPClassUID", "AffectedSOPClassUID"),
        ("AffectedSOPInstanceUID", "AffectedSOPInstanceUID"),
    ),
    CommandField.N_DELETE_RQ: (
        ("AffectedSOPClassUID", "RequestedSOPClassUID"),
        ("AffectedSOPInstanceUID", "RequestedSOPInstanceUID"),
    ),
}


def response_for(rq: Command, status: int, **fields: object) -> Command:
    """The response to request ``rq`` with ``status``, per PS3.7 9.3 / 10.3.

    Sets CommandField | 0x8000, MessageIDBeingRespondedTo and the elements the
    response echoes (Affected SOP Class/Instance UID, for N-services taken from the
    Requested ones; Event/Action Type ID). ``fields`` are further Command attributes
    and override the echoed ones, e.g. ``CommandDataSetType=DATASET_PRESENT`` for a
    pending C-FIND response or ``ErrorComment="..."``. No data set by default.
    Raises :class:`DIMSEError` when ``rq`` is not a request that has a response
    (C-CANCEL-RQ has none). A request without a MessageID (invalid, PS3.7 9.1) still
    gets its failure response, answering Message ID 0: the peer learns it was refused.
    """
    echoed = _ECHOED.get(rq.CommandField)
    if echoed is None:
        raise DIMSEError(f"{_label(rq.CommandField)} has no response")
    values: dict[str, object] = {
        "CommandField": _COMMAND_FIELDS[rq.CommandField | 0x8000],
        "MessageIDBeingRespondedTo": rq.MessageID if rq.MessageID is not None else 0,
        "Status": status,
    }
    for target, source in echoed:
        value = getattr(rq, source)
        if value is not None:
            values[target] = value
    values.update(fields)
    return Command(**values)  # type: ignore[arg-type]


def c_echo_rq(message_id: int, sop_class_uid: str = VERIFICATION_SOP_CLASS) -> Command:
    """A C-ECHO-RQ (PS3.7 9.3.5.1)."""
    return Command(CommandField.C_ECHO_RQ, MessageID=message_id, AffectedSOPClassUID=sop_class_uid)


def c_echo_rsp(rq: Command, status: int = Status.SUCCESS, **fields: object) -> Command:
    """The C-ECHO-RSP to ``rq`` (PS3.7 9.3.5.2)."""
    if rq.CommandField != CommandField.C_ECHO_RQ:
        raise DIMSEError(f"{_label(rq.CommandField)} is not a C-ECHO-RQ")
    return response_for(rq, status, **fields)


def c_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    priority: int = Priority.MEDIUM,
    move_originator_ae: str | None = None,
    move_originator_message_id: int | None = None,
) -> Command:
    """A C-STORE-RQ (PS3.7 9.3.1.1); a data set follows."""
    return Command(
        CommandField.C_STORE_RQ,
        MessageID=message_id,
        AffectedSOPClassUID=sop_class_uid,
        AffectedSOPInstanceUID=sop_instance_uid,
        Priority=priority,
        CommandDataSetType=DATASET_PRESENT,
        MoveOriginatorApplicationEntityTitle=move_originator_ae,
        MoveOriginatorMessageID=move_originator_message_id,
    )


def c_store_rsp(rq: Command, status: int = Status.SUCCESS, **fields: object) -> Command:
    """The C-STORE-RSP to ``rq`` (PS3.7 9.3.1.2), e.g. with ``ErrorComment=``."""
    if rq.CommandField != CommandField.C_STORE_RQ:
        raise DIMSEError(f"{_label(rq.CommandField)} is not a C-STORE-RQ")
    return response_for(rq, status, **fields)


def c_find_rq(message_id: int, sop_class_uid: str, priority: int = Priority.MEDIUM) -> Command:
    """A C-FIND-RQ (PS3.7 9.3.2.1); the identifier follows."""
    return Command(
        CommandField.C_FIND_RQ,
        MessageID=message_id,
        AffectedSOPClassUID=sop_class_uid,
        Priority=priority,
        CommandDataSetType=DATASET_PRESENT,
    )


def c_get_rq(message_id: int, sop_class_uid: str, priority: int = Priority.MEDIUM) -> Command:
    """A C-GET-RQ (PS3.7 9.3.3.1); the identifier follows."""
    return Command(
        CommandField.C_GET_RQ,
        MessageID=message_id,
        AffectedSOPClassUID=sop_class_uid,
        Priority=priority,
        CommandDataSetType=DATASET_PRESENT,
    )


def c_move_rq(
    message_id: int, sop_class_uid: str, move_destination: str, priority: int = Priority.MEDIUM
) -> Command:
    """A C-MOVE-RQ (PS3.7 9.3.4.1); the identifier follows."""
    return Command(
        CommandField.C_MOVE_RQ,
        MessageID=message_id,
        AffectedSOPClassUID=sop_class_uid,
        MoveDestination=move_destination,
        Priority=priority,
        CommandDataSetType=DATASET_PRESENT,
    )


def c_cancel_rq(message_id_being_responded_to: int) -> Command:
    """A C-CANCEL-RQ (PS3.7 9.3.2.3): only the ID of the operation to cancel."""
    return Command(
        CommandField.C_CANCEL_RQ, MessageIDBeingRespondedTo=message_id_being_responded_to
    )


def _dataset_type(has_dataset: bool) -> int:
    return DATASET_PRESENT if has_dataset else NO_DATASET


def n_event_report_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    event_type_id: int,
    has_dataset: bool = False,
) -> Command:
    """An N-EVENT-REPORT-RQ (PS3.7 10.3.1.1)."""
    return Command(
        CommandField.N_EVENT_REPORT_RQ,
        MessageID=message_id,
        AffectedSOPClassUID=sop_class_uid,
        AffectedSOPInstanceUID=sop_instance_uid,
        EventTypeID=event_type_id,
        CommandDataSetType=_dataset_type(has_dataset),
    )


def n_get_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    attribute_identifier_list: tuple[int, ...] | None = None,
) -> Command:
    """An N-GET-RQ (PS3.7 10.3.2.1); no data set."""
    return Command(
        CommandField.N_GET_RQ,
        MessageID=message_id,
        RequestedSOPClassUID=sop_class_uid,
        RequestedSOPInstanceUID=sop_instance_uid,
        AttributeIdentifierList=attribute_identifier_list,
    )


def n_set_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> Command:
    """An N-SET-RQ (PS3.7 10.3.3.1); the modification list follows."""
    return Command(
        CommandField.N_SET_RQ,
        MessageID=message_id,
        RequestedSOPClassUID=sop_class_uid,
        RequestedSOPInstanceUID=sop_instance_uid,
        CommandDataSetType=DATASET_PRESENT,
    )


def n_action_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    action_type_id: int,
    has_dataset: bool = False,
) -> Command:
    """An N-ACTION-RQ (PS3.7 10.3.4.1)."""
    return Command(
        CommandField.N_ACTION_RQ,
        MessageID=message_id,
        RequestedSOPClassUID=sop_class_uid,
        RequestedSOPInstanceUID=sop_instance_uid,
        ActionTypeID=action_type_id,
        CommandDataSetType=_dataset_type(has_dataset),
    )


def n_create_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str | None = None,
    has_dataset: bool = False,
) -> Command:
    """An N-CREATE-RQ (PS3.7 10.3.5.1); without an instance UID the SCP assigns one."""
    return Command(
        CommandField.N_CREATE_RQ,
        MessageID=message_id,
        AffectedSOPClassUID=sop_class_uid,
        AffectedSOPInstanceUID=sop_instance_uid,
        CommandDataSetType=_dataset_type(has_dataset),
    )


def n_delete_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> Command:
    """An N-DELETE-RQ (PS3.7 10.3.6.1); no data set."""
    return Command(
        CommandField.N_DELETE_RQ,
        MessageID=message_id,
        RequestedSOPClassUID=sop_class_uid,
        RequestedSOPInstanceUID=sop_instance_uid,
    )


# --------------------------------------------------------------------------------------
# P-DATA-TF fragmentation (PS3.8 9.3.5, Annex D.1 and E)
# --------------------------------------------------------------------------------------

#: Message control header bit 0: the fragment is command information (PS3.8 E.2).
CONTROL_COMMAND = 0x01
#: Message control header bit 1: the last fragment of the command or data set.
CONTROL_LAST = 0x02

#: Largest P-DATA-TF variable field we send, whatever the peer allows: with a peer
#: Maximum Length of 0 ("unlimited", PS3.8 D.1) or in the gigabytes, one PDU per data
#: set would need a buffer as large as the data set.
MAX_PDU_CAP = 16 * 1024 * 1024

_P_DATA_TF = 0x04
# PDU type, reserved, PDU length | PDV item length, presentation context ID, control
_PDATA_HEADER = struct.Struct(">BBIIBB")
_PDATA_HEADER_LENGTH = _PDATA_HEADER.size  # 12
# Per PDV the variable field also holds the 4-byte item length, the context ID and
# the control header: a fragment of n bytes takes n + 6 bytes of the Maximum Length.
_PDV_OVERHEAD = 6


class Readable(Protocol):
    """A source of data-set bytes read in place, such as an open binary file."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def pdata_header(context_id: int, control: int, data_length: int) -> bytes:
    """The 12 bytes before a ``data_length``-byte fragment in a single-PDV P-DATA-TF.

    PDU type 04H, reserved, PDU length (data_length + 6), PDV item length
    (data_length + 2), presentation context ID, message control header; all big
    endian (PS3.8 9.3.5, 9.3.5.1). ``writev(header, payload)`` then sends the PDU
    without copying the payload.
    """
    return _PDATA_HEADER.pack(
        _P_DATA_TF, 0, data_length + _PDV_OVERHEAD, data_length + 2, context_id, control
    )


def max_fragment_length(max_pdu_length: int, pdu_cap: int = MAX_PDU_CAP) -> int:
    """Largest PDV fragment that fits a P-DATA-TF within the peer's Maximum Length.

    ``max_pdu_length`` is the Maximum Length sub-item the peer sent (PS3.8 D.1): the
    bound on the PDU's variable field, PDV item headers included; 0 means unlimited,
    which ``pdu_cap`` bounds anyway.
    """
    if max_pdu_length < 0 or pdu_cap < 0:
        raise ValueError(f"negative maximum length {min(max_pdu_length, pdu_cap)}")
    limit = min(max_pdu_length, pdu_cap) if max_pdu_length else pdu_cap
    # Even, like the engine's fragments: DCMTK refuses odd fragment lengths.
    if limit < _PDV_OVERHEAD + 2:
        raise ValueError(f"maximum length {limit} cannot carry an even PDV fragment")
    return (limit - _PDV_OVERHEAD) & ~1


def iter_fragments(
    context_id: int,
    command: bytes | memoryview,
    dataset: bytes | bytearray | memoryview | Readable | None,
    max_pdu_length: int,
    *,
    dataset_length: int | None = None,
    pdu_cap: int = MAX_PDU_CAP,
) -> Iterator[bytes | bytearray]:
    """Yield the P-DATA-TF PDUs of one message, each a complete PDU with one PDV.

    Command fragments first (control 01H, the last 03H), then data-set fragments
    (00H, the last 02H), each PDU's variable field at most ``max_pdu_length`` (see
    :func:`max_fragment_length`). ``dataset`` is ``None`` (no data set), bytes-like,
    or an object with ``readinto`` (e.g. a file opened ``rb``), which is read
    straight into each PDU's buffer so the data set is never held whole. For such a
    reader give ``dataset_length`` when known; else a seekable reader is measured
    from its current position, and other readers are read one fragment ahead to
    find the last one. An empty data set is sent as one empty last fragment.
    """
    if not 1 <= context_id <= 255 or not context_id & 1:
        raise ValueError(f"presentation context ID {context_id} is not an odd 1..255")
    fragment = max_fragment_length(max_pdu_length, pdu_cap)
    yield from _fragment_buffer(context_id, CONTROL_COMMAND, command, fragment)
    if dataset is None:
        return
    if isinstance(dataset, bytes | bytearray | memoryview):
        yield from _fragment_buffer(context_id, 0, dataset, fragment)
    else:
        yield from _fragment_reader(context_id, dataset, fragment, dataset_length)


def fragment_message(
    context_id: int,
    command: bytes,
    dataset: bytes | memoryview | None,
    max_pdu_length: int,
    *,
    pdu_cap: int = MAX_PDU_CAP,
) -> list[bytes]:
    """All P-DATA-TF PDUs of one message as a list; see :func:`iter_fragments`."""
    return [
        pdu if type(pdu) is bytes else bytes(pdu)
        for pdu in iter_fragments(context_id, command, dataset, max_pdu_length, pdu_cap=pdu_cap)
    ]


def _fragment_buffer(
    context_id: int, control: int, data: bytes | bytearray | memoryview, fragment: int
) -> Iterator[bytes]:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    total = len(view)
    if total == 0:
        yield pdata_header(context_id, control | CONTROL_LAST, 0)
        return
    for start in range(0, total, fragment):
        stop = start + fragment
        if stop >= total:
            stop = total
            flags = control | CONTROL_LAST
        else:
            flags = control
        yield b"".join((pdata_header(context_id, flags, stop - start), view[start:stop]))


def _read_full(source: Readable, buffer: bytearray, offset: int) -> int:
    """Fill ``buffer[offset:]`` from ``source``; return how many bytes were read."""
    with memoryview(buffer) as whole, whole[offset:] as view:
        size = len(view)
        got = 0
        while got < size:
            with view[got:] as rest:
                n = source.readinto(rest)
            if n is None:
                raise ValueError("data set reader has no data ready (non-blocking?)")
            if n == 0:
                break
            got += n
        return got


def _remaining_length(source: Readable) -> int | None:
    """Bytes left in a seekable ``source``, or None when it cannot tell."""
    seekable = getattr(source, "seekable", None)
    if seekable is None or not seekable():
        return None
    here: int = source.tell()  # type: ignore[attr-defined]
    end: int = source.seek(0, 2)  # type: ignore[attr-defined]
    source.seek(here)  # type: ignore[attr-defined]
    return max(end - here, 0)


def _fragment_reader(
    context_id: int, source: Readable, fragment: int, length: int | None
) -> Iterator[bytearray]:
    if length is None:
        length = _remaining_length(source)
    if length is not None:
        # Known size: each PDU buffer is exactly as large as its fragment.
        remaining = length
        while True:
            size = min(fragment, remaining)
            pdu = bytearray(_PDATA_HEADER_LENGTH + size)
            got = _read_full(source, pdu, _PDATA_HEADER_LENGTH)
            if got < size:
                raise ValueError(f"data set ended {remaining - got} bytes early")
            remaining -= size
            flags = CONTROL_LAST if remaining == 0 else 0
            _PDATA_HEADER.pack_into(
                pdu, 0, _P_DATA_TF, 0, size + _PDV_OVERHEAD, size + 2, context_id, flags
            )
            yield pdu
            if remaining == 0:
                return
    # Unknown size: read one fragment ahead; a fragment is the last when the next
    # read finds nothing more.
    pdu = bytearray(_PDATA_HEADER_LENGTH + fragment)
    got = _read_full(source, pdu, _PDATA_HEADER_LENGTH)
    while True:
        if got == fragment:
            following = bytearray(_PDATA_HEADER_LENGTH + fragment)
            got_next = _read_full(source, following, _PDATA_HEADER_LENGTH)
            last = got_next == 0
        else:
            del pdu[_PDATA_HEADER_LENGTH + got :]
            last = True
        _PDATA_HEADER.pack_into(
            pdu,
            0,
            _P_DATA_TF,
            0,
            got + _PDV_OVERHEAD,
            got + 2,
            context_id,
            CONTROL_LAST if last else 0,
        )
        yield pdu
        if last:
            return
        pdu, got = following, got_next
