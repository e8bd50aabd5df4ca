"""Test doubles for the metrics tests: a fake association protocol, a fake aggregator
socket whose reading the test controls, and a way to add up delta records."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from metrics import wire as w


class FakeConnection:
    """What the emitter reads of an engine Connection."""

    def __init__(self, calling: str | None, called: str) -> None:
        self.request = (
            SimpleNamespace(calling_ae=calling, called_ae=called) if calling is not None else None
        )
        self.pdus_received = [0] * 8
        self.pdus_sent = [0] * 8
        self.bytes_received = 0
        self.bytes_sent = 0


class FakeProtocol:
    """What the emitter reads of an AssociationProtocol (hashable, like the real one)."""

    def __init__(self, calling: str | None = "MODALITY", called: str = "PACSRX") -> None:
        self.conn = FakeConnection(calling, called)
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title=calling or ""))

    def pdu(self, direction: int, pdu_type: int, nbytes: int) -> None:
        if direction == 0:
            self.conn.pdus_received[pdu_type] += 1
            self.conn.bytes_received += nbytes
        else:
            self.conn.pdus_sent[pdu_type] += 1
            self.conn.bytes_sent += nbytes


def store_op(sop_class: str = "1.2.840.10008.5.1.4.1.1.2") -> Any:
    return SimpleNamespace(command=SimpleNamespace(AffectedSOPClassUID=sop_class))


def store_result(status: int = 0, nbytes: int = 1000) -> Any:
    return SimpleNamespace(status=status, bytes_written=nbytes)


@contextmanager
def short_tmpdir() -> Iterator[str]:
    """A directory whose paths fit in a unix socket address (108 bytes)."""
    path = tempfile.mkdtemp(prefix="pm", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Sink:
    """A fake aggregator: a listening unix socket; the test decides when to read."""

    def __init__(self, path: str, rcvbuf: int | None = None) -> None:
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.rcvbuf = rcvbuf
        self.conns: list[socket.socket] = []
        self.decoders: dict[socket.socket, w.FrameDecoder] = {}
        self.records: list[w.Record] = []
        self.per_conn: dict[int, list[w.Record]] = collections.defaultdict(list)
        self.stats = w.DecodeStats()

    def accept(self) -> int:
        n = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return n
            conn.setblocking(False)
            if self.rcvbuf:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            self.conns.append(conn)
            self.decoders[conn] = w.FrameDecoder()
            n += 1

    def read(self, limit: int | None = None) -> int:
        """Read what is there (at most ``limit`` bytes per connection); return bytes."""
        self.accept()
        total = 0
        for i, conn in enumerate(self.conns):
            got = 0
            while limit is None or got < limit:
                want = 65536 if limit is None else min(65536, limit - got)
                try:
                    data = conn.recv(want)
                except (BlockingIOError, OSError):
                    break
                if not data:
                    break
                got += len(data)
                for payload in self.decoders[conn].feed(data):
                    records = w.decode_payload(payload, self.stats)
                    self.records += records
                    self.per_conn[i] += records
            total += got
        return total

    def close_connections(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns = []

    def close(self) -> None:
        self.close_connections()
        self.listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def totals(records: Iterable[w.Record]) -> collections.Counter[tuple[Any, ...]]:
    """Delta records added up by key; snapshots and hellos left out."""
    out: collections.Counter[tuple[Any, ...]] = collections.Counter()
    for r in records:
        if isinstance(r, w.CStore):
            key = (r.calling_ae, r.called_ae, r.sop_class, r.status)
            out[("cstore", *key)] += sum(r.buckets)
            out[("cstore_bytes", *key)] += r.nbytes
        elif isinstance(r, w.Storage):
            out[("storage", r.op)] += sum(r.buckets)
        elif isinstance(r, w.Connections):
            out[("connections",)] += r.opened
        elif isinstance(r, w.Hello | w.Process | w.Gauges):
            continue
        else:
            fields = [getattr(r, f) for f in r.__slots__]
            out[(type(r).__name__.lower(), *fields[:-1])] += fields[-1]
    return +out


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``predicate()`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
