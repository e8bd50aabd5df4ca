"""Storage commitment and query/retrieve in the real process tree: instances stored
through ``pacs-receiver`` (indexed by its workers' index writers), a storage
commitment report sent to the requestor's AE from the config file's ``[remote-aes]``,
a pending report that outlives a restart of the whole tree, DCMTK ``findscu`` with
``--query-retrieve``, and the counts on /metrics."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from .conftest import (
    CT_IMAGE,
    EXPLICIT_LE,
    Receiver,
    ReceiverFactory,
    make_image,
    release,
    wait_for,
)
from .test_metrics import free_port, scrape, total

pytestmark = pytest.mark.interop

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
SCU_AE = "COMMITSCU"


class Listener:
    """The Storage Commitment SCU's own SCP side, on 127.0.0.1:``port``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reports: list[tuple[int, Dataset]] = []
        self.lock = threading.Lock()
        self.server: Any = None

    def _on_report(self, event: Any) -> tuple[int, None]:
        with self.lock:
            self.reports.append((event.event_type, event.event_information))
        return 0x0000, None

    def start(self) -> Listener:
        ae = AE(ae_title=SCU_AE)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 10
        ae.add_supported_context(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)],
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def _config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "receiver.toml"
    path.write_text(
        "query-retrieve = true\n"
        "commitment-retry = 0.5\n"
        "[remote-aes]\n"
        f'{SCU_AE} = {{ host = "127.0.0.1", port = {port} }}\n'
    )
    return path


def _store(rx: Receiver, n: int, study: str) -> list[Dataset]:
    datasets = [make_image(i, study=study) for i in range(n)]
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
    return datasets


def _commit(rx: Receiver, datasets: list[Dataset]) -> str:
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
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(STORAGE_COMMITMENT)
    assoc = ae.associate(rx.host, rx.port, ae_title="PACSRX")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
    finally:
        release(assoc)
    return transaction


def _committed(info: Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}


def test_commitment_and_find_through_the_tree(
    receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    listener = Listener(free_port()).start()
    metrics_port = free_port()
    try:
        rx = receiver_factory(
            "--config",
            str(_config(tmp_path, listener.port)),
            "--metrics-port",
            str(metrics_port),
        )
        study = generate_uid()
        datasets = _store(rx, 3, study)
        # At once: the instances may still be on their way into the index.
        transaction = _commit(rx, datasets)
        wait_for(lambda: listener.reports, 30.0, what="the N-EVENT-REPORT")
    finally:
        listener.stop()
    event_type, info = listener.reports[0]
    assert event_type == 1
    assert info.TransactionUID == transaction
    assert _committed(info) == {str(ds.SOPInstanceUID) for ds in datasets}

    findscu = shutil.which("findscu")
    if findscu is not None:
        out = tmp_path / "find"
        out.mkdir()
        cmd = [findscu, "-S", "-aec", "PACSRX", "-X", "-od", str(out),
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
               "-k", "NumberOfStudyRelatedInstances", rx.host, str(rx.port)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        found = [pydicom.dcmread(p) for p in out.glob("rsp*.dcm")]
        assert [int(r.NumberOfStudyRelatedInstances) for r in found] == [3]

    def counted() -> bool:
        text = scrape(metrics_port)
        return (
            total(text, "pacs_storage_commitment_requests_total", outcome="accepted") == 1
            and total(text, "pacs_storage_commitment_instances_total", result="committed") == 3
            and total(text, "pacs_storage_commitment_reports_total", outcome="new_association") == 1
            and (findscu is None or total(text, "pacs_queries_total", level="STUDY") == 1)
        )

    wait_for(counted, 15.0, what="the commitment and query counts on /metrics")


def test_pending_report_survives_a_restart_of_the_tree(
    receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    port = free_port()
    config = str(_config(tmp_path, port))
    first = receiver_factory("--config", config)
    datasets = _store(first, 2, generate_uid())
    transaction = _commit(first, datasets)  # nobody listens for the report yet
    first.wait_log(r"report not delivered", 30.0)
    assert first.stop() == 0
    listener = Listener(port).start()
    try:
        receiver_factory("--config", config, "--storage", str(first.storage))
        wait_for(lambda: listener.reports, 60.0, what="the N-EVENT-REPORT after the restart")
    finally:
        listener.stop()
    event_type, info = listener.reports[0]
    assert event_type == 1
    assert info.TransactionUID == transaction
    assert _committed(info) == {str(ds.SOPInstanceUID) for ds in datasets}
