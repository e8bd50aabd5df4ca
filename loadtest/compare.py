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
import contextlib
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import netns
from .config import RunConfig
from .options import add_load_options, validate, write_json
from .proctree import TreeSampler
from .receivers import (
    DEFAULT_RECEIVERS,
    RECEIVERS,
    ReceiverSpec,
    Running,
    dcmtk_binary,
    free_port,
    orthanc_binary,
    orthanc_config,
    wait_ready,
)
from .report import (
    PNG_NEEDS,
    Cell,
    _matplotlib_missing,
    markdown,
    ratios,
    text_table,
    write_png,
)
from .runner import RunError, run
from .stats import Report
from .units import format_bytes, parse_size_list

# The receivers and the report have their own modules; these names stay importable
# from here (tests and scripts use ``compare.RECEIVERS``, ``compare.Cell`` ...).
__all__ = [
    "PNG_NEEDS",
    "RECEIVERS",
    "Cell",
    "ReceiverSpec",
    "RunError",
    "Running",
    "dcmtk_binary",
    "free_port",
    "main",
    "orthanc_binary",
    "orthanc_config",
    "wait_ready",
    "write_png",
]


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
    ratios(cells)
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


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
