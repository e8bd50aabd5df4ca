"""Two pacs-receiver nodes behind HAProxy, on one machine, end to end.

Usage (as root, from the repository with the test extra installed)::

    .venv/bin/python deploy/cluster.py [--count 2000] [--size 64k] [--associations 8]
                                       [--durability spool] [--nodes 2] [--keep DIR]

Inside a fresh network namespace that has only ``lo`` (loadtest/netns.py: nothing
started here is reachable from outside, whatever it binds), this brings up

* PostgreSQL (``initdb`` into a temporary directory, unix socket only): the shared
  index both nodes write (``--index postgresql://...``, ``--index-node nodeN``);
* moto's standalone S3 server with one bucket: the object store both nodes write
  (``--storage s3://pacs/cluster --s3-endpoint ...``, ``direct`` or ``spool``);
* N ``pacs-receiver`` nodes on their own DICOM and metrics ports;
* HAProxy from deploy/haproxy.cfg (leastconn, ``send-proxy-v2``, health checks on
  each node's ``/readyz``);
* Prometheus from deploy/prometheus.yml, scraping every node's metrics port;

then drives ``pacs-loadtest`` through HAProxy, prints what arrived (objects in the
bucket, rows in the index per node and per source address, Prometheus' sum of the
C-STORE counters) and tears everything down. Every wait is bounded; the whole run
stops by itself (``--deadline``).

The same machinery (:class:`Cluster`) is what tests/cluster/ runs, on 127.0.0.1
without a namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository's packages
    sys.path.insert(0, str(REPO))

from deploy.components import (  # noqa: E402 - after the path set-up above
    AWS_ENV,
    BALANCER_SOURCE,
    BIN,
    BUCKET,
    PREFIX,
    HAProxy,
    Moto,
    Node,
    Prometheus,
    free_port,
    render,
    wait_for,
)

__all__ = [
    "BALANCER_SOURCE",
    "Cluster",
    "HAProxy",
    "Node",
    "Prometheus",
    "free_port",
    "loadtest",
    "main",
    "read_records",
    "render",
    "wait_for",
]

# ----------------------------------------------------------------------- cluster


@dataclass
class Cluster:
    """PostgreSQL, an S3 server, N nodes, HAProxy and Prometheus under ``workdir``.

    ``node_args`` are extra flags for every node (``--s3-durability spool``, ...);
    ``index_url``: an empty PostgreSQL database to share (else one is initdb'd here);
    ``local_storage``: each node on its own directory, no S3 server (benchmarks).
    Use as a context manager: everything started is stopped on the way out.
    """

    workdir: Path
    nodes_count: int = 2
    workers: int = 1
    node_args: list[str] = field(default_factory=list)
    #: each node stores under its own directory instead of the S3 bucket (no moto)
    local_storage: bool = False
    scrape_interval: str = "1s"
    pg: Any = None
    moto: Moto | None = None
    nodes: list[Node] = field(default_factory=list)
    haproxy: HAProxy | None = None
    prometheus: Prometheus | None = None
    index_url: str = ""

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **AWS_ENV,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.index_url:  # else a database the caller made
            from tests.pgserver import PostgresServer, find_bindir

            bindir = find_bindir()
            if bindir is None:
                raise RuntimeError("PostgreSQL is not installed (make test installs it)")
            self.pg = PostgresServer(bindir)
            self.pg.start()
            self.index_url = self.pg.new_database()
        args = ["--index", self.index_url, *self.node_args]
        if not self.local_storage:
            self.moto = Moto(self.workdir).start()
            args += ["--storage", f"s3://{BUCKET}/{PREFIX}", "--s3-endpoint", self.moto.url]
        # HAProxy sends a PROXY v2 header (deploy/haproxy.cfg); it connects from here.
        args += ["--proxy-protocol-from", f"{BALANCER_SOURCE}/32"]
        self.nodes = []
        for i in range(self.nodes_count):
            base = self.workdir / f"node{i + 1}"
            local = ["--storage", str(base / "store")] if self.local_storage else []
            self.nodes.append(Node(f"node{i + 1}", base, [*args, *local]))
        for node in self.nodes:
            node.start(self.env(), self.workers)
        self.haproxy = HAProxy(self.workdir, self.nodes)
        self.haproxy.start()
        self.wait_servers_up()
        self.prometheus = Prometheus(self.workdir, self.nodes, self.scrape_interval).start()
        wait_for(lambda: self.prometheus_up() == len(self.nodes), 60, "Prometheus targets up")

    def prometheus_up(self) -> int:
        return self.prometheus.targets_up() if self.prometheus else 0

    def wait_servers_up(self, timeout: float = 30.0) -> None:
        assert self.haproxy is not None
        haproxy = self.haproxy
        names = {n.name for n in self.nodes}

        def all_up() -> bool:
            haproxy.service.check()
            stats = haproxy.stats()
            return all(stats.get(name, "").startswith("UP") for name in names)

        wait_for(all_up, timeout, "HAProxy to see every node UP")

    def restart(self, node: Node) -> None:
        node.start(self.env(), self.workers)

    def stop(self) -> None:
        for part in (self.prometheus, self.haproxy):
            if part is not None:
                part.service.stop()
        for node in self.nodes:
            node.stop()
        if self.moto is not None:
            self.moto.service.stop()
        if self.pg is not None:
            self.pg.stop()

    # -- what arrived ---------------------------------------------------------------

    def index_rows(self) -> list[tuple[str, str, str, str, str]]:
        """(SOP Instance UID, node, source address, digest, path) of every row."""
        import psycopg

        with psycopg.connect(self.index_url) as conn:
            rows = conn.execute(
                "SELECT sop_instance_uid, node, source_address, digest, path FROM instances"
            ).fetchall()
        return [tuple(map(str, row)) for row in rows]  # type: ignore[misc]

    def cstore_sum(self) -> float | None:
        """Prometheus: C-STORE requests answered, all nodes."""
        assert self.prometheus is not None
        return self.prometheus.value("sum(pacs_cstore_instances_total)")


# ----------------------------------------------------------------------- driving


def loadtest(
    port: int,
    count: int,
    workdir: Path,
    *,
    associations: int = 4,
    size: str = "8k",
    per_association: int | None = None,
    timeout: float = 600.0,
    extra: Sequence[str] = (),
) -> tuple[int, Path, dict[str, Any]]:
    """Run pacs-loadtest against 127.0.0.1:``port``: (exit status, the records file
    (UID, status, bytes, SHA-256 of the data set per line), the JSON report)."""
    records = workdir / "sent.tsv"
    report = workdir / "loadtest.json"
    cmd = [
        str(BIN / "pacs-loadtest"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--called-ae",
        "PACSRX",
        "--count",
        str(count),
        "--associations",
        str(associations),
        "--size",
        size,
        "--record-uids",
        str(records),
        "--json",
        str(report),
        "--no-progress",
        "-q",
        "--timeout",
        "30",
        *extra,
    ]
    if per_association:
        cmd += ["--per-association", str(per_association)]
    with open(workdir / "loadtest.log", "ab") as out:
        done = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    data = json.loads(report.read_text()) if report.exists() else {}
    return done.returncode, records, data


def read_records(path: Path) -> dict[str, tuple[int, str]]:
    """UID -> (status, SHA-256 of the data set sent) from a --record-uids file."""
    out: dict[str, tuple[int, str]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        uid, status, _nbytes, digest = line.split("\t")
        out[uid] = (int(status, 16) if status.startswith("0x") else -1, digest)
    return out


def summary(cluster: Cluster, sent: dict[str, tuple[int, str]]) -> str:
    """What arrived, as printed by :func:`main`."""
    assert cluster.moto is not None
    ok = {uid for uid, (status, _) in sent.items() if status == 0}
    objects = cluster.moto.objects()
    keys = {key.rsplit("/", 1)[-1].removesuffix(".dcm") for key in objects}
    rows = cluster.index_rows()
    per_node: dict[str, int] = {}
    per_source: dict[str, int] = {}
    for _uid, node, source, _digest, _path in rows:
        per_node[node] = per_node.get(node, 0) + 1
        host = source.rsplit(":", 1)[0] if source.count(":") == 1 else source
        per_source[host] = per_source.get(host, 0) + 1
    lines = [
        f"sent: {len(sent)} C-STORE requests, {len(ok)} answered Success",
        f"bucket s3://{BUCKET}/{PREFIX}: {len(objects)} objects, "
        f"{sum(objects.values())} bytes; Success instances missing: {len(ok - keys)}",
        f"index: {len(rows)} rows ({len({r[0] for r in rows})} distinct UIDs); "
        f"per node {dict(sorted(per_node.items()))}; per source {per_source}",
        f"prometheus: sum(pacs_cstore_instances_total) = {cluster.cstore_sum()}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="worker processes per node")
    ap.add_argument("--count", type=int, default=2000, help="instances to send")
    ap.add_argument("--size", default="64k", help="synthetic instance size")
    ap.add_argument("--associations", type=int, default=8)
    ap.add_argument("--durability", choices=("direct", "spool"), default="spool")
    ap.add_argument("--deadline", type=float, default=600, help="seconds for the whole run")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (logs, configs)")
    ap.add_argument(
        "--no-netns",
        action="store_true",
        help="run in this namespace (everything binds 127.0.0.1 anyway)",
    )
    args = ap.parse_args(argv)

    from loadtest import netns

    if not args.no_netns and (why := netns.unavailable()) is not None:
        print(f"deploy/cluster.py: {why} (or run with --no-netns)", file=sys.stderr)
        return 2
    # The whole run is bounded: SIGALRM ends it (the context managers tear down).
    signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(int(args.deadline))
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="pacs-cluster-"))
    namespace = contextlib.nullcontext() if args.no_netns else netns.loopback_namespace()
    try:
        with namespace:
            if not args.no_netns:
                print(f"network namespace with interfaces {netns.interfaces()}", flush=True)
            cluster = Cluster(
                workdir,
                nodes_count=args.nodes,
                workers=args.workers,
                node_args=["--s3-durability", args.durability],
            )
            with cluster:
                assert cluster.haproxy is not None and cluster.moto is not None
                prom = cluster.prometheus.url if cluster.prometheus else None
                print(
                    f"up: {len(cluster.nodes)} nodes, HAProxy on 127.0.0.1:"
                    f"{cluster.haproxy.port} (PROXY v2), "
                    f"S3 {cluster.moto.url}, Prometheus {prom}",
                    flush=True,
                )
                t0 = time.monotonic()
                status, records, report = loadtest(
                    cluster.haproxy.port,
                    args.count,
                    workdir,
                    associations=args.associations,
                    size=args.size,
                    per_association=50,
                )
                elapsed = time.monotonic() - t0
                sent = read_records(records)
                print(
                    f"pacs-loadtest exit {status} in {elapsed:.1f} s "
                    f"({report.get('instances_per_second', 0):.0f} instances/s)",
                    flush=True,
                )
                ok = sum(1 for s, _ in sent.values() if s == 0)
                _settle(cluster, ok, deadline=120)
                print(summary(cluster, sent), flush=True)
    finally:
        signal.alarm(0)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    return 0


def _settle(cluster: Cluster, ok: int, deadline: float) -> None:
    """Wait (bounded) until the bucket, the index and Prometheus have caught up."""
    assert cluster.moto is not None
    moto = cluster.moto
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: len(moto.objects()) >= ok, deadline, "the bucket")
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: len(cluster.index_rows()) >= ok, 30, "the index")
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: (cluster.cstore_sum() or 0) >= ok, 30, "a scrape")


def _deadline(signum: int, frame: Any) -> None:
    raise TimeoutError("deploy/cluster.py: --deadline reached; tearing down")


if __name__ == "__main__":
    sys.exit(main())
