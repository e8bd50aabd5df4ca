"""What the association engine hands to its user: PS3.8 indications and confirmations.

:meth:`workers.engine.connection.Connection.next_event` returns one of these at a time
(or :data:`NEED_DATA`). Their names follow PS3.8 section 7: an *indication* tells the
acceptor-side user that the peer asked for something, a *confirmation* tells the
requestor-side user how its request went. DIMSE messages are split into
:class:`CommandReceived` and :class:`DataSetReceived` so that a data set can be
streamed to a sink as it arrives instead of being held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dimse import Command
from .fsm import Action, Event, State
from .pdu import PDU, AssociateAC, AssociateRJ, AssociateRQ


class _NeedData:
    """Sentinel: the engine has nothing more to report until more bytes arrive."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(slots=True, frozen=True)
class AssociateIndication:
    """An acceptable A-ASSOCIATE-RQ arrived (AE-6); answer with accept() or reject()."""

    request: AssociateRQ


@dataclass(slots=True, frozen=True)
class AssociateAccepted:
    """Requestor side: the peer accepted the association (AE-3)."""

    response: AssociateAC


@dataclass(slots=True, frozen=True)
class AssociateRejected:
    """The association was rejected: by the peer's A-ASSOCIATE-RJ (AE-4), or by the
    service provider on our side (AE-6 with an unacceptable request); ``local`` tells."""

    response: AssociateRJ
    local: bool = False


@dataclass(slots=True, frozen=True)
class CommandReceived:
    """A complete DIMSE command set arrived on ``context_id``.

    When ``command.has_dataset`` a :class:`DataSetReceived` follows; before asking for
    the next event the user may call ``Connection.set_dataset_sink`` so that the data
    set fragments are handed to it as they arrive instead of being buffered.
    """

    context_id: int
    command: Command
    raw: bytes


@dataclass(slots=True, frozen=True)
class DataSetReceived:
    """The data set of the last command is complete.

    ``data`` holds the whole data set when no sink was set; it is None when the
    fragments were streamed to a sink.
    """

    context_id: int
    data: bytes | None


@dataclass(slots=True, frozen=True)
class ReleaseRequested:
    """The peer asked to release (AR-2, or AR-8 on a release collision); answer with
    release_response() once outstanding work is done."""

    collision: bool = False


@dataclass(slots=True, frozen=True)
class Released:
    """The association is released (AR-3 requestor confirmation, AR-10 collision)."""


@dataclass(slots=True, frozen=True)
class Aborted:
    """The association ended abnormally.

    ``source``/``reason`` are the A-ABORT's fields: from the peer's A-ABORT PDU
    (``by_peer``), or from the A-ABORT we sent because of a protocol fault, or None
    for a transport that closed under an open association (A-P-ABORT, AA-4).
    ``detail`` says why in words, for logs.
    """

    source: int | None
    reason: int | None
    by_peer: bool
    detail: str = ""


@dataclass(slots=True, frozen=True)
class PDUReceived:
    """A PDU arrived (only when the connection traces PDUs). ``pdu`` is None for a
    P-DATA-TF that was streamed without being materialised."""

    pdu_type: int
    length: int
    pdu: PDU | None


@dataclass(slots=True, frozen=True)
class PDUSent:
    """A PDU was queued for sending (only when the connection traces PDUs)."""

    pdu_type: int
    length: int
    pdu: PDU | None


@dataclass(slots=True, frozen=True)
class StateChanged:
    """A state machine transition (only when the connection traces transitions)."""

    event: Event
    action: Action
    previous: State
    current: State


Indication = (
    AssociateIndication
    | AssociateAccepted
    | AssociateRejected
    | CommandReceived
    | DataSetReceived
    | ReleaseRequested
    | Released
    | Aborted
    | PDUReceived
    | PDUSent
    | StateChanged
)
