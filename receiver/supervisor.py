"""The main process of ``pacs-receiver``: start-up, then the acceptor and the arbiter.

Theory of operation
-------------------
One uvloop event loop runs the main process. :class:`Supervisor` only composes:

* **start-up** (:mod:`receiver.startup`, :mod:`receiver.preflight`): the store is
  proven writable, the DICOM and metrics ports are bound, the index is repaired
  against the store, all before the first worker runs; a failure is one line on
  stderr and exit status 2, with nothing left behind.
* **accept** (:mod:`receiver.acceptor`): each connection goes, as a file descriptor,
  to the least-loaded worker, or is answered here (limits, who may connect).
* **the pool** (:mod:`receiver.pool`): the worker slots, their control channels and
  the open associations each holds.
* **supervise** (:mod:`receiver.arbiter`): workers and the metrics aggregator are
  child processes, reaped and respawned with back-off; signals only wake the
  arbiter's main loop, which acts on them (graceful stop, SIGHUP reload).

Dependencies point one way: supervisor -> arbiter -> acceptor -> pool.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from typing import Any

from workers.index import IndexUnavailable

from .acceptor import MAX_REFUSING, Acceptor, Rejector
from .arbiter import Arbiter, describe_exit
from .config import ReceiverConfig
from .pool import Pool, WorkerSlot
from .startup import reconcile_index, start_audit, start_telemetry, start_up

log = logging.getLogger("receiver.supervisor")


class Supervisor:
    """The main process: starts up, then runs the acceptor and the arbiter."""

    def __init__(
        self,
        cfg: ReceiverConfig,
        reload_config: Callable[[], ReceiverConfig] | None = None,
        on_ready: Callable[[tuple[str, int]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.reload_config = reload_config
        self.on_ready = on_ready
        #: made by run(), once the ports are bound (a failed start leaves none)
        self.pool: Pool | None = None
        self.acceptor: Acceptor | None = None
        self.arbiter: Arbiter | None = None

    async def run(self) -> int:
        """Serve until stopped; returns the exit status (StartError if it cannot
        start: nothing is left behind then)."""
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        started = start_up(cfg)
        try:
            reconcile_index(cfg, started.storage)
        except IndexUnavailable:
            # The caller reports it in one line: leave nothing behind.
            started.listener.close()
            if started.metrics_listener is not None:
                started.metrics_listener.close()
            shutil.rmtree(started.runtime_dir, ignore_errors=True)
            raise
        address = started.listener.getsockname()[:2]
        metrics_address = (
            started.metrics_listener.getsockname()[:2]
            if started.metrics_listener is not None
            else None
        )
        self.pool = pool = Pool(loop)
        self.acceptor = acceptor = Acceptor(cfg, pool, started.listener)
        self.arbiter = arbiter = Arbiter(
            cfg, pool, acceptor, started.runtime_dir, started.metrics_listener, self.reload_config
        )
        telemetry: Any = None
        audit: Any = None
        if arbiter.metrics_on:
            arbiter.start_metrics()
            telemetry = await start_telemetry(arbiter.metrics_socket)
        audit = start_audit(cfg, telemetry)
        arbiter.telemetry = acceptor.telemetry = telemetry
        acceptor.audit = audit
        arbiter.spawn_workers()
        acceptor.start()
        arbiter.install_signals()
        log.info(
            "pacs-receiver listening on %s:%d as %s with %d worker(s), storing in %s (fsync %s)%s",
            address[0],
            address[1],
            cfg.ae_title,
            cfg.workers,
            started.storage,
            cfg.fsync,
            f", metrics on http://{metrics_address[0]}:{metrics_address[1]}/metrics"
            if metrics_address is not None
            else "",
        )
        if self.on_ready is not None:
            self.on_ready((str(address[0]), int(address[1])))
        try:
            return await arbiter.serve()
        finally:
            if audit is not None:
                audit.application(started=False)
                # Up to 2 s for the queued messages, off the loop; then the telemetry
                # reports the last counts.
                await loop.run_in_executor(None, audit.close)
            if telemetry is not None:
                await telemetry.close()
            # The arbiter's: a SIGHUP may have bound another one.
            if arbiter.metrics_listener is not None:
                arbiter.metrics_listener.close()
            shutil.rmtree(started.runtime_dir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        """What the supervisor knows, for tests and logs."""
        pool, acceptor = self.pool, self.acceptor
        return {
            "workers": [
                {
                    "index": s.index,
                    "pid": s.proc.pid if s.proc else None,
                    "open": len(s.assigned),
                    "stored": s.stored,
                    "restarts": s.restarts,
                }
                for s in (pool.slots if pool is not None else [])
            ],
            "rejected": acceptor.rejected if acceptor is not None else 0,
            "unanswered": acceptor.unanswered if acceptor is not None else 0,
        }


def run(cfg: ReceiverConfig, reload_config: Callable[[], ReceiverConfig] | None = None) -> int:
    """Run the receiver in this process until it is stopped; the exit status."""
    import uvloop

    return uvloop.run(Supervisor(cfg, reload_config).run())


__all__ = [
    "MAX_REFUSING",
    "Rejector",
    "Supervisor",
    "WorkerSlot",
    "describe_exit",
    "run",
]
