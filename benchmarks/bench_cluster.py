"""One node against two nodes behind HAProxy, same run, same sender load; then S3.

Usage:
  python benchmarks/bench_cluster.py [--size 8k] [--count 3000] [--associations 8]
         [--repeat 3] [--workers 1] [--s3] [--s3-count 500]

One :class:`deploy.cluster.Cluster` for the whole run: PostgreSQL (the shared index),
two pacs-receiver nodes (``--workers`` each, storing on their own directory,
``--fsync never``), HAProxy (deploy/haproxy.cfg, ``send-proxy-v2``) and Prometheus,
all on 127.0.0.1. Per repeat, the same pacs-loadtest workload against:

* ``direct``: node1's own port, no balancer;
* ``haproxy-1``: HAProxy with node2 in maintenance (admin socket), so only node1;
* ``haproxy-2``: HAProxy with both nodes;

in an order rotated between repeats, after one unmeasured warm-up run. Printed:
instances/s acknowledged per run, the median per configuration and each
configuration's ratio to ``direct`` and ``haproxy-2``'s to ``haproxy-1``, paired
within a repeat (median over repeats).

``--s3``: then benchmarks/bench_s3.py (local against S3 direct and spool, its own
moto server and receivers) with ``--s3-count``; its output follows.

Read ratios, not absolute numbers: on a 2-core machine two nodes, HAProxy, the load
generator, PostgreSQL and Prometheus share the same cores, so a second node adds
worker processes but no CPU; the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_metrics_cost import drive
from bench_s3 import loadavg

from deploy.cluster import Cluster, wait_for

CONFIGS = ("direct", "haproxy-1", "haproxy-2")


def set_node2(cluster: Cluster, ready: bool) -> None:
    """node2 in or out of HAProxy's pool (``set server ... state``), and wait for it."""
    assert cluster.haproxy is not None
    haproxy = cluster.haproxy
    haproxy.command(f"set server receivers/node2 state {'ready' if ready else 'maint'}")
    want = "UP" if ready else "MAINT"
    wait_for(lambda: haproxy.stats().get("node2", "").startswith(want), 30, f"node2 {want}")


def run_config(cluster: Cluster, config: str, args: argparse.Namespace, out: Path) -> float:
    assert cluster.haproxy is not None
    if config == "direct":
        port = cluster.nodes[0].port
    else:
        set_node2(cluster, ready=config == "haproxy-2")
        port = cluster.haproxy.port
    return drive(port, args, out)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="8k")
    ap.add_argument("--count", type=int, default=3000, help="instances per run")
    ap.add_argument("--associations", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="worker processes per node")
    ap.add_argument("--s3", action="store_true", help="then run benchmarks/bench_s3.py")
    ap.add_argument("--s3-count", type=int, default=500)
    args = ap.parse_args()
    print(f"load average at start: {loadavg()}", flush=True)
    rates: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        cluster = Cluster(
            Path(tmp),
            workers=args.workers,
            local_storage=True,
            node_args=["--fsync", "never"],
            scrape_interval="5s",
        )
        with cluster:
            # Not measured: the first run pays for cold caches, connections and the
            # database's first pages, whichever configuration it is.
            warm = argparse.Namespace(**{**vars(args), "count": max(100, args.count // 5)})
            run_config(cluster, "haproxy-2", warm, Path(tmp) / "warm-up.json")
            for i in range(args.repeat):
                order = CONFIGS[i % 3 :] + CONFIGS[: i % 3]
                for config in order:
                    out = Path(tmp) / f"{config}-{i}.json"
                    t0 = time.monotonic()
                    rate = run_config(cluster, config, args, out)
                    rates[config].append(rate)
                    print(
                        f"run {i + 1} {config:9}: {rate:7.0f} instances/s "
                        f"({time.monotonic() - t0:.1f} s, load {loadavg()})",
                        flush=True,
                    )
    print(
        f"\n{args.size} x {args.associations} associations, {args.count} instances per run, "
        f"{args.workers} worker(s) per node, median of {args.repeat}:"
    )
    for config in CONFIGS:
        ratio = statistics.median(
            got / base for got, base in zip(rates[config], rates["direct"], strict=True)
        )
        print(
            f"  {config:9} {statistics.median(rates[config]):7.0f} instances/s  "
            f"x{ratio:.2f} of direct (paired)"
        )
    two = statistics.median(
        b / a for a, b in zip(rates["haproxy-1"], rates["haproxy-2"], strict=True)
    )
    print(f"  two nodes / one node behind HAProxy: x{two:.2f} (paired)")
    print(f"load average at end: {loadavg()}", flush=True)
    if args.s3:
        bench_s3 = Path(__file__).resolve().parent / "bench_s3.py"
        cmd = [
            sys.executable,
            str(bench_s3),
            "--sizes",
            args.size,
            "--count",
            str(args.s3_count),
            "--repeat",
            "1",
            "--associations",
            str(args.associations),
        ]
        print(f"\n$ bench_s3.py {' '.join(cmd[2:])}", flush=True)
        return subprocess.run(cmd, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
