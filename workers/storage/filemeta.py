"""The DICOM Part 10 file header (PS3.10 7.1), encoded by hand.

A stored instance is ``preamble + b"DICM" + group 0002 + data set``. The data set
bytes are exactly what the sender put on the wire, in the negotiated transfer syntax;
only this header is ours. It is a handful of elements, always Explicit VR Little
Endian (PS3.10 7.1), so it is built here with :mod:`struct` rather than pydicom
(no pydicom on the hot path).

Element encoding (PS3.5 7.1.2): tag as two little-endian uint16, then the two-letter
VR, then either a uint16 length (most VRs) or two reserved zero bytes and a uint32
length (OB, OW, SQ, UN, UT and the other "long" VRs, see :data:`LONG_VRS`). Values
are padded to even length: UI with NUL, text VRs (SH, AE) with a space (PS3.5 6.2).
"""

from __future__ import annotations

import functools
import re
import struct

from .. import dataplane
from .uids import is_valid_uid, is_valid_uid_reference

__all__ = [
    "DICM",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "LONG_VRS",
    "PREAMBLE",
    "encode_file_meta",
    "encode_file_meta_prechecked",
    "encode_file_meta_reference",
    "is_valid_ae_title",
]

#: This implementation's Implementation Class UID (PS3.7 D.3.3.2), under the project's
#: placeholder root 1.2.826.0.1.3680043.10.1415. Change it here and nowhere else.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1415.1.1"
#: Implementation Version Name (SH, at most 16 characters).
IMPLEMENTATION_VERSION_NAME = "PACSRX_010"

#: 128 zero bytes: PS3.10 7.1 lets applications put anything here; zeros say "nothing".
PREAMBLE = bytes(128)
DICM = b"DICM"

#: VRs whose explicit encoding uses 2 reserved bytes and a 32-bit length (PS3.5 Table 7.1-1).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2s2xI")
_UL = struct.Struct("<I")

_FILE_META_VERSION = b"\x00\x01"


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        raise ValueError("value must be padded to even length")  # local misuse
    if vr in LONG_VRS:
        return _LONG.pack(group, elem, vr, len(value)) + value
    return _SHORT.pack(group, elem, vr, len(value)) + value


_VERSION_ELEMENT = _element(0x0002, 0x0001, b"OB", _FILE_META_VERSION)


def _ui(uid: str) -> bytes:
    # the reference check: the reference encoder stays independent of the data plane
    if not is_valid_uid_reference(uid):
        raise ValueError(f"not a valid UID: {uid!r}")
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


# SH and AE: Default Character Repertoire without backslash or control characters
# (PS3.5 6.2), i.e. printable ASCII except "\\".
_TEXT_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]+")


def _text(value: str, max_len: int, what: str) -> bytes:
    # Refuse rather than write a header other readers would reject.
    if len(value) > max_len or _TEXT_RE.fullmatch(value) is None:
        raise ValueError(f"invalid {what}: {value!r}")
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


# The implementation elements and the AE element are the same for almost every call
# (one implementation, a handful of peers): encode each distinct value once.
@functools.lru_cache(maxsize=8)
def _implementation_elements(class_uid: str, version_name: str | None) -> bytes:
    out = _element(0x0002, 0x0012, b"UI", _ui(class_uid))
    if version_name:
        version = _text(version_name, 16, "ImplementationVersionName")
        out += _element(0x0002, 0x0013, b"SH", version)
    return out


@functools.lru_cache(maxsize=1024)
def _source_ae_element(ae: str) -> bytes:
    return _element(0x0002, 0x0016, b"AE", _text(ae, 16, "AE title"))


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    *,
    source_ae: str | None = None,
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str | None = IMPLEMENTATION_VERSION_NAME,
) -> bytes:
    """Encode the Part 10 header: preamble, ``DICM``, and the whole group 0002.

    ``source_ae`` is written as (0002,0016) SourceApplicationEntityTitle when given
    (the receiver passes the calling AE, as DCMTK's storescp does); leading and
    trailing spaces are insignificant in AE titles and are stripped. Raises
    ``ValueError`` for an invalid UID or text value: callers validate network input
    first, so this is a programming error, not a peer fault.
    """
    if not is_valid_uid(sop_instance_uid):
        raise ValueError(f"not a valid UID: {sop_instance_uid!r}")
    return encode_file_meta_prechecked(
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax_uid,
        source_ae=source_ae,
        implementation_class_uid=implementation_class_uid,
        implementation_version_name=implementation_version_name,
    )


def encode_file_meta_prechecked(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    *,
    source_ae: str | None = None,
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str | None = IMPLEMENTATION_VERSION_NAME,
) -> bytes:
    """:func:`encode_file_meta` for a caller that has already checked
    ``sop_instance_uid`` with :func:`~.uids.is_valid_uid` (the store, per instance);
    everything else is still checked.

    Made by the data plane (``workers.dataplane.file_meta``, the same bytes); when
    it says SLOW (a value this function refuses), by
    :func:`encode_file_meta_reference`, which raises as it always did."""
    header: bytes | None = _file_meta(
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax_uid,
        source_ae,
        implementation_class_uid,
        implementation_version_name,
    )
    if header is not None:
        return header
    return encode_file_meta_reference(
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax_uid,
        source_ae=source_ae,
        implementation_class_uid=implementation_class_uid,
        implementation_version_name=implementation_version_name,
    )


_file_meta = dataplane.file_meta


def encode_file_meta_reference(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    *,
    source_ae: str | None = None,
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str | None = IMPLEMENTATION_VERSION_NAME,
) -> bytes:
    """:func:`encode_file_meta_prechecked` in plain Python: the statement of the
    encoding that the data plane's twins are tested against, and its error answers."""
    ae = source_ae.strip(" ") if source_ae else None
    before, after = _meta_parts(
        sop_class_uid,
        transfer_syntax_uid,
        ae or None,
        implementation_class_uid,
        implementation_version_name,
    )
    instance = sop_instance_uid.encode("ascii")
    if len(instance) & 1:
        instance += b"\0"
    # (0002,0000) counts the bytes after its own element up to the end of group 0002.
    instance_header = _SHORT.pack(0x0002, 0x0003, b"UI", len(instance))
    body_length = len(before) + len(instance_header) + len(instance) + len(after)
    return b"".join((_HEAD, _UL.pack(body_length), before, instance_header, instance, after))


#: Preamble, "DICM" and the header of (0002,0000) UL (length 4): its value follows.
_HEAD = PREAMBLE + DICM + _SHORT.pack(0x0002, 0x0000, b"UL", 4)


# Everything but the SOP Instance UID is the same for a run of instances (one SOP
# class and transfer syntax per sender, a handful of peers): encoded once per
# combination, the per-instance work is one UID element and a join.
@functools.lru_cache(maxsize=64)
def _meta_parts(
    sop_class_uid: str,
    transfer_syntax_uid: str,
    source_ae: str | None,
    implementation_class_uid: str,
    implementation_version_name: str | None,
) -> tuple[bytes, bytes]:
    """The group 0002 elements before (0002,0003) and after it."""
    before = _VERSION_ELEMENT + _element(0x0002, 0x0002, b"UI", _ui(sop_class_uid))
    after = b"".join(
        (
            _element(0x0002, 0x0010, b"UI", _ui(transfer_syntax_uid)),
            _implementation_elements(implementation_class_uid, implementation_version_name),
            _source_ae_element(source_ae) if source_ae else b"",
        )
    )
    return before, after


def is_valid_ae_title(value: str) -> bool:
    """True when ``value`` (spaces stripped) can be written as an AE title."""
    try:
        _source_ae_element(value.strip(" "))
    except ValueError:
        return False
    return True
