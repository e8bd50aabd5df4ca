"""Fuzzing the PDU codec (workers.engine.pdu.decode) and the DIMSE command codec
(workers.engine.dimse.decode_command): arbitrary and mutated input raises only the
codec's own error, and what decodes re-encodes to itself where the encoder can."""

from __future__ import annotations

import struct

from hypothesis import assume, example, given
from hypothesis import strategies as st

from workers.engine import dimse
from workers.engine import pdu as p

from . import harness as h
from . import strategies as fz

_BODIES: dict[int, list[bytes]] = {}
for _wire in [
    *fz._POOL,
    p.encode(p.PDataTF((p.PDV(1, 3, b"\x00" * 10), p.PDV(3, 0, b"x")))),
    *h.acceptor_seeds()[-1:],
]:
    _type, _length = struct.unpack_from(">BxL", _wire)
    _BODIES.setdefault(_type, []).append(_wire[6 : 6 + _length])
SEED_BODIES = [(t, b) for t, bodies in sorted(_BODIES.items()) for b in bodies]


@fz.fuzz_settings(300)
@given(st.integers(0, 255), st.binary(max_size=600))
@example(1, b"")
@example(4, b"")
def test_pdu_decode_random(pdu_type: int, body: bytes) -> None:
    h.run_pdu_decode(pdu_type, body)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[int, bytes]:
    pdu_type, body = draw(st.sampled_from(SEED_BODIES))
    mutated = draw(fz.mutated([body])) if body else body
    return pdu_type, mutated


@fz.fuzz_settings(500)
@given(mutated_bodies())
def test_pdu_decode_mutated(case: tuple[int, bytes]) -> None:
    pdu = h.run_pdu_decode(*case)
    if pdu is not None:
        h.run_pdu_roundtrip(pdu)


@fz.fuzz_settings(30)
@given(fz.pdu_stream("acceptor", cheap=False))
def test_pdu_decode_every_pdu_in_a_stream(stream: bytes) -> None:
    offset = 0
    while len(stream) - offset >= 6:
        pdu_type, length = struct.unpack_from(">BxL", stream, offset)
        body = stream[offset + 6 : offset + 6 + length]
        pdu = h.run_pdu_decode(pdu_type, body)
        if pdu is not None:
            h.run_pdu_roundtrip(pdu)
        offset += 6 + length


# ------------------------------------------------------------------------- DIMSE

_COMMAND_SEEDS = [
    dimse.encode_command(cmd)
    for cmd in (
        dimse.c_echo_rq(1),
        h.store_rq(2),
        dimse.c_store_rsp(h.store_rq(2), 0xA700, ErrorComment="disk full"),
        dimse.c_find_rq(3, "1.2.840.10008.5.1.4.1.2.1.1"),
        dimse.c_move_rq(4, "1.2.840.10008.5.1.4.1.2.1.2", "DEST"),
        dimse.c_cancel_rq(3),
        dimse.n_event_report_rq(5, "1.2.3", "1.2.3.4", 1),
        dimse.Command(
            dimse.CommandField.N_GET_RQ,
            MessageID=6,
            RequestedSOPClassUID="1.2",
            RequestedSOPInstanceUID="1.2.3",
            AttributeIdentifierList=(0x00100010, 0x00100020),
            extra={0x0999: b"abcd"},
        ),
    )
]


@fz.fuzz_settings(300)
@given(st.binary(max_size=300))
def test_dimse_decode_random(raw: bytes) -> None:
    h.run_dimse_decode(raw)


@fz.fuzz_settings(500)
@given(fz.mutated(_COMMAND_SEEDS))
def test_dimse_decode_mutated(raw: bytes) -> None:
    h.run_dimse_decode(raw)


@fz.fuzz_settings(300)
@given(fz.mutated(_COMMAND_SEEDS))
def test_dimse_every_request_can_be_answered(raw: bytes) -> None:
    """The worker answers a bad request with ``response_for(rq, failure)``: that
    response must be encodable whatever the request held."""
    try:
        cmd = dimse.decode_command(raw)
    except dimse.DIMSEError:
        return
    assume(cmd.is_request and cmd.CommandField != dimse.CommandField.C_CANCEL_RQ)
    h.run_dimse_response(cmd)


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def test_non_ascii_uid_can_be_answered() -> None:
    raw = (
        _element(0x0002, b"1.2.840.10008.5.1.4.1.1.2\0")  # AffectedSOPClassUID
        + _element(0x0100, b"\x01\x00")  # C-STORE-RQ
        + _element(0x0110, b"\x07\x00")  # MessageID
        + _element(0x0700, b"\x00\x00")  # Priority
        + _element(0x0800, b"\x00\x00")  # data set follows
        + _element(0x1000, b"1.2.\xff")  # AffectedSOPInstanceUID, not ASCII
    )
    cmd = dimse.decode_command(raw)
    h.run_dimse_response(cmd)  # DIMSEError: cannot encode AffectedSOPInstanceUID


def test_request_without_message_id_can_be_answered() -> None:
    raw = (
        _element(0x0002, b"1.2.840.10008.1.1\0")
        + _element(0x0100, b"\x30\x00")  # C-ECHO-RQ
        + _element(0x0800, b"\x01\x01")  # no data set
    )
    cmd = dimse.decode_command(raw)
    assert dimse.validate_command(cmd) is not None  # the worker knows it is bad ...
    h.run_dimse_response(cmd)  # ... but cannot build the failure response
