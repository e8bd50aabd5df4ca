"""The REAL receiver for the malformed-session corpus, a raw-socket peer, and a
well-behaved pynetdicom sender that stores while the corpus is replayed.

One ``pacs-receiver`` process tree serves the whole module (started once, stopped in
the fixture's finalizer with SIGTERM, then SIGKILL by pid); it runs with short
timeouts (2 s network, 2 s ARTIM) so that timeout-driven answers come quickly. Every
socket is 127.0.0.1, every wait and loop is bounded.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE

from loadtest.proctree import children
from workers.engine import pdu as p

REPO = Path(__file__).resolve().parents[2]
PACS_RECEIVER = str(Path(sys.executable).with_name("pacs-receiver"))
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"

NETWORK_TIMEOUT = 2.0
ARTIM_TIMEOUT = 2.0
#: A generous bound for every protocol answer (the brief: "within 10 s").
ANSWER_BOUND = 10.0
#: An answer that needs no timer must come well before the network timeout could
#: have produced it (an A-ABORT after 2 s of silence is not an answer, it is a give-up).
PROMPT = 1.5

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


# ------------------------------------------------------------------ the receiver


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Receiver:
    base: Path
    #: worker processes, and flags added to the brief's command line
    worker_count: int = 2
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    workers: set[int] = field(default_factory=set)

    @property
    def storage(self) -> Path:
        # Two levels below the base: a "../../x" that escaped would land in base.
        return self.base / "a" / "b" / "store"

    @property
    def log_path(self) -> Path:
        return self.base / "receiver.log"

    def command(self) -> list[str]:
        return [
            PACS_RECEIVER,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage",
            str(self.storage),
            "--metrics-port",
            "0",
            "--workers",
            str(self.worker_count),
            "--network-timeout",
            str(NETWORK_TIMEOUT),
            "--artim-timeout",
            str(ARTIM_TIMEOUT),
            *self.extra_args,
        ]

    def start(self) -> Receiver:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        for attempt in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.base,
                    start_new_session=True,
                )
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:
                text = self.log()
                ready = re.findall(r"worker \d+ ready \(pid \d+\)", text)
                if len(ready) >= self.worker_count and re.search(
                    rf"listening on 127\.0\.0\.1:{self.port}", text
                ):
                    self.workers = self.worker_pids()
                    assert len(self.workers) == self.worker_count, self.log()
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            self.stop()
            if attempt == 2:
                raise AssertionError(f"pacs-receiver did not start; log:\n{self.log()}")
        raise AssertionError("unreachable")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def worker_pids(self) -> set[int]:
        assert self.proc is not None
        return {pid for pid in children(self.proc.pid) if alive(pid)}

    def assert_alive(self) -> None:
        """The supervisor and the very same workers still run (none died, none was
        respawned)."""
        assert self.proc is not None and self.proc.poll() is None, self.log()
        now = self.worker_pids()
        assert self.workers <= now, f"workers {self.workers} -> {now}; log:\n{self.log()[-4000:]}"

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        workers = self.worker_pids() | self.workers if proc.poll() is None else self.workers
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in workers:  # by pid, only ours, only if left behind
            if alive(pid):
                try:
                    if os.getpgid(pid) == proc.pid:
                        os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def rx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    base = tmp_path_factory.mktemp("robustness")
    receiver = Receiver(base).start()
    try:
        yield receiver
    finally:
        receiver.stop()


# ------------------------------------------------------------------ the raw peer


class Closed(Exception):
    """The receiver closed the connection."""


@dataclass
class Answer:
    """What came back: the first PDU (decoded) or None if the connection closed
    without one, and when (seconds after the last byte we sent)."""

    pdu: p.PDU | None
    elapsed: float
    raw_type: int | None = None


class Peer:
    """A raw-socket DICOM peer: hand-built bytes out, PDUs in."""

    def __init__(self, port: int, timeout: float = ANSWER_BOUND) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent_at = time.monotonic()
        self._rx = b""

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent_at = time.monotonic()

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self._rx) < n:
            # Always try once, even past the deadline: an EOF may be waiting.
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise Closed from exc
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError("no answer within the bound") from None
                continue
            if not chunk:
                raise Closed
            self._rx += chunk
        out, self._rx = self._rx[:n], self._rx[n:]
        return out

    def read_pdu(self, bound: float = ANSWER_BOUND) -> Answer:
        """The next PDU, or ``Answer(None, ...)`` once the receiver closes."""
        deadline = self.sent_at + bound
        try:
            pdu_type, length = struct.unpack(">BxL", self._read(6, deadline))
            body = self._read(length, deadline)
        except Closed:
            return Answer(None, time.monotonic() - self.sent_at)
        return Answer(p.decode(pdu_type, body), time.monotonic() - self.sent_at, pdu_type)

    def answers(self, bound: float = ANSWER_BOUND, limit: int = 50) -> list[Answer]:
        """Every PDU until the receiver closes (bounded in time and count)."""
        out = []
        for _ in range(limit):
            answer = self.read_pdu(bound)
            out.append(answer)
            if answer.pdu is None:
                break
        return out


# ---------------------------------------------------------- the well-behaved sender


def make_instance(n: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.10.1415.99.")
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Well^Behaved"
    ds.PatientID = f"WB{n:03d}"
    ds.Modality = "CT"
    ds.InstanceNumber = n + 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = os.urandom(128)
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    ds.file_meta = meta
    return ds


class Sender(threading.Thread):
    """Stores the same 50 small instances over and over (one association per round)
    until stopped; records every status and every failure."""

    def __init__(self, port: int, count: int = 50) -> None:
        super().__init__(name="well-behaved-sender", daemon=True)
        self.port = port
        self.instances = [make_instance(n) for n in range(count)]
        self.stop_event = threading.Event()
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self.rounds = 0

    def fail(self, what: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime()) + f"{time.time() % 1:.3f}"[1:]
        self.failures.append(f"{stamp} round {self.rounds}: {what}")

    def run(self) -> None:
        ae = AE(ae_title="WELLBEHAVED")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
        for _ in range(10_000):  # bounded; stops long before
            if self.stop_event.is_set():
                return
            assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSRX")
            if not assoc.is_established:
                self.fail("association failed")
                time.sleep(0.2)
                continue
            try:
                for ds in self.instances:
                    _reactor_resumed(assoc)
                    status = assoc.send_c_store(ds)
                    code = int(getattr(status, "Status", -1)) if status else -1
                    self.statuses.append(code)
                    if code != 0:
                        self.fail(f"status {code:#06x}")
                    if not assoc.is_established:
                        self.fail("association lost")
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
            self.rounds += 1

    def finish(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "the well-behaved sender did not stop"


def _reactor_resumed(assoc: Any, bound: float = 1.0) -> None:
    """Work around a pynetdicom client race (pydicom/pynetdicom#875, "Received
    unexpected C-STORE service message"): ``send_c_store`` pauses the association's
    reactor by clearing a checkpoint and waiting for ``_is_paused``; right after the
    previous store, that flag is still True from the previous pause (the reactor has
    not yet woken up), so the request goes out, the woken reactor takes the response
    as an unexpected request and drops it, and the store waits for a response that
    never comes (the receiver then rightly aborts the silent peer). Waiting for the
    reactor to resume first closes the window. Seen here under CPU load only."""
    deadline = time.monotonic() + bound
    while getattr(assoc, "_is_paused", False) and time.monotonic() < deadline:
        time.sleep(0.0001)


@pytest.fixture(scope="module")
def sender(rx: Receiver) -> Iterator[Sender]:
    """The well-behaved sender, storing beside every case of the module. When the
    module ends it stops, and must have seen no failure, and the receiver must have
    left no temp file behind (checked here, not by a test that must run last)."""
    thread = Sender(rx.port)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop_event.set()
        thread.join(30)
    assert not thread.is_alive(), "the well-behaved sender did not stop"
    assert not thread.failures, thread.failures[:10]
    assert wait_until(lambda: not incoming(rx.storage), 5.0), incoming(rx.storage)


def stored_files(root: Path) -> list[Path]:
    # .index: the instance index (workers/index), not a stored instance
    return [
        f
        for f in root.rglob("*")
        if f.is_file() and ".incoming" not in f.parts and ".index" not in f.parts
    ]


def incoming(root: Path) -> list[Path]:
    d = root / ".incoming"
    return sorted(d.iterdir()) if d.exists() else []


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def open_and_unanswered(peer: Peer, wait: float) -> bool:
    """True if, for ``wait`` seconds, the receiver neither sent anything on ``peer``
    nor closed it: a probe that something (a timer's cut) did NOT happen early.

    A lower bound cannot be observed without waiting; this one only waits and then
    looks (``MSG_PEEK``: the bytes stay for the next read), so a slow machine makes
    it pass sooner, never fail: it fails only if the receiver acts before ``wait``.
    """
    peer.sock.settimeout(wait)
    try:
        peer.sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    except OSError:
        return False
    return False  # a PDU (peeked) or EOF (b"") came before the wait ran out
