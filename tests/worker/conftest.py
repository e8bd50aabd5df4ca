"""Shared fixtures of the worker tests: a real AssociationServer on 127.0.0.1.

:class:`WorkerThread` runs an :class:`~workers.server.AssociationServer` on its own
uvloop loop in a background thread, listening on 127.0.0.1 port 0, storing under a
tmp directory. Tests talk to it with real peers (DCMTK, pynetdicom, raw sockets) from
the test thread, and may run code inside its loop with :meth:`WorkerThread.call`.

Also here: small synthetic CT/MR data sets written with pydicom (unique UIDs, pixel
data), and helpers to find stored files and compare them with their sources.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import uvloop
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

import tests.dcmtk as dcmtk_tools
from tests.pgserver import PostgresServer
from workers.config import WorkerConfig
from workers.engine import acse, dimse
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, Role
from workers.engine.primitives import (
    NEED_DATA,
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    CommandReceived,
    DataSetReceived,
    Released,
)
from workers.server import AssociationServer
from workers.storage import FileOps, StorageConfig

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"

needs_dcmtk = dcmtk_tools.needs("storescu", "echoscu")


# ------------------------------------------------------- a pynetdicom race, closed


@pytest.fixture(autouse=True, scope="session")
def _pynetdicom_reactor_race() -> Iterator[None]:
    """Close a race in pynetdicom's requestor (pydicom/pynetdicom#875): its reactor
    thread can pass its pause checkpoint just as a ``send_*`` call clears it, then take
    the response to that call off the queue as an "unexpected" message, and the call
    waits for its DIMSE timeout. A receiver as fast as this one on 127.0.0.1 hits the
    window now and then. The reactor polls with ``block=False``, the ``send_*`` calls
    with ``block=True`` while the checkpoint is cleared: while it is cleared, the
    reactor's poll finds nothing."""
    try:
        from pynetdicom.dimse import DIMSEServiceProvider
    except ImportError:
        yield
        return
    original = DIMSEServiceProvider.get_msg

    def get_msg(self: Any, block: bool = False) -> Any:
        if not block and not self.assoc._reactor_checkpoint.is_set():
            return None, None
        return original(self, block)

    DIMSEServiceProvider.get_msg = get_msg
    yield
    DIMSEServiceProvider.get_msg = original


# ----------------------------------------------------------------------- the worker


class WorkerThread:
    """An AssociationServer listening on 127.0.0.1:0 in a thread with its own uvloop."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        evt_handlers: Sequence[Sequence[Any]] | None = None,
        store_ops: FileOps | None = None,
    ) -> None:
        self.config = config
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="worker-loop", daemon=True)
        self._evt_handlers = evt_handlers
        self._store_ops = store_ops
        self.server: AssociationServer
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def root(self) -> Path:
        return Path(self.config.storage.root)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> WorkerThread:
        self._thread.start()

        async def make() -> tuple[str, int]:
            self.server = AssociationServer(
                self.config, evt_handlers=self._evt_handlers, store_ops=self._store_ops
            )
            return await self.server.listen("127.0.0.1", 0)

        self.host, self.port = self.call(make())
        return self

    def call(self, what: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine, or a plain function, in the worker's loop; return its result."""
        if inspect.iscoroutine(what):
            return asyncio.run_coroutine_threadsafe(what, self.loop).result(timeout)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(what())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def bind(
        self, event: Any, handler: Callable[..., Any], args: Sequence[Any] | None = None
    ) -> None:
        self.call(lambda: self.server.bind(event, handler, args))

    def connections(self) -> int:
        return int(self.call(lambda: len(self.server.protocols)))

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until the worker has no connection left (every slot freed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connections() == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"worker still has {self.connections()} connection(s)")

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.close(graceful_timeout=1.0), timeout=15.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10.0)
            if not self._thread.is_alive():
                self.loop.close()


def make_config(root: Path, **overrides: Any) -> WorkerConfig:
    storage = overrides.pop("storage", None) or StorageConfig(root=root, fsync="never")
    fsync = overrides.pop("fsync", None)
    if fsync is not None:
        storage = replace(storage, fsync=fsync)
    defaults: dict[str, Any] = {
        "ae_title": "PACSRX",
        "network_timeout": 10.0,
        "handler_timeout": 5.0,
        "artim_timeout": 5.0,
    }
    defaults.update(overrides)
    return WorkerConfig(storage=storage, **defaults)


WorkerFactory = Callable[..., WorkerThread]


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[WorkerFactory]:
    """``worker_factory(evt_handlers=..., store_ops=..., **WorkerConfig fields)``."""
    started: list[WorkerThread] = []

    def factory(
        *,
        evt_handlers: Sequence[Sequence[Any]] | None = None,
        store_ops: FileOps | None = None,
        root: Path | None = None,
        **overrides: Any,
    ) -> WorkerThread:
        store_root = root or tmp_path / f"store{len(started)}"
        w = WorkerThread(
            make_config(store_root, **overrides), evt_handlers=evt_handlers, store_ops=store_ops
        )
        started.append(w)
        return w.start()

    yield factory
    for w in started:
        w.stop()


@pytest.fixture
def worker(worker_factory: WorkerFactory) -> WorkerThread:
    """A worker with default settings (built-in storage, fsync off)."""
    return worker_factory()


@pytest.fixture
def internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Fails the test if the worker logged an internal error (a bug, not a peer fault)."""
    caplog.set_level(logging.INFO, logger="workers")
    found: list[logging.LogRecord] = []
    yield found
    found.extend(
        r
        for r in caplog.records
        if r.name.startswith("workers") and "internal error" in r.getMessage()
    )
    assert not found, [r.getMessage() for r in found]


# -------------------------------------------------------------------- data sets


def make_image(
    *,
    sop_class: str = CT_IMAGE,
    rows: int = 32,
    columns: int = 32,
    study: str | None = None,
    series: str | None = None,
    seed: int = 0,
) -> Dataset:
    """A small synthetic image with unique UIDs and 16-bit pixel data."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Test^Worker"
    ds.PatientID = f"PID{seed:04d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"ACC{seed}"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = seed + 1
    ds.Modality = "CT" if sop_class == CT_IMAGE else "MR"
    ds.Manufacturer = "pacs-receiver tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = "1.0"
    ds.ImagePositionPatient = [0, 0, seed]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if sop_class == CT_IMAGE:
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
    pixels = bytes((i * 7 + seed) & 0xFF for i in range(rows * columns * 2))
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW"
    return ds


def write_file(ds: Dataset, path: Path, transfer_syntax: str) -> Path:
    """Write ``ds`` as a Part 10 file in ``transfer_syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds = ds.copy()
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def make_files(
    directory: Path,
    count: int,
    transfer_syntax: str = EXPLICIT_LE,
    *,
    sop_class: str = CT_IMAGE,
    rows: int = 32,
    columns: int = 32,
    prefix: str = "img",
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    return [
        write_file(
            make_image(
                sop_class=sop_class,
                rows=rows,
                columns=columns,
                study=study,
                series=series,
                seed=i,
            ),
            directory / f"{prefix}{i:03d}.dcm",
            transfer_syntax,
        )
        for i in range(count)
    ]


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (after the file meta group)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    # (0002,0000) UL, explicit VR LE: tag 4 + VR 2 + length 2 + value 4
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


def stored_files(root: Path) -> dict[str, Path]:
    """SOP Instance UID -> stored file, for every published file under ``root``."""
    out = {}
    for path in root.rglob("*.dcm"):
        if ".incoming" in path.parts:
            continue
        out[path.stem] = path
    return out


def incoming_files(root: Path) -> list[Path]:
    incoming = root / ".incoming"
    return sorted(incoming.iterdir()) if incoming.exists() else []


def assert_same_instance(source: Path, stored: Path, *, same_bytes: bool) -> None:
    """pydicom reads the same data set from both files (and the same data-set bytes
    when the transfer syntax did not change on the way)."""
    a = pydicom.dcmread(source)
    b = pydicom.dcmread(stored)
    assert b.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert b.file_meta.MediaStorageSOPClassUID == a.SOPClassUID
    assert Dataset(b) == Dataset(a)
    if same_bytes:
        assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
        assert dataset_bytes(stored) == dataset_bytes(source)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def walk_outside(root: Path, names: Iterable[str]) -> list[str]:
    """Files under ``root``'s parent whose name contains one of ``names``, outside root."""
    found = []
    for dirpath, _, files in os.walk(root.parent):
        if Path(dirpath).is_relative_to(root):
            continue
        found += [os.path.join(dirpath, f) for f in files if any(n in f for n in names)]
    return found


# ------------------------------------------------------------------- a raw peer


class RawPeer:
    """A requestor built on the engine over a blocking socket, for faults no real peer
    commits: any command set, any bytes, half a PDU, a reset at any point."""

    def __init__(
        self,
        w: WorkerThread,
        contexts: Sequence[acse.Requested] = (),
        *,
        calling_ae: str = "RAWPEER",
        timeout: float = 5.0,
        associate: bool = True,
        max_pdu_length: int = 1024 * 1024,
        async_ops: tuple[int, int] | None = None,
    ) -> None:
        self.sock = socket.create_connection((w.host, w.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.conn = Connection(Role.REQUESTOR, EngineConfig(max_pdu_length=max_pdu_length))
        self.accepted: AssociateAccepted | None = None
        self.rejected: AssociateRejected | None = None
        self.message_id = 0
        if associate:
            rq = acse.build_request(
                "PACSRX",
                calling_ae,
                list(contexts) or [acse.Requested(VERIFICATION)],
                max_pdu_length=max_pdu_length,
                async_ops=p.AsyncOpsWindow(*async_ops) if async_ops else None,
            )
            self.conn.request_association(rq, time.monotonic())
            self.conn.connection_made(time.monotonic())
            self.flush()
            ev = self.wait_for((AssociateAccepted, AssociateRejected, Aborted))
            if isinstance(ev, AssociateAccepted):
                self.accepted = ev
            elif isinstance(ev, AssociateRejected):
                self.rejected = ev

    def context_id(self, abstract_syntax: str) -> int:
        for ctx in self.conn.contexts.values():
            if ctx.abstract_syntax == abstract_syntax:
                return ctx.id
        raise LookupError(abstract_syntax)

    def flush(self) -> None:
        for chunk in self.conn.data_to_send():
            self.sock.sendall(chunk)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_event(self) -> Any:
        deadline = time.monotonic() + self.timeout
        while True:
            ev = self.conn.next_event()
            if self.conn.wants_close:
                self.flush()
                self.sock.close()  # as a real peer does after an A-ABORT or A-RELEASE-RP
            if ev is not NEED_DATA:
                return ev
            if self.sock.fileno() < 0:
                raise ConnectionError("connection closed")
            if time.monotonic() > deadline:
                raise TimeoutError("no event from the worker")
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                self.conn.connection_lost(time.monotonic())
                ev = self.conn.next_event()
                if ev is NEED_DATA:
                    raise ConnectionError("connection closed by the worker")
                return ev
            self.conn.receive_data(data, time.monotonic())

    def wait_for(self, kinds: Any) -> Any:
        for _ in range(10_000):
            ev = self.next_event()
            if isinstance(ev, kinds):
                return ev
        raise AssertionError("too many events")

    def next_message_id(self) -> int:
        self.message_id += 1
        return self.message_id

    def send(self, context_id: int, command: dimse.Command, dataset: bytes | None = None) -> None:
        self.conn.send_message(context_id, command, dataset)
        self.flush()

    def response(self) -> tuple[dimse.Command, bytes | None]:
        ev = self.wait_for((CommandReceived, Aborted))
        if isinstance(ev, Aborted):
            raise ConnectionError(f"aborted: {ev}")
        if not ev.command.has_dataset:
            return ev.command, None
        data = self.wait_for(DataSetReceived)
        return ev.command, data.data

    def echo(self) -> int:
        ctx = self.context_id(VERIFICATION)
        self.send(ctx, dimse.c_echo_rq(self.next_message_id()))
        rsp, _ = self.response()
        return int(rsp.Status or 0)

    def store(
        self,
        sop_class: str,
        sop_instance: str,
        data: bytes,
        context_id: int | None = None,
    ) -> dimse.Command:
        ctx = context_id if context_id is not None else self.context_id(sop_class)
        self.send(ctx, dimse.c_store_rq(self.next_message_id(), sop_class, sop_instance), data)
        return self.response()[0]

    def release(self) -> None:
        self.conn.release(time.monotonic())
        self.flush()
        self.wait_for(Released)

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a crashed peer does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def read_until_closed(self, timeout: float) -> bytes:
        """Everything the worker sends until it closes the connection (this peer does
        not close its side when it sees an A-ABORT: the worker must)."""
        self.sock.settimeout(timeout)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return out
            except TimeoutError:
                break
            if not data:
                return out
            out += data
        raise TimeoutError(f"the worker did not close the connection; got {out!r}")

    def read_pdu(self, timeout: float) -> tuple[int, bytes]:
        """The next PDU's type and body, read raw."""
        self.sock.settimeout(timeout)
        header = self._read_exactly(6)
        pdu_type, length = struct.unpack(">BxL", header)
        return pdu_type, self._read_exactly(length)

    def _read_exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            data = self.sock.recv(n - len(out))
            if not data:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += data
        return out


def encode_plain(ds: Dataset, transfer_syntax: str = EXPLICIT_LE) -> bytes:
    """A data set encoded as a C-STORE sender puts it on the wire."""
    from workers.datasets import encode_dataset

    return encode_dataset(ds, transfer_syntax)


# -------------------------------------------------- the instance index, both backends


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest) -> str | None:
    """The index the services use: None (SQLite under the worker's storage root) or
    a fresh database on the session's real PostgreSQL server (tests/conftest.py)."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.new_database()
