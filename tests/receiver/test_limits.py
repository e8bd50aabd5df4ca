"""Association limits, enforced by the acceptor across all workers: beyond them it
answers A-ASSOCIATE-RJ itself (PS3.8 9.3.4: result 2 rejected-transient, source 3
service-provider (presentation related), reason 2 local-limit-exceeded)."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import (
    ECHOSCU,
    Receiver,
    ReceiverFactory,
    associate,
    needs_dcmtk,
    rejection,
    release,
    scu_ae,
)

pytestmark = pytest.mark.interop

TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED = 2, 3, 2


def assert_limit_rejected(assoc: Any) -> None:
    assert not assoc.is_established
    assert rejection(assoc) == (TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED)


def associate_when_free(rx: Receiver, ae_title: str, attempts: int = 50) -> Any:
    """Associate; a slot frees when the worker reports the release to the acceptor,
    a few milliseconds after the peer saw A-RELEASE-RP, so retry a bounded number
    of times while the answer is the limit's rejection."""
    for _ in range(attempts):
        assoc = associate(rx, scu_ae(ae_title))
        if assoc.is_established:
            return assoc
        assert_limit_rejected(assoc)
    raise AssertionError(f"{ae_title} still rejected after {attempts} attempts")


def echo_ok(assoc: Any) -> None:
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000


def test_max_associations(receiver_factory: ReceiverFactory) -> None:
    rx = receiver_factory("--max-associations", "2", "--workers", "2")
    first = associate(rx, scu_ae("FIRST"))
    second = associate(rx, scu_ae("SECOND"))
    held = [first, second]
    try:
        echo_ok(first)
        echo_ok(second)
        # The limit is over all workers and all calling AEs.
        for title in ("THIRD", "FIRST"):
            assert_limit_rejected(associate(rx, scu_ae(title)))
        # The held associations did not notice.
        echo_ok(first)
        echo_ok(second)

        first.release()
        third = associate_when_free(rx, "THIRD")
        held.append(third)
        echo_ok(third)
        assert_limit_rejected(associate(rx, scu_ae("FOURTH")))
    finally:
        for assoc in held:
            release(assoc)
    assert "local limit exceeded" in rx.log()
    assert rx.stop() == 0


@needs_dcmtk
def test_max_associations_rejection_seen_by_dcmtk(receiver_factory: ReceiverFactory) -> None:
    import subprocess

    rx = receiver_factory("--max-associations", "1", "--workers", "1")
    held = associate(rx, scu_ae("HOLDER"))
    try:
        echo_ok(held)
        assert ECHOSCU is not None
        result = subprocess.run(
            [ECHOSCU, "-aec", "PACSRX", rx.host, str(rx.port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode != 0
        text = result.stdout + result.stderr
        assert "Rejected Transient" in text and "Local Limit Exceeded" in text, text
    finally:
        release(held)


def test_max_associations_per_ae(receiver_factory: ReceiverFactory) -> None:
    rx = receiver_factory("--max-associations-per-ae", "1", "--workers", "2")
    first = associate(rx, scu_ae("SAMEAE"))
    held = [first]
    try:
        echo_ok(first)
        # A second association from the same calling AE is over its limit ...
        assert_limit_rejected(associate(rx, scu_ae("SAMEAE")))
        # ... another calling AE still gets in, once.
        other = associate(rx, scu_ae("OTHERAE"))
        held.append(other)
        echo_ok(other)
        assert_limit_rejected(associate(rx, scu_ae("OTHERAE")))
        echo_ok(first)

        first.release()
        again = associate_when_free(rx, "SAMEAE")
        held.append(again)
        echo_ok(again)
        assert_limit_rejected(associate(rx, scu_ae("SAMEAE")))
    finally:
        for assoc in held:
            release(assoc)
    assert rx.stop() == 0
