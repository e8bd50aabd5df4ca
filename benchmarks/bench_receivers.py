#!/usr/bin/env python3
"""Throughput of pacs-receiver next to other DICOM receivers, same senders, same data.

Senders: --senders concurrent DCMTK ``storescu`` processes (TCP_NODELAY=1 in their
environment; without it, Nagle's algorithm on, with --nagle), each sending its own
--count-small (8 KB) or --count-large (512 KB) files on ONE association to 127.0.0.1.
Data: synthetic CT instances of 8 KB and 512 KB (pydicom, unique UIDs, explicit VR
little endian, 100 instances per series), made once in a temporary directory.

Receivers, one after another, each started fresh for every measurement on a free
port and stopped (SIGTERM, then SIGKILL) afterwards:

  pacs-receiver         pacs-receiver --workers W --fsync never (the baseline)
  pacs-receiver-fsync   the same with --fsync always (only with --fsync-always)
  storescp-B            DCMTK storescp +B -od DIR           (TCP_NODELAY=1)
  storescp-fork         DCMTK storescp --fork -od DIR       (TCP_NODELAY=1)
  pynetdicom            python -m pynetdicom storescp -ba 127.0.0.1 -od DIR -q
  orthanc               Orthanc with a generated config (only with --receivers):
                        SyncStorageArea true (it fsyncs: compare with --fsync-always),
                        own storage and SQLite index, HTTP off (TCP_NODELAY=1)

DCMTK's storescp and Orthanc listen on every interface (storescp has no bind
option), so they run only in a network namespace that has nothing but lo
(loadtest/netns.py; needs root or CAP_SYS_ADMIN). When any selected receiver needs
it, the whole benchmark (every receiver and every sender) runs in one such
namespace, so that all are measured alike; without it those receivers are skipped
(with the reason), never started outside it.

Orthanc is not installed by 'make test'. On Debian: create /usr/sbin/policy-rc.d
containing 'exit 101' if there is none (so that the package starts no service), then
'apt-get install orthanc', then remove policy-rc.d if you created it.

Measured per run, from the first sender's start to the last sender's exit:
instances/s and MB/s (file bytes); receiver CPU seconds per GB (utime+stime of the
receiver's whole process tree from /proc/<pid>/stat, children that exited
included through cutime+cstime); peak memory (the largest sum of VmRSS across the
tree, sampled every 50 ms; the sum of each process's VmHWM is in the JSON). A run
counts only if every sender exited 0 and every instance is in the output directory.
Each measurement is repeated --repeat times (median reported, runs interleaved
across receivers so that background load hits all of them alike), and every run is
bounded by --timeout seconds. Ratios are relative to pacs-receiver.

Examples:
  .venv/bin/python benchmarks/bench_receivers.py
  .venv/bin/python benchmarks/bench_receivers.py --repeat 5 --fsync-always \\
      --json bench.json --markdown bench.md
  .venv/bin/python benchmarks/bench_receivers.py --receivers pacs-receiver,storescp-B \\
      --sizes 8 --count-small 1000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_data import DataSet, count_files, make_instances
from proc_sampling import (
    Sampler,
    dcmtk,
    free_port,
    tree,
    tree_cpu_seconds,
)

from loadtest import netns
from loadtest.compare import orthanc_binary, orthanc_config

PAGE_KB = 1024
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
BASELINE = "pacs-receiver"
SIZES_KB = {"8": 8, "512": 512}


# ------------------------------------------------------------------ processes


# ------------------------------------------------------------------ receivers


@dataclass(slots=True)
class ReceiverSpec:
    name: str
    #: (port, output directory) -> argv
    argv: Callable[[int, Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    called_ae: str = "ANY-SCP"
    #: workers to wait for in the log ("worker N ready"); 0: wait for a C-ECHO
    ready_workers: int = 0
    #: listens on every interface: runs only in a loopback-only network namespace
    all_interfaces: bool = False


def receiver_specs(args: argparse.Namespace) -> dict[str, ReceiverSpec]:
    python = sys.executable
    pacs = str(Path(python).with_name("pacs-receiver"))
    storescp = dcmtk("storescp") or "storescp"
    nodelay = {"TCP_NODELAY": "1"}

    def orthanc_argv(port: int, out: Path) -> list[str]:
        # out is the storage; the index and the config go next to it
        (out.parent / "index").mkdir(exist_ok=True)
        config = out.parent / "orthanc.json"
        settings = orthanc_config(out, out.parent / "index", port, args.senders)
        config.write_text(json.dumps(settings, indent=2))
        return [orthanc_binary() or "Orthanc", str(config)]

    def pacs_argv(fsync: str) -> Callable[[int, Path], list[str]]:
        def argv(port: int, out: Path) -> list[str]:
            return [
                pacs,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(args.workers),
                "--fsync",
                fsync,
                "--storage",
                str(out),
                "--metrics-port",
                "0",
                "--log-level",
                "INFO",
            ]

        return argv

    specs = [
        ReceiverSpec(
            "pacs-receiver", pacs_argv("never"), called_ae="PACSRX", ready_workers=args.workers
        ),
        ReceiverSpec(
            "pacs-receiver-fsync",
            pacs_argv("always"),
            called_ae="PACSRX",
            ready_workers=args.workers,
        ),
        ReceiverSpec(
            "storescp-B",
            lambda port, out: [storescp, "+B", "-od", str(out), str(port)],
            env=nodelay,
            all_interfaces=True,
        ),
        ReceiverSpec(
            "storescp-fork",
            lambda port, out: [storescp, "--fork", "-od", str(out), str(port)],
            env=nodelay,
            all_interfaces=True,
        ),
        ReceiverSpec(
            "pynetdicom",
            lambda port, out: [
                python,
                "-m",
                "pynetdicom",
                "storescp",
                "-ba",
                "127.0.0.1",
                "-od",
                str(out),
                "-q",
                str(port),
            ],
        ),
        ReceiverSpec("orthanc", orthanc_argv, env=nodelay, all_interfaces=True),
    ]
    return {s.name: s for s in specs}


class Running:
    """A receiver process (its own session, so that its children can be found and
    stopped with it), its log and output directory."""

    def __init__(self, spec: ReceiverSpec, base: Path, echoscu: str) -> None:
        self.spec = spec
        self.out = base / "out"
        self.out.mkdir(parents=True)
        self.log_path = base / "receiver.log"
        self.port = free_port()
        self.echoscu = echoscu
        env = {**os.environ, **spec.env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                spec.argv(self.port, self.out),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=base,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited: {self.log()[-2000:]}")
            if self.spec.ready_workers:
                if self.log().count(" ready (pid ") >= self.spec.ready_workers:
                    return
            else:
                echo = subprocess.run(
                    [
                        self.echoscu,
                        "-to",
                        "2",
                        "-aec",
                        self.spec.called_ae,
                        "127.0.0.1",
                        str(self.port),
                    ],
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
                if echo.returncode == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.spec.name} not ready in {READY_TIMEOUT:g} s")

    def settle(self, timeout: float = 3.0) -> None:
        """Wait for per-association children (storescp --fork) to finish."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(tree(self.proc.pid)) > 1:
            if self.spec.name != "storescp-fork":
                return
            time.sleep(0.05)

    def stop(self) -> None:
        pgid = self.proc.pid  # the session (and group) started for it
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        try:
            os.killpg(pgid, signal.SIGKILL)  # storescp --fork children, stragglers
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------ one run


@dataclass(slots=True)
class RunResult:
    receiver: str
    size: str
    repeat: int
    ok: bool
    error: str = ""
    seconds: float = 0.0
    instances: int = 0
    bytes: int = 0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    hwm_sum_mb: float = 0.0
    max_processes: int = 0
    #: 1-minute load average when the run started: other work on the machine
    loadavg: float = 0.0

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_seconds / (self.bytes / 1e9) if self.bytes else 0.0


def run_once(
    spec: ReceiverSpec,
    data: DataSet,
    repeat: int,
    work: Path,
    tools: dict[str, str],
    timeout: float,
    nagle: bool = False,
) -> RunResult:
    base = work / "runs" / f"{spec.name}-{data.label.replace(' ', '')}-{repeat}"
    result = RunResult(spec.name, data.label, repeat, ok=False, loadavg=os.getloadavg()[0])
    rx = Running(spec, base, tools["echoscu"])
    senders: list[subprocess.Popen[bytes]] = []
    try:
        rx.wait_ready()
        sampler = Sampler(rx.proc.pid)
        sampler.sample()
        cpu_before = tree_cpu_seconds(rx.proc.pid)
        sampler.start()
        env = {**os.environ, "TCP_NODELAY": "1"}
        if nagle:  # storescu as packaged: Nagle's algorithm on
            del env["TCP_NODELAY"]
        started = time.monotonic()
        for i, directory in enumerate(data.dirs):
            with open(base / f"sender{i}.log", "wb") as log:
                senders.append(
                    subprocess.Popen(
                        [
                            tools["storescu"],
                            *("-aet", f"BENCH{i}", "-aec", spec.called_ae, "+sd"),
                            *("127.0.0.1", str(rx.port), str(directory)),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        deadline = started + timeout
        codes: list[int | None] = []
        for proc in senders:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        result.seconds = time.monotonic() - started
        rx.settle()
        cpu_after = tree_cpu_seconds(rx.proc.pid)
        sampler.stop()
        result.cpu_seconds = cpu_after - cpu_before
        result.peak_rss_mb = sampler.peak_rss_kb / 1024
        result.hwm_sum_mb = sum(sampler.hwm_kb.values()) / 1024
        result.max_processes = sampler.max_processes
        result.instances, result.bytes = data.instances, data.bytes
        stored = count_files(rx.out)
        if None in codes:
            result.error = f"timed out after {timeout:g} s"
        elif any(codes):
            result.error = f"storescu exit status {codes} (see {base}/sender*.log)"
        elif stored != data.instances:
            result.error = f"{stored} of {data.instances} instances stored"
        else:
            result.ok = True
    except Exception as exc:  # one receiver failing must not end the benchmark
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for proc in senders:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        rx.stop()
        shutil.rmtree(rx.out, ignore_errors=True)
    return result


# ------------------------------------------------------------------ report


@dataclass(slots=True)
class Summary:
    receiver: str
    size: str
    runs: int
    ok_runs: int
    instances_per_s: float | None
    mb_per_s: float | None
    cpu_s_per_gb: float | None
    peak_rss_mb: float | None
    hwm_sum_mb: float | None
    ratio: dict[str, float | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


METRICS = ("instances_per_s", "mb_per_s", "cpu_s_per_gb", "peak_rss_mb", "hwm_sum_mb")


def summarize(results: list[RunResult]) -> list[Summary]:
    out: list[Summary] = []
    keys = list(dict.fromkeys((r.receiver, r.size) for r in results))
    for receiver, size in keys:
        runs = [r for r in results if (r.receiver, r.size) == (receiver, size)]
        good = [r for r in runs if r.ok]

        def median(metric: str, good: list[RunResult] = good) -> float | None:
            return statistics.median(getattr(r, metric) for r in good) if good else None

        out.append(
            Summary(
                receiver,
                size,
                len(runs),
                len(good),
                instances_per_s=median("instances_per_s"),
                mb_per_s=median("mb_per_s"),
                cpu_s_per_gb=median("cpu_s_per_gb"),
                peak_rss_mb=median("peak_rss_mb"),
                hwm_sum_mb=median("hwm_sum_mb"),
                errors=[r.error for r in runs if not r.ok],
            )
        )
    for s in out:
        base = next((b for b in out if b.receiver == BASELINE and b.size == s.size), None)
        for metric in METRICS:
            value = getattr(s, metric)
            ref = getattr(base, metric) if base is not None else None
            s.ratio[metric] = value / ref if value is not None and ref else None
    return out


def _fmt(value: float | None, ratio: float | None, digits: int = 0) -> str:
    if value is None:
        return "failed"
    text = f"{value:,.{digits}f}"
    return f"{text} ({ratio:.2f}x)" if ratio is not None else text


COLUMNS = ("receiver", "size", "instances/s", "MB/s", "CPU s/GB", "peak RSS MB", "runs ok")


def rows(summaries: list[Summary]) -> list[list[str]]:
    return [
        [
            s.receiver,
            s.size,
            _fmt(s.instances_per_s, s.ratio["instances_per_s"]),
            _fmt(s.mb_per_s, s.ratio["mb_per_s"], 1),
            _fmt(s.cpu_s_per_gb, s.ratio["cpu_s_per_gb"], 1),
            _fmt(s.peak_rss_mb, s.ratio["peak_rss_mb"]),
            f"{s.ok_runs}/{s.runs}",
        ]
        for s in summaries
    ]


def text_table(summaries: list[Summary]) -> str:
    table = [list(COLUMNS), *rows(summaries)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(table):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(summaries: list[Summary]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(summaries)]
    return "\n".join(lines)


def environment(args: argparse.Namespace, tools: dict[str, str]) -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    version = subprocess.run(
        [tools["storescu"], "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": load,
        "python": sys.version.split()[0],
        "dcmtk": version[0] if version else "",
        "senders": args.senders,
        "workers": args.workers,
        "repeat": args.repeat,
    }


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_receivers.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--senders", type=int, default=4, help="concurrent storescu (default 4)")
    ap.add_argument(
        "--count-small",
        type=int,
        default=250,
        help="8 KB instances per sender, one association (default 250)",
    )
    ap.add_argument(
        "--count-large",
        type=int,
        default=25,
        help="512 KB instances per sender, one association (default 25)",
    )
    ap.add_argument(
        "--sizes",
        default="8,512",
        help="instance sizes in KB to run, of 8 and 512 (default 8,512)",
    )
    ap.add_argument(
        "--receivers",
        default="pacs-receiver,storescp-B,storescp-fork,pynetdicom",
        help="comma-separated receivers to run (default: all but pacs-receiver-fsync and orthanc)",
    )
    ap.add_argument(
        "--fsync-always", action="store_true", help="also run pacs-receiver --fsync always"
    )
    ap.add_argument(
        "--nagle",
        action="store_true",
        help="senders leave Nagle's algorithm on (no TCP_NODELAY=1 in their environment)",
    )
    ap.add_argument("--workers", type=int, default=2, help="pacs-receiver --workers (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (default 3)")
    ap.add_argument(
        "--timeout", type=float, default=120.0, help="seconds one run may take (default 120)"
    )
    ap.add_argument("--json", metavar="PATH", help="write runs and medians as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    ap.add_argument(
        "--work-dir", metavar="DIR", help="keep data and logs here (default: a tmp dir)"
    )
    args = ap.parse_args(argv)
    if args.senders < 1 or args.repeat < 1 or args.workers < 1 or args.timeout <= 0:
        ap.error("--senders, --repeat, --workers and --timeout must be positive")
    if args.count_small < 1 or args.count_large < 1:
        ap.error("--count-small and --count-large must be positive")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in SIZES_KB for s in sizes):
        ap.error("--sizes: choose from 8 and 512")
    args.sizes = sizes
    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    if args.fsync_always and "pacs-receiver-fsync" not in names:
        names.insert(names.index(BASELINE) + 1 if BASELINE in names else 0, "pacs-receiver-fsync")
    known = set(receiver_specs(args))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        ap.error(f"--receivers: unknown {unknown}; choose from {sorted(known)}")
    args.receivers = names
    return args


def _run_all(
    args: argparse.Namespace,
    work: Path,
    specs: dict[str, ReceiverSpec],
    tools: dict[str, str],
    results: list[RunResult],
) -> None:
    """Make the data, then every run (receivers interleaved per repeat)."""
    datasets = []
    for size in args.sizes:
        count = args.count_small if size == "8" else args.count_large
        dirs, total = [], 0
        for i in range(args.senders):
            d = work / "data" / f"{size}k" / f"sender{i}"
            total += make_instances(d, count, SIZES_KB[size], f"{size}k{i}")
            dirs.append(d)
        datasets.append(DataSet(f"{size} KB", dirs, count * args.senders, total))
    for data in datasets:
        for repeat in range(args.repeat):
            for name in args.receivers:
                r = run_once(specs[name], data, repeat, work, tools, args.timeout, args.nagle)
                results.append(r)
                status = "ok" if r.ok else f"FAILED: {r.error}"
                print(
                    f"  {data.label:>6} #{repeat + 1} {name:<20}"
                    f" {r.instances_per_s:8.0f} inst/s"
                    f" {r.mb_per_s:7.1f} MB/s {r.cpu_s_per_gb:7.1f} CPU s/GB"
                    f" {r.peak_rss_mb:6.0f} MB  load {r.loadavg:4.1f}  {status}",
                    flush=True,
                )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = {name: dcmtk(name) for name in ("storescu", "echoscu", "storescp")}
    missing = [n for n, path in tools.items() if path is None]
    if missing:
        print(f"bench_receivers.py: DCMTK {', '.join(missing)} not found", file=sys.stderr)
        return 2
    found = {n: p for n, p in tools.items() if p is not None}
    specs = receiver_specs(args)
    skipped: dict[str, str] = {}
    if "orthanc" in args.receivers and orthanc_binary() is None:
        skipped["orthanc"] = "Orthanc is not installed (Debian: apt-get install orthanc)"
    reason = netns.unavailable()
    for name in args.receivers:
        if reason and specs[name].all_interfaces and name not in skipped:
            skipped[name] = f"it listens on every interface and {reason}"
    for name, why in skipped.items():
        print(f"bench_receivers.py: skipping {name}: {why}", file=sys.stderr)
    args.receivers = [n for n in args.receivers if n not in skipped]
    if not args.receivers:
        print("bench_receivers.py: no receiver left to run", file=sys.stderr)
        return 2
    isolate = any(specs[n].all_interfaces for n in args.receivers)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-receivers-"))
    work.mkdir(parents=True, exist_ok=True)
    env_info = environment(args, found)
    print(
        f"# {env_info['cpus']} CPUs, load {env_info['loadavg_at_start'][0]:.2f}; "
        f"{args.senders} storescu senders; work dir {work}"
        + ("; all in a network namespace with only lo" if isolate else ""),
        flush=True,
    )
    env_info["loopback_only_namespace"] = isolate
    env_info["skipped"] = skipped
    results: list[RunResult] = []
    try:
        with netns.loopback_namespace() if isolate else contextlib.nullcontext():
            _run_all(args, work, specs, found, results)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    summaries = summarize(results)
    print()
    print(text_table(summaries))
    print(
        f"\nmedian of {args.repeat} run(s); (x) = ratio to {BASELINE}; peak RSS = largest "
        "sampled sum of VmRSS over the receiver's process tree"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "environment": env_info,
                    "summary": [asdict(s) for s in summaries],
                    "runs": [
                        {
                            **asdict(r),
                            "instances_per_s": r.instances_per_s,
                            "mb_per_s": r.mb_per_s,
                            "cpu_s_per_gb": r.cpu_s_per_gb,
                        }
                        for r in results
                    ],
                },
                fh,
                indent=2,
            )
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown_table(summaries) + "\n")
    return 0 if all(s.ok_runs for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
