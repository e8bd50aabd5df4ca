"""Fixtures of the receiver integration tests: the REAL process tree.

:class:`Receiver` starts ``pacs-receiver`` (supervisor + ``python -m workers.main``
workers) as a subprocess on 127.0.0.1, port 0 (the port the kernel picked is read
from the "listening on" log line, so there is no free-port race), storing under a tmp
directory, with its log in a file. Every wait is bounded; the ``receiver`` fixture
stops whatever it started with SIGTERM, then SIGKILL, in its finalizer.

Also here: DCMTK lookup (the venv's ``bin`` holds pynetdicom's ``storescu`` apps
with the same names, so only ELF binaries count), synthetic data sets with unique
UIDs, pynetdicom helpers and the comparison of stored files with their sources.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from loadtest.proctree import children
from tests.dcmtk import dcmtk as dcmtk_binary

REPO = Path(__file__).resolve().parents[2]
PACS_RECEIVER = str(Path(sys.executable).with_name("pacs-receiver"))
PID_FILE_ENV = "PACSRX_TEST_PID_FILE"
ASSOC_FILE_ENV = "PACSRX_TEST_ASSOC_FILE"

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"

# pynetdicom streams a C-STORE data set straight from its file when given a path:
# the bytes on the wire are the file's bytes, and a 100 MB file is never in memory.
_config.STORE_SEND_CHUNKED_DATASET = True
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


# ------------------------------------------------------------------------ DCMTK


def dcmtk(name: str) -> str | None:
    """The DCMTK binary ``name`` on PATH (ELF only: not pynetdicom's namesake apps)."""
    return dcmtk_binary(name)


STORESCU = dcmtk("storescu")
ECHOSCU = dcmtk("echoscu")
needs_dcmtk = pytest.mark.skipif(
    STORESCU is None or ECHOSCU is None, reason="DCMTK (storescu, echoscu) not installed"
)


# ------------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


class Receiver:
    """One ``pacs-receiver`` process tree."""

    def __init__(self, base: Path, args: Sequence[str], env: dict[str, str] | None) -> None:
        self.base = base
        self.storage = base / "store"
        self.log_path = base / "receiver.log"
        self.args = list(args)
        self.env = dict(os.environ)
        # The workers import handlers such as tests.receiver.hooks.
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.seen: set[int] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [PACS_RECEIVER, "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--storage", str(self.storage)]
        if "--metrics-port" not in self.args:
            cmd += ["--metrics-port", "0"]
        if "--fsync" not in self.args:
            cmd += ["--fsync", "never"]
        if "--workers" not in self.args:
            cmd += ["--workers", "2"]
        return cmd + self.args

    def start(self, workers_ready: int | None = None) -> Receiver:
        """Start; return once it listens and ``workers_ready`` workers said "ready"."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.base,
                start_new_session=True,  # a signal to the test's group does not reach it
            )
        match = self.wait_log(r"listening on 127\.0\.0\.1:(\d+)", START_TIMEOUT)
        self.port = int(match.group(1))
        count = workers_ready if workers_ready is not None else self.configured_workers()
        self.wait_log_count(r"worker \d+ ready \(pid \d+\)", count, START_TIMEOUT)
        return self

    def configured_workers(self) -> int:
        if "--workers" in self.args:
            return int(self.args[self.args.index("--workers") + 1])
        return 2

    # ----------------------------------------------------------------- log

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"pacs-receiver exited with {self.proc.returncode}; log:\n{self.log()}"
            )

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log, waiting for it."""
        regex = re.compile(pattern)

        def find() -> re.Match[str] | None:
            found = regex.search(self.log())
            if found is None:
                self._check_running()
            return found

        try:
            return wait_for(find, timeout, what=f"log line {pattern!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log()}") from None

    def wait_log_count(self, pattern: str, count: int, timeout: float = 10.0) -> list[str]:
        regex = re.compile(pattern)

        def found() -> list[str] | None:
            lines = regex.findall(self.log())
            if len(lines) < count:
                self._check_running()
                return None
            return lines

        try:
            return wait_for(found, timeout, what=f"{count} x {pattern!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log()}") from None

    def started_pids(self) -> dict[int, list[int]]:
        """Worker index -> pids started for it, in order, from the log."""
        out: dict[int, list[int]] = {}
        for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", self.log()):
            out.setdefault(int(index), []).append(int(pid))
        return out

    def all_worker_pids(self) -> set[int]:
        """Every worker pid ever started, from the log."""
        return {pid for pids in self.started_pids().values() for pid in pids}

    # ----------------------------------------------------------- processes

    def workers(self) -> list[int]:
        """Live worker pids (the supervisor's children)."""
        pids = [pid for pid in children(self.pid) if alive(pid)]
        self.seen.update(pids)
        return pids

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL (also to workers left behind); the exit status."""
        proc = self.proc
        if proc is None:
            return None
        self.workers()
        code: int | None = proc.poll()
        if code is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(10)
        self.kill_leftovers()
        return code

    def kill_leftovers(self) -> list[int]:
        """SIGKILL workers of this tree that outlived the supervisor (by pid)."""
        left = []
        for pid in sorted(self.seen):
            if alive(pid) and _pgid(pid) == self.pid:
                left.append(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return left


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


ReceiverFactory = Callable[..., Receiver]


@pytest.fixture
def receiver_factory(tmp_path: Path) -> Iterator[ReceiverFactory]:
    """``receiver_factory(*flags, env=None, workers_ready=None)`` -> a started Receiver."""
    started: list[Receiver] = []

    def factory(
        *args: str, env: dict[str, str] | None = None, workers_ready: int | None = None
    ) -> Receiver:
        base = tmp_path / f"rx{len(started)}"
        base.mkdir()
        rx = Receiver(base, args, env)
        started.append(rx)
        return rx.start(workers_ready)

    yield factory
    for rx in started:
        rx.stop()


@pytest.fixture
def pid_file(tmp_path: Path) -> Path:
    """The file tests.receiver.hooks.record_pid appends to (via PID_FILE_ENV)."""
    return tmp_path / "pids.txt"


@pytest.fixture
def assoc_file(tmp_path: Path) -> Path:
    """The file tests.receiver.hooks.record_association appends to (ASSOC_FILE_ENV)."""
    return tmp_path / "associations.txt"


def read_pid_records(path: Path) -> list[tuple[int, int, str]]:
    """(worker pid, peer port, calling AE) per line the tests.receiver.hooks wrote."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        pid, port, ae = ([*line.split(" ", 2), "", ""])[:3]
        out.append((int(pid), int(port), ae))
    return out


# -------------------------------------------------------------------- data sets


def make_image(seed: int, *, pixel_bytes: int = 2048, study: str | None = None) -> Dataset:
    """A small CT image with unique UIDs and ``pixel_bytes`` of pixel data."""
    columns = 32
    rows = max(1, pixel_bytes // (2 * columns))
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Receiver"
    ds.PatientID = f"RX{seed:05d}"
    ds.Modality = "CT"
    ds.InstanceNumber = seed + 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = os.urandom(rows * columns * 2)
    ds["PixelData"].VR = "OW"
    return ds


def write_file(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def make_files(directory: Path, count: int, *, prefix: str = "img", **kw: Any) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [
        write_file(make_image(i, **kw), directory / f"{prefix}{i:04d}.dcm") for i in range(count)
    ]


def make_big_file(path: Path, frames: int) -> Path:
    """A multi-frame image of ``frames`` x 1 MB, written without holding it in memory:
    pydicom writes everything but the pixel data, which is appended (the last
    element) as an explicit-length OW value."""
    ds = make_image(0, pixel_bytes=64)
    del ds.PixelData
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    write_file(ds, path)
    size = frames * 512 * 512 * 2
    chunk = os.urandom(512 * 512 * 2)
    with open(path, "ab") as fh:
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little"))
        for _ in range(frames):
            fh.write(chunk)
    return path


def file_digest(path: Path, offset: int = 0) -> str:
    """SHA-256 of a file from ``offset`` on, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def dataset_offset(path: Path) -> int:
    """Where the data set starts in a Part 10 file (after the file meta group)."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    assert head[128:132] == b"DICM", path
    return 144 + int.from_bytes(head[140:144], "little")


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (after the file meta group)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", path
    # (0002,0000) UL, explicit VR LE: tag 4 + VR 2 + length 2 + value 4
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


def stored_files(root: Path) -> dict[str, Path]:
    """SOP Instance UID -> stored file, for every published file under ``root``."""
    return {p.stem: p for p in root.rglob("*.dcm") if ".incoming" not in p.parts}


def incoming_files(root: Path) -> list[Path]:
    incoming = root / ".incoming"
    return sorted(incoming.iterdir()) if incoming.exists() else []


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def assert_same_instance(source: Path, stored: Path) -> None:
    """The stored file holds the source's data set: pydicom reads the same data set
    from both, and the encoded data-set bytes are identical."""
    a = pydicom.dcmread(source)
    b = pydicom.dcmread(stored)
    assert b.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    assert Dataset(b) == Dataset(a)
    assert dataset_bytes(stored) == dataset_bytes(source)


# ------------------------------------------------------------------- pynetdicom


def scu_ae(ae_title: str = "PYNETSCU", *, storage: bool = False, timeout: float = 20.0) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    if storage:
        ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
    return ae


def associate(rx: Receiver, ae: AE, called: str = "PACSRX", **kwargs: Any) -> Any:
    """``ae.associate`` to the receiver; the association also remembers every
    A-ASSOCIATE-RJ PDU received (see :func:`rejection`)."""
    received: list[tuple[int, int, int]] = []

    def on_pdu(event: Any) -> None:
        pdu = event.pdu
        if isinstance(pdu, A_ASSOCIATE_RJ):
            received.append(
                (int(pdu.result or 0), int(pdu.source or 0), int(pdu.reason_diagnostic or 0))
            )

    handlers = [*kwargs.pop("evt_handlers", []), (evt.EVT_PDU_RECV, on_pdu)]
    assoc: Any = ae.associate(rx.host, rx.port, ae_title=called, evt_handlers=handlers, **kwargs)
    assoc.received_rj = received
    return assoc


def rejection(assoc: Any) -> tuple[int, int, int] | None:
    """(result, source, reason) of the A-ASSOCIATE-RJ the receiver answered, or None.

    Read from the PDU as pynetdicom's DUL decoded it, not only from
    ``assoc.is_rejected``: pynetdicom 3.0 reports a rejection that arrives, with the
    connection closing, before its requestor thread got to look (acse.py checks
    ``socket._is_connected`` before reading the queue) as an abort. The supervisor
    answers over-limit associations in microseconds, so on a busy machine that race
    is lost now and then; the wire is the truth."""
    if assoc.is_established:
        return None
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return (rj.result, rj.result_source, rj.diagnostic)
    received = getattr(assoc, "received_rj", [])
    return received[0] if len(received) == 1 else None


def local_port(assoc: Any) -> int:
    """The requestor's local TCP port of a pynetdicom association."""
    return int(assoc.dul.socket.socket.getsockname()[1])


def release(assoc: Any) -> None:
    if assoc.is_established:
        assoc.release()
