"""A corpus of malformed sessions replayed against the REAL running receiver.

Each case is a raw-socket peer sending hand-built (or engine-encoded, then broken)
bytes. Every case must get its protocol answer (A-ABORT with the right source and
reason, A-ASSOCIATE-RJ, or a failure status); no timing is asserted: the peer's
read bound only stops waiting, and an answer a timer would have produced (an A-ABORT
(2, 0), a close without a PDU) is told apart by what it is. After every case the
process tree is the same (no worker died).

Meanwhile a well-behaved pynetdicom sender stores 50 small instances in a loop; the
last tests check that none of its stores failed, and that the store holds nothing
but correct instances: no partial file, nothing outside the storage directory.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest

from workers.engine import dimse
from workers.engine import pdu as p

from . import wire as w
from .conftest import (
    ANSWER_BOUND,
    ARTIM_TIMEOUT,
    CT_IMAGE,
    EXPLICIT_LE,
    NETWORK_TIMEOUT,
    VERIFICATION,
    Answer,
    Peer,
    Receiver,
    Sender,
    incoming,
    open_and_unanswered,
    stored_files,
    wait_until,
)

PROVIDER = p.AbortSource.SERVICE_PROVIDER
IMPLICIT = "1.2.840.10008.1.2"
R = p.AbortReason

#: SOP Instance UIDs the corpus stores correctly on purpose (the positive controls).
GOOD_UIDS: set[str] = set()
#: Peers answered with an A-ABORT or A-ASSOCIATE-RJ, left open: PS3.8 has the
#: receiver close them (ARTIM) itself; checked all at once at the end, in parallel,
#: instead of waiting out ARTIM case by case.
LINGERING: list[tuple[str, Peer]] = []


@pytest.fixture(scope="module", autouse=True)
def _lingering_peers_are_closed() -> Iterator[None]:
    """Every peer answered with an A-ABORT or A-ASSOCIATE-RJ by the tests that ran and
    left open is closed by the receiver (ARTIM), without another PDU, within the
    bound: checked once, in parallel, after whichever tests ran (in any order),
    instead of waiting out ARTIM case by case. A failure shows as a teardown error."""
    yield
    still_open = []
    for name, peer in LINGERING:
        try:
            answer = peer.read_pdu()  # until ANSWER_BOUND after the peer's last send
        except TimeoutError:
            still_open.append(f"{name}: still open {ANSWER_BOUND} s after its last byte")
        else:
            if answer.pdu is not None:
                still_open.append(f"{name}: sent {answer.pdu}")
        peer.close()
    LINGERING.clear()
    assert not still_open, still_open


@pytest.fixture(autouse=True)
def _tree_survives(rx: Receiver, sender: Sender) -> Iterator[None]:
    """Every case runs with the sender going, and leaves the process tree intact."""
    yield
    rx.assert_alive()


def associate(peer: Peer) -> p.AssociateAC:
    peer.send(w.rq_bytes())
    answer = peer.read_pdu()
    assert isinstance(answer.pdu, p.AssociateAC), answer
    accepted = {c.id for c in answer.pdu.contexts if c.result == 0}
    assert accepted == {w.ECHO_CTX, w.STORE_CTX}, answer.pdu.contexts
    return answer.pdu


def assert_abort(answer: Answer, reason: int) -> None:
    """The answer is the provider's A-ABORT for ``reason`` (not a timer's (2, 0),
    and not the connection closing without one)."""
    assert isinstance(answer.pdu, p.Abort), answer
    assert (answer.pdu.source, answer.pdu.reason) == (PROVIDER, reason), answer.pdu


def assert_closed_after(peer: Peer, answers: list[Answer]) -> None:
    """The receiver closed the connection: ``Peer.answers`` ends with ``None`` only
    on EOF/reset (its own safety bound raises ``TimeoutError`` instead)."""
    assert answers[-1].pdu is None, answers


def linger(name: str, peer: Peer) -> None:
    """Leave ``peer`` open; the module's teardown (_lingering_peers_are_closed) checks
    that the receiver closes it."""
    LINGERING.append((name, peer))


# ------------------------------------------------------------ before association


PRE_ASSOCIATION: dict[str, tuple[bytes, int]] = {
    # P-DATA, A-RELEASE-RQ/RP, A-ASSOCIATE-AC/RJ in Sta2: unexpected PDU (AA-1)
    "p-data-before-association": (w.pdata(1, 3, b"\0" * 8), R.UNEXPECTED_PDU),
    "release-rq-before-association": (p.encode(p.ReleaseRQ()), R.UNEXPECTED_PDU),
    "release-rp-before-association": (p.encode(p.ReleaseRP()), R.UNEXPECTED_PDU),
    "associate-rj-to-acceptor": (p.encode(p.AssociateRJ(1, 1, 1)), R.UNEXPECTED_PDU),
    # unknown PDU types (Evt19): unrecognized PDU
    "unknown-pdu-type-0x08": (w.header(0x08, 4) + b"\0" * 4, R.UNRECOGNIZED_PDU),
    "unknown-pdu-type-0x00": (w.header(0x00, 0), R.UNRECOGNIZED_PDU),
    "unknown-pdu-type-0xff": (w.header(0xFF, 2) + b"ab", R.UNRECOGNIZED_PDU),
    # oversized declared lengths: refused from the header alone
    "p-data-declaring-2GB": (w.header(4, 0x80000000) + b"\0" * 64, R.INVALID_PDU_PARAMETER),
    "associate-rq-declaring-4GB": (w.header(1, 0xFFFFFFFF) + b"\0" * 64, R.INVALID_PDU_PARAMETER),
    # wrong lengths inside the A-ASSOCIATE-RQ
    "rq-shorter-than-fixed-fields": (w.header(1, 10) + b"\0" * 10, R.INVALID_PDU_PARAMETER),
    "rq-item-overruns-pdu": (
        w.raw_rq([w.app_context_item(), b"\x20\x00\xff\xff" + b"\x01\x00\x00\x00"]),
        R.INVALID_PDU_PARAMETER,
    ),
    "rq-without-user-information": (
        w.raw_rq([w.app_context_item(), w.context_item(1, VERIFICATION)]),
        R.INVALID_PDU_PARAMETER,
    ),
    "rq-even-context-id": (
        w.raw_rq([w.app_context_item(), w.context_item(2, VERIFICATION), w.user_info_item()]),
        R.INVALID_PDU_PARAMETER,
    ),
    "rq-max-length-sub-item-of-3-bytes": (
        w.raw_rq(
            [
                w.app_context_item(),
                w.context_item(1, VERIFICATION),
                w.item(0x50, w.item(0x51, b"\0\0\1")),
            ]
        ),
        R.INVALID_PDU_PARAMETER,
    ),
    # unknown item types where the standard allows none: in a presentation context
    "rq-unknown-sub-item-in-context": (
        w.raw_rq(
            [
                w.app_context_item(),
                w.context_item(1, VERIFICATION, extra=w.item(0x77, b"??")),
                w.user_info_item(),
            ]
        ),
        R.UNRECOGNIZED_PDU_PARAMETER,
    ),
    # a known item in the wrong place: an AC context item in a request
    "rq-with-ac-context-item": (
        w.raw_rq(
            [
                w.app_context_item(),
                w.item(0x21, b"\x01\x00\x00\x00" + w.item(0x40, EXPLICIT_LE.encode())),
                w.user_info_item(),
            ]
        ),
        R.UNEXPECTED_PDU_PARAMETER,
    ),
}


@pytest.mark.parametrize("name", sorted(PRE_ASSOCIATION))
def test_pre_association_faults_are_aborted(rx: Receiver, name: str) -> None:
    data, reason = PRE_ASSOCIATION[name]
    peer = Peer(rx.port)
    peer.send(data)
    assert_abort(peer.read_pdu(), reason)
    linger(name, peer)


def test_abort_then_the_receiver_closes(rx: Receiver) -> None:
    """After its A-ABORT the receiver waits for the peer to close, at most ARTIM
    (PS3.8 AA-1, then AA-2 on Evt18), and sends nothing more."""
    with Peer(rx.port) as peer:
        peer.send(w.pdata(1, 3, b"\0" * 8))
        first = peer.read_pdu()
        assert_abort(first, R.UNEXPECTED_PDU)
        # It waits for the peer (AA-1 starts ARTIM) instead of closing at once.
        assert open_and_unanswered(peer, ARTIM_TIMEOUT - 0.5)
        answers = [first, *peer.answers()]
    assert_closed_after(peer, answers)
    assert len(answers) == 2, answers


def test_unknown_variable_item_is_ignored(rx: Receiver) -> None:
    """PS3.8 9.3.1: an unrecognised variable item of the A-ASSOCIATE-RQ is ignored."""
    data = w.raw_rq(
        [
            w.app_context_item(),
            w.item(0x99, b"whatever"),
            w.context_item(1, VERIFICATION),
            w.user_info_item(extra=w.item(0x7A, b"unknown sub-item")),
        ]
    )
    with Peer(rx.port) as peer:
        peer.send(data)
        answer = peer.read_pdu()
    assert isinstance(answer.pdu, p.AssociateAC), answer


def test_items_out_of_order_get_an_answer(rx: Receiver) -> None:
    """User information first, presentation contexts last, transfer syntax before the
    abstract syntax: the receiver answers (it is lenient: it accepts) promptly."""
    data = w.raw_rq(
        [
            w.user_info_item(),
            w.context_item(1, VERIFICATION, abstract_last=True),
            w.app_context_item(),
        ]
    )
    with Peer(rx.port) as peer:
        peer.send(data)
        answer = peer.read_pdu()
    assert isinstance(answer.pdu, p.AssociateAC | p.AssociateRJ | p.Abort), answer


@pytest.mark.parametrize(
    ("name", "data", "rj"),
    [
        # PS3.8 9.3.2: bit 0 of the protocol version clear: provider (ACSE) rejects
        (
            "protocol-version-2",
            w.raw_rq(
                [w.app_context_item(), w.context_item(1, VERIFICATION), w.user_info_item()],
                version=2,
            ),
            (1, 2, 2),
        ),
        (
            "wrong-application-context",
            w.raw_rq(
                [
                    w.app_context_item("1.2.3.4"),
                    w.context_item(1, VERIFICATION),
                    w.user_info_item(),
                ]
            ),
            (1, 1, 2),
        ),
        # 5000 presentation contexts (IDs wrap over the 128 odd ones): local limit
        (
            "5000-presentation-contexts",
            w.raw_rq(
                [w.app_context_item()]
                + [w.context_item(2 * (i % 128) + 1, f"1.2.3.{i}") for i in range(5000)]
                + [w.user_info_item()]
            ),
            (1, 3, 2),
        ),
    ],
)
def test_unacceptable_requests_are_rejected(
    rx: Receiver, name: str, data: bytes, rj: tuple[int, int, int]
) -> None:
    peer = Peer(rx.port)
    peer.send(data)
    answer = peer.read_pdu()
    assert isinstance(answer.pdu, p.AssociateRJ), answer
    assert (answer.pdu.result, answer.pdu.source, answer.pdu.reason) == rj
    linger(name, peer)


def test_request_full_of_role_selections_gets_an_answer(rx: Receiver) -> None:
    from tests.fuzz.harness import many_role_selections_rq

    with Peer(rx.port) as peer:
        peer.send(many_role_selections_rq())
        answer = peer.read_pdu()
    assert isinstance(answer.pdu, p.AssociateAC | p.AssociateRJ), answer


def test_truncated_request_is_cut_by_artim(rx: Receiver) -> None:
    """Half an A-ASSOCIATE-RQ, then silence: ARTIM closes the connection (AA-2)."""
    data = w.rq_bytes()
    with Peer(rx.port) as peer:
        peer.send(data[: len(data) // 2])
        # Half a request is not a fault by itself: the receiver waits for the rest.
        assert open_and_unanswered(peer, ARTIM_TIMEOUT - 0.5)
        answers = peer.answers()
    assert [a.pdu for a in answers] == [None], answers


def test_header_only_then_silence_is_cut_by_artim(rx: Receiver) -> None:
    with Peer(rx.port) as peer:
        peer.send(b"\x01\x00\x00")  # half a PDU header
        answers = peer.answers()
    assert [a.pdu for a in answers] == [None], answers


def test_trickle_one_byte_per_second_is_cut_by_artim(rx: Receiver) -> None:
    """A peer that trickles its A-ASSOCIATE-RQ one byte a second is not associated:
    ARTIM (2 s) bounds the whole request, not the gap between bytes."""
    data = w.rq_bytes()
    closed = False
    answered = b""
    with Peer(rx.port) as peer:
        for byte in data[:10]:  # bounded: 10 bytes, 10 s at most
            try:
                peer.send(bytes([byte]))
            except OSError:
                closed = True
                break
            peer.sock.settimeout(1.0)
            try:
                got = peer.sock.recv(1024)
                if got == b"":
                    closed = True
                    break
                answered += got
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    # Cut before its tenth byte (ten one-second gaps): ARTIM bounds the whole
    # request, a per-byte idle timer would never have fired.
    assert closed, "a peer trickling its request was never cut off"
    assert not answered, f"ARTIM closes without a PDU, got {answered!r}"


# ------------------------------------------------------------- after association


def test_well_formed_store_is_stored(rx: Receiver) -> None:
    """The positive control for the raw peer: a correct C-STORE succeeds."""
    uid = "1.2.826.0.1.3680043.10.1415.7.1"
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(
            w.command(w.STORE_CTX, w.store_rq(1, uid))
            + w.dataset(w.STORE_CTX, w.explicit_dataset(uid))
        )
        rsp = w.decode_response(peer.read_pdu().pdu)
        assert rsp is not None and rsp.Status == 0 and rsp.MessageIDBeingRespondedTo == 1
        peer.send(p.encode(p.ReleaseRQ()))
        assert isinstance(peer.read_pdu().pdu, p.ReleaseRP)
    GOOD_UIDS.add(uid)


AFTER_ASSOCIATION: dict[str, tuple[bytes, int]] = {
    "second-associate-rq": (w.rq_bytes(), R.UNEXPECTED_PDU),
    "associate-ac-to-acceptor": (
        p.encode(p.AssociateAC("A", "B", (p.PresentationContextAC(1, 0, IMPLICIT),))),
        R.UNEXPECTED_PDU,
    ),
    "unknown-pdu-type": (w.header(0x09, 0), R.UNRECOGNIZED_PDU),
    "p-data-declaring-2GB": (w.header(4, 0x80000000) + b"\0" * 64, R.INVALID_PDU_PARAMETER),
    "p-data-length-5": (w.header(4, 5) + b"\0" * 5, R.INVALID_PDU_PARAMETER),
    "pdv-longer-than-its-pdu": (
        w.header(4, 12) + struct.pack(">LBB", 100, 1, 3) + b"\0" * 6,
        R.INVALID_PDU_PARAMETER,
    ),
    "pdv-on-unproposed-context-5": (w.pdata(5, 3, b"\0" * 8), R.INVALID_PDU_PARAMETER),
    "pdv-on-even-context-2": (w.pdata(2, 3, b"\0" * 8), R.INVALID_PDU_PARAMETER),
    "data-set-without-command": (w.dataset(w.STORE_CTX, b"\0" * 8), R.UNEXPECTED_PDU_PARAMETER),
    "undecodable-command-set": (w.command(w.ECHO_CTX, b"\x01\x02\x03"), R.INVALID_PDU_PARAMETER),
    "command-set-over-64KiB": (
        b"".join(w.pdata(w.ECHO_CTX, 0x01, b"\0" * 16000) for _ in range(5)),
        R.INVALID_PDU_PARAMETER,
    ),
    "release-rp-unasked": (p.encode(p.ReleaseRP()), R.UNEXPECTED_PDU),
    "release-rq-with-8-byte-body": (w.header(5, 8) + b"\0" * 8, R.INVALID_PDU_PARAMETER),
}


@pytest.mark.parametrize("name", sorted(AFTER_ASSOCIATION))
def test_faults_after_association_are_aborted(rx: Receiver, name: str) -> None:
    data, reason = AFTER_ASSOCIATION[name]
    peer = Peer(rx.port)
    associate(peer)
    peer.send(data)
    assert_abort(peer.read_pdu(), reason)
    linger(name, peer)


def test_store_without_sop_instance_uid_fails(rx: Receiver) -> None:
    cmd = w.store_rq(7, "x")
    cmd.AffectedSOPInstanceUID = None
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(w.command(w.STORE_CTX, cmd) + w.dataset(w.STORE_CTX, w.explicit_dataset("1.2.3")))
        answer = peer.read_pdu()
        rsp = w.decode_response(answer.pdu)
        assert rsp is not None, answer
        assert rsp.CommandField == dimse.CommandField.C_STORE_RSP
        assert rsp.MessageIDBeingRespondedTo == 7
        assert dimse.status_category(rsp.Status or 0) == "Failure", hex(rsp.Status or 0)


def test_store_saying_no_data_set_but_sending_one(rx: Receiver) -> None:
    """C-STORE-RQ with CommandDataSetType 0x0101, then a data set anyway: a failure
    status for the request, and an A-ABORT for the stray data set (PDV without a
    command: unexpected PDU parameter)."""
    uid = "1.2.826.0.1.3680043.10.1415.7.2"
    cmd = w.store_rq(8, uid, CommandDataSetType=dimse.NO_DATASET)
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(w.command(w.STORE_CTX, cmd) + w.dataset(w.STORE_CTX, w.explicit_dataset(uid)))
        answers = peer.answers()
    pdus = [a.pdu for a in answers]
    aborts = [x for x in pdus if isinstance(x, p.Abort)]
    responses = [w.decode_response(x) for x in pdus if isinstance(x, p.PDataTF)]
    assert all(dimse.status_category(r.Status or 0) == "Failure" for r in responses if r), responses
    assert aborts and (aborts[0].source, aborts[0].reason) == (PROVIDER, R.UNEXPECTED_PDU_PARAMETER)
    assert answers[-1].pdu is None, answers  # and then closed, by the receiver


def test_echo_with_a_data_set_fails(rx: Receiver) -> None:
    cmd = dimse.c_echo_rq(9)
    cmd.CommandDataSetType = dimse.DATASET_PRESENT
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(w.command(w.ECHO_CTX, cmd) + w.dataset(w.ECHO_CTX, b"\x08\x00\x05\x00CS\x00\x00"))
        answer = peer.read_pdu()
        rsp = w.decode_response(answer.pdu)
        assert rsp is not None and rsp.MessageIDBeingRespondedTo == 9, answer
        assert dimse.status_category(rsp.Status or 0) == "Failure", hex(rsp.Status or 0)


@pytest.mark.parametrize(
    "uid",
    ["../../etc/passwd", "1.2/3", "/tmp/x", "..", "1.2.3\\4", "1.2.3.4" + "5" * 70, " ", ""],
)
def test_store_with_path_characters_in_uid_is_refused(rx: Receiver, uid: str) -> None:
    cmd = w.store_rq(10, uid)
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(w.command(w.STORE_CTX, cmd) + w.dataset(w.STORE_CTX, w.explicit_dataset(uid)))
        answer = peer.read_pdu()
        rsp = w.decode_response(answer.pdu)
        assert rsp is not None, answer
        assert rsp.MessageIDBeingRespondedTo == 10
        assert dimse.status_category(rsp.Status or 0) == "Failure", hex(rsp.Status or 0)
        peer.send(p.encode(p.ReleaseRQ()))
        assert isinstance(peer.read_pdu().pdu, p.ReleaseRP)


def test_path_characters_in_data_set_uids_stay_inside_the_store(rx: Receiver) -> None:
    """Study/Series UIDs with path characters come from the data set (the layout's
    directories): they must not name directories; the instance is filed as unknown."""
    uid = "1.2.826.0.1.3680043.10.1415.7.3"
    ds = w.explicit_dataset(uid, study="../../../../escape", series="1/2")
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(w.command(w.STORE_CTX, w.store_rq(11, uid)) + w.dataset(w.STORE_CTX, ds))
        rsp = w.decode_response(peer.read_pdu().pdu)
        assert rsp is not None and rsp.MessageIDBeingRespondedTo == 11
        peer.send(p.encode(p.ReleaseRQ()))
        peer.read_pdu()
    if rsp.Status == 0:
        GOOD_UIDS.add(uid)
        (found,) = [f for f in stored_files(rx.storage) if f.stem == uid]
        assert rx.storage in found.parents
        assert "escape" not in str(found)


def test_store_with_non_ascii_uid_gets_a_failure_status(rx: Receiver) -> None:
    raw = w.raw_command(
        w.element(0x0002, w.ui(CT_IMAGE.encode())),
        w.element(0x0100, w.us(0x0001)),
        w.element(0x0110, w.us(12)),
        w.element(0x0700, w.us(0)),
        w.element(0x0800, w.us(0)),
        w.element(0x1000, b"1.2.3.\xff"),
    )
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(w.command(w.STORE_CTX, raw) + w.dataset(w.STORE_CTX, w.explicit_dataset("1.2")))
        answer = peer.read_pdu()
    rsp = w.decode_response(answer.pdu)
    assert rsp is not None, answer  # today: an A-ABORT (network timeout) after 2 s
    assert dimse.status_category(rsp.Status or 0) == "Failure"


def test_echo_without_message_id_gets_an_answer(rx: Receiver) -> None:
    raw = w.raw_command(
        w.element(0x0002, w.ui(VERIFICATION.encode())),
        w.element(0x0100, w.us(0x0030)),
        w.element(0x0800, w.us(0x0101)),
    )
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(w.command(w.ECHO_CTX, raw))
        answer = peer.read_pdu()
    # a failure response, or an A-ABORT for an unanswerable request, but promptly
    assert isinstance(answer.pdu, p.PDataTF | p.Abort), answer
    if isinstance(answer.pdu, p.Abort):  # not the network timer's (2, 0)
        assert (answer.pdu.source, answer.pdu.reason) != (PROVIDER, R.NOT_SPECIFIED), answer


def test_data_set_ending_early_then_abort_leaves_no_partial_file(rx: Receiver) -> None:
    uid = "1.2.826.0.1.3680043.10.1415.7.4"
    data = w.explicit_dataset(uid)
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(
            w.command(w.STORE_CTX, w.store_rq(13, uid))
            + w.dataset(w.STORE_CTX, data[:30], last=False)
        )
        time.sleep(0.2)
        peer.send(p.encode(p.Abort(0, 0)))
        answers = peer.answers()
    assert [a.pdu for a in answers] == [None], answers
    assert wait_until(lambda: not incoming(rx.storage), 5.0), incoming(rx.storage)
    assert not [f for f in stored_files(rx.storage) if f.stem == uid]


def test_data_set_ending_early_then_close_leaves_no_partial_file(rx: Receiver) -> None:
    uid = "1.2.826.0.1.3680043.10.1415.7.5"
    data = w.explicit_dataset(uid)
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(
            w.command(w.STORE_CTX, w.store_rq(14, uid))
            + w.dataset(w.STORE_CTX, data[:30], last=False)
        )
        time.sleep(0.2)
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert wait_until(lambda: not incoming(rx.storage), 5.0), incoming(rx.storage)
    assert not [f for f in stored_files(rx.storage) if f.stem == uid]


def test_data_set_ending_early_then_release_is_answered_promptly(rx: Receiver) -> None:
    uid = "1.2.826.0.1.3680043.10.1415.7.6"
    data = w.explicit_dataset(uid)
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(
            w.command(w.STORE_CTX, w.store_rq(15, uid))
            + w.dataset(w.STORE_CTX, data[:30], last=False)
        )
        peer.send(p.encode(p.ReleaseRQ()))
        answers = peer.answers()
    # whatever the answer (an A-ABORT, or a failure then A-RELEASE-RP), no partial file
    assert wait_until(lambda: not incoming(rx.storage), 5.0), incoming(rx.storage)
    assert not [f for f in stored_files(rx.storage) if f.stem == uid]
    first = answers[0]
    assert isinstance(first.pdu, p.Abort | p.ReleaseRP | p.PDataTF), answers
    if isinstance(first.pdu, p.Abort):  # not the network timer's (2, 0)
        assert (first.pdu.source, first.pdu.reason) != (PROVIDER, R.NOT_SPECIFIED), answers


def test_data_set_ending_early_then_release_leaves_no_partial_file(rx: Receiver) -> None:
    """The bounded part of the case above, which holds today: an answer within the
    bound and no partial file."""
    uid = "1.2.826.0.1.3680043.10.1415.7.7"
    data = w.explicit_dataset(uid)
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(
            w.command(w.STORE_CTX, w.store_rq(16, uid))
            + w.dataset(w.STORE_CTX, data[:30], last=False)
        )
        peer.send(p.encode(p.ReleaseRQ()))
        answers = peer.answers()
    assert isinstance(answers[0].pdu, p.Abort | p.ReleaseRP | p.PDataTF), answers
    assert answers[-1].pdu is None, answers  # closed by the receiver
    assert wait_until(lambda: not incoming(rx.storage), 5.0), incoming(rx.storage)
    assert not [f for f in stored_files(rx.storage) if f.stem == uid]


def test_silence_after_association_is_cut_by_the_network_timeout(rx: Receiver) -> None:
    with Peer(rx.port) as peer:
        associate(peer)
        # Silence is tolerated up to the network timeout, not cut at once.
        assert open_and_unanswered(peer, NETWORK_TIMEOUT * 0.75)
        peer.sent_at = time.monotonic()
        answers = peer.answers()
    assert isinstance(answers[0].pdu, p.Abort), answers
    assert answers[0].pdu.source == PROVIDER
    assert answers[-1].pdu is None, answers  # then closed by the receiver


def _trickle(peer: Peer, data: bytes, bound: float) -> tuple[bool, bytes]:
    """Send ``data`` one byte a second until the receiver cuts the connection, or
    stop waiting after ``bound`` seconds (a safety stop, not a measured bound):
    (cut, the bytes the receiver sent when it cut: its A-ABORT, or b"" for a close)."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > bound:
            break
        try:
            peer.send(bytes([byte]))
        except OSError:
            return True, b""
        peer.sock.settimeout(1.0)
        try:
            return True, peer.sock.recv(1024)
        except TimeoutError:
            continue
        except OSError:
            return True, b""
    return False, b""


def assert_cut_by_abort(got: bytes) -> None:
    """What the receiver sent when it cut a trickle: the provider's A-ABORT
    (PDU type 7, source 2), or nothing when the connection was reset."""
    if got:
        assert got[0] == 0x07, got
        answer = p.decode(0x07, got[6:10])
        assert isinstance(answer, p.Abort) and answer.source == PROVIDER, answer


# The minimum receive rate (1024 bytes/s by default) is judged over a network-timeout
# window that starts at the first check that finds a message under way: a trickle is
# cut within two network timeouts, plus the timer's granularity.
TRICKLE_BOUND = 2 * NETWORK_TIMEOUT + 3.0


def test_data_set_trickled_one_byte_per_second_is_cut(rx: Receiver) -> None:
    """After association, a data set sent one byte a second: each byte would reset a
    plain idle timer, the minimum receive rate aborts it; nothing partial is left."""
    uid = "1.2.826.0.1.3680043.10.1415.7.30"
    data = w.explicit_dataset(uid)
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(w.command(w.STORE_CTX, w.store_rq(30, uid)) + w.dataset(w.STORE_CTX, data)[:20])
        cut, got = _trickle(peer, w.dataset(w.STORE_CTX, data)[20:], TRICKLE_BOUND + 2)
    assert cut, "a data set trickled one byte a second was never cut off"
    assert_cut_by_abort(got)
    assert wait_until(lambda: not incoming(rx.storage), 5.0), incoming(rx.storage)
    assert not [f for f in stored_files(rx.storage) if f.stem == uid]


def test_slow_sender_above_the_minimum_rate_is_not_cut(rx: Receiver) -> None:
    """The other side of the rule: a peer that was idle (just under the network
    timeout), then sends a data set at about twice the minimum rate for three network
    timeouts, is served: the rate is judged from when the message is under way."""
    uid = "1.2.826.0.1.3680043.10.1415.7.32"
    data = w.explicit_dataset(uid, pixels=6 * 1024)
    chunk = 512  # every 0.25 s: 2 KiB/s against the 1 KiB/s minimum
    with Peer(rx.port) as peer:
        associate(peer)
        time.sleep(NETWORK_TIMEOUT * 0.75)
        stream = w.command(w.STORE_CTX, w.store_rq(32, uid)) + w.dataset(w.STORE_CTX, data)
        for offset in range(0, len(stream), chunk):  # bounded: about 13 chunks
            peer.send(stream[offset : offset + chunk])
            time.sleep(0.25)
        rsp = w.decode_response(peer.read_pdu().pdu)
        assert rsp is not None and rsp.Status == 0, rsp
        GOOD_UIDS.add(uid)
        peer.send(p.encode(p.ReleaseRQ()))
        assert isinstance(peer.read_pdu().pdu, p.ReleaseRP)


def test_pdu_header_trickled_one_byte_per_second_is_cut(rx: Receiver) -> None:
    """The same for a PDU whose bytes (header first) come one a second."""
    uid = "1.2.826.0.1.3680043.10.1415.7.31"
    with Peer(rx.port) as peer:
        associate(peer)
        cut, got = _trickle(peer, w.command(w.STORE_CTX, w.store_rq(31, uid)), TRICKLE_BOUND + 2)
    assert cut, "a PDU trickled one byte a second was never cut off"
    assert_cut_by_abort(got)


def test_truncated_pdata_then_close_leaves_no_partial_file(rx: Receiver) -> None:
    uid = "1.2.826.0.1.3680043.10.1415.7.8"
    data = w.explicit_dataset(uid)
    whole = w.dataset(w.STORE_CTX, data)
    with Peer(rx.port) as peer:
        associate(peer)
        peer.send(w.command(w.STORE_CTX, w.store_rq(17, uid)) + whole[: len(whole) // 2])
        time.sleep(0.2)
    assert wait_until(lambda: not incoming(rx.storage), 5.0), incoming(rx.storage)
    assert not [f for f in stored_files(rx.storage) if f.stem == uid]


# --------------------------------------------------- replayed random mutations


def _mutate(rng: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data)) if data else 0
        op = rng.randrange(5)
        if op == 0 and data:
            data[at] = rng.randrange(256)
        elif op == 1:
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:
            del data[at : at + rng.randint(1, 8)]
        elif op == 3 and len(data) >= at + 4:
            data[at : at + 4] = struct.pack(">L", rng.choice([0, 1, 6, 0xFFFF, 0x7FFFFFFF]))
        else:
            del data[at:]
    return bytes(data)


def _replay(port: int, wire: bytes) -> str:
    """Send one mutated session; return what ended it (bounded)."""
    try:
        with Peer(port) as peer:
            try:
                peer.send(wire)
            except OSError:
                return "closed while sending"
            for _ in range(20):
                try:
                    answer = peer.read_pdu()
                except TimeoutError:
                    return "hang"
                if answer.pdu is None or isinstance(answer.pdu, p.Abort | p.AssociateRJ):
                    return type(answer.pdu).__name__
                if isinstance(answer.pdu, p.ReleaseRP):
                    return "ReleaseRP"
            return "chatty"
    except OSError as exc:
        return f"connect failed: {exc}"


def test_replayed_mutations_of_valid_sessions(rx: Receiver) -> None:
    """160 valid sessions (the fuzz harness's seeds), each mutated a little with a
    fixed seed, replayed 40 at a time: every one ends (A-ABORT, A-ASSOCIATE-RJ,
    A-RELEASE-RP or a close) within the bound, and the worker logs no internal error."""
    from tests.fuzz.harness import acceptor_seeds

    rng = random.Random(8)
    seeds = acceptor_seeds()
    sessions = [_mutate(rng, seeds[i % len(seeds)]) for i in range(160)]
    log_before = len(rx.log())
    with ThreadPoolExecutor(40) as pool:
        outcomes = list(pool.map(lambda wire: _replay(rx.port, wire), sessions))
    assert "hang" not in outcomes and "chatty" not in outcomes, outcomes
    assert not [o for o in outcomes if o.startswith("connect failed")], outcomes
    problems = [
        line
        for line in rx.log()[log_before:].splitlines()
        if any(marker in line for marker in ("Traceback", "internal error", " failed: "))
    ]
    assert not problems, problems[:10]
    # whatever they stored is complete and named after its own SOP Instance UID
    for path in stored_files(rx.storage):
        if path.stem.startswith("1.2.3.4."):  # the seeds' UIDs, possibly mutated
            ds = pydicom.dcmread(path)
            assert ds.file_meta.MediaStorageSOPInstanceUID == path.stem
            GOOD_UIDS.add(path.stem)


# ----------------------------------------------------------------- many peers


def test_hundreds_of_idle_connections(rx: Receiver) -> None:
    """300 connections that never send a byte: each is closed by ARTIM, and the
    receiver still associates a newcomer meanwhile."""
    socks: list[socket.socket] = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(("127.0.0.1", rx.port), timeout=5.0))
        with Peer(rx.port) as peer:
            associate(peer)
            peer.send(p.encode(p.ReleaseRQ()))
            assert isinstance(peer.read_pdu().pdu, p.ReleaseRP)
        deadline = time.monotonic() + ANSWER_BOUND
        open_ = 0
        for s in socks:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if s.recv(1) != b"":
                    open_ += 1  # sent something? (it must not)
            except TimeoutError:
                open_ += 1
            except OSError:
                pass
        assert open_ == 0, f"{open_} idle connections still open after {ANSWER_BOUND} s"
    finally:
        for s in socks:
            s.close()


# ----------------------------------------------------- the sender and the store


def test_well_behaved_sender_is_not_disturbed(rx: Receiver, sender: Sender) -> None:
    """The sender (running beside every case) stores everything it sends: checked
    here after at least one full round, whatever ran before, and again when the
    module ends (the sender fixture's teardown) for whatever ran after."""
    wait_until(lambda: sender.rounds >= 1 or sender.failures, 30.0)
    assert not sender.failures, sender.failures[:10]
    assert len(sender.statuses) >= 50 and set(sender.statuses) == {0}


def test_store_holds_only_correct_instances(rx: Receiver, sender: Sender) -> None:
    """Whatever is in the store at any moment is complete and correct (the sender's
    instances or the corpus's positive controls), and nothing is written outside it.
    The temp directory is checked empty once the sender stops (the sender fixture)."""
    expected = {str(ds.SOPInstanceUID): ds for ds in sender.instances}
    files = stored_files(rx.storage)
    assert files
    for path in files:
        assert path.suffix == ".dcm", path
        ds = pydicom.dcmread(path)
        uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
        assert path.stem == uid, path
        assert uid in expected or uid in GOOD_UIDS, path
        if uid in expected:
            assert ds.SOPInstanceUID == uid, path
            assert ds.PixelData == expected[uid].PixelData, path
    # nothing was written anywhere else under the receiver's base directory
    allowed = {rx.log_path}
    for dirpath, _dirs, names in os.walk(rx.base):
        for name in names:
            full = rx.base / os.path.relpath(os.path.join(dirpath, name), rx.base)
            assert full in allowed or rx.storage in full.parents, full
