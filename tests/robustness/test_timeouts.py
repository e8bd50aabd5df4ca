"""Who is idle? The network timeout must measure the PEER's silence, not the time the
receiver itself spent (negotiating, or with its event loop held up).

These run their own receiver: one worker (so that two peers share an event loop),
the brief's flags (2 s network timeout, 2 s ARTIM) plus two handlers from
:mod:`tests.robustness.hooks`: an EVT_USER_ID check that takes 3 s for the user
``slow``, and an EVT_REQUESTED notification that holds the worker's loop for 3 s
when the calling AE title is LAGGER (a stand-in for any loop lag).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from workers.engine import acse, dimse
from workers.engine import pdu as p

from . import hooks
from . import wire as w
from .conftest import NETWORK_TIMEOUT, VERIFICATION, Peer, Receiver


@pytest.fixture(scope="module")
def lag_rx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    handlers = [
        "--handler",
        "EVT_USER_ID=tests.robustness.hooks:slow_user_identity",
        "--handler",
        "EVT_REQUESTED=tests.robustness.hooks:stall_the_loop",
    ]
    receiver = Receiver(tmp_path_factory.mktemp("timeouts"), worker_count=1, extra_args=handlers)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def echo(peer: Peer, message_id: int) -> p.PDU | None:
    peer.send(w.command(w.ECHO_CTX, dimse.c_echo_rq(message_id)))
    return peer.read_pdu().pdu


def test_quick_negotiation_then_echo(lag_rx: Receiver) -> None:
    """The control: a user checked at once, then a C-ECHO, is served."""
    rq = acse.build_request(
        "PACSRX",
        "QUICKID",
        [acse.Requested(VERIFICATION)],
        user_identity=p.UserIdentityRQ(1, False, b"quick"),
    )
    with Peer(lag_rx.port) as peer:
        peer.send(p.encode(rq))
        assert isinstance(peer.read_pdu().pdu, p.AssociateAC)
        rsp = w.decode_response(echo(peer, 1))
        assert rsp is not None and rsp.Status == 0


def test_slow_negotiation_is_not_the_peers_silence(lag_rx: Receiver) -> None:
    rq = acse.build_request(
        "PACSRX",
        "SLOWID",
        [acse.Requested(VERIFICATION)],
        user_identity=p.UserIdentityRQ(1, False, b"slow"),
    )
    with Peer(lag_rx.port) as peer:
        peer.send(p.encode(rq))
        answer = peer.read_pdu()
        assert isinstance(answer.pdu, p.AssociateAC), answer
        # Kept as a lower bound on purpose: it checks the TEST's premise (the hook
        # really held the negotiation for LAG_SECONDS), not the receiver; a slow
        # machine only makes it larger, so it cannot flake.
        assert answer.elapsed >= hooks.LAG_SECONDS - 0.5
        # The peer takes a quarter of its network timeout to send its first request
        # (sending at once races the receiver's immediate abort, and sometimes wins).
        time.sleep(NETWORK_TIMEOUT / 4)
        response = echo(peer, 2)
    rsp = w.decode_response(response)
    assert rsp is not None and rsp.Status == 0, response  # today: A-ABORT (2, 0)


def test_loop_lag_is_not_the_peers_silence(lag_rx: Receiver) -> None:
    with Peer(lag_rx.port) as victim, Peer(lag_rx.port) as lagger:
        victim.send(w.rq_bytes(calling="VICTIM"))
        assert isinstance(victim.read_pdu().pdu, p.AssociateAC)
        lagger.send(w.rq_bytes(calling=hooks.LAGGER))  # holds the loop for 3 s
        time.sleep(0.5)
        # 0.5 s after its association, well within its 2 s network timeout
        victim.send(w.command(w.ECHO_CTX, dimse.c_echo_rq(3)))
        answer = victim.read_pdu()
        rsp = w.decode_response(answer.pdu)
        assert rsp is not None and rsp.Status == 0, answer  # today: A-ABORT (2, 0)
        # and the association is still whole: it releases normally
        victim.send(p.encode(p.ReleaseRQ()))
        assert isinstance(victim.read_pdu().pdu, p.ReleaseRP)
