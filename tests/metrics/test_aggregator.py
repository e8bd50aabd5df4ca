"""Tests for metrics.aggregator: frames from several workers over the real unix socket,
then the real HTTP endpoint, parsed with prometheus_client: counts equal what was sent."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metrics import wire as w
from metrics.aggregator import Aggregator, Limits
from workers.engine import events as evt
from workers.engine.pdu import AssociateRJ
from workers.telemetry import RECEIVED, SENT, Telemetry

from .helpers import FakeProtocol, short_tmpdir, store_op, store_result, until

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def sockdir() -> Any:
    with short_tmpdir() as path:
        yield path


async def http(
    port: int, path: str = "/metrics", method: str = "GET", headers: Sequence[str] = ()
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 request to 127.0.0.1:port; (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
        f"{h}\r\n" for h in headers
    )
    writer.write((request + "\r\n").encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        fields[k.strip().lower()] = v.strip()
    return status, fields, body


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: dict[Any, float], name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


async def scrape(agg: Aggregator) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, headers, body = await http(agg.http_port)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(body.decode())


def _worker_traffic(t: Telemetry, calling: str, stores: int, sop: str, status: int) -> None:
    p = FakeProtocol(calling, "PACSRX")
    t.record(evt.EVT_CONN_OPEN, p, {})
    p.pdu(0, 1, 300)
    t.record(evt.EVT_REQUESTED, p, {})
    p.pdu(1, 2, 200)
    t.record(evt.EVT_ACCEPTED, p, {})
    t.record(evt.EVT_ESTABLISHED, p, {})
    for _ in range(stores):
        p.pdu(0, 4, 2000)
        t.dimse(RECEIVED, 0x0001, None)
        t.stored(p, store_op(sop), store_result(status, 1500), 0.02)
        t.dimse(SENT, 0x8001, status)
        p.pdu(1, 4, 100)
    p.pdu(0, 5, 10)
    p.pdu(1, 6, 10)
    t.record(evt.EVT_RELEASED, p, {})
    t.record(evt.EVT_CONN_CLOSE, p, {})


async def _delivered(agg: Aggregator, senders: Sequence[Telemetry]) -> None:
    for t in senders:
        t.flush()
    await until(lambda: all(t.backlog == 0 for t in senders))
    want = sum(t.records_sent for t in senders)
    await until(lambda: sum(x.records for x in agg.state.workers.values()) == want)


def test_counts_from_several_workers_are_exact(sockdir: str) -> None:
    async def scenario() -> None:
        path = os.path.join(sockdir, "agg.sock")
        agg = Aggregator(path, port=0)
        await agg.start()
        workers = [Telemetry(path, i, interval=3600) for i in range(3)]
        supervisor = Telemetry(path, "supervisor", role="supervisor", interval=3600)
        for t in [*workers, supervisor]:
            await t.start()
        # worker 0: CT1 stores 5 CT, worker 1: CT1 stores 7 CT and MR2 3 MR (1 failed),
        # worker 2: a rejection, a peer abort, a handler error; one association open.
        _worker_traffic(workers[0], "CT1", 5, CT, 0x0000)
        _worker_traffic(workers[1], "CT1", 7, CT, 0x0000)
        _worker_traffic(workers[1], "MR2", 2, MR, 0x0000)
        _worker_traffic(workers[1], "MR2", 1, MR, 0xA700)
        t2 = workers[2]
        rj = FakeProtocol("BAD", "PACSRX")
        t2.record(evt.EVT_CONN_OPEN, rj, {})
        t2.record(evt.EVT_REQUESTED, rj, {})
        t2.record(evt.EVT_REJECTED, rj, {"response": AssociateRJ(1, 1, 3)})
        t2.record(evt.EVT_CONN_CLOSE, rj, {})
        ab = FakeProtocol("CT1", "PACSRX")
        t2.record(evt.EVT_CONN_OPEN, ab, {})
        t2.record(evt.EVT_REQUESTED, ab, {})
        t2.record(evt.EVT_ACCEPTED, ab, {})
        t2.record(evt.EVT_ABORTED, ab, {"source": 0, "reason": 0, "by_peer": True})
        t2.record(evt.EVT_CONN_CLOSE, ab, {})
        still = FakeProtocol("US3", "PACSRX")
        t2.record(evt.EVT_CONN_OPEN, still, {})
        t2.record(evt.EVT_REQUESTED, still, {})
        t2.record(evt.EVT_ACCEPTED, still, {})
        t2.handler_error("EVT_C_STORE")
        t2.observe_write(0.0002)
        t2.observe_fsync(0.003)
        t2.observe_fsync(0.004)
        supervisor.worker_restarted(1, "SIGKILL")
        supervisor.worker_restarted(1, "SIGKILL")
        await _delivered(agg, [*workers, supervisor])

        got = await scrape(agg)
        v = lambda name, **labels: value(got, name, **labels)  # noqa: E731
        assert v("pacs_associations_requested_total", calling_ae="CT1", called_ae="PACSRX") == 3
        assert v("pacs_associations_accepted_total", calling_ae="CT1", called_ae="PACSRX") == 3
        assert v("pacs_associations_released_total", calling_ae="CT1", called_ae="PACSRX") == 2
        assert v("pacs_associations_released_total", calling_ae="MR2", called_ae="PACSRX") == 2
        assert (
            v(
                "pacs_associations_rejected_total",
                calling_ae="BAD",
                called_ae="PACSRX",
                result="permanent",
                source="service_user",
                reason="calling_ae_title_not_recognized",
            )
            == 1
        )
        assert (
            v(
                "pacs_associations_aborted_total",
                calling_ae="CT1",
                called_ae="PACSRX",
                initiator="peer",
                source="service_user",
                reason="none",
            )
            == 1
        )
        assert v("pacs_associations_open", calling_ae="US3", called_ae="PACSRX") == 1
        assert v("pacs_connections_open", worker="2") == 1
        assert v("pacs_connections_open", worker="0") == 0
        ct_ok = {"calling_ae": "CT1", "called_ae": "PACSRX", "sop_class": CT}
        ok = {"status": "0x0000", "status_category": "success"}
        assert v("pacs_cstore_instances_total", **ct_ok, **ok) == 12
        assert v("pacs_cstore_received_bytes_total", **ct_ok, **ok) == 12 * 1500
        mr = {"calling_ae": "MR2", "called_ae": "PACSRX", "sop_class": MR}
        assert v("pacs_cstore_instances_total", **mr, **ok) == 2
        assert (
            v("pacs_cstore_instances_total", **mr, status="0xA700", status_category="failure") == 1
        )
        h = {"calling_ae": "CT1", "sop_class": CT}
        assert v("pacs_cstore_duration_seconds_count", **h) == 12
        assert v("pacs_cstore_duration_seconds_bucket", **h, le="0.01") == 0
        assert v("pacs_cstore_duration_seconds_bucket", **h, le="0.025") == 12
        assert v("pacs_cstore_duration_seconds_bucket", **h, le="+Inf") == 12
        assert v("pacs_cstore_duration_seconds_sum", **h) == pytest.approx(0.24)
        assert v("pacs_connections_total", worker="0") == 1
        assert v("pacs_connections_total", worker="1") == 3
        assert v("pacs_connections_total", worker="2") == 3
        p = {"worker": "1"}
        assert v("pacs_pdus_total", **p, pdu_type="p_data_tf", direction="received") == 10
        assert v("pacs_pdus_total", **p, pdu_type="associate_rq", direction="received") == 3
        assert v("pacs_pdus_total", **p, pdu_type="release_rp", direction="sent") == 3
        assert v("pacs_network_bytes_total", **p, direction="received") == 3 * 310 + 10 * 2000
        assert v("pacs_network_bytes_total", **p, direction="sent") == 3 * 210 + 10 * 100
        assert (
            v(
                "pacs_dimse_messages_total",
                **p,
                command="C-STORE-RQ",
                direction="received",
                status="none",
                status_category="none",
            )
            == 10
        )
        assert (
            v(
                "pacs_dimse_messages_total",
                **p,
                command="C-STORE-RSP",
                direction="sent",
                status="0xA700",
                status_category="failure",
            )
            == 1
        )
        assert v("pacs_handler_errors_total", worker="2", event="EVT_C_STORE") == 1
        assert v("pacs_storage_write_duration_seconds_count", worker="2") == 1
        assert v("pacs_storage_fsync_duration_seconds_count", worker="2") == 2
        assert v("pacs_storage_fsync_duration_seconds_bucket", worker="2", le="0.0025") == 0
        assert v("pacs_storage_fsync_duration_seconds_bucket", worker="2", le="0.005") == 2
        assert v("pacs_worker_restarts_total", worker="1", reason="SIGKILL") == 2
        assert v("pacs_telemetry_dropped_total", worker="0") == 0
        assert v("pacs_telemetry_connected", role="worker", worker="1") == 1
        assert v("pacs_telemetry_connected", role="supervisor", worker="supervisor") == 1
        for name in ("aggregator", "0", "1", "2", "supervisor"):
            role = name if name in ("aggregator", "supervisor") else "worker"
            assert v("pacs_process_cpu_seconds_total", role=role, worker=name) > 0
            assert v("pacs_process_resident_memory_bytes", role=role, worker=name) > 1e6

        # A worker goes away: its gauges go with it, counters stay.
        await t2.close()
        await until(lambda: len(agg.state.sources) == 3)
        got = await scrape(agg)
        assert ("pacs_connections_open", frozenset({("worker", "2")})) not in got
        assert v("pacs_associations_open", calling_ae="US3", called_ae="PACSRX") == 0
        assert value(got, "pacs_handler_errors_total", worker="2", event="EVT_C_STORE") == 1
        for t in [*workers, supervisor]:
            await t.close()
        await agg.close()
        assert not os.path.exists(path)

    asyncio.run(scenario())


def test_promtool_accepts_the_exposition(sockdir: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")

    async def scenario() -> bytes:
        path = os.path.join(sockdir, "agg.sock")
        agg = Aggregator(path, port=0)
        await agg.start()
        t = Telemetry(path, 0, interval=3600)
        await t.start()
        _worker_traffic(t, "CT1", 3, CT, 0)
        t.observe_fsync(0.01)
        t.handler_error("EVT_C_ECHO")
        t.record(
            evt.EVT_FSM_TRANSITION,
            FakeProtocol(),
            {"current_state": "Sta1", "fsm_event": "Evt5", "next_state": "Sta2"},
        )
        await _delivered(agg, [t])
        _, _, body = await http(agg.http_port)
        await t.close()
        await agg.close()
        return body

    body = asyncio.run(scenario())
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b"", proc.stdout + proc.stderr


def test_http_endpoints(sockdir: str) -> None:
    async def scenario() -> None:
        agg = Aggregator(os.path.join(sockdir, "agg.sock"), port=0)
        await agg.start()
        port = agg.http_port
        assert (await http(port, "/healthz"))[::2] == (200, b"ok\n")
        assert (await http(port, "/nope"))[0] == 404
        status, headers, _ = await http(port, "/metrics", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, headers, body = await http(port, "/metrics", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        status, headers, body = await http(port, "/metrics?x=1", headers=["Accept-Encoding: gzip"])
        assert status == 200 and headers["content-encoding"] == "gzip"
        assert b"pacs_aggregator_start_time_seconds" in gzip.decompress(body)
        # A request that never ends, or is too large, does not hold the server.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        assert data.startswith(b"HTTP/1.1 431")
        writer.close()
        assert (await http(port, "/healthz"))[0] == 200
        await agg.close()

    asyncio.run(scenario())


def _frame(records: list[Any]) -> bytes:
    payload = msgpack.packb(records)
    return struct.pack(">I", len(payload)) + payload


def test_label_cardinality_is_bounded(sockdir: str) -> None:
    async def scenario() -> None:
        path = os.path.join(sockdir, "agg.sock")
        agg = Aggregator(path, port=0, limits=Limits(ae_titles=3, sop_classes=2, statuses=2))
        await agg.start()
        _, writer = await asyncio.open_unix_connection(path)
        records: list[Any] = [[1, w.Kind.HELLO, "worker", "0", 1]]
        buckets = [1] + [0] * len(w.CSTORE_BUCKETS)
        for i in range(10):
            records.append([1, w.Kind.CSTORE, f"AE{i}", "PACS", f"1.2.{i}", i, 10, 0.0, buckets])
        writer.write(_frame(records))
        await writer.drain()
        await until(lambda: agg.state.workers.get("0") is not None)
        got = await scrape(agg)
        series = [k for k in got if k[0] == "pacs_cstore_instances_total"]
        assert len(series) <= 3 * 3 * 3 * 3
        labels = [dict(k[1]) for k in series]
        assert {x["calling_ae"] for x in labels} == {"AE0", "AE1", "other"}  # PACS took one
        assert {x["sop_class"] for x in labels} == {"1.2.0", "1.2.1", "other"}
        assert sum(got[k] for k in series) == 10
        writer.close()
        await agg.close()

    asyncio.run(scenario())


def test_bad_input_is_counted_and_isolated(sockdir: str) -> None:
    async def scenario() -> None:
        path = os.path.join(sockdir, "agg.sock")
        agg = Aggregator(path, port=0)
        await agg.start()
        _, good_w = await asyncio.open_unix_connection(path)
        good_w.write(_frame([[1, w.Kind.HELLO, "worker", "g", 1], [1, w.Kind.DROPPED, 1]]))
        # No hello first, then a bad record, an unknown kind, an unparsable frame.
        _, bad_w = await asyncio.open_unix_connection(path)
        bad_w.write(_frame([[1, w.Kind.DROPPED, 5]]))
        bad_w.write(_frame([[1, w.Kind.HELLO, "worker", "b", 2], [1, w.Kind.PDUS, 9, 4, 1]]))
        bad_w.write(_frame([[1, 200, 1], [2, w.Kind.DROPPED, 1]]))
        bad_w.write(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        # An oversized frame: that connection is closed, the others go on.
        huge_r, huge_w = await asyncio.open_unix_connection(path)
        huge_w.write(struct.pack(">I", w.MAX_FRAME_BYTES + 1))
        assert await asyncio.wait_for(huge_r.read(), 10) == b""
        await until(lambda: agg.state.decode.invalid_frames == 1)
        good_w.write(_frame([[1, w.Kind.DROPPED, 2]]))
        await until(lambda: agg.state.workers["g"].dropped == 3)
        got = await scrape(agg)
        assert value(got, "pacs_telemetry_invalid_total", reason="no_hello") == 1
        assert value(got, "pacs_telemetry_invalid_total", reason="invalid_record") == 1
        assert value(got, "pacs_telemetry_invalid_total", reason="unsupported_record") == 2
        assert value(got, "pacs_telemetry_invalid_total", reason="invalid_frame") == 1
        assert value(got, "pacs_telemetry_invalid_total", reason="oversized_frame") == 1
        assert value(got, "pacs_telemetry_dropped_total", worker="g") == 3
        for wr in (good_w, bad_w, huge_w):
            wr.close()
        await agg.close()

    asyncio.run(scenario())


def test_socket_file_handling(sockdir: str) -> None:
    async def scenario() -> None:
        path = os.path.join(sockdir, "agg.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)  # a socket file nobody listens on: left by a dead aggregator
        stale.close()
        agg = Aggregator(path, port=0)
        await agg.start()
        assert os.stat(path).st_mode & 0o777 == 0o600
        second = Aggregator(path, port=0)
        with pytest.raises(OSError):
            await second.start()  # never steals a live aggregator's socket
        await agg.close()
        with open(path, "w") as f:
            f.write("not a socket")
        with pytest.raises(FileExistsError):
            await Aggregator(path, port=0).start()

    asyncio.run(scenario())


def test_command_line(sockdir: str) -> None:
    """``python -m metrics`` as the supervisor runs it: frames in, /metrics out,
    SIGTERM ends it cleanly."""
    path = os.path.join(sockdir, "agg.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "metrics", "--socket", path, "--port", "0", "--log-level", "info"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        port = 0
        for _ in range(20):  # the first lines: the one naming the address comes first
            line = proc.stderr.readline()
            found = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "the aggregator did not log its address"

        async def send() -> None:
            t = Telemetry(path, 4, interval=3600)
            await t.start()
            for _ in range(25):
                t.dimse(RECEIVED, 0x0030, None)
                t.dimse(SENT, 0x8030, 0)
            await t.close()

        asyncio.run(send())
        want = (
            'pacs_dimse_messages_total{command="C-ECHO-RSP",direction="sent",status="0x0000",'
            'status_category="success",worker="4"} 25.0'
        )
        text = ""
        for _ in range(100):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            text = text.decode()
            if want in text:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert want in text
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
    assert not os.path.exists(path)


def _families() -> set[str]:
    """Names of every family the collector emits (histogram and counter suffixes off)."""
    agg = Aggregator("/nonexistent/agg.sock")
    return {family.name for family in text_string_to_metric_families(agg.exposition().decode())}


def test_documentation_and_dashboard_match_the_metrics() -> None:
    families = _families()
    assert len(families) >= 25
    readme = ""
    for page in ("README.md", os.path.join("docs", "metrics.md")):
        with open(os.path.join(REPO, page)) as f:
            readme += f.read()
    for name in families:
        documented = name + "_total" if f"`{name}_total`" in readme else name
        assert f"`{documented}`" in readme, f"{name} is not documented"
    with open(os.path.join(REPO, "metrics", "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert exprs
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bpacs_[a-z_]+", expr):
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert base in families, f"dashboard uses unknown metric {name}"
            used.add(base)
    assert len(used) >= 20


def test_refused_contexts_and_audit_messages_counted(sockdir: str) -> None:
    """A worker's refused presentation contexts and both processes' audit message
    totals (read from the real syslog sender, whose collector is not there) arrive as
    exact counters, across ticks, without double counting."""
    from workers.audit.syslog import SyslogSender

    async def scenario() -> None:
        path = os.path.join(sockdir, "agg.sock")
        agg = Aggregator(path, port=0)
        await agg.start()
        worker = Telemetry(path, 0, interval=3600)
        supervisor = Telemetry(path, "supervisor", role="supervisor", interval=3600)
        await worker.start()
        await supervisor.start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        senders = [SyslogSender(f"tcp://127.0.0.1:{dead}", timeout=1.0) for _ in range(2)]
        worker.watch_audit(senders[0])
        supervisor.watch_audit(senders[1])
        worker.context_rejected("abstract-syntax-not-supported")
        worker.context_rejected("abstract-syntax-not-supported")
        worker.context_rejected("transfer-syntaxes-not-supported")
        for sender, n in zip(senders, (3, 2), strict=True):
            for _ in range(n):
                sender.submit(lambda: b"<AuditMessage/>")
        await until(lambda: senders[0].dropped == 3 and senders[1].dropped == 2, timeout=15)
        await _delivered(agg, [worker, supervisor])
        await _delivered(agg, [worker, supervisor])  # a second tick adds nothing
        got = await scrape(agg)
        v = lambda name, **labels: value(got, name, **labels)  # noqa: E731
        name = "pacs_presentation_contexts_rejected_total"
        assert v(name, reason="abstract-syntax-not-supported") == 2
        assert v(name, reason="transfer-syntaxes-not-supported") == 1
        assert v("pacs_audit_messages_dropped_total") == 5
        assert v("pacs_audit_messages_sent_total") == 0
        for sender in senders:
            sender.close(0.5)
        await worker.close()
        await supervisor.close()
        await agg.close()

    asyncio.run(scenario())
