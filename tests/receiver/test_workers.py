"""Several worker processes: concurrent associations are spread across them, and
parallel DCMTK senders get every instance stored intact."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    ASSOC_FILE_ENV,
    ECHOSCU,
    PID_FILE_ENV,
    STORESCU,
    ReceiverFactory,
    alive,
    assert_same_instance,
    associate,
    incoming_files,
    local_port,
    make_files,
    needs_dcmtk,
    read_pid_records,
    release,
    scu_ae,
    sop_uid,
    stored_files,
    wait_for,
)

pytestmark = pytest.mark.interop

ECHO_HOOK = "EVT_C_ECHO=tests.receiver.hooks:record_pid"
ASSOC_HOOK = "EVT_ESTABLISHED=tests.receiver.hooks:record_association"


def test_associations_spread_across_workers(
    receiver_factory: ReceiverFactory, pid_file: Path
) -> None:
    rx = receiver_factory(
        "--workers", "3", "--handler", ECHO_HOOK, env={PID_FILE_ENV: str(pid_file)}
    )
    workers = set(rx.workers())
    assert len(workers) == 3 and rx.pid not in workers

    # 12 associations open at the same time, each sending a C-ECHO.
    count = 12
    assocs: list[Any] = [None] * count
    statuses: list[int | None] = [None] * count
    ports: list[int] = [0] * count
    opened = threading.Barrier(count + 1, timeout=60)

    def one(i: int) -> None:
        try:
            assoc = associate(rx, scu_ae(f"SCU{i:02d}"))
            assocs[i] = assoc
            if assoc.is_established:
                ports[i] = local_port(assoc)
                statuses[i] = assoc.send_c_echo().Status
        finally:
            opened.wait()  # hold every association open until all are up

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    opened.wait()
    try:
        assert statuses == [0x0000] * count
        records = read_pid_records(pid_file)
        assert len(records) == count
        served = {port: pid for pid, port, _ae in records}
        assert set(served) == set(ports)
        # Every echo was answered by a worker (not the supervisor), and the 12
        # simultaneous associations went to more than one worker: least-loaded
        # placement gives each of the 3 workers some.
        assert set(served.values()) <= workers
        per_worker = {pid: list(served.values()).count(pid) for pid in workers}
        assert len([n for n in per_worker.values() if n]) > 1, per_worker
        assert all(n >= 2 for n in per_worker.values()), per_worker
    finally:
        for assoc in assocs:
            if assoc is not None:
                release(assoc)
        for t in threads:
            t.join(10)
    assert rx.stop() == 0


@needs_dcmtk
def test_parallel_storescu_every_file_stored_intact(
    receiver_factory: ReceiverFactory, tmp_path: Path, pid_file: Path, assoc_file: Path
) -> None:
    rx = receiver_factory(
        "--workers",
        "3",
        "--handler",
        ECHO_HOOK,
        "--handler",
        ASSOC_HOOK,
        env={PID_FILE_ENV: str(pid_file), ASSOC_FILE_ENV: str(assoc_file)},
    )
    senders, per_sender = 4, 20
    sources = [
        make_files(tmp_path / f"src{s}", per_sender, prefix=f"s{s}-", pixel_bytes=4096)
        for s in range(senders)
    ]
    assert STORESCU is not None and ECHOSCU is not None
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", f"SENDER{s}", "-aec", "PACSRX", rx.host, str(rx.port), *files],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for s, files in enumerate(sources)
    ]
    # Echoes from DCMTK meanwhile, answered by the record_pid hook.
    echoes = [
        subprocess.Popen(
            [ECHOSCU, "-aec", "PACSRX", rx.host, str(rx.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(6)
    ]
    for proc in [*procs, *echoes]:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert proc.returncode == 0, out

    stored = stored_files(rx.storage)
    assert len(stored) == senders * per_sender
    for files in sources:
        for source in files:
            assert_same_instance(source, stored[sop_uid(source)])
    assert incoming_files(rx.storage) == []
    # Which worker served which association: all were served by the workers, and
    # more than one worker served them (least-loaded, equal loads taking turns).
    workers = set(rx.workers())
    echoes_served = read_pid_records(pid_file)
    assert len(echoes_served) == 6
    assert {pid for pid, _port, _ae in echoes_served} <= workers
    associations = read_pid_records(assoc_file)
    assert len(associations) == senders + 6
    assert {ae for _pid, _port, ae in associations} == {
        *(f"SENDER{s}" for s in range(senders)),
        "ECHOSCU",
    }
    served_by = {pid for pid, _port, _ae in associations}
    assert served_by <= workers and len(served_by) > 1, associations
    # Every worker is still the one that was started: nobody crashed.
    assert all(len(pids) == 1 for pids in rx.started_pids().values())
    assert rx.stop() == 0
    wait_for(lambda: not any(alive(pid) for pid in rx.seen), 10, what="workers gone")
