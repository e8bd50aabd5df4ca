"""The minimum receive rate judges a peer only inside one message; the worker's
data-set memory budget counts a data set until its handler is done.

A peer that streams two C-STOREs at four times the minimum, with an idle gap shorter
than the network timeout between them, must be served: a rate window that spanned
the end of one message, the gap and the start of the next would count the gap as
trickling. (The trickling peers themselves are in tests/robustness.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian

from tests.worker.conftest import RawPeer, WorkerFactory
from tests.worker.test_async_ops import CT, instance
from workers.engine import acse, dimse
from workers.engine import events as evt


def test_idle_gap_between_messages_is_not_counted_as_trickling(
    worker_factory: WorkerFactory,
) -> None:
    w = worker_factory(network_timeout=3.0, min_receive_rate=1024)
    peer = RawPeer(w, [acse.Requested(CT, (ExplicitVRLittleEndian,))], timeout=8.0)
    started = time.monotonic()

    def stream(raw: bytes, at: float) -> None:
        """``raw`` at 4096 bytes/s, from ``at`` seconds after the start."""
        for k in range(0, len(raw), 100):  # bounded by len(raw)
            time.sleep(max(0.0, started + at + k / 4096 - time.monotonic()))
            peer.send_raw(raw[k : k + 100])

    def store(size: int) -> bytes:
        uid, data = instance(size)
        rq = dimse.c_store_rq(peer.next_message_id(), CT, uid)
        peer.conn.send_message(peer.context_id(CT), rq, data)
        return b"".join(bytes(x) for x in peer.conn.data_to_send())

    first = store(2000)
    stream(first, 3.1 - len(first) / 4096)  # ends about 3.1 s in
    rsp, _ = peer.response()
    assert rsp.Status == 0x0000
    second = store(20000)
    stream(second, 5.8)  # 2.7 s of silence (< 3 s), then about 5 s of data
    rsp, _ = peer.response()
    assert rsp.Status == 0x0000


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def test_memory_budget_holds_a_data_set_while_its_handler_runs(
    worker_factory: WorkerFactory,
) -> None:
    """--max-dataset-memory counts a C-FIND identifier from its first byte until its
    handler is done with it, not only while it arrives."""
    seen: list[int] = []
    w: Any = None

    def on_find(event: Any) -> Iterator[tuple[int, Any]]:
        seen.append(w.server.memory_budget.used)  # read from the handler's thread
        yield from ()

    w = worker_factory(evt_handlers=[(evt.EVT_C_FIND, on_find)])
    identifier = instance(5000)[1]
    peer = RawPeer(w, [acse.Requested(STUDY_ROOT_FIND, (ExplicitVRLittleEndian,))])
    peer.send(
        peer.context_id(STUDY_ROOT_FIND),
        dimse.c_find_rq(peer.next_message_id(), STUDY_ROOT_FIND),
        identifier,
    )
    rsp, _ = peer.response()
    assert rsp.Status == 0x0000
    assert seen == [len(identifier)]
    assert w.call(lambda: w.server.memory_budget.used) == 0
