"""atheris entry point: the PDU codec (first byte: PDU type) and the DIMSE command
codec (``FUZZ_CODEC=dimse``). See atheris_common.py and README.md."""

from __future__ import annotations

import os
import struct
import sys

from atheris_common import instrumented, main

with instrumented():  # type: ignore[attr-defined]
    from tests.fuzz import harness as h
    from tests.fuzz import strategies as fz
    from workers.engine import dimse

CODEC = os.environ.get("FUZZ_CODEC", "pdu")


def target(data: bytes) -> None:
    if CODEC == "dimse":
        h.run_dimse_decode(data)
        return
    if not data:
        return
    pdu = h.run_pdu_decode(data[0], data[1:])
    if pdu is not None:
        h.run_pdu_roundtrip(pdu)


def seeds() -> list[bytes]:
    if CODEC == "dimse":
        return [
            dimse.encode_command(c)
            for c in (dimse.c_echo_rq(1), h.store_rq(2), dimse.c_find_rq(3, "1.2.3"))
        ]
    out = []
    for wire in fz._POOL:
        pdu_type, length = struct.unpack_from(">BxL", wire)
        out.append(bytes([pdu_type]) + wire[6 : 6 + length])
    return out


if __name__ == "__main__":
    sys.exit(main(target, seeds()))
