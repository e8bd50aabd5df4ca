"""workers/index/reconcile_s3.py against a REAL S3 API server (moto's standalone
server) and both index backends: objects and spooled files without a record are
indexed under their object URL, records of any node are left alone, a second run
finds nothing, and a bucket that does not answer still gets the spool reconciled."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.receiver.conftest import make_files, sop_uid
from tests.receiver.test_s3 import BUCKET, MotoServer
from workers.index import Index, IndexRecord, open_index
from workers.index.digest import dataset_offset
from workers.index.reconcile_s3 import reconcile_object_store
from workers.storage.objectstore import S3Settings, make_client

pytest.importorskip("moto.server")

PREFIX = "reconcile/"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    server.make_bucket()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_server").new_database()
    ix = open_index(url, str(tmp_path / "spool"), node="node-b")
    yield ix
    ix.close()


def digest(path: Path) -> str:
    raw = path.read_bytes()
    return hashlib.sha256(raw[dataset_offset(raw[:4096]) :]).hexdigest()


def record(uid: str, path: str, node: str) -> IndexRecord:
    return IndexRecord(
        sop_instance_uid=uid, sop_class_uid="1.2", study_uid="1", series_uid="1",
        patient_id="", patient_name="", study_date="", modality="", accession_number="",
        calling_ae="MODALITY", source_address="10.0.0.9:4000", transfer_syntax="1.2.840.10008.1.2",
        size=1, digest="d", path=path, received_at=1.0, study_time="", node=node,
    )  # fmt: skip


def test_objects_and_spooled_files_without_a_record_are_indexed(
    tmp_path: Path, moto: MotoServer, index: Index
) -> None:
    prefix = f"{PREFIX}{tmp_path.name}/"
    settings = S3Settings.from_url(f"s3://{BUCKET}/{prefix}", endpoint=moto.url)
    client = make_client(settings)
    files = make_files(tmp_path / "in", 4, pixel_bytes=2048)
    keys = [f"{prefix}study/{sop_uid(f)}.dcm" for f in files]
    for f, key in zip(files[:3], keys[:3], strict=True):
        client.upload_file(str(f), BUCKET, key)
    spool = tmp_path / "spool"
    (spool / "study").mkdir(parents=True, exist_ok=True)
    (spool / "study" / files[3].name.replace(files[3].stem, sop_uid(files[3]))).write_bytes(
        files[3].read_bytes()
    )
    (spool / ".incoming").mkdir()
    (spool / ".incoming" / "partial.dcm").write_bytes(b"not an instance")
    # Another node's record of the first object: kept as it is.
    url = f"s3://{BUCKET}/"
    index.add_many([record(sop_uid(files[0]), url + keys[0], "node-a")])

    report = reconcile_object_store(index, settings, str(spool))
    assert (report.files, report.indexed, report.unreadable) == (4, 3, 0)
    first = index.get(sop_uid(files[0]))
    assert first is not None and first.node == "node-a" and first.digest == "d"
    for f, key in zip(files[1:], keys[1:], strict=True):
        got = index.get(sop_uid(f))
        assert got is not None
        assert (got.path, got.node, got.digest) == (url + key, "node-b", digest(f))
    assert index.paths_under(url + prefix) == {url + k for k in keys}

    again = reconcile_object_store(index, settings, str(spool))
    assert (again.files, again.indexed) == (4, 0)


def test_bucket_down_the_spool_is_still_reconciled(tmp_path: Path, index: Index) -> None:
    down = MotoServer(tmp_path)  # never started: nothing listens on its port
    settings = S3Settings.from_url(f"s3://{BUCKET}/{PREFIX}", endpoint=down.url)
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)  # the SQLite index is in it
    [f] = make_files(tmp_path / "in", 1)
    (spool / f"{sop_uid(f)}.dcm").write_bytes(f.read_bytes())
    report = reconcile_object_store(index, settings, str(spool))
    assert report.indexed == 1
    got = index.get(sop_uid(f))
    assert got is not None and got.path == f"s3://{BUCKET}/{PREFIX}{sop_uid(f)}.dcm"
