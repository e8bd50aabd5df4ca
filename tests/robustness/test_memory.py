"""Data sets held in memory (C-FIND identifiers, N-* data sets) are bounded for the
whole worker, not only per association: many peers each sending a large identifier
must not add up to an unbounded heap.

A receiver of its own: one worker (so that the peers share its budget) with
``--max-dataset-memory 65536``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from workers.engine import acse, dimse
from workers.engine import pdu as p

from . import wire as w
from .conftest import EXPLICIT_LE, Peer, Receiver

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
FIND_CTX = 1
IDENTIFIER = w.explicit_dataset("1.2.3.4.5", pixels=40_000)  # about 40 KB


@pytest.fixture(scope="module")
def budget_rx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    receiver = Receiver(
        tmp_path_factory.mktemp("memory"),
        worker_count=1,
        extra_args=["--max-dataset-memory", "65536"],
    )
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def associate(peer: Peer, calling: str) -> None:
    rq = acse.build_request(
        "PACSRX",
        calling,
        [acse.Requested(STUDY_ROOT_FIND, (EXPLICIT_LE,))],
        max_pdu_length=65536,
    )
    peer.send(p.encode(rq))
    answer = peer.read_pdu()
    assert isinstance(answer.pdu, p.AssociateAC), answer
    assert [c.result for c in answer.pdu.contexts] == [0], answer.pdu.contexts


def find_rq(message_id: int) -> dimse.Command:
    return dimse.Command(
        dimse.CommandField.C_FIND_RQ,
        MessageID=message_id,
        AffectedSOPClassUID=STUDY_ROOT_FIND,
        Priority=0,
        CommandDataSetType=dimse.DATASET_PRESENT,
    )


def begin_find(peer: Peer, message_id: int) -> None:
    """The command and all but the last 1,000 bytes of the identifier."""
    peer.send(
        w.command(FIND_CTX, find_rq(message_id))
        + w.dataset(FIND_CTX, IDENTIFIER[:-1000], last=False)
    )


def end_find(peer: Peer) -> dimse.Command:
    """The rest of the identifier; the (final) C-FIND response."""
    peer.send(w.dataset(FIND_CTX, IDENTIFIER[-1000:]))
    rsp = None
    for _ in range(10):  # bounded: pending responses, then the final one
        pdu = peer.read_pdu()
        rsp = w.decode_response(pdu.pdu)
        assert rsp is not None, pdu
        if rsp.Status not in (0xFF00, 0xFF01):
            return rsp
    raise AssertionError(f"no final C-FIND response: {rsp}")


def test_worker_budget_aborts_the_association_that_would_pass_it(budget_rx: Receiver) -> None:
    with Peer(budget_rx.port) as first, Peer(budget_rx.port) as second:
        associate(first, "FIRST")
        associate(second, "SECOND")
        begin_find(first, 1)  # about 39 KB held by the first association
        time.sleep(0.3)  # (nothing comes back yet: give the worker a moment)
        begin_find(second, 1)  # another 39 KB would pass 64 KiB: A-ABORT
        answer = second.read_pdu()
        assert isinstance(answer.pdu, p.Abort), answer
        assert answer.pdu.source == 2, answer  # the provider's, not the peer's
        # The first association is not disturbed, and gets its answer (before the
        # second's transport closes: after an A-ABORT the receiver waits up to ARTIM
        # for the peer to close, PS3.8 Sta13, longer than the first's network timeout).
        rsp = end_find(first)
        assert rsp.MessageIDBeingRespondedTo == 1
        first.send(p.encode(p.ReleaseRQ()))
        assert isinstance(first.read_pdu().pdu, p.ReleaseRP)
        assert second.read_pdu().pdu is None  # and closed
    # What the first held is given back: the same request succeeds again, twice over.
    for attempt in range(2):
        with Peer(budget_rx.port) as again:
            associate(again, f"AGAIN{attempt}")
            begin_find(again, 2)
            assert end_find(again).MessageIDBeingRespondedTo == 2
            again.send(p.encode(p.ReleaseRQ()))
            assert isinstance(again.read_pdu().pdu, p.ReleaseRP)
    budget_rx.assert_alive()
    assert "already hold" in budget_rx.log()
