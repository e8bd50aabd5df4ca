"""pacs-loadtest against an independent SCP (pynetdicom, recording every data set).

What the generator reports must be exactly what arrived: every UID it lists as stored
was received once, with the bytes (SHA-256) it says it sent, decoding to the UID it
names; refusals and failures come back by status and by reason with exit status 1;
--count and --duration bound the run; Ctrl-C ends it cleanly with a summary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from loadtest.compare import free_port
from workers.scu.codec import decode_dataset

from .conftest import (
    CT_IMAGE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    REPO,
    RecordingSCP,
    env,
    loadtest,
    read_records,
)


def check_delivered(scp: RecordingSCP, records: list[tuple[str, str, int, str]]) -> None:
    """Every record is one received data set, byte for byte, and nothing else came."""
    received = {s.sop_instance_uid: s for s in scp.received}
    assert len(received) == len(scp.received), "a UID was received twice"
    assert sorted(received) == sorted(uid for uid, *_ in records)
    for uid, status, nbytes, digest in records:
        stored = received[uid]
        assert status == "0x0000"
        assert len(stored.data) == nbytes
        assert stored.sha256 == digest
        ds = decode_dataset(stored.data, stored.transfer_syntax)
        assert ds.SOPInstanceUID == uid == stored.sop_instance_uid


@pytest.mark.parametrize(
    ("size", "ts", "extra"),
    [
        ("8k", EXPLICIT_LE, ["--associations", "3", "--processes", "2"]),
        ("512k", IMPLICIT_LE, ["--associations", "2", "--per-association", "4"]),
        ("300k", EXPLICIT_BE, ["--async-ops", "4"]),
    ],
)
def test_store_delivers_exactly_what_it_reports(
    scp: RecordingSCP, tmp_path: Path, size: str, ts: str, extra: list[str]
) -> None:
    count = 13
    r = loadtest(
        tmp_path,
        "--port", str(scp.port), "--called-ae", "RECORDER",
        "--size", size, "--transfer-syntax", ts, "--count", str(count), *extra,
    )  # fmt: skip
    assert r.code == 0, r.stdout + r.stderr
    assert r.report is not None
    assert r.report["instances"] == r.report["operations"] == count
    assert r.report["failed"] == 0
    assert len(r.records) == count
    assert {s.transfer_syntax for s in scp.received} == {ts}
    check_delivered(scp, r.records)
    assert sum(n for *_, n, _ in r.records) == r.report["bytes"]
    lat = r.report["latency_seconds"]
    assert lat["C-STORE"]["count"] == count
    assert 0 < lat["C-STORE"]["p50"] <= lat["C-STORE"]["p99"] <= lat["C-STORE"]["max"]
    assert lat["A-ASSOCIATE"]["count"] == r.report["associations"] == scp.associations
    if "--per-association" in extra:
        assert scp.associations >= 4  # 13 operations, 4 per association


def test_refusal_reported_by_status(tmp_path: Path) -> None:
    scp = RecordingSCP(status=0xA700).start()
    try:
        r = loadtest(tmp_path, "--port", str(scp.port), "--count", "5", "--associations", "2")
    finally:
        scp.stop()
    assert r.code == 1, r.stdout + r.stderr
    assert r.report is not None
    assert r.report["instances"] == 0
    assert r.report["failed"] == r.report["operations"] == 5
    assert r.report["failures"]["by_status"] == {"0xA700": 5}
    assert r.report["statuses"]["C-STORE"] == {"0xA700": 5}
    assert "0xA700 (OUT_OF_RESOURCES)" in r.stdout
    assert Counter(status for _, status, *_ in r.records) == {"0xA700": 5}
    assert len(scp.received) == 5


def test_rejected_association(tmp_path: Path) -> None:
    scp = RecordingSCP(require_called_aet=True).start()
    try:
        r = loadtest(tmp_path, "--port", str(scp.port), "--called-ae", "WRONG", "--count", "3")
    finally:
        scp.stop()
    assert r.code == 1
    assert r.report is not None
    assert r.report["failures"]["by_reason"] == {"rejected": 3}
    assert "A-ASSOCIATE rejected" in r.stdout
    assert not scp.received


def test_connection_refused_is_bounded(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    # loadtest() gives the run RUN_TIMEOUT to end by itself, else the test fails
    r = loadtest(tmp_path, "--port", str(port), "--count", "4", "--associations", "2")
    assert r.code == 1
    assert r.report is not None
    assert r.report["failures"]["by_reason"] == {"connection": 4}
    assert r.report["operations"] == 4


def test_echo_scenario(scp: RecordingSCP, tmp_path: Path) -> None:
    r = loadtest(
        tmp_path, "--port", str(scp.port), "--scenario", "echo", "--count", "6",
        "--associations", "2",
    )  # fmt: skip
    assert r.code == 0, r.stdout + r.stderr
    assert r.report is not None
    lat = r.report["latency_seconds"]
    for op in ("A-ASSOCIATE", "C-ECHO", "A-RELEASE", "echo cycle"):
        assert lat[op]["count"] == 6, op
    assert scp.echoes == 6 and scp.associations == 6
    assert not scp.received
    assert "cycle" in r.stdout


def test_mixed_scenario(scp: RecordingSCP, tmp_path: Path) -> None:
    r = loadtest(
        tmp_path, "--port", str(scp.port), "--scenario", "mixed", "--count", "20",
        "--echo-every", "5", "--per-association", "8",
    )  # fmt: skip
    assert r.code == 0, r.stdout + r.stderr
    assert r.report is not None
    assert r.report["latency_seconds"]["C-ECHO"]["count"] == scp.echoes == 4
    assert r.report["instances"] == len(scp.received) == 16
    assert scp.associations == 3
    check_delivered(scp, r.records)


def test_duration_bound(scp: RecordingSCP, tmp_path: Path) -> None:
    """No --count: only --duration ends the run, by itself (loadtest() fails the test
    if it has not ended within RUN_TIMEOUT), cleanly, with what it stored reported."""
    r = loadtest(tmp_path, "--port", str(scp.port), "--duration", "2", "--associations", "2")
    assert r.code == 0, r.stdout + r.stderr
    assert r.report is not None
    assert r.report["config"]["duration"] == 2 and not r.report["interrupted"]
    assert r.report["instances"] > 0
    check_delivered(scp, r.records)


def test_rate_cap(scp: RecordingSCP, tmp_path: Path) -> None:
    r = loadtest(tmp_path, "--port", str(scp.port), "--count", "10", "--rate", "20")
    assert r.code == 0, r.stdout + r.stderr
    assert r.report is not None
    # Pacing, not speed: operation k starts no earlier than k/20 s into the run, so 10
    # of them span at least 9/20 s however fast or slow the machine is.
    assert r.report["elapsed_seconds"] >= 9 / 20


def test_replay_files(scp: RecordingSCP, tmp_path: Path) -> None:
    src = tmp_path / "files"
    (src / "sub").mkdir(parents=True)
    sent: dict[str, Path] = {}
    for i in range(5):
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.PatientName = f"FILE^{i}"
        ds.Rows, ds.Columns, ds.BitsAllocated = 16, 16, 16
        ds.PixelData = bytes(range(256)) * 2 * (1 + i)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = src / ("sub" if i % 2 else ".") / f"f{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sent[str(uid)] = path
    (src / "README.txt").write_text("not DICOM")
    r = loadtest(tmp_path, "--port", str(scp.port), "--files", str(src), "--count", "5")
    assert r.code == 0, r.stdout + r.stderr
    assert "skipped 1 non-DICOM" in r.stderr
    assert sorted(sent) == sorted(s.sop_instance_uid for s in scp.received)
    check_delivered(scp, r.records)
    for stored in scp.received:
        assert sent[stored.sop_instance_uid].read_bytes().endswith(stored.data)


def test_ctrl_c_stops_cleanly_with_a_summary(scp: RecordingSCP, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "loadtest", "--port", str(scp.port), "--duration", "60"),
            *("--associations", "2", "--processes", "2", "--json", str(report)),
            *("--record-uids", str(tmp_path / "rec.tsv"), "--progress"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=REPO,
        start_new_session=True,  # its own group: the SIGINT below reaches only it
    )
    try:
        deadline = time.monotonic() + 30
        while len(scp.received) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scp.received, "nothing was sent"
        os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the whole group
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 130, out + err
    assert "(interrupted)" in out
    assert "instances/s" in out and "C-STORE" in out
    assert "inst/s" in err  # the progress line
    import json

    data = json.loads(report.read_text())
    assert data["interrupted"] is True and data["failed"] == 0
    records = read_records(tmp_path / "rec.tsv")
    assert len(records) == data["instances"] > 0
    check_delivered(scp, records)
