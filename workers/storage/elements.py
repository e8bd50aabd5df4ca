"""What the tag scanner (:mod:`.scanner`) knows of the data-set encoding: the tags it
takes, the explicit VR classes, the three element-header codecs and how a taken value
becomes text (PS3.5 7.1-7.5). Shared with :mod:`.skeletons`, which spells the same
headers out as patterns.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

__all__ = ["MAX_VALUE_LENGTH"]

#: Longest value the scanner will copy; UIDs and LO/CS values are at most 64 bytes, so
#: anything longer is not a value worth filing under and is skipped.
MAX_VALUE_LENGTH = 1024

_Buffer = bytes | bytearray | memoryview

_UNDEFINED = 0xFFFFFFFF
_ITEM_GROUP = 0xFFFE  # items and delimiters (PS3.5 7.5): (FFFE,E000/E00D/E0DD)
_ITEM = 0xE000
_ITEM_DELIMITER = 0xE00D
_SEQUENCE_DELIMITER = 0xE0DD

_SOP_INSTANCE_UID = 0x00080018
_STUDY_DATE = 0x00080020
_STUDY_TIME = 0x00080030
_ACCESSION_NUMBER = 0x00080050
_MODALITY = 0x00080060
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
# The layout's tags, and (for the instance index) the patient/study attributes that
# precede (0020,000E) anyway: the same walk, one more set hit per element taken.
_WANTED = frozenset(
    {
        _SOP_INSTANCE_UID,
        _STUDY_DATE,
        _STUDY_TIME,
        _ACCESSION_NUMBER,
        _MODALITY,
        _PATIENT_NAME,
        _PATIENT_ID,
        _STUDY_INSTANCE_UID,
        _SERIES_INSTANCE_UID,
    }
)
# The top-level loops test these groups with literal compares (cheaper than a lookup).
assert {tag >> 16 for tag in _WANTED} == {0x0008, 0x0010, 0x0020}

# Explicit VR classes. Short VRs have a 16-bit length; long ones 2 reserved bytes and a
# 32-bit length (PS3.5 Table 7.1-1 and 7.1-2). Of the long ones, only SQ, UN (PS3.5
# 6.2.2) and OB/OW (encapsulated Pixel Data, PS3.5 A.4) may have undefined length; an
# undefined-length UN nests Implicit VR Little Endian.
_SHORT = 0
_LONG = 1
_LONG_NESTS = 2
_LONG_UN = 3
_LONG_VRS = (b"OD", b"OF", b"OL", b"OV", b"SV", b"UC", b"UR", b"UT", b"UV")
_NESTING_VRS = (b"OB", b"OW", b"SQ")
_SHORT_VRS = (
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
    b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
)  # fmt: skip


def _vr_classes(byteorder: Literal["little", "big"]) -> dict[int, int]:
    """VR class keyed by the VR's two bytes read as an unsigned 16-bit integer."""
    classes = dict.fromkeys(_SHORT_VRS, _SHORT)
    classes.update(dict.fromkeys(_LONG_VRS, _LONG))
    classes.update(dict.fromkeys(_NESTING_VRS, _LONG_NESTS))
    classes[b"UN"] = _LONG_UN
    return {int.from_bytes(vr, byteorder): cls for vr, cls in classes.items()}


class _Codec(NamedTuple):
    """How one encoding's element headers are read (precompiled)."""

    implicit: bool
    #: Implicit: (group, element, 32-bit length). Explicit: (group, element, VR as an
    #: unsigned 16-bit integer, 16-bit length).
    header: Callable[..., tuple[Any, ...]]
    u32: Callable[..., tuple[Any, ...]]
    vr_class: dict[int, int]


# Encodings, by index into _CODECS (stack entries record one per level).
_IMPLICIT_LE = 0
_EXPLICIT_LE = 1
_EXPLICIT_BE = 2
_CODECS = (
    _Codec(True, struct.Struct("<HHI").unpack_from, struct.Struct("<I").unpack_from, {}),
    _Codec(
        False,
        struct.Struct("<HHHH").unpack_from,
        struct.Struct("<I").unpack_from,
        _vr_classes("little"),
    ),
    _Codec(
        False,
        struct.Struct(">HHHH").unpack_from,
        struct.Struct(">I").unpack_from,
        _vr_classes("big"),
    ),
)


def _text(tag: int, raw: _Buffer) -> str:
    """A wanted value as text.

    UI pads with NUL, the text VRs with space; leading/trailing spaces are not
    significant in LO/SH/CS/DA/TM/UI. ASCII with replacement: these values name files
    (after sanitising), get compared with command-set UIDs, or are ASCII by their VR.
    A person name may not be: UTF-8 when it decodes as such (ISO_IR 192, and plain
    ASCII), else Latin-1 (ISO_IR 100, the usual other one), which never fails.
    """
    if tag == _PATIENT_NAME:
        try:
            return str(raw, "utf-8").strip(" \0")
        except UnicodeDecodeError:
            return str(raw, "latin-1").strip(" \0")
    return str(raw, "ascii", "replace").strip(" \0")
