"""Real peers for the requestor tests: pynetdicom SCPs, DCMTK storescp, an engine SCP.

Everything binds 127.0.0.1 and a free port, except DCMTK storescp, which cannot and
therefore runs in a loopback-only network namespace. ``python -m tests.worker.peers hash-scp``
runs a pynetdicom storage SCP in its own process that reports each received data set
as a JSON line (length, SHA-256), so that a test can measure its own memory while
sending a large file without the receiver's memory in the figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID

import tests.dcmtk as dcmtk_tools
from loadtest import netns
from workers.engine import acse, dimse
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, Role
from workers.engine.primitives import (
    NEED_DATA,
    Aborted,
    AssociateIndication,
    CommandReceived,
    DataSetReceived,
    Released,
    ReleaseRequested,
)

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
ALL_SYNTAXES = [IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED, JPEG_BASELINE]

VERIFICATION = "1.2.840.10008.1.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PRINT_META = "1.2.840.10008.5.1.1.9"  # Basic Grayscale Print Management Meta SOP Class
BASIC_FILM_SESSION = "1.2.840.10008.5.1.1.1"
DISPLAY_SYSTEM = "1.2.840.10008.5.1.1.40"

UID_ROOT = "1.2.826.0.1.3680043.10.1415.99."

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- data


def make_dataset(
    transfer_syntax: str = EXPLICIT_LE, *, n: int = 1, pixel_bytes: int = 64
) -> Dataset:
    """A small Secondary Capture instance; fake JPEG frames for JPEG baseline."""
    ds = Dataset()
    ds.SOPClassUID = SC_IMAGE
    ds.SOPInstanceUID = f"{UID_ROOT}{n}"
    ds.PatientName = "Test^Requestor"
    ds.PatientID = f"PID{n}"
    ds.StudyInstanceUID = f"{UID_ROOT}1000"
    ds.SeriesInstanceUID = f"{UID_ROOT}2000"
    ds.Modality = "OT"
    ds.Rows = 8
    ds.Columns = min(pixel_bytes // 8, 65535) or 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if transfer_syntax == JPEG_BASELINE:
        frame = b"\xff\xd8\xff\xe0" + bytes(range(256))[: max(pixel_bytes - 6, 2)] + b"\xff\xd9"
        if len(frame) % 2:
            frame += b"\x00"
        ds.add_new(0x7FE00010, "OB", encapsulate([frame]))
        ds["PixelData"].is_undefined_length = True
    else:
        ds.add_new(0x7FE00010, "OB", bytes(i % 251 for i in range(pixel_bytes)))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """The data set as a C-STORE sender puts it on the wire (pydicom, independently)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    fp.is_little_endian = transfer_syntax != EXPLICIT_BE
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if transfer_syntax == DEFLATED:
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
        raw += b"\x00" * (len(raw) & 1)  # PS3.5 A.5: padded to even length
    return raw


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(UID_ROOT + "1")
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return bytes(128) + b"DICM" + fp.getvalue()


def write_part10(path: Path, ds: Dataset, transfer_syntax: str) -> bytes:
    """Write ``ds`` as a Part 10 file; returns the data-set bytes it holds."""
    raw = encode(ds, transfer_syntax)
    path.write_bytes(
        file_meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), transfer_syntax) + raw
    )
    return raw


def write_big_part10(path: Path, size: int, n: int = 50) -> tuple[str, str]:
    """A Part 10 file with ``size`` bytes of pixel data written in 1 MiB pieces.

    Returns (SOP instance UID, SHA-256 of the data set); the content is never in
    memory whole, so writing it does not inflate the test process.
    """
    ds = make_dataset(EXPLICIT_LE, n=n, pixel_bytes=8)
    del ds["PixelData"]
    head = encode(ds, EXPLICIT_LE) + b"\xe0\x7f\x10\x00OB\x00\x00" + size.to_bytes(4, "little")
    digest = hashlib.sha256(head)
    block = hashlib.sha512(b"seed").digest() * (1024 * 1024 // 64)
    with open(path, "wb") as f:
        f.write(file_meta_bytes(SC_IMAGE, str(ds.SOPInstanceUID), EXPLICIT_LE))
        f.write(head)
        left = size
        i = 0
        while left:
            piece = block[: min(left, len(block))]
            piece = i.to_bytes(8, "little") + piece[8:] if len(piece) >= 8 else piece
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
            i += 1
    return str(ds.SOPInstanceUID), digest.hexdigest()


# ----------------------------------------------------------------- pynetdicom


@dataclass
class Received:
    """One C-STORE a pynetdicom SCP received."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes
    move_originator_ae: str | None = None
    move_originator_id: int | None = None
    calling_ae: str = ""


@dataclass
class PynetdicomSCP:
    """A pynetdicom AE serving on 127.0.0.1 in this process (its own threads)."""

    ae_title: str = "PYSCP"
    require_called_aet: bool = False
    maximum_pdu_size: int = 16382
    handlers: list[Any] = field(default_factory=list)
    storage_syntaxes: list[str] = field(default_factory=lambda: list(ALL_SYNTAXES))
    received: list[Received] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    port: int = 0
    _server: Any = None

    def start(self) -> PynetdicomSCP:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = self.require_called_aet
        ae.maximum_pdu_size = self.maximum_pdu_size
        ae.network_timeout = 10
        ae.acse_timeout = 10
        ae.dimse_timeout = 10
        for uid in (VERIFICATION, PATIENT_ROOT_FIND, STUDY_ROOT_FIND, PATIENT_ROOT_MOVE):
            ae.add_supported_context(uid, ALL_SYNTAXES[:3])
        ae.add_supported_context(PATIENT_ROOT_GET, ALL_SYNTAXES[:3])
        for uid in (SC_IMAGE, CT_IMAGE):
            # scp_role: accept the requestor acting as Storage SCP (C-GET sub-operations)
            ae.add_supported_context(uid, self.storage_syntaxes, scu_role=True, scp_role=True)
        for uid in (PRINT_META, DISPLAY_SYSTEM):
            ae.add_supported_context(uid, ALL_SYNTAXES[:3])
        ae.add_requested_context(SC_IMAGE, [EXPLICIT_LE, IMPLICIT_LE])
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), *self.handlers]
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        assert server is not None
        self._server = server
        self.port = server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> PynetdicomSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_store(self, event: Any) -> int:
        rq = event.request
        self.received.append(
            Received(
                rq.AffectedSOPClassUID,
                rq.AffectedSOPInstanceUID,
                event.context.transfer_syntax,
                rq.DataSet.getvalue(),
                rq.MoveOriginatorApplicationEntityTitle,
                rq.MoveOriginatorMessageID,
                event.assoc.requestor.ae_title,
            )
        )
        return 0x0000


# --------------------------------------------------------------- hash-scp process


@contextlib.contextmanager
def hash_scp_process(max_pdu: int = 0) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Run ``hash-scp`` in a child process; yields (port, process)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.worker.peers", "hash-scp", str(max_pdu)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        yield int(json.loads(line)["port"]), proc
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _hash_scp_main(max_pdu: int) -> None:
    from pynetdicom import AE, evt

    def on_store(event: Any) -> int:
        data = event.request.DataSet.getvalue()
        print(
            json.dumps(
                {
                    "sop_instance": event.request.AffectedSOPInstanceUID,
                    "length": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            ),
            flush=True,
        )
        return 0

    ae = AE(ae_title="HASHSCP")
    ae.maximum_pdu_size = max_pdu
    ae.add_supported_context(SC_IMAGE, ALL_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    # Exit with the parent: stdin is not used, so poll the parent's pid.
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.2)


# ------------------------------------------------------------------- storescp


@contextlib.contextmanager
def storescp(out_dir: Path, ae_title: str = "STORESCP") -> Iterator[int]:
    """DCMTK storescp, bit-preserving, all transfer syntaxes; yields its port.

    storescp has no bind option and listens on every interface, so it runs only in a
    network namespace that has nothing but ``lo`` (:mod:`loadtest.netns`): the calling
    thread is in that namespace for the whole ``with`` body, so connect to 127.0.0.1
    from this thread (not from threads started before). Without the namespace (not
    root) the test is skipped, never run with storescp outside.
    """
    exe = dcmtk_tools.require("storescp")
    why_not = netns.unavailable()
    if why_not:
        pytest.skip(f"DCMTK storescp listens on all interfaces: {why_not}")
    with netns.loopback_namespace():
        port = free_port()
        env = dict(os.environ, TCP_NODELAY="1")
        proc = subprocess.Popen(
            [exe, "+B", "+xa", "-aet", ae_title, "-od", str(out_dir), "-dhl", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(f"storescp exited: {err}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()


# ------------------------------------------------------------- engine acceptor


Behaviour = Callable[["EngineSCPConnection", dimse.Command, bytes | None, int], None]


class EngineSCPConnection:
    """One association of :class:`EngineSCP`, driven by plain callbacks."""

    def __init__(self, scp: EngineSCP, reader: asyncio.StreamReader, writer: Any) -> None:
        self.scp = scp
        self.reader = reader
        self.writer = writer
        self.conn = Connection(Role.ACCEPTOR, scp.config or EngineConfig(max_pdu_length=0))

    def send(self, context_id: int, command: dimse.Command, data: bytes | None = None) -> None:
        self.conn.send_message(context_id, command, data)
        self.flush()

    def flush(self) -> None:
        for chunk in self.conn.data_to_send():
            self.writer.write(bytes(chunk))
        if self.conn.wants_close:
            self.writer.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.conn.connection_made(loop.time())
        pending: dimse.Command | None = None
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.conn.connection_lost(loop.time())
                    return
                self.conn.receive_data(data, time.monotonic())
                while True:
                    ev = self.conn.next_event()
                    if ev is NEED_DATA:
                        break
                    if isinstance(ev, AssociateIndication):
                        answer = acse.negotiate(
                            ev.request,
                            acse.AcceptorPolicy(),
                            acse.Extended(async_ops=self.scp.grant),
                        )
                        if isinstance(answer, p.AssociateAC):
                            self.conn.accept(answer, time.monotonic())
                        if self.scp.stall:  # accept, then never read again
                            self.flush()
                            await asyncio.Event().wait()
                    elif isinstance(ev, CommandReceived):
                        self.scp.message_ids.append(ev.command.MessageID)
                        if ev.command.has_dataset:
                            pending = ev.command
                        else:
                            self.scp.behaviour(self, ev.command, None, ev.context_id)
                    elif isinstance(ev, DataSetReceived):
                        assert pending is not None
                        self.scp.behaviour(self, pending, ev.data, ev.context_id)
                        pending = None
                    elif isinstance(ev, ReleaseRequested):
                        self.scp.ended.append(ev)
                        self.conn.release_response(time.monotonic())
                    elif isinstance(ev, Aborted | Released):
                        self.scp.ended.append(ev)
                self.flush()
        finally:
            self.writer.close()


class EngineSCP:
    """An acceptor built on our own engine, for behaviours no real SCP has on demand:
    granting an async ops window, answering out of order, vanishing mid-operation."""

    def __init__(
        self,
        behaviour: Behaviour,
        grant: p.AsyncOpsWindow | None = None,
        config: EngineConfig | None = None,
        stall: bool = False,
    ) -> None:
        self.behaviour = behaviour
        self.grant = grant
        self.config = config
        self.stall = stall
        self.message_ids: list[int | None] = []
        self.ended: list[Any] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> EngineSCP:
        async def serve(reader: asyncio.StreamReader, writer: Any) -> None:
            # cancelled when the test's loop shuts down: end quietly
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await EngineSCPConnection(self, reader, writer).run()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._server.wait_closed()


def threaded(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


if __name__ == "__main__":
    if sys.argv[1:2] == ["hash-scp"]:
        _hash_scp_main(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    else:
        raise SystemExit(f"unknown command {sys.argv[1:]}")
