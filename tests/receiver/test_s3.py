"""``--storage s3://bucket/prefix`` against a REAL S3 API server process (moto's
standalone server, over HTTP on 127.0.0.1), through the real receiver process tree,
with pynetdicom and DCMTK as peers.

* direct: the objects are byte for byte the files a local-store receiver writes for
  the same input, under ``prefix + layout``; a large instance goes up in several parts
  (the ETag's ``-N`` suffix); a duplicate under ``reject`` is refused by the store's
  conditional write and its multipart upload aborted (no parts left); with the server
  stopped every instance is answered 0xA700 and the receiver works again once it is
  back; a bucket that does not answer at start-up: one line, exit 2.
* spool: with the server stopped instances are answered Success, the backlog is on
  /metrics, and it drains once the server is back; after a SIGKILL of the whole tree
  a restarted receiver drains the spool at start-up; past --s3-spool-limit: 0xA700.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.receiver.conftest import (
    STORESCU,
    Receiver,
    associate,
    make_big_file,
    make_files,
    needs_dcmtk,
    release,
    scu_ae,
    sop_uid,
    stored_files,
    wait_for,
)

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

BUCKET = "dicom-bucket"
PREFIX = "site-a/incoming"
PART = 5 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's standalone S3 server as a subprocess on 127.0.0.1 (state in memory:
    a restart starts empty)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._answers, timeout=30, what="moto server")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"moto server exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.url + "/moto-api/", timeout=2):
                return True
        except OSError as exc:
            return getattr(exc, "code", None) is not None  # an HTTP answer is an answer

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def make_bucket(self) -> None:
        self.client().create_bucket(Bucket=BUCKET)


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path).start()
    server.make_bucket()
    yield server
    server.stop()


def aws_env(tmp_path: Path) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }


def start(tmp_path: Path, name: str, moto: MotoServer, *args: str, workers: int = 2) -> Receiver:
    base = tmp_path / name
    base.mkdir(exist_ok=True)
    flags = ["--workers", str(workers), "--index", "off"]
    if moto is not None:
        flags += ["--storage", f"s3://{BUCKET}/{PREFIX}", "--s3-endpoint", moto.url]
        flags += ["--s3-spool", str(tmp_path / f"{name}-spool")]
    rx = Receiver(base, [*flags, *args], aws_env(tmp_path))
    return rx.start(workers)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for rx in started:
        rx.stop()
        rx.kill_leftovers()


def send(rx: Receiver, files: list[Path]) -> list[int]:
    """C-STORE each file over one pynetdicom association; the statuses."""
    assoc = associate(rx, scu_ae(storage=True, timeout=60))
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(str(f)).Status) for f in files]
    finally:
        release(assoc)


def objects(moto: MotoServer) -> dict[str, dict[str, Any]]:
    client = moto.client()
    out: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            out[item["Key"]] = item
    return out


def body(moto: MotoServer, key: str) -> bytes:
    return bytes(moto.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


def pending_uploads(moto: MotoServer) -> list[Any]:
    return list(moto.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
            return str(rsp.read().decode())
    except OSError:
        return ""


def metric(text: str, name: str) -> float | None:
    values = [float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


# ---------------------------------------------------------------------- direct


@needs_dcmtk
def test_direct_objects_are_the_local_files_byte_for_byte(
    tmp_path: Path, moto: MotoServer, receivers: list[Receiver]
) -> None:
    files = make_files(tmp_path / "in", 4, pixel_bytes=8192)
    big = make_big_file(tmp_path / "in" / "big.dcm", 24)  # 12 MiB: three parts of 5 MiB
    local = start(tmp_path, "local", None)  # type: ignore[arg-type]
    receivers.append(local)
    s3 = start(tmp_path, "s3", moto, "--s3-part-size", str(PART))
    receivers.append(s3)
    for rx in (local, s3):  # DCMTK for the small ones, pynetdicom for the big one
        assert STORESCU is not None
        done = subprocess.run(
            [STORESCU, "-aec", "PACSRX", rx.host, str(rx.port), *map(str, files)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert send(rx, [big]) == [0]
    on_disk = stored_files(local.storage)
    assert len(on_disk) == 5
    stored = objects(moto)
    expected = {
        f"{PREFIX}/{path.relative_to(local.storage).as_posix()}": path for path in on_disk.values()
    }
    assert set(stored) == set(expected)
    for key, path in expected.items():
        assert body(moto, key) == path.read_bytes(), key
    big_key = next(k for k, p in expected.items() if p.stem == sop_uid(big))
    etag = stored[big_key]["ETag"].strip('"')
    assert etag.endswith("-3"), etag  # multipart: three parts
    small_key = next(k for k in expected if k != big_key)
    assert "-" not in stored[small_key]["ETag"]  # one PutObject
    assert pending_uploads(moto) == []
    # Nothing was written under the local directory but the temp directory.
    spool = tmp_path / "s3-spool"
    assert [p for p in spool.rglob("*") if p.is_file() and ".incoming" not in p.parts] == []


def test_direct_reject_duplicate_is_refused_by_the_store_and_leaves_no_parts(
    tmp_path: Path, moto: MotoServer, receivers: list[Receiver]
) -> None:
    big = make_big_file(tmp_path / "big.dcm", 11)
    rx = start(tmp_path, "s3", moto, "--s3-part-size", str(PART), "--duplicates", "reject")
    receivers.append(rx)
    assert send(rx, [big]) == [0]
    first = objects(moto)
    assert len(first) == 1
    assert send(rx, [big]) == [0x0111]
    assert objects(moto) == first
    assert pending_uploads(moto) == []


def test_direct_store_down_answers_out_of_resources(
    tmp_path: Path, moto: MotoServer, receivers: list[Receiver]
) -> None:
    files = make_files(tmp_path / "in", 2, pixel_bytes=8192)
    big = make_big_file(tmp_path / "in" / "big.dcm", 11)
    rx = start(tmp_path, "s3", moto, "--s3-part-size", str(PART))
    receivers.append(rx)
    moto.stop()
    assert send(rx, [*files, big]) == [0xA700, 0xA700, 0xA700]
    moto.start()  # empty again
    moto.make_bucket()
    assert send(rx, files) == [0, 0]
    assert len(objects(moto)) == 2
    assert pending_uploads(moto) == []


def test_direct_unusable_bucket_at_start_is_one_line_exit_2(
    tmp_path: Path, moto: MotoServer
) -> None:
    cmd = [
        str(Path(sys.executable).with_name("pacs-receiver")),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--storage",
        f"s3://no-such-bucket/{PREFIX}",
        "--s3-endpoint",
        moto.url,
        "--s3-spool",
        str(tmp_path / "spool"),
    ]
    env = {**os.environ, **aws_env(tmp_path)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-bucket" in lines[0], done.stderr


# ----------------------------------------------------------------------- spool


def spooled(rx_spool: Path) -> list[Path]:
    return [
        p
        for p in rx_spool.rglob("*.dcm")
        if not any(part.startswith(".") for part in p.relative_to(rx_spool).parts)
    ]


def test_spool_accepts_while_the_store_is_down_and_drains_when_it_returns(
    tmp_path: Path, moto: MotoServer, receivers: list[Receiver]
) -> None:
    files = make_files(tmp_path / "in", 6, pixel_bytes=8192)
    metrics_port = free_port()
    rx = start(
        tmp_path, "s3", moto, "--s3-durability", "spool", "--metrics-port", str(metrics_port)
    )
    receivers.append(rx)
    moto.stop()
    assert send(rx, files) == [0] * 6
    spool = tmp_path / "s3-spool"
    assert len(spooled(spool)) == 6
    wait_for(
        lambda: metric(scrape(metrics_port), "pacs_s3_spool_backlog_instances") == 6,
        timeout=20,
        what="backlog of 6 on /metrics",
    )
    assert metric(scrape(metrics_port), "pacs_s3_spool_backlog_bytes") >= 6 * 8192  # type: ignore[operator]
    moto.start()
    moto.make_bucket()
    wait_for(lambda: len(objects(moto)) == 6, timeout=90, what="the spool drained")
    wait_for(lambda: not spooled(spool), timeout=20, what="spool files removed")
    by_uid = {sop_uid(f): f for f in files}
    for key in objects(moto):
        assert key.startswith(PREFIX + "/")
        uid = key.rsplit("/", 1)[1].removesuffix(".dcm")
        source = by_uid[uid].read_bytes()
        got = body(moto, key)
        # Same data set as sent (the file meta is the receiver's own).
        assert got[128:132] == b"DICM"
        assert got.endswith(source[_dataset_start(source) :])
    wait_for(
        lambda: metric(scrape(metrics_port), "pacs_s3_spool_backlog_instances") == 0,
        timeout=20,
        what="backlog 0 on /metrics",
    )


def _dataset_start(raw: bytes) -> int:
    return 144 + int.from_bytes(raw[140:144], "little")


def test_spool_is_drained_at_start_up_after_sigkill(
    tmp_path: Path, moto: MotoServer, receivers: list[Receiver]
) -> None:
    files = make_files(tmp_path / "in", 5, pixel_bytes=8192)
    rx = start(tmp_path, "s3", moto, "--s3-durability", "spool")
    receivers.append(rx)
    moto.stop()
    assert send(rx, files) == [0] * 5
    for pid in [*rx.workers(), rx.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rx.wait(20)
    rx.kill_leftovers()
    spool = tmp_path / "s3-spool"
    assert len(spooled(spool)) == 5
    moto.start()
    moto.make_bucket()
    rx.log_path.rename(rx.log_path.with_suffix(".first.log"))
    again = Receiver(rx.base, rx.args, aws_env(tmp_path)).start(2)
    receivers.append(again)
    wait_for(lambda: len(objects(moto)) == 5, timeout=90, what="the spool drained at start-up")
    wait_for(lambda: not spooled(spool), timeout=20, what="spool files removed")
    uids = {key.rsplit("/", 1)[1].removesuffix(".dcm") for key in objects(moto)}
    assert uids == {sop_uid(f) for f in files}


def test_spool_limit_answers_out_of_resources(
    tmp_path: Path, moto: MotoServer, receivers: list[Receiver]
) -> None:
    files = make_files(tmp_path / "in", 8, pixel_bytes=8192)
    rx = start(
        tmp_path, "s3", moto, "--s3-durability", "spool", "--s3-spool-limit", "30000", workers=1
    )
    receivers.append(rx)
    moto.stop()
    statuses = send(rx, files)
    # ~8.5 KB each: three or four fit under 30000 bytes, then the spool is full.
    assert statuses[0] == 0
    assert 0xA700 in statuses
    first_refusal = statuses.index(0xA700)
    assert all(s == 0xA700 for s in statuses[first_refusal:])
    assert len(spooled(tmp_path / "s3-spool")) == first_refusal


def test_spool_starts_with_the_store_down(tmp_path: Path, receivers: list[Receiver]) -> None:
    down = MotoServer(tmp_path)  # never started: nothing listens on its port
    files = make_files(tmp_path / "in", 2, pixel_bytes=8192)
    rx = start(tmp_path, "s3", down, "--s3-durability", "spool")
    receivers.append(rx)
    assert "accepting into the spool" in rx.log()
    assert send(rx, files) == [0, 0]
    assert len(spooled(tmp_path / "s3-spool")) == 2
