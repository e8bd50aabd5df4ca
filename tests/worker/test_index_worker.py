"""The worker indexes what it stores: DCMTK storescu sends, the index has a record
per instance with the scanner's attributes and the streaming digest."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from workers.index import Index
from workers.index.digest import dataset_digest
from workers.main import close_index, open_index_writer
from workers.storage import StorageConfig

from .conftest import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    WorkerFactory,
    WorkerThread,
    make_files,
    needs_dcmtk,
    stored_files,
)
from .test_interop_dcmtk import storescu

pytestmark = [pytest.mark.interop, needs_dcmtk]


def indexed_worker(
    worker_factory: WorkerFactory, root: Path, duplicates: str = "overwrite"
) -> WorkerThread:
    w = worker_factory(
        storage=StorageConfig(root=root, fsync="never", digest=True, duplicates=duplicates)  # type: ignore[arg-type]
    )
    w.call(lambda: open_index_writer(w.server, "", "node-x"))
    return w


def index_of(w: WorkerThread) -> Index:
    writer = w.server.index_writer
    assert writer is not None
    assert writer.flush(30)
    return writer.index


def test_every_stored_instance_is_indexed(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    w = indexed_worker(worker_factory, tmp_path / "store")
    files = make_files(tmp_path / "src", 4, EXPLICIT_LE) + make_files(
        tmp_path / "src2", 2, IMPLICIT_LE, prefix="imp"
    )
    result = storescu(w, files, "-aet", "MODALITY1")
    assert result.returncode == 0, result.stderr
    index = index_of(w)
    stored = stored_files(w.root)
    assert index.count() == len(files) == len(stored)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rec = index.get(ds.SOPInstanceUID)
        assert rec is not None
        path = stored[ds.SOPInstanceUID]
        assert rec.path == path.relative_to(w.root).as_posix()
        assert (rec.size, rec.digest) == dataset_digest(str(path))
        assert rec.sop_class_uid == ds.SOPClassUID
        assert (rec.study_uid, rec.series_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert (rec.patient_id, rec.patient_name) == (ds.PatientID, "Test^Worker")
        assert (rec.study_date, rec.study_time) == ("20240101", "120000")
        assert (rec.modality, rec.accession_number) == ("CT", ds.AccessionNumber)
        assert rec.calling_ae == "MODALITY1"
        assert rec.source_address.startswith("127.0.0.1:")
        assert rec.state == "present" and rec.node == "node-x"
    w.call(close_index(w.server))
    assert w.server.index_writer is None


def test_duplicate_kept_keeps_its_record(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    w = indexed_worker(worker_factory, tmp_path / "store", duplicates="keep")
    (f,) = make_files(tmp_path / "src", 1)
    assert storescu(w, [f], "-aet", "FIRST").returncode == 0
    uid = pydicom.dcmread(f).SOPInstanceUID
    first = index_of(w).get(uid)
    assert storescu(w, [f], "-aet", "SECOND").returncode == 0
    index = index_of(w)
    assert index.get(uid) == first and first is not None and first.calling_ae == "FIRST"
    assert index.count() == 1


def test_without_index_no_digest_is_computed(worker: WorkerThread, tmp_path: Path) -> None:
    results = []
    worker.server.on_stored = lambda proto, op, result: results.append(result)
    files = make_files(tmp_path / "src", 1)
    assert storescu(worker, files).returncode == 0
    worker.wait_idle()
    assert worker.server.index_writer is None
    assert [r.digest for r in results] == [None]
