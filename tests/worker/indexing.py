"""Helpers of the tests of the services answered from the instance index (storage
commitment, query/retrieve): a real worker (:class:`~tests.worker.conftest.WorkerThread`)
with :class:`~workers.indexed.IndexedServices` installed over a real SQLite index under
its storage root, instances stored through it by pynetdicom, and the index filled
from the stored files through the index API (what the receiver's index writer does).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from workers.index import IndexRecord
from workers.index.digest import dataset_digest
from workers.indexed import IndexedServices, IndexedSettings
from workers.remote_aes import parse_remote_aes

from .conftest import CT_IMAGE, EXPLICIT_LE, WorkerThread, stored_files

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


def install(w: WorkerThread, index_url: str | None = None, **settings: Any) -> IndexedServices:
    """Install the indexed services on the worker ``w``, over ``index_url``."""
    remote = parse_remote_aes(settings.pop("remote_aes", {}))
    cfg = IndexedSettings(index=index_url, remote_aes=remote, **settings)

    async def start() -> IndexedServices:
        services = IndexedServices(w.server, cfg)
        await services.start()
        w.server.indexed = services
        return services

    result: IndexedServices = w.call(start())
    return result


def make_ct(
    seed: int, *, study: str, series: str, patient: str = "Doe^Jane", **attrs: Any
) -> Dataset:
    """A small CT image in the given study and series."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = patient
    ds.PatientID = attrs.pop("PatientID", "PID-1")
    ds.StudyDate = attrs.pop("StudyDate", "20240115")
    ds.StudyTime = attrs.pop("StudyTime", "101500")
    ds.AccessionNumber = attrs.pop("AccessionNumber", "ACC1")
    ds.Modality = attrs.pop("Modality", "CT")
    ds.InstanceNumber = seed + 1
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((seed + i) % 256 for i in range(32))
    for name, value in attrs.items():
        setattr(ds, name, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def store(w: WorkerThread, datasets: list[Dataset], calling_ae: str = "MODALITY") -> None:
    """C-STORE ``datasets`` to the worker with pynetdicom; all must succeed."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
    assoc = ae.associate(w.host, w.port, ae_title="PACSRX")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
    finally:
        assoc.release()


def record_of(root: Path, path: Path, calling_ae: str = "MODALITY") -> IndexRecord:
    """The index record of a stored file, as the receiver makes it."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    size, digest = dataset_digest(str(path))
    return IndexRecord(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        patient_id=str(ds.get("PatientID", "")),
        patient_name=str(ds.get("PatientName", "")),
        study_date=str(ds.get("StudyDate", "")),
        modality=str(ds.get("Modality", "")),
        accession_number=str(ds.get("AccessionNumber", "")),
        calling_ae=calling_ae,
        source_address="127.0.0.1:0",
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        size=size,
        digest=digest,
        path=os.path.relpath(path, root).replace(os.sep, "/"),
        received_at=time.time(),
        study_time=str(ds.get("StudyTime", "")),
    )


def index_store(services: IndexedServices, root: Path) -> dict[str, Path]:
    """Index every stored file under ``root``; returns SOP Instance UID -> file."""
    files = stored_files(root)
    assert services.index is not None
    services.index.add_many([record_of(root, path) for path in files.values()])
    return files


def synthetic_records(n: int, *, study: str, series: str) -> list[IndexRecord]:
    """``n`` index records without files (enough for C-FIND)."""
    return [
        IndexRecord(
            sop_instance_uid=f"{series[:48]}.{i + 1}",
            sop_class_uid=CT_IMAGE,
            study_uid=study,
            series_uid=series,
            patient_id="PID-MANY",
            patient_name="Many^Instances",
            study_date="20230301",
            modality="MR",
            accession_number="ACCMANY",
            calling_ae="MODALITY",
            source_address="",
            transfer_syntax=EXPLICIT_LE,
            size=0,
            digest="",
            path=f"none/{i}.dcm",
            received_at=time.time(),
        )
        for i in range(n)
    ]


def commitment_request(transaction_uid: str, references: list[tuple[str, str]]) -> Dataset:
    """The Action Information of a storage commitment N-ACTION."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds
