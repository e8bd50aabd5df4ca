"""``pacs-loadtest compare``: the same workload against pacs-receiver and its peers.

One receiver at a time, on 127.0.0.1 and a free port, storing into a temporary
directory:

* ``pacs-receiver``: ``--workers 2 --fsync never --metrics-port 0`` (port 0; the port
  is read from its log; ``--receiver-workers`` and ``--receiver-fsync`` change them);
* ``dcmtk-storescp``: DCMTK ``storescp +B -od DIR PORT`` (bit-preserving, one process);
* ``dcmtk-storescp-fork``: ``storescp --fork -od DIR PORT`` (a process per association);
* ``pynetdicom-storescp``: pynetdicom's storescp app (``-od DIR -ba 127.0.0.1``), with
  TCP_NODELAY patched in (:mod:`loadtest.pynetdicom_scp`);
* ``orthanc`` (only when asked for): Orthanc (``Orthanc CONFIG.json``) with a generated
  configuration: its own storage and SQLite index directories, HTTP server off,
  ``SyncStorageArea`` true (it fdatasyncs each stored file, not its SQLite WAL index:
  compare it with ``--receiver-fsync always``), ``DicomCheckCalledAet`` false, unknown SOP classes
  accepted, max PDU 131072; Debian: ``apt-get install orthanc`` (with a
  ``/usr/sbin/policy-rc.d`` that exits 101, so that no service of its own starts);
* ``sink`` (only when asked for): :mod:`loadtest.sink`, which stores nothing: the
  ceiling of the generator itself on this machine.

DCMTK gets ``TCP_NODELAY=1`` in its environment (its documented switch),
``--max-pdu 131072`` (its largest; 16 KiB by default) and ``-dhl`` (no reverse DNS
lookup per association). Every receiver is stopped (SIGTERM, then SIGKILL to its
process group) when its cells are done, also on errors and Ctrl-C.

storescp and Orthanc listen on every interface (storescp has no bind option). They
are only ever run in a network namespace that has nothing but ``lo``
(:mod:`loadtest.netns`, needs root or CAP_SYS_ADMIN): when any selected receiver
needs it, the whole run (every receiver, the load generator, the warm-ups) happens in
one such namespace, so that all are measured alike. When the namespace cannot be
made, those receivers are skipped with the reason, never started outside it.

Each receiver gets a short warm-up, then one cell per (size, associations): a
``--count`` run of the generator, during which the receiver's process tree is charged
CPU seconds and sampled for RSS (:mod:`loadtest.proctree`). Stored files are deleted
between cells (not Orthanc's: its index refers to them). The table lists instances/s,
MB/s, p50 and p99 C-STORE latency, receiver CPU seconds, peak RSS of the tree and the
ratio of instances/s to pacs-receiver's in the same cell.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.engine import acse, dimse

from . import netns
from .config import RunConfig
from .options import add_load_options, validate, write_json
from .proctree import TreeSampler
from .runner import RunError, run
from .stats import Report
from .units import format_bytes, parse_size_list

__all__ = ["RECEIVERS", "main"]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
DCMTK_MAX_PDU = 131072


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_binary(name: str) -> str | None:
    """The DCMTK executable ``name`` (ELF only: pynetdicom installs Python scripts with
    the same names into the venv's bin)."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for d in dirs:
        candidate = os.path.join(d, name)
        try:
            with open(candidate, "rb") as f:
                if f.read(4) == b"\x7fELF" and os.access(candidate, os.X_OK):
                    return candidate
        except OSError:
            continue
    return None


def pacs_receiver_command() -> list[str]:
    script = Path(sys.executable).with_name("pacs-receiver")
    if script.exists():
        return [str(script)]
    found = shutil.which("pacs-receiver")
    return [found] if found else [sys.executable, "-m", "receiver"]


# -------------------------------------------------------------------- receivers


@dataclass
class Running:
    """A started receiver."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    storage: Path
    log_path: Path
    #: whether clear_storage may empty ``storage`` between cells (Orthanc's index
    #: refers to its files: they stay)
    clearable: bool = True

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole process group (we made it a session)."""
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers: workers, --fork children
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def clear_storage(self) -> None:
        if not self.clearable:
            return
        for child in self.storage.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()


@dataclass
class ReceiverSpec:
    name: str
    available: Callable[[], str | None]  # None when available, else why not
    start: Callable[[Path, argparse.Namespace], Running]
    #: formatted with ``workers`` and ``fsync`` (--receiver-workers, --receiver-fsync)
    notes: str = ""
    #: listens on every interface: runs only in a loopback-only network namespace
    all_interfaces: bool = False


def _spawn(
    name: str, cmd: list[str], base: Path, port: int, env: dict[str, str] | None = None
) -> Running:
    storage = base / "store"
    storage.mkdir(parents=True, exist_ok=True)
    log_path = base / "receiver.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [c.replace("{STORAGE}", str(storage)) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=base,
            env=full_env,
            start_new_session=True,  # own process group: Ctrl-C is ours to handle
        )
    return Running(name, proc, port, storage, log_path)


def _start_pacs_receiver(base: Path, args: argparse.Namespace) -> Running:
    cmd = [
        *pacs_receiver_command(),
        *("--host", "127.0.0.1", "--port", "0", "--workers", str(args.receiver_workers)),
        *("--fsync", args.receiver_fsync, "--metrics-port", "0", "--storage", "{STORAGE}"),
        *("--log-level", "DEBUG" if args.verbose else "INFO"),  # INFO: "listening on"
    ]
    if args.async_ops is not None:
        cmd += ["--max-async-ops", str(args.async_ops or 64)]
    running = _spawn("pacs-receiver", cmd, base, 0)
    # the port (the kernel's pick) and readiness come from the log
    deadline = time.monotonic() + START_TIMEOUT
    pattern = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
    while True:
        match = pattern.search(running.log())
        if match:
            running.port = int(match.group(1))
            break
        if not running.alive() or time.monotonic() > deadline:
            running.stop()
            raise RunError(f"pacs-receiver did not start; log:\n{running.log()[-2000:]}")
        time.sleep(0.05)
    return running


def _start_storescp(fork: bool) -> Callable[[Path, argparse.Namespace], Running]:
    def start(base: Path, args: argparse.Namespace) -> Running:
        binary = dcmtk_binary("storescp")
        assert binary is not None
        port = free_port()
        cmd = [binary, "--fork"] if fork else [binary, "+B"]
        cmd += ["-od", "{STORAGE}", "--max-pdu", str(DCMTK_MAX_PDU), "-dhl", str(port)]
        name = "dcmtk-storescp-fork" if fork else "dcmtk-storescp"
        return _spawn(name, cmd, base, port, env={"TCP_NODELAY": "1"})

    return start


def _start_pynetdicom(base: Path, args: argparse.Namespace) -> Running:
    port = free_port()
    cmd = [sys.executable, "-m", "loadtest.pynetdicom_scp", str(port)]
    cmd += ["-od", "{STORAGE}", "-ba", "127.0.0.1", "--max-pdu", str(1 << 20), "-q"]
    path = [_repo_root(), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {"PYTHONPATH": os.pathsep.join(path)}
    return _spawn("pynetdicom-storescp", cmd, base, port, env=env)


def _start_sink(base: Path, args: argparse.Namespace) -> Running:
    cmd = [sys.executable, "-m", "loadtest.sink", "--port", "0"]
    cmd += ["--processes", str(args.receiver_workers)]
    path = [_repo_root(), *filter(None, [os.environ.get("PYTHONPATH")])]
    running = _spawn("sink", cmd, base, 0, env={"PYTHONPATH": os.pathsep.join(path)})
    deadline = time.monotonic() + START_TIMEOUT
    pattern = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
    while True:
        match = pattern.search(running.log())
        if match:
            running.port = int(match.group(1))
            return running
        if not running.alive() or time.monotonic() > deadline:
            running.stop()
            raise RunError(f"the sink did not start; log:\n{running.log()[-2000:]}")
        time.sleep(0.05)


def orthanc_binary() -> str | None:
    """The Orthanc server executable (Debian installs it as /usr/sbin/Orthanc)."""
    for candidate in (shutil.which("Orthanc"), "/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def orthanc_config(storage: Path, index: Path, port: int, threads: int) -> dict[str, Any]:
    """Orthanc's configuration for a comparison: DICOM only, syncing, accepting all;
    ``threads``: associations it serves at once (at least 4, its default)."""
    return {
        "Name": "pacs-loadtest-compare",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(index),
        "StorageCompression": False,
        "SyncStorageArea": True,  # fsync each stored file, like --fsync always
        "Plugins": [],
        "LuaScripts": [],
        "HttpServerEnabled": False,
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "MaximumPduLength": DCMTK_MAX_PDU,
        "DicomThreadsCount": max(4, threads),
        "DicomScpTimeout": 30,
        "DicomModalities": {},
        "OrthancPeers": {},
        "SaveJobs": False,
        "MaximumStorageSize": 0,
        "MaximumPatientCount": 0,
    }


def _start_orthanc(base: Path, args: argparse.Namespace) -> Running:
    binary = orthanc_binary()
    assert binary is not None
    port = free_port()
    (base / "index").mkdir(parents=True, exist_ok=True)
    config = base / "orthanc.json"
    threads = max(args.associations)
    config.write_text(
        json.dumps(orthanc_config(base / "store", base / "index", port, threads), indent=2)
    )
    cmd = [binary, *(["--verbose"] if args.verbose else []), str(config)]
    running = _spawn("orthanc", cmd, base, port, env={"TCP_NODELAY": "1"})
    running.clearable = False
    return running


def _have_orthanc() -> str | None:
    if orthanc_binary():
        return None
    return "Orthanc not installed (Debian: apt-get install orthanc)"


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _have_dcmtk() -> str | None:
    return None if dcmtk_binary("storescp") else "DCMTK storescp not installed"


def _have_pynetdicom() -> str | None:
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        return "pynetdicom not installed"
    return None


RECEIVERS: dict[str, ReceiverSpec] = {
    spec.name: spec
    for spec in (
        ReceiverSpec(
            "pacs-receiver",
            lambda: None,
            _start_pacs_receiver,
            "--workers {workers} --fsync {fsync} --metrics-port 0; max PDU 1 MiB",
        ),
        ReceiverSpec(
            "dcmtk-storescp",
            _have_dcmtk,
            _start_storescp(fork=False),
            "+B -od DIR -pdu 131072 -dhl, TCP_NODELAY=1; one process",
            all_interfaces=True,
        ),
        ReceiverSpec(
            "dcmtk-storescp-fork",
            _have_dcmtk,
            _start_storescp(fork=True),
            "--fork -od DIR -pdu 131072 -dhl, TCP_NODELAY=1; a process per association",
            all_interfaces=True,
        ),
        ReceiverSpec(
            "pynetdicom-storescp",
            _have_pynetdicom,
            _start_pynetdicom,
            "pynetdicom apps storescp -od DIR -ba 127.0.0.1 -pdu 1048576, TCP_NODELAY "
            "patched in; decodes and re-encodes each data set with pydicom",
        ),
        ReceiverSpec(
            "orthanc",
            _have_orthanc,
            _start_orthanc,
            "Orthanc, generated config: SyncStorageArea true (fsyncs), SQLite index, HTTP "
            "off, max PDU 131072, TCP_NODELAY=1; storage kept across its cells",
            all_interfaces=True,
        ),
        ReceiverSpec(
            "sink",
            lambda: None,
            _start_sink,
            "loadtest.sink (--processes = --receiver-workers): accepts everything, discards "
            "data, answers Success; the generator's ceiling on this machine",
        ),
    )
}
#: what ``--receivers`` defaults to (the sink and Orthanc are extra: ``--receivers all``
#: or by name)
DEFAULT_RECEIVERS = (
    "pacs-receiver",
    "dcmtk-storescp",
    "dcmtk-storescp-fork",
    "pynetdicom-storescp",
)


async def _echo(port: int) -> None:
    from workers.scu import associate

    req = await associate(
        "127.0.0.1",
        port,
        contexts=[acse.Requested(dimse.VERIFICATION_SOP_CLASS)],
        acse_timeout=5,
        dimse_timeout=5,
        network_timeout=5,
    )
    try:
        await req.send_c_echo()
    finally:
        await req.release()


def wait_ready(running: Running, timeout: float = START_TIMEOUT) -> None:
    """Until a C-ECHO succeeds (the receiver accepts associations), bounded."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if not running.alive():
            break
        try:
            asyncio.run(_echo(running.port))
            return
        except Exception as exc:
            last = exc
            time.sleep(0.1)
    raise RunError(
        f"{running.name} did not answer a C-ECHO on 127.0.0.1:{running.port} within "
        f"{timeout:g} s ({last!r}); log:\n{running.log()[-2000:]}"
    )


# ------------------------------------------------------------------------ cells


@dataclass
class Cell:
    receiver: str
    size: int
    associations: int
    instances: int = 0
    failed: int = 0
    elapsed: float = 0.0
    instances_per_second: float = 0.0
    megabytes_per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss: int = 0
    generator_cpu_seconds: float = 0.0
    ratio: float | None = None
    error: str = ""
    failures: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "receiver": self.receiver,
            "size_bytes": self.size,
            "associations": self.associations,
            "instances": self.instances,
            "failed": self.failed,
            "elapsed_seconds": self.elapsed,
            "instances_per_second": self.instances_per_second,
            "megabytes_per_second": self.megabytes_per_second,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "receiver_cpu_seconds": self.cpu_seconds,
            "receiver_peak_rss_bytes": self.peak_rss,
            "generator_cpu_seconds": self.generator_cpu_seconds,
            "ratio_to_pacs_receiver": self.ratio,
            "error": self.error,
            "failures": self.failures,
        }


def _cell_config(args: argparse.Namespace, port: int, size: int, assocs: int) -> RunConfig:
    return RunConfig(
        host="127.0.0.1",
        port=port,
        called_ae="ANY-SCP",
        calling_ae="PACS-LOADTEST",
        scenario="store",
        processes=args.processes,
        associations=assocs,
        count=args.count,
        duration=args.duration,
        rate=args.rate,
        per_association=args.per_association,
        async_ops=args.async_ops,
        max_pdu=args.max_pdu,
        size=size,
        sop_class=args.sop_class,
        transfer_syntax=args.transfer_syntax,
        acse_timeout=args.timeout,
        dimse_timeout=args.timeout,
        grace=args.grace,
    )


def run_cell(running: Running, args: argparse.Namespace, size: int, assocs: int) -> Cell:
    cell = Cell(running.name, size, assocs)
    sampler = TreeSampler(running.proc.pid)
    cfg = _cell_config(args, running.port, size, assocs)
    try:
        report: Report = run(cfg, on_started=sampler.start)
    finally:
        if sampler._thread is not None:
            sampler.stop()
    data = report.to_json()
    cell.instances = data["instances"]
    cell.failed = data["failed"]
    cell.elapsed = data["elapsed_seconds"]
    cell.instances_per_second = data["instances_per_second"]
    cell.megabytes_per_second = data["megabytes_per_second"]
    latency = data["latency_seconds"].get("C-STORE", {})
    cell.p50_ms = latency.get("p50", 0.0) * 1000
    cell.p99_ms = latency.get("p99", 0.0) * 1000
    cell.cpu_seconds = sampler.cpu_seconds
    cell.peak_rss = sampler.peak_rss
    cell.generator_cpu_seconds = data["generator"]["cpu_seconds"]
    cell.failures = {**data["failures"]["by_status"], **data["failures"]["by_reason"]}
    if report.stats.interrupted:
        cell.error = "interrupted"
    return cell


# ------------------------------------------------------------------------ output


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


HEADERS = (
    "receiver",
    "size",
    "assocs",
    "inst/s",
    "MB/s",
    "p50 ms",
    "p99 ms",
    "rx CPU s",
    "rx peak RSS",
    "gen CPU s",
    "ratio",
    "failed",
)


def _rows(cells: Sequence[Cell]) -> list[list[str]]:
    rows = []
    for c in cells:
        rows.append(
            [
                c.receiver,
                format_bytes(c.size),
                str(c.associations),
                f"{c.instances_per_second:.1f}",
                f"{c.megabytes_per_second:.1f}",
                f"{c.p50_ms:.2f}",
                f"{c.p99_ms:.2f}",
                f"{c.cpu_seconds:.2f}",
                format_bytes(c.peak_rss),
                f"{c.generator_cpu_seconds:.2f}",
                _fmt_ratio(c.ratio),
                str(c.failed) + (f" ({c.error})" if c.error else ""),
            ]
        )
    return rows


def text_table(cells: Sequence[Cell]) -> str:
    rows = [list(HEADERS), *_rows(cells)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(cells: Sequence[Cell], meta: dict[str, Any]) -> str:
    out = ["# pacs-loadtest compare", ""]
    out.append(
        f"{meta['count']} instances per cell, generator: {meta['processes']} process(es)"
        + (f", async ops {meta['async_ops']}" if meta.get("async_ops") is not None else "")
        + f"; machine: {meta['cpus']} CPUs, {meta['machine']}; load average before "
        f"{meta['load_before']}, after {meta['load_after']}."
    )
    out.append("")
    out.append("| " + " | ".join(HEADERS) + " |")
    out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADERS))) + "|")
    for row in _rows(cells):
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append(
        "inst/s and MB/s (10^6 bytes) over the cell's run; p50, p99: C-STORE latency (from "
        "starting to send the request to its response); rx CPU s: CPU seconds of the "
        "receiver's whole process tree during the cell; rx peak RSS: peak of the summed "
        "RSS of the tree; gen CPU s: CPU seconds of the load generator's processes; "
        "ratio: inst/s relative to pacs-receiver in the same cell."
    )
    out.append("")
    for name, note in meta["receivers"].items():
        out.append(f"- **{name}**: {note}")
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


#: What --png says when matplotlib is missing (one line, before anything runs).
PNG_NEEDS = "--png needs matplotlib, which is not installed: pip install 'pacs-receiver[plot]'"


def _matplotlib_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is None


def write_png(path: str, cells: Sequence[Cell]) -> str | None:
    """A bar chart of instances/s per cell; None when done, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PNG_NEEDS
    keys = sorted({(c.size, c.associations) for c in cells})
    names = list(dict.fromkeys(c.receiver for c in cells))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(keys)), 4))
    for i, name in enumerate(names):
        values = []
        for key in keys:
            found = [c for c in cells if c.receiver == name and (c.size, c.associations) == key]
            values.append(found[0].instances_per_second if found else 0.0)
        ax.bar([k + i * width for k in range(len(keys))], values, width, label=name)
    ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels([f"{format_bytes(s)} x{a}" for s, a in keys])
    ax.set_ylabel("instances/s")
    ax.set_title("pacs-loadtest compare")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


# -------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-loadtest compare",
        description="Drive pacs-receiver, DCMTK storescp (+B and --fork), pynetdicom's "
        "storescp and, when asked for, Orthanc and the sink, one after another on "
        "127.0.0.1, with the same workload; print a table. storescp and Orthanc listen "
        "on every interface: they run only in a network namespace that has only lo "
        "(needs root or CAP_SYS_ADMIN; otherwise they are skipped, with the reason), and "
        "then the whole run, every receiver and the load generator, happens in it.",
        epilog="Orthanc (peer 'orthanc'; it syncs what it stores, compare it with "
        "--receiver-fsync always) is not installed by 'make test'. On Debian: create "
        "/usr/sbin/policy-rc.d containing 'exit 101' if there is none (so that the "
        "package starts no service), 'apt-get install orthanc', remove policy-rc.d if "
        "you created it. compare runs /usr/sbin/Orthanc itself with a generated config.",
    )
    parser.add_argument(
        "--receivers",
        default=",".join(DEFAULT_RECEIVERS),
        help=f"comma-separated, from {', '.join(RECEIVERS)}, or 'all' "
        f"(default: {','.join(DEFAULT_RECEIVERS)})",
    )
    parser.add_argument(
        "--sizes", type=parse_size_list, default=[8 << 10, 512 << 10], help="default 8k,512k"
    )
    parser.add_argument(
        "--associations",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[1, 4],
        help="concurrent associations per cell, comma-separated (default 1,4)",
    )
    parser.add_argument("--count", type=int, default=1000, help="instances per cell (1000)")
    parser.add_argument(
        "--duration", type=float, help="also stop a cell after this many seconds (a cap)"
    )
    parser.add_argument("--warmup", type=int, default=100, help="instances before measuring (100)")
    parser.add_argument(
        "--receiver-workers", type=int, default=2, help="pacs-receiver --workers (default 2)"
    )
    parser.add_argument(
        "--receiver-fsync",
        choices=("never", "always"),
        default="never",
        help="pacs-receiver --fsync (default never; 'always' to compare with Orthanc)",
    )
    add_load_options(parser, for_compare=True)
    parser.add_argument("--json", metavar="FILE", help="write the cells as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    parser.add_argument(
        "--png", metavar="FILE", help="bar chart (needs matplotlib: the 'plot' extra)"
    )
    parser.add_argument(
        "--workdir", metavar="DIR", help="where the receivers store (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the storage directories")
    parser.add_argument("-v", "--verbose", action="store_true", help="pacs-receiver logs at DEBUG")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    if args.count < 1:
        parser.error("--count must be at least 1")
    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    if names == ["all"]:
        names = list(RECEIVERS)
    unknown = [n for n in names if n not in RECEIVERS]
    if unknown:
        parser.error(f"unknown receiver(s) {', '.join(unknown)}; known: {', '.join(RECEIVERS)}")
    # Checked before any receiver starts: one line and exit status 2, not a traceback
    # (or a chart silently missing) after a run of many minutes.
    if args.workdir and not os.path.isdir(args.workdir):
        print(f"compare: --workdir {args.workdir}: no such directory", file=sys.stderr)
        return 2
    if args.png and _matplotlib_missing():
        print(f"compare: {PNG_NEEDS}", file=sys.stderr)
        return 2
    meta: dict[str, Any] = {
        "count": args.count,
        "processes": args.processes,
        "async_ops": args.async_ops,
        "cpus": os.cpu_count(),
        "machine": f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "load_before": _loadavg(),
        "receivers": {},
        "notes": [],
    }
    selected: list[ReceiverSpec] = []
    for name in names:
        spec = RECEIVERS[name]
        why_not = spec.available()
        if not why_not and spec.all_interfaces:
            reason = netns.unavailable()
            if reason:
                why_not = f"it listens on every interface and {reason}"
        if why_not:
            print(f"compare: skipping {name}: {why_not}", file=sys.stderr)
            meta["notes"].append(f"{name} skipped: {why_not}")
            continue
        selected.append(spec)
    isolate = any(spec.all_interfaces for spec in selected)
    if isolate:
        meta["notes"].append(
            "every receiver and the load generator ran in one network namespace that has "
            "only lo (storescp and Orthanc listen on every interface)"
        )
    try:
        base = Path(tempfile.mkdtemp(prefix="pacs-loadtest-compare-", dir=args.workdir))
    except OSError as exc:
        print(f"compare: --workdir {args.workdir}: {exc.strerror}", file=sys.stderr)
        return 2
    cells: list[Cell] = []
    status = 0
    interrupted = False
    try:
        with netns.loopback_namespace() if isolate else contextlib.nullcontext():
            for spec in selected:
                outcome = _run_receiver(spec, base, args, meta, cells)
                status = max(status, outcome)
                if outcome == 130:
                    interrupted = True
                    break
    except netns.NamespaceError as exc:
        print(f"compare: {exc.strerror}", file=sys.stderr)
        meta["notes"].append(f"no run: {exc.strerror}")
        status = 1
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"compare: storage kept under {base}", file=sys.stderr)
    meta["load_after"] = _loadavg()
    _ratios(cells)
    print(text_table(cells))
    if args.markdown:
        Path(args.markdown).write_text(markdown(cells, meta))
    if args.json:
        write_json(args.json, {"meta": meta, "cells": [c.to_json() for c in cells]})
    if args.png:
        why_not = write_png(args.png, cells)
        if why_not:
            print(f"compare: {why_not}", file=sys.stderr)
    if interrupted:
        return 130
    if any(c.failed for c in cells):
        status = 1
    return status


def _run_receiver(
    spec: ReceiverSpec,
    base: Path,
    args: argparse.Namespace,
    meta: dict[str, Any],
    cells: list[Cell],
) -> int:
    """Start one receiver, run its cells, stop it: 0, 1 (it failed) or 130 (Ctrl-C)."""
    name = spec.name
    meta["receivers"][name] = spec.notes.format(
        workers=args.receiver_workers, fsync=args.receiver_fsync
    )
    print(f"compare: starting {name}", file=sys.stderr, flush=True)
    rdir = base / name
    rdir.mkdir()
    running: Running | None = None
    try:
        running = spec.start(rdir, args)
        wait_ready(running)
        if args.warmup:
            run(_cell_config(args, running.port, args.sizes[0], 1).with_(count=args.warmup))
        for size in args.sizes:
            for assocs in args.associations:
                running.clear_storage()
                cell = run_cell(running, args, size, assocs)
                cells.append(cell)
                print(
                    f"compare: {name} {format_bytes(size)} x{assocs}: "
                    f"{cell.instances_per_second:.1f} inst/s, "
                    f"{cell.megabytes_per_second:.1f} MB/s, {cell.failed} failed",
                    file=sys.stderr,
                    flush=True,
                )
                if cell.error == "interrupted":
                    return 130
                if not running.alive():
                    raise RunError(f"{name} exited; log:\n{running.log()[-2000:]}")
    except RunError as exc:
        print(f"compare: {name}: {exc}", file=sys.stderr)
        meta["notes"].append(f"{name}: {str(exc).splitlines()[0]}")
        return 1
    finally:
        if running is not None:
            running.stop()
    return 0


def _ratios(cells: Sequence[Cell]) -> None:
    ref = {
        (c.size, c.associations): c.instances_per_second
        for c in cells
        if c.receiver == "pacs-receiver"
    }
    for c in cells:
        base = ref.get((c.size, c.associations))
        c.ratio = c.instances_per_second / base if base else None


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
