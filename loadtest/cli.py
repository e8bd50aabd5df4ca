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
import os
import sys

from receiver import package_version
from workers.engine import acse

from .config import RunConfig
from .options import add_load_options, add_target_options, validate, write_json
from .payload import (
    FileEntry,
    scan_files,
)

__all__ = ["build_run_parser", "config_from_args", "main"]


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
