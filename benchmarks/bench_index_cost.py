"""What the instance index costs.

Usage:
  python benchmarks/bench_index_cost.py ingest [--size 8k] [--associations 4]
         [--count 4000] [--repeat 3] [--workers 2]
  python benchmarks/bench_index_cost.py scale [--records 100000] [--batch 1000]
         [--postgresql]
  python benchmarks/bench_index_cost.py digest

``ingest``: a fresh pacs-receiver (fsync never, storage in a temp dir, metrics off)
with ``--index off``, then one with the default SQLite index, alternating, each
driven by the same pacs-loadtest workload; instances/s and CPU per instance of the
receiver's tree and of its workers, medians off/on, and the median over the pairs of
on/off - 1 ("paired"). After each "on" run the index must hold every instance
(checked: a benchmark that lost records would measure nothing).

``scale``: ``Index.add_many`` of ``--records`` records in batches of ``--batch``
(what a worker's writer thread does), on SQLite (and, with --postgresql, on a
throw-away PostgreSQL server from Debian's package), printing the time per 10,000
records as the table grows: flat means no growth in per-instance cost.

``digest``: SHA-256 of 8 KiB and 512 KiB in fragments as the receiver hashes them
(per instance, microseconds).

The load average is printed at start and end: other work on the machine moves the
absolute numbers; the paired ratios are what to read.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_metrics_cost import BIN, cpu, drive, stop, worker_pids

from workers.index import IndexRecord, open_index


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


MODES = ("off", "on")


def ingest(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, list[float]]] = {
        mode: {"rate": [], "tree": [], "worker": []} for mode in MODES
    }
    with tempfile.TemporaryDirectory(prefix="bench-index-", dir=args.tmpdir) as tmp:
        base = Path(tmp)
        for i in range(args.repeat):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                storage = base / f"{mode}{i}"
                proc, port = _start(storage, args.workers, mode)
                try:
                    workers = worker_pids(proc.pid)
                    tree0, work0 = cpu(proc.pid, workers)
                    rate = drive(port, args, base / f"{mode}{i}.json")
                    tree1, work1 = cpu(proc.pid, workers)
                finally:
                    stop(proc)
                if mode == "on":
                    index = open_index(None, str(storage))
                    try:
                        indexed = index.count()
                    finally:
                        index.close()
                    if indexed != args.count:
                        raise SystemExit(f"index holds {indexed} of {args.count} instances")
                run = results[mode]
                run["rate"].append(rate)
                run["tree"].append((tree1 - tree0) / args.count * 1e6)
                run["worker"].append((work1 - work0) / args.count * 1e6)
                print(
                    f"run {i + 1} index {mode:3}: {rate:6.0f} instances/s, CPU per instance "
                    f"tree {run['tree'][-1]:6.1f} us, workers {run['worker'][-1]:6.1f} us "
                    f"(load {loadavg()})",
                    flush=True,
                )
                shutil.rmtree(storage, ignore_errors=True)
    print(
        f"\n{args.size} x {args.associations} associations, {args.count} instances, "
        f"{args.workers} workers, median of {args.repeat}:"
    )
    print(f"{'':20} {'off':>8} {'on':>8} {'on/off-1':>9} {'paired':>9} {'on>off':>7}")
    for key, label, fmt in (
        ("rate", "instances/s", "{:8.0f}"),
        ("tree", "tree CPU us/inst", "{:8.1f}"),
        ("worker", "worker CPU us/inst", "{:8.1f}"),
    ):
        off = statistics.median(results["off"][key])
        on = statistics.median(results["on"][key])
        pairs = list(zip(results["off"][key], results["on"][key], strict=True))
        paired = statistics.median(b / a - 1 for a, b in pairs)
        higher = sum(b > a for a, b in pairs)
        print(
            f"{label:20} {fmt.format(off)} {fmt.format(on)} {100 * (on / off - 1):+8.1f}% "
            f"{100 * paired:+8.1f}% {higher:>3}/{len(pairs)}"
        )


def _start(storage: Path, workers: int, mode: str) -> tuple[subprocess.Popen[bytes], int]:
    """pacs-receiver on 127.0.0.1 (fsync never, metrics off); ``--index off`` for "off"."""
    log = storage.parent / f"{storage.name}.log"
    cmd = [str(BIN / "pacs-receiver"), "--host", "127.0.0.1", "--port", "0",
           "--workers", str(workers), "--fsync", "never", "--storage", str(storage),
           "--metrics-port", "0", "--index", "off" if mode == "off" else "sqlite"]  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        if found and text.count("ready (pid") >= workers:
            return proc, int(found.group(1))
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"pacs-receiver did not start:\n{log.read_text()}")


def _record(n: int) -> IndexRecord:
    return IndexRecord(
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{n}.{n * 7919 % 1000003}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_uid=f"1.2.826.0.1.3680043.8.498.1.{n // 500}",
        series_uid=f"1.2.826.0.1.3680043.8.498.2.{n // 100}",
        patient_id=f"PID{n // 2000:06d}",
        patient_name="Doe^Jane",
        study_date="20240131",
        modality="CT",
        accession_number=f"ACC{n // 500}",
        calling_ae="MODALITY1",
        source_address="127.0.0.1:40000",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=8192,
        digest=hashlib.sha256(n.to_bytes(8, "little")).hexdigest(),
        path=f"1.2.3.{n // 500}/1.2.3.{n // 100}/{n}.dcm",
        received_at=1_700_000_000.0 + n / 1000,
    )


def scale(args: argparse.Namespace) -> None:
    targets: list[tuple[str, str | None]] = [("sqlite", None)]
    server = None
    if args.postgresql:
        from tests.pgserver import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("PostgreSQL is not installed")
        server = PostgresServer(bindir)
        server.start()
        targets.append(("postgresql", server.new_database()))
    try:
        for name, url in targets:
            with tempfile.TemporaryDirectory(prefix="bench-index-scale-") as tmp:
                index = open_index(url, tmp)
                per_10k: list[float] = []
                elapsed = 0.0
                try:
                    for start_n in range(0, args.records, args.batch):
                        batch = [_record(n) for n in range(start_n, start_n + args.batch)]
                        t0 = time.perf_counter()
                        index.add_many(batch)
                        elapsed += time.perf_counter() - t0
                        if (start_n + args.batch) % 10_000 == 0:
                            per_10k.append(elapsed)
                            elapsed = 0.0
                    assert index.count() == args.records
                finally:
                    index.close()
            print(f"{name}: seconds per 10,000 records (batches of {args.batch}), in order:")
            print("  " + " ".join(f"{s:.3f}" for s in per_10k))
            first = statistics.median(per_10k[:3])
            last = statistics.median(per_10k[-3:])
            print(
                f"  first three {first:.3f} s, last three {last:.3f} s: last/first "
                f"{last / first:.2f}; {1e6 * sum(per_10k) / args.records:.1f} us per record "
                f"(load {loadavg()})"
            )
    finally:
        if server is not None:
            server.stop()


def digest(args: argparse.Namespace) -> None:
    del args
    for size, fragment in ((8 * 1024, 8 * 1024), (512 * 1024, 16 * 1024)):
        data = memoryview(os.urandom(size))
        rounds = max(200, 20_000_000 // size)
        t0 = time.perf_counter()
        c0 = time.process_time()
        for _ in range(rounds):
            h = hashlib.sha256()
            for i in range(0, size, fragment):
                h.update(data[i : i + fragment])
            h.hexdigest()
        per = (time.perf_counter() - t0) / rounds
        per_cpu = (time.process_time() - c0) / rounds
        print(
            f"SHA-256 of {size // 1024} KiB in {fragment // 1024} KiB fragments: "
            f"{per_cpu * 1e6:.1f} us CPU per instance ({size / per_cpu / 1e9:.2f} GB/s), "
            f"{per * 1e6:.1f} us wall"
        )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("ingest")
    a.add_argument("--size", default="8k")
    a.add_argument("--associations", type=int, default=4)
    a.add_argument("--count", type=int, default=4000)
    a.add_argument("--repeat", type=int, default=3)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument(
        "--tmpdir",
        help="where the stores (and their SQLite index) go, e.g. /dev/shm: on a shared"
        " machine, ext4 inode allocation after other jobs' deletions can dwarf the index",
    )
    b = sub.add_parser("scale")
    b.add_argument("--records", type=int, default=100_000)
    b.add_argument("--batch", type=int, default=1000)
    b.add_argument("--postgresql", action="store_true")
    sub.add_parser("digest")
    args = ap.parse_args()
    print(f"load average at start: {loadavg()} ({os.cpu_count()} CPUs)")
    {"ingest": ingest, "scale": scale, "digest": digest}[args.what](args)
    print(f"load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
