"""The arbiter of the main process: the child processes and the signals.

Theory of operation
-------------------
As gunicorn's arbiter: the workers (``python -m workers.main``) and the metrics
aggregator (``python -m metrics``) are child processes; one that exits is reaped, its
exit named, and respawned with back-off so that a crash loop does not spin; a worker
whose heartbeat (sent from its own event loop) stops is killed and replaced.

**Signals** only enqueue the signal and wake the main loop (:meth:`Arbiter.serve`);
the loop acts on them between its ticks: SIGTERM/SIGINT stop accepting, let open
associations finish up to ``--graceful-timeout``, then exit 0 (a second SIGINT kills
the workers at once); SIGHUP re-reads the configuration and replaces the workers by
new ones, the old ones finishing their open associations first.

The connections themselves are the acceptor's (:mod:`receiver.acceptor`); what the
workers hold is counted in :mod:`receiver.pool`, which the arbiter tells when a
worker is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from workers import control
from workers.main import CONFIG_ENV
from workers.storage.sweep import sweep_incoming

from .acceptor import Acceptor
from .config import ReceiverConfig
from .pool import Pool, WorkerSlot
from .preflight import Leftovers, StartError, bind_tcp, prepare_storage

# One logger for the main process (see receiver.pool).
log = logging.getLogger("receiver.supervisor")

TICK = 0.2
HEARTBEAT_TIMEOUT = 10.0
#: A child that dies sooner than this after its start counts as a crash-loop step.
QUICK_DEATH = 5.0
MAX_BACKOFF = 10.0
SWEEP_INTERVAL = 300.0


def describe_exit(returncode: int) -> str:
    """Name an exit: 'exit status 3', 'killed by SIGKILL', 'exited normally'."""
    if returncode == 0:
        return "exited normally"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def backoff(failures: int) -> float:
    """Seconds before the next start of a child that failed ``failures`` times in a row."""
    return min(MAX_BACKOFF, 0.1 * 2 ** max(0, failures - 1)) if failures else 0.0


def worker_json(cfg: ReceiverConfig, metrics_socket: str | None) -> str:
    """The configuration a worker process gets (in its environment, CONFIG_ENV)."""
    data: dict[str, Any] = {
        "storage": {
            "root": cfg.local_storage(),
            "layout": cfg.layout,
            "fsync": cfg.fsync,
            "duplicates": cfg.duplicates,
            "digest": cfg.index != "off",
        },
        "ae_title": cfg.ae_title,
        "require_called_ae": cfg.require_called_ae,
        "allowed_calling_aes": list(cfg.calling_aes) or None,
        "syntaxes": {k: list(v) for k, v in cfg.syntaxes().items()},
        "max_pdu_length": cfg.max_pdu,
        "artim_timeout": cfg.artim_timeout,
        "acse_timeout": cfg.acse_timeout,
        "network_timeout": cfg.network_timeout,
        "min_receive_rate": cfg.min_receive_rate,
        "group_commit_wait": cfg.group_commit_wait / 1000,
        "handler_timeout": cfg.dimse_timeout,
        "max_async_ops": cfg.max_async_ops,
        "max_dataset_memory": cfg.max_dataset_memory,
        "handlers": list(cfg.handlers),
        "identity": cfg.identity_settings().to_dict() if cfg.identity else None,
        "tls": cfg.tls_settings().to_dict() if cfg.tls_cert else None,
        "log_instances": cfg.log_instances,
        "audit": cfg.audit_settings().to_dict() if cfg.audit_syslog else None,
        # The acceptor cannot peek the calling AE title in TLS traffic: with TLS,
        # each worker asks the supervisor once it has read the A-ASSOCIATE-RQ, and
        # the supervisor applies the per-AE limit and [ae-sources] for all of them.
        "max_associations_per_ae": 0,
        "extra": {
            "ask_admission": bool(cfg.tls_cert and (cfg.max_associations_per_ae or cfg.ae_sources)),
            "graceful_timeout": cfg.graceful_timeout,
            "metrics_socket": metrics_socket,
            "index": cfg.index_target(),
            "index_node": cfg.index_node_name(),
            # --storage s3://... (workers/storage/objectstore.py)
            "s3": cfg.s3_settings().to_dict() if cfg.s3_settings() else None,
            "workers": cfg.workers,
            # storage commitment and query/retrieve over the index (workers/indexed.py)
            "indexed": {
                "index": cfg.index_target(),
                "node": cfg.index_node_name(),
                "query_retrieve": cfg.query_retrieve,
                "remote_aes": dict(cfg.remote_aes),
                "commitment_max_references": cfg.commitment_max_references,
                "commitment_retry": cfg.commitment_retry,
            },
        },
    }
    return json.dumps(data)


class Arbiter:
    """Spawns, reaps and respawns the workers and the metrics aggregator; acts on
    signals; stops gracefully; reloads on SIGHUP."""

    def __init__(
        self,
        cfg: ReceiverConfig,
        pool: Pool,
        acceptor: Acceptor,
        runtime_dir: str,
        metrics_listener: socket.socket | None,
        reload_config: Callable[[], ReceiverConfig] | None = None,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.acceptor = acceptor
        self.loop = pool.loop
        self.runtime_dir = runtime_dir
        self.reload_config = reload_config
        self.generation = 0
        self.stopping = False
        self.reload_requested = False
        #: signals received and not acted on yet, and the main loop's wake-up call
        self._signals: deque[int] = deque()
        self._wake = asyncio.Event()
        #: with stopping: when the workers still running get SIGKILL
        self._kill_at: float | None = None
        #: the metrics HTTP port, bound at start-up and inherited by every aggregator
        self.metrics_listener = metrics_listener
        self.metrics_proc: subprocess.Popen[bytes] | None = None
        self.metrics_started = 0.0
        self.metrics_failures = 0
        self.metrics_restart_at = 0.0
        self._last_sweep = time.monotonic()
        self.telemetry: Any = None  # workers.telemetry.Telemetry once metrics are on

    @property
    def metrics_on(self) -> bool:
        """Metrics were asked for and their port is bound."""
        return self.metrics_listener is not None

    @property
    def metrics_socket(self) -> str:
        return os.path.join(self.runtime_dir, "metrics.sock")

    # ----------------------------------------------------------- main loop

    def install_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP from now on go to :meth:`_on_signal`."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        # Enqueue and wake the main loop, nothing else: it acts between its ticks.
        self._signals.append(signum)
        self._wake.set()

    async def serve(self) -> int:
        """The main loop: wait a tick (or for a signal), act on the signals received,
        then reap, respawn and watch; returns the exit status once stopped."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), TICK)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                while self._signals:
                    self._act_on(self._signals.popleft())
                if self._tick():
                    self._finish()
                    return 0
            except Exception:
                log.exception("supervisor tick failed")

    def _act_on(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self._request_stop(interactive=signum == signal.SIGINT)

    def _tick(self) -> bool:
        """One round of the arbiter's duties; True once stopped (every worker gone)."""
        now = time.monotonic()
        for slot in self.pool.slots:
            if self._reap(slot, now):
                if not self.stopping and now >= slot.restart_at:
                    slot.restarts += 1
                    self.spawn(slot)
            elif not self.stopping and now - slot.last_heartbeat > HEARTBEAT_TIMEOUT:
                log.error(
                    "worker %d (pid %d) sent no heartbeat for %.0f s: killing it",
                    slot.index,
                    slot.proc.pid if slot.proc else -1,
                    now - slot.last_heartbeat,
                )
                if slot.proc is not None:
                    slot.proc.kill()
        for slot in list(self.pool.old):
            if self._reap(slot, now):
                self.pool.old.remove(slot)
        self._check_metrics(now)
        self.acceptor.tick(now)
        if not self.stopping and now - self._last_sweep > SWEEP_INTERVAL:
            self._last_sweep = now
            sweep_incoming(self.cfg.local_storage(), 3600)
        if self.reload_requested and not self.stopping:
            self.reload_requested = False
            self._reload()
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            self._kill_stragglers()
        return self.stopping and not any(s.proc for s in self.pool.slots) and not self.pool.old

    # ------------------------------------------------------------ children

    def spawn_workers(self) -> None:
        """Fill the pool with ``--workers`` new workers (of the current generation)."""
        for index in range(self.cfg.workers):
            self.pool.slots.append(self.spawn(WorkerSlot(index, self.generation)))

    def spawn(self, slot: WorkerSlot) -> WorkerSlot:
        """Start a worker process in ``slot`` (on failure, schedule the next try)."""
        parent, child = control.socketpair()
        env = dict(os.environ)
        env[CONFIG_ENV] = worker_json(self.cfg, self.metrics_socket if self.metrics_on else None)
        cmd = [
            sys.executable,
            "-m",
            "workers.main",
            "--id",
            str(slot.index),
            "--control-fd",
            str(child.fileno()),
            "--log-level",
            self.cfg.log_level,
            "--log-format",
            self.cfg.log_format,
        ]
        try:
            proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], env=env)
        except OSError as exc:
            log.error("cannot start worker %d: %s", slot.index, exc)
            parent.close()
            child.close()
            slot.failures += 1
            slot.restart_at = time.monotonic() + backoff(slot.failures)
            return slot
        child.close()
        parent.setblocking(False)
        slot.proc = proc
        slot.ctrl = parent
        slot.started = slot.last_heartbeat = time.monotonic()
        slot.assigned.clear()
        slot.sent_seq.clear()
        slot.sent = 0
        slot.buffered = 0
        self.pool.watch(slot)
        log.info("worker %d started (pid %d)", slot.index, proc.pid)
        return slot

    def _reap(self, slot: WorkerSlot, now: float) -> bool:
        """True when the slot's process has exited (and was accounted for)."""
        if slot.proc is None:
            return True
        code = slot.proc.poll()
        if code is None:
            return False
        lost = len(slot.assigned)
        self.pool.release(slot)
        slot.proc = None
        quick = now - slot.started < QUICK_DEATH
        slot.failures = slot.failures + 1 if (quick and code != 0) else 0
        level = logging.INFO if (code == 0 and (slot.draining or self.stopping)) else logging.ERROR
        log.log(
            level,
            "worker %d %s%s",
            slot.index,
            describe_exit(code),
            f" with {lost} open connection(s)" if lost else "",
        )
        slot.restart_at = now + backoff(slot.failures)
        if code != 0:
            # A worker killed mid-write leaves its temp files: remove them now (only
            # files of dead processes go; the other workers' are kept).
            try:
                sweep_incoming(self.cfg.local_storage(), 0)
            except OSError as exc:
                log.warning("could not sweep the temp directory: %s", exc)
        if self.telemetry is not None and not (slot.draining or self.stopping):
            self.telemetry.worker_restarted(slot.index, describe_exit(code))
        return True

    # ------------------------------------------------------------- metrics

    def start_metrics(self) -> None:
        """Start the metrics aggregator on the bound metrics port (if any)."""
        listener = self.metrics_listener
        if listener is None:
            return
        cmd = [
            sys.executable,
            "-m",
            "metrics",
            "--socket",
            self.metrics_socket,
            "--host",
            self.cfg.metrics_host,
            "--port",
            str(self.cfg.metrics_port),
            "--http-fd",
            str(listener.fileno()),
            "--log-level",
            self.cfg.log_level,
            "--log-format",
            self.cfg.log_format,
        ]
        try:
            self.metrics_proc = subprocess.Popen(cmd, pass_fds=[listener.fileno()])
            self.metrics_started = time.monotonic()
            log.info("metrics aggregator started (pid %d)", self.metrics_proc.pid)
        except OSError as exc:
            log.error("cannot start the metrics aggregator: %s", exc)
            self.metrics_proc = None

    def _check_metrics(self, now: float) -> None:
        if not self.metrics_on:
            return
        proc = self.metrics_proc
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            if not self.stopping:
                log.error("metrics aggregator %s; restarting it", describe_exit(code))
                if self.telemetry is not None:
                    self.telemetry.worker_restarted("aggregator", describe_exit(code))
            quick = now - self.metrics_started < QUICK_DEATH
            self.metrics_failures = self.metrics_failures + 1 if quick else 0
            self.metrics_restart_at = now + backoff(self.metrics_failures)
            self.metrics_proc = None
        if not self.stopping and now >= self.metrics_restart_at:
            self.start_metrics()

    # ---------------------------------------------------- stop and reload

    def _request_stop(self, interactive: bool = False) -> None:
        if self.stopping:
            if not interactive:
                return  # SIGTERM again: still graceful
            log.warning("second interrupt: aborting open associations now")
            for slot in self.pool.all():
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.kill()
            return
        self.stopping = True
        log.info(
            "stopping: no new connections; open associations get %.0f s", self.cfg.graceful_timeout
        )
        self.acceptor.close()
        for slot in self.pool.all():
            self._stop_worker(slot)
        self._kill_at = time.monotonic() + self.cfg.graceful_timeout + 5.0

    def _stop_worker(self, slot: WorkerSlot) -> None:
        slot.draining = True
        if slot.ctrl is not None:
            try:
                control.send(slot.ctrl, {"op": "stop", "graceful": self.cfg.graceful_timeout})
                return
            except OSError:
                pass
        if slot.proc is not None and slot.proc.poll() is None:
            slot.proc.terminate()

    def _kill_stragglers(self) -> None:
        for slot in self.pool.all():
            if slot.proc is not None and slot.proc.poll() is None:
                log.error("worker %d did not stop in time: killing it", slot.index)
                slot.proc.kill()

    def _finish(self) -> None:
        proc = self.metrics_proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.info("stopped")

    def _reload(self) -> None:
        if self.reload_config is None:
            log.info("SIGHUP: nothing to reload")
            return
        try:
            new = self.reload_config()
        except Exception as exc:  # ConfigError, or a handler that no longer imports
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        if new.local_storage() != self.cfg.local_storage():
            # The new workers would fail on every instance: check it as at start-up.
            try:
                prepare_storage(new.local_storage(), Leftovers())
            except StartError as exc:
                log.error("SIGHUP: configuration not reloaded: %s", exc)
                return
        if (new.host, new.port) != (self.cfg.host, self.cfg.port):
            log.warning(
                "SIGHUP: a new --host/--port takes a restart; keeping %s:%d",
                self.cfg.host,
                self.cfg.port,
            )
            new.host, new.port = self.cfg.host, self.cfg.port
        metrics_changed = (new.metrics_port, new.metrics_host) != (
            self.cfg.metrics_port,
            self.cfg.metrics_host,
        )
        old_metrics = (self.cfg.metrics_host, self.cfg.metrics_port)
        self.cfg = new
        self.acceptor.reconfigure(new)
        self.generation += 1
        pool = self.pool
        log.info("SIGHUP: configuration reloaded; replacing %d worker(s)", len(pool.slots))
        old, pool.slots = pool.slots, []
        for slot in old:
            self._stop_worker(slot)
            pool.old.append(slot)
        self.spawn_workers()
        if metrics_changed:
            self._rebind_metrics(old_metrics)

    def _rebind_metrics(self, old: tuple[str, int]) -> None:
        """SIGHUP with a new --metrics-host/--metrics-port: bind it, then restart the
        aggregator on it; if it cannot be bound, say so and keep the old one."""
        cfg = self.cfg
        try:
            new = (
                bind_tcp(cfg.metrics_host, cfg.metrics_port, 128, "cannot serve metrics on")
                if cfg.metrics_port and self.metrics_listener is not None
                else None
            )
        except StartError as exc:
            log.error("SIGHUP: %s; metrics stay on %s:%d", exc, old[0], old[1])
            cfg.metrics_host, cfg.metrics_port = old
            return
        if new is None and cfg.metrics_port:
            log.warning("SIGHUP: metrics were off at start-up; turning them on takes a restart")
            cfg.metrics_host, cfg.metrics_port = old
            return
        if self.metrics_listener is not None:
            self.metrics_listener.close()
        self.metrics_listener = new
        if self.metrics_proc is not None:
            self.metrics_proc.terminate()


__all__ = ["Arbiter", "backoff", "describe_exit", "worker_json"]
