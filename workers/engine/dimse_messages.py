"""DIMSE messages: the PS3.7 rules of which elements each command carries
(:func:`validate_command`), responses to requests (:func:`response_for`) and
constructors for common requests.
"""

from __future__ import annotations

from typing import Any

from .dimse_codec import (
    _COMMAND_FIELDS,
    _TAG_OF,
    DATASET_PRESENT,
    NO_DATASET,
    VERIFICATION_SOP_CLASS,
    Command,
    CommandField,
    DIMSEError,
    Priority,
)
from .dimse_status import (
    Status,
)

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
    values: dict[str, Any] = {
        "CommandField": _COMMAND_FIELDS[rq.CommandField | 0x8000],
        "MessageIDBeingRespondedTo": rq.MessageID if rq.MessageID is not None else 0,
        "Status": status,
    }
    for target, source in echoed:
        value = getattr(rq, source)
        if value is not None:
            values[target] = value
    values.update(fields)
    return Command(**values)


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
