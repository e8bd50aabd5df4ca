"""Two pacs-receiver nodes behind a REAL HAProxy (deploy/haproxy.cfg, leastconn,
``send-proxy-v2``), one REAL moto S3 server (the shared bucket), one REAL PostgreSQL
(the shared index) and a REAL Prometheus (deploy/prometheus.yml) scraping both nodes,
all on 127.0.0.1, brought up by deploy/cluster.py's :class:`Cluster`.

* end to end: every instance pacs-loadtest sent through HAProxy is in the bucket
  exactly once with the data set it sent (SHA-256), in the index exactly once, with
  the client's address (not HAProxy's), and Prometheus sums both nodes' C-STORE
  counters to the number sent;
* fault: one node SIGKILLed under load (spool durability): HAProxy takes it out,
  new associations all go to the other node, and once the killed node is back every
  instance that was answered Success is in the bucket and in the index.

Also: the deploy/ configurations pass their own tools' checks (haproxy -c, promtool
check config, systemd-analyze verify).
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.cluster import (
    BALANCER_SOURCE,
    Cluster,
    HAProxy,
    Node,
    Prometheus,
    loadtest,
    read_records,
    wait_for,
)
from deploy.components import haproxy_binary
from tests.pgserver import PostgresServer
from workers.index.digest import dataset_offset

pytest.importorskip("boto3")
pytest.importorskip("moto.server")
pytest.importorskip("psycopg")

HAPROXY = haproxy_binary()
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    HAPROXY is None or PROMETHEUS is None,
    reason="HAProxy or Prometheus is not installed (make test installs both)",
)


def start_cluster(tmp_path: Path, pg_server: PostgresServer, *node_args: str) -> Cluster:
    cluster = Cluster(
        tmp_path / "cluster",
        workers=1,
        node_args=["--fsync", "never", *node_args],
        index_url=pg_server.new_database(),
    )
    return cluster.__enter__()


@pytest.fixture
def direct(tmp_path: Path, pg_server: PostgresServer) -> Iterator[Cluster]:
    cluster = start_cluster(tmp_path, pg_server, "--s3-durability", "direct")
    yield cluster
    cluster.stop()


@pytest.fixture
def spool(tmp_path: Path, pg_server: PostgresServer) -> Iterator[Cluster]:
    cluster = start_cluster(tmp_path, pg_server, "--s3-durability", "spool")
    yield cluster
    cluster.stop()


def uid_of(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".dcm")


def host_of(source: str) -> str:
    return source.rsplit(":", 1)[0]


def stored_digest(body: bytes) -> str:
    return hashlib.sha256(memoryview(body)[dataset_offset(body[:4096]) :]).hexdigest()


def send_from(address: str, port: int, files: list[Path]) -> list[int]:
    """C-STORE ``files`` over one pynetdicom association from ``address``."""
    from tests.receiver.conftest import release, scu_ae

    ae = scu_ae(storage=True)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSRX", bind_address=(address, 0))
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(str(f)).Status) for f in files]
    finally:
        release(assoc)


# --------------------------------------------------------------------- end to end


def test_two_nodes_behind_haproxy_every_instance_once(direct: Cluster, tmp_path: Path) -> None:
    assert direct.haproxy is not None and direct.moto is not None
    count = 240
    status, records, _report = loadtest(
        direct.haproxy.port, count, tmp_path, associations=4, per_association=20, timeout=300
    )
    sent = read_records(records)
    assert status == 0, (tmp_path / "loadtest.log").read_text()
    assert len(sent) == count and all(s == 0 for s, _ in sent.values())

    # A second client, from another loopback address, through the same balancer.
    from tests.receiver.conftest import make_files, sop_uid

    files = make_files(tmp_path / "in", 2, pixel_bytes=4096)
    other = "127.0.0.2"
    assert send_from(other, direct.haproxy.port, files) == [0, 0]
    others = {sop_uid(f) for f in files}

    # The bucket: each instance once, the data set byte for byte as sent (direct:
    # Success came after the object store confirmed it).
    objects = direct.moto.objects()
    uids = [uid_of(key) for key in objects]
    assert len(uids) == len(set(uids)) == count + 2
    assert set(uids) == set(sent) | others
    for key in objects:
        uid = uid_of(key)
        if uid in sent:
            assert stored_digest(direct.moto.body(key)) == sent[uid][1], key

    # The shared index: each instance once, both nodes, the client's address.
    wait_for(lambda: len(direct.index_rows()) >= count + 2, 30, "the index rows")
    rows = direct.index_rows()
    assert len(rows) == count + 2
    by_uid = {row[0]: row for row in rows}
    assert set(by_uid) == set(sent) | others
    assert {row[1] for row in rows} == {"node1", "node2"}
    for uid, (_status, digest) in sent.items():
        assert by_uid[uid][3] == digest
    # HAProxy connects from BALANCER_SOURCE; the PROXY header named the client.
    assert {host_of(by_uid[uid][2]) for uid in sent} == {"127.0.0.1"}
    assert {host_of(by_uid[uid][2]) for uid in others} == {other}
    assert BALANCER_SOURCE not in {host_of(row[2]) for row in rows}

    # Prometheus, scraping both nodes, sums their counters to what was sent.
    assert direct.prometheus is not None
    prometheus = direct.prometheus
    wait_for(lambda: direct.cstore_sum() == count + 2, 30, "a scrape with every C-STORE")
    per_node = prometheus.query("sum by (instance) (pacs_cstore_instances_total)")
    assert len(per_node) == 2
    assert all(float(item["value"][1]) > 0 for item in per_node)


# -------------------------------------------------------------------------- fault


def node_rows(cluster: Cluster, name: str) -> int:
    return sum(1 for row in cluster.index_rows() if row[1] == name)


def test_sigkill_of_a_node_under_load(spool: Cluster, tmp_path: Path) -> None:
    assert spool.haproxy is not None and spool.moto is not None
    haproxy = spool.haproxy
    victim, survivor = spool.nodes
    first = tmp_path / "first"
    first.mkdir()
    cmd_dir = first
    # Many short associations, so that the load keeps opening new ones.
    proc = _background_loadtest(haproxy.port, 1000, cmd_dir)
    try:
        wait_for(lambda: node_rows(spool, victim.name) >= 30, 60, "load on the victim")
        assert proc.poll() is None  # under load
        victim.kill()
        wait_for(lambda: haproxy.stats().get(victim.name, "").startswith("DOWN"), 30, "victim DOWN")
        proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    sent = read_records(cmd_dir / "sent.tsv")
    ok = {uid for uid, (status, _) in sent.items() if status == 0}
    assert len(ok) > 30

    # With the victim down, new associations all go to the survivor.
    second = tmp_path / "second"
    second.mkdir()
    before = node_rows(spool, survivor.name)
    status, records, _ = loadtest(haproxy.port, 60, second, associations=4, per_association=5)
    assert status == 0, (second / "loadtest.log").read_text()
    later = read_records(records)
    assert all(s == 0 for s, _ in later.values()) and len(later) == 60
    wait_for(lambda: node_rows(spool, survivor.name) >= before + 60, 30, "survivor rows")
    rows = {row[0]: row[1] for row in spool.index_rows()}
    assert {rows.get(uid) for uid in later} == {survivor.name}

    # The victim comes back (same spool): every Success is in the bucket and indexed.
    spool.restart(victim)
    spool.wait_servers_up()
    acknowledged = ok | set(later)
    wait_for(
        lambda: acknowledged <= {uid_of(k) for k in spool.moto.objects()},  # type: ignore[union-attr]
        120,
        "every acknowledged instance in the bucket",
    )
    wait_for(
        lambda: acknowledged <= {row[0] for row in spool.index_rows()}, 60, "every one indexed"
    )
    objects = spool.moto.objects()
    for key in objects:
        uid = uid_of(key)
        if uid in ok:
            assert stored_digest(spool.moto.body(key)) == sent[uid][1], key


def test_sigterm_drains_a_node_without_failing_an_association(
    tmp_path: Path, pg_server: PostgresServer
) -> None:
    cluster = start_cluster(tmp_path, pg_server, "--s3-durability", "direct",
                            "--drain-delay", "4", "--graceful-timeout", "20")  # fmt: skip
    try:
        assert cluster.haproxy is not None and cluster.moto is not None
        haproxy = cluster.haproxy
        victim, survivor = cluster.nodes
        proc = _background_loadtest(haproxy.port, 800, tmp_path)
        try:
            wait_for(lambda: node_rows(cluster, victim.name) >= 20, 60, "load on the victim")
            assert victim.service is not None and proc.poll() is None
            victim.service.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            # /readyz says 503 at once: HAProxy takes the node out while it still
            # accepts, then its open associations finish.
            wait_for(lambda: haproxy.stats().get(victim.name, "").startswith("DOWN"), 30, "DOWN")
            assert victim.service.proc.wait(60) == 0  # type: ignore[union-attr]
            assert proc.wait(240) == 0, (tmp_path / "loadtest.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        sent = read_records(tmp_path / "sent.tsv")
        assert len(sent) == 800 and all(s == 0 for s, _ in sent.values())
        wait_for(lambda: len(cluster.index_rows()) >= 800, 30, "the index rows")
        assert {uid_of(k) for k in cluster.moto.objects()} == set(sent)
        assert node_rows(cluster, survivor.name) > 0
    finally:
        cluster.stop()


def _background_loadtest(port: int, count: int, workdir: Path) -> subprocess.Popen[bytes]:
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "pacs-loadtest"), "--host", "127.0.0.1", "--port", str(port),
           "--called-ae", "PACSRX", "--count", str(count), "--associations", "4",
           "--per-association", "10", "--size", "8k", "--timeout", "10", "--grace", "5",
           "--rate", "200",  # still sending when the node goes, on any machine
           "--record-uids", str(workdir / "sent.tsv"), "--no-progress", "-q"]  # fmt: skip
    with open(workdir / "loadtest.log", "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


# ------------------------------------------------------------- the configurations


def test_haproxy_configuration_is_valid(tmp_path: Path) -> None:
    nodes = [Node(f"node{i}", tmp_path / f"node{i}", []) for i in (1, 2)]
    config = HAProxy(tmp_path, nodes).config
    text = config.read_text()
    servers = [line.split() for line in text.splitlines() if line.startswith("    server ")]
    assert len(servers) == 2 and all("check" in s and "port" in s for s in servers)
    assert "default-server send-proxy-v2 " in text
    assert "balance leastconn" in text
    done = subprocess.run([str(HAPROXY), "-c", "-f", str(config)], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_prometheus_configuration_is_valid(tmp_path: Path) -> None:
    nodes = [Node(f"node{i}", tmp_path / f"node{i}", []) for i in (1, 2, 3)]
    Prometheus(tmp_path, nodes)
    done = subprocess.run([str(PROMTOOL), "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_is_valid(tmp_path: Path) -> None:
    unit = Path(__file__).resolve().parents[2] / "deploy" / "pacs-receiver.service"
    text = unit.read_text()
    for setting in ("Type=simple", "KillSignal=SIGTERM", "Restart=on-failure",
                    "RestartPreventExitStatus=2", "NoNewPrivileges=yes"):  # fmt: skip
        assert f"\n{setting}\n" in text, setting
    # Where the unit expects the installation, this checkout's command.
    local = tmp_path / "pacs-receiver.service"
    local.write_text(text.replace("/opt/pacs-receiver/.venv/bin", str(Path(sys.executable).parent)))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # systemd's SIGKILL must not come before the drain delay and the graceful timeout.
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0].isalpha()
    )
    flags = settings["ExecStart"].split()
    drain = float(flags[flags.index("--drain-delay") + 1])
    graceful = float(flags[flags.index("--graceful-timeout") + 1])
    assert float(settings["TimeoutStopSec"]) > drain + graceful
