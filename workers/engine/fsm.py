"""The Upper Layer state machine of PS3.8 section 9.2, written as data.

Theory of operation
-------------------
PS3.8 Table 9-10 ("DICOM Upper Layer Protocol State Transition Table") lists, for each
of the 19 events (Table 9-2 ... 9-9) and each of the 13 states (Table 9-1), the action
to perform; the action (Tables 9-6 ... 9-9) names the next state. :data:`TABLE` below
is that table, one entry per (event, state) pair that the standard fills in. A pair
missing from it is a blank cell of the standard:

* for events caused by the local user (Evt1, 7, 8, 9, 11, 14, 15) a blank cell is
  local misuse, and :class:`workers.engine.connection.Connection` raises;
* for events caused by the peer or the transport a blank cell cannot happen on a real
  connection (e.g. a PDU in Sta1 or Sta4 has no transport to arrive on), and the
  connection ignores it.

Two actions have a next state that depends on context: AE-6 (Sta3 if the request is
acceptable to the service provider, else Sta13) and AR-8 (Sta9 for the requestor,
Sta10 for the acceptor of the association). :data:`NEXT_STATE` gives the fixed ones.

Shortcuts
---------
On the hot path the connection skips the table lookup for two cells, and the data plane
(:mod:`workers.dataplane`) consumes P-DATA-TF PDUs on its own. Each shortcut is derived
here from the table, never written by hand: it applies exactly in the states where the
cell's action leaves the state unchanged, and :data:`SHORTCUTS` lists them all, so that
tests/engine/test_fsm.py checks every one against the table it stands for.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import TypeVar

from . import pdu as p
from .config import LocalProtocolError


class State(IntEnum):
    """PS3.8 Table 9-1."""

    STA1 = 1  # Idle
    STA2 = 2  # Transport connection open (awaiting A-ASSOCIATE-RQ PDU)
    STA3 = 3  # Awaiting local A-ASSOCIATE response primitive
    STA4 = 4  # Awaiting transport connection opening to complete
    STA5 = 5  # Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU
    STA6 = 6  # Association established and ready for data transfer
    STA7 = 7  # Awaiting A-RELEASE-RP PDU
    STA8 = 8  # Awaiting local A-RELEASE response primitive
    STA9 = 9  # Release collision requestor side; awaiting A-RELEASE response primitive
    STA10 = 10  # Release collision acceptor side; awaiting A-RELEASE-RP PDU
    STA11 = 11  # Release collision requestor side; awaiting A-RELEASE-RP PDU
    STA12 = 12  # Release collision acceptor side; awaiting A-RELEASE response primitive
    STA13 = 13  # Awaiting transport connection close indication


class Event(IntEnum):
    """PS3.8 Tables 9-2 to 9-9 (the "Evt" column of Table 9-10)."""

    EVT1 = 1  # A-ASSOCIATE request (local user)
    EVT2 = 2  # Transport connection confirm (local transport service)
    EVT3 = 3  # A-ASSOCIATE-AC PDU (received on transport connection)
    EVT4 = 4  # A-ASSOCIATE-RJ PDU (received on transport connection)
    EVT5 = 5  # Transport connection indication (local transport service)
    EVT6 = 6  # A-ASSOCIATE-RQ PDU (received on transport connection)
    EVT7 = 7  # A-ASSOCIATE response primitive (accept)
    EVT8 = 8  # A-ASSOCIATE response primitive (reject)
    EVT9 = 9  # P-DATA request primitive
    EVT10 = 10  # P-DATA-TF PDU
    EVT11 = 11  # A-RELEASE request primitive
    EVT12 = 12  # A-RELEASE-RQ PDU (received on open transport connection)
    EVT13 = 13  # A-RELEASE-RP PDU (received on transport connection)
    EVT14 = 14  # A-RELEASE response primitive
    EVT15 = 15  # A-ABORT request primitive
    EVT16 = 16  # A-ABORT PDU (received on open transport connection)
    EVT17 = 17  # Transport connection closed indication (local transport service)
    EVT18 = 18  # ARTIM timer expired (Association reject/release timer)
    EVT19 = 19  # Unrecognized or invalid PDU received


class Action(StrEnum):
    """PS3.8 Tables 9-6 (AE), 9-7 (DT), 9-8 (AR) and 9-9 (AA)."""

    AE_1 = "AE-1"  # Issue TRANSPORT CONNECT request primitive to local transport service
    AE_2 = "AE-2"  # Send A-ASSOCIATE-RQ PDU
    AE_3 = "AE-3"  # Issue A-ASSOCIATE confirmation (accept) primitive
    AE_4 = "AE-4"  # Issue A-ASSOCIATE confirmation (reject) primitive and close transport
    AE_5 = "AE-5"  # Issue Transport connection response primitive; start ARTIM timer
    AE_6 = "AE-6"  # Stop ARTIM; if acceptable issue A-ASSOCIATE indication, else send RJ
    AE_7 = "AE-7"  # Send A-ASSOCIATE-AC PDU
    AE_8 = "AE-8"  # Send A-ASSOCIATE-RJ PDU and start ARTIM timer
    DT_1 = "DT-1"  # Send P-DATA-TF PDU
    DT_2 = "DT-2"  # Send P-DATA indication primitive
    AR_1 = "AR-1"  # Send A-RELEASE-RQ PDU
    AR_2 = "AR-2"  # Issue A-RELEASE indication primitive
    AR_3 = "AR-3"  # Issue A-RELEASE confirmation primitive, and close transport connection
    AR_4 = "AR-4"  # Issue A-RELEASE-RP PDU and start ARTIM timer
    AR_5 = "AR-5"  # Stop ARTIM timer
    AR_6 = "AR-6"  # Issue P-DATA indication
    AR_7 = "AR-7"  # Issue P-DATA-TF PDU
    AR_8 = "AR-8"  # Issue A-RELEASE indication (release collision)
    AR_9 = "AR-9"  # Send A-RELEASE-RP PDU
    AR_10 = "AR-10"  # Issue A-RELEASE confirmation primitive
    AA_1 = "AA-1"  # Send A-ABORT PDU, start (or restart if already started) ARTIM timer
    AA_2 = "AA-2"  # Stop ARTIM timer if running. Close transport connection
    AA_3 = "AA-3"  # Issue A-ABORT or A-P-ABORT indication and close transport connection
    AA_4 = "AA-4"  # Issue A-P-ABORT indication primitive
    AA_5 = "AA-5"  # Stop ARTIM timer
    AA_6 = "AA-6"  # Ignore PDU
    AA_7 = "AA-7"  # Send A-ABORT PDU
    AA_8 = "AA-8"  # Send A-ABORT PDU (provider), issue A-P-ABORT indication, start ARTIM


S = State
E = Event
A = Action

#: Next state of each action, for the actions whose next state is fixed.
NEXT_STATE: dict[Action, State] = {
    A.AE_1: S.STA4,
    A.AE_2: S.STA5,
    A.AE_3: S.STA6,
    A.AE_4: S.STA1,
    A.AE_5: S.STA2,
    # AE-6: Sta3 or Sta13, decided by the connection
    A.AE_7: S.STA6,
    A.AE_8: S.STA13,
    A.DT_1: S.STA6,
    A.DT_2: S.STA6,
    A.AR_1: S.STA7,
    A.AR_2: S.STA8,
    A.AR_3: S.STA1,
    A.AR_4: S.STA13,
    A.AR_5: S.STA1,
    A.AR_6: S.STA7,
    A.AR_7: S.STA8,
    # AR-8: Sta9 (association requestor) or Sta10 (association acceptor)
    A.AR_9: S.STA11,
    A.AR_10: S.STA12,
    A.AA_1: S.STA13,
    A.AA_2: S.STA1,
    A.AA_3: S.STA1,
    A.AA_4: S.STA1,
    A.AA_5: S.STA1,
    A.AA_6: S.STA13,
    A.AA_7: S.STA13,
    A.AA_8: S.STA13,
}


def _row(**cells: Action) -> dict[State, Action]:
    """One row of Table 9-10: ``sta2=AA_1, ...`` -> {State.STA2: Action.AA_1, ...}."""
    return {State[name.upper()]: action for name, action in cells.items()}


# For PDU events the cells of states 3 and 5 to 12 are nearly always AA-8, so each row
# starts from this and overrides the few cells that differ.
_AA8_IN_3_5_TO_12 = _row(
    sta3=A.AA_8,
    sta5=A.AA_8,
    sta6=A.AA_8,
    sta7=A.AA_8,
    sta8=A.AA_8,
    sta9=A.AA_8,
    sta10=A.AA_8,
    sta11=A.AA_8,
    sta12=A.AA_8,
)

_ROWS: dict[Event, dict[State, Action]] = {
    E.EVT1: _row(sta1=A.AE_1),
    E.EVT2: _row(sta4=A.AE_2),
    E.EVT3: {**_AA8_IN_3_5_TO_12, **_row(sta2=A.AA_1, sta5=A.AE_3, sta13=A.AA_6)},
    E.EVT4: {**_AA8_IN_3_5_TO_12, **_row(sta2=A.AA_1, sta5=A.AE_4, sta13=A.AA_6)},
    E.EVT5: _row(sta1=A.AE_5),
    E.EVT6: {**_AA8_IN_3_5_TO_12, **_row(sta2=A.AE_6, sta13=A.AA_7)},
    E.EVT7: _row(sta3=A.AE_7),
    E.EVT8: _row(sta3=A.AE_8),
    E.EVT9: _row(sta6=A.DT_1, sta8=A.AR_7),
    E.EVT10: {**_AA8_IN_3_5_TO_12, **_row(sta2=A.AA_1, sta6=A.DT_2, sta7=A.AR_6, sta13=A.AA_6)},
    E.EVT11: _row(sta6=A.AR_1),
    E.EVT12: {**_AA8_IN_3_5_TO_12, **_row(sta2=A.AA_1, sta6=A.AR_2, sta7=A.AR_8, sta13=A.AA_6)},
    E.EVT13: {
        **_AA8_IN_3_5_TO_12,
        **_row(sta2=A.AA_1, sta7=A.AR_3, sta10=A.AR_10, sta11=A.AR_3, sta13=A.AA_6),
    },
    E.EVT14: _row(sta8=A.AR_4, sta9=A.AR_9, sta12=A.AR_4),
    E.EVT15: _row(
        sta3=A.AA_1,
        sta4=A.AA_2,
        sta5=A.AA_1,
        sta6=A.AA_1,
        sta7=A.AA_1,
        sta8=A.AA_1,
        sta9=A.AA_1,
        sta10=A.AA_1,
        sta11=A.AA_1,
        sta12=A.AA_1,
    ),
    E.EVT16: _row(
        sta2=A.AA_2,
        sta3=A.AA_3,
        sta5=A.AA_3,
        sta6=A.AA_3,
        sta7=A.AA_3,
        sta8=A.AA_3,
        sta9=A.AA_3,
        sta10=A.AA_3,
        sta11=A.AA_3,
        sta12=A.AA_3,
        sta13=A.AA_2,
    ),
    E.EVT17: _row(
        sta2=A.AA_5,
        sta3=A.AA_4,
        sta4=A.AA_4,
        sta5=A.AA_4,
        sta6=A.AA_4,
        sta7=A.AA_4,
        sta8=A.AA_4,
        sta9=A.AA_4,
        sta10=A.AA_4,
        sta11=A.AA_4,
        sta12=A.AA_4,
        sta13=A.AR_5,
    ),
    E.EVT18: _row(sta2=A.AA_2, sta13=A.AA_2),
    E.EVT19: {**_AA8_IN_3_5_TO_12, **_row(sta2=A.AA_1, sta13=A.AA_7)},
}

#: PS3.8 Table 9-10: (event, state) -> action. Pairs not present are blank cells.
TABLE: dict[tuple[Event, State], Action] = {
    (event, state): action for event, row in _ROWS.items() for state, action in row.items()
}

#: Events caused by the local service user: a blank cell for one of these is misuse.
LOCAL_EVENTS = frozenset({E.EVT1, E.EVT7, E.EVT8, E.EVT9, E.EVT11, E.EVT14, E.EVT15})


def lookup(event: Event, state: State) -> Action | None:
    """The action of Table 9-10 for ``event`` in ``state``, or None for a blank cell."""
    return TABLE.get((event, state))


def _unchanged(event: Event, action: Action) -> frozenset[State]:
    """The states where Table 9-10 answers ``event`` with ``action`` back to the same
    state: where doing ``action`` directly is exactly what the table would do."""
    return frozenset(
        s for s in State if TABLE.get((event, s)) is action and NEXT_STATE[action] is s
    )


#: States where a P-DATA-TF received (Evt10) is DT-2 back to the same state: there the
#: data plane consumes P-DATA on its own, and the connection starts one without the table.
RECEIVE_FAST_PATH_STATES: frozenset[State] = _unchanged(E.EVT10, A.DT_2)
#: States where a P-DATA request (Evt9) is DT-1 back to the same state: there a command
#: set that fits one PDU is queued without the table.
SEND_FAST_PATH_STATES: frozenset[State] = _unchanged(E.EVT9, A.DT_1)

#: Every cell the engine may act on without a table lookup: (event, state) -> the
#: action the shortcut stands for.
SHORTCUTS: dict[tuple[Event, State], Action] = {
    **{(E.EVT10, s): A.DT_2 for s in RECEIVE_FAST_PATH_STATES},
    **{(E.EVT9, s): A.DT_1 for s in SEND_FAST_PATH_STATES},
}


_P = TypeVar("_P", p.AssociateRQ, p.AssociateAC, p.AssociateRJ, p.Abort)


@dataclass(slots=True)
class FireContext:
    """What an event brings to its action (PS3.8 Table 9-10): the PDU received or to
    send, the P-DATA to send, the abort's source and reason, the length of a P-DATA-TF
    received, or the detail of a peer fault. Each event fills in only its own fields."""

    pdu: p.PDU | None = None
    context_id: int = 0
    data: bytes | bytearray | memoryview = b""
    control: int = 0
    last: bool = False
    length: int = 0
    source: int = 0
    reason: int | None = None
    detail: str | None = None

    def expect(self, kind: type[_P]) -> _P:
        """The PDU, which the event says is a ``kind``. A local primitive given another
        kind is misuse; received PDUs always match (the event is chosen by type)."""
        pdu = self.pdu
        if not isinstance(pdu, kind):
            raise LocalProtocolError(f"expected {kind.__name__}, got {type(pdu).__name__}")
        return pdu


#: The context of the events that bring nothing (never modified: actions only read it).
NO_CONTEXT = FireContext()
