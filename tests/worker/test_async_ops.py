"""Asynchronous operations (PS3.7 D.3.3.3): the window is negotiated both ways and
honoured: pipelined requests run concurrently, are answered as they complete (matched
by Message ID), and with fsync on no Success leaves before its instance is durable."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation

from tests.worker.conftest import WorkerFactory
from workers.datasets import encode_dataset
from workers.engine import acse
from workers.engine import events as evt
from workers.engine import pdu as p
from workers.scu import associate
from workers.storage.config import FileOps, syncfs

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.10.1415.99.1"
SERIES = "1.2.826.0.1.3680043.10.1415.99.2"


def instance(size: int = 2048) -> tuple[str, bytes]:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.PatientID = "ASYNC"
    ds.add_new(0x00091010, "OB", os.urandom(size))
    return str(ds.SOPInstanceUID), encode_dataset(ds, ExplicitVRLittleEndian)


async def open_association(port: int, window: int | None) -> Any:
    return await associate(
        "127.0.0.1",
        port,
        called_ae="PACSRX",
        contexts=[acse.Requested(CT, (ExplicitVRLittleEndian,))],
        async_ops=p.AsyncOpsWindow(window, window) if window is not None else None,
    )


@pytest.mark.parametrize(
    ("configured", "proposed", "granted"),
    [(16, 16, 16), (16, 4, 4), (4, 16, 4), (16, 0, 16), (1, 16, 1), (16, None, 1)],
)
def test_window_negotiated_with_our_scu(
    worker_factory: WorkerFactory, configured: int, proposed: int | None, granted: int
) -> None:
    w = worker_factory(max_async_ops=configured)

    async def run() -> int:
        assoc = await open_association(w.port, proposed)
        try:
            return int(assoc.max_outstanding)
        finally:
            await assoc.release()

    assert asyncio.run(run()) == granted


def test_window_from_a_bound_handler_is_bounded_by_configuration(
    worker_factory: WorkerFactory,
) -> None:
    asked: list[tuple[int, int]] = []

    def on_async_ops(event: Any) -> tuple[int, int]:
        asked.append((event.invoked, event.performed))
        return 100, 100  # more than configured: bounded to max_async_ops

    w = worker_factory(max_async_ops=8, evt_handlers=[(evt.EVT_ASYNC_OPS, on_async_ops)])

    async def run() -> int:
        assoc = await open_association(w.port, 32)
        try:
            return int(assoc.max_outstanding)
        finally:
            await assoc.release()

    assert asyncio.run(run()) == 8
    assert asked == [(32, 32)]


def test_window_negotiated_with_a_pynetdicom_requestor(worker_factory: WorkerFactory) -> None:
    w = worker_factory(max_async_ops=16)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    item = AsynchronousOperationsWindowNegotiation()
    item.maximum_number_operations_invoked = 5
    item.maximum_number_operations_performed = 3
    assoc = ae.associate("127.0.0.1", w.port, ext_neg=[item])
    try:
        assert assoc.is_established
        assert assoc.acceptor.asynchronous_operations == (5, 3)
    finally:
        assoc.release()


def test_out_of_order_completion_matched_by_message_id(worker_factory: WorkerFactory) -> None:
    """The first requests take longest; answers come back as they complete, each
    matched to its request by Message ID Being Responded To."""
    started = threading.Event()
    order: list[str] = []

    async def on_store(event: Any) -> int:
        index = int(event.request.AffectedSOPInstanceUID.rsplit(".", 1)[1])
        await asyncio.sleep(0.05 * (8 - index))
        order.append(event.request.AffectedSOPInstanceUID)
        started.set()
        return 0x0000

    w = worker_factory(max_async_ops=8, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    uids = [f"1.2.826.0.1.3680043.10.1415.99.3.{i}" for i in range(8)]
    data = instance()[1]

    async def run() -> list[tuple[str, Any]]:
        assoc = await open_association(w.port, 8)
        try:
            futures = [
                await assoc.send_c_store_nowait(
                    data,
                    sop_class_uid=CT,
                    sop_instance_uid=uid,
                    transfer_syntax=ExplicitVRLittleEndian,
                )
                for uid in uids
            ]
            done: list[tuple[str, Any]] = []
            for future in asyncio.as_completed(futures):
                rsp = await future
                done.append((str(rsp.AffectedSOPInstanceUID), rsp))
            return done
        finally:
            await assoc.release()

    done = asyncio.run(run())
    assert [uid for uid, _ in done] == order  # answered in completion order...
    assert order != uids  # ...which is not the order sent
    assert sorted(order) == sorted(uids)
    for uid, rsp in done:
        assert rsp.Status == 0x0000
        # Message IDs are 1..8 in send order: each response names its own request.
        assert rsp.MessageIDBeingRespondedTo == uids.index(uid) + 1


class SlowDurableStorage:
    """A flush that takes a while and remembers what it made durable: the inode and
    its size at the time (fsync: that file; syncfs: every temp file there is), and
    how many flushes there were."""

    def __init__(self, delay: float, incoming: Path | None = None) -> None:
        self.delay = delay
        self.incoming = incoming
        self.lock = threading.Lock()
        self.durable: dict[int, int] = {}
        self.flushes = 0

    def fsync(self, fd: int) -> None:
        st = os.fstat(fd)
        time.sleep(self.delay)
        os.fsync(fd)
        with self.lock:
            self.flushes += 1
            self.durable[st.st_ino] = st.st_size

    def syncfs(self, fd: int) -> None:
        assert self.incoming is not None
        # What exists before the call is covered by it (a file still being written
        # is covered up to its size now; the check compares sizes).
        seen = {}
        for entry in os.scandir(self.incoming):
            st = entry.stat()
            seen[st.st_ino] = st.st_size
        time.sleep(self.delay)
        syncfs(fd)
        with self.lock:
            self.flushes += 1
            self.durable.update(seen)


def test_fsync_respected_under_pipelining(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    slow = SlowDurableStorage(0.2, tmp_path / "store0" / ".incoming")
    w = worker_factory(
        max_async_ops=16,
        fsync="always",
        store_ops=replace(FileOps(), fsync=slow.fsync, syncfs=slow.syncfs),
    )
    instances = [instance() for _ in range(16)]
    checked: list[str] = []

    async def run() -> None:
        assoc = await open_association(w.port, 16)
        try:
            futures = {}
            for uid, data in instances:
                future = await assoc.send_c_store_nowait(
                    data,
                    sop_class_uid=CT,
                    sop_instance_uid=uid,
                    transfer_syntax=ExplicitVRLittleEndian,
                )
                futures[future] = uid
            for future in asyncio.as_completed(list(futures)):
                rsp = await future
                uid = str(rsp.AffectedSOPInstanceUID)
                assert rsp.Status == 0x0000
                # At the moment Success arrives the instance is in place, and its
                # inode has been through fsync.
                final = w.root / STUDY / SERIES / f"{uid}.dcm"
                assert final.exists(), uid
                st = final.stat()
                with slow.lock:
                    assert slow.durable.get(st.st_ino) == st.st_size, uid
                checked.append(uid)
        finally:
            await assoc.release()

    asyncio.run(run())
    assert sorted(checked) == sorted(uid for uid, _ in instances)
    assert slow.flushes < len(instances)  # the pipelined instances shared flushes


def test_window_overrun_is_aborted(worker_factory: WorkerFactory) -> None:
    """A sender that has more requests outstanding than it was granted is aborted."""

    async def slow_store(event: Any) -> int:
        await asyncio.sleep(0.5)
        return 0x0000

    w = worker_factory(max_async_ops=2, evt_handlers=[(evt.EVT_C_STORE, slow_store)])
    data = instance()[1]

    async def run() -> BaseException | None:
        assoc = await open_association(w.port, 2)
        assert assoc.max_outstanding == 2
        assoc.max_outstanding = 3  # break the agreement on purpose
        futures = [
            await assoc.send_c_store_nowait(
                data,
                sop_class_uid=CT,
                sop_instance_uid=generate_uid(),
                transfer_syntax=ExplicitVRLittleEndian,
            )
            for _ in range(3)
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assoc.abort()
        return errors[0] if errors else None

    error = asyncio.run(run())
    assert isinstance(error, ConnectionError), error
    w.wait_idle()


class ThreadRecordingStorage(SlowDurableStorage):
    """Also remembers which thread ran each fsync."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.threads: list[str] = []

    def fsync(self, fd: int) -> None:
        with self.lock:
            self.threads.append(threading.current_thread().name)
        super().fsync(fd)


@pytest.mark.parametrize(("delay", "pooled"), [(0.0, False), (0.3, True)])
def test_commits_go_to_the_pool_only_when_fsync_is_slow(
    worker_factory: WorkerFactory, delay: float, pooled: bool
) -> None:
    """With two associations open and one request at a time, a worker commits on its
    event loop while fsyncs are quick (handing them to the pool would cost more), and
    on its group commit thread once they are slow, so that the loop is not held up; either way
    Success follows the fsync. The bound is 0.1 s here (2 ms by default), well apart
    from both a real fsync of a small file and the slow one (0.3 s), so that a busy
    machine does not decide the outcome."""
    ops = ThreadRecordingStorage(delay)
    w = worker_factory(
        fsync="always",
        store_ops=replace(FileOps(), fsync=ops.fsync),
        inline_commit_below=0.1,
    )
    instances = [instance() for _ in range(6 if delay else 20)]

    async def run() -> None:
        first = await open_association(w.port, None)
        second = await open_association(w.port, None)  # the worker's second one
        try:
            for uid, data in instances:
                rsp = await first.send_c_store(
                    data,
                    sop_class_uid=CT,
                    sop_instance_uid=uid,
                    transfer_syntax=ExplicitVRLittleEndian,
                )
                assert rsp.Status == 0x0000
                final = w.root / STUDY / SERIES / f"{uid}.dcm"
                with ops.lock:
                    assert final.stat().st_ino in ops.durable, uid
        finally:
            await first.release()
            await second.release()

    asyncio.run(run())
    # Two fsyncs per instance (the file, then its directory); the last five instances'.
    in_pool = [name == "group-commit" for name in ops.threads[-10:]]
    assert in_pool == [pooled] * 10, ops.threads
