"""Hypothesis strategies for hostile peer input: byte streams, read splits, mutations
of valid sessions, and PDU sequences with lying headers.

The settings (:data:`FUZZ`, :data:`FUZZ_SLOW`) keep ``make test`` short; ``FUZZ_LONG=1``
in the environment multiplies the examples by 100 (or ``FUZZ_LONG=<n>`` runs ``n``
examples per test), see README.md.
"""

from __future__ import annotations

import dataclasses
import os
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.engine import strategies as pdu_st
from workers.engine import dimse
from workers.engine import pdu as p

from . import harness as h


def _examples(default: int) -> int:
    long = os.environ.get("FUZZ_LONG", "")
    if not long or long == "0":
        return default
    if long.isdigit() and int(long) > 1:
        return int(long)
    return default * 100


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=_examples(default),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=False,
    )


#: Reads of the socket: sizes cycled through; 0 means "everything left".
splits = st.one_of(
    st.just([0]),
    st.just([1]),
    st.lists(st.integers(1, 7), min_size=1, max_size=6),
    st.lists(st.integers(0, 4096), min_size=1, max_size=6),
)

#: Length values that sit on the edges of every check.
_LENGTHS = st.sampled_from(
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 0x44, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid session with a few byte-level mutations (flip, insert, delete, copy,
    overwrite a 16/32-bit field with an edge value, truncate)."""
    wire = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 6))
        at = draw(st.integers(0, max(len(wire) - 1, 0)))
        if op == 0 and wire:
            wire[at] = draw(st.integers(0, 255))
        elif op == 1:
            wire[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == 2:
            n = draw(st.integers(1, 16))
            del wire[at : at + n]
        elif op == 3 and wire:
            n = draw(st.integers(1, 64))
            wire[at:at] = wire[at : at + n]
        elif op == 4 and len(wire) >= at + 4:
            wire[at : at + 4] = struct.pack(">L", draw(_LENGTHS))
        elif op == 5 and len(wire) >= at + 2:
            wire[at : at + 2] = struct.pack(">H", draw(_LENGTHS) & 0xFFFF)
        elif op == 6:
            del wire[at:]
    return bytes(wire)


def _pool() -> list[bytes]:
    """Well-formed PDUs of every type, one per interesting shape."""
    rq = h.associate_rq()
    out = [p.encode(pdu) for pdu in (rq, p.ReleaseRQ(), p.ReleaseRP(), p.Abort(0, 0))]
    out += [p.encode(p.Abort(2, reason)) for reason in (0, 1, 2, 4, 5, 6, 7)]
    out += [p.encode(p.AssociateRJ(r, s, 1)) for r in (1, 2) for s in (1, 2, 3)]
    out += [p.encode(ac) for ac in (_ac(rq),)]
    out += [p.encode(dataclasses.replace(rq, protocol_version=v)) for v in (0, 2, 3)]
    out.append(p.encode(dataclasses.replace(rq, application_context="1.2.3")))
    out.append(
        p.encode(
            h.associate_rq(
                contexts=[(f"1.2.3.{i}", ("1.2.840.10008.1.2",)) for i in range(128)],
            )
        )
    )
    return out


def _ac(rq: p.AssociateRQ) -> p.AssociateAC:
    from workers.engine import acse

    answer = acse.negotiate(rq, acse.AcceptorPolicy())
    assert isinstance(answer, p.AssociateAC)
    return answer


_POOL = _pool()


def _raw_pdu(pdu_type: int, body: bytes, declared: int | None) -> bytes:
    length = len(body) if declared is None else declared
    return struct.pack(">BxL", pdu_type, length) + body


@st.composite
def _command_bytes(draw: st.DrawFn) -> bytes:
    """Command sets: valid ones of several kinds, or garbage."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return dimse.encode_command(dimse.c_echo_rq(draw(st.integers(0, 0xFFFF))))
    if choice == 1:
        return dimse.encode_command(h.store_rq(draw(st.integers(0, 0xFFFF))))
    if choice == 2:
        cmd = h.store_rq(1, CommandDataSetType=dimse.NO_DATASET)
        return dimse.encode_command(cmd)
    return draw(st.binary(max_size=64))


@st.composite
def _pdv(draw: st.DrawFn) -> bytes:
    context_id = draw(st.sampled_from([1, 3, 5, 0, 2, 255]))
    control = draw(st.sampled_from([0, 1, 2, 3, 0xFF]))
    data = draw(_command_bytes()) if control & 1 else draw(st.binary(max_size=80))
    length = len(data) + 2
    if draw(st.integers(0, 9)) == 0:
        length = draw(_LENGTHS)
    return struct.pack(">LBB", length, context_id, control) + data


@st.composite
def pdu_stream(draw: st.DrawFn, role: str = "acceptor", cheap: bool = True) -> bytes:
    """A sequence of PDUs: well-formed ones (from a fixed pool when ``cheap``, else
    from the codec's strategies, which cost ~40 ms an example to draw), P-DATA-TFs of
    arbitrary PDVs, and PDUs whose header lies about the type or the length."""
    parts = []
    if role == "acceptor" and draw(st.booleans()):
        parts.append(p.encode(h.associate_rq()))
    elif role == "requestor" and draw(st.booleans()):
        parts.append(draw(st.sampled_from(h.requestor_seeds())))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 4))
        if kind == 0:
            parts.append(draw(st.sampled_from(_POOL)) if cheap else p.encode(draw(pdu_st.pdus())))
        elif kind == 1:
            pdvs = b"".join(draw(st.lists(_pdv(), min_size=0, max_size=3)))
            declared = draw(st.one_of(st.none(), _LENGTHS))
            parts.append(_raw_pdu(p.PDUType.P_DATA_TF, pdvs, declared))
        elif kind == 2:
            pdu_type = draw(st.integers(0, 255))
            body = draw(st.binary(max_size=100))
            declared = draw(st.one_of(st.none(), _LENGTHS))
            parts.append(_raw_pdu(pdu_type, body, declared))
        elif kind == 3:
            parts.append(draw(st.sampled_from(h.acceptor_seeds())))
        else:
            parts.append(draw(st.sampled_from([p.encode(p.ReleaseRQ()), p.encode(p.ReleaseRP())])))
    return b"".join(parts)
