"""pynetdicom as the peer of the worker: every DIMSE service the worker serves.

pynetdicom is the SCU (echo, store, find, get with role selection, cancel, N-*), and
the C-MOVE destination (a pynetdicom storage SCP on another 127.0.0.1 port). Handlers
bound in the worker use the contract's shapes (pynetdicom's event handlers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    Verification,
)

from workers.engine import events as wevt

from .conftest import (
    CT_IMAGE,
    DEFLATED,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    WorkerFactory,
    WorkerThread,
    assert_same_instance,
    free_port,
    make_files,
    make_image,
    stored_files,
)

pytestmark = pytest.mark.interop

PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
MPPS = "1.2.840.10008.3.1.2.3.3"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
FILM_SESSION = "1.2.840.10008.5.1.1.1"


def scu_ae(*contexts: str, transfer_syntaxes: list[str] | None = None) -> AE:
    ae = AE(ae_title="PYNETSCU")
    ae.acse_timeout = 10
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    for uid in contexts:
        if transfer_syntaxes:
            ae.add_requested_context(uid, transfer_syntaxes)
        else:
            ae.add_requested_context(uid)
    return ae


def associate(ae: AE, w: WorkerThread, **kwargs: Any) -> Any:
    assoc = ae.associate(w.host, w.port, ae_title="PACSRX", **kwargs)
    assert assoc.is_established
    return assoc


# ------------------------------------------------------------------ echo, store


def test_c_echo(worker: WorkerThread) -> None:
    assoc = associate(scu_ae(Verification), worker)
    try:
        for msg_id in (1, 2, 3):
            status = assoc.send_c_echo(msg_id=msg_id)
            assert status.Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED])
def test_c_store_builtin(
    worker_factory: WorkerFactory, tmp_path: Path, transfer_syntax: str
) -> None:
    w = worker_factory(fsync="always")
    files = make_files(tmp_path / "src", 5, transfer_syntax)
    ae = scu_ae(CTImageStorage, transfer_syntaxes=[transfer_syntax])
    assoc = associate(ae, w)
    try:
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            assert status.Status == 0x0000
    finally:
        assoc.release()
    stored = stored_files(w.root)
    assert len(stored) == len(files)
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert_same_instance(f, stored[uid], same_bytes=transfer_syntax != DEFLATED)


def test_c_store_several_classes_one_association(worker: WorkerThread, tmp_path: Path) -> None:
    ct = make_files(tmp_path / "ct", 3, EXPLICIT_LE)
    mr = make_files(tmp_path / "mr", 3, IMPLICIT_LE, sop_class=MRImageStorage)
    ae = scu_ae(CTImageStorage, MRImageStorage)
    assoc = associate(ae, worker)
    try:
        for f in ct + mr:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    finally:
        assoc.release()
    assert len(stored_files(worker.root)) == 6


# ------------------------------------------------------------------------ C-FIND


def _find_handler(event: Any) -> Iterator[tuple[int, Dataset]]:
    query = event.identifier
    assert query.QueryRetrieveLevel == "PATIENT"
    for i in range(3):
        ds = Dataset()
        ds.QueryRetrieveLevel = "PATIENT"
        ds.PatientID = f"P{i}"
        ds.PatientName = f"{query.PatientName}{i}"
        yield 0xFF00, ds


def test_c_find(worker_factory: WorkerFactory) -> None:
    w = worker_factory(evt_handlers=[(wevt.EVT_C_FIND, _find_handler)])
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientName = "Doe^"
    query.PatientID = ""
    assoc = associate(scu_ae(PatientRootQueryRetrieveInformationModelFind), w)
    try:
        responses = list(
            assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind, msg_id=9)
        )
    finally:
        assoc.release()
    statuses = [status.Status for status, _ in responses]
    assert statuses == [0xFF00, 0xFF00, 0xFF00, 0x0000]
    ids = [ident.PatientID for _, ident in responses[:3]]
    assert ids == ["P0", "P1", "P2"]
    assert responses[0][1].PatientName == "Doe^0"
    assert responses[3][1] is None


def test_c_cancel_during_c_find(worker_factory: WorkerFactory) -> None:
    yielded = []

    def slow_find(event: Any) -> Iterator[tuple[int, Dataset]]:
        for i in range(200):
            if event.is_cancelled:
                return
            ds = Dataset()
            ds.PatientID = f"P{i}"
            yielded.append(i)
            yield 0xFF00, ds
            time.sleep(0.01)

    w = worker_factory(evt_handlers=[(wevt.EVT_C_FIND, slow_find)])
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = ""
    assoc = associate(scu_ae(PatientRootQueryRetrieveInformationModelFind, Verification), w)
    context_id = next(
        cx.context_id
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == PatientRootQueryRetrieveInformationModelFind
    )
    statuses = []
    try:
        for status, _ in assoc.send_c_find(
            query, PatientRootQueryRetrieveInformationModelFind, msg_id=5
        ):
            statuses.append(status.Status)
            if len(statuses) == 2:
                assoc.send_c_cancel(5, context_id)
        # the association goes on after the cancel
        assert assoc.send_c_echo(msg_id=6).Status == 0x0000
    finally:
        assoc.release()
    assert statuses[-1] == 0xFE00
    assert len(statuses) < 50
    assert set(statuses[:-1]) == {0xFF00}


# ------------------------------------------------------------------------- C-GET


def test_c_get_with_role_selection(worker_factory: WorkerFactory) -> None:
    images = [make_image(seed=i) for i in range(4)]

    def get_handler(event: Any) -> Iterator[Any]:
        assert event.identifier.QueryRetrieveLevel == "STUDY"
        yield len(images)
        for ds in images:
            yield 0xFF00, ds

    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    w = worker_factory(evt_handlers=[(wevt.EVT_C_GET, get_handler)])
    ae = scu_ae(PatientRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    role = build_role(CTImageStorage, scp_role=True)
    assoc = ae.associate(
        w.host,
        w.port,
        ae_title="PACSRX",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = generate_uid()
    try:
        responses = list(assoc.send_c_get(query, PatientRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    statuses = [s.Status for s, _ in responses]
    assert statuses == [0xFF00] * 4 + [0x0000]
    final = responses[-1][0]
    assert final.NumberOfCompletedSuboperations == 4
    assert final.NumberOfFailedSuboperations == 0
    assert [r.SOPInstanceUID for r in received] == [d.SOPInstanceUID for d in images]
    assert received[0].PixelData == images[0].PixelData
    assert responses[1][0].NumberOfRemainingSuboperations == 2


def test_c_get_without_role_selection_fails_every_sub_operation(
    worker_factory: WorkerFactory,
) -> None:
    """No SCP role granted for CT: no context to send the instances back on."""

    def get_handler(event: Any) -> Iterator[Any]:
        yield 2
        for i in range(2):
            yield 0xFF00, make_image(seed=i)

    w = worker_factory(evt_handlers=[(wevt.EVT_C_GET, get_handler)])
    ae = scu_ae(PatientRootQueryRetrieveInformationModelGet, CTImageStorage)
    assoc = associate(ae, w)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    try:
        responses = list(assoc.send_c_get(query, PatientRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0xA702
    assert final.NumberOfFailedSuboperations == 2
    assert final.NumberOfCompletedSuboperations == 0


def test_c_cancel_during_c_get(worker_factory: WorkerFactory) -> None:
    images = [make_image(seed=i) for i in range(40)]

    def get_handler(event: Any) -> Iterator[Any]:
        yield len(images)
        for ds in images:
            yield 0xFF00, ds

    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(event.request.AffectedSOPInstanceUID)
        time.sleep(0.01)
        return 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_GET, get_handler)])
    ae = scu_ae(PatientRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        w.host,
        w.port,
        ae_title="PACSRX",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    responses = []
    try:
        for status, identifier in assoc.send_c_get(
            query, PatientRootQueryRetrieveInformationModelGet, msg_id=3
        ):
            responses.append((status, identifier))
            if len(responses) == 2:
                assoc.send_c_cancel(3, query_model=PatientRootQueryRetrieveInformationModelGet)
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0xFE00
    assert final.NumberOfCompletedSuboperations == len(stored) < len(images)
    assert final.NumberOfRemainingSuboperations == len(images) - len(stored)


def test_c_get_sub_operation_failures_are_counted(worker_factory: WorkerFactory) -> None:
    images = [make_image(seed=i) for i in range(3)]

    def get_handler(event: Any) -> Iterator[Any]:
        yield 3
        for ds in images:
            yield 0xFF00, ds

    def on_store(event: Any) -> int:
        return 0xA700 if event.request.AffectedSOPInstanceUID == images[1].SOPInstanceUID else 0

    w = worker_factory(evt_handlers=[(wevt.EVT_C_GET, get_handler)])
    ae = scu_ae(PatientRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        w.host,
        w.port,
        ae_title="PACSRX",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    try:
        responses = list(assoc.send_c_get(query, PatientRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final, identifier = responses[-1]
    assert final.Status == 0xB000
    assert final.NumberOfCompletedSuboperations == 2
    assert final.NumberOfFailedSuboperations == 1
    assert identifier is not None
    assert identifier.FailedSOPInstanceUIDList == images[1].SOPInstanceUID


# ------------------------------------------------------------------------ C-MOVE


def test_c_move_to_pynetdicom_storage_scp(worker_factory: WorkerFactory) -> None:
    images = [make_image(seed=i) for i in range(3)]
    dest_port = free_port()
    received: list[Any] = []
    got_all = threading.Event()

    def on_store(event: Any) -> int:
        ds = event.dataset
        received.append((ds.SOPInstanceUID, event.request.MoveOriginatorMessageID))
        if len(received) == len(images):
            got_all.set()
        return 0x0000

    dest = AE(ae_title="MOVEDEST")
    dest.add_supported_context(CTImageStorage, [EXPLICIT_LE, IMPLICIT_LE])
    server = dest.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )

    def move_handler(event: Any) -> Iterator[Any]:
        assert event.move_destination == "MOVEDEST"
        yield "127.0.0.1", dest_port
        yield len(images)
        for ds in images:
            yield 0xFF00, ds

    try:
        w = worker_factory(evt_handlers=[(wevt.EVT_C_MOVE, move_handler)])
        assoc = associate(scu_ae(PatientRootQueryRetrieveInformationModelMove), w)
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "P1"
        try:
            responses = list(
                assoc.send_c_move(
                    query, "MOVEDEST", PatientRootQueryRetrieveInformationModelMove, msg_id=11
                )
            )
        finally:
            assoc.release()
        assert got_all.wait(5)
    finally:
        server.shutdown()
    final = responses[-1][0]
    assert final.Status == 0x0000, responses
    assert final.NumberOfCompletedSuboperations == 3
    assert sorted(uid for uid, _ in received) == sorted(d.SOPInstanceUID for d in images)
    assert {mid for _, mid in received} == {11}


def test_c_move_destination_not_listening(worker_factory: WorkerFactory) -> None:
    port = free_port()  # nobody listens there

    def move_handler(event: Any) -> Iterator[Any]:
        yield "127.0.0.1", port
        yield 2
        for i in range(2):
            yield 0xFF00, make_image(seed=i)

    w = worker_factory(evt_handlers=[(wevt.EVT_C_MOVE, move_handler)])
    assoc = associate(scu_ae(PatientRootQueryRetrieveInformationModelMove), w)
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    try:
        responses = list(
            assoc.send_c_move(query, "DEST", PatientRootQueryRetrieveInformationModelMove)
        )
    finally:
        assoc.release()
    assert [s.Status for s, _ in responses] == [0xA801]


def test_c_move_destination_refuses_the_sop_class(worker_factory: WorkerFactory) -> None:
    """The destination takes MR only, with the contract's ``(addr, port, kwargs)``
    destination carrying pynetdicom-style ``ae_title``: every CT sub-operation fails."""
    dest_port = free_port()
    called: list[str] = []
    dest = AE(ae_title="MRONLY")
    dest.add_supported_context(MRImageStorage)
    server = dest.start_server(
        ("127.0.0.1", dest_port),
        block=False,
        evt_handlers=[(evt.EVT_REQUESTED, lambda e: called.append(e.assoc.acceptor.ae_title))],
    )

    def move_handler(event: Any) -> Iterator[Any]:
        yield "127.0.0.1", dest_port, {"ae_title": "MRONLY"}
        yield 2
        for i in range(2):
            yield 0xFF00, make_image(seed=i)

    try:
        w = worker_factory(evt_handlers=[(wevt.EVT_C_MOVE, move_handler)])
        assoc = associate(scu_ae(PatientRootQueryRetrieveInformationModelMove), w)
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        try:
            responses = list(
                assoc.send_c_move(query, "DEST", PatientRootQueryRetrieveInformationModelMove)
            )
        finally:
            assoc.release()
    finally:
        server.shutdown()
    final, identifier = responses[-1]
    assert final.Status == 0xA702
    assert final.NumberOfFailedSuboperations == 2
    assert identifier is not None and len(identifier.FailedSOPInstanceUIDList) == 2


def test_c_move_unknown_destination(worker_factory: WorkerFactory) -> None:
    def move_handler(event: Any) -> Iterator[Any]:
        yield None, None

    w = worker_factory(evt_handlers=[(wevt.EVT_C_MOVE, move_handler)])
    assoc = associate(scu_ae(PatientRootQueryRetrieveInformationModelMove), w)
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    try:
        responses = list(
            assoc.send_c_move(query, "NOWHERE", PatientRootQueryRetrieveInformationModelMove)
        )
    finally:
        assoc.release()
    assert [s.Status for s, _ in responses] == [0xA801]


# --------------------------------------------------------------------- N-services


def _n_worker(worker_factory: WorkerFactory, calls: list[Any]) -> WorkerThread:
    def n_get(event: Any) -> tuple[int, Dataset]:
        calls.append(("get", event.request.RequestedSOPInstanceUID, event.attribute_identifiers))
        ds = Dataset()
        ds.PrinterStatus = "NORMAL"
        ds.PrinterName = "LASER1"
        return 0x0000, ds

    def n_set(event: Any) -> tuple[int, Dataset]:
        mods = event.attribute_list
        calls.append(("set", mods.PerformedProcedureStepStatus))
        return 0x0000, mods

    def n_action(event: Any) -> tuple[int, Dataset | None]:
        info = event.action_information
        calls.append(("action", event.action_type, info.TransactionUID))
        reply = Dataset()
        reply.TransactionUID = info.TransactionUID
        return 0x0000, reply

    def n_create(event: Any) -> tuple[int, Dataset]:
        attrs = event.attribute_list
        calls.append(("create", event.request.AffectedSOPInstanceUID, attrs.PatientID))
        attrs.SOPInstanceUID = event.request.AffectedSOPInstanceUID
        return 0x0000, attrs

    def n_delete(event: Any) -> int:
        calls.append(("delete", event.request.RequestedSOPInstanceUID))
        return 0x0000

    def n_event_report(event: Any) -> tuple[int, Dataset | None]:
        calls.append(("event", event.event_type, event.event_information.TransactionUID))
        return 0x0000, None

    return worker_factory(
        evt_handlers=[
            (wevt.EVT_N_GET, n_get),
            (wevt.EVT_N_SET, n_set),
            (wevt.EVT_N_ACTION, n_action),
            (wevt.EVT_N_CREATE, n_create),
            (wevt.EVT_N_DELETE, n_delete),
            (wevt.EVT_N_EVENT_REPORT, n_event_report),
        ]
    )


def test_n_services(worker_factory: WorkerFactory) -> None:
    calls: list[Any] = []
    w = _n_worker(worker_factory, calls)
    ae = scu_ae(PRINTER, MPPS, STORAGE_COMMITMENT, FILM_SESSION)
    assoc = associate(ae, w)
    mpps_uid = generate_uid()
    film_uid = generate_uid()
    transaction = generate_uid()
    try:
        status, attrs = assoc.send_n_get([0x21100010, 0x21101030], PRINTER, PRINTER_INSTANCE)
        assert status.Status == 0x0000
        assert attrs.PrinterStatus == "NORMAL"
        assert attrs.PrinterName == "LASER1"

        create = Dataset()
        create.PatientID = "P42"
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        status, attrs = assoc.send_n_create(create, MPPS, mpps_uid)
        assert status.Status == 0x0000
        assert attrs.PatientID == "P42"

        mods = Dataset()
        mods.PerformedProcedureStepStatus = "COMPLETED"
        status, attrs = assoc.send_n_set(mods, MPPS, mpps_uid)
        assert status.Status == 0x0000
        assert attrs.PerformedProcedureStepStatus == "COMPLETED"

        info = Dataset()
        info.TransactionUID = transaction
        status, reply = assoc.send_n_action(
            info, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
        assert status.Status == 0x0000
        assert reply.TransactionUID == transaction

        status, reply = assoc.send_n_event_report(
            info, 2, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
        assert status.Status == 0x0000

        status = assoc.send_n_delete(FILM_SESSION, film_uid)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    assert calls == [
        ("get", PRINTER_INSTANCE, [0x21100010, 0x21101030]),
        ("create", mpps_uid, "P42"),
        ("set", "COMPLETED"),
        ("action", 1, transaction),
        ("event", 2, transaction),
        ("delete", film_uid),
    ]


def test_n_create_without_instance_uid_takes_the_handlers(worker_factory: WorkerFactory) -> None:
    assigned = generate_uid()

    def n_create(event: Any) -> tuple[int, Dataset]:
        assert event.request.AffectedSOPInstanceUID is None
        ds = event.attribute_list
        ds.SOPInstanceUID = assigned
        return 0x0000, ds

    w = worker_factory(evt_handlers=[(wevt.EVT_N_CREATE, n_create)])
    commands: list[Dataset] = []
    assoc = associate(
        scu_ae(MPPS),
        w,
        evt_handlers=[(evt.EVT_DIMSE_RECV, lambda event: commands.append(event.message))],
    )
    attrs = Dataset()  # not empty: pynetdicom announces, but never sends, an empty one
    attrs.PatientID = "P1"
    try:
        status, attrs = assoc.send_n_create(attrs, MPPS)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    assert attrs.SOPInstanceUID == assigned
    assert commands[-1].command_set.AffectedSOPInstanceUID == assigned


def test_store_to_sop_class_not_accepted_is_rejected(
    worker_factory: WorkerFactory, tmp_path: Path
) -> None:
    """A worker that only accepts CT: the MR context is rejected, CT still works."""
    w = worker_factory(syntaxes={CT_IMAGE: ("*",), "1.2.840.10008.1.1": ("*",)})
    ae = scu_ae(CTImageStorage, MRImageStorage)
    assoc = associate(ae, w)
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert accepted == {CTImageStorage}
        assert rejected == {MRImageStorage}
        with pytest.raises(ValueError):
            assoc.send_c_store(make_files(tmp_path, 1, sop_class=MRImageStorage)[0])
        assert (
            assoc.send_c_store(pydicom.dcmread(make_files(tmp_path, 1, prefix="ct")[0])).Status == 0
        )
    finally:
        assoc.release()
