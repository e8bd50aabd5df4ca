"""``python -m metrics``: run the metrics aggregator (the supervisor starts it).

    python -m metrics --socket /run/pacs-receiver/metrics.sock --port 9110

Telemetry frames are read from ``--socket``; ``GET /metrics`` and ``GET /healthz`` are
served on ``--host``:``--port`` (127.0.0.1 unless told otherwise; ``--port 0`` picks a
free port). Once both are bound it logs, at INFO on stderr,
``metrics aggregator: telemetry on PATH, http://HOST:PORT/metrics``. SIGTERM and SIGINT
stop it cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys

from .aggregator import Aggregator, Limits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m metrics",
        description="pacs-receiver metrics aggregator: telemetry frames in, Prometheus out",
    )
    parser.add_argument("--socket", required=True, help="unix socket the workers write to")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=9464, help="HTTP port (9464; 0: any)")
    parser.add_argument(
        "--http-fd",
        type=int,
        help="serve HTTP on this inherited listening socket instead of binding --port",
    )
    parser.add_argument(
        "--max-ae-titles",
        type=int,
        default=100,
        help="distinct AE titles kept as labels; more fold into 'other' (100)",
    )
    parser.add_argument(
        "--max-sop-classes",
        type=int,
        default=100,
        help="distinct SOP classes kept as labels; more fold into 'other' (100)",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING ... (INFO)"
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="'text' (default) or 'json' (one object per line)",
    )
    return parser


async def _serve(args: argparse.Namespace) -> int:
    limits = Limits(ae_titles=args.max_ae_titles, sop_classes=args.max_sop_classes)
    http_sock = None
    if args.http_fd is not None:
        http_sock = socket.socket(fileno=args.http_fd)
        http_sock.setblocking(False)
    aggregator = Aggregator(
        args.socket, host=args.host, port=args.port, limits=limits, http_sock=http_sock
    )
    await aggregator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await aggregator.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from workers.logs import setup_logging

    setup_logging(args.log_level, args.log_format, "aggregator")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
