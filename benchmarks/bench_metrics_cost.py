"""What metrics cost: pacs-receiver with --metrics-port 0 against metrics on, same run.

Usage: python benchmarks/bench_metrics_cost.py [--size 8k] [--associations 4]
       [--count 6000] [--repeat 3] [--workers 2]

Each repeat starts a fresh pacs-receiver (fsync never, storage in a temp dir) with
metrics off, then one with metrics on, on 127.0.0.1, drives each with the same
pacs-loadtest workload, and reads instances/s from its JSON report. Runs alternate so
that machine noise falls on both sides; the medians and their ratio are printed.
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
        stderr=log.open("wb"),
    )
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


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="8k")
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--metrics-port", type=int, default=19764)
    args = ap.parse_args()
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        base = Path(tmp)
        for i in range(args.repeat):
            for mode, port in (("off", 0), ("on", args.metrics_port)):
                proc, rx_port, _ = start(base / f"{mode}{i}", port, args.workers)
                try:
                    rates[mode].append(drive(rx_port, args, base / f"{mode}{i}.json"))
                finally:
                    stop(proc)
                print(f"run {i + 1} metrics {mode}: {rates[mode][-1]:.0f} instances/s", flush=True)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(
        f"{args.size} x {args.associations} associations, {args.count} instances, "
        f"median of {args.repeat}: metrics off {off:.0f}/s, on {on:.0f}/s: "
        f"cost {100 * (1 - on / off):+.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
