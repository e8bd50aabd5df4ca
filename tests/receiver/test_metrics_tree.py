"""Metrics from the real process tree: a known load in, the real endpoint scraped,
counts exact across several workers; a killed aggregator comes back while reception
goes on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import examples
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.receiver.conftest import dcmtk

# DCMTK's own binaries, not pynetdicom's apps of the same names in .venv/bin.
STORESCU = dcmtk("storescu")
ECHOSCU = dcmtk("echoscu")
pytestmark = pytest.mark.skipif(
    STORESCU is None or ECHOSCU is None,
    reason="DCMTK storescu/echoscu are not installed (make test installs them)",
)

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name].append((dict(sample.labels), sample.value))
    return out


def total(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        value
        for sample_labels, value in samples.get(name, [])
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    out = []
    ds = examples.ct.copy()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for i in range(10):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = tmp_path / f"in{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


@pytest.fixture
def receiver(tmp_path: Path):  # type: ignore[no-untyped-def]
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "pacs-receiver"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--workers",
            "2",
            "--storage",
            str(tmp_path / "store"),
            "--fsync",
            "never",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    [str(ECHOSCU), "127.0.0.1", str(port)], capture_output=True, timeout=10
                ).returncode
                == 0
            ),
            30,
            "the receiver to answer C-ECHO",
        )
        wait_for(lambda: scrape(metrics_port), 30, "the metrics endpoint")
        yield proc, port, metrics_port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def storescu(port: int, files: list[Path]) -> None:
    env = dict(os.environ, TCP_NODELAY="1")
    result = subprocess.run(
        [str(STORESCU), "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode()


def dataset_offset(path: Path) -> int:
    """Where the data set starts in a Part 10 file: preamble, DICM, then (0002,0000)
    UL in explicit VR little endian, whose value is the length of the rest of group 2."""
    head = path.read_bytes()[:144]
    assert head[128:132] == b"DICM" and head[132:138] == b"\x02\x00\x00\x00UL"
    return 144 + int.from_bytes(head[140:144], "little")


def aggregator_pid(supervisor: int) -> int:
    """The pid of the supervisor's metrics aggregator child, 0 while there is none."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == supervisor and b"metrics" in cmdline:
            return int(entry)
    return 0


def test_counts_are_exact_across_workers(  # type: ignore[no-untyped-def]
    receiver, files: list[Path], tmp_path: Path
) -> None:
    _proc, port, metrics_port = receiver
    # 4 associations of 10 instances each, 2 at a time so both workers serve.
    for _ in range(2):
        pair = [
            subprocess.Popen(
                [str(STORESCU), "127.0.0.1", str(port), *map(str, files)],
                env=dict(os.environ, TCP_NODELAY="1"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(2)
        ]
        assert [p.wait(60) for p in pair] == [0, 0]

    def settled():  # type: ignore[no-untyped-def]
        samples = scrape(metrics_port)
        return samples if total(samples, "pacs_cstore_instances_total") >= 40 else None

    samples = wait_for(settled, 15, "40 C-STOREs to be counted")
    time.sleep(1.2)  # two more telemetry intervals: nothing else may arrive
    samples = scrape(metrics_port)
    assert total(samples, "pacs_cstore_instances_total") == 40
    assert total(samples, "pacs_cstore_instances_total", status="0x0000") == 40
    # (the fixture's readiness echoes come from ECHOSCU)
    assert total(samples, "pacs_associations_accepted_total", calling_ae="STORESCU") == 4
    assert total(samples, "pacs_associations_released_total", calling_ae="STORESCU") == 4
    assert total(samples, "pacs_dimse_messages_total", command="C-STORE-RQ") == 40
    assert total(samples, "pacs_dimse_messages_total", command="C-STORE-RSP") == 40
    # Data-set bytes exactly: what was stored (each file less its preamble and group
    # 0002; storescu re-encodes a little, so the source files are not the reference),
    # received four times over the same ten SOP instances.
    stored = sorted((tmp_path / "store").rglob("*.dcm"))
    assert len(stored) == 10
    dataset_bytes = sum(p.stat().st_size - dataset_offset(p) for p in stored)
    assert total(samples, "pacs_cstore_received_bytes_total") == 4 * dataset_bytes
    workers_seen = {
        labels["worker"]
        for labels, value in samples["pacs_pdus_total"]
        if labels.get("pdu_type") == "p_data_tf" and value > 0
    }
    assert len(workers_seen) == 2, workers_seen


def test_killed_aggregator_comes_back_and_reception_goes_on(  # type: ignore[no-untyped-def]
    receiver, files: list[Path]
) -> None:
    proc, port, metrics_port = receiver
    old = aggregator_pid(proc.pid)
    assert old
    os.kill(old, signal.SIGKILL)
    # Reception does not depend on the aggregator.
    storescu(port, files)
    new = wait_for(
        lambda: aggregator_pid(proc.pid) != old and aggregator_pid(proc.pid), 20, "a new aggregator"
    )
    assert new != old

    def counted():  # type: ignore[no-untyped-def]
        samples = scrape(metrics_port)
        return samples if total(samples, "pacs_cstore_instances_total") >= 10 else None

    # What the workers counted while it was down reaches the new aggregator.
    samples = wait_for(counted, 20, "the stores made while the aggregator was down")
    assert total(samples, "pacs_cstore_instances_total") == 10
    storescu(port, files[:5])
    samples = wait_for(
        lambda: (s := scrape(metrics_port)) and total(s, "pacs_cstore_instances_total") >= 15 and s,
        20,
        "more stores",
    )
    assert total(samples, "pacs_cstore_instances_total") == 15
    # The supervisor's own channel reconnects with back-off after the aggregator died:
    # its restart count arrives within a few seconds, and exactly once.
    samples = wait_for(
        lambda: (
            (s := scrape(metrics_port))
            and total(s, "pacs_worker_restarts_total", worker="aggregator") >= 1
            and s
        ),
        20,
        "the aggregator restart to be counted",
    )
    assert total(samples, "pacs_worker_restarts_total", worker="aggregator") == 1
