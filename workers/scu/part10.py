"""The header of a DICOM Part 10 file (PS3.10 7.1), read by hand for C-STORE.

A Part 10 file is a 128-byte preamble, ``b"DICM"``, the File Meta Information (group
0002, always Explicit VR Little Endian, PS3.10 7.1) and then the data set, encoded in
the transfer syntax that (0002,0010) names. A C-STORE sends exactly those data-set
bytes, so the sender needs only three meta elements and the offset where the data set
starts; pydicom is not needed for that and is kept off this path.

The meta group is walked element by element rather than trusting (0002,0000) File Meta
Information Group Length: files in the field carry wrong group lengths often enough
that DCMTK and pydicom do the same. A few writers encode group 0002 in Implicit VR;
the walker notices a VR field that is not two upper-case letters and copes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["NeedMoreData", "Part10Header", "parse_part10_header"]

_PREAMBLE_LENGTH = 128
_MAGIC = b"DICM"
_META_START = _PREAMBLE_LENGTH + len(_MAGIC)

_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

#: VRs whose explicit encoding has 2 reserved bytes and a 32-bit length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

_MEDIA_STORAGE_SOP_CLASS_UID = 0x0002
_MEDIA_STORAGE_SOP_INSTANCE_UID = 0x0003
_TRANSFER_SYNTAX_UID = 0x0010

#: A meta group longer than this is not a meta group (real ones are a few hundred bytes).
MAX_META_LENGTH = 1024 * 1024


class NeedMoreData(Exception):
    """The buffer ends inside the file meta; ``needed`` bytes in total would settle it."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


@dataclass(slots=True, frozen=True)
class Part10Header:
    """What a C-STORE needs from a Part 10 file's meta information."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    #: where the data set starts, counted from the start of the file
    dataset_offset: int


def _uid(raw: bytes) -> str:
    # UIDs are padded with NUL to even length (PS3.5 9.1); be lenient about spaces.
    return raw.decode("ascii", "replace").rstrip("\x00 ")


def parse_part10_header(buf: bytes | bytearray | memoryview, eof: bool) -> Part10Header:
    """Parse the preamble and file meta at the start of ``buf``.

    ``eof`` says whether ``buf`` is the whole file. Raises :class:`NeedMoreData` when
    ``buf`` ends before the first element after group 0002 (and ``eof`` is false), and
    ``ValueError`` when the bytes are not a Part 10 file with the three UIDs.
    """
    data = memoryview(buf).cast("B")
    size = len(data)
    if size < _META_START:
        if not eof:
            raise NeedMoreData(_META_START)
        raise ValueError("not a DICOM Part 10 file: shorter than preamble + 'DICM'")
    if data[_PREAMBLE_LENGTH:_META_START] != _MAGIC:
        raise ValueError("not a DICOM Part 10 file: no 'DICM' after the 128-byte preamble")
    values: dict[int, str] = {}
    pos = _META_START
    while True:
        if pos + 4 > size:
            if eof:
                break  # a file of meta information only: the data set is empty
            raise NeedMoreData(pos + 8)
        group, elem = _TAG.unpack_from(data, pos)
        if group != 0x0002:
            break
        if pos - _META_START > MAX_META_LENGTH:
            raise ValueError(f"file meta information longer than {MAX_META_LENGTH} bytes")
        if pos + 8 > size:
            if eof:
                raise ValueError("file meta information ends inside an element header")
            raise NeedMoreData(pos + 12)
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > size:
                if eof:
                    raise ValueError("file meta information ends inside an element header")
                raise NeedMoreData(pos + 12)
            (length,) = _U32.unpack_from(data, pos + 8)
            start = pos + 12
        elif vr.isalpha() and vr.isupper():
            (length,) = _U16.unpack_from(data, pos + 6)
            start = pos + 8
        else:  # Implicit VR in the meta group: a broken writer, but a common one
            (length,) = _U32.unpack_from(data, pos + 4)
            start = pos + 8
        if length == 0xFFFFFFFF:
            raise ValueError(f"(0002,{elem:04X}) has undefined length in the file meta")
        end = start + length
        if end > size:
            if eof:
                raise ValueError(f"(0002,{elem:04X}) runs past the end of the file")
            raise NeedMoreData(end + 8)
        if elem in (
            _MEDIA_STORAGE_SOP_CLASS_UID,
            _MEDIA_STORAGE_SOP_INSTANCE_UID,
            _TRANSFER_SYNTAX_UID,
        ):
            values[elem] = _uid(bytes(data[start:end]))
        pos = end
    missing = [
        name
        for elem, name in (
            (_MEDIA_STORAGE_SOP_CLASS_UID, "MediaStorageSOPClassUID"),
            (_MEDIA_STORAGE_SOP_INSTANCE_UID, "MediaStorageSOPInstanceUID"),
            (_TRANSFER_SYNTAX_UID, "TransferSyntaxUID"),
        )
        if not values.get(elem)
    ]
    if missing:
        raise ValueError(f"file meta information lacks {', '.join(missing)}")
    return Part10Header(
        values[_MEDIA_STORAGE_SOP_CLASS_UID],
        values[_MEDIA_STORAGE_SOP_INSTANCE_UID],
        values[_TRANSFER_SYNTAX_UID],
        pos,
    )
