"""With --metrics-port the supervisor runs the metrics aggregator (``python -m
metrics``) as part of the tree: what the workers do shows up on /metrics, a killed
worker's restart is counted, and the aggregator stops with the rest."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from .conftest import (
    STORESCU,
    ReceiverFactory,
    alive,
    associate,
    make_files,
    needs_dcmtk,
    scu_ae,
    wait_for,
)

pytestmark = [pytest.mark.interop, needs_dcmtk]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, path: str = "/metrics") -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as rsp:
            return str(rsp.read().decode())
    except OSError:
        return ""


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    out = 0.0
    for line in text.splitlines():
        match = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match is None:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            out += float(match.group(2))
    return out


def test_metrics_aggregator_in_the_tree(receiver_factory: ReceiverFactory, tmp_path: Path) -> None:
    port = free_port()
    rx = receiver_factory("--workers", "2", "--metrics-port", str(port))
    rx.wait_log(r"metrics aggregator started \(pid \d+\)", 10)
    wait_for(lambda: scrape(port, "/healthz"), 20, what="/healthz")

    files = make_files(tmp_path / "src", 10)
    assert STORESCU is not None
    sent = subprocess.run(
        [STORESCU, "-aet", "METRICSSCU", "-aec", "PACSRX", rx.host, str(rx.port), *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    echo = associate(rx, scu_ae("METRICSSCU"), called="PACSRX")
    assert echo.is_established and echo.send_c_echo().Status == 0x0000
    echo.release()

    def counted() -> bool:
        text = scrape(port)
        return (
            total(text, "pacs_associations_released_total", calling_ae="METRICSSCU") == 2
            and total(text, "pacs_connections_total") == 2
            and total(
                text,
                "pacs_cstore_instances_total",
                calling_ae="METRICSSCU",
                status_category="success",
            )
            == 10
        )

    wait_for(counted, 20, interval=0.2, what="2 associations and 10 C-STOREs on /metrics")
    text = scrape(port)
    assert total(text, "pacs_associations_accepted_total", calling_ae="METRICSSCU") == 2
    assert total(text, "pacs_cstore_received_bytes_total", calling_ae="METRICSSCU") > 10 * 2048
    assert total(text, "pacs_telemetry_dropped_total") == 0

    # A worker killed is restarted, and the restart is counted.
    victim = rx.started_pids()[0][0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: total(scrape(port), "pacs_worker_restarts_total") >= 1,
        20,
        interval=0.2,
        what="the restart on /metrics",
    )

    # The aggregator is part of the tree and stops with it.
    aggregator = int(rx.wait_log(r"metrics aggregator started \(pid (\d+)\)").group(1))
    assert aggregator in rx.workers()
    assert rx.stop() == 0
    wait_for(lambda: not alive(aggregator), 5, what="the aggregator to exit")
    assert scrape(port, "/healthz") == ""
    # A stop the supervisor asked for is no loss: its last telemetry flush after the
    # aggregator stopped says nothing at INFO.
    assert "aggregator connection lost" not in rx.log(), rx.log()
