"""Peers and helpers of the load-generator tests.

:class:`RecordingSCP` is an independent Storage SCP: a pynetdicom AE in this process
(its own threads) on 127.0.0.1 and a free port, which keeps every C-STORE data set it
receives, byte for byte, and answers with a status the test chooses. ``pacs-loadtest``
always runs as a subprocess (``python -m loadtest``), under a timeout, so that what is
tested is the command and a hung run fails instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
RUN_TIMEOUT = 60.0

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


@dataclass
class Stored:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class RecordingSCP:
    """pynetdicom Storage + Verification SCP that records what it receives."""

    status: int = 0x0000
    ae_title: str = "RECORDER"
    require_called_aet: bool = False
    maximum_pdu_size: int = 16382
    received: list[Stored] = field(default_factory=list)
    associations: int = 0
    echoes: int = 0
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Any = None

    def start(self) -> RecordingSCP:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = self.require_called_aet
        ae.maximum_pdu_size = self.maximum_pdu_size
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 20
        ae.maximum_associations = 32
        for uid in (CT_IMAGE, "1.2.840.10008.5.1.4.1.1.7"):
            ae.add_supported_context(uid, [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE])
        ae.add_supported_context(VERIFICATION)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        assert server is not None
        self._server = server
        self.port = server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        rq = event.request
        stored = Stored(
            rq.AffectedSOPClassUID,
            rq.AffectedSOPInstanceUID,
            event.context.transfer_syntax,
            rq.DataSet.getvalue(),
        )
        with self._lock:
            self.received.append(stored)
        return self.status

    def _on_echo(self, event: Any) -> int:
        with self._lock:
            self.echoes += 1
        return 0x0000

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self.associations += 1


@pytest.fixture
def scp() -> Iterator[RecordingSCP]:
    server = RecordingSCP().start()
    yield server
    server.stop()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    report: dict[str, Any] | None
    records: list[tuple[str, str, int, str]]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [e.get("PYTHONPATH")])])
    return e


def loadtest(tmp_path: Path, *args: str, timeout: float = RUN_TIMEOUT) -> Result:
    """Run ``python -m loadtest ARGS --json ... --record-uids ...``; parse both."""
    report_path = tmp_path / "report.json"
    record_path = tmp_path / "records.tsv"
    for p in (report_path, record_path):
        if p.exists():
            p.unlink()
    cmd = [sys.executable, "-m", "loadtest", *args]
    if args[:1] not in (("compare",), ("sink",)):
        cmd += ["--json", str(report_path), "--record-uids", str(record_path), "--no-progress"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=tmp_path
    )
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return Result(proc.returncode, proc.stdout, proc.stderr, report, read_records(record_path))


def read_records(path: Path) -> list[tuple[str, str, int, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line:
            continue
        uid, status, nbytes, digest = line.split("\t")
        out.append((uid, status, int(nbytes), digest))
    return out
