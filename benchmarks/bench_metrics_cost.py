"""What metrics cost: pacs-receiver with --metrics-port 0 against metrics on, same run.

Usage: python benchmarks/bench_metrics_cost.py [--size 8k] [--associations 4]
       [--count 6000] [--repeat 3] [--workers 2]

Each repeat starts a fresh pacs-receiver (fsync never, storage in a temp dir) with
metrics off, then one with metrics on, on 127.0.0.1, drives each with the same
pacs-loadtest workload, and measures two things:

- instances/s, from pacs-loadtest's JSON report;
- CPU seconds per instance of the receiver's process tree (supervisor, workers and,
  when on, the metrics aggregator: utime + stime from /proc/<pid>/stat of each, read
  just before and just after the load, plus cutime + cstime of any child reaped in
  between; loadtest/proctree.py), and of its workers alone.

Nothing scrapes /metrics during the runs: "on" is the telemetry the workers send and
the aggregator's handling of it. Runs alternate so that machine noise falls on both
sides; the medians of each metric, off and on, and on/off - 1 (as a percentage: for
CPU a cost is positive, for instances/s negative) are printed, with the median over
the repeats of each off/on pair's on/off - 1 ("paired") and how many pairs had on > off.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.proctree import tree_cpu_seconds, tree_pids

BIN = Path(sys.executable).parent


def start(
    storage: Path, metrics_port: int, workers: int
) -> tuple[subprocess.Popen[bytes], int, Path]:
    log = storage.parent / f"{storage.name}.log"
    proc = subprocess.Popen(
        [
            str(BIN / "pacs-receiver"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--workers",
            str(workers),
            "--fsync",
            "never",
            "--storage",
            str(storage),
            "--metrics-port",
            str(metrics_port),
            "--log-level",
            "INFO",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(err := log.open("wb")),
    )
    err.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        if found and text.count("ready (pid") >= workers:
            return proc, int(found.group(1)), log
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"pacs-receiver did not start:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def worker_pids(root: int) -> list[int]:
    pids = []
    for pid in tree_pids(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"workers.main" in cmd:
            pids.append(pid)
    return pids


def cpu(root: int, workers: list[int]) -> tuple[float, float]:
    """CPU seconds so far of the tree under ``root``, and of the ``workers`` alone."""
    return tree_cpu_seconds(root), sum(tree_cpu_seconds(pid) for pid in workers)


def drive(port: int, args: argparse.Namespace, out: Path) -> float:
    subprocess.run(
        [
            str(BIN / "pacs-loadtest"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--size",
            args.size,
            "--associations",
            str(args.associations),
            "--count",
            str(args.count),
            "--json",
            str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
    )
    report = json.loads(out.read_text())
    return float(report["instances_per_second"])


METRICS = (
    ("rate", "instances/s", "{:8.0f}"),
    ("tree", "tree CPU us/inst", "{:8.1f}"),
    ("worker", "worker CPU us/inst", "{:8.1f}"),
)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="8k", help="data set size (pacs-loadtest --size)")
    ap.add_argument("--associations", type=int, default=4, help="concurrent associations")
    ap.add_argument("--count", type=int, default=6000, help="instances per run")
    ap.add_argument("--repeat", type=int, default=3, help="off/on pairs of runs")
    ap.add_argument("--workers", type=int, default=2, help="pacs-receiver --workers")
    ap.add_argument("--metrics-port", type=int, default=19764, help="metrics port of the 'on' runs")
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {
        mode: {key: [] for key, _, _ in METRICS} for mode in ("off", "on")
    }
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        base = Path(tmp)
        for i in range(args.repeat):
            for mode, port in (("off", 0), ("on", args.metrics_port)):
                proc, rx_port, _ = start(base / f"{mode}{i}", port, args.workers)
                try:
                    workers = worker_pids(proc.pid)
                    if len(workers) != args.workers:
                        raise SystemExit(f"found worker pids {workers}, not {args.workers}")
                    tree0, work0 = cpu(proc.pid, workers)
                    rate = drive(rx_port, args, base / f"{mode}{i}.json")
                    tree1, work1 = cpu(proc.pid, workers)
                finally:
                    stop(proc)
                run = results[mode]
                run["rate"].append(rate)
                run["tree"].append((tree1 - tree0) / args.count * 1e6)
                run["worker"].append((work1 - work0) / args.count * 1e6)
                print(
                    f"run {i + 1} metrics {mode:3}: {rate:6.0f} instances/s, CPU per instance "
                    f"tree {run['tree'][-1]:6.1f} us, workers {run['worker'][-1]:6.1f} us",
                    flush=True,
                )
    print(
        f"\n{args.size} x {args.associations} associations, {args.count} instances, "
        f"{args.workers} workers, median of {args.repeat}:"
    )
    print(f"{'':20} {'off':>8} {'on':>8} {'on/off-1':>9} {'paired':>9} {'on>off':>7}")
    for key, label, fmt in METRICS:
        off = statistics.median(results["off"][key])
        on = statistics.median(results["on"][key])
        pairs = list(zip(results["off"][key], results["on"][key], strict=True))
        paired = statistics.median(b / a - 1 for a, b in pairs)
        higher = sum(b > a for a, b in pairs)
        print(
            f"{label:20} {fmt.format(off)} {fmt.format(on)} {100 * (on / off - 1):+8.1f}% "
            f"{100 * paired:+8.1f}% {higher:>3}/{len(pairs)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
