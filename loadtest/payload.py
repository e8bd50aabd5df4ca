"""What the load generator sends: synthetic instances with unique UIDs, or real files.

Synthetic instances
-------------------
Building a data set with pydicom costs hundreds of microseconds; the generator sends
tens of thousands a second. So pydicom is used once per process: :func:`build_template`
encodes one CT-like data set whose SOP Instance UID has a fixed length and whose pixel
data is a 2-byte placeholder. In the encoded bytes it finds

* the byte offset of the SOP Instance UID's value: every instance gets a new UID of
  the same length (:class:`UidSource`), written there, so no length field changes;
* the Pixel Data element header, the last element: its 32-bit length is rewritten to
  the real pixel length, and the pixel bytes are not part of the template at all.

An instance is then ``head`` (the template up to the pixel values, about 1 KiB, with
the UID patched in: one small ``bytes`` concatenation) followed by the pixel data,
which is the same immutable buffer for every instance: memoryview slices of one block
of at most :data:`BLOCK` bytes, repeated. Nothing proportional to the instance size is
built, copied or held per instance: a 2 GiB instance is 1 KiB of head plus 512 views of
one 4 MiB block. Since the block is immutable, the transport may keep references to it
for as long as it likes.

Small instances (up to :data:`JOIN_LIMIT`) are joined into one ``bytes``: copying
8 KiB costs less than the second PDU that a separate pixel part would cost, and a
single buffer goes through the requestor's public API.

Sizes are whole rows of 16-bit pixels, so an instance is at most a row (a few KiB)
smaller than ``--size``; the report counts the exact bytes.

Files
-----
:func:`scan_files` reads only the Part 10 header of each file (by hand,
:func:`workers.scu.parse_part10_header`) for the SOP class and transfer syntax to
propose. The requestor streams each file from disk when it is sent.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workers.engine import acse
from workers.scu.part10 import NeedMoreData, parse_part10_header

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "BLOCK",
    "CT_IMAGE_STORAGE",
    "JOIN_LIMIT",
    "MAX_SIZE",
    "MIN_SIZE",
    "SYNTHETIC_TRANSFER_SYNTAXES",
    "UID_ROOT",
    "FileEntry",
    "Template",
    "UidSource",
    "build_template",
    "new_run_id",
    "scan_files",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

#: The UIDs this generator makes: the project's root, arc 7 for the load generator.
UID_ROOT = "1.2.826.0.1.3680043.10.1415.7"

MIN_SIZE = 8 * 1024
MAX_SIZE = 2 * 1024 * 1024 * 1024
#: Instances up to this size are sent as one buffer, larger ones as head + pixel views.
JOIN_LIMIT = 64 * 1024
#: The immutable pixel block that large pixel data is made of.
BLOCK = 4 * 1024 * 1024

#: Synthetic data sets can be made in these; a deflated or encapsulated syntax would
#: need the UID patched inside compressed bytes (use --files for those).
SYNTHETIC_TRANSFER_SYNTAXES = (
    acse.EXPLICIT_VR_LITTLE_ENDIAN,
    acse.IMPLICIT_VR_LITTLE_ENDIAN,
    acse.EXPLICIT_VR_BIG_ENDIAN,
)

_MODALITIES = {CT_IMAGE_STORAGE: "CT", MR_IMAGE_STORAGE: "MR"}
_PIXEL_DATA_TAG = 0x7FE00010
_COUNTER_WIDTH = 13  # digits of the per-instance UID component: 10**12 + n


def new_run_id() -> str:
    """A random 10-digit UID component (no leading zero) naming one run."""
    return str(random.SystemRandom().randrange(10**9, 10**10))


class UidSource:
    """Unique SOP Instance UIDs of one fixed length for one process of one run.

    ``<UID_ROOT>.<run>.<1000 + process>.<10**12 + n>``: every component without a
    leading zero (PS3.5 9.1), every UID the same length, so that it can be patched
    into an encoded data set in place.
    """

    __slots__ = ("_n", "length", "prefix", "series_uid", "study_uid")

    def __init__(self, run_id: str, process: int) -> None:
        base = f"{UID_ROOT}.{run_id}"
        self.prefix = f"{base}.{1000 + process}."
        self.study_uid = f"{base}.1"
        self.series_uid = f"{base}.{1000 + process}.1"
        self.length = len(self.prefix) + _COUNTER_WIDTH
        if self.length > 64:
            raise ValueError("UID too long")  # pragma: no cover - fixed widths
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self.prefix}{10**12 + self._n}"

    @property
    def issued(self) -> int:
        return self._n


@dataclass(slots=True)
class Template:
    """One encoded data set, ready to be stamped with new UIDs (see module doc)."""

    sop_class_uid: str
    transfer_syntax: str
    size: int  # bytes of every instance's data set
    head_before_uid: bytes
    head_after_uid: bytes  # up to and including the Pixel Data element header
    uid_length: int
    pixel_length: int
    rows: int
    columns: int
    frames: int
    _pixel_parts: tuple[memoryview, ...] = field(default=(), repr=False)
    _pixels: bytes = field(default=b"", repr=False)

    @property
    def single_buffer(self) -> bool:
        return self.size <= JOIN_LIMIT

    def head(self, uid: str) -> bytes:
        encoded = uid.encode("ascii")
        if len(encoded) != self.uid_length:
            raise ValueError(f"UID {uid!r} is not {self.uid_length} characters long")
        return self.head_before_uid + encoded + self.head_after_uid

    def parts(self, uid: str) -> list[bytes | memoryview]:
        """The data set of instance ``uid``: one buffer when small, else head + views."""
        if self.single_buffer:
            return [self.head(uid) + self._pixels]
        return [self.head(uid), *self._pixel_parts]

    def data(self, uid: str) -> bytes:
        """The whole data set as one ``bytes`` (tests, hashing; copies large ones)."""
        return b"".join(self.parts(uid))

    def sha256(self, uid: str) -> str:
        h = hashlib.sha256()
        for part in self.parts(uid):
            h.update(part)
        return h.hexdigest()


def _pixel_block(length: int, big_endian: bool) -> bytes:
    """Up to :data:`BLOCK` bytes of a 12-bit gradient: CT-like, not all zeros (a
    receiver that compresses gets no free ride), the same in every process."""
    values = array("H", ((i * 7) & 0x0FFF for i in range(65536)))
    if big_endian:
        values.byteswap()
    unit = values.tobytes()
    n = min(length, BLOCK)
    return (unit * (n // len(unit) + 1))[:n]


def _geometry(pixel_budget: int) -> tuple[int, int, int]:
    """(rows, columns, frames) of 16-bit pixels filling at most ``pixel_budget`` bytes."""
    columns = 64
    for c in (128, 256, 512, 1024, 2048, 4096):
        if c * c * 2 <= pixel_budget:
            columns = c
    rows_total = max(1, pixel_budget // (2 * columns))
    frames = max(1, math.ceil(rows_total / 4096))
    return rows_total // frames, columns, frames


def _dataset(
    sop_class_uid: str, uids: UidSource, uid: str, geometry: tuple[int, int, int]
) -> Dataset:
    from pydicom.dataset import Dataset

    rows, columns, frames = geometry
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "LT0001"
    ds.Modality = _MODALITIES.get(sop_class_uid, "OT")
    ds.Manufacturer = "pacs-loadtest"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "pacs-loadtest synthetic study"
    ds.SeriesDescription = "synthetic series"
    ds.PatientName = "LOADTEST^SYNTHETIC"
    ds.PatientID = "LOADTEST"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = uids.study_uid
    ds.SeriesInstanceUID = uids.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    ds.ImagePositionPatient = ["-250.0", "-250.0", "0.0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uids.study_uid + ".2"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = str(frames)
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.add_new(_PIXEL_DATA_TAG, "OW", b"\x00\x00")
    return ds


def build_template(
    size: int, sop_class_uid: str, transfer_syntax: str, uids: UidSource
) -> Template:
    """Encode the CT-like data set of about ``size`` bytes once; see the module doc."""
    from workers.scu.codec import encode_dataset

    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"--size must be between 8 KiB and 2 GiB, not {size} bytes")
    if transfer_syntax not in SYNTHETIC_TRANSFER_SYNTAXES:
        raise ValueError(
            f"synthetic instances can be made in {', '.join(SYNTHETIC_TRANSFER_SYNTAXES)}; "
            f"for {transfer_syntax} replay real files with --files"
        )
    placeholder = uids.prefix + "9" * _COUNTER_WIDTH
    # First pass: the size of everything but the pixel values (2 placeholder bytes);
    # 16 bytes of slack for the NumberOfFrames and Rows values of the real geometry.
    probe = encode_dataset(_dataset(sop_class_uid, uids, placeholder, (1, 1, 1)), transfer_syntax)
    geometry = _geometry(size - (len(probe) - 2) - 16)
    raw = encode_dataset(_dataset(sop_class_uid, uids, placeholder, geometry), transfer_syntax)
    rows, columns, frames = geometry
    pixel_length = rows * columns * frames * 2

    implicit = transfer_syntax == acse.IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != acse.EXPLICIT_VR_BIG_ENDIAN
    header_length = 8 if implicit else 12  # tag, (VR, reserved,) 32-bit length
    head = bytearray(raw[:-2])  # without the placeholder pixel values
    start = len(head) - header_length
    tag = struct.pack("<HH" if little else ">HH", 0x7FE0, 0x0010)
    if head[start : start + 4] != tag:  # pragma: no cover - pixel data is always last
        raise AssertionError("the Pixel Data element is not where it was expected")
    struct.pack_into("<I" if little else ">I", head, len(head) - 4, pixel_length)

    offset = head.find(placeholder.encode("ascii"))
    if offset < 0 or head.find(placeholder.encode("ascii"), offset + 1) >= 0:
        raise AssertionError("the SOP Instance UID is not in the template exactly once")
    end = offset + uids.length

    block = _pixel_block(pixel_length, big_endian=not little)
    template = Template(
        sop_class_uid=sop_class_uid,
        transfer_syntax=transfer_syntax,
        size=len(head) + pixel_length,
        head_before_uid=bytes(head[:offset]),
        head_after_uid=bytes(head[end:]),
        uid_length=uids.length,
        pixel_length=pixel_length,
        rows=rows,
        columns=columns,
        frames=frames,
    )
    if template.single_buffer:
        template._pixels = block
    else:
        view = memoryview(block)
        full, rest = divmod(pixel_length, len(block))
        template._pixel_parts = (view,) * full + ((view[:rest],) if rest else ())
    return template


# ------------------------------------------------------------------------ files


@dataclass(slots=True, frozen=True)
class FileEntry:
    """A Part 10 file to replay: where, what, and how many data-set bytes."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_length: int


def _read_header(path: str) -> FileEntry | None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(min(size, 64 * 1024))
            while True:
                try:
                    header = parse_part10_header(head, eof=len(head) >= size)
                    break
                except NeedMoreData as more:
                    head += f.read(max(more.needed, 2 * len(head)) - len(head))
    except (OSError, ValueError):
        return None
    return FileEntry(
        path,
        header.sop_class_uid,
        header.sop_instance_uid,
        header.transfer_syntax,
        size - header.dataset_offset,
    )


def _walk(root: str) -> Iterator[str]:
    if os.path.isfile(root):
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def scan_files(roots: Sequence[str], limit: int | None = None) -> tuple[list[FileEntry], int]:
    """The DICOM Part 10 files under ``roots`` (sorted); also how many were skipped."""
    found: list[FileEntry] = []
    skipped = 0
    for root in roots:
        for path in _walk(root):
            entry = _read_header(path)
            if entry is None:
                skipped += 1
                continue
            found.append(entry)
            if limit is not None and len(found) >= limit:
                return found, skipped
    return found, skipped


def file_sha256(entry: FileEntry) -> str:
    """SHA-256 of a file's data set bytes: what a C-STORE of it carries."""
    h = hashlib.sha256()
    with open(entry.path, "rb") as f:
        f.seek(os.fstat(f.fileno()).st_size - entry.dataset_length)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
