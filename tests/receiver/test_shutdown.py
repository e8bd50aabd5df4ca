"""SIGTERM is a graceful stop: no new associations, but a store in flight completes
(Success, the instance on disk intact) and the whole tree exits 0 in time."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from .conftest import (
    ECHOSCU,
    ReceiverFactory,
    alive,
    associate,
    dataset_offset,
    file_digest,
    incoming_files,
    make_big_file,
    scu_ae,
    stored_files,
    wait_for,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

GRACEFUL = 30.0
FRAMES = 400  # x 512 KB: a 200 MB instance


def test_sigterm_completes_the_store_in_flight(
    receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    # A small maximum PDU makes pynetdicom send the 200 MB in ~50 000 PDUs: seconds.
    rx = receiver_factory(
        "--max-pdu", "4096", "--graceful-timeout", str(GRACEFUL), "--workers", "2"
    )
    source = make_big_file(tmp_path / "big.dcm", FRAMES)
    size = source.stat().st_size
    assert size > 200_000_000
    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)

    result: dict[str, Any] = {}

    def send() -> None:
        try:
            ae = scu_ae("BIGSENDER", storage=True, timeout=60)
            assoc = associate(rx, ae)
            result["established"] = assoc.is_established
            if assoc.is_established:
                result["status"] = assoc.send_c_store(source).Status
                assoc.release()
                result["released"] = assoc.is_released
        except Exception as exc:  # reported by the asserts below
            result["error"] = repr(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()

    def receiving() -> int:
        parts = incoming_files(rx.storage)
        return max((p.stat().st_size for p in parts), default=0)

    # The worker streams the data set into .incoming: SIGTERM when 10% has arrived.
    wait_for(lambda: receiving() > size // 10 or "status" in result, 60, what="store under way")
    assert "status" not in result, "the store finished before SIGTERM: make it bigger"
    in_flight = receiving()
    assert 0 < in_flight < size
    stop_at = time.monotonic()
    rx.signal(signal.SIGTERM)
    rx.wait_log(r"stopping: no new connections", 10)

    # No new association after SIGTERM: the listening socket is closed.
    refused = associate(rx, scu_ae("LATECOMER", timeout=5))
    assert not refused.is_established
    if ECHOSCU is not None:
        echo = subprocess.run(
            [ECHOSCU, "-aec", "PACSRX", rx.host, str(rx.port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert echo.returncode != 0
    assert sender.is_alive(), "the store should still be in flight"
    assert receiving() >= in_flight

    # The store in flight completes with Success and the association is released.
    sender.join(GRACEFUL + 10)
    assert not sender.is_alive()
    assert result.get("error") is None, result
    assert result == {"established": True, "status": 0x0000, "released": True}

    # The process tree exits 0, within the graceful timeout.
    code = rx.wait(GRACEFUL + 10)
    elapsed = time.monotonic() - stop_at
    assert code == 0, rx.log()
    assert elapsed < GRACEFUL, elapsed
    wait_for(lambda: not any(alive(pid) for pid in rx.all_worker_pids()), 5)
    log = rx.log()
    assert "exited normally" in log and "stopped" in log
    assert "killing" not in log and "ERROR" not in log, log

    # The instance is on disk, intact.
    stored = stored_files(rx.storage)
    assert list(stored) == [uid]
    path = stored[uid]
    a = pydicom.dcmread(source, stop_before_pixels=True)
    b = pydicom.dcmread(path, stop_before_pixels=True)
    assert Dataset(b) == Dataset(a)
    assert file_digest(path, dataset_offset(path)) == file_digest(source, dataset_offset(source))
    assert incoming_files(rx.storage) == []
