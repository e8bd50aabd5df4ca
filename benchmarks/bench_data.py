"""The benchmarks' data: synthetic CT instances made with pydicom, and counting what
a receiver stored.

Instances come in realistic studies: a new series every :data:`SERIES_SIZE` instances,
unique UIDs, explicit VR little endian, pixel data of random bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SERIES_SIZE = 100


def make_instances(directory: Path, count: int, size_kb: int, tag: str) -> int:
    """``count`` CT instances of about ``size_kb`` KB; returns the bytes written."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    noise = os.urandom(size_kb * 1024 + 4096)
    study = generate_uid()
    total = 0
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        if i % SERIES_SIZE == 0:  # realistic studies: a new series every 100 instances
            series = generate_uid()
        ds.SeriesInstanceUID = series
        ds.PatientName = "Bench^Receivers"
        ds.PatientID = f"BENCH{tag}"
        ds.Modality = "CT"
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.Columns = 64
        ds.Rows = max(1, (size_kb * 1024 - 600) // 128)
        start = i % 4096
        ds.PixelData = noise[start : start + ds.Rows * 128]
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
        ds.file_meta = meta
        path = directory / f"{tag}-{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


@dataclass(slots=True)
class DataSet:
    label: str  # "8 KB"
    dirs: list[Path]
    instances: int
    bytes: int


def count_files(root: Path) -> int:
    n = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .incoming
        n += sum(1 for f in filenames if not f.startswith("."))
    return n
