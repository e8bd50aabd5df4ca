"""Query/retrieve over the index (workers/qr/) with DCMTK as the requestor: findscu
(wildcard, range, UID list, both root models, levels, C-CANCEL), movescu to a
pynetdicom Storage SCP named in [remote-aes], getscu; and the built-ins staying out
of the way of a user's handler and of a receiver without --query-retrieve."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from workers.engine import events as wevt
from workers.events import decode_dataset

from .conftest import WorkerFactory, WorkerThread, dataset_bytes
from .indexing import (
    index_store,
    install,
    make_ct,
    store,
    synthetic_records,
)
from .peers import PynetdicomSCP

FINDSCU = shutil.which("findscu")
MOVESCU = shutil.which("movescu")
GETSCU = shutil.which("getscu")
pytestmark = pytest.mark.skipif(
    not (FINDSCU and MOVESCU and GETSCU), reason="DCMTK findscu/movescu/getscu not installed"
)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


class Store:
    """Two studies stored through the worker and indexed."""

    def __init__(self, w: WorkerThread, services: Any) -> None:
        self.study_a, self.study_b = generate_uid(), generate_uid()
        self.series_a1, self.series_a2, self.series_b = (
            generate_uid(),
            generate_uid(),
            generate_uid(),
        )
        a = dict(patient="Doe^Jane", PatientID="PID-1", StudyDate="20240115", Modality="CT")
        b = dict(patient="Roe^Rick", PatientID="PID-2", StudyDate="20230610", Modality="MR",
                 AccessionNumber="ACC2")  # fmt: skip
        datasets = [
            make_ct(0, study=self.study_a, series=self.series_a1, **a),
            make_ct(1, study=self.study_a, series=self.series_a1, **a),
            make_ct(2, study=self.study_a, series=self.series_a2, **a),
            make_ct(3, study=self.study_b, series=self.series_b, **b),
            make_ct(4, study=self.study_b, series=self.series_b, **b),
        ]
        store(w, datasets)
        self.files = index_store(services, w.root)
        self.by_series: dict[str, set[str]] = {}
        self.by_study: dict[str, set[str]] = {}
        for ds in datasets:
            self.by_series.setdefault(ds.SeriesInstanceUID, set()).add(ds.SOPInstanceUID)
            self.by_study.setdefault(ds.StudyInstanceUID, set()).add(ds.SOPInstanceUID)


@pytest.fixture
def qr(index_url: str | None, worker_factory: WorkerFactory) -> tuple[WorkerThread, Any, Store]:
    w = worker_factory()
    services = install(w, index_url, query_retrieve=True)
    return w, services, Store(w, services)


def findscu(w: WorkerThread, out: Path, keys: list[str], *options: str) -> list[Any]:
    """Run findscu; returns the response identifiers it extracted."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [FINDSCU, *options, "-aec", "PACSRX", "-X", "-od", str(out)]
    for key in keys:
        cmd += ["-k", key]
    cmd += [w.host, str(w.port)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_find_study_level_wildcard_and_range(qr: Any, tmp_path: Path) -> None:
    w, _, s = qr
    common = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "StudyDate",
              "NumberOfStudyRelatedInstances", "ModalitiesInStudy"]  # fmt: skip
    found = findscu(w, tmp_path / "a", [*common[:2], "PatientName=D*", *common[3:]], "-S")
    assert [str(r.StudyInstanceUID) for r in found] == [s.study_a]
    assert str(found[0].PatientName) == "Doe^Jane"
    assert int(found[0].NumberOfStudyRelatedInstances) == 3
    assert found[0].ModalitiesInStudy == "CT"
    found = findscu(w, tmp_path / "b", [*common[:3], "StudyDate=-20231231", *common[4:]], "-S")
    assert [str(r.StudyInstanceUID) for r in found] == [s.study_b]
    found = findscu(w, tmp_path / "c", [*common[:3], "StudyDate=20230101-20241231"], "-S")
    assert {str(r.StudyInstanceUID) for r in found} == {s.study_a, s.study_b}
    found = findscu(w, tmp_path / "d", [*common[:2], "PatientName=?oe^R*"], "-S")
    assert [str(r.StudyInstanceUID) for r in found] == [s.study_b]
    found = findscu(w, tmp_path / "e", [*common[:2], "PatientName=nobody*"], "-S")
    assert found == []


def test_find_series_and_image_levels_with_uid_list(qr: Any, tmp_path: Path) -> None:
    w, _, s = qr
    found = findscu(
        w,
        tmp_path / "series",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={s.study_a}",
            "SeriesInstanceUID",
            "Modality=C?",
            "NumberOfSeriesRelatedInstances",
        ],
        "-S",
    )
    assert {str(r.SeriesInstanceUID): int(r.NumberOfSeriesRelatedInstances) for r in found} == {
        s.series_a1: 2,
        s.series_a2: 1,
    }
    wanted = sorted(s.by_series[s.series_a1])[:1] + sorted(s.by_series[s.series_b])
    found = findscu(
        w,
        tmp_path / "image",
        ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID=" + "\\".join(wanted), "SOPClassUID"],
        "-S",
    )
    assert {str(r.SOPInstanceUID) for r in found} == set(wanted)


def test_find_patient_root(qr: Any, tmp_path: Path) -> None:
    w, _, _ = qr
    found = findscu(
        w,
        tmp_path / "p",
        [
            "QueryRetrieveLevel=PATIENT",
            "PatientID=PID-2",
            "PatientName",
            "NumberOfPatientRelatedStudies",
        ],
        "-P",
    )
    assert [(str(r.PatientID), str(r.PatientName)) for r in found] == [("PID-2", "Roe^Rick")]
    # PATIENT is not a level of the Study Root model: refused, nothing found.
    cmd = [FINDSCU, "-v", "-S", "-aec", "PACSRX", "-k", "QueryRetrieveLevel=PATIENT",
           "-k", "PatientID", w.host, str(w.port)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    # 0xA900, which DCMTK names so
    assert "datasetdoesnotmatchsopclass" in (done.stdout + done.stderr).lower(), done.stdout


def test_find_cancel(qr: Any, tmp_path: Path) -> None:
    w, services, _ = qr
    many = 3000
    services.index.add_many(synthetic_records(many, study=generate_uid(), series=generate_uid()))
    found = findscu(
        w,
        tmp_path / "cancel",
        ["QueryRetrieveLevel=IMAGE", "PatientID=PID-MANY", "SOPInstanceUID"],
        "-S",
        "--cancel",
        "1",
    )
    # C-CANCEL after the first response: the SCP stopped early (PS3.4 C.4.1.3.1).
    assert 1 <= len(found) < many


def test_move_to_a_destination_in_remote_aes(worker_factory: WorkerFactory) -> None:
    with PynetdicomSCP(ae_title="DEST") as dest:
        w = worker_factory()
        services = install(
            w, query_retrieve=True, remote_aes={"DEST": {"host": "127.0.0.1", "port": dest.port}}
        )
        s = Store(w, services)
        cmd = [MOVESCU, "-S", "-aec", "PACSRX", "-aem", "DEST",
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={s.study_a}",
               w.host, str(w.port)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + done.stdout
    received = {r.sop_instance: r for r in dest.received}
    assert set(received) == s.by_study[s.study_a]
    for uid, r in received.items():
        # The stored data set, in the transfer syntax the destination accepted.
        stored = pydicom.dcmread(s.files[uid])
        assert decode_dataset(r.data, r.transfer_syntax) == Dataset(stored)
        assert r.move_originator_ae == "MOVESCU"


def test_move_to_an_unknown_destination(qr: Any) -> None:
    w, _, s = qr
    cmd = [MOVESCU, "-v", "-S", "-aec", "PACSRX", "-aem", "NOWHERE",
           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={s.study_a}",
           w.host, str(w.port)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    out = (done.stdout + done.stderr).lower()
    assert "movedestinationunknown" in out or "0xa801" in out, out


def test_get_series(qr: Any, tmp_path: Path) -> None:
    w, _, s = qr
    out = tmp_path / "got"
    out.mkdir()
    cmd = [GETSCU, "-S", "-aec", "PACSRX", "-od", str(out),
           "-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={s.series_a1}",
           w.host, str(w.port)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    got = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    assert set(got) == s.by_series[s.series_a1]
    for uid, path in got.items():
        assert dataset_bytes(path) == dataset_bytes(s.files[uid])


def test_user_find_handler_takes_precedence(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    def on_find(event: Any) -> Any:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = "1.2.3.4"
        yield 0xFF00, ds

    w = worker_factory(evt_handlers=[(wevt.EVT_C_FIND, on_find)])
    services = install(w, query_retrieve=True)
    Store(w, services)
    found = findscu(w, tmp_path / "u", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], "-S")
    assert [str(r.StudyInstanceUID) for r in found] == ["1.2.3.4"]


def test_query_retrieve_off_by_default(worker_factory: WorkerFactory) -> None:
    w = worker_factory()
    services = install(w)  # storage commitment only
    Store(w, services)
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate(w.host, w.port, ae_title="PACSRX")
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        statuses = [int(st.Status) for st, _ in assoc.send_c_find(ds, STUDY_ROOT_FIND)]
    finally:
        assoc.release()
    # No handler and no --query-retrieve: the contract's failure, no match.
    assert statuses == [int(wevt.DEFAULT_STATUS[wevt.EVT_C_FIND])]
