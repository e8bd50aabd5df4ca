"""The ``pacs-loadtest`` command line.

    pacs-loadtest [run] [options]      drive a DICOM SCP (the default subcommand)
    pacs-loadtest compare [options]    the same workload against several receivers
    pacs-loadtest sink [options]       an SCP that discards everything (generator ceiling)

Exit status of a run: 0 when every operation succeeded, 1 when any failed, 2 for
usage errors or a run that could not start, 130 when interrupted (Ctrl-C) without
failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from receiver import package_version
from workers.engine import acse

from .config import SCENARIOS, RunConfig
from .payload import (
    CT_IMAGE_STORAGE,
    MAX_SIZE,
    MIN_SIZE,
    SYNTHETIC_TRANSFER_SYNTAXES,
    FileEntry,
    scan_files,
)
from .units import parse_size

__all__ = ["build_run_parser", "config_from_args", "main"]

_TS_ALIASES = {
    "explicit": acse.EXPLICIT_VR_LITTLE_ENDIAN,
    "implicit": acse.IMPLICIT_VR_LITTLE_ENDIAN,
    "big": acse.EXPLICIT_VR_BIG_ENDIAN,
}

EPILOG = """\
examples:
  pacs-loadtest --port 11112 --size 512k --associations 4 --duration 30
  pacs-loadtest --port 11112 --scenario echo --associations 8 --count 10000
  pacs-loadtest --port 11112 --files /data/ct --count 2000 --async-ops 8 --json out.json
  pacs-loadtest compare --sizes 8k,512k --associations 1,4 --count 2000 --markdown cmp.md
  pacs-loadtest sink --port 11113

Ctrl-C stops (in-flight operations finish), a second Ctrl-C aborts; the summary is
printed either way. Exit status 1 when any operation failed.
"""


def _size(text: str) -> int:
    try:
        n = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not MIN_SIZE <= n <= MAX_SIZE:
        raise argparse.ArgumentTypeError("must be between 8k and 2g")
    return n


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _positive_float(text: str) -> float:
    x = float(text)
    if not x > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return x


def _transfer_syntax(text: str) -> str:
    return _TS_ALIASES.get(text.lower(), text)


def add_target_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("target")
    g.add_argument("--host", default="127.0.0.1", help="SCP address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=11112, help="SCP port (default 11112)")
    g.add_argument("--called-ae", default="ANY-SCP", help="called AE title (default ANY-SCP)")
    g.add_argument(
        "--calling-ae", default="PACS-LOADTEST", help="calling AE title (default PACS-LOADTEST)"
    )


def add_load_options(parser: argparse.ArgumentParser, *, for_compare: bool = False) -> None:
    g = parser.add_argument_group("load shape")
    if not for_compare:
        g.add_argument(
            "--scenario",
            choices=SCENARIOS,
            default="store",
            help="store (default): C-STOREs back to back; echo: associate + C-ECHO + "
            "release, repeatedly (association set-up rate); mixed: C-STOREs with every "
            "--echo-every-th operation a C-ECHO, associations re-opened every "
            "--per-association (default 100) operations",
        )
        g.add_argument(
            "--associations",
            type=_positive_int,
            default=1,
            help="concurrent associations, spread over the processes (default 1)",
        )
    g.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        help="generator processes, each with its own uvloop loop (default 1)",
    )
    if not for_compare:
        g.add_argument("--count", type=_positive_int, help="total operations, then stop")
        g.add_argument(
            "--duration",
            type=_positive_float,
            help="seconds, then stop (default 10 when --count is not given either)",
        )
    g.add_argument("--rate", type=_positive_float, help="cap on operations per second, total")
    g.add_argument(
        "--per-association",
        type=_positive_int,
        help="re-open each association after this many operations (default: keep it open)",
    )
    g.add_argument(
        "--async-ops",
        type=int,
        metavar="N",
        help="propose an asynchronous operations window of N (0 = unlimited) and keep up "
        "to the granted number outstanding per association (default: not proposed, 1)",
    )
    g.add_argument(
        "--max-pdu",
        type=parse_size,
        default=1 << 20,
        help="Maximum Length we announce for receiving (default 1m)",
    )
    g.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        help="seconds to wait for the SCP at every step: connect, association answer, "
        "each DIMSE response (default 30)",
    )
    g.add_argument(
        "--grace",
        type=_positive_float,
        default=30.0,
        help="after --duration or Ctrl-C, seconds in-flight operations get before the "
        "associations are aborted (default 30)",
    )
    g.add_argument(
        "--echo-every", type=_positive_int, default=10, help="mixed: every n-th op is a C-ECHO"
    )
    p = parser.add_argument_group("payload")
    if not for_compare:
        p.add_argument(
            "--size",
            type=_size,
            default=8 * 1024,
            help="synthetic instance size, 8k..2g (default 8k)",
        )
    p.add_argument(
        "--sop-class",
        default=CT_IMAGE_STORAGE,
        help=f"SOP class of synthetic instances (default CT Image Storage {CT_IMAGE_STORAGE})",
    )
    p.add_argument(
        "--transfer-syntax",
        type=_transfer_syntax,
        default=acse.EXPLICIT_VR_LITTLE_ENDIAN,
        help="of synthetic instances: explicit (default), implicit, big, or a UID",
    )
    if not for_compare:
        p.add_argument(
            "--files",
            action="append",
            metavar="DIR",
            help="replay the DICOM Part 10 files under DIR (repeatable) instead of "
            "synthetic instances; streamed from disk, sent as they are (their own UIDs)",
        )


def build_run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-loadtest",
        description="Load generator for DICOM Storage/Verification SCPs: N processes x M\n"
        "associations, optional asynchronous operations, synthetic or real instances,\n"
        "latency percentiles.\n\n"
        "subcommands: run (default), compare (pacs-loadtest compare --help),\n"
        "sink (pacs-loadtest sink --help)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"pacs-loadtest {package_version()}",
        help="print the version and exit",
    )
    add_target_options(parser)
    add_load_options(parser)
    o = parser.add_argument_group("output")
    o.add_argument(
        "--progress",
        action="store_true",
        help="live progress line on stderr even when it is not a terminal",
    )
    o.add_argument(
        "--no-progress", action="store_true", help="no progress line, even on a terminal"
    )
    o.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': stdout)")
    o.add_argument(
        "--record-uids",
        metavar="FILE",
        help="write one line per C-STORE: SOP Instance UID, status, bytes, SHA-256 of the "
        "data set sent (verification; hashing costs time)",
    )
    o.add_argument("-q", "--quiet", action="store_true", help="no summary on stdout")
    return parser


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if getattr(args, "async_ops", None) is not None and not 0 <= args.async_ops <= 65535:
        parser.error("--async-ops must be between 0 and 65535")
    ts = args.transfer_syntax
    if not getattr(args, "files", None) and ts not in SYNTHETIC_TRANSFER_SYNTAXES:
        parser.error(
            f"--transfer-syntax {ts}: synthetic instances are made in Explicit/Implicit VR "
            "Little Endian or Explicit VR Big Endian; use --files for others"
        )


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    validate(args, parser)
    files: list[FileEntry] = []
    if args.files:
        if args.scenario == "echo":
            parser.error("--files makes no sense with --scenario echo")
        files, skipped = scan_files(args.files)
        if not files:
            parser.error(f"no DICOM Part 10 files under {', '.join(args.files)}")
        if skipped:
            print(f"pacs-loadtest: skipped {skipped} non-DICOM file(s)", file=sys.stderr)
        pairs = {(f.sop_class_uid, f.transfer_syntax) for f in files}
        if len(pairs) + (args.scenario == "mixed") > acse.MAX_CONTEXTS:
            parser.error(
                f"the files need {len(pairs)} presentation contexts; at most "
                f"{acse.MAX_CONTEXTS} fit in one association"
            )
    duration = args.duration
    if args.count is None and duration is None:
        duration = 10.0
    per_association = args.per_association
    if per_association is None and args.scenario == "mixed":
        per_association = 100
    return RunConfig(
        host=args.host,
        port=args.port,
        called_ae=args.called_ae,
        calling_ae=args.calling_ae,
        scenario=args.scenario,
        processes=args.processes,
        associations=args.associations,
        count=args.count,
        duration=duration,
        rate=args.rate,
        per_association=per_association,
        async_ops=args.async_ops,
        max_pdu=args.max_pdu,
        size=args.size,
        sop_class=args.sop_class,
        transfer_syntax=args.transfer_syntax,
        files=files,
        echo_every=args.echo_every,
        record_path=os.path.abspath(args.record_uids) if args.record_uids else None,
        acse_timeout=args.timeout,
        dimse_timeout=args.timeout,
        grace=args.grace,
    )


def write_json(path: str, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def run_main(argv: list[str]) -> int:
    from .runner import RunError, run

    parser = build_run_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    show = not args.no_progress and (args.progress or sys.stderr.isatty())
    try:
        report = run(cfg, progress=show)
    except RunError as exc:
        print(f"pacs-loadtest: {exc}", file=sys.stderr)
        return 2
    if not args.quiet and args.json != "-":
        print(report.text(), flush=True)
    if args.json:
        write_json(args.json, report.to_json())
    if not report.ok:
        return 1
    return 130 if report.stats.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from .compare import main as compare_main

        return compare_main(argv[1:])
    if argv and argv[0] == "sink":
        from .sink import main as sink_main

        return sink_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return run_main(argv)
