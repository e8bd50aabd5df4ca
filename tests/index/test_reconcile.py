"""Start-up reconcile of the index against the store, on both backends."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.worker.test_storage import EXPLICIT_LE, IMPLICIT_LE, encode, make_dataset
from workers.index import Index
from workers.index.digest import dataset_digest
from workers.index.reconcile import reconcile
from workers.storage import StorageConfig, Store, StoreResult


def store_some(root: Path, count: int, *, syntax: str = EXPLICIT_LE) -> list[StoreResult]:
    """Instances stored the way the receiver stores them (streamed, digest on)."""
    store = Store(StorageConfig(root=root, fsync="never", digest=True))
    results = []
    for n in range(count):
        ds = make_dataset(syntax, patient_id=f"PAT-{n}")
        data = encode(ds, syntax)
        writer = store.begin(ds.SOPClassUID, ds.SOPInstanceUID, syntax, calling_ae="MODALITY")
        for start in range(0, len(data), 1000):
            writer.write(data[start : start + 1000])
        result = writer.commit()
        assert result.ok
        results.append(result)
    return results


def test_streaming_digest_is_the_files_data_set_digest(storage_root: Path) -> None:
    for syntax in (EXPLICIT_LE, IMPLICIT_LE):
        for result in store_some(storage_root, 2, syntax=syntax):
            assert result.path is not None and result.digest is not None
            assert dataset_digest(result.path) == (result.bytes_written, result.digest)


def test_files_without_records_are_indexed(index: Index, storage_root: Path) -> None:
    results = store_some(storage_root, 5)
    report = reconcile(index, str(storage_root))
    assert (report.files, report.indexed, report.missing) == (5, 5, 0)
    for result in results:
        assert result.path is not None
        rel = os.path.relpath(result.path, storage_root)
        uid = os.path.basename(rel)[: -len(".dcm")]
        rec = index.get(uid)
        assert rec is not None
        assert rec.path == rel and rec.state == "present" and rec.node == "node-a"
        assert (rec.size, rec.digest) == (result.bytes_written, result.digest)
        assert rec.study_uid == result.scan.study_instance_uid
        assert rec.series_uid == result.scan.series_instance_uid
        assert rec.patient_id == result.scan.patient_id
        assert rec.patient_name == "Doe^Jöhn" == result.scan.patient_name
        assert (rec.study_date, rec.study_time) == ("20240102", "101500.25")
        assert (rec.modality, rec.accession_number) == ("OT", "A1")
        assert rec.calling_ae == "MODALITY"
        assert rec.transfer_syntax == EXPLICIT_LE
    # Nothing changed: nothing to do, no file read.
    again = reconcile(index, str(storage_root))
    assert (again.files, again.changed) == (5, False)


def test_records_without_files_are_marked_missing_and_restored(
    index: Index, storage_root: Path
) -> None:
    results = store_some(storage_root, 3)
    reconcile(index, str(storage_root))
    gone = results[1].path
    assert gone is not None
    kept = Path(gone).read_bytes()
    os.unlink(gone)
    report = reconcile(index, str(storage_root))
    assert (report.missing, report.indexed) == (1, 0)
    uid = Path(gone).name[: -len(".dcm")]
    rec = index.get(uid)
    assert rec is not None and rec.state == "missing"
    assert len(index.select("IMAGE")) == 2
    Path(gone).write_bytes(kept)
    os.utime(gone, (rec.received_at, rec.received_at))  # as it was
    report = reconcile(index, str(storage_root))
    assert (report.restored, report.missing) == (1, 0)
    rec = index.get(uid)
    assert rec is not None and rec.state == "present"


def test_a_file_rewritten_after_indexing_is_reindexed(index: Index, storage_root: Path) -> None:
    (result,) = store_some(storage_root, 1)
    reconcile(index, str(storage_root))
    assert result.path is not None
    uid = Path(result.path).name[: -len(".dcm")]
    # An overwrite whose new record was lost: same UID, new content, later mtime.
    ds = make_dataset(EXPLICIT_LE, patient_id="CHANGED")
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = result.scan.study_instance_uid
    ds.SeriesInstanceUID = result.scan.series_instance_uid
    store = Store(StorageConfig(root=storage_root, fsync="never", digest=True))
    writer = store.begin(ds.SOPClassUID, uid, EXPLICIT_LE)
    writer.write(encode(ds, EXPLICIT_LE))
    later = time.time() + 10
    new = writer.commit()
    assert new.path is not None
    os.utime(new.path, (later, later))
    report = reconcile(index, str(storage_root))
    assert (report.files, report.reindexed, report.indexed) == (1, 1, 0)
    rec = index.get(uid)
    assert rec is not None and (rec.patient_id, rec.digest) == ("CHANGED", new.digest)


def test_dot_directories_and_junk_are_skipped(index: Index, storage_root: Path) -> None:
    store_some(storage_root, 1)
    (storage_root / ".incoming").mkdir(exist_ok=True)
    (storage_root / ".incoming" / "123-1.part").write_bytes(b"partial")
    (storage_root / "junk").mkdir()
    (storage_root / "junk" / "notes.txt").write_text("not DICOM")
    report = reconcile(index, str(storage_root))
    assert (report.files, report.indexed, report.unreadable) == (2, 1, 1)
    assert all(not r.path.startswith(".") for r in index.select("IMAGE"))


def test_other_nodes_records_are_left_alone(index: Index, storage_root: Path) -> None:
    from tests.index.test_index import record

    other = record(1, node="node-b", path="elsewhere/x.dcm")
    index.add_many([other])
    report = reconcile(index, str(storage_root))
    assert report.missing == 0
    assert index.get(other.sop_instance_uid) == other
