"""Options shared by ``pacs-loadtest run`` and ``pacs-loadtest compare``.

Both commands describe the same workload; their parsers take it from here, so that
:mod:`loadtest.compare` does not import the command line that dispatches to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from workers.engine import acse

from .config import SCENARIOS
from .payload import (
    CT_IMAGE_STORAGE,
    MAX_SIZE,
    MIN_SIZE,
    SYNTHETIC_TRANSFER_SYNTAXES,
)
from .units import parse_size

__all__ = ["add_load_options", "add_target_options", "validate", "write_json"]


_TS_ALIASES = {
    "explicit": acse.EXPLICIT_VR_LITTLE_ENDIAN,
    "implicit": acse.IMPLICIT_VR_LITTLE_ENDIAN,
    "big": acse.EXPLICIT_VR_BIG_ENDIAN,
}


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


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if getattr(args, "async_ops", None) is not None and not 0 <= args.async_ops <= 65535:
        parser.error("--async-ops must be between 0 and 65535")
    ts = args.transfer_syntax
    if not getattr(args, "files", None) and ts not in SYNTHETIC_TRANSFER_SYNTAXES:
        parser.error(
            f"--transfer-syntax {ts}: synthetic instances are made in Explicit/Implicit VR "
            "Little Endian or Explicit VR Big Endian; use --files for others"
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
