"""The index survives SIGKILL: what was stored but not indexed is indexed at the
next start, on both backends.

The real process tree stores instances sent by DCMTK ``storescu``; then every process
of it is SIGKILLed at once (workers hold records their writer thread had not yet
written: the batch linger is 50 ms). To make "stored but not indexed" certain rather
than likely, the test also deletes some rows, and one stored file (a record whose file
is gone). A new receiver on the same store must, before it accepts anything, have a
present record with the right digest for every file, and the deleted file's record
marked missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.pgserver import PostgresServer
from workers.index import open_index
from workers.index.digest import dataset_digest

from .conftest import STORESCU, Receiver, ReceiverFactory, make_files, needs_dcmtk, stored_files

pytestmark = [pytest.mark.interop, needs_dcmtk]


@pytest.fixture(params=["sqlite", "postgresql"])
def index_flag(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return "sqlite"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.new_database()


def storescu(rx: Receiver, files: list[Path]) -> subprocess.CompletedProcess[str]:
    assert STORESCU is not None
    return subprocess.run(
        [STORESCU, "-aet", "KILLTEST", "-aec", "PACSRX", rx.host, str(rx.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def kill_tree(rx: Receiver) -> None:
    """SIGKILL the supervisor and its workers at once: nothing gets to flush."""
    pids = [*rx.workers(), rx.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rx.wait(20)
    rx.kill_leftovers()


def restart(rx: Receiver) -> Receiver:
    """A new receiver on the same store (its own log: the old one names the old port)."""
    rx.log_path.rename(rx.log_path.with_suffix(".first.log"))
    again = Receiver(rx.base, rx.args, None)
    again.start()
    return again


def check_index(rx: Receiver, index_flag: str, gone_uid: str | None) -> None:
    target = "" if index_flag == "sqlite" else index_flag
    node = "" if index_flag == "sqlite" else "node-1"
    index = open_index(target, str(rx.storage), node=node)
    try:
        stored = stored_files(rx.storage)
        assert stored
        for uid, path in stored.items():
            rec = index.get(uid)
            assert rec is not None, f"{uid} stored, not indexed"
            assert rec.state == "present"
            assert rec.path == path.relative_to(rx.storage).as_posix()
            assert (rec.size, rec.digest) == dataset_digest(str(path))
        present = index.select("IMAGE")
        assert {r.sop_instance_uid for r in present} == set(stored)
        if gone_uid is not None:
            rec = index.get(gone_uid)
            assert rec is not None and rec.state == "missing"
    finally:
        index.close()


def test_sigkill_between_storing_and_indexing(
    receiver_factory: ReceiverFactory, index_flag: str, tmp_path: Path
) -> None:
    rx = receiver_factory("--index", index_flag, "--index-node", "node-1")
    files = make_files(tmp_path / "src", 30)
    result = storescu(rx, files)
    assert result.returncode == 0, result.stderr
    kill_tree(rx)
    stored = stored_files(rx.storage)
    assert len(stored) == len(files)  # every acknowledged instance is on disk
    # Certain rather than likely: rows lost, and a file gone.
    target = "" if index_flag == "sqlite" else index_flag
    index = open_index(target, str(rx.storage), node="node-1")
    uids = sorted(stored)
    try:
        with index._write_lock, index._transaction(index._writer_conn()) as cur:
            for uid in uids[:10]:
                cur.execute(index._sql("DELETE FROM instances WHERE sop_instance_uid = ?"), (uid,))
        index.add_many([])  # nothing: still usable
        known = index.get(uids[-1])
    finally:
        index.close()
    gone = stored[uids[-1]]
    os.unlink(gone)
    again = restart(rx)
    try:
        again.wait_log(r"index \w+: 29 file\(s\); indexed \d+", 30)
        check_index(again, index_flag, uids[-1] if known is not None else None)
        # And it goes on indexing what it receives.
        more = make_files(tmp_path / "more", 3, prefix="more")
        assert storescu(again, more).returncode == 0
        again.stop()
        check_index(again, index_flag, None)
    finally:
        again.stop()


def test_worker_killed_mid_run_loses_no_record(
    receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    """SIGKILL one worker while instances stream in; after a restart every file that
    was published (acknowledged or not) has its record."""
    rx = receiver_factory("--workers", "2")
    files = make_files(tmp_path / "src", 40)
    halves = [files[:20], files[20:]]
    results: list[subprocess.CompletedProcess[str]] = []
    senders = [
        threading.Thread(target=lambda part=part: results.append(storescu(rx, part)))
        for part in halves
    ]
    for t in senders:
        t.start()
    deadline = time.monotonic() + 60
    while len(stored_files(rx.storage)) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = rx.workers()[0]
    os.kill(victim, signal.SIGKILL)
    for t in senders:
        t.join(150)
    rx.stop()
    again = restart(rx)
    try:
        again.wait_log(r"index \w+: \d+ file\(s\)", 30)
        check_index(again, "sqlite", None)
    finally:
        again.stop()


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    from .conftest import PACS_RECEIVER

    return subprocess.run(
        [PACS_RECEIVER, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "value",
    ["bogus", "mysql://x", "postgresql://pacs@/nodb?host=/nonexistent-socket-dir"],
)
def test_unusable_index_exits_2_with_one_line(value: str, tmp_path: Path) -> None:
    result = _run("--index", value, "--storage", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pacs-receiver: error: --index"), lines[0]


def test_newer_index_schema_exits_2(tmp_path: Path) -> None:
    store = tmp_path / "store"
    index = open_index(None, str(store))
    with index._write_lock, index._transaction(index._writer_conn()) as cur:
        cur.execute("UPDATE schema_version SET version = 999")
    index.close()
    result = _run("--storage", str(store), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "newer" in result.stderr, result.stderr
