"""pacs-loadtest against the real pacs-receiver process tree, the sink, and compare."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import compare, netns
from tests.dcmtk import dcmtk
from workers.scu import parse_part10_header

from .conftest import REPO, env, loadtest


@pytest.fixture(scope="module")
def receiver_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[compare.Running]:
    """One real pacs-receiver process tree for the module (started as compare does)."""
    args = compare.build_parser().parse_args(["--async-ops", "8"])
    base = tmp_path_factory.mktemp("rx")
    running = compare.RECEIVERS["pacs-receiver"].start(base, args)
    try:
        compare.wait_ready(running)
        yield running
    finally:
        running.stop()
    assert not running.alive()


@pytest.fixture
def pacs_receiver(receiver_tree: compare.Running) -> compare.Running:
    assert receiver_tree.alive(), receiver_tree.log()[-2000:]
    receiver_tree.clear_storage()
    return receiver_tree


@pytest.mark.parametrize("size", ["8k", "640k"])
def test_pacs_receiver_stores_exactly_what_was_sent(
    pacs_receiver: compare.Running, tmp_path: Path, size: str
) -> None:
    r = loadtest(
        tmp_path, "--port", str(pacs_receiver.port), "--size", size, "--count", "24",
        "--associations", "3", "--processes", "2", "--async-ops", "4",
    )  # fmt: skip
    assert r.code == 0, r.stdout + r.stderr
    assert r.report is not None and r.report["instances"] == 24
    files = {p.stem: p for p in pacs_receiver.storage.rglob("*.dcm")}
    assert sorted(files) == sorted(uid for uid, *_ in r.records)
    for uid, status, nbytes, digest in r.records:
        assert status == "0x0000"
        raw = files[uid].read_bytes()
        header = parse_part10_header(raw, eof=True)
        assert header.sop_instance_uid == uid
        dataset = raw[header.dataset_offset :]
        assert len(dataset) == nbytes
        assert hashlib.sha256(dataset).hexdigest() == digest


def test_pacs_receiver_echo(pacs_receiver: compare.Running, tmp_path: Path) -> None:
    r = loadtest(
        tmp_path, "--port", str(pacs_receiver.port), "--scenario", "echo", "--count", "10",
        "--associations", "2",
    )  # fmt: skip
    assert r.code == 0, r.stdout + r.stderr
    assert r.report is not None
    assert r.report["latency_seconds"]["echo cycle"]["count"] == 10


def test_sink_discards_everything(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "sink", "--port", "0", "--processes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = match.group(1)
        r = loadtest(
            tmp_path, "--port", port, "--size", "512k", "--count", "200", "--associations", "4",
            "--async-ops", "8", "--scenario", "mixed", "--per-association", "30",
        )  # fmt: skip
        assert r.code == 0, r.stdout + r.stderr
        assert r.report is not None
        assert r.report["operations"] == 200 and r.report["instances"] == 180
        assert r.report["latency_seconds"]["C-ECHO"]["count"] == 20
        assert r.report["associations"] >= 7  # 200 operations, 30 per association
    finally:
        proc.terminate()
        proc.wait(10)


def run_compare(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``pacs-loadtest compare`` on 20 instances of 8 KiB per cell, no warm-up,
    storing under ``tmp_path``, plus ``args``."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "loadtest", "compare", "--sizes", "8k"),
            *("--count", "20", "--warmup", "0", "--workdir", str(tmp_path), *args),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        cwd=tmp_path,
    )


def test_compare_smoke(tmp_path: Path) -> None:
    receivers = ["pacs-receiver"]
    if dcmtk("storescp") and netns.unavailable() is None:
        receivers += ["dcmtk-storescp-fork"]  # the one with a process per association
    md = tmp_path / "cmp.md"
    proc = run_compare(
        tmp_path,
        *("--receivers", ",".join(receivers), "--associations", "1,2"),
        *("--markdown", str(md), "--json", str(tmp_path / "cmp.json")),
        *("--png", str(tmp_path / "cmp.png")),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    for name in receivers:
        assert len(re.findall(rf"^{re.escape(name)}\s+8 KiB", table, re.M)) == 2, table
    assert "1.00x" in table
    text = md.read_text()
    assert "| pacs-receiver | 8 KiB | 1 |" in text
    isolated = "ran in one network namespace that has only lo" in text
    assert isolated == ("dcmtk-storescp-fork" in receivers), text
    assert (tmp_path / "cmp.json").exists()
    assert (tmp_path / "cmp.png").exists() or "matplotlib is not installed" in proc.stderr
    # nothing left listening or running: every receiver was stopped
    leftover = subprocess.run(
        ["pgrep", "-f", "pacs-loadtest-compare-"], capture_output=True, text=True
    ).stdout.split()
    assert not [pid for pid in leftover if str(tmp_path) in _cmdline(int(pid))]
    assert not list(tmp_path.glob("pacs-loadtest-compare-*"))  # storage removed


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _recording_spec(seen: list[list[str]]) -> compare.ReceiverSpec:
    """A receiver that listens on every interface; its start records where it runs."""

    def start(base: Path, args: object) -> compare.Running:
        seen.append(netns.interfaces())
        raise compare.RunError("recorded, not started")

    return compare.ReceiverSpec("everywhere", lambda: None, start, all_interfaces=True)


@pytest.mark.skipif(netns.unavailable() is not None, reason=f"{netns.unavailable()}")
def test_compare_starts_all_interface_receivers_only_in_a_loopback_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    monkeypatch.setitem(compare.RECEIVERS, "everywhere", _recording_spec(seen))
    before = netns.namespace_id()
    md = tmp_path / "cmp.md"
    argv = ["--receivers", "everywhere", "--count", "1", "--workdir", str(tmp_path)]
    code = compare.main([*argv, "--markdown", str(md)])
    assert code == 1  # the fake receiver "failed" to start
    assert seen == [["lo"]]
    assert netns.namespace_id() == before  # and the caller is back where it was
    assert "network namespace that has only lo" in md.read_text()


def test_compare_skips_all_interface_receivers_without_a_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[list[str]] = []
    monkeypatch.setitem(compare.RECEIVERS, "everywhere", _recording_spec(seen))
    monkeypatch.setattr(netns, "unavailable", lambda: "no namespace for this test")
    md = tmp_path / "cmp.md"
    argv = ["--receivers", "everywhere", "--count", "1", "--workdir", str(tmp_path)]
    code = compare.main([*argv, "--markdown", str(md)])
    assert code == 0
    assert seen == []  # never started
    expected = "everywhere skipped: it listens on every interface and no namespace for this test"
    assert expected in md.read_text()
    assert "skipping everywhere" in capsys.readouterr().err


@pytest.mark.skipif(compare.orthanc_binary() is None, reason="Orthanc is not installed")
@pytest.mark.skipif(netns.unavailable() is not None, reason=f"{netns.unavailable()}")
def test_compare_orthanc_stores_everything(tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    proc = run_compare(
        tmp_path, "--receivers", "orthanc", "--associations", "2", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (cell,) = json.loads(out.read_text())["cells"]
    assert (cell["receiver"], cell["instances"], cell["failed"]) == ("orthanc", 20, 0)
