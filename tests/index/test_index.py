"""The index API, the same suite on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from workers.index import Index, IndexRecord, IndexUnavailable, open_index
from workers.index.schema import MIGRATIONS, SCHEMA_VERSION
from workers.index.writer import IndexWriter


def record(n: int, **changes: object) -> IndexRecord:
    rec = IndexRecord(
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid=f"1.2.3.{n // 100}",
        series_uid=f"1.2.3.{n // 100}.{n // 10}",
        patient_id=f"PID{n // 100}",
        patient_name="Doe^Jane",
        study_date="20240131",
        modality="CT",
        accession_number=f"ACC{n // 100}",
        calling_ae="STORESCU",
        source_address="127.0.0.1:40000",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=1000 + n,
        digest=f"{n:064x}",
        path=f"1.2.3.{n // 100}/{n}.dcm",
        received_at=1_700_000_000.25 + n,
        study_time="101500",
        node="node-a",
    )
    return replace(rec, **changes)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field(index: Index) -> None:
    recs = [record(n) for n in range(3)]
    recs[1] = replace(recs[1], patient_name="Müller^Jörg", size=5_000_000_000)
    assert index.add_many(recs) == 3
    for rec in recs:
        assert index.get(rec.sop_instance_uid) == rec
    assert index.get("9.9.9") is None
    assert index.count() == 3


def test_schema_is_created_versioned_and_kept_on_reopen(
    index: Index, index_url: str | None, storage_root: Path
) -> None:
    assert index.schema_version() == SCHEMA_VERSION
    index.add_many([record(1)])
    index.close()
    if index_url is None:
        assert (storage_root / ".index" / "index.db").is_file()
    again = open_index(index_url, str(storage_root), node="node-a")
    try:
        assert again.schema_version() == SCHEMA_VERSION
        assert again.get(record(1).sop_instance_uid) == record(1)
    finally:
        again.close()


def test_older_schema_is_migrated_and_newer_refused(
    index_url: str | None, storage_root: Path
) -> None:
    ix = open_index(index_url, str(storage_root))
    # Put the database back to version 1 (as an older receiver left it).
    with ix._write_lock, ix._transaction(ix._writer_conn()) as cur:
        cur.execute("DROP TABLE pending_reports")
        cur.execute("UPDATE schema_version SET version = 1")
    ix.add_many([record(7)])
    ix.close()
    ix = open_index(index_url, str(storage_root))
    try:
        assert ix.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
        assert ix.get(record(7).sop_instance_uid) == record(7)
        ix.put_pending("t", b"x", 1.0)  # the table of step 2 exists again
        with ix._write_lock, ix._transaction(ix._writer_conn()) as cur:
            cur.execute("UPDATE schema_version SET version = 99")
    finally:
        ix.close()
    with pytest.raises(IndexUnavailable, match="newer"):
        open_index(index_url, str(storage_root))


def test_duplicates_replace_or_keep(index: Index) -> None:
    first = record(1)
    second = replace(first, digest="f" * 64, path="elsewhere.dcm", node="node-b")
    index.add_many([first])
    index.add_many([second], replace=False)
    assert index.get(first.sop_instance_uid) == first
    index.add_many([second], replace=True)
    assert index.get(first.sop_instance_uid) == second
    assert index.count() == 1
    # The same UID twice in one batch: one row, the last one (replace).
    third = replace(first, size=1)
    index.add_many([first, third])
    assert index.get(first.sop_instance_uid) == third


def test_select_prefilters_by_exact_match_in_level_order(index: Index) -> None:
    recs = [record(n) for n in (250, 120, 101, 100, 199)]
    index.add_many(recs)
    study1 = index.select("STUDY", {"study_uid": "1.2.3.1"})
    assert [r.sop_instance_uid for r in study1] == sorted(
        r.sop_instance_uid for r in recs if r.study_uid == "1.2.3.1"
    )
    by_patient = index.select("PATIENT", {"patient_id": "PID2"})
    assert [r.sop_instance_uid for r in by_patient] == [record(250).sop_instance_uid]
    everything = index.select("SERIES")
    assert [r.series_uid for r in everything] == sorted(r.series_uid for r in recs)
    both = index.select("IMAGE", {"modality": "CT", "patient_id": "PID1"})
    assert len(both) == 4
    assert index.select("IMAGE", {"modality": "MR"}) == []
    assert len(index.select("IMAGE", limit=2)) == 2
    with pytest.raises(ValueError):
        index.select("IMAGE", {"modality; DROP TABLE instances": "x"})
    with pytest.raises(ValueError):
        index.select("FRAME", {})


def test_missing_records_leave_queries_but_stay_readable(index: Index) -> None:
    recs = [record(n) for n in range(5)]
    index.add_many(recs)
    gone = [recs[1].sop_instance_uid, recs[3].sop_instance_uid]
    assert index.mark_missing(gone) == 2
    present = index.select("IMAGE")
    assert {r.sop_instance_uid for r in present} == {r.sop_instance_uid for r in recs} - set(gone)
    assert len(index.select("IMAGE", include_missing=True)) == 5
    rec = index.get(gone[0])
    assert rec is not None and rec.state == "missing"
    assert index.count(include_missing=False) == 3
    index.mark_present(gone[:1])
    rec = index.get(gone[0])
    assert rec is not None and rec.state == "present"


def test_get_many_spans_several_statements(index: Index) -> None:
    recs = [record(n) for n in range(1200)]
    index.add_many(recs)
    wanted = [r.sop_instance_uid for r in recs[::2]] + ["1.2.3.404"]
    found = index.get_many(wanted)
    assert set(found) == set(wanted[:-1])
    assert found[recs[4].sop_instance_uid] == recs[4]


def test_node_paths_are_this_nodes_rows_only(index: Index) -> None:
    index.add_many([record(1), record(2, node="node-b", path="b/2.dcm")])
    paths = index.node_paths()
    rec = record(1)
    assert paths == {rec.path: (rec.sop_instance_uid, "present", rec.received_at)}


def test_pending_reports_survive_reopen(
    index: Index, index_url: str | None, storage_root: Path
) -> None:
    index.put_pending("1.2.3.100", b"\x00payload\xff", due=100.0, owner="node-a")
    index.put_pending("1.2.3.101", b"other", due=50.0, owner="node-a")
    index.put_pending("1.2.3.102", b"theirs", due=10.0, owner="node-b")
    assert [p.key for p in index.due_pending(75.0, owner="node-a")] == ["1.2.3.101"]
    index.reschedule_pending("1.2.3.101", 200.0)
    index.close()
    again = open_index(index_url, str(storage_root), node="node-a")
    try:
        due = again.due_pending(owner="node-a")
        assert [(p.key, p.payload, p.due, p.attempts) for p in due] == [
            ("1.2.3.100", b"\x00payload\xff", 100.0, 0),
            ("1.2.3.101", b"other", 200.0, 1),
        ]
        again.delete_pending("1.2.3.100")
        assert [p.key for p in again.due_pending(owner="node-a")] == ["1.2.3.101"]
    finally:
        again.close()


def test_two_receivers_sharing_one_index(index_url: str | None, storage_root: Path) -> None:
    """Two Index objects on one database (two workers, or two nodes with PostgreSQL):
    concurrent batches all land, one row per SOP Instance UID."""
    a = open_index(index_url, str(storage_root), node="node-a")
    b = open_index(index_url, str(storage_root), node="node-b")
    try:

        def write(ix: Index, offset: int, node: str) -> None:
            for start in range(0, 600, 100):
                ix.add_many(record(n + offset, node=node) for n in range(start, start + 100))

        threads = [
            threading.Thread(target=write, args=(a, 0, "node-a")),
            threading.Thread(target=write, args=(b, 300, "node-b")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert a.count() == b.count() == 900  # 300..599 written by both: one row each
        assert len(a.node_paths()) + len(b.node_paths()) == 900
    finally:
        a.close()
        b.close()


def test_writer_batches_without_blocking(index: Index) -> None:
    writer = IndexWriter(index, batch_size=100, linger=0.01)
    try:
        for n in range(1000):
            assert writer.submit(record(n))
        assert writer.flush(30)
        assert writer.lag == 0
        assert writer.written == 1000
        assert writer.batches <= 1000 // 50  # batches, not a transaction per record
        assert index.count() == 1000
    finally:
        writer.close()


def test_writer_drops_and_counts_when_full(index: Index) -> None:
    gate = threading.Event()
    original = index.add_many

    def held(records: object, *, replace: bool = True) -> int:
        gate.wait(30)
        return original(records, replace=replace)  # type: ignore[arg-type]

    index.add_many = held  # type: ignore[method-assign]
    writer = IndexWriter(index, max_queue=10, batch_size=5, linger=0)
    try:
        accepted = sum(writer.submit(record(n)) for n in range(100))
        assert writer.dropped == 100 - accepted
        assert 10 <= accepted <= 15  # the queue bound plus one batch in flight
        gate.set()
        assert writer.flush(30)
        assert writer.written == accepted == index.count()
    finally:
        gate.set()
        writer.close()


def test_writer_retries_a_failed_batch(index: Index) -> None:
    failures = [2]
    original = index.add_many

    def flaky(records: object, *, replace: bool = True) -> int:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("database went away")
        return original(records, replace=replace)  # type: ignore[arg-type]

    index.add_many = flaky  # type: ignore[method-assign]
    writer = IndexWriter(index, linger=0)
    try:
        for n in range(20):
            writer.submit(record(n))
        assert writer.flush(30)
        assert writer.errors == 2
        assert writer.written == 20 == index.count()
    finally:
        writer.close()


def test_writer_close_writes_what_is_queued(index: Index) -> None:
    writer = IndexWriter(index, linger=5.0)  # would wait long for a full batch
    for n in range(10):
        writer.submit(record(n))
    writer.close()
    assert index.count() == 10
    assert not writer.submit(record(99))
