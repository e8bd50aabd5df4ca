"""Storage Commitment Push Model SCP (workers/commitment.py) with pynetdicom as the
Storage Commitment SCU: the report on the same association and on a new one, failures
for instances that are missing, altered or of another class, retries while the
requestor is unreachable, a pending report that outlives the worker, refused
requests, and a user's EVT_N_ACTION handler taking precedence."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt

from workers.engine import events as wevt
from workers.index import open_index

from .conftest import CT_IMAGE, MR_IMAGE, WorkerFactory, free_port, wait_for
from .indexing import (
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    commitment_request,
    index_store,
    install,
    make_ct,
    store,
)

SCU_AE = "COMMITSCU"


class Reports:
    """N-EVENT-REPORTs received by a pynetdicom Storage Commitment SCU."""

    def __init__(self) -> None:
        self.received: list[tuple[int, Any, Any]] = []
        self.lock = threading.Lock()

    def handler(self, event: Any) -> tuple[int, None]:
        with self.lock:
            self.received.append((event.event_type, event.event_information, event.assoc))
        return 0x0000, None

    def wait(self, count: int = 1, timeout: float = 20.0) -> list[tuple[int, Any, Any]]:
        wait_for(lambda: len(self.received) >= count, timeout)
        return list(self.received)


def _listener(reports: Reports, port: int = 0) -> Any:
    """A pynetdicom AE listening on 127.0.0.1 for the report on a new association."""
    ae = AE(ae_title=SCU_AE)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 10
    ae.add_supported_context(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
    return ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)]
    )


def _scu(role: bool = False) -> AE:
    ae = AE(ae_title=SCU_AE)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(STORAGE_COMMITMENT)
    return ae


def _request(
    w: Any, references: list[tuple[str, str]], *, transaction: str | None = None
) -> tuple[int, str]:
    """Send the N-ACTION on an association of its own (released after the response);
    returns (status, transaction UID)."""
    transaction = transaction or generate_uid()
    assoc = _scu().associate(w.host, w.port, ae_title="PACSRX")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(
            commitment_request(transaction, references),
            1,
            STORAGE_COMMITMENT,
            STORAGE_COMMITMENT_INSTANCE,
        )
    finally:
        assoc.release()
    return int(status.Status), transaction


def _stored_study(w: Any, services: Any, n: int = 3) -> dict[str, Path]:
    study, series = generate_uid(), generate_uid()
    store(w, [make_ct(i, study=study, series=series) for i in range(n)])
    return index_store(services, w.root)


def _items(ds: Any, name: str) -> dict[str, Any]:
    return {str(item.ReferencedSOPInstanceUID): item for item in ds.get(name, [])}


def test_report_on_the_same_association_when_the_scu_took_the_scp_role(
    index_url: str | None,
    worker_factory: WorkerFactory,
) -> None:
    w = worker_factory()
    services = install(w, index_url)
    files = _stored_study(w, services)
    reports = Reports()
    transaction = generate_uid()
    ae = _scu()
    assoc = ae.associate(
        w.host,
        w.port,
        ae_title="PACSRX",
        ext_neg=[build_role(STORAGE_COMMITMENT, scu_role=True, scp_role=True)],
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
    )
    assert assoc.is_established
    try:
        references = [(CT_IMAGE, uid) for uid in files]
        status, _ = assoc.send_n_action(
            commitment_request(transaction, references),
            1,
            STORAGE_COMMITMENT,
            STORAGE_COMMITMENT_INSTANCE,
        )
        assert status.Status == 0x0000
        (event_type, info, on), *_ = reports.wait()
        assert on is assoc  # not a new association: nothing listens for one here
    finally:
        assoc.release()
    assert event_type == 1
    assert info.TransactionUID == transaction
    assert set(_items(info, "ReferencedSOPSequence")) == set(files)
    assert "FailedSOPSequence" not in info
    assert services.index is not None
    wait_for(lambda: not services.index.due_pending(owner=""), 5.0)  # delivered: forgotten


def test_report_on_a_new_association_with_failures(
    index_url: str | None, worker_factory: WorkerFactory
) -> None:
    reports = Reports()
    server = _listener(reports)
    try:
        w = worker_factory()
        services = install(
            w,
            remote_aes={SCU_AE: {"host": "127.0.0.1", "port": server.server_address[1]}},
        )
        files = _stored_study(w, services, n=4)
        good, altered, deleted, conflict = list(files)
        # Altered on disk after it was stored: its digest no longer matches.
        data = bytearray(files[altered].read_bytes())
        data[-1] ^= 0xFF
        files[altered].write_bytes(bytes(data))
        files[deleted].unlink()
        never = generate_uid()
        status, transaction = _request(
            w,
            [
                (CT_IMAGE, good),
                (CT_IMAGE, altered),
                (CT_IMAGE, deleted),
                (MR_IMAGE, conflict),
                (CT_IMAGE, never),
            ],
        )
        assert status == 0x0000
        (event_type, info, _), *_ = reports.wait()
    finally:
        server.shutdown()
    assert event_type == 2
    assert info.TransactionUID == transaction
    assert set(_items(info, "ReferencedSOPSequence")) == {good}
    failed = {
        uid: int(item.FailureReason) for uid, item in _items(info, "FailedSOPSequence").items()
    }
    assert failed == {altered: 0x0110, deleted: 0x0112, conflict: 0x0119, never: 0x0112}
    assert services.index is not None
    record = services.index.get(deleted)
    assert record is not None and record.state == "missing"


def test_report_retried_until_the_requestor_listens(
    index_url: str | None, worker_factory: WorkerFactory
) -> None:
    port = free_port()
    w = worker_factory()
    services = install(
        w, index_url, remote_aes={SCU_AE: {"host": "127.0.0.1", "port": port}}, commitment_retry=0.2
    )
    files = _stored_study(w, services, n=2)
    status, transaction = _request(w, [(CT_IMAGE, uid) for uid in files])
    assert status == 0x0000
    assert services.index is not None
    index = services.index
    # Nobody listens yet: the report is pending and was attempted at least twice.
    wait_for(lambda: any(r.attempts >= 2 for r in index.due_pending(owner="")), 15.0)
    reports = Reports()
    server = _listener(reports, port)
    try:
        (event_type, info, _), *_ = reports.wait()
    finally:
        server.shutdown()
    assert event_type == 1
    assert info.TransactionUID == transaction
    assert set(_items(info, "ReferencedSOPSequence")) == set(files)
    wait_for(lambda: not index.due_pending(owner=""), 5.0)


def test_pending_report_survives_a_restart(
    index_url: str | None, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    port = free_port()
    root = tmp_path / "shared-store"
    remote = {SCU_AE: {"host": "127.0.0.1", "port": port}}
    first = worker_factory(root=root)
    services = install(first, index_url, remote_aes=remote, commitment_retry=0.2)
    files = _stored_study(first, services, n=2)
    status, transaction = _request(first, [(CT_IMAGE, uid) for uid in files])
    assert status == 0x0000
    assert services.index is not None
    index = services.index
    wait_for(lambda: any(r.attempts >= 1 for r in index.due_pending(owner="")), 15.0)
    first.stop()
    with open_index(index_url, str(root)) as fresh:
        assert len(fresh.due_pending(owner="")) == 1  # kept across the stop
    reports = Reports()
    server = _listener(reports, port)
    try:
        second = worker_factory(root=root)
        again = install(second, index_url, remote_aes=remote, commitment_retry=0.2)
        (event_type, info, _), *_ = reports.wait()
    finally:
        server.shutdown()
    assert event_type == 1
    assert info.TransactionUID == transaction
    assert set(_items(info, "ReferencedSOPSequence")) == set(files)
    assert again.index is not None
    index2 = again.index
    wait_for(lambda: not index2.due_pending(owner=""), 5.0)


def test_two_workers_take_over_an_orphaned_report_once(
    index_url: str | None, worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    """A report left pending by a stopped worker is found by the sweepers of two
    workers on the same index: one claims it (the lease), the requestor gets it once."""
    port = free_port()
    root = tmp_path / "shared-store"
    remote = {SCU_AE: {"host": "127.0.0.1", "port": port}}
    first = worker_factory(root=root)
    services = install(first, index_url, remote_aes=remote, commitment_retry=0.2)
    files = _stored_study(first, services, n=2)
    status, transaction = _request(first, [(CT_IMAGE, uid) for uid in files])
    assert status == 0x0000
    assert services.index is not None
    index = services.index
    wait_for(lambda: any(r.attempts >= 1 for r in index.due_pending(owner="")), 15.0)
    first.stop()  # gives its lease back: the report is free to claim
    reports = Reports()
    server = _listener(reports, port)
    try:
        workers = [worker_factory(root=root), worker_factory(root=root)]
        takers = [install(w, index_url, remote_aes=remote, commitment_retry=0.2) for w in workers]
        (event_type, info, _), *_ = reports.wait()
        assert takers[0].index is not None
        taker_index = takers[0].index
        wait_for(lambda: not taker_index.due_pending(owner=""), 5.0)
        time.sleep(1.0)  # a second sender, if there were one, would have sent by now
    finally:
        server.shutdown()
    assert event_type == 1 and info.TransactionUID == transaction
    assert len(reports.received) == 1


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, 0x0115), (3, 0x0213)],
    ids=["empty", "oversized"],
)
def test_empty_or_oversized_request_refused(
    index_url: str | None, worker_factory: WorkerFactory, count: int, expected: int
) -> None:
    w = worker_factory()
    services = install(w, index_url, commitment_max_references=2)
    references = [(CT_IMAGE, generate_uid()) for _ in range(count)]
    status, _ = _request(w, references)
    assert status == expected
    assert services.index is not None
    assert services.index.due_pending(owner="") == []


def test_user_n_action_handler_takes_precedence(
    index_url: str | None, worker_factory: WorkerFactory
) -> None:
    calls: list[Any] = []

    def on_action(event: Any) -> tuple[int, None]:
        calls.append(event.action_information.TransactionUID)
        return 0x0000, None

    w = worker_factory(evt_handlers=[(wevt.EVT_N_ACTION, on_action)])
    services = install(w, index_url)
    status, transaction = _request(w, [(CT_IMAGE, generate_uid())])
    assert status == 0x0000
    assert calls == [transaction]
    assert services.index is not None
    assert services.index.due_pending(owner="") == []  # the built-in never saw it
