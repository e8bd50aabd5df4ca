"""The duplicate policy across nodes: two receiver process trees sharing one
PostgreSQL index (tests/pgserver.py) and one bucket (moto's standalone server), the
same SOP Instance UID sent to node A, then, with different pixel data, to node B:

* ``reject``: B answers 0x0111 Duplicate SOP Instance (PS3.7 C.4.2); the object and
  the index row stay A's;
* ``keep``: B answers Success; the object and the index row stay A's;
* ``overwrite``: B answers Success; the object is B's copy and the index has one row
  for the instance, B's (with B's digest).

In ``direct`` mode (conditional writes in the bucket) and ``spool`` mode (the bucket
asked at commit, A's upload having drained; see workers/storage/objectstore.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from tests.pgserver import PostgresServer
from tests.receiver.conftest import CT_IMAGE, EXPLICIT_LE, Receiver, make_image, release, wait_for
from tests.receiver.test_s3 import BUCKET, PREFIX, MotoServer, aws_env, objects, receivers

pytest.importorskip("boto3")
pytest.importorskip("moto.server")
psycopg = pytest.importorskip("psycopg")

__all__ = ["receivers"]  # the fixture, imported for pytest


@pytest.fixture
def moto(tmp_path: Path) -> Any:
    server = MotoServer(tmp_path).start()
    server.make_bucket()
    yield server
    server.stop()


def _node(
    tmp_path: Path, name: str, moto: MotoServer, index: str, durability: str, policy: str
) -> Receiver:
    base = tmp_path / name
    base.mkdir()
    flags = ["--workers", "1", "--index", index, "--index-node", name, "--duplicates", policy]
    flags += ["--storage", f"s3://{BUCKET}/{PREFIX}", "--s3-endpoint", moto.url]
    flags += ["--s3-spool", str(tmp_path / f"{name}-spool"), "--s3-durability", durability]
    return Receiver(base, flags, aws_env(tmp_path)).start(1)


def _send(rx: Receiver, ds: Dataset) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
    assoc = ae.associate(rx.host, rx.port, ae_title="PACSRX")
    assert assoc.is_established
    try:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
        return int(assoc.send_c_store(ds).Status)
    finally:
        release(assoc)


def _rows(index: str, uid: str) -> list[tuple[str, str]]:
    with psycopg.connect(index) as conn:
        rows = conn.execute(
            "SELECT node, digest FROM instances WHERE sop_instance_uid = %s", (uid,)
        ).fetchall()
    return [(str(node), str(digest)) for node, digest in rows]


def _spool_empty(tmp_path: Path, name: str) -> bool:
    spool = tmp_path / f"{name}-spool"
    return not [p for p in spool.rglob("*.dcm") if ".incoming" not in p.parts]


@pytest.mark.parametrize("durability", ["direct", "spool"])
@pytest.mark.parametrize("policy", ["reject", "keep", "overwrite"])
def test_duplicate_policy_holds_across_nodes(
    tmp_path: Path,
    moto: MotoServer,
    pg_server: PostgresServer,
    receivers: list[Receiver],
    durability: str,
    policy: str,
) -> None:
    index = pg_server.new_database()
    a = _node(tmp_path, "A", moto, index, durability, policy)
    receivers.append(a)
    b = _node(tmp_path, "B", moto, index, durability, policy)
    receivers.append(b)
    first = make_image(1)
    second = make_image(2)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(second, keyword, getattr(first, keyword))
    second.PixelData = bytes(b ^ 0x5A for b in first.PixelData)
    uid = str(first.SOPInstanceUID)

    assert _send(a, first) == 0
    wait_for(
        lambda: len(objects(moto)) == 1 and _spool_empty(tmp_path, "A"), 30.0, what="A's upload"
    )
    wait_for(lambda: len(_rows(index, uid)) == 1, 30.0, what="A's index row")
    (_, first_digest), *_ = _rows(index, uid)

    expected = {"reject": 0x0111, "keep": 0x0000, "overwrite": 0x0000}[policy]
    assert _send(b, second) == expected

    winner, pixels = ("B", second.PixelData) if policy == "overwrite" else ("A", first.PixelData)

    def settled() -> bool:
        rows = _rows(index, uid)
        return _spool_empty(tmp_path, "B") and len(rows) == 1 and rows[0][0] == winner

    wait_for(settled, 30.0, what=f"one index row, {winner}'s")
    (key,) = objects(moto)
    body = bytes(moto.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert body.endswith(bytes(pixels))  # PixelData is the last element
    ((_, digest),) = _rows(index, uid)
    if policy == "overwrite":
        assert digest != first_digest
    else:
        assert digest == first_digest
