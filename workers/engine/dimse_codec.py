"""DIMSE command sets as records, and their codec (PS3.7 chapters 9 and 10, Annex E):
:class:`Command`, its wire codes, :func:`encode_command` and :func:`decode_command`.
Import them from :mod:`workers.engine.dimse`, which gathers the DIMSE modules.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from operator import attrgetter
from typing import Any

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
    def has_dataset(self) -> bool:
        """True when a data set follows this command set."""
        return self.CommandDataSetType != NO_DATASET

    @property
    def is_request(self) -> bool:
        return not self.CommandField & 0x8000


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


def _encode_value(kind: int, value: Any) -> bytes:
    """The value field of one element (padded to even length), without its header.
    ``value`` is whatever the Command holds; a wrong type raises one of
    ``_ENCODE_ERRORS``, which the caller turns into a DIMSEError."""
    if kind in (_US, _CDST):
        return _U16.pack(value)
    # Strings are ASCII; a peer's stray byte (decoded as U+FFFD) echoed in a response
    # becomes "?" rather than leaving the request unanswered.
    if kind == _UI:
        raw = value.encode("ascii", "replace")
        return raw + b"\x00" if len(raw) & 1 else raw
    if kind in (_AE, _LO):
        raw = value.encode("ascii", "replace")
        return raw + b" " if len(raw) & 1 else raw
    if kind == _AT:
        return b"".join(_AT_PAIR.pack(tag >> 16, tag & 0xFFFF) for tag in value)
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
    values: dict[str, Any] = {}  # keyword -> value of the kind its table entry says
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
    known = _COMMAND_FIELDS.get(command_field)
    if known is None:
        raise DIMSEError(f"unknown CommandField {command_field:#06x}")
    values["CommandField"] = known
    # Structural, not semantic: without it the receiver cannot tell whether data-set
    # fragments are to follow, i.e. where this message ends.
    if "CommandDataSetType" not in values:
        raise DIMSEError("no (0000,0800) CommandDataSetType")
    if extra is not None:
        values["extra"] = extra
    return Command(**values)
