#!/usr/bin/env python3
"""CPU per C-STORE of the worker's hot path, in process, without a network.

An :class:`~workers.association.AssociationProtocol` of a real
:class:`~workers.server.AssociationServer` (built-in storage, telemetry counting but
not connected, its timed file ops) is fed the bytes a requestor engine produces for
N C-STOREs of a synthetic instance (loadtest's payload), through get_buffer /
buffer_updated in reads of up to --read bytes, as uvloop would; its responses go to a
fake transport. Reports user and system CPU per instance (getrusage). What it leaves
out is the socket: recv/send/epoll and TCP_QUICKACK.

  .venv/bin/python benchmarks/bench_hot_path.py --size 8k --count 20000 [--profile out.prof]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import resource
import shutil
import subprocess
import tempfile
from typing import Any

from loadtest.payload import UidSource, build_template
from loadtest.units import parse_size
from workers.config import WorkerConfig
from workers.engine import dimse
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, Role
from workers.engine.primitives import NEED_DATA
from workers.server import AssociationServer
from workers.storage import StorageConfig
from workers.telemetry import Telemetry

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class FakeTransport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def writelines(self, chunks: Any) -> None:
        for c in chunks:
            self.written += len(c)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 11112)}.get(
            name, default
        )

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool:
        return False


def requestor_stream(size: int, count: int, pdu: int = 0) -> tuple[bytes, list[list[bytes]]]:
    """(association request bytes, per-instance message bytes) from a requestor engine
    that sends P-DATA-TF PDUs of at most ``pdu`` bytes (0: the acceptor's maximum)."""
    rq = Connection(Role.REQUESTOR, EngineConfig(max_send_pdu_length=pdu))
    req = p.AssociateRQ(
        called_ae="PACSRX",
        calling_ae="BENCH",
        contexts=(p.PresentationContextRQ(1, CT, (EXPLICIT_LE,)),),
        user_info=p.UserInformation(max_length=1024 * 1024, implementation_class_uid="1.2.3"),
    )
    rq.request_association(req, 0.0)
    rq.connection_made(0.0)
    assoc = b"".join(bytes(x) for x in rq.data_to_send())
    ac = p.AssociateAC(
        "PACSRX",
        "BENCH",
        (p.PresentationContextAC(1, p.ContextResult.ACCEPTANCE, EXPLICIT_LE),),
        p.UserInformation(max_length=1024 * 1024, implementation_class_uid="1.2.3"),
    )
    raw_ac = p.encode(ac)
    rq.receive_data(raw_ac, 0.0)
    while rq.next_event() is not NEED_DATA:
        pass
    uids = UidSource("1", 1)
    template = build_template(size, CT, EXPLICIT_LE, uids)
    messages = []
    for i in range(count):
        uid = uids.next()
        rq.send_command(1, dimse.c_store_rq(i % 65535 + 1, CT, uid))
        data = template.data(uid)
        rq.send_dataset(1, data)
        messages.append([bytes(x) for x in rq.data_to_send()])
    return assoc, messages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="8k")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--read", type=int, default=256 * 1024, help="bytes per read")
    ap.add_argument(
        "--pdu",
        type=parse_size,
        default=0,
        help="P-DATA-TF size the sender uses, e.g. 16k or 128k (default: our maximum, 1 MiB)",
    )
    ap.add_argument("--profile")
    ap.add_argument(
        "--callgrind",
        action="store_true",
        help="under valgrind --tool=callgrind --instr-atstart=no: instrument only the"
        " measured loop (callgrind_control -i on/off), for instruction counts",
    )
    ap.add_argument("--no-telemetry", action="store_true")
    ap.add_argument(
        "--index",
        action="store_true",
        help="with the instance index (SQLite under the storage root, digest on); the"
        " writer thread's CPU counts (RUSAGE_SELF), and its queue is drained before the"
        " end of the measurement",
    )
    ap.add_argument(
        "--storage-parent",
        default="/tmp",
        help="where the storage root is made; a fresh top-level directory ('/') keeps"
        " ext4 inode allocation clear of other jobs' recent deletions",
    )
    args = ap.parse_args()
    size = parse_size(args.size)
    assoc, messages = requestor_stream(size, args.count, args.pdu)
    root = tempfile.mkdtemp(prefix="bench-hot-", dir=args.storage_parent)

    async def run() -> None:
        tel = None if args.no_telemetry else Telemetry("/nonexistent/metrics.sock", worker_id=0)
        cfg = WorkerConfig(storage=StorageConfig(root=root, fsync="never", digest=args.index))
        server = AssociationServer(
            cfg, telemetry=tel, store_ops=tel.file_ops() if tel is not None else None
        )
        if args.index:
            from workers.main import open_index_writer

            open_index_writer(server, "", "")
        proto = server._factory()
        proto.connection_made(FakeTransport())  # type: ignore[arg-type]

        def feed(data: bytes) -> None:
            mv = memoryview(data)
            while mv:
                buf = proto.get_buffer(-1)
                n = min(len(buf), len(mv), args.read)
                buf[:n] = mv[:n]
                buf.release()
                proto.buffer_updated(n)
                mv = mv[n:]

        feed(assoc)
        warm = min(1000, len(messages) // 4)
        for parts in messages[:warm]:
            for part in parts:
                feed(part)
        prof = cProfile.Profile() if args.profile else None
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        if prof:
            prof.enable()
        if args.callgrind:
            subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True)
        for parts in messages[warm:]:
            for part in parts:
                feed(part)
        if server.index_writer is not None:
            assert server.index_writer.flush(600)
        if args.callgrind:
            subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True)
        if prof:
            prof.disable()
            prof.dump_stats(args.profile)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        n = len(messages) - warm
        assert server.instances_stored == len(messages), server.instances_stored
        u = (r1.ru_utime - r0.ru_utime) / n * 1e6
        s = (r1.ru_stime - r0.ru_stime) / n * 1e6
        from workers import dataplane

        print(
            f"{args.size} ({dataplane.CORE}){' index' if args.index else ''}: "
            f"user {u:6.1f} us  sys {s:6.1f} us"
            f"  total {u + s:6.1f} us per instance (n={n})"
        )
        if server.index_writer is not None:
            writer = server.index_writer
            assert writer.written == len(messages), (writer.written, writer.dropped)
            writer.close()
            writer.index.close()
        server.io_pool.shutdown(wait=False)

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
