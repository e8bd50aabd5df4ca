"""Hand-built wire bytes for the malformed-session corpus: PDUs, items and command
sets, right or wrong on purpose. Well-formed pieces come from the engine's encoders
(:func:`workers.engine.pdu.encode`, :func:`workers.engine.dimse.encode_command`)."""

from __future__ import annotations

import struct

from workers.engine import acse, dimse
from workers.engine import pdu as p

from .conftest import CT_IMAGE, EXPLICIT_LE, IMPLICIT_LE, VERIFICATION

#: Context IDs of :func:`rq`: 1 = Verification, 3 = CT Image Storage.
ECHO_CTX = 1
STORE_CTX = 3


def rq(
    contexts: list[tuple[str, tuple[str, ...]]] | None = None, calling: str = "ROBUST"
) -> p.AssociateRQ:
    contexts = contexts or [(VERIFICATION, (IMPLICIT_LE,)), (CT_IMAGE, (EXPLICIT_LE,))]
    return acse.build_request(
        "PACSRX", calling, [acse.Requested(a, ts) for a, ts in contexts], max_pdu_length=16384
    )


def rq_bytes(**kwargs: object) -> bytes:
    return p.encode(rq(**kwargs))  # type: ignore[arg-type]


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BxL", pdu_type, length)


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def raw_rq(items: list[bytes], version: int = 1) -> bytes:
    """An A-ASSOCIATE-RQ from its variable items, in the order given."""
    fixed = struct.pack(">H2x16s16s32x", version, b"PACSRX".ljust(16), b"ROBUST".ljust(16))
    body = fixed + b"".join(items)
    return header(1, len(body)) + body


def app_context_item(uid: str = p.APPLICATION_CONTEXT_NAME) -> bytes:
    return item(0x10, uid.encode())


def context_item(
    context_id: int,
    abstract: str,
    syntaxes: tuple[str, ...] = (IMPLICIT_LE,),
    extra: bytes = b"",
    abstract_last: bool = False,
) -> bytes:
    sub_abstract = item(0x30, abstract.encode())
    sub_ts = b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    subs = sub_ts + sub_abstract if abstract_last else sub_abstract + sub_ts
    return item(0x20, struct.pack(">BxBx", context_id, 0) + subs + extra)


def user_info_item(max_length: int = 16384, extra: bytes = b"") -> bytes:
    return item(0x50, item(0x51, struct.pack(">L", max_length)) + item(0x52, b"1.2.3.4") + extra)


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF with one PDV (control: bit 0 command, bit 1 last)."""
    return header(4, len(data) + 6) + struct.pack(">LBB", len(data) + 2, context_id, control) + data


def command(context_id: int, cmd: dimse.Command | bytes) -> bytes:
    raw = cmd if isinstance(cmd, bytes) else dimse.encode_command(cmd)
    return pdata(context_id, 0x03, raw)


def dataset(context_id: int, data: bytes, last: bool = True) -> bytes:
    return pdata(context_id, 0x02 if last else 0x00, data)


def element(elem: int, value: bytes) -> bytes:
    """A group-0000 element, Implicit VR Little Endian, value as given."""
    return struct.pack("<HHI", 0, elem, len(value)) + value


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def ui(value: bytes) -> bytes:
    return value + b"\0" if len(value) & 1 else value


def raw_command(*elements: bytes) -> bytes:
    """A command set with its group length first."""
    body = b"".join(elements)
    return element(0x0000, struct.pack("<I", len(body))) + body


def store_rq(message_id: int, sop_instance_uid: str, **fields: object) -> dimse.Command:
    values: dict[str, object] = {
        "MessageID": message_id,
        "AffectedSOPClassUID": CT_IMAGE,
        "AffectedSOPInstanceUID": sop_instance_uid,
        "Priority": 0,
        "CommandDataSetType": dimse.DATASET_PRESENT,
    }
    values.update(fields)
    return dimse.Command(dimse.CommandField.C_STORE_RQ, **values)  # type: ignore[arg-type]


def explicit_dataset(
    sop_instance_uid: str, study: str = "1.2.3.5", series: str = "1.2.3.6", pixels: int = 0
) -> bytes:
    """A minimal CT data set, Explicit VR Little Endian; ``pixels`` bytes of Pixel
    Data (OB) at the end when asked for."""

    def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if len(value) & 1:
            value += b"\0" if vr == b"UI" else b" "
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    return b"".join(
        [
            el(0x0008, 0x0016, b"UI", CT_IMAGE.encode()),
            el(0x0008, 0x0018, b"UI", sop_instance_uid.encode("latin-1")),
            el(0x0008, 0x0060, b"CS", b"CT"),
            el(0x0010, 0x0020, b"LO", b"ROBUST"),
            el(0x0020, 0x000D, b"UI", study.encode("latin-1")),
            el(0x0020, 0x000E, b"UI", series.encode("latin-1")),
            struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, pixels) + bytes(pixels)
            if pixels
            else b"",
        ]
    )


def decode_response(pdu: p.PDU | None) -> dimse.Command | None:
    """The command set carried by a P-DATA-TF answer (one PDV, last fragment)."""
    if not isinstance(pdu, p.PDataTF):
        return None
    raw = b"".join(pdv.data for pdv in pdu.pdvs if pdv.is_command)
    return dimse.decode_command(raw) if raw else None
