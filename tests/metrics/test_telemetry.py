"""Tests for workers.telemetry: counts are exact, drops are counted, nothing blocks."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from metrics import wire as w
from workers.engine import events as evt
from workers.engine.pdu import AssociateRJ
from workers.storage.config import FileOps
from workers.telemetry import RECEIVED, SENT, Telemetry

from .helpers import (
    FakeProtocol,
    Sink,
    short_tmpdir,
    store_op,
    store_result,
    totals,
    until,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, 20))

    return runner


@pytest.fixture
def sockdir() -> Any:
    with short_tmpdir() as path:
        yield path


def _association(t: Telemetry, p: FakeProtocol, stores: int = 3) -> None:
    """One association as the worker reports it: open, accept, C-STOREs, release."""
    t.record(evt.EVT_CONN_OPEN, p, {"address": ("127.0.0.1", 1234)})
    p.pdu(0, 1, 200)
    t.record(evt.EVT_REQUESTED, p, {})
    t.record(evt.EVT_ACSE_RECV, p, {"primitive": None})
    p.pdu(1, 2, 180)
    t.record(evt.EVT_ACSE_SENT, p, {"primitive": None})
    t.record(evt.EVT_ACCEPTED, p, {})
    t.record(evt.EVT_ESTABLISHED, p, {})
    for _ in range(stores):
        p.pdu(0, 4, 1100)
        t.dimse(RECEIVED, 0x0001, None)
        t.stored(p, store_op(CT), store_result(0, 1000), 0.004)
        t.dimse(SENT, 0x8001, 0x0000)
        p.pdu(1, 4, 150)
    p.pdu(0, 5, 10)
    p.pdu(1, 6, 10)
    t.record(evt.EVT_RELEASED, p, {})
    t.record(evt.EVT_CONN_CLOSE, p, {})


def test_counts_are_exact(run: Any, sockdir: str) -> None:
    async def scenario() -> None:
        sink = Sink(os.path.join(sockdir, "a.sock"))
        t = Telemetry(sink.path, 7, interval=3600)
        await t.start()
        p = FakeProtocol("CT1", "PACSRX")
        _association(t, p, stores=3)

        rejected = FakeProtocol("CT2", "WRONG")
        t.record(evt.EVT_CONN_OPEN, rejected, {})
        t.record(evt.EVT_REQUESTED, rejected, {})
        t.record(evt.EVT_REJECTED, rejected, {"response": AssociateRJ(1, 1, 7)})
        t.record(evt.EVT_CONN_CLOSE, rejected, {})

        peer_abort = FakeProtocol("CT1", "PACSRX")
        t.record(evt.EVT_CONN_OPEN, peer_abort, {})
        t.record(evt.EVT_REQUESTED, peer_abort, {})
        t.record(evt.EVT_ACCEPTED, peer_abort, {})
        peer_abort.pdu(0, 7, 10)
        t.record(evt.EVT_ABORTED, peer_abort, {})  # no fields: inferred from the PDU counts
        t.record(evt.EVT_ABORTED, peer_abort, {})  # counted once
        t.record(evt.EVT_CONN_CLOSE, peer_abort, {})

        local_abort = FakeProtocol("CT1", "PACSRX")
        t.record(evt.EVT_CONN_OPEN, local_abort, {})
        t.record(evt.EVT_REQUESTED, local_abort, {})
        t.record(evt.EVT_ACCEPTED, local_abort, {})
        t.record(evt.EVT_ABORTED, local_abort, {"source": 2, "reason": 2, "by_peer": False})
        t.record(evt.EVT_CONN_CLOSE, local_abort, {})

        lost = FakeProtocol("CT1", "PACSRX")
        t.record(evt.EVT_CONN_OPEN, lost, {})
        t.record(evt.EVT_REQUESTED, lost, {})
        t.record(evt.EVT_ACCEPTED, lost, {})
        t.record(evt.EVT_ABORTED, lost, {})  # no A-ABORT either way: the transport
        t.record(evt.EVT_CONN_CLOSE, lost, {})

        t.record(
            evt.EVT_FSM_TRANSITION,
            p,
            {"current_state": "Sta6", "fsm_event": "Evt10", "next_state": "Sta6"},
        )
        t.handler_error("EVT_C_STORE")
        t.flush()
        await until(lambda: sink.read() == 0 and t.backlog == 0 and len(sink.records) > 0)
        await t.close()
        sink.read()
        sink.close()

        assert isinstance(sink.records[0], w.Hello)
        assert sink.records[0] == w.Hello("worker", "7", os.getpid())
        got = totals(sink.records)
        expected = {
            ("connections",): 5,
            ("association", 1, "CT1", "PACSRX"): 4,
            ("association", 1, "CT2", "WRONG"): 1,
            ("association", 2, "CT1", "PACSRX"): 4,
            ("association", 3, "CT1", "PACSRX"): 1,
            ("rejected", "CT2", "WRONG", 1, 1, 7): 1,
            ("aborted", "CT1", "PACSRX", int(w.AbortInitiator.PEER), -1, -1): 1,
            ("aborted", "CT1", "PACSRX", int(w.AbortInitiator.LOCAL), 2, 2): 1,
            ("aborted", "CT1", "PACSRX", int(w.AbortInitiator.TRANSPORT), -1, -1): 1,
            ("pdus", 0, 1): 1,
            ("pdus", 1, 2): 1,
            ("pdus", 0, 4): 3,
            ("pdus", 1, 4): 3,
            ("pdus", 0, 5): 1,
            ("pdus", 1, 6): 1,
            ("pdus", 0, 7): 1,
            ("bytes", 0): 200 + 3 * 1100 + 10 + 10,
            ("bytes", 1): 180 + 3 * 150 + 10,
            ("dimse", 0, 0x0001, w.NO_STATUS): 3,
            ("dimse", 1, 0x8001, 0): 3,
            ("cstore", "CT1", "PACSRX", CT, 0): 3,
            ("cstore_bytes", "CT1", "PACSRX", CT, 0): 3000,
            ("transition", "Sta6", "Evt10", "Sta6"): 1,
            ("handlererror", "EVT_C_STORE"): 1,
        }
        assert dict(got) == expected
        assert t.dropped_total == 0
        cstore = next(r for r in sink.records if isinstance(r, w.CStore))
        assert cstore.buckets[w.bucket_index(w.CSTORE_BUCKETS, 0.004)] == 3
        assert cstore.duration_sum == pytest.approx(0.012)

    run(scenario())


def test_open_connections_are_read_periodically(sockdir: str) -> None:
    async def scenario() -> None:
        sink = Sink(os.path.join(sockdir, "a.sock"))
        t = Telemetry(sink.path, 1, interval=3600)
        await t.start()
        p = FakeProtocol()
        t.record(evt.EVT_CONN_OPEN, p, {})
        t.record(evt.EVT_REQUESTED, p, {})
        t.record(evt.EVT_ACCEPTED, p, {})
        for _ in range(5):
            p.pdu(0, 4, 1000)
            t.flush()
            await until(lambda: t.backlog == 0)
        sink.read()
        gauges = [r for r in sink.records if isinstance(r, w.Gauges)]
        assert gauges[-1] == w.Gauges(1, (("MODALITY", "PACSRX", 1),))
        assert totals(sink.records)[("pdus", 0, 4)] == 5  # before the connection closed
        t.record(evt.EVT_RELEASED, p, {})
        t.record(evt.EVT_CONN_CLOSE, p, {})
        t.flush()
        await until(lambda: t.backlog == 0)
        sink.read()
        assert [r for r in sink.records if isinstance(r, w.Gauges)][-1] == w.Gauges(0, ())
        assert totals(sink.records)[("bytes", 0)] == 5000
        await t.close()
        sink.close()

    asyncio.run(scenario())


def test_no_aggregator_then_reconnect(run: Any, sockdir: str) -> None:
    """Counts made while the aggregator is away are delivered when it comes back."""

    async def scenario() -> None:
        path = os.path.join(sockdir, "a.sock")
        t = Telemetry(path, 2, interval=0.01, reconnect_max=0.05)
        await t.start()  # nobody listens: no error, no wait
        assert not t.connected
        for _ in range(1000):
            t.dimse(RECEIVED, 0x0030, None)
        await asyncio.sleep(0.05)  # several ticks, several failed connects
        assert not t.connected
        sink = Sink(path)
        await until(lambda: t.connected)
        await until(
            lambda: (sink.read(), totals(sink.records))[1].get(("dimse", 0, 0x30, -1), 0) == 1000
        )
        assert isinstance(sink.records[0], w.Hello)
        await t.close()
        sink.close()
        assert t.dropped_total == 0

    run(scenario())


def test_aggregator_restart_loses_nothing(run: Any, sockdir: str) -> None:
    """The aggregator goes away between batches: the next batch fails to send (EPIPE),
    is merged back, and is delivered to the next aggregator."""

    async def scenario() -> None:
        path = os.path.join(sockdir, "a.sock")
        sink = Sink(path)
        t = Telemetry(path, 3, interval=3600, reconnect_max=0.01)
        await t.start()
        t.dimse(RECEIVED, 1, None)
        t.flush()
        await until(lambda: t.backlog == 0)
        sink.read()
        sink.close()  # the aggregator dies
        t.dimse(RECEIVED, 1, None)
        t.stored(FakeProtocol(), store_op(), store_result(), 0.01)
        t.handler_error("EVT_C_FIND")
        t.flush()  # EPIPE: merged back
        assert not t.connected
        t.handler_error("EVT_C_FIND")
        sink2 = Sink(path)
        await asyncio.sleep(0.02)
        t.flush()  # reconnects, sends
        await until(lambda: t.backlog == 0 and t.connected)
        sink2.read()
        both = totals(sink.records + sink2.records)
        assert both[("dimse", 0, 1, -1)] == 2
        assert both[("handlererror", "EVT_C_FIND")] == 2
        assert both[("cstore", "MODALITY", "PACSRX", CT, 0)] == 1
        assert isinstance(sink2.records[0], w.Hello)
        assert t.dropped_total == 0
        await t.close()
        sink2.close()

    run(scenario())


def test_slow_aggregator_never_blocks_and_stays_bounded(run: Any, sockdir: str) -> None:
    """An aggregator that does not read: calls stay fast, the tables stay bounded, what
    does not fit is counted as dropped and reported once the aggregator reads again;
    everything else arrives exactly."""

    async def scenario() -> None:
        sink = Sink(os.path.join(sockdir, "a.sock"), rcvbuf=4096)
        t = Telemetry(sink.path, 4, interval=3600, max_sop_classes=10**6, max_pending=3000)
        await t.start()
        sink.accept()
        p = FakeProtocol()
        sent: dict[str, int] = {}
        # Distinct SOP classes make big batches: the first fills the socket.
        for batch in range(4):
            for i in range(2000):
                uid = f"1.2.826.0.1.3680043.2.1125.{batch}.{i:05d}.{'9' * 30}"
                t.stored(p, store_op(uid), store_result(), 0.001)
                sent[uid] = 1
            t.flush()
            await asyncio.sleep(0)
        assert t.backlog > 0  # the aggregator took only part of the first batch
        # Nothing ever waits for the socket: it is non-blocking, what it did not take
        # waits for the loop's writability callback, and while that batch is in flight
        # no other is made (the counts add up in the bounded tables instead).
        assert t._sock is not None and not t._sock.getblocking()
        assert t._writing
        assert t.frames_sent == 0 and len(t._batch) <= t.max_pending
        assert t.dropped_total > 0  # the tables filled up
        dropped = t.dropped_total
        assert t._keys <= t.max_pending

        # The aggregator catches up.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sink.read()
            t.flush()
            await asyncio.sleep(0.005)
            if t.backlog == 0 and not t._cstore and not t._dropped:
                break
        sink.read()
        got = totals(sink.records)
        delivered = sum(v for k, v in got.items() if k[0] == "cstore")
        assert delivered + dropped == len(sent)
        assert got[("dropped",)] == dropped
        assert all(v == 1 for k, v in got.items() if k[0] == "cstore")
        await t.close()
        sink.close()

    run(scenario())


def test_stalled_aggregator_is_dropped_and_batch_merged_back(run: Any, sockdir: str) -> None:
    """A connection that takes nothing for stall_timeout is closed; frames not fully
    written go back to the tables and out on a new connection: exact in the end."""

    async def scenario() -> None:
        sink = Sink(os.path.join(sockdir, "a.sock"), rcvbuf=4096)
        t = Telemetry(
            sink.path,
            5,
            interval=3600,
            max_sop_classes=10**6,
            stall_timeout=0.05,
            reconnect_max=0.01,
        )
        await t.start()
        p = FakeProtocol()
        n = 6000
        for i in range(n):
            t.stored(p, store_op(f"1.2.3.{i}.{'7' * 40}"), store_result(), 0.001)
        t.flush()
        assert t.backlog > 0
        await asyncio.sleep(0.1)
        t.flush()  # stalled: disconnect, merge back
        assert t.disconnects == 1
        await asyncio.sleep(0.02)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            t.flush()
            sink.read()
            await asyncio.sleep(0.005)
            if t.connected and t.backlog == 0 and not t._cstore:
                break
        sink.read()
        got = totals(sink.records)
        assert sum(v for k, v in got.items() if k[0] == "cstore") == n
        assert all(v == 1 for k, v in got.items() if k[0] == "cstore")
        assert len(sink.per_conn) == 2
        assert t.dropped_total == 0
        await t.close()
        sink.close()

    run(scenario())


def test_storage_timings_from_threads(sockdir: str, tmp_path: Any) -> None:
    async def scenario() -> None:
        sink = Sink(os.path.join(sockdir, "a.sock"))
        t = Telemetry(sink.path, 6, interval=3600)
        await t.start()
        ops = t.file_ops(FileOps())
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
        for _ in range(10):
            ops.write(fd, memoryview(b"x" * 100))

        def fsyncs() -> None:
            for _ in range(5):
                ops.fsync(fd)

        threads = [threading.Thread(target=fsyncs) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        os.close(fd)
        t.flush()
        await until(lambda: t.backlog == 0)
        sink.read()
        got = totals(sink.records)
        assert got[("storage", int(w.StorageOp.WRITE))] == 10
        assert got[("storage", int(w.StorageOp.FSYNC))] == 20
        await t.close()
        sink.close()

    asyncio.run(scenario())


def test_labels_fold_into_other(sockdir: str) -> None:
    async def scenario() -> None:
        sink = Sink(os.path.join(sockdir, "a.sock"))
        t = Telemetry(sink.path, 0, interval=3600, max_ae_titles=2, max_sop_classes=1)
        await t.start()
        for ae in ("A", "B", "C", "D"):
            p = FakeProtocol(ae, "PACSRX")
            t.record(evt.EVT_CONN_OPEN, p, {})
            t.record(evt.EVT_REQUESTED, p, {})
            t.stored(p, store_op(f"1.2.{ae}"), store_result(), 0.1)
            t.record(evt.EVT_CONN_CLOSE, p, {})
        t.flush()
        await until(lambda: t.backlog == 0)
        sink.read()
        got = totals(sink.records)
        assert got[("association", 1, "A", "PACSRX")] == 1
        assert got[("association", 1, "other", "PACSRX")] == 3  # PACSRX took the 2nd slot
        assert got[("cstore", "A", "PACSRX", "1.2.A", 0)] == 1
        assert got[("cstore", "other", "PACSRX", "other", 0)] == 3
        await t.close()
        sink.close()

    asyncio.run(scenario())


def test_internal_errors_are_counted_not_raised(sockdir: str) -> None:
    t = Telemetry(os.path.join(sockdir, "none.sock"), 0)
    t.record(evt.EVT_REQUESTED, object(), {})  # type: ignore[arg-type]
    t.stored(object(), object(), object(), 0.1)  # type: ignore[arg-type]
    t.record(evt.EVT_C_STORE, object(), {})  # type: ignore[arg-type]  # not counted
    assert t.dropped_total == 2


def test_close_sends_the_last_counts(sockdir: str) -> None:
    async def scenario() -> None:
        sink = Sink(os.path.join(sockdir, "a.sock"))
        t = Telemetry(sink.path, "w9", interval=3600)
        await t.start()
        t.worker_restarted(3, "exit_1")
        await t.close()
        sink.read()
        assert totals(sink.records) == {("restart", "3", "exit_1"): 1}
        assert not t.connected
        sink.close()

    asyncio.run(scenario())


def test_per_record_state_is_bounded() -> None:
    """The hot-path calls aggregate in place: 20000 instances leave one counter per
    key, with the right totals, and hold on to no memory per call (what they cost in
    time, tests/metrics/bench_telemetry.py measures)."""
    import tracemalloc

    t = Telemetry("/nonexistent/metrics.sock", 0)
    p = FakeProtocol()
    t.record(evt.EVT_CONN_OPEN, p, {})
    t.record(evt.EVT_REQUESTED, p, {})
    op, result = store_op(), store_result()

    def burst(n: int) -> None:
        for _ in range(n):
            t.dimse(RECEIVED, 1, None)
            t.stored(p, op, result, 0.002)
            t.dimse(SENT, 0x8001, 0)

    burst(100)  # every key exists now
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        burst(20000)
        grown = sum(
            stat.size_diff
            for stat in tracemalloc.take_snapshot().compare_to(before, "filename")
            if stat.traceback[0].filename.endswith("telemetry.py")
        )
    finally:
        tracemalloc.stop()
    assert grown < 4096, grown  # a few float objects replaced, nothing per call
    assert len(t._cstore) == 1
    (counts,) = t._cstore.values()
    assert counts[0] == 20100 * result.bytes_written
    assert counts[1] == pytest.approx(20100 * 0.002)
    assert sorted(t._dimse.values()) == [20100, 20100]


@given(
    st.lists(
        st.floats(min_value=-1.0, max_value=100.0, allow_nan=False)
        | st.sampled_from(w.STORAGE_BUCKETS),
        max_size=200,
    )
)
def test_storage_buckets_match_bucket_index(observations: list[float]) -> None:
    """The sorted drain buckets exactly as bucket_index does, one by one."""
    t = Telemetry("/nonexistent/metrics.sock", 0)
    for s in observations:
        t.observe_fsync(s)
    t.flush()
    records = [r for r in t._collect() if isinstance(r, w.Storage)]
    if not observations:
        assert records == []
        return
    (r,) = records
    expected = [0] * (len(w.STORAGE_BUCKETS) + 1)
    for s in observations:
        expected[w.bucket_index(w.STORAGE_BUCKETS, max(s, 0.0))] += 1
    assert list(r.buckets) == expected
    assert r.duration_sum == pytest.approx(sum(max(s, 0.0) for s in observations))
