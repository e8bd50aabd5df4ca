"""DCMTK (echoscu, storescu) as the peer of the worker.

Every stored file is compared with its source: pydicom reads the same data set from
both, and when the transfer syntax did not change on the way the encoded data-set
bytes are identical (the worker writes what it received, byte for byte).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

import tests.dcmtk as dcmtk_tools
from workers.engine import events as wevt

from .conftest import (
    DEFLATED,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    WorkerFactory,
    WorkerThread,
    assert_same_instance,
    incoming_files,
    make_files,
    needs_dcmtk,
    stored_files,
)

pytestmark = [pytest.mark.interop, needs_dcmtk]

STORESCU = dcmtk_tools.dcmtk("storescu") or "storescu"  # needs_dcmtk skips without it

TIMEOUT = 60


def run(tool: str, *args: Any) -> subprocess.CompletedProcess[str]:
    """Run DCMTK's ``tool`` (never pynetdicom's script of the same name)."""
    return subprocess.run(
        [dcmtk_tools.require(tool), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def storescu(w: WorkerThread, files: list[Path], *options: Any) -> subprocess.CompletedProcess[str]:
    # -nh: go on after a failed store, so that one failure does not hide the others
    return run("storescu", "-aec", "PACSRX", "-aet", "STORESCU", *options, w.host, w.port, *files)


def check_stored(w: WorkerThread, files: list[Path], *, same_bytes: bool) -> None:
    stored = stored_files(w.root)
    assert len(stored) == len(files)
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert_same_instance(f, stored[uid], same_bytes=same_bytes)
    assert incoming_files(w.root) == []


def test_echoscu(worker: WorkerThread) -> None:
    result = run("echoscu", "-aec", "PACSRX", "--repeat", 3, worker.host, worker.port)
    assert result.returncode == 0, result.stderr
    worker.wait_idle()


def test_echoscu_called_ae_refused(worker_factory: WorkerFactory) -> None:
    w = worker_factory(require_called_ae=True)
    result = run("echoscu", "-aec", "SOMEONE", w.host, w.port)
    assert result.returncode != 0
    assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
    ok = run("echoscu", "-aec", "PACSRX", w.host, w.port)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    ("source_syntax", "option", "same_bytes"),
    [
        (EXPLICIT_LE, "-xe", True),
        (IMPLICIT_LE, "-xi", True),
        (EXPLICIT_BE, "-xb", True),
        (DEFLATED, "-xd", False),  # same data set; the zlib stream may differ
        (EXPLICIT_LE, "-xi", False),  # storescu converts: explicit -> implicit
        (EXPLICIT_LE, "-xd", False),  # storescu converts: explicit -> deflated
    ],
    ids=["explicit", "implicit", "big-endian", "deflated", "to-implicit", "to-deflated"],
)
def test_storescu_transfer_syntaxes(
    worker_factory: WorkerFactory,
    tmp_path: Path,
    source_syntax: str,
    option: str,
    same_bytes: bool,
) -> None:
    w = worker_factory()
    files = make_files(tmp_path / "src", 3, source_syntax)
    result = storescu(w, files, option)
    assert result.returncode == 0, result.stderr
    check_stored(w, files, same_bytes=same_bytes)
    stored = stored_files(w.root)
    expected = {"-xe": EXPLICIT_LE, "-xi": IMPLICIT_LE, "-xb": EXPLICIT_BE, "-xd": DEFLATED}
    for path in stored.values():
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == expected[option]


@pytest.mark.parametrize(
    ("worker_max_pdu", "scu_max_pdu"),
    [(1024 * 1024, 4096), (1024 * 1024, 131072), (4096, 131072), (16384, 4096)],
    ids=["scu-4k", "scu-128k", "worker-4k", "worker-16k-scu-4k"],
)
def test_storescu_pdu_sizes(
    worker_factory: WorkerFactory, tmp_path: Path, worker_max_pdu: int, scu_max_pdu: int
) -> None:
    """Large instances (about 200 KiB) cut into many small or few large P-DATA PDUs."""
    w = worker_factory(max_pdu_length=worker_max_pdu, fsync="always")
    files = make_files(tmp_path / "src", 3, EXPLICIT_LE, rows=320, columns=320)
    result = storescu(w, files, "-xe", "--max-pdu", scu_max_pdu, "--max-send-pdu", scu_max_pdu)
    assert result.returncode == 0, result.stderr
    check_stored(w, files, same_bytes=True)


def test_storescu_many_files_one_association(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    accepted: list[Any] = []
    w = worker_factory(
        evt_handlers=[(wevt.EVT_ACCEPTED, lambda event: accepted.append(event.assoc))],
        fsync="always",
    )
    files = make_files(tmp_path / "src", 50, EXPLICIT_LE)
    result = storescu(w, files, "-xe")
    assert result.returncode == 0, result.stderr
    assert len(accepted) == 1
    check_stored(w, files, same_bytes=True)
    assert w.call(lambda: w.server.instances_stored) == 50


def test_storescu_parallel_associations(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    accepted: list[Any] = []
    w = worker_factory(evt_handlers=[(wevt.EVT_ACCEPTED, lambda event: accepted.append(1))])
    batches = [make_files(tmp_path / f"src{i}", 12, EXPLICIT_LE) for i in range(4)]
    procs = [
        subprocess.Popen(
            [STORESCU, "-aec", "PACSRX", "-xe", w.host, str(w.port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for files in batches
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err
    assert len(accepted) == 4
    check_stored(w, [f for files in batches for f in files], same_bytes=True)
    w.wait_idle()


def test_storescu_user_identity_rejected(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    seen: list[tuple[int, bytes, bytes]] = []

    def check_user(event: Any) -> tuple[bool, bytes | None]:
        seen.append((event.user_id_type, event.primary_field, event.secondary_field))
        return event.primary_field == b"alice" and event.secondary_field == b"secret", None

    w = worker_factory(evt_handlers=[(wevt.EVT_USER_ID, check_user)])
    files = make_files(tmp_path / "src", 1, EXPLICIT_LE)
    bad = storescu(w, files, "-usr", "alice", "-pwd", "wrong")
    assert bad.returncode != 0
    assert stored_files(w.root) == {}
    good = storescu(w, files, "-usr", "alice", "-pwd", "secret")
    assert good.returncode == 0, good.stderr
    assert len(stored_files(w.root)) == 1
    assert seen == [(2, b"alice", b"wrong"), (2, b"alice", b"secret")]


def test_adopted_socket(worker: WorkerThread, tmp_path: Path) -> None:
    """The acceptor's path: a connection accepted elsewhere is handed to the worker."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        files = make_files(tmp_path / "src", 2, EXPLICIT_LE)
        proc = subprocess.Popen(
            [STORESCU, "-aec", "PACSRX", "-xe", "127.0.0.1", str(port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        listener.settimeout(10)
        conn, _ = listener.accept()
    worker.call(worker.server.adopt(conn))
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    check_stored(worker, files, same_bytes=True)
    worker.wait_idle()
