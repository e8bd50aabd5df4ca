"""A worker whose "closed" reports to the supervisor are lost, as when its control
channel is full (``Worker._send`` drops a message on BlockingIOError): bind
:func:`on_echo` with ``--handler EVT_C_ECHO=tests.receiver.lossy_hooks:on_echo`` and
every worker that imports this module drops its ``closed`` messages; heartbeats
still go through. Only tests import this."""

from __future__ import annotations

import sys
from typing import Any


def _lose_closed_reports() -> None:
    # The worker runs as ``python -m workers.main``: its Worker class lives in
    # __main__ (workers.main, if imported too, is another copy).
    for name in ("__main__", "workers.main"):
        worker = getattr(sys.modules.get(name), "Worker", None)
        if worker is None or getattr(worker, "_loses_closed_reports", False):
            continue
        original = worker._send

        def _send(self: Any, message: dict[str, Any], _original: Any = original) -> None:
            if message.get("op") == "closed":
                return  # as if the channel had been full
            _original(self, message)

        worker._send = _send
        worker._loses_closed_reports = True


_lose_closed_reports()


def on_echo(event: Any) -> int:
    """C-ECHO: Success."""
    return 0x0000
