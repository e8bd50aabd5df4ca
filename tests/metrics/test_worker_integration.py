"""The emitter against the real worker: an AssociationServer with telemetry, a real
peer (pynetdicom), the real aggregator, and its /metrics parsed."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
import uvloop
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from metrics.aggregator import Aggregator
from workers.config import WorkerConfig
from workers.server import AssociationServer
from workers.storage import StorageConfig
from workers.telemetry import Telemetry

from .helpers import short_tmpdir, until
from .test_aggregator import scrape, value

pynetdicom = pytest.importorskip("pynetdicom")

CT = "1.2.840.10008.5.1.4.1.1.2"


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.PixelData = b"\x00\x01" * 256
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _peer(port: int, stores: int) -> list[int]:
    """As a modality would: one association with C-STOREs, one rejected, one aborted."""
    statuses = []
    ae = pynetdicom.AE(ae_title="MODALITY")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSRX")
    assert assoc.is_established
    for _ in range(stores):
        statuses.append(int(assoc.send_c_store(_dataset()).Status))
    assoc.release()
    assert not ae.associate("127.0.0.1", port, ae_title="NOTME").is_established
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSRX")
    assert assoc.is_established
    assoc.abort()
    return statuses


def test_real_worker_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="workers.telemetry")

    async def scenario() -> None:
        with short_tmpdir() as d:
            path = os.path.join(d, "agg.sock")
            agg = Aggregator(path, port=0)
            await agg.start()
            telemetry = Telemetry(path, 0, interval=0.05)
            await telemetry.start()
            config = WorkerConfig(
                storage=StorageConfig(root=tmp_path, fsync="always"),
                ae_title="PACSRX",
                require_called_ae=True,
            )
            server = AssociationServer(config, telemetry=telemetry, store_ops=telemetry.file_ops())
            _, port = await server.listen("127.0.0.1", 0)
            loop = asyncio.get_running_loop()
            statuses = await loop.run_in_executor(None, _peer, port, 3)
            assert statuses == [0, 0, 0]
            await until(lambda: not server.protocols)

            def done() -> bool:
                w0 = agg.state.workers.get("0")
                return bool(w0 and w0.pdus[0][7] >= 1 and telemetry.backlog == 0)

            await until(done)
            await asyncio.sleep(0.15)  # one more tick: the last counters
            got = await scrape(agg)
            v = lambda name, **labels: value(got, name, **labels)  # noqa: E731
            ae = {"calling_ae": "MODALITY", "called_ae": "PACSRX"}
            assert v("pacs_associations_requested_total", **ae) == 2
            assert v("pacs_associations_accepted_total", **ae) == 2
            assert v("pacs_associations_released_total", **ae) == 1
            assert (
                v(
                    "pacs_associations_rejected_total",
                    calling_ae="MODALITY",
                    called_ae="NOTME",
                    result="permanent",
                    source="service_user",
                    reason="called_ae_title_not_recognized",
                )
                == 1
            )
            aborted = [
                (dict(k[1]), n) for k, n in got.items() if k[0] == "pacs_associations_aborted_total"
            ]
            assert len(aborted) == 1 and aborted[0][1] == 1
            assert aborted[0][0]["initiator"] == "peer"
            assert v("pacs_connections_total", worker="0") == 3
            assert v("pacs_connections_open", worker="0") == 0
            pdus = {"worker": "0", "direction": "received"}
            assert v("pacs_pdus_total", **pdus, pdu_type="associate_rq") == 3
            assert v("pacs_pdus_total", **pdus, pdu_type="release_rq") == 1
            assert v("pacs_pdus_total", **pdus, pdu_type="abort") == 1
            assert v("pacs_pdus_total", **pdus, pdu_type="p_data_tf") >= 6
            sent = {"worker": "0", "direction": "sent"}
            assert v("pacs_pdus_total", **sent, pdu_type="associate_ac") == 2
            assert v("pacs_pdus_total", **sent, pdu_type="associate_rj") == 1
            assert v("pacs_pdus_total", **sent, pdu_type="p_data_tf") >= 3
            assert v("pacs_network_bytes_total", worker="0", direction="received") > 3 * 512
            assert v("pacs_storage_write_duration_seconds_count", worker="0") >= 3
            assert v("pacs_storage_fsync_duration_seconds_count", worker="0") >= 3
            assert v("pacs_telemetry_dropped_total", worker="0") == 0
            # idle: the pair that was open reads 0 rather than vanishing
            assert got[("pacs_associations_open", frozenset(ae.items()))] == 0
            # durations at full resolution: not whole milliseconds (uvloop's clock)
            h = {"calling_ae": "MODALITY", "sop_class": CT}
            assert v("pacs_cstore_duration_seconds_count", **h) == 3
            total_ms = v("pacs_cstore_duration_seconds_sum", **h) * 1000
            assert total_ms > 0 and abs(total_ms - round(total_ms)) > 1e-6
            await server.close(graceful_timeout=1.0)
            await telemetry.close()
            await agg.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))
    assert not [r for r in caplog.records if r.name == "workers.telemetry"]
