#!/usr/bin/env python3
"""CPU per received C-STORE instance of one pacs-receiver worker process.

Starts ``pacs-receiver --workers 1 --fsync F`` on a free port (metrics on, on another
free port), warms it up, then drives it with ``pacs-loadtest`` and reports the worker's
utime and stime (from /proc/<pid>/stat) per instance, in microseconds. Optionally
(``--strace``) counts the worker's system calls during a second run (strace -c -f).
CPU time, not throughput: it is what other jobs on a shared machine disturb least.

  .venv/bin/python benchmarks/bench_worker_cpu.py --size 8k --associations 4 --count 20000
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.proctree import children

CLK_TCK = os.sysconf("SC_CLK_TCK")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def worker_pid(root: int) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for pid in children(root):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"workers.main" in cmd:
                return pid
        time.sleep(0.1)
    raise SystemExit("no worker process")


def load(port: int, size: str, assocs: int, count: int) -> None:
    cmd = [
        str(BIN / "pacs-loadtest"),
        "--port",
        str(port),
        "--size",
        size,
        "--associations",
        str(assocs),
        "--processes",
        str(min(assocs, 2)),
        "--count",
        str(count),
        "-q",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="8k")
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--fsync", default="never")
    ap.add_argument("--strace", action="store_true", help="also count syscalls (extra run)")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="receiver on the last CPU, pacs-loadtest on the others (taskset)",
    )
    ap.add_argument(
        "--storage-parent",
        default="/tmp",
        help="where the storage root is made. On ext4 without a journal, creating a file "
        "scans the block group's recently deleted inodes: a fresh top-level directory "
        "('/') keeps that cost (other jobs' deletions) out of the measurement",
    )
    args = ap.parse_args()
    port, mport = free_port(), free_port()
    storage = os.path.abspath(tempfile.mkdtemp(prefix="bench-cpu-", dir=args.storage_parent))
    rx = subprocess.Popen(
        [
            str(BIN / "pacs-receiver"),
            "--workers",
            "1",
            "--fsync",
            args.fsync,
            "--port",
            str(port),
            "--metrics-port",
            str(mport),
            "--storage",
            storage,
            "--log-level",
            "WARNING",
        ],
        start_new_session=True,
        # Not the caller's directory: "python -m workers.main" puts its working
        # directory first on sys.path, which would shadow PYTHONPATH (comparing trees).
        cwd="/",
    )
    try:
        wpid = worker_pid(rx.pid)
        time.sleep(1.0)
        load(port, args.size, args.associations, min(2000, args.count))  # warm-up
        for _ in range(args.repeat):
            u0, s0 = cpu(wpid)
            t0 = time.monotonic()
            load(port, args.size, args.associations, args.count)
            wall = time.monotonic() - t0
            u1, s1 = cpu(wpid)
            n = args.count
            print(
                f"{args.size} x{args.associations} n={n}: user {(u1 - u0) / n * 1e6:6.1f} us"
                f"  sys {(s1 - s0) / n * 1e6:6.1f} us  total {(u1 - u0 + s1 - s0) / n * 1e6:6.1f}"
                f" us/instance  ({n / wall:.0f} inst/s wall)",
                flush=True,
            )
        if args.strace:
            out = tempfile.mktemp(suffix=".strace")
            st = subprocess.Popen(
                ["strace", "-c", "-f", "-o", out, "-p", str(wpid)], stderr=subprocess.DEVNULL
            )
            time.sleep(1.0)
            n = min(args.count, 5000)
            load(port, args.size, args.associations, n)
            st.send_signal(signal.SIGINT)
            st.wait()
            text = Path(out).read_text()
            print(text)
            for line in text.splitlines():
                if line.rstrip().endswith("total"):
                    calls = int(line.split()[3])
                    print(f"syscalls per instance: {calls / n:.2f}")
    finally:
        os.killpg(rx.pid, signal.SIGTERM)
        try:
            rx.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(rx.pid, signal.SIGKILL)
        shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
