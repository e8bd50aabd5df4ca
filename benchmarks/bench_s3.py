"""What storing in an S3 object store costs against the local filesystem.

Usage:
  python benchmarks/bench_s3.py [--sizes 8k,512k] [--count 1000] [--repeat 2]
         [--associations 4] [--workers 2]

One moto standalone S3 server (127.0.0.1, the test extra's ``moto[server]``) for the
whole run; per size and repeat, a fresh pacs-receiver (fsync never, index off,
metrics off) storing locally, then ``--storage s3://... --s3-durability direct``,
then ``spool`` (order rotated between repeats), each driven by the same
pacs-loadtest workload. Printed: instances/s acknowledged, medians, and each S3 mode's
ratio to local from the same repeat (median over repeats). For ``spool`` also the
time until the backlog reached the bucket ("drained"). The store is reset between
runs (moto's /moto-api/reset).

Read the ratios, not the absolute numbers: moto is one Python process on the same
2 cores as the receiver and the load generator, far slower than AWS S3, MinIO or
Ceph; the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_metrics_cost import BIN, drive, stop

BUCKET = "bench"
ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(url: str):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip


def reset(url: str) -> None:
    request = urllib.request.Request(url + "/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    client(url).create_bucket(Bucket=BUCKET)


def count_objects(url: str) -> int:
    n = 0
    for page in client(url).get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        n += len(page.get("Contents", []))
    return n


def start(base: Path, mode: str, url: str, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    log = base.with_suffix(".log")
    cmd = [str(BIN / "pacs-receiver"), "--host", "127.0.0.1", "--port", "0",
           "--workers", str(workers), "--fsync", "never", "--metrics-port", "0",
           "--index", "off"]  # fmt: skip
    if mode == "local":
        cmd += ["--storage", str(base)]
    else:
        cmd += ["--storage", f"s3://{BUCKET}/bench", "--s3-endpoint", url,
                "--s3-durability", mode, "--s3-spool", str(base)]  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, **ENV})  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "listening on 127.0.0.1:" in text and text.count("ready (pid") >= workers:
            port = int(text.split("listening on 127.0.0.1:", 1)[1].split()[0])
            return proc, port
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"pacs-receiver did not start:\n{log.read_text()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--sizes", default="8k,512k")
    ap.add_argument("--count", type=int, default=1000, help="instances per run")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(f"load average at start: {loadavg()}", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    modes = ("local", "direct", "spool")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                reset(url)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
            for size in args.sizes.split(","):
                args.size = size
                rates: dict[str, list[float]] = {m: [] for m in modes}
                drained: list[float] = []
                for i in range(args.repeat):
                    order = modes[i % 3 :] + modes[: i % 3]
                    for mode in order:
                        reset(url)
                        base = Path(tmp) / f"{size}-{mode}-{i}"
                        proc, rx_port = start(base, mode, url, args.workers)
                        try:
                            t0 = time.monotonic()
                            rate = drive(rx_port, args, base.with_suffix(".json"))
                            if mode != "local":
                                while count_objects(url) < args.count:
                                    if time.monotonic() - t0 > 600:
                                        raise SystemExit(f"{mode}: objects missing after 600 s")
                                    time.sleep(0.2)
                                if mode == "spool":
                                    drained.append(time.monotonic() - t0)
                        finally:
                            stop(proc)
                        rates[mode].append(rate)
                        print(f"{size} run {i + 1} {mode:6}: {rate:7.0f} instances/s "
                              f"(load {loadavg()})", flush=True)  # fmt: skip
                print(f"\n{size} x {args.associations} associations, {args.count} instances, "
                      f"{args.workers} workers, median of {args.repeat}:")  # fmt: skip
                for mode in modes:
                    ratio = statistics.median(
                        got / base for got, base in zip(rates[mode], rates["local"], strict=True)
                    )
                    print(f"  {mode:6} {statistics.median(rates[mode]):7.0f} instances/s  "
                          f"x{ratio:.2f} of local (paired)")  # fmt: skip
                if drained:
                    print(f"  spool: all {args.count} in the bucket after "
                          f"{statistics.median(drained):.1f} s (median)\n")  # fmt: skip
    finally:
        moto.terminate()
        moto.wait(10)
    print(f"load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
