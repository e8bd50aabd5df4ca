"""Every (event, state) pair of PS3.8 Table 9-10, driven through the real inputs."""

from __future__ import annotations

import dataclasses

import pytest

from tests.engine.pair import VERIFICATION, Pair, drain, wire_bytes
from workers.engine import acse, dimse
from workers.engine import pdu as p
from workers.engine.connection import (
    ACTIONS,
    FAST_PATH_STATES,
    Connection,
    LocalProtocolError,
    Role,
)
from workers.engine.fsm import (
    NEXT_STATE,
    SEND_FAST_PATH_STATES,
    SHORTCUTS,
    TABLE,
    Action,
    Event,
    State,
)
from workers.engine.primitives import Aborted, AssociateIndication, ReleaseRequested, StateChanged

# PS3.8 Table 9-10 transcribed again, as the standard prints it: one row per event,
# one column per state (Sta1 ... Sta13), "-" for a blank cell. The engine's table is
# written differently (rows built from a common base); the two must agree.
STANDARD = """
Evt1  AE-1 -    -    -    -    -    -    -    -    -     -    -    -
Evt2  -    -    -    AE-2 -    -    -    -    -    -     -    -    -
Evt3  -    AA-1 AA-8 -    AE-3 AA-8 AA-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-6
Evt4  -    AA-1 AA-8 -    AE-4 AA-8 AA-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-6
Evt5  AE-5 -    -    -    -    -    -    -    -    -     -    -    -
Evt6  -    AE-6 AA-8 -    AA-8 AA-8 AA-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-7
Evt7  -    -    AE-7 -    -    -    -    -    -    -     -    -    -
Evt8  -    -    AE-8 -    -    -    -    -    -    -     -    -    -
Evt9  -    -    -    -    -    DT-1 -    AR-7 -    -     -    -    -
Evt10 -    AA-1 AA-8 -    AA-8 DT-2 AR-6 AA-8 AA-8 AA-8  AA-8 AA-8 AA-6
Evt11 -    -    -    -    -    AR-1 -    -    -    -     -    -    -
Evt12 -    AA-1 AA-8 -    AA-8 AR-2 AR-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-6
Evt13 -    AA-1 AA-8 -    AA-8 AA-8 AR-3 AA-8 AA-8 AR-10 AR-3 AA-8 AA-6
Evt14 -    -    -    -    -    -    -    AR-4 AR-9 -     -    AR-4 -
Evt15 -    -    AA-1 AA-2 AA-1 AA-1 AA-1 AA-1 AA-1 AA-1  AA-1 AA-1 -
Evt16 -    AA-2 AA-3 -    AA-3 AA-3 AA-3 AA-3 AA-3 AA-3  AA-3 AA-3 AA-2
Evt17 -    AA-5 AA-4 AA-4 AA-4 AA-4 AA-4 AA-4 AA-4 AA-4  AA-4 AA-4 AR-5
Evt18 -    AA-2 -    -    -    -    -    -    -    -     -    -    AA-2
Evt19 -    AA-1 AA-8 -    AA-8 AA-8 AA-8 AA-8 AA-8 AA-8  AA-8 AA-8 AA-7
"""

EXPECTED: dict[tuple[Event, State], str] = {}
for line in STANDARD.strip().splitlines():
    name, *cells = line.split()
    for column, cell in enumerate(cells, start=1):
        if cell != "-":
            EXPECTED[(Event(int(name[3:])), State(column))] = cell

# Next state named by each action (PS3.8 Tables 9-6 to 9-9); AE-6 and AR-8 vary.
NEXT = {
    "AE-1": 4, "AE-2": 5, "AE-3": 6, "AE-4": 1, "AE-5": 2, "AE-7": 6, "AE-8": 13,
    "DT-1": 6, "DT-2": 6, "AR-1": 7, "AR-2": 8, "AR-3": 1, "AR-4": 13, "AR-5": 1,
    "AR-6": 7, "AR-7": 8, "AR-9": 11, "AR-10": 12, "AA-1": 13, "AA-2": 1, "AA-3": 1,
    "AA-4": 1, "AA-5": 1, "AA-6": 13, "AA-7": 13, "AA-8": 13,
}  # fmt: skip

# The PDU each action sends, if any.
SENDS = {
    "AE-2": p.PDUType.ASSOCIATE_RQ, "AE-7": p.PDUType.ASSOCIATE_AC,
    "AE-8": p.PDUType.ASSOCIATE_RJ, "DT-1": p.PDUType.P_DATA_TF, "AR-7": p.PDUType.P_DATA_TF,
    "AR-1": p.PDUType.RELEASE_RQ, "AR-4": p.PDUType.RELEASE_RP, "AR-9": p.PDUType.RELEASE_RP,
    "AA-1": p.PDUType.ABORT, "AA-7": p.PDUType.ABORT, "AA-8": p.PDUType.ABORT,
}  # fmt: skip

# Actions after which the transport must be closed by us.
CLOSES = {"AE-4", "AR-3", "AA-2", "AA-3"}

RQ = acse.build_request("ACCEPTOR", "REQUESTOR", [acse.Requested(VERIFICATION)])
AC = acse.negotiate(RQ, acse.AcceptorPolicy())
RJ = p.AssociateRJ(1, 1, 7)
ECHO = dimse.Command(dimse.CommandField.C_ECHO_RQ, MessageID=1, AffectedSOPClassUID=VERIFICATION)


def pdata_bytes() -> bytes:
    raw = dimse.encode_command(ECHO)
    return p.encode(p.PDataTF((p.PDV(1, 0x03, raw),)))


PDU_INPUTS = {
    Event.EVT3: lambda: p.encode(AC),  # type: ignore[arg-type]
    Event.EVT4: lambda: p.encode(RJ),
    Event.EVT6: lambda: p.encode(RQ),
    Event.EVT10: pdata_bytes,
    Event.EVT12: lambda: p.encode(p.ReleaseRQ()),
    Event.EVT13: lambda: p.encode(p.ReleaseRP()),
    Event.EVT16: lambda: p.encode(p.Abort(0, 0)),
    Event.EVT19: lambda: b"\x0a\x00\x00\x00\x00\x04abcd",  # PDU type 0x0A does not exist
}


def connection_in(state: State, role: Role) -> Connection:
    """A connection of ``role`` put in ``state``, with an accepted context 1."""
    pair = Pair()
    pair.associate([acse.Requested(VERIFICATION)])
    conn = pair.requestor if role is Role.REQUESTOR else pair.acceptor
    conn.data_to_send()
    drain(conn)
    if state is State.STA1:
        conn = Connection(role)
        if role is Role.REQUESTOR:
            return conn
    conn.state = state
    if state in (State.STA2, State.STA13):
        conn._artim_deadline = 100.0  # the timer runs in these states
    return conn


def role_for(event: Event, state: State) -> Role:
    if event in (Event.EVT1, Event.EVT2):
        return Role.REQUESTOR
    if event is Event.EVT5:
        return Role.ACCEPTOR
    return (
        Role.REQUESTOR
        if state in (State.STA4, State.STA5, State.STA9, State.STA11)
        else (Role.ACCEPTOR)
    )


def fire(conn: Connection, event: Event) -> None:
    if event in PDU_INPUTS:
        conn.receive_data(PDU_INPUTS[event](), 0.0)
        drain(conn)
    elif event is Event.EVT1:
        conn.request_association(RQ, now=0.0)
    elif event in (Event.EVT2, Event.EVT5):
        conn.connection_made(0.0)
    elif event is Event.EVT7:
        conn.accept(AC, 0.0)  # type: ignore[arg-type]
    elif event is Event.EVT8:
        conn.reject(RJ, 0.0)
    elif event is Event.EVT9:
        conn.send_command(1, ECHO)
    elif event is Event.EVT11:
        conn.release(0.0)
    elif event is Event.EVT14:
        conn.release_response(0.0)
    elif event is Event.EVT15:
        conn.abort(now=0.0)
    elif event is Event.EVT17:
        conn.connection_lost(1.0)
    elif event is Event.EVT18:
        conn.handle_timer(1000.0)
    else:  # pragma: no cover
        raise AssertionError(event)


def test_engine_table_is_the_standard() -> None:
    assert {k: v.value for k, v in TABLE.items()} == EXPECTED


ALL_PAIRS = [(e, s) for e in Event for s in State]


@pytest.mark.parametrize(("event", "state"), ALL_PAIRS, ids=lambda x: x.name)
def test_every_event_in_every_state(event: Event, state: State) -> None:
    role = role_for(event, state)
    conn = connection_in(state, role)
    action = EXPECTED.get((event, state))
    if action is None:
        if event in (Event.EVT1, Event.EVT7, Event.EVT8, Event.EVT9, Event.EVT11, Event.EVT14):
            if state is State.STA13 or (state is State.STA1 and conn._used):
                # The association is over: a local answer that comes too late (the
                # peer aborted while the user decided) is a race, and is ignored.
                fire(conn, event)
                assert conn.state is state and wire_bytes(conn) == b""
                return
            # Anywhere else a blank cell for a local primitive is misuse, and says so.
            with pytest.raises(LocalProtocolError):
                fire(conn, event)
            assert conn.state is state
            return
        if event is Event.EVT15:
            # A-ABORT where the table is blank: in Sta2 (no association yet) the
            # transport is simply closed, elsewhere there is nothing left to abort.
            fire(conn, event)
            assert conn.state is State.STA1 if state is State.STA2 else state
            assert conn.wants_close == (state is State.STA2)
            return
        # A blank cell for a peer or transport event: nothing happens.
        fire(conn, event)
        assert conn.state is state
        assert not [c for c in conn.data_to_send() if c]
        return
    fire(conn, event)
    if action == "AE-6":
        assert conn.state is State.STA3
    elif action == "AR-8":
        assert conn.state is (State.STA9 if role is Role.REQUESTOR else State.STA10)
    else:
        assert conn.state is State(NEXT[action]), action
    sent = wire_bytes(conn)
    if action in SENDS:
        assert sent and sent[0] == SENDS[action], action
    else:
        assert sent == b"", action
    if action in CLOSES:
        assert conn.wants_close
    if action in ("AA-8", "AA-1", "AA-7"):
        abort = p.decode(p.PDUType.ABORT, sent[6:10])
        assert isinstance(abort, p.Abort)
        expected_source = 0 if event is Event.EVT15 else 2
        assert abort.source == expected_source


def test_ae6_rejects_unsupported_protocol_version() -> None:
    conn = Connection(Role.ACCEPTOR)
    conn.connection_made(0.0)
    rq = p.AssociateRQ("A", "B", RQ.contexts, RQ.user_info, protocol_version=2)
    conn.receive_data(p.encode(rq), 0.0)
    drain(conn)
    assert conn.state is State.STA13
    rj = p.decode(p.PDUType.ASSOCIATE_RJ, wire_bytes(conn)[6:])
    assert rj == p.AssociateRJ(1, 2, 2)
    assert conn.get_timer() == 30.0  # ARTIM started


def test_release_collision_requestor_and_acceptor() -> None:
    pair = Pair()
    pair.associate([acse.Requested(VERIFICATION)])
    pair.requestor.release(0.0)
    pair.acceptor.release(0.0)
    rq_out, ac_out = wire_bytes(pair.requestor), wire_bytes(pair.acceptor)
    pair.requestor.receive_data(ac_out, 0.0)
    pair.acceptor.receive_data(rq_out, 0.0)
    assert drain(pair.requestor) == [ReleaseRequested(collision=True)]
    assert drain(pair.acceptor) == [ReleaseRequested(collision=True)]
    assert pair.requestor.state is State.STA9
    assert pair.acceptor.state is State.STA10
    # PS3.8 9.2.2: the requestor answers first (AR-9), then the acceptor (AR-10, AR-4).
    pair.requestor.release_response(0.0)
    assert pair.requestor.state is State.STA11
    pair.pump()
    assert pair.acceptor.state is State.STA12
    pair.acceptor.release_response(0.0)
    pair.pump()
    assert pair.requestor.state is State.STA1 and pair.requestor.wants_close
    assert pair.acceptor.state is State.STA13


def test_artim_expiry_without_request_closes() -> None:
    conn = Connection(Role.ACCEPTOR)
    conn.connection_made(10.0)
    assert conn.get_timer() == 40.0
    conn.handle_timer(39.9)
    assert conn.state is State.STA2
    conn.handle_timer(40.0)
    assert conn.state is State.STA1 and conn.wants_close
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], Aborted)


def test_indication_for_acceptable_request() -> None:
    conn = Connection(Role.ACCEPTOR)
    conn.connection_made(0.0)
    conn.receive_data(p.encode(RQ), 0.0)
    assert drain(conn) == [AssociateIndication(RQ)]
    assert conn.get_timer() is None  # AE-6 stops ARTIM


# ------------------------------------------------- shortcuts past the table


def test_every_action_has_its_method() -> None:
    assert set(ACTIONS) == set(Action)
    for action, method in ACTIONS.items():
        assert method.__name__ == "_" + action.value.lower().replace("-", "_")


def test_every_shortcut_is_the_cell_it_skips() -> None:
    """Each cell the engine acts on without the table is, in the table, an action that
    leaves the state unchanged; and every such cell of Evt9/DT-1 and Evt10/DT-2 is one."""
    assert SHORTCUTS, "no shortcut at all: the hot path would go through the table"
    for (event, state), action in SHORTCUTS.items():
        assert TABLE[(event, state)] is action
        assert NEXT_STATE[action] is state
    for (event, state), action in TABLE.items():
        if (event, action) in ((Event.EVT9, Action.DT_1), (Event.EVT10, Action.DT_2)):
            assert ((event, state) in SHORTCUTS) == (NEXT_STATE[action] is state)
    assert {s for (e, s) in SHORTCUTS if e is Event.EVT10} == set(FAST_PATH_STATES)
    assert {s for (e, s) in SHORTCUTS if e is Event.EVT9} == set(SEND_FAST_PATH_STATES)


def _outcome(conn: Connection, event: Event) -> tuple[object, ...]:
    try:
        if event in PDU_INPUTS:
            conn.receive_data(PDU_INPUTS[event](), 0.0)
        else:
            fire(conn, event)
        error = None
    except LocalProtocolError as exc:
        error = str(exc)
    indications = [e for e in drain(conn) if not isinstance(e, StateChanged)]
    return (conn.state, error, wire_bytes(conn), conn.wants_close, repr(indications))


@pytest.mark.parametrize("event", [Event.EVT9, Event.EVT10], ids=lambda x: x.name)
@pytest.mark.parametrize("state", list(State), ids=lambda x: x.name)
def test_shortcuts_agree_with_the_table(event: Event, state: State) -> None:
    """The same input in every state, once with the shortcuts and once through the
    table only (tracing transitions turns every shortcut off): the same outcome."""
    role = role_for(event, state)
    fast = connection_in(state, role)
    slow = connection_in(state, role)
    slow.config = dataclasses.replace(slow.config, trace_transitions=True)
    assert _outcome(fast, event) == _outcome(slow, event)
