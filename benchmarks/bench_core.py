#!/usr/bin/env python3
"""The four workloads of the data plane, pacs-receiver against both storescp modes, one run.

  8 KB     --senders DCMTK storescu, --count-small 8 KB instances each, one association each
  512 KB   the same with --count-large 512 KB instances
  large    one storescu, one association, --large-count instances of --large-mb MB, sent
           in PDUs of each size in --large-pdus (default 16 KB and 128 KB: what DCMTK and
           pynetdicom actually send); reports MB/s and the peak resident memory of the
           largest single process of each receiver
  echo     --senders raw-socket clients (separate processes), each opening --count-echo
           associations in turn: A-ASSOCIATE-RQ, C-ECHO-RQ, A-RELEASE-RQ, close;
           reports associations/s and receiver CPU per association

Every sender has TCP_NODELAY=1 (DCMTK reads it from the environment; the echo client sets
the option itself). Receivers, each started fresh per run on a free port with its own
output directory and stopped afterwards:

  pacs-receiver   --workers W --fsync never  (the data plane in use is printed: compiled
                  or pure; PACSRX_PURE_PYTHON=1 in the environment selects the pure twin)
  storescp-B      DCMTK storescp +B --max-pdu 131072
  storescp-fork   DCMTK storescp --fork --max-pdu 131072

storescp listens on every interface, so the whole benchmark runs in a network namespace
that has only lo (loadtest/netns.py; needs root or CAP_SYS_ADMIN). Runs are interleaved
across receivers per repeat, so background load hits them alike; the median of --repeat
runs is reported with the ratio to the better storescp mode, and CPU per instance (or per
association) is utime+stime of the receiver's whole process tree from /proc, exited
children included. The machine's load average is printed with every run.

Examples:
  .venv/bin/python benchmarks/bench_core.py
  .venv/bin/python benchmarks/bench_core.py --workloads 8k,echo --repeat 5
  .venv/bin/python benchmarks/bench_core.py --workloads large --large-mb 1024 --large-count 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_receivers import (
    DataSet,
    ReceiverSpec,
    Running,
    Sampler,
    count_files,
    dcmtk,
    make_instances,
    receiver_specs,
    tree_cpu_seconds,
)

from loadtest import netns

RECEIVERS = ("pacs-receiver", "storescp-B", "storescp-fork")
WORKLOADS = ("8k", "512k", "large", "echo")
MAX_PDU = 131072  # the most DCMTK offers to receive or will send

# ------------------------------------------------------------------ the echo client

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_LE = b"1.2.840.10008.1.2"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _even(uid: bytes) -> bytes:
    return uid + b"\0" if len(uid) % 2 else uid


def associate_rq(called: str, calling: str) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification in implicit VR little endian."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION) + _item(0x40, IMPLICIT_LE)
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7")
    body = (
        struct.pack(">HH", 1, 0)
        + called.encode().ljust(16)
        + calling.encode().ljust(16)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + _item(0x20, context)
        + _item(0x50, user)
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def echo_rq(message_id: int) -> bytes:
    """A P-DATA-TF holding one C-ECHO-RQ command set (implicit VR little endian)."""

    def element(tag_element: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, tag_element, len(value)) + value

    rest = (
        element(0x0002, _even(VERIFICATION))
        + element(0x0100, struct.pack("<H", 0x0030))
        + element(0x0110, struct.pack("<H", message_id & 0xFFFF))
        + element(0x0800, struct.pack("<H", 0x0101))
    )
    command = element(0x0000, struct.pack("<I", len(rest))) + rest
    pdv = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _read_exactly(sock, 6)
    kind, _reserved, length = struct.unpack(">BBI", header)
    return kind, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, missing = [], n
    while missing:
        chunk = sock.recv(missing)
        if not chunk:
            raise ConnectionError("the receiver closed the connection")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def echo_client(port: int, called: str, count: int, timeout: float) -> int:
    """Open ``count`` associations one after another; 0 when every one went through."""
    request = associate_rq(called, "BENCHECHO")
    deadline = time.monotonic() + timeout
    for n in range(count):
        if time.monotonic() > deadline:
            print(f"echo client: timed out after {n} associations", file=sys.stderr)
            return 1
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
            kind, _ = _read_pdu(sock)
            if kind != 0x02:
                print(f"echo client: PDU type {kind:#x}, not an A-ASSOCIATE-AC", file=sys.stderr)
                return 1
            sock.sendall(echo_rq(n + 1))
            kind, body = _read_pdu(sock)
            # the status (0000,0900) is the last element of the response: Success is 0
            if kind != 0x04 or not body.endswith(b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00"):
                print("echo client: no C-ECHO-RSP with Success", file=sys.stderr)
                return 1
            sock.sendall(RELEASE_RQ)
            kind, _ = _read_pdu(sock)
            if kind != 0x06:
                print(f"echo client: PDU type {kind:#x}, not an A-RELEASE-RP", file=sys.stderr)
                return 1
    return 0


# ------------------------------------------------------------------ runs


@dataclass(slots=True)
class Run:
    workload: str
    receiver: str
    ok: bool
    error: str = ""
    seconds: float = 0.0
    units: int = 0  # instances, or associations for echo
    bytes: int = 0
    cpu_seconds: float = 0.0
    largest_process_mb: float = 0.0  # the largest VmHWM of any one process of the tree
    loadavg: float = 0.0

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_unit(self) -> float:
        return 1000 * self.cpu_seconds / self.units if self.units else 0.0


Launcher = Callable[[Running, Path], list[subprocess.Popen[bytes]]]


def measure(
    spec: ReceiverSpec,
    workload: str,
    base: Path,
    echoscu: str,
    launch: Launcher,
    units: int,
    nbytes: int,
    timeout: float,
) -> Run:
    """Start the receiver, run the senders ``launch`` starts, check, stop."""
    run = Run(workload, spec.name, ok=False, loadavg=os.getloadavg()[0])
    rx = Running(spec, base, echoscu)
    senders: list[subprocess.Popen[bytes]] = []
    try:
        rx.wait_ready()
        sampler = Sampler(rx.proc.pid)
        sampler.sample()
        cpu_before = tree_cpu_seconds(rx.proc.pid)
        sampler.start()
        started = time.monotonic()
        senders = launch(rx, base)
        codes: list[int | None] = []
        for proc in senders:
            try:
                codes.append(proc.wait(max(0.1, started + timeout - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        run.seconds = time.monotonic() - started
        rx.settle()
        run.cpu_seconds = tree_cpu_seconds(rx.proc.pid) - cpu_before
        sampler.stop()
        run.largest_process_mb = max(sampler.hwm_kb.values(), default=0) / 1024
        run.units, run.bytes = units, nbytes
        stored = units if workload.startswith("echo") else count_files(rx.out)
        if None in codes:
            run.error = f"timed out after {timeout:g} s"
        elif any(codes):
            run.error = f"sender exit status {codes} (logs in {base})"
        elif stored != units:
            run.error = f"{stored} of {units} instances stored"
        else:
            run.ok = True
    except Exception as exc:  # one receiver failing must not end the benchmark
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        for proc in senders:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        rx.stop()
        shutil.rmtree(rx.out, ignore_errors=True)
    return run


def storescu_launcher(storescu: str, data: DataSet, extra: list[str]) -> Launcher:
    def launch(rx: Running, base: Path) -> list[subprocess.Popen[bytes]]:
        env = {**os.environ, "TCP_NODELAY": "1"}
        procs = []
        for i, directory in enumerate(data.dirs):
            with open(base / f"sender{i}.log", "wb") as log:
                argv = [storescu, "-aet", f"BENCH{i}", "-aec", rx.spec.called_ae, *extra]
                argv += ["+sd", "127.0.0.1", str(rx.port), str(directory)]
                procs.append(
                    subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
                    )
                )
        return procs

    return launch


def echo_launcher(clients: int, count: int, timeout: float) -> Launcher:
    def launch(rx: Running, base: Path) -> list[subprocess.Popen[bytes]]:
        procs = []
        for i in range(clients):
            with open(base / f"echo{i}.log", "wb") as log:
                argv = [sys.executable, __file__, "--echo-client", str(rx.port)]
                argv += [rx.spec.called_ae, str(count), str(timeout)]
                procs.append(
                    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                )
        return procs

    return launch


def specs_for(args: argparse.Namespace) -> dict[str, ReceiverSpec]:
    """bench_receivers' receivers, storescp offering to receive 128 KB PDUs."""
    specs = receiver_specs(args)

    def with_max_pdu(spec: ReceiverSpec) -> ReceiverSpec:
        base_argv = spec.argv

        def argv(port: int, out: Path) -> list[str]:
            words = base_argv(port, out)
            return [words[0], "--max-pdu", str(MAX_PDU), *words[1:]]

        return replace(spec, argv=argv)

    return {
        name: with_max_pdu(specs[name]) if name.startswith("storescp") else specs[name]
        for name in RECEIVERS
    }


def plan(
    args: argparse.Namespace, work: Path, tools: dict[str, str]
) -> list[tuple[str, Launcher, int, int]]:
    """(workload label, launcher, units, bytes) for every workload asked for."""
    out: list[tuple[str, Launcher, int, int]] = []
    storescu = tools["storescu"]
    for name, size_kb, count in (("8k", 8, args.count_small), ("512k", 512, args.count_large)):
        if name not in args.workloads:
            continue
        dirs, total = [], 0
        for i in range(args.senders):
            d = work / "data" / name / f"sender{i}"
            total += make_instances(d, count, size_kb, f"{name}{i}")
            dirs.append(d)
        data = DataSet(name, dirs, count * args.senders, total)
        label = f"{size_kb} KB x{args.senders}"
        out.append((label, storescu_launcher(storescu, data, []), data.instances, total))
    if "large" in args.workloads:
        d = work / "data" / "large"
        total = make_large(d, args.large_count, args.large_mb)
        data = DataSet("large", [d], args.large_count, total)
        for pdu in args.large_pdus:
            label = f"{args.large_mb} MB, {pdu // 1024} KB PDUs"
            extra = ["--max-send-pdu", str(pdu)]
            out.append((label, storescu_launcher(storescu, data, extra), args.large_count, total))
    if "echo" in args.workloads:
        launch = echo_launcher(args.senders, args.count_echo, args.timeout)
        out.append((f"echo x{args.senders}", launch, args.senders * args.count_echo, 0))
    return out


def make_large(directory: Path, count: int, size_mb: int) -> int:
    """``count`` multi-frame instances of ``size_mb`` MB of pixel data; returns the bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    frame = 4096 * 4096 * 2  # 32 MiB: Rows and Columns are US, so size comes from frames
    frames = max(1, size_mb * 1024 * 1024 // frame)
    pixels = os.urandom(frame) * frames
    total = 0
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Large", "BENCHLARGE", "CT"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.Rows = ds.Columns = 4096
        ds.NumberOfFrames = frames
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
        ds.file_meta = meta
        path = directory / f"large-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


# ------------------------------------------------------------------ report


def report(runs: list[Run]) -> str:
    lines = []
    header = (
        f"{'workload':<24} {'receiver':<14} {'rate':>12} {'ratio':>7}"
        f" {'CPU/unit':>10} {'max proc':>9} runs"
    )
    lines += [header, "-" * len(header)]
    for workload in dict.fromkeys(r.workload for r in runs):
        medians: dict[str, tuple[float, float, float, float, int, int]] = {}
        for receiver in RECEIVERS:
            ok = [r for r in runs if r.workload == workload and r.receiver == receiver and r.ok]
            every = [r for r in runs if r.workload == workload and r.receiver == receiver]
            if not every:
                continue
            medians[receiver] = (
                statistics.median([r.rate for r in ok]) if ok else 0.0,
                statistics.median([r.mb_per_s for r in ok]) if ok else 0.0,
                statistics.median([r.cpu_ms_per_unit for r in ok]) if ok else 0.0,
                max((r.largest_process_mb for r in ok), default=0.0),
                len(ok),
                len(every),
            )
        by_mb = "MB" in workload
        best = max(
            (m[1] if by_mb else m[0] for n, m in medians.items() if n != "pacs-receiver"),
            default=0.0,
        )
        unit = "assoc/s" if workload.startswith("echo") else "inst/s"
        for receiver, (rate, mbs, cpu, mem, n_ok, n) in medians.items():
            value = mbs if by_mb else rate
            shown = f"{mbs:.0f} MB/s" if by_mb else f"{rate:.0f} {unit}"
            ratio = f"{value / best:.2f}x" if best and receiver == "pacs-receiver" else ""
            lines.append(
                f"{workload:<24} {receiver:<14} {shown:>12} {ratio:>7}"
                f" {cpu:>7.3f} ms {mem:>6.0f} MB {n_ok}/{n}"
            )
    lines.append(
        "\nmedians; ratio = pacs-receiver / the better storescp mode (MB/s for large instances);"
        "\nCPU/unit = receiver process tree CPU per instance or association;"
        "\nmax proc = the largest peak resident set (VmHWM) of any one receiver process"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_core.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="of 8k,512k,large,echo (default all)"
    )
    ap.add_argument(
        "--senders", type=int, default=4, help="storescu senders / echo clients (default 4)"
    )
    ap.add_argument(
        "--count-small", type=int, default=500, help="8 KB instances per sender (default 500)"
    )
    ap.add_argument(
        "--count-large", type=int, default=50, help="512 KB instances per sender (default 50)"
    )
    ap.add_argument(
        "--large-mb", type=int, default=128, help="size of a large instance, MB (default 128)"
    )
    ap.add_argument(
        "--large-count", type=int, default=3, help="large instances, one association (default 3)"
    )
    ap.add_argument(
        "--large-pdus", default="16384,131072", help="PDU sizes for large instances (bytes)"
    )
    ap.add_argument(
        "--count-echo", type=int, default=300, help="associations per echo client (default 300)"
    )
    ap.add_argument("--workers", type=int, default=2, help="pacs-receiver --workers (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell (default 3)")
    ap.add_argument(
        "--timeout", type=float, default=180.0, help="seconds one run may take (default 180)"
    )
    ap.add_argument(
        "--receivers", default=",".join(RECEIVERS), help="subset of the three receivers"
    )
    ap.add_argument(
        "--work-dir", metavar="DIR", help="keep data and logs here (default: a tmp dir)"
    )
    args = ap.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        ap.error(f"--workloads: choose from {','.join(WORKLOADS)}")
    args.receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    if not args.receivers or set(args.receivers) - set(RECEIVERS):
        ap.error(f"--receivers: choose from {','.join(RECEIVERS)}")
    try:
        args.large_pdus = [int(p) for p in args.large_pdus.split(",") if p.strip()]
    except ValueError:
        ap.error("--large-pdus: comma-separated byte counts")
    if not args.large_pdus or any(not 4096 <= p <= MAX_PDU for p in args.large_pdus):
        ap.error(f"--large-pdus: each between 4096 and {MAX_PDU} (DCMTK's range)")
    counts = (args.senders, args.count_small, args.count_large, args.large_mb, args.large_count)
    if min((*counts, args.count_echo, args.workers, args.repeat)) < 1 or args.timeout <= 0:
        ap.error("counts, sizes, --workers, --repeat and --timeout must be positive")
    # bench_receivers.receiver_specs reads these
    args.fsync_always, args.nagle = False, False
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--echo-client"]:  # one echo client process (see echo_launcher)
        port, called, count, timeout = argv[1:5]
        return echo_client(int(port), called, int(count), float(timeout))
    args = parse_args(argv)
    tools = {name: dcmtk(name) for name in ("storescu", "echoscu", "storescp")}
    missing = [n for n, path in tools.items() if path is None]
    if missing:
        print(f"bench_core.py: DCMTK {', '.join(missing)} not found", file=sys.stderr)
        return 2
    found = {n: p for n, p in tools.items() if p is not None}
    reason = netns.unavailable()
    if reason and any(r.startswith("storescp") for r in args.receivers):
        print(f"bench_core.py: storescp listens on every interface and {reason}", file=sys.stderr)
        return 2
    from workers.dataplane import CORE

    specs = specs_for(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-core-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; data plane: {CORE}; "
        f"{args.senders} senders; work dir {work}",
        flush=True,
    )
    runs: list[Run] = []
    isolate = any(r.startswith("storescp") for r in args.receivers)
    try:
        with netns.loopback_namespace() if isolate else contextlib.nullcontext():
            cells = plan(args, work, found)
            for label, launch, units, nbytes in cells:
                for repeat in range(args.repeat):
                    for name in args.receivers:
                        base = work / "runs" / f"{name}-{label.replace(' ', '_')}-{repeat}"
                        run = measure(
                            specs[name],
                            label,
                            base,
                            found["echoscu"],
                            launch,
                            units,
                            nbytes,
                            args.timeout,
                        )
                        runs.append(run)
                        print(
                            f"  {label:<24} #{repeat + 1} {name:<14} {run.rate:9.0f}/s"
                            f" {run.mb_per_s:8.1f} MB/s {run.cpu_ms_per_unit:8.3f} ms CPU"
                            f" {run.largest_process_mb:6.0f} MB  load {run.loadavg:4.1f}"
                            f"  {'ok' if run.ok else 'FAILED: ' + run.error}",
                            flush=True,
                        )
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(report(runs))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
