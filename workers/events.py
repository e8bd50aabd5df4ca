"""The handler contract: the event vocabulary users program against.

Handlers written for pynetdicom's contract run here unchanged: the same event names
(``EVT_C_STORE`` ...), the same ``Event`` attributes (``assoc``, ``event``,
``timestamp``, and per event ``request``, ``context``, ``dataset`` ...), and the same
default behaviours, which the worker implements. Notification events are cheap facts
("a PDU was sent"); intervention events ask a single handler for an answer.

Nothing here decodes a data set unless a handler reads ``dataset`` / ``identifier`` /
``attribute_list`` ...: the encoded bytes are fetched through a loader and decoded with
pydicom on first access, then cached.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import fields
from io import BytesIO
from typing import TYPE_CHECKING, Any, NamedTuple

from .datasets import (
    DEFAULT_MAX_DATASET,
    decode_dataset,
)  # looked up per call (tests count the decodes)
from .engine.dimse_codec import Command, encode_command

if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset


__all__ = [
    "BY_NAME",
    "DATASET_ATTRIBUTE",
    "DEFAULT_MAX_DATASET",
    "DEFAULT_STATUS",
    "EVT_ABORTED",
    "EVT_ACCEPTED",
    "EVT_ACSE_RECV",
    "EVT_ACSE_SENT",
    "EVT_ASYNC_OPS",
    "EVT_CONN_CLOSE",
    "EVT_CONN_OPEN",
    "EVT_C_ECHO",
    "EVT_C_FIND",
    "EVT_C_GET",
    "EVT_C_MOVE",
    "EVT_C_STORE",
    "EVT_DATA_RECV",
    "EVT_DATA_SENT",
    "EVT_DIMSE_RECV",
    "EVT_DIMSE_SENT",
    "EVT_ESTABLISHED",
    "EVT_FSM_TRANSITION",
    "EVT_N_ACTION",
    "EVT_N_CREATE",
    "EVT_N_DELETE",
    "EVT_N_EVENT_REPORT",
    "EVT_N_GET",
    "EVT_N_SET",
    "EVT_PDU_RECV",
    "EVT_PDU_SENT",
    "EVT_REJECTED",
    "EVT_RELEASED",
    "EVT_REQUESTED",
    "EVT_SOP_COMMON",
    "EVT_SOP_EXTENDED",
    "EVT_USER_ID",
    "INTERVENTION_EVENTS",
    "NOTIFICATION_EVENTS",
    "DimseMessage",
    "Event",
    "EventType",
    "InterventionEvent",
    "NotificationEvent",
    "decode_dataset",
]


class NotificationEvent(NamedTuple):
    """An event whose handlers are only told (any number of them)."""

    name: str
    description: str

    @property
    def is_intervention(self) -> bool:
        return False

    @property
    def is_notification(self) -> bool:
        return True


class InterventionEvent(NamedTuple):
    """An event whose single handler's answer decides what happens."""

    name: str
    description: str

    @property
    def is_intervention(self) -> bool:
        return True

    @property
    def is_notification(self) -> bool:
        return False


EventType = NotificationEvent | InterventionEvent

# Notification events
EVT_ABORTED = NotificationEvent("EVT_ABORTED", "Association aborted")
EVT_ACCEPTED = NotificationEvent("EVT_ACCEPTED", "Association request accepted")
EVT_ACSE_RECV = NotificationEvent("EVT_ACSE_RECV", "ACSE received a primitive from the DUL")
EVT_ACSE_SENT = NotificationEvent("EVT_ACSE_SENT", "ACSE sent a primitive to the DUL")
EVT_CONN_CLOSE = NotificationEvent("EVT_CONN_CLOSE", "Connection with remote closed")
EVT_CONN_OPEN = NotificationEvent("EVT_CONN_OPEN", "Connection with remote opened")
EVT_DATA_RECV = NotificationEvent("EVT_DATA_RECV", "Data received from the peer AE")
EVT_DATA_SENT = NotificationEvent("EVT_DATA_SENT", "Data sent to the peer AE")
EVT_DIMSE_RECV = NotificationEvent("EVT_DIMSE_RECV", "DIMSE service received a message")
EVT_DIMSE_SENT = NotificationEvent("EVT_DIMSE_SENT", "DIMSE service sent a message")
EVT_ESTABLISHED = NotificationEvent("EVT_ESTABLISHED", "Association established")
EVT_FSM_TRANSITION = NotificationEvent("EVT_FSM_TRANSITION", "State machine transitioning")
EVT_PDU_RECV = NotificationEvent("EVT_PDU_RECV", "PDU received from the peer AE")
EVT_PDU_SENT = NotificationEvent("EVT_PDU_SENT", "PDU sent to the peer AE")
EVT_REJECTED = NotificationEvent("EVT_REJECTED", "Association request rejected")
EVT_RELEASED = NotificationEvent("EVT_RELEASED", "Association released")
EVT_REQUESTED = NotificationEvent("EVT_REQUESTED", "Association requested")

# Intervention events
EVT_ASYNC_OPS = InterventionEvent("EVT_ASYNC_OPS", "Asynchronous operations negotiation")
EVT_SOP_COMMON = InterventionEvent("EVT_SOP_COMMON", "SOP class common extended negotiation")
EVT_SOP_EXTENDED = InterventionEvent("EVT_SOP_EXTENDED", "SOP class extended negotiation")
EVT_USER_ID = InterventionEvent("EVT_USER_ID", "User identity negotiation")
EVT_C_ECHO = InterventionEvent("EVT_C_ECHO", "C-ECHO request received")
EVT_C_FIND = InterventionEvent("EVT_C_FIND", "C-FIND request received")
EVT_C_GET = InterventionEvent("EVT_C_GET", "C-GET request received")
EVT_C_MOVE = InterventionEvent("EVT_C_MOVE", "C-MOVE request received")
EVT_C_STORE = InterventionEvent("EVT_C_STORE", "C-STORE request received")
EVT_N_ACTION = InterventionEvent("EVT_N_ACTION", "N-ACTION request received")
EVT_N_CREATE = InterventionEvent("EVT_N_CREATE", "N-CREATE request received")
EVT_N_DELETE = InterventionEvent("EVT_N_DELETE", "N-DELETE request received")
EVT_N_EVENT_REPORT = InterventionEvent("EVT_N_EVENT_REPORT", "N-EVENT-REPORT request received")
EVT_N_GET = InterventionEvent("EVT_N_GET", "N-GET request received")
EVT_N_SET = InterventionEvent("EVT_N_SET", "N-SET request received")

NOTIFICATION_EVENTS: tuple[NotificationEvent, ...] = (
    EVT_ABORTED,
    EVT_ACCEPTED,
    EVT_ACSE_RECV,
    EVT_ACSE_SENT,
    EVT_CONN_CLOSE,
    EVT_CONN_OPEN,
    EVT_DATA_RECV,
    EVT_DATA_SENT,
    EVT_DIMSE_RECV,
    EVT_DIMSE_SENT,
    EVT_ESTABLISHED,
    EVT_FSM_TRANSITION,
    EVT_PDU_RECV,
    EVT_PDU_SENT,
    EVT_REJECTED,
    EVT_RELEASED,
    EVT_REQUESTED,
)

INTERVENTION_EVENTS: tuple[InterventionEvent, ...] = (
    EVT_ASYNC_OPS,
    EVT_SOP_COMMON,
    EVT_SOP_EXTENDED,
    EVT_USER_ID,
    EVT_C_ECHO,
    EVT_C_FIND,
    EVT_C_GET,
    EVT_C_MOVE,
    EVT_C_STORE,
    EVT_N_ACTION,
    EVT_N_CREATE,
    EVT_N_DELETE,
    EVT_N_EVENT_REPORT,
    EVT_N_GET,
    EVT_N_SET,
)

#: Every event by name, e.g. for binding handlers from configuration.
BY_NAME: dict[str, EventType] = {e.name: e for e in NOTIFICATION_EVENTS}
BY_NAME.update({e.name: e for e in INTERVENTION_EVENTS})

#: Status a DIMSE intervention event answers with when no handler is bound, or when
#: the bound handler raises or returns nothing usable (events.rst; PS3.4, PS3.7 C).
DEFAULT_STATUS: dict[InterventionEvent, int] = {
    EVT_C_ECHO: 0x0000,
    EVT_C_STORE: 0xC211,
    EVT_C_FIND: 0xC311,
    EVT_C_GET: 0xC411,
    EVT_C_MOVE: 0xC511,
    EVT_N_ACTION: 0x0110,
    EVT_N_CREATE: 0x0110,
    EVT_N_DELETE: 0x0110,
    EVT_N_EVENT_REPORT: 0x0110,
    EVT_N_GET: 0x0110,
    EVT_N_SET: 0x0110,
}

#: Which data-set-bearing attribute each DIMSE event offers, by the name the contract
#: uses (C-STORE's ``dataset``, C-FIND's ``identifier``, N-SET's ``attribute_list``...).
DATASET_ATTRIBUTE: dict[InterventionEvent, str] = {
    EVT_C_STORE: "dataset",
    EVT_C_FIND: "identifier",
    EVT_C_GET: "identifier",
    EVT_C_MOVE: "identifier",
    EVT_N_ACTION: "action_information",
    EVT_N_CREATE: "attribute_list",
    EVT_N_EVENT_REPORT: "event_information",
    EVT_N_SET: "attribute_list",
}


_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


class Event:
    """One occurrence of an event, as handlers receive it.

    ``assoc``, ``event`` and ``timestamp`` are always there; the other attributes of
    the contract are keyword arguments (``request``, ``context``, ``address``,
    ``data``, ``pdu``, ``primitive``, ``message``, ``invoked``, ``performed``,
    ``user_id_type``, ``primary_field``, ``secondary_field``, ``items``,
    ``app_info``...). For DIMSE requests with a data set, ``dataset_loader`` returns
    its encoded bytes and ``transfer_syntax`` says how to read them; the data set is
    decoded only when a handler asks. A Deflated data set that would inflate past
    ``max_dataset_length`` raises ``DatasetTooLarge`` in the handler that reads it, so
    the request gets the handler-failure status of its event.
    """

    def __init__(
        self,
        assoc: Any,
        event: EventType,
        attrs: dict[str, Any] | None = None,
        *,
        dataset_loader: Callable[[], bytes] | None = None,
        transfer_syntax: str | None = None,
        timestamp: _dt.datetime | None = None,
        cancel_check: Callable[[], bool] | None = None,
        max_dataset_length: int = DEFAULT_MAX_DATASET,
    ) -> None:
        self.assoc = assoc
        self._max_dataset_length = max_dataset_length
        self.event = event
        self.timestamp = timestamp or _dt.datetime.now()
        self._loader = dataset_loader
        self._transfer_syntax = transfer_syntax
        self._decoded: Dataset | None = None
        self._cancel_check = cancel_check
        for key, value in (attrs or {}).items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"<Event {self.event.name} at {self.timestamp.isoformat()}>"

    # -- what every DIMSE event offers -------------------------------------------

    @property
    def is_cancelled(self) -> bool:
        """C-FIND, C-GET, C-MOVE: True once the peer sent a C-CANCEL for this request."""
        return bool(self._cancel_check and self._cancel_check())

    @property
    def message_id(self) -> int | None:
        """The request's Message ID."""
        request = getattr(self, "request", None)
        return getattr(request, "MessageID", None)

    def _dataset(self, attribute: str) -> Dataset:
        if not isinstance(self.event, InterventionEvent) or (
            DATASET_ATTRIBUTE.get(self.event) != attribute
        ):
            raise AttributeError(f"{self.event.name} events have no '{attribute}'")
        if self._decoded is None:
            if self._loader is None:
                raise AttributeError(f"this {self.event.name} request carried no data set")
            self._decoded = decode_dataset(
                self._loader(),
                self._transfer_syntax or _IMPLICIT_VR_LITTLE_ENDIAN,
                self._max_dataset_length,
            )
        return self._decoded

    @property
    def dataset(self) -> Dataset:
        """C-STORE: the data set, decoded on first access (with ``file_meta`` set)."""
        ds = self._dataset("dataset")
        if not hasattr(ds, "file_meta") or not ds.file_meta:
            ds.file_meta = self.file_meta
        return ds

    @property
    def identifier(self) -> Dataset:
        """C-FIND, C-GET, C-MOVE: the Identifier, decoded on first access."""
        return self._dataset("identifier")

    @property
    def attribute_list(self) -> Dataset:
        """N-CREATE: the Attribute List; N-SET: the Modification List."""
        return self._dataset("attribute_list")

    @property
    def action_information(self) -> Dataset:
        """N-ACTION: the Action Information."""
        return self._dataset("action_information")

    @property
    def event_information(self) -> Dataset:
        """N-EVENT-REPORT: the Event Information."""
        return self._dataset("event_information")

    @property
    def action_type(self) -> int | None:
        """N-ACTION: the Action Type ID."""
        return getattr(getattr(self, "request", None), "ActionTypeID", None)

    @property
    def event_type(self) -> int | None:
        """N-EVENT-REPORT: the Event Type ID."""
        return getattr(getattr(self, "request", None), "EventTypeID", None)

    @property
    def move_destination(self) -> str | None:
        """C-MOVE: the Move Destination AE title."""
        return getattr(getattr(self, "request", None), "MoveDestination", None)

    @property
    def attribute_identifiers(self) -> list[int]:
        """N-GET: the Attribute Identifier List (tags as ints)."""
        request = getattr(self, "request", None)
        return list(getattr(request, "AttributeIdentifierList", None) or ())

    @property
    def file_meta(self) -> FileMetaDataset:
        """C-STORE: the File Meta Information a Part 10 file of this instance gets."""
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import UID

        request = self.request  # type: ignore[attr-defined]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = request.AffectedSOPClassUID
        meta.MediaStorageSOPInstanceUID = request.AffectedSOPInstanceUID
        meta.TransferSyntaxUID = UID(self._transfer_syntax or _IMPLICIT_VR_LITTLE_ENDIAN)
        return meta

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        """C-STORE: the data set as received, optionally as a whole Part 10 file."""
        if self._loader is None:
            raise AttributeError(f"this {self.event.name} request carried no data set")
        data = self._loader()
        if not include_meta:
            return data
        from workers.storage.filemeta import encode_file_meta

        request = self.request  # type: ignore[attr-defined]
        return (
            encode_file_meta(
                request.AffectedSOPClassUID,
                request.AffectedSOPInstanceUID,
                self._transfer_syntax or _IMPLICIT_VR_LITTLE_ENDIAN,
            )
            + data
        )


_COMMAND_FIELDS = tuple(f.name for f in fields(Command))


class DimseMessage(Command):
    """The ``message`` of EVT_DIMSE_RECV / EVT_DIMSE_SENT: the engine's
    :class:`~workers.engine.dimse_codec.Command`, plus pynetdicom's
    ``message.command_set`` for handlers written for it.

    Made only when a handler is bound to those events; the pydicom conversion stays
    on this side of the contract (the sans-IO engine never imports pydicom).
    """

    __slots__ = ()

    @classmethod
    def of(cls, command: Command) -> DimseMessage:
        """A copy of ``command`` (its values are immutable; ``extra`` is shared)."""
        message = cls.__new__(cls)
        for name in _COMMAND_FIELDS:
            object.__setattr__(message, name, getattr(command, name))
        return message

    @property
    def command_set(self) -> Dataset:
        """The command set as a pydicom Dataset, decoded on each access."""
        from pydicom.filereader import read_dataset

        return read_dataset(
            BytesIO(encode_command(self)), is_implicit_VR=True, is_little_endian=True
        )
