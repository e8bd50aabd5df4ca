"""Storage Commitment over ``--storage s3://`` (moto's standalone server, the real
receiver process tree, a pynetdicom requestor that takes the SCP role on its own
association): each referenced instance is decided against the index and its object
in the bucket (streamed and hashed against the recorded digest), not the local
filesystem. One instance left intact is committed, one whose object was altered in
the bucket fails with 0x0110 Processing failure, one whose object was deleted fails
with 0x0112 No such object instance; in ``direct`` and in ``spool`` mode (after the
spool has been uploaded and emptied)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt

from tests.receiver.conftest import CT_IMAGE, EXPLICIT_LE, Receiver, make_image, release, wait_for
from tests.receiver.test_s3 import BUCKET, PREFIX, MotoServer, aws_env, objects, receivers

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

__all__ = ["receivers"]  # the fixture, imported for pytest

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


@pytest.fixture
def moto(tmp_path: Path) -> Any:
    server = MotoServer(tmp_path).start()
    server.make_bucket()
    yield server
    server.stop()


def _start(tmp_path: Path, moto: MotoServer, durability: str) -> Receiver:
    base = tmp_path / "rx"
    base.mkdir()
    config = tmp_path / "receiver.toml"
    config.write_text("query-retrieve = true\ncommitment-retry = 0.5\n")
    flags = ["--workers", "2", "--config", str(config)]
    flags += ["--storage", f"s3://{BUCKET}/{PREFIX}", "--s3-endpoint", moto.url]
    flags += ["--s3-spool", str(tmp_path / "spool"), "--s3-durability", durability]
    return Receiver(base, flags, aws_env(tmp_path)).start(2)


def _store(rx: Receiver, datasets: list[Dataset]) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
    assoc = ae.associate(rx.host, rx.port, ae_title="PACSRX")
    assert assoc.is_established
    try:
        for ds in datasets:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        release(assoc)


def _commit(rx: Receiver, datasets: list[Dataset]) -> tuple[str, int, Dataset]:
    """N-ACTION on an association where the requestor took the SCP role; the report
    comes back on it (transaction UID, event type, event information)."""
    transaction = generate_uid()
    info = Dataset()
    info.TransactionUID = transaction
    items = []
    for ds in datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        items.append(item)
    info.ReferencedSOPSequence = items
    reports: list[tuple[int, Dataset]] = []
    lock = threading.Lock()

    def on_report(event: Any) -> tuple[int, None]:
        with lock:
            reports.append((event.event_type, event.event_information))
        return 0x0000, None

    ae = AE(ae_title="COMMITSCU")
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
    ae.add_requested_context(STORAGE_COMMITMENT)
    assoc = ae.associate(
        rx.host,
        rx.port,
        ae_title="PACSRX",
        ext_neg=[build_role(STORAGE_COMMITMENT, scu_role=True, scp_role=True)],
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        wait_for(lambda: bool(reports), 60.0, what="the N-EVENT-REPORT")
    finally:
        release(assoc)
    event_type, event_info = reports[0]
    return transaction, event_type, event_info


@pytest.mark.parametrize("durability", ["direct", "spool"])
def test_commitment_is_decided_against_the_bucket(
    tmp_path: Path, moto: MotoServer, receivers: list[Receiver], durability: str
) -> None:
    rx = _start(tmp_path, moto, durability)
    receivers.append(rx)
    study = generate_uid()
    intact, altered, deleted = datasets = [make_image(i, study=study) for i in range(3)]
    _store(rx, datasets)
    wait_for(lambda: len(objects(moto)) == 3, 30.0, what="three objects in the bucket")
    spool = tmp_path / "spool"
    wait_for(
        lambda: not [p for p in spool.rglob("*.dcm") if ".incoming" not in p.parts],
        30.0,
        what="an empty spool",
    )
    keys = {key.rsplit("/", 1)[-1].removesuffix(".dcm"): key for key in objects(moto)}
    client = moto.client()
    key = keys[str(altered.SOPInstanceUID)]
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # one pixel byte: the data set no longer hashes to its digest
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    client.delete_object(Bucket=BUCKET, Key=keys[str(deleted.SOPInstanceUID)])

    transaction, event_type, info = _commit(rx, datasets)

    assert event_type == 2  # with failures
    assert info.TransactionUID == transaction
    committed = {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}
    assert committed == {str(intact.SOPInstanceUID)}
    failed = {
        str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
        for i in info.get("FailedSOPSequence", [])
    }
    assert failed == {str(altered.SOPInstanceUID): 0x0110, str(deleted.SOPInstanceUID): 0x0112}
