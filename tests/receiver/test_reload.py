"""SIGHUP re-reads --config and replaces the workers without dropping open
associations: the old workers finish what they serve, new associations get the new
configuration; a configuration that does not load changes nothing."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    ASSOC_FILE_ENV,
    ReceiverFactory,
    alive,
    assert_same_instance,
    associate,
    make_files,
    read_pid_records,
    rejection,
    release,
    scu_ae,
    sop_uid,
    stored_files,
    wait_for,
)

pytestmark = pytest.mark.interop

ASSOC_HOOK = "EVT_ESTABLISHED=tests.receiver.hooks:record_association"
PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNIZED = 1, 1, 7


def write_config(path: Path, ae_title: str) -> None:
    path.write_text(
        f'ae-title = "{ae_title}"\n'
        "require-called-ae = true\n"
        f'handlers = ["{ASSOC_HOOK}"]\n'
        'log-level = "INFO"\n'
    )


def assert_called_ae_rejected(assoc: Any) -> None:
    assert not assoc.is_established
    assert rejection(assoc) == (PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNIZED)


def test_sighup_reloads_config_without_dropping_associations(
    receiver_factory: ReceiverFactory, tmp_path: Path, assoc_file: Path
) -> None:
    config = tmp_path / "pacsrx.toml"
    write_config(config, "PACSRX")
    rx = receiver_factory(
        "--config", str(config), "--workers", "2", env={ASSOC_FILE_ENV: str(assoc_file)}
    )
    old_workers = set(rx.workers())
    sources = make_files(tmp_path / "src", 2)

    assert_called_ae_rejected(associate(rx, scu_ae("EARLY"), called="NEWAE"))
    held = associate(rx, scu_ae("HOLDER", storage=True), called="PACSRX")
    newer: list[Any] = []
    try:
        assert held.is_established
        assert held.send_c_echo().Status == 0x0000
        served = {ae: pid for pid, _port, ae in read_pid_records(assoc_file)}
        holder_pid = served["HOLDER"]
        assert holder_pid in old_workers

        write_config(config, "NEWAE")
        rx.signal(signal.SIGHUP)
        rx.wait_log(r"SIGHUP: configuration reloaded; replacing 2 worker\(s\)", 10)
        rx.wait_log_count(r"worker \d+ ready \(pid \d+\)", 4, 30)  # 2 old + 2 new

        # The held association goes on, in its old worker, after the reload.
        assert held.is_established
        assert held.send_c_echo().Status == 0x0000
        assert held.send_c_store(sources[0]).Status == 0x0000
        assert alive(holder_pid)

        # New associations must call the new AE title ...
        assert_called_ae_rejected(associate(rx, scu_ae("LATE"), called="PACSRX"))
        fresh = associate(rx, scu_ae("FRESH", storage=True), called="NEWAE")
        newer.append(fresh)
        assert fresh.is_established
        assert fresh.send_c_store(sources[1]).Status == 0x0000
        # ... and are served by the new workers.
        new_workers = set(rx.workers()) - old_workers
        assert len(new_workers) == 2
        served = {ae: pid for pid, _port, ae in read_pid_records(assoc_file)}
        assert served["FRESH"] in new_workers

        # The old worker drains: it exits (normally) once its association ends; the
        # other old worker, with nothing open, is already gone.
        other_old = old_workers - {holder_pid}
        wait_for(lambda: not any(alive(pid) for pid in other_old), 10, what="idle old worker")
        held.release()
        assert held.is_released
        wait_for(lambda: not alive(holder_pid), 10, what="the old worker to exit")
        rx.wait_log_count(r"worker \d+ exited normally", 2, 10)
        assert set(rx.workers()) == new_workers

        # A configuration that does not load changes nothing.
        config.write_text('ae-title = "THIS_AE_TITLE_IS_TOO_LONG"\n')
        rx.signal(signal.SIGHUP)
        rx.wait_log(r"SIGHUP: configuration not reloaded: .*pacsrx\.toml: ae-title:", 10)
        assert set(rx.workers()) == new_workers
        assert fresh.send_c_echo().Status == 0x0000
        again = associate(rx, scu_ae("AGAIN"), called="NEWAE")
        newer.append(again)
        assert again.is_established
    finally:
        release(held)
        for assoc in newer:
            release(assoc)

    stored = stored_files(rx.storage)
    for source in sources:
        assert_same_instance(source, stored[sop_uid(source)])
    errors = [line for line in rx.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "configuration not reloaded" in errors[0], errors
    assert rx.stop() == 0
