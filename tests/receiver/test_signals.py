"""Signals reach the main process's arbiter, which acts on them in order: the first
SIGINT (or SIGTERM) is a graceful stop, a repeated SIGTERM and a SIGHUP during the
stop change nothing, a second SIGINT aborts the open associations at once."""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import ReceiverFactory, alive, associate, scu_ae, wait_for

pytestmark = [pytest.mark.interop]

#: Long enough that a stop which waited for it would fail the test's bounds.
GRACEFUL = 120.0


def test_second_interrupt_aborts_but_sigterm_and_sighup_do_not(
    receiver_factory: ReceiverFactory,
) -> None:
    rx = receiver_factory("--graceful-timeout", str(GRACEFUL), "--workers", "1")
    assoc = associate(rx, scu_ae("HOLDER", timeout=60))
    assert assoc.is_established

    rx.signal(signal.SIGINT)
    rx.wait_log(r"stopping: no new connections", 10)
    # Graceful: the open association is still served.
    assert assoc.send_c_echo().Status == 0x0000

    # During the stop: SIGHUP reloads nothing, SIGTERM again stays graceful.
    rx.signal(signal.SIGHUP)
    rx.signal(signal.SIGTERM)
    time.sleep(1.0)  # several of the arbiter's ticks
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assert "second interrupt" not in rx.log()

    # A second SIGINT: the workers are killed, the association aborted, the
    # receiver gone long before --graceful-timeout.
    rx.signal(signal.SIGINT)
    rx.wait_log(r"second interrupt: aborting open associations now", 10)
    wait_for(lambda: not assoc.is_established, 30, what="the association aborted")
    assert rx.wait(GRACEFUL / 2) == 0, rx.log()
    assert not any(alive(pid) for pid in rx.all_worker_pids())
    log = rx.log()
    assert "SIGHUP" not in log, log  # no reload once stopping
    assert "did not stop in time" not in log, log
