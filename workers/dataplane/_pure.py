"""The pure-Python data plane: the twin of ``_core.pyx``, byte for byte the same.

:func:`walk_pdata` is the steady state of a receiving association in Sta6: it walks
P-DATA-TF PDUs and their PDV items in the engine's receive buffer, appends command
fragments to the command buffer and writes data-set fragments straight to the
instance file, and comes back only when the engine's own (Python) code must act:

``NEED_DATA``
    every complete unit in the buffer is consumed; more bytes are needed.
``MESSAGE_END``
    a PDV with the last-fragment bit is complete (command set or data set): the engine
    decodes the command or reports the data set.
``SLOW``
    anything unusual: a PDU other than P-DATA-TF, a length out of bounds, a PDV the
    engine would refuse, a command set over its bound, a data-set fragment with no
    file to write to, a failed write. Nothing of that unit was consumed (a failed
    write consumed exactly the bytes that reached the file), so the engine's own code
    takes that one step and produces the answer it always did.

When a ``digest`` (a hashlib object: the index's content digest) is given, every byte
written to the file is also fed to its ``update``, right after the write and from the
same receive buffer (no copy): the hash covers exactly the bytes that reached the
file, so the sink can go on hashing the fragments it is handed itself after a
``SLOW`` return, and the data plane still takes the fast path while the digest is on.

The caller's framing state goes in and comes out through a :class:`Framing`, reused
for every call, so that a call builds no object per PDU or fragment.
"""

from __future__ import annotations

import os
import re
import struct
from time import perf_counter_ns
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = [
    "MESSAGE_END",
    "NEED_DATA",
    "SLOW",
    "Framing",
    "StoreRQ",
    "decode_store_rq",
    "encode_store_rsp",
    "file_meta",
    "uid_valid",
    "walk_pdata",
]

NEED_DATA = 0
MESSAGE_END = 1
SLOW = 2

#: Framing.flags bits
COMMAND = 0x01  # the current PDV is a command fragment (control header bit 0)
LAST = 0x02  # the current PDV is the last fragment of its message (bit 1)
HAVE_COMMAND = 0x04  # the message's command set is complete; data-set fragments follow

_P_DATA_TF = 4


class Framing:
    """The framing state of one connection, in and out of :func:`walk_pdata`.

    ``start`` is the offset of the first unparsed byte, ``pdata_left`` the bytes of the
    current P-DATA-TF body not yet parsed, ``pdv_left`` those of the current PDV
    fragment, ``flags`` the bits above, ``msg_context`` the presentation context of
    the message being received (0: none). The outputs ``pdus`` (P-DATA-TF PDUs whose
    header was consumed), ``written`` (data-set bytes written to ``fd``) and
    ``write_ns`` (monotonic nanoseconds spent in those writes, for the storage write
    histogram) count from 0 at each call.
    """

    __slots__ = (
        "flags",
        "msg_context",
        "pdata_left",
        "pdus",
        "pdv_left",
        "start",
        "write_ns",
        "written",
    )

    def __init__(self) -> None:
        self.start = 0
        self.pdata_left = 0
        self.pdv_left = 0
        self.flags = 0
        self.msg_context = 0
        self.pdus = 0
        self.written = 0
        self.write_ns = 0


def walk_pdata(
    fr: Framing,
    buf: bytearray,
    end: int,
    contexts: bytes,
    max_pdu_length: int,
    command_buf: bytearray,
    max_command_length: int,
    fd: int,
    digest: _Hash | None = None,
) -> int:
    """Walk ``buf[fr.start:end]`` as described in the module doc; returns the code.

    ``contexts`` has 256 bytes, non-zero for each accepted presentation context id;
    ``max_pdu_length`` bounds a P-DATA-TF body (0: no bound); ``fd`` is the instance
    file for data-set fragments (-1: none, every data-set fragment is ``SLOW``);
    ``digest``, if not None, is updated with every byte written to ``fd``.
    """
    start = fr.start
    pdata_left = fr.pdata_left
    pdv_left = fr.pdv_left
    flags = fr.flags
    msg_context = fr.msg_context
    pdus = 0
    written = 0
    write_ns = 0
    code = NEED_DATA
    while True:
        avail = end - start
        if pdv_left:
            if not avail:
                break
            n = avail if avail < pdv_left else pdv_left
            if flags & COMMAND:
                if len(command_buf) + n > max_command_length:
                    code = SLOW
                    break
                command_buf += memoryview(buf)[start : start + n]
            else:
                if fd < 0:
                    code = SLOW
                    break
                done = 0
                failed = False
                t0 = perf_counter_ns()
                with memoryview(buf) as view:
                    while done < n:
                        try:
                            k = os.write(fd, view[start + done : start + n])
                        except OSError:
                            failed = True
                            break
                        if k <= 0:
                            failed = True
                            break
                        done += k
                    write_ns += perf_counter_ns() - t0
                    if digest is not None and done:
                        # after the timing: write_ns is the storage write histogram's
                        digest.update(view[start : start + done])
                written += done
                if failed:
                    start += done
                    pdv_left -= done
                    pdata_left -= done
                    code = SLOW
                    break
            start += n
            pdv_left -= n
            pdata_left -= n
            if not pdv_left and flags & LAST:
                code = MESSAGE_END
                break
            continue
        if pdata_left:
            # a PDV item header: length (4), context id, message control header
            if avail < 6:
                break
            if pdata_left < 6:
                code = SLOW
                break
            item_length = int.from_bytes(buf[start : start + 4], "big")
            context_id = buf[start + 4]
            control = buf[start + 5]
            if item_length < 2 or item_length - 2 > pdata_left - 6 or not contexts[context_id]:
                code = SLOW
                break
            is_command = control & 0x01
            if msg_context == 0:
                if not is_command:
                    code = SLOW
                    break
            elif context_id != msg_context or bool(is_command) == bool(flags & HAVE_COMMAND):
                # another context inside a message; a command fragment after the
                # command set, or a data-set fragment before it was complete
                code = SLOW
                break
            msg_context = context_id
            flags = (flags & HAVE_COMMAND) | (control & (COMMAND | LAST))
            start += 6
            pdata_left -= 6
            pdv_left = item_length - 2
            if not pdv_left and flags & LAST:
                code = MESSAGE_END
                break
            continue
        # a PDU header: only a P-DATA-TF of acceptable length is ours
        if avail < 6:
            break
        length = int.from_bytes(buf[start + 2 : start + 6], "big")
        if buf[start] != _P_DATA_TF or length < 6 or (max_pdu_length and length > max_pdu_length):
            code = SLOW
            break
        start += 6
        pdata_left = length
        pdus += 1
    fr.start = start
    fr.pdata_left = pdata_left
    fr.pdv_left = pdv_left
    fr.flags = flags
    fr.msg_context = msg_context
    fr.pdus = pdus
    fr.written = written
    fr.write_ns = write_ns
    return code


# ------------------------------------------------------------------ C-STORE, per instance
#
# The per-instance work around the data set: the C-STORE-RQ command set, the
# C-STORE-RSP PDU, the UID checks and the Part 10 header. Each function answers
# exactly as the engine's and the store's own Python code does (workers.engine.dimse,
# workers.storage.uids and .filemeta), or ``None``, the SLOW answer: "not mine, ask
# the Python code", which then gives the answer it always gave. A twin never
# guesses: whatever is unusual is ``None``.

#: A decoded C-STORE-RQ: (MessageID, Priority, CommandDataSetType,
#: AffectedSOPClassUID, AffectedSOPInstanceUID, MoveOriginatorApplicationEntityTitle,
#: MoveOriginatorMessageID); the last two are None when absent.
StoreRQ = tuple[int, int, int, str, str, str | None, int | None]

_ELEMENT_HEADER = struct.Struct("<HHI")
_C_STORE_RQ = 0x0001
_NO_DATASET = 0x0101

# "seen" bits of the elements a C-STORE-RQ may carry; any other element is SLOW.
_SEEN_CLASS = 0x01
_SEEN_FIELD = 0x02
_SEEN_MID = 0x04
_SEEN_PRIORITY = 0x08
_SEEN_CDST = 0x10
_SEEN_INSTANCE = 0x20
_SEEN_MOVE_AE = 0x40
_SEEN_MOVE_MID = 0x80


def decode_store_rq(data: bytes | bytearray) -> StoreRQ | None:
    """The C-STORE-RQ in the command set ``data``, already checked, or None (SLOW).

    Not None exactly when ``dimse.decode_command(data)`` gives a C-STORE-RQ that
    ``dimse.validate_command`` accepts and that holds no element but (0000,0000),
    (0000,0002), (0000,0100), (0000,0110), (0000,0700), (0000,0800), (0000,1000),
    (0000,1030) and (0000,1031), all in ASCII; the values are then the ones that
    decoder gives. Everything else (errors, other commands, unusual elements) is
    None, and the engine's own decoder answers.
    """
    if type(data) is not bytes:
        data = bytes(data)
    end = len(data)
    offset = 0
    seen = 0
    command_field = mid = priority = cdst = move_mid = -1
    cls = inst = ""
    move_ae: str | None = None
    unpack = _ELEMENT_HEADER.unpack_from
    while offset < end:
        if end - offset < 8:
            return None
        group, elem, length = unpack(data, offset)
        start = offset + 8
        offset = start + length
        if offset > end or group:
            return None
        if elem in (0x0100, 0x0110, 0x0700, 0x0800, 0x1031):  # US
            if length == 0:  # absent, as the decoder counts it: no duplicate either
                continue
            if length != 2:
                return None
            value = data[start] | data[start + 1] << 8
            if elem == 0x0100:
                bit = _SEEN_FIELD
                command_field = value
            elif elem == 0x0110:
                bit = _SEEN_MID
                mid = value
            elif elem == 0x0700:
                bit = _SEEN_PRIORITY
                priority = value
            elif elem == 0x0800:
                bit = _SEEN_CDST
                cdst = value
            else:
                bit = _SEEN_MOVE_MID
                move_mid = value
        elif elem in (0x0002, 0x1000, 0x1030):  # UI, UI, AE
            raw = data[start:offset]
            if not raw.isascii():
                return None
            if elem == 0x0002:
                bit = _SEEN_CLASS
                cls = raw.decode("ascii").rstrip("\x00 ")
            elif elem == 0x1000:
                bit = _SEEN_INSTANCE
                inst = raw.decode("ascii").rstrip("\x00 ")
            else:
                bit = _SEEN_MOVE_AE
                move_ae = raw.decode("ascii").strip("\x00 ")
        elif elem == 0x0000:  # group length: checked, never counted (nor a duplicate)
            if length != 4:
                return None
            continue
        else:
            return None
        if seen & bit:
            return None
        seen |= bit
    # decode_command's structure, then validate_command's C-STORE-RQ rules
    if command_field != _C_STORE_RQ or cdst < 0 or cdst == _NO_DATASET:
        return None
    if mid < 0 or priority not in (0, 1, 2):
        return None
    if not 0 < len(cls) <= 64 or not 0 < len(inst) <= 64:
        return None
    if move_ae is not None and len(move_ae) > 16:
        return None
    return (mid, priority, cdst, cls, inst, move_ae, move_mid if move_mid >= 0 else None)


_PDU_HEAD = struct.Struct(">BxLLBB")  # P-DATA-TF header + one PDV header
_RSP_US = struct.Struct("<HHIHHHIHHHIHHHIH")
_UI_ELEMENT = struct.Struct("<HHI")


def encode_store_rsp(
    context_id: int,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    status: int,
    max_fragment: int,
) -> bytes | None:
    """The whole P-DATA-TF PDU of a C-STORE-RSP without ErrorComment, or None (SLOW).

    The bytes are those the engine queues for ``send_command(context_id,
    dimse.encode_c_store_rsp(message_id, sop_class_uid, sop_instance_uid, status))``
    when the command set fits one fragment of ``max_fragment`` bytes: one PDU, one
    PDV, control header 03H. None when it does not fit, or for a context ID outside
    1..255, a message ID or status outside 0..65535, or a UID that is not ASCII or
    over 64 characters: the engine's general path then answers.
    """
    if not (
        0 < context_id <= 255
        and 0 <= message_id <= 0xFFFF
        and 0 <= status <= 0xFFFF
        and len(sop_class_uid) <= 64
        and len(sop_instance_uid) <= 64
        and sop_class_uid.isascii()
        and sop_instance_uid.isascii()
    ):
        return None
    cls = sop_class_uid.encode("ascii")
    if len(cls) & 1:
        cls += b"\x00"
    inst = sop_instance_uid.encode("ascii")
    if len(inst) & 1:
        inst += b"\x00"
    body = 8 + len(cls) + 40 + 8 + len(inst)
    n = 12 + body
    if n > max_fragment:
        return None
    # fmt: off
    return b"".join(
        (
            _PDU_HEAD.pack(4, n + 6, n + 2, context_id, 3),
            _UI_ELEMENT.pack(0, 0, 4),
            body.to_bytes(4, "little"),
            _UI_ELEMENT.pack(0, 0x0002, len(cls)),
            cls,
            _RSP_US.pack(0, 0x0100, 2, 0x8001, 0, 0x0120, 2, message_id,
                         0, 0x0800, 2, _NO_DATASET, 0, 0x0900, 2, status),
            _UI_ELEMENT.pack(0, 0x1000, len(inst)),
            inst,
        )
    )
    # fmt: on


# PS3.5 9.1: components of digits separated by ".", each "0" or without a leading
# zero; fullmatch, so that no trailing "\n" slips through as it would past "$".
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*", re.ASCII)


def uid_valid(s: str) -> bool:
    """True when ``s`` is a UID per PS3.5 9.1 (as ``storage.uids.is_valid_uid``):
    at most 64 characters, digits and dots, no empty component, no leading zero in
    a multi-digit component."""
    return 0 < len(s) <= 64 and _UID_RE.fullmatch(s) is not None


# SH and AE values in the file meta: printable ASCII but backslash (PS3.5 6.2).
_TEXT_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]+")
_META_HEAD = bytes(128) + b"DICM" + struct.pack("<HH2sH", 2, 0, b"UL", 4)
_META_VERSION = struct.pack("<HH2s2xI", 2, 1, b"OB", 2) + b"\x00\x01"
_SHORT_ELEMENT = struct.Struct("<HH2sH")

# (class, transfer syntax, AE, implementation UID, version) -> the elements before
# and after (0002,0003): a run of instances shares them. Bounded: cleared when full.
_META_PARTS: dict[tuple[str, str, str | None, str, str | None], tuple[bytes, bytes]] = {}


def _meta_ui(elem: int, uid: str) -> bytes | None:
    if not uid_valid(uid):
        return None
    raw = uid.encode("ascii")
    if len(raw) & 1:
        raw += b"\x00"
    return _SHORT_ELEMENT.pack(2, elem, b"UI", len(raw)) + raw


def _meta_text(elem: int, vr: bytes, value: str) -> bytes | None:
    if len(value) > 16 or _TEXT_RE.fullmatch(value) is None:
        return None
    raw = value.encode("ascii")
    if len(raw) & 1:
        raw += b" "
    return _SHORT_ELEMENT.pack(2, elem, vr, len(raw)) + raw


def _meta_parts(
    key: tuple[str, str, str | None, str, str | None],
) -> tuple[bytes, bytes] | None:
    cls, ts, ae, impl, version = key
    cls_element = _meta_ui(0x0002, cls)
    ts_element = _meta_ui(0x0010, ts)
    impl_element = _meta_ui(0x0012, impl)
    if cls_element is None or ts_element is None or impl_element is None:
        return None
    after = [ts_element, impl_element]
    if version:
        version_element = _meta_text(0x0013, b"SH", version)
        if version_element is None:
            return None
        after.append(version_element)
    if ae:
        ae_element = _meta_text(0x0016, b"AE", ae)
        if ae_element is None:
            return None
        after.append(ae_element)
    parts = (_META_VERSION + cls_element, b"".join(after))
    if len(_META_PARTS) >= 64:
        _META_PARTS.clear()
    _META_PARTS[key] = parts
    return parts


def file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae: str | None,
    implementation_class_uid: str,
    implementation_version_name: str | None,
) -> bytes | None:
    """The Part 10 header (preamble, ``DICM``, group 0002), or None (SLOW).

    The bytes of ``storage.filemeta.encode_file_meta_prechecked`` for the same
    arguments; None exactly when that function raises (an invalid UID or text
    value, a SOP Instance UID that is not ASCII or too long to encode).
    """
    ae = source_ae.strip(" ") if source_ae else None
    key = (sop_class_uid, transfer_syntax_uid, ae or None, implementation_class_uid,
           implementation_version_name)  # fmt: skip
    parts = _META_PARTS.get(key)
    if parts is None:
        parts = _meta_parts(key)
        if parts is None:
            return None
    before, after = parts
    if not sop_instance_uid.isascii():
        return None
    instance = sop_instance_uid.encode("ascii")
    if len(instance) & 1:
        instance += b"\x00"
    if len(instance) > 0xFFFF:
        return None
    body_length = len(before) + 8 + len(instance) + len(after)
    return b"".join(
        (
            _META_HEAD,
            body_length.to_bytes(4, "little"),
            before,
            _SHORT_ELEMENT.pack(2, 3, b"UI", len(instance)),
            instance,
            after,
        )
    )
