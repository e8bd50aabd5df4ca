#!/usr/bin/env python3
"""Per-call cost of the data plane's per-instance C-STORE functions: compiled core,
pure twin, and today's Python functions they stand in for.

  decode    C-STORE-RQ command set -> checked fields   (dimse.decode_command + validate_command)
  rsp       C-STORE-RSP -> whole P-DATA-TF PDU bytes    (dimse.encode_c_store_rsp + PDU header)
  uid       SOP Instance UID check                      (storage.uids.is_valid_uid_reference)
  filemeta  Part 10 header                              (filemeta.encode_file_meta_reference)

(is_valid_uid and encode_file_meta_prechecked are now the data plane's; the
*_reference functions are the Python code they were.)

Each figure is the best of --repeat timeit runs, in nanoseconds per call, so that
background load on a shared machine inflates it as little as possible; the load
average is printed with the table. Example:

  .venv/bin/python benchmarks/bench_dataplane_calls.py --repeat 7
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers import dataplane
from workers.dataplane import _pure
from workers.engine import dimse
from workers.storage import filemeta, uids

CLASS = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.826.0.1.3680043.8.498.10512846593026283412345678901234567"
TS = "1.2.840.10008.1.2.1"
_HEADER = struct.Struct(">BxLLBB")


def _today_decode(buf: bytearray) -> object:
    cmd = dimse.decode_command(bytes(buf))
    return dimse.validate_command(cmd)


def _today_rsp() -> bytes:
    raw = dimse.encode_c_store_rsp(7, CLASS, INSTANCE, 0)
    n = len(raw)
    return _HEADER.pack(4, n + 6, n + 2, 1, 3) + raw


def _cases(core: object | None) -> dict[str, Callable[[], object]]:
    buf = bytearray(
        dimse.encode_command(dimse.c_store_rq(7, CLASS, INSTANCE, move_originator_ae="MOVESCU"))
    )
    impl, version = filemeta.IMPLEMENTATION_CLASS_UID, filemeta.IMPLEMENTATION_VERSION_NAME
    if core is None:
        return {
            "decode": lambda: _today_decode(buf),
            "rsp": _today_rsp,
            "uid": lambda: uids.is_valid_uid_reference(INSTANCE),
            "filemeta": lambda: filemeta.encode_file_meta_reference(
                CLASS, INSTANCE, TS, source_ae="STORESCU"
            ),
        }
    decode = core.decode_store_rq  # type: ignore[attr-defined]
    rsp = core.encode_store_rsp  # type: ignore[attr-defined]
    uid = core.uid_valid  # type: ignore[attr-defined]
    meta = core.file_meta  # type: ignore[attr-defined]
    return {
        "decode": lambda: decode(buf),
        "rsp": lambda: rsp(1, 7, CLASS, INSTANCE, 0, 16372),
        "uid": lambda: uid(INSTANCE),
        "filemeta": lambda: meta(CLASS, INSTANCE, TS, "STORESCU", impl, version),
    }


def _per_call_ns(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=50_000, help="calls per timing run")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs (the best counts)")
    args = parser.parse_args()
    columns: dict[str, dict[str, Callable[[], object]]] = {"today": _cases(None)}
    columns["pure"] = _cases(_pure)
    compiled = dataplane.compiled()
    if compiled is not None:
        columns["compiled"] = _cases(compiled)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    names = list(columns)
    print(f"{'ns/call':10}" + "".join(f"{n:>10}" for n in names) + "   today/compiled")
    for case in columns["today"]:
        ns = {name: _per_call_ns(columns[name][case], args.number, args.repeat) for name in names}
        ratio = f"{ns['today'] / ns['compiled']:>12.1f}x" if "compiled" in ns else ""
        print(f"{case:10}" + "".join(f"{ns[n]:>10.0f}" for n in names) + ratio)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
