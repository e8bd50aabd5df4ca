"""The handler contract (pynetdicom's event handler documentation) as the worker honours it.

Notification events fire with the attributes the contract lists; intervention events
have the contract's defaults when nothing is bound; handlers may be plain functions,
coroutines, generators or async generators; extended negotiation (user identity,
asynchronous operations window, SOP class extended) goes through its handler.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    Verification,
)

import workers.events as events_module
from workers.engine import acse, dimse
from workers.engine import events as wevt
from workers.engine import pdu as p
from workers.engine.dimse import Command
from workers.engine.primitives import Aborted

from .conftest import (
    CT_IMAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    VERIFICATION,
    RawPeer,
    WorkerFactory,
    WorkerThread,
    encode_plain,
    incoming_files,
    make_files,
    make_image,
    stored_files,
    wait_for,
)

pytestmark = pytest.mark.interop

PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
MPPS = "1.2.840.10008.3.1.2.3.3"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


def scu(*contexts: str, ae_title: str = "PYNETSCU") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for uid in contexts:
        ae.add_requested_context(uid)
    return ae


def find_query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientID = ""
    return ds


# ------------------------------------------------------------ notification events


class Recorder:
    """Records every notification event, from the worker's thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def names(self, assoc: Any = None) -> list[str]:
        with self.lock:
            return [e.event.name for e in self.events if assoc is None or e.assoc is assoc]

    def of(self, event: Any) -> list[Any]:
        with self.lock:
            return [e for e in self.events if e.event is event]


def test_notification_events_fire_with_their_attributes(
    worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    rec = Recorder()
    w = worker_factory(
        evt_handlers=[(event, rec) for event in wevt.NOTIFICATION_EVENTS],
        allowed_calling_aes={"PYNETSCU"},
    )
    # 1. echo + store, released
    ct = make_files(tmp_path, 1)[0]
    assoc = scu(Verification, CTImageStorage).associate(w.host, w.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(pydicom.dcmread(ct)).Status == 0
    assoc.release()
    wait_for(lambda: len(rec.of(wevt.EVT_CONN_CLOSE)) == 1)
    # 2. aborted by the peer
    assoc = scu(Verification).associate(w.host, w.port)
    assoc.abort()
    wait_for(lambda: len(rec.of(wevt.EVT_CONN_CLOSE)) == 2)
    # 3. rejected (calling AE not allowed)
    assoc = scu(Verification, ae_title="STRANGER").associate(w.host, w.port)
    assert not assoc.is_established
    wait_for(lambda: len(rec.of(wevt.EVT_CONN_CLOSE)) == 3)
    # Read what the worker sent, not only assoc.is_rejected: pynetdicom now and then
    # reports an A-ASSOCIATE-RJ that arrives together with the close as an abort.
    assert [type(e.primitive) for e in rec.of(wevt.EVT_ACSE_SENT)][-1] is p.AssociateRJ

    for event in rec.events:
        assert isinstance(event.timestamp, datetime.datetime)
        assert event.assoc is not None
        assert event.event.is_notification
    fired = {e.event for e in rec.events}
    assert fired == set(wevt.NOTIFICATION_EVENTS)

    opened = rec.of(wevt.EVT_CONN_OPEN)
    assert len(opened) == 3
    for e in opened:
        host, port = e.address
        assert host == "127.0.0.1"
        assert isinstance(port, int) and port > 0
    for e in rec.of(wevt.EVT_ACSE_RECV) + rec.of(wevt.EVT_ACSE_SENT):
        assert e.primitive is not None
    for e in rec.of(wevt.EVT_DATA_RECV) + rec.of(wevt.EVT_DATA_SENT):
        assert isinstance(e.data, bytes) and e.data
    received = rec.of(wevt.EVT_PDU_RECV)
    assert {e.pdu_type for e in received} >= {0x01, 0x04, 0x05, 0x07}
    for e in received + rec.of(wevt.EVT_PDU_SENT):
        assert e.pdu is not None  # P-DATA-TF too: reported whole once streamed
    sent_types = {e.pdu_type for e in rec.of(wevt.EVT_PDU_SENT)}
    assert sent_types >= {0x02, 0x03, 0x04, 0x06}
    dimse_in = [e.message for e in rec.of(wevt.EVT_DIMSE_RECV)]
    assert [m.CommandField for m in dimse_in] == [0x0030, 0x0001]
    dimse_out = [e.message for e in rec.of(wevt.EVT_DIMSE_SENT)]
    assert [m.CommandField for m in dimse_out] == [0x8030, 0x8001]
    assert all(isinstance(m, Command) for m in dimse_in + dimse_out)
    # pynetdicom-style handlers read message.command_set (a pydicom Dataset)
    assert dimse_in[0].command_set.CommandField == 0x0030
    transitions = rec.of(wevt.EVT_FSM_TRANSITION)
    assert transitions
    for e in transitions:
        assert e.current_state.startswith("Sta")
        assert e.next_state.startswith("Sta")
        assert e.fsm_event.startswith("Evt")
        assert e.action[:3] in ("AE-", "DT-", "AR-", "AA-")
    first = transitions[0]
    assert (first.current_state, first.fsm_event, first.action, first.next_state) == (
        "Sta1",
        "Evt5",
        "AE-5",
        "Sta2",
    )

    released_assoc = opened[0].assoc
    names = rec.names(released_assoc)
    assert names[0] == "EVT_CONN_OPEN"
    assert names[-1] == "EVT_CONN_CLOSE"
    order = [
        n
        for n in names
        if n in ("EVT_REQUESTED", "EVT_ACCEPTED", "EVT_ESTABLISHED", "EVT_RELEASED")
    ]
    assert order == ["EVT_REQUESTED", "EVT_ACCEPTED", "EVT_ESTABLISHED", "EVT_RELEASED"]
    assert "EVT_ABORTED" not in names
    aborted_names = rec.names(opened[1].assoc)
    assert "EVT_ABORTED" in aborted_names and "EVT_RELEASED" not in aborted_names
    rejected_names = rec.names(opened[2].assoc)
    assert "EVT_REJECTED" in rejected_names and "EVT_ACCEPTED" not in rejected_names
    assert opened[2].assoc.is_rejected
    assert released_assoc.is_released and not released_assoc.is_aborted
    assert opened[1].assoc.is_aborted
    assert not any(e.assoc.is_established for e in opened)


def test_notification_handler_that_raises_is_harmless(
    worker_factory: WorkerFactory, internal_errors: list[Any]
) -> None:
    def broken(event: Any) -> None:
        raise RuntimeError("boom")

    async def broken_async(event: Any) -> None:
        raise RuntimeError("async boom")

    w = worker_factory(
        evt_handlers=[
            (wevt.EVT_ACCEPTED, broken),
            (wevt.EVT_DIMSE_RECV, broken_async),
            (wevt.EVT_PDU_RECV, broken),
        ]
    )
    assoc = scu(Verification).associate(w.host, w.port)
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert assoc.is_released


def test_handler_args_and_bind_unbind(worker_factory: WorkerFactory) -> None:
    seen: list[Any] = []

    def on_echo(event: Any, tag: str, store: list[Any]) -> int:
        store.append((tag, event.request.MessageID))
        return 0x0000

    w = worker_factory()
    w.bind(wevt.EVT_C_ECHO, on_echo, ["first", seen])
    assoc = scu(Verification).associate(w.host, w.port)
    assert assoc.send_c_echo(msg_id=3).Status == 0
    w.call(lambda: w.server.unbind(wevt.EVT_C_ECHO, on_echo))
    assert assoc.send_c_echo(msg_id=4).Status == 0  # the default handler again
    assoc.release()
    assert seen == [("first", 3)]
    assert w.call(lambda: w.server.get_handlers(wevt.EVT_C_ECHO)) is None


def test_association_level_bind(worker_factory: WorkerFactory) -> None:
    """A handler bound on ``event.assoc`` serves that association only."""

    def on_accepted(event: Any) -> None:
        if event.assoc.requestor.ae_title == "SPECIAL":
            event.assoc.bind(wevt.EVT_C_ECHO, lambda e: 0x0110)

    w = worker_factory(evt_handlers=[(wevt.EVT_ACCEPTED, on_accepted)])
    special = scu(Verification, ae_title="SPECIAL").associate(w.host, w.port)
    plain = scu(Verification).associate(w.host, w.port)
    try:
        assert special.send_c_echo().Status == 0x0110
        assert plain.send_c_echo().Status == 0x0000
    finally:
        special.release()
        plain.release()


# ---------------------------------------------------------- intervention defaults


def test_intervention_defaults(worker: WorkerThread) -> None:
    ae = scu(
        Verification,
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelGet,
        PatientRootQueryRetrieveInformationModelMove,
        PRINTER,
        MPPS,
        STORAGE_COMMITMENT,
    )
    assoc = ae.associate(worker.host, worker.port)
    try:
        assert assoc.send_c_echo().Status == 0x0000
        find = list(assoc.send_c_find(find_query(), PatientRootQueryRetrieveInformationModelFind))
        assert [s.Status for s, _ in find] == [0xC311]
        get = list(assoc.send_c_get(find_query(), PatientRootQueryRetrieveInformationModelGet))
        assert [s.Status for s, _ in get] == [0xC411]
        move = list(
            assoc.send_c_move(find_query(), "DEST", PatientRootQueryRetrieveInformationModelMove)
        )
        assert [s.Status for s, _ in move] == [0xC511]
        status, _ = assoc.send_n_get([0x21100010], PRINTER, PRINTER_INSTANCE)
        assert status.Status == 0x0110
        mods = Dataset()
        mods.PatientID = "1"
        status, _ = assoc.send_n_set(mods, MPPS, "1.2.3")
        assert status.Status == 0x0110
        status, _ = assoc.send_n_create(mods, MPPS, "1.2.3")
        assert status.Status == 0x0110
        status, _ = assoc.send_n_action(mods, 1, STORAGE_COMMITMENT, "1.2.840.10008.1.20.1.1")
        assert status.Status == 0x0110
        status, _ = assoc.send_n_event_report(mods, 1, STORAGE_COMMITMENT, "1.2.3")
        assert status.Status == 0x0110
        assert assoc.send_n_delete(MPPS, "1.2.3").Status == 0x0110
    finally:
        assoc.release()


# ------------------------------------------------------------------ handler shapes


def test_handler_shapes(worker_factory: WorkerFactory) -> None:
    """Plain function, coroutine, generator and async generator handlers."""

    async def echo(event: Any) -> Dataset:
        await asyncio.sleep(0)
        status = Dataset()
        status.Status = 0x0000
        return status

    def find_gen(event: Any) -> Iterator[tuple[int, Dataset]]:
        for i in range(2):
            ds = Dataset()
            ds.PatientID = f"G{i}"
            yield 0xFF00, ds

    async def find_agen(event: Any) -> AsyncIterator[tuple[int, Dataset]]:
        for i in range(2):
            await asyncio.sleep(0)
            ds = Dataset()
            ds.PatientID = f"A{i}"
            yield 0xFF00, ds

    async def n_get(event: Any) -> tuple[Dataset, Dataset]:
        status = Dataset()
        status.Status = 0x0107  # warning: attribute list error
        status.ErrorComment = "partial"
        ds = Dataset()
        ds.PrinterStatus = "NORMAL"
        return status, ds

    images = [make_image(seed=i) for i in range(2)]

    async def get_agen(event: Any) -> AsyncIterator[Any]:
        yield len(images)
        for ds in images:
            await asyncio.sleep(0)
            yield 0xFF00, ds

    w = worker_factory(
        evt_handlers=[
            (wevt.EVT_C_ECHO, echo),
            (wevt.EVT_C_FIND, find_gen),
            (wevt.EVT_N_GET, n_get),
            (wevt.EVT_C_GET, get_agen),
        ]
    )
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        return 0

    ae = scu(
        Verification,
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelGet,
        PRINTER,
        CTImageStorage,
    )
    from pynetdicom import evt

    assoc = ae.associate(
        w.host,
        w.port,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        assert assoc.send_c_echo().Status == 0x0000
        find = list(assoc.send_c_find(find_query(), PatientRootQueryRetrieveInformationModelFind))
        assert [i.PatientID for _, i in find[:2]] == ["G0", "G1"]
        assert find[-1][0].Status == 0
        w.bind(wevt.EVT_C_FIND, find_agen)
        find = list(assoc.send_c_find(find_query(), PatientRootQueryRetrieveInformationModelFind))
        assert [i.PatientID for _, i in find[:2]] == ["A0", "A1"]
        assert find[-1][0].Status == 0
        status, attrs = assoc.send_n_get([0x21100010], PRINTER, PRINTER_INSTANCE)
        assert status.Status == 0x0107
        assert status.ErrorComment == "partial"
        assert attrs.PrinterStatus == "NORMAL"
        get = list(assoc.send_c_get(find_query(), PatientRootQueryRetrieveInformationModelGet))
        assert get[-1][0].Status == 0
        assert received == [d.SOPInstanceUID for d in images]
    finally:
        assoc.release()


def test_user_store_handler(
    worker_factory: WorkerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user C-STORE handler: event.dataset decoded only when read, event.file_meta,
    int or Dataset status; nothing goes to the built-in store, no spool file is left."""
    decoded: list[int] = []
    real_decode = events_module.decode_dataset

    def counting_decode(data: bytes, transfer_syntax: str, *args: Any) -> Dataset:
        decoded.append(len(data))
        return real_decode(data, transfer_syntax, *args)

    monkeypatch.setattr(events_module, "decode_dataset", counting_decode)
    got: list[Any] = []

    def on_store(event: Any) -> Any:
        uid = event.request.AffectedSOPInstanceUID
        if uid.endswith(".1"):  # look at nothing: no decode
            return 0x0000
        ds = event.dataset
        meta = event.file_meta
        got.append((ds.SOPInstanceUID, ds.PatientID, meta.TransferSyntaxUID, ds.file_meta))
        if ds.PatientID == "PID0001":
            status = Dataset()
            status.Status = 0xB000
            status.ErrorComment = "coerced"
            return status
        return 0x0000

    w = worker_factory(evt_handlers=[(wevt.EVT_C_STORE, on_store)])
    files = make_files(tmp_path / "src", 3, IMPLICIT_LE)
    # a fourth instance whose UID ends in ".1" is never decoded
    lazy = make_image(seed=9)
    lazy.SOPInstanceUID = "1.2.826.0.1.3680043.10.1415.99.1"
    lazy_file = tmp_path / "lazy.dcm"
    from .conftest import write_file

    write_file(lazy, lazy_file, EXPLICIT_LE)
    ae = scu()
    ae.add_requested_context(CTImageStorage, [IMPLICIT_LE, EXPLICIT_LE])
    ae.add_requested_context(CTImageStorage, [EXPLICIT_LE])
    assoc = ae.associate(w.host, w.port)
    try:
        statuses = [assoc.send_c_store(f) for f in files]
        lazy_status = assoc.send_c_store(lazy_file)
    finally:
        assoc.release()
    assert [s.Status for s in statuses] == [0x0000, 0xB000, 0x0000]
    assert statuses[1].ErrorComment == "coerced"
    assert lazy_status.Status == 0x0000
    assert len(decoded) == 3  # the lazy one was never decoded
    sources = [pydicom.dcmread(f) for f in files]
    assert [(g[0], g[1], g[2]) for g in got] == [
        (s.SOPInstanceUID, s.PatientID, IMPLICIT_LE) for s in sources
    ]
    assert got[0][3].MediaStorageSOPInstanceUID == sources[0].SOPInstanceUID
    assert stored_files(w.root) == {}
    wait_for(lambda: incoming_files(w.root) == [])


def test_user_store_handler_encoded_dataset(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    """``event.encoded_dataset()`` gives the Part 10 file of what was received."""
    out = tmp_path / "out"
    out.mkdir()

    def on_store(event: Any) -> int:
        path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        return 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_STORE, on_store)])
    src = make_files(tmp_path / "src", 2, EXPLICIT_LE)
    ae = scu()
    ae.add_requested_context(CTImageStorage, [EXPLICIT_LE])
    assoc = ae.associate(w.host, w.port)
    try:
        assert all(assoc.send_c_store(f).Status == 0 for f in src)
    finally:
        assoc.release()
    from .conftest import assert_same_instance

    for f in src:
        uid = pydicom.dcmread(f).SOPInstanceUID
        assert_same_instance(f, out / f"{uid}.dcm", same_bytes=True)


# ------------------------------------------------------------ extended negotiation


def _user_identity(user: bytes, password: bytes, response: bool = False) -> Any:
    item = UserIdentityNegotiation()
    item.user_identity_type = 2
    item.primary_field = user
    item.secondary_field = password
    item.positive_response_requested = response
    return item


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_user_identity(worker_factory: WorkerFactory, kind: str) -> None:
    def check(event: Any) -> tuple[bool, bytes | None]:
        ok = (event.user_id_type, event.primary_field, event.secondary_field) == (
            2,
            b"alice",
            b"secret",
        )
        return ok, (b"welcome" if ok else None)

    async def check_async(event: Any) -> tuple[bool, bytes | None]:
        await asyncio.sleep(0.01)
        return check(event)

    w = worker_factory(evt_handlers=[(wevt.EVT_USER_ID, check if kind == "sync" else check_async)])
    bad = scu(Verification).associate(w.host, w.port, ext_neg=[_user_identity(b"alice", b"wrong")])
    assert bad.is_rejected
    good = scu(Verification).associate(
        w.host, w.port, ext_neg=[_user_identity(b"alice", b"secret", response=True)]
    )
    try:
        assert good.is_established
        assert good.acceptor.user_identity is not None
        assert good.acceptor.user_identity.server_response == b"welcome"
    finally:
        good.release()


def test_user_identity_handler_that_raises_rejects(worker_factory: WorkerFactory) -> None:
    def broken(event: Any) -> Any:
        raise RuntimeError("directory down")

    w = worker_factory(evt_handlers=[(wevt.EVT_USER_ID, broken)])
    assoc = scu(Verification).associate(w.host, w.port, ext_neg=[_user_identity(b"a", b"b")])
    assert assoc.is_rejected
    ok = scu(Verification).associate(w.host, w.port)  # no identity: not asked
    assert ok.is_established
    ok.release()


def _async_ops(invoked: int, performed: int) -> Any:
    item = AsynchronousOperationsWindowNegotiation()
    item.maximum_number_operations_invoked = invoked
    item.maximum_number_operations_performed = performed
    return item


def test_async_ops_window(worker_factory: WorkerFactory) -> None:
    asked: list[tuple[int, int]] = []

    def window(event: Any) -> tuple[int, int]:
        asked.append((event.invoked, event.performed))
        return 3, 8

    w = worker_factory(evt_handlers=[(wevt.EVT_ASYNC_OPS, window)], max_async_ops=4)
    assoc = scu(Verification).associate(w.host, w.port, ext_neg=[_async_ops(5, 5)])
    try:
        assert assoc.is_established
        # the handler's answer, bounded by max_async_ops and by what was proposed
        assert assoc.acceptor.asynchronous_operations == (3, 4)
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    assert asked == [(5, 5)]


def test_async_ops_window_is_honoured(worker_factory: WorkerFactory) -> None:
    """With a window of 3 granted, 3 requests may be outstanding at once (they are
    served concurrently); a 4th beyond the window is a protocol error."""
    running = [0, 0]  # now, peak

    async def slow_echo(event: Any) -> int:
        running[0] += 1
        running[1] = max(running)
        await asyncio.sleep(0.2)
        running[0] -= 1
        return 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_ECHO, slow_echo)], max_async_ops=3)
    peer = RawPeer(w, [acse.Requested(VERIFICATION), acse.Requested(CT_IMAGE)], async_ops=(8, 8))
    assert peer.accepted is not None
    window = peer.accepted.response.user_info.async_ops
    assert (window.invoked, window.performed) == (3, 3)
    ctx = peer.context_id(VERIFICATION)
    for message_id in (1, 2, 3):
        peer.send(ctx, dimse.c_echo_rq(message_id))
    answered = sorted(peer.response()[0].MessageIDBeingRespondedTo for _ in range(3))
    assert answered == [1, 2, 3]
    assert running[1] == 3  # concurrently, not one after the other
    # pipelined C-STOREs to the built-in store
    images = [make_image(seed=i) for i in range(3)]
    ct = peer.context_id(CT_IMAGE)
    for i, ds in enumerate(images):
        peer.send(ct, dimse.c_store_rq(10 + i, CT_IMAGE, ds.SOPInstanceUID), encode_plain(ds))
    statuses = {peer.response()[0].Status for _ in images}
    assert statuses == {0}
    assert set(stored_files(w.root)) == {ds.SOPInstanceUID for ds in images}
    # one more than the window
    for message_id in (20, 21, 22, 23):
        peer.send(ctx, dimse.c_echo_rq(message_id))
    assert isinstance(peer.wait_for(Aborted), Aborted)


def test_async_ops_default_is_no_item(worker: WorkerThread) -> None:
    assoc = scu(Verification).associate(worker.host, worker.port, ext_neg=[_async_ops(5, 5)])
    try:
        assert assoc.acceptor.asynchronous_operations == (1, 1)
    finally:
        assoc.release()


def test_sop_class_extended(worker_factory: WorkerFactory) -> None:
    asked: list[dict[str, bytes]] = []

    def extended(event: Any) -> dict[str, bytes]:
        asked.append(dict(event.app_info))
        return {uid: b"\x01" for uid in event.app_info}

    w = worker_factory(evt_handlers=[(wevt.EVT_SOP_EXTENDED, extended)])
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = PatientRootQueryRetrieveInformationModelFind
    item.service_class_application_information = b"\x01\x01"
    assoc = scu(PatientRootQueryRetrieveInformationModelFind).associate(
        w.host, w.port, ext_neg=[item]
    )
    try:
        assert assoc.is_established
        assert assoc.acceptor.sop_class_extended == {
            PatientRootQueryRetrieveInformationModelFind: b"\x01"
        }
    finally:
        assoc.release()
    assert asked == [{PatientRootQueryRetrieveInformationModelFind: b"\x01\x01"}]


def test_timestamps_are_recent(worker_factory: WorkerFactory) -> None:
    stamps: list[datetime.datetime] = []
    w = worker_factory(evt_handlers=[(wevt.EVT_CONN_OPEN, lambda e: stamps.append(e.timestamp))])
    before = datetime.datetime.now()
    assoc = scu(Verification).associate(w.host, w.port)
    assoc.release()
    wait_for(lambda: stamps)
    assert before - datetime.timedelta(seconds=1) <= stamps[0] <= datetime.datetime.now()
    time.sleep(0)
