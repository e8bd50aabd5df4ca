"""A requestor and an acceptor engine wired together with no socket, and the faults a
peer can commit, fed whole and byte by byte."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine.pair import CT_IMAGE_STORAGE, VERIFICATION, Pair, drain, wire_bytes
from workers.engine import acse, dimse
from workers.engine import pdu as p
from workers.engine.connection import (
    Connection,
    EngineConfig,
    LocalProtocolError,
    MemoryBudget,
    Role,
)
from workers.engine.fsm import State
from workers.engine.primitives import (
    Aborted,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    CommandReceived,
    DataSetReceived,
    PDUReceived,
    Released,
    ReleaseRequested,
)

SPLITS = [0, 1, 7, 4096]


def store_rq(message_id: int = 1) -> dimse.Command:
    return dimse.Command(
        dimse.CommandField.C_STORE_RQ,
        MessageID=message_id,
        AffectedSOPClassUID=CT_IMAGE_STORAGE,
        AffectedSOPInstanceUID=f"1.2.3.4.{message_id}",
        Priority=0,
        CommandDataSetType=dimse.DATASET_PRESENT,
    )


@pytest.mark.parametrize("split", SPLITS)
def test_associate_echo_release(split: int) -> None:
    pair = Pair(split=split)
    ac = pair.associate()
    assert isinstance(ac, p.AssociateAC)
    assert isinstance(pair.acceptor_events[0], AssociateIndication)
    assert isinstance(pair.requestor_events[0], AssociateAccepted)
    assert pair.requestor.state is pair.acceptor.state is State.STA6
    assert set(pair.requestor.contexts) == set(pair.acceptor.contexts) == {1, 3}
    assert pair.requestor.peer_max_pdu_length == acse.AcceptorPolicy().max_pdu_length

    echo = dimse.Command(
        dimse.CommandField.C_ECHO_RQ, MessageID=7, AffectedSOPClassUID=VERIFICATION
    )
    pair.requestor.send_message(1, echo)
    pair.pump()
    received = pair.acceptor_events[-1]
    assert isinstance(received, CommandReceived)
    assert received.context_id == 1 and received.command.MessageID == 7
    assert not received.command.has_dataset

    rsp = dimse.Command(
        dimse.CommandField.C_ECHO_RSP,
        MessageIDBeingRespondedTo=7,
        AffectedSOPClassUID=VERIFICATION,
        Status=0,
    )
    pair.acceptor.send_message(1, rsp)
    pair.pump()
    answer = pair.requestor_events[-1]
    assert isinstance(answer, CommandReceived) and answer.command.Status == 0

    pair.requestor.release(0.0)
    pair.pump()
    assert pair.acceptor_events[-1] == ReleaseRequested()
    assert pair.acceptor.state is State.STA8
    pair.acceptor.release_response(0.0)
    pair.pump()
    assert pair.requestor_events[-1] == Released()
    assert pair.requestor.state is State.STA1 and pair.requestor.wants_close
    assert pair.acceptor.state is State.STA13
    pair.acceptor.connection_lost(1.0)
    assert pair.acceptor.state is State.STA1


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("max_pdu", [0, 100, 16384])
@pytest.mark.parametrize("use_sink", [False, True])
def test_store_multi_fragment_dataset(split: int, max_pdu: int, use_sink: bool) -> None:
    pair = Pair(acceptor_config=EngineConfig(max_pdu_length=max_pdu), split=split)
    pair.associate(policy=acse.AcceptorPolicy(max_pdu_length=max_pdu))
    dataset = os.urandom(50_000)
    pair.requestor.send_message(3, store_rq(), dataset)
    chunks: list[bytes] = []

    def on_acceptor(ev: object) -> None:
        if isinstance(ev, CommandReceived) and use_sink:
            pair.acceptor.set_dataset_sink(lambda view: chunks.append(bytes(view)))

    pair.pump(on_acceptor)
    cmd, done = pair.acceptor_events[-2:]
    assert isinstance(cmd, CommandReceived) and cmd.command.AffectedSOPInstanceUID == "1.2.3.4.1"
    assert isinstance(done, DataSetReceived) and done.context_id == 3
    if use_sink:
        assert done.data is None and b"".join(chunks) == dataset
        if max_pdu:
            assert len(chunks) > 1
    else:
        assert done.data == dataset
    if max_pdu:
        # every PDU the requestor sent respects the acceptor's maximum
        for direction, data in pair.wire[2:]:
            if direction == "rq->ac":
                offset = 0
                while offset < len(data):
                    length = int.from_bytes(data[offset + 2 : offset + 6], "big")
                    assert length <= max_pdu
                    offset += 6 + length


def test_many_messages_in_one_read() -> None:
    pair = Pair()
    pair.associate()
    for i in range(1, 21):
        pair.requestor.send_message(3, store_rq(i), bytes([i]) * (100 * i))
    pair.pump()
    stores = [e for e in pair.acceptor_events if isinstance(e, DataSetReceived)]
    assert [len(e.data or b"") for e in stores] == [100 * i for i in range(1, 21)]


def test_abort_reaches_the_peer() -> None:
    pair = Pair()
    pair.associate()
    pair.requestor.abort(now=0.0)
    assert pair.requestor.state is State.STA13
    pair.pump()
    assert pair.acceptor_events[-1] == Aborted(0, 0, by_peer=True, detail="A-ABORT")
    assert pair.acceptor.state is State.STA1 and pair.acceptor.wants_close
    pair.requestor.connection_lost(1.0)
    assert pair.requestor.state is State.STA1


@pytest.mark.parametrize(
    ("policy", "called", "expected"),
    [
        (acse.AcceptorPolicy(ae_title="ME", require_called_ae=True), "OTHER", (1, 1, 7)),
        (acse.AcceptorPolicy(allowed_calling_aes={"X"}), "ACCEPTOR", (1, 1, 3)),
        (acse.AcceptorPolicy(max_contexts=1), "ACCEPTOR", (1, 3, 2)),
    ],
)
def test_rejections(policy: acse.AcceptorPolicy, called: str, expected: tuple[int, ...]) -> None:
    pair = Pair()
    rq = acse.build_request(called, "REQUESTOR", [acse.Requested(VERIFICATION)] * 2)
    result = acse.negotiate(rq, policy)
    assert isinstance(result, p.AssociateRJ)
    assert (result.result, result.source, result.reason) == expected
    pair.requestor.request_association(rq, 0.0)
    pair.requestor.connection_made(0.0)
    pair.acceptor.connection_made(0.0)
    pair.pump(
        lambda ev: (
            pair.acceptor.reject(result, 0.0) if isinstance(ev, AssociateIndication) else None
        )
    )
    assert pair.requestor_events == [AssociateRejected(result)]
    assert pair.requestor.wants_close and pair.acceptor.state is State.STA13


def test_application_context_rejected() -> None:
    rq = p.AssociateRQ("A", "B", (), application_context="1.2.3")
    rj = acse.negotiate(rq, acse.AcceptorPolicy())
    assert rj == p.AssociateRJ(1, 1, 2)


def test_context_results_and_roles() -> None:
    rq = p.AssociateRQ(
        "A",
        "B",
        (
            p.PresentationContextRQ(1, VERIFICATION, ("1.2.840.10008.1.2",)),
            p.PresentationContextRQ(3, "1.2.3.unknown", ("1.2.840.10008.1.2",)),
            p.PresentationContextRQ(5, CT_IMAGE_STORAGE, ("1.2.840.10008.1.2.4.50",)),
            p.PresentationContextRQ(7, CT_IMAGE_STORAGE, ("9.9", "1.2.840.10008.1.2.1")),
            p.PresentationContextRQ(7, CT_IMAGE_STORAGE, ("1.2.840.10008.1.2",)),
        ),
        p.UserInformation(max_length=0, roles=(p.RoleSelection(CT_IMAGE_STORAGE, True, True),)),
    )
    policy = acse.AcceptorPolicy(
        syntaxes={
            VERIFICATION: ("1.2.840.10008.1.2",),
            CT_IMAGE_STORAGE: acse.UNCOMPRESSED_TRANSFER_SYNTAXES,
        }
    )
    ac = acse.negotiate(rq, policy)
    assert isinstance(ac, p.AssociateAC)
    assert [(c.id, c.result, c.transfer_syntax) for c in ac.contexts] == [
        (1, 0, "1.2.840.10008.1.2"),
        (3, 3, ""),
        (5, 4, ""),
        (7, 0, "1.2.840.10008.1.2.1"),
        (7, 2, ""),
    ]
    assert ac.user_info.roles == (p.RoleSelection(CT_IMAGE_STORAGE, True, True),)
    restricted = acse.negotiate(rq, acse.AcceptorPolicy(role_selection=()))
    assert isinstance(restricted, p.AssociateAC)
    assert restricted.user_info.roles == (p.RoleSelection(CT_IMAGE_STORAGE, False, False),)


def established_acceptor(config: EngineConfig | None = None) -> Connection:
    pair = Pair(acceptor_config=config)
    pair.associate()
    pair.acceptor.data_to_send()
    return pair.acceptor


def abort_of(conn: Connection) -> p.Abort:
    out = wire_bytes(conn)
    assert out[:1] == b"\x07", out[:12]
    abort = p.decode(p.PDUType.ABORT, out[6:10])
    assert isinstance(abort, p.Abort)
    return abort


def pdata(*pdvs: tuple[int, int, bytes]) -> bytes:
    return p.encode(p.PDataTF(tuple(p.PDV(c, m, d) for c, m, d in pdvs)))


ECHO_RAW = dimse.encode_command(
    dimse.Command(dimse.CommandField.C_ECHO_RQ, MessageID=1, AffectedSOPClassUID=VERIFICATION)
)
STORE_RAW = dimse.encode_command(store_rq())

FAULTS = {
    "unknown context": (pdata((9, 3, ECHO_RAW)), p.AbortReason.INVALID_PDU_PARAMETER),
    "data before command": (pdata((1, 2, b"xx")), p.AbortReason.UNEXPECTED_PDU_PARAMETER),
    "data on no-dataset command": (
        pdata((1, 3, ECHO_RAW), (1, 2, b"xx")),
        p.AbortReason.UNEXPECTED_PDU_PARAMETER,
    ),
    "context switch mid-message": (
        pdata((3, 3, STORE_RAW), (1, 2, b"xx")),
        p.AbortReason.UNEXPECTED_PDU_PARAMETER,
    ),
    "command after command": (
        pdata((3, 3, STORE_RAW), (3, 3, STORE_RAW)),
        p.AbortReason.UNEXPECTED_PDU_PARAMETER,
    ),
    "garbage command": (pdata((1, 3, b"\x01\x02\x03")), p.AbortReason.INVALID_PDU_PARAMETER),
    "pdv overruns pdu": (
        b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\xff\x01\x03xx",
        p.AbortReason.INVALID_PDU_PARAMETER,
    ),
    "pdv shorter than 2": (
        b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x01\x01\x03",
        p.AbortReason.INVALID_PDU_PARAMETER,
    ),
    "unknown pdu type": (b"\x09\x00\x00\x00\x00\x00", p.AbortReason.UNRECOGNIZED_PDU),
    "malformed release": (b"\x05\x00\x00\x00\x00\x01\x00", p.AbortReason.INVALID_PDU_PARAMETER),
    "association request again": (
        p.encode(acse.build_request("A", "B", [acse.Requested(VERIFICATION)])),
        p.AbortReason.UNEXPECTED_PDU,
    ),
}


@pytest.mark.parametrize("name", sorted(FAULTS))
@pytest.mark.parametrize("split", [0, 1])
def test_peer_faults_abort(name: str, split: int) -> None:
    data, reason = FAULTS[name]
    conn = established_acceptor()
    events: list[object] = []
    for chunk in [data] if not split else [data[i : i + 1] for i in range(len(data))]:
        conn.receive_data(chunk, 0.0)
        events += drain(conn)
        if any(isinstance(e, Aborted) for e in events):
            break
    aborted = [e for e in events if isinstance(e, Aborted)]
    assert len(aborted) == 1 and not aborted[0].by_peer, events
    assert abort_of(conn) == p.Abort(2, reason)
    assert conn.state is State.STA13
    # whatever else arrives is ignored, and the peer's close ends it
    conn.receive_data(os.urandom(100), 0.0)
    assert drain(conn) == []
    conn.connection_lost(2.0)
    assert conn.state is State.STA1


def test_oversized_pdata_refused_before_buffering() -> None:
    conn = established_acceptor(EngineConfig(max_pdu_length=16384))
    conn.receive_data(b"\x04\x00" + (16385).to_bytes(4, "big"), 0.0)
    (event,) = drain(conn)
    assert isinstance(event, Aborted)
    assert abort_of(conn) == p.Abort(2, p.AbortReason.INVALID_PDU_PARAMETER)


def test_oversized_control_pdu_refused_before_buffering() -> None:
    conn = Connection(Role.ACCEPTOR, EngineConfig(max_control_pdu_length=4096))
    conn.connection_made(0.0)
    conn.receive_data(b"\x01\x00" + (1 << 31).to_bytes(4, "big") + b"x" * 1000, 0.0)
    (event,) = drain(conn)
    assert isinstance(event, Aborted) and "maximum 4096" in event.detail
    assert conn.buffered == 0
    assert conn.state is State.STA13


def test_large_pdu_streams_without_buffering_whole() -> None:
    """A 4 MiB P-DATA-TF fed in 64 KiB reads never needs a 4 MiB buffer."""
    conn = established_acceptor(EngineConfig(max_pdu_length=0, read_buffer_size=65536))
    conn.receive_data(pdata((3, 3, STORE_RAW)), 0.0)
    (cmd,) = drain(conn)
    assert isinstance(cmd, CommandReceived)
    total = 0

    def sink(view: memoryview) -> None:
        nonlocal total
        total += len(view)

    conn.set_dataset_sink(sink)
    size = 4 * 1024 * 1024
    wire = pdata((3, 2, b"\0" * size))
    for i in range(0, len(wire), 65536):
        conn.receive_data(wire[i : i + 65536], 0.0)
        events = drain(conn)
        assert len(conn._buf) <= 2 * 65536
    assert events == [DataSetReceived(3, None)] and total == size


def test_dataset_in_memory_limit() -> None:
    conn = established_acceptor(EngineConfig(max_dataset_in_memory=1000))
    conn.receive_data(pdata((3, 3, STORE_RAW), (3, 2, b"x" * 1001)), 0.0)
    events = drain(conn)
    assert isinstance(events[-1], Aborted) and "1000 bytes in memory" in events[-1].detail


def test_memory_budget_bounds_all_connections_together() -> None:
    """Each association may hold up to max_dataset_in_memory, but the connections of a
    process share one budget: the one that would pass it is aborted, the others go on,
    and what a connection held is given back when its data set is delivered or its
    transport closes."""
    budget = MemoryBudget(10_000)
    a, b, c = (established_acceptor(EngineConfig(memory_budget=budget)) for _ in range(3))
    a.receive_data(pdata((3, 3, STORE_RAW), (3, 0, b"a" * 6000)), 0.0)
    assert [type(e) for e in drain(a)] == [CommandReceived]
    assert budget.used == 6000
    b.receive_data(pdata((3, 3, STORE_RAW), (3, 0, b"b" * 6000)), 0.0)
    events = drain(b)
    assert isinstance(events[-1], Aborted) and "6000 of 10000 bytes" in events[-1].detail
    assert abort_of(b) == p.Abort(2, p.AbortReason.NOT_SPECIFIED)
    assert budget.used == 6000  # b's refused fragment was never counted
    a.receive_data(pdata((3, 2, b"a" * 1000)), 0.0)
    (done,) = drain(a)
    assert isinstance(done, DataSetReceived) and done.data == b"a" * 7000
    assert budget.used == 0
    c.receive_data(pdata((3, 3, STORE_RAW), (3, 0, b"c" * 9000)), 0.0)
    assert [type(e) for e in drain(c)] == [CommandReceived]
    assert budget.used == 9000
    c.connection_lost(1.0)  # the peer went away halfway: its bytes are given back
    drain(c)
    assert budget.used == 0


def test_read_buffer_shrinks_after_a_large_control_pdu() -> None:
    """A 60 KiB A-ASSOCIATE-RQ grows the receive buffer; once parsed, the next read
    gets a buffer of the configured size again."""
    conn = Connection(Role.ACCEPTOR, EngineConfig(read_buffer_size=4096))
    conn.connection_made(0.0)
    identity = p.UserIdentityRQ(1, False, b"u" * 60_000, b"")
    rq = acse.build_request("A", "B", [acse.Requested(VERIFICATION)], user_identity=identity)
    conn.receive_data(p.encode(rq), 0.0)
    (event,) = drain(conn)
    assert isinstance(event, AssociateIndication)
    assert len(conn.get_buffer()) == 4096


def test_mid_message_tells_when_the_peer_owes_bytes() -> None:
    conn = established_acceptor()
    assert not conn.mid_message
    wire = pdata((3, 3, STORE_RAW), (3, 2, b"x" * 100))
    conn.receive_data(wire[:3], 0.0)  # half a PDU header
    assert conn.mid_message
    conn.receive_data(wire[3:40], 0.0)  # the command is not complete yet
    drain(conn)
    assert conn.mid_message
    conn.receive_data(wire[40:], 0.0)
    drain(conn)
    assert not conn.mid_message


def test_sink_only_right_after_command() -> None:
    conn = established_acceptor()
    with pytest.raises(LocalProtocolError):
        conn.set_dataset_sink(lambda view: None)


def test_send_on_unaccepted_context_is_misuse() -> None:
    conn = established_acceptor()
    with pytest.raises(LocalProtocolError):
        conn.send_command(99, ECHO_RAW)


def test_peer_closing_mid_association() -> None:
    conn = established_acceptor()
    conn.connection_lost(5.0)
    (event,) = drain(conn)
    assert isinstance(event, Aborted) and event.source is None and event.by_peer


def test_get_buffer_receives_in_place() -> None:
    conn = established_acceptor()
    data = pdata((1, 3, ECHO_RAW))
    view = conn.get_buffer(len(data))
    view[: len(data)] = data
    conn.buffer_updated(len(data), 0.0)
    (event,) = drain(conn)
    assert isinstance(event, CommandReceived) and event.command.MessageID == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000), st.sampled_from([State.STA2, State.STA6]))
def test_random_bytes_never_raise(data: bytes, state: State) -> None:
    conn = established_acceptor() if state is State.STA6 else Connection(Role.ACCEPTOR)
    if state is State.STA2:
        conn.connection_made(0.0)
    conn.receive_data(data, 0.0)
    drain(conn)
    conn.handle_timer(100.0)
    drain(conn)
    conn.connection_lost(200.0)
    drain(conn)
    assert conn.state is State.STA1


VALID_SESSION = (
    p.encode(acse.build_request("A", "B", [acse.Requested(VERIFICATION)]))
    + pdata((1, 3, ECHO_RAW))
    + pdata((1, 1, STORE_RAW[:10]))
    + p.encode(p.ReleaseRQ())
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_sessions_never_raise(data: st.DataObject) -> None:
    wire = bytearray(VALID_SESSION)
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    conn = Connection(Role.ACCEPTOR)
    conn.connection_made(0.0)
    step = data.draw(st.sampled_from([1, 3, 64, len(wire) or 1]))
    for i in range(0, cut, step):
        conn.receive_data(bytes(wire[i : i + step]), 0.0)
        for event in drain(conn):
            if isinstance(event, AssociateIndication):
                answer = acse.negotiate(event.request, acse.AcceptorPolicy())
                if isinstance(answer, p.AssociateAC):
                    conn.accept(answer, 0.0)
                else:
                    conn.reject(answer, 0.0)
            elif isinstance(event, ReleaseRequested):
                conn.release_response(0.0)
        conn.data_to_send()
    conn.handle_timer(1000.0)
    conn.connection_lost(1000.0)
    drain(conn)
    assert conn.state is State.STA1


@pytest.mark.parametrize("max_pdu", [16383, 4097, 9])
def test_fragments_are_even_for_an_odd_maximum(max_pdu: int) -> None:
    """DCMTK aborts on odd fragment lengths; an odd Maximum Length must not cause them."""
    pair = Pair(acceptor_config=EngineConfig(max_pdu_length=max_pdu))
    pair.associate(policy=acse.AcceptorPolicy(max_pdu_length=max_pdu))
    pair.requestor.send_dataset(3, b"x" * 40000)
    wire = wire_bytes(pair.requestor)
    lengths = []
    offset = 0
    while offset < len(wire):
        pdu_length = int.from_bytes(wire[offset + 2 : offset + 6], "big")
        assert pdu_length <= max_pdu
        lengths.append(int.from_bytes(wire[offset + 6 : offset + 10], "big") - 2)
        offset += 6 + pdu_length
    assert sum(lengths) == 40000
    assert all(n % 2 == 0 for n in lengths), lengths


def test_traced_pdata_is_reported_whole() -> None:
    """With PDU tracing on (a bound EVT_PDU_RECV), a streamed P-DATA-TF is still
    reported as the decoded PDU once it has gone through."""
    conn = established_acceptor(EngineConfig(trace_pdus=True))
    drain(conn)
    wire = pdata((1, 1, ECHO_RAW[:10]), (1, 3, ECHO_RAW[10:]))
    for i in range(len(wire)):  # byte by byte, to cross every boundary
        conn.receive_data(wire[i : i + 1], 0.0)
    events = drain(conn)
    traced = [e for e in events if isinstance(e, PDUReceived)]
    assert len(traced) == 1 and isinstance(traced[0].pdu, p.PDataTF)
    assert [pdv.data for pdv in traced[0].pdu.pdvs] == [ECHO_RAW[:10], ECHO_RAW[10:]]
    assert any(isinstance(e, CommandReceived) for e in events)


def test_read_buffer_is_small_until_associated() -> None:
    """A connection that has not associated (a peer that connects and sends nothing,
    or one being refused) holds a small read buffer; once associated, the configured
    one, no larger than our Maximum Length needs."""
    config = EngineConfig(read_buffer_size=256 * 1024, max_pdu_length=1024 * 1024)
    pair = Pair(acceptor_config=config)
    pair.acceptor.connection_made(0.0)
    unassociated = len(pair.acceptor.get_buffer(-1))
    assert unassociated <= 16 * 1024
    assert isinstance(pair.associate(), p.AssociateAC)
    assert len(pair.acceptor.get_buffer(-1)) >= 256 * 1024
    small_pdu = Pair(
        acceptor_config=EngineConfig(read_buffer_size=256 * 1024, max_pdu_length=16384)
    )
    small = small_pdu.associate(policy=acse.AcceptorPolicy(max_pdu_length=16384))
    assert isinstance(small, p.AssociateAC)
    assert 16384 + 6 <= len(small_pdu.acceptor.get_buffer(-1)) < 256 * 1024
    # and data still flows through it, a message larger than the buffer included
    data = os.urandom(600 * 1024)
    small_pdu.requestor.send_message(3, store_rq(), data)
    small_pdu.pump()
    received = [e for e in small_pdu.acceptor_events if isinstance(e, DataSetReceived)]
    assert received[0].data == data
