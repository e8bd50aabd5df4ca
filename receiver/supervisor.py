"""The main process of ``pacs-receiver``: acceptor and supervisor.

Theory of operation
-------------------
One uvloop event loop does four things:

* **accept**: the listening socket is read in batches; each connection goes (TCP_NODELAY
  is set by the transport that serves it), as a file descriptor over the worker's control channel
  (:mod:`workers.control`, SCM_RIGHTS), to the least-loaded worker; our copy is
  closed at once. Load is what the workers report back: connections handed over and
  not yet reported closed, then bytes waiting to be parsed.
* **limit**: beyond ``--max-associations`` (or the per-calling-AE limit, for which
  the calling AE title is peeked from the A-ASSOCIATE-RQ without consuming it) the
  acceptor answers the association itself with A-ASSOCIATE-RJ (rejected-transient,
  service-provider presentation, local-limit-exceeded), using the same engine as
  the workers: the peer gets a protocol answer, never a silent close.
* **who may connect**: ``--deny-ip`` / ``--allow-ip`` are applied to the peer address
  at accept, ``[ae-sources]`` (calling AE -> source addresses) after the peek; a
  refused peer gets A-ASSOCIATE-RJ (rejected-permanent, service-user, reason 1
  no-reason-given or 3 calling-AE-title-not-recognized) the same way.
* **supervise** (gunicorn's arbiter): workers and the metrics aggregator are child
  processes; one that exits is reaped, its exit named, and respawned with back-off
  so that a crash loop does not spin; a worker whose heartbeat (sent from its own
  event loop) stops is killed and replaced.
* **signals** only set flags that the loop acts on: SIGTERM/SIGINT stop accepting,
  let open associations finish up to ``--graceful-timeout``, then exit 0; SIGHUP
  re-reads the configuration and replaces the workers by new ones, the old ones
  finishing their open associations first.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers import control
from workers.activity import log_fields, reject_names
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, Role
from workers.engine.primitives import NEED_DATA, AssociateIndication
from workers.index import IndexUnavailable, open_index
from workers.index.reconcile import reconcile
from workers.index.reconcile_s3 import reconcile_object_store
from workers.main import CONFIG_ENV
from workers.storage.sweep import sweep_incoming

from .config import ReceiverConfig
from .preflight import Leftovers, StartError, bind_tcp, prepare_storage
from .proxy_gate import Peer, ProxyGate

log = logging.getLogger("receiver.supervisor")

TICK = 0.2
HEARTBEAT_TIMEOUT = 10.0
#: A child that dies sooner than this after its start counts as a crash-loop step.
QUICK_DEATH = 5.0
MAX_BACKOFF = 10.0
ACCEPT_BATCH = 256
SWEEP_INTERVAL = 300.0
#: Refused connections answered (A-ASSOCIATE-RJ) at once; beyond it a refused peer is
#: closed without its answer and counted: a flood of refused peers that send nothing
#: must not pin a receive buffer each in the supervisor until their ARTIM expires.
MAX_REFUSING = 256
#: Bytes of an A-ASSOCIATE-RQ up to the end of the Calling AE Title (PS3.8 9.3.2).
PEEK_BYTES = 42
#: Accept errors that mean "out of descriptors or memory": the pending connection
#: stays queued, so the level-triggered listener would fire again at once.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0


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


@dataclass(slots=True)
class WorkerSlot:
    """One place in the pool; its process is replaced when it dies."""

    index: int
    generation: int
    proc: subprocess.Popen[bytes] | None = None
    ctrl: socket.socket | None = None
    started: float = 0.0
    last_heartbeat: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    draining: bool = False
    #: connection id -> calling AE title ("" when not peeked)
    assigned: dict[int, str] = field(default_factory=dict)
    buffered: int = 0
    stored: int = 0
    restarts: int = 0
    #: connections handed to this process so far, and each open one's number among
    #: them: a heartbeat that says the worker had read that many and lists which are
    #: still open frees those of the rest whose "closed" report was lost
    sent: int = 0
    sent_seq: dict[int, int] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def load(self) -> tuple[int, int]:
        return len(self.assigned), self.buffered


class Rejector(asyncio.Protocol):
    """Reads one A-ASSOCIATE-RQ and answers it with ``rj``; logs one line (peer,
    AE titles, ``why``) and counts the RJ in ``telemetry`` (when metrics are on)."""

    def __init__(
        self,
        rj: p.AssociateRJ,
        timeout: float,
        why: str | None = None,
        telemetry: Any = None,
        on_close: Callable[[], None] | None = None,
        peer: Peer | None = None,
    ) -> None:
        self.rj = rj
        self.on_close = on_close
        self.timeout = timeout
        if why is None:
            transient = rj.result == p.RejectResult.TRANSIENT
            why = (
                "temporary congestion"
                if transient and rj.reason == p.RejectReason.TEMPORARY_CONGESTION
                else "local limit exceeded"
            )
        self.why = why
        self.telemetry = telemetry
        self.peer = "?"
        #: the client's address from a PROXY header (receiver/proxy_gate.py)
        self.proxied = peer
        self.answered = False
        self.conn = Connection(Role.ACCEPTOR, EngineConfig(max_control_pdu_length=256 * 1024))
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = self.proxied or transport.get_extra_info("peername")
        if peer:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        loop = asyncio.get_running_loop()
        self.conn.connection_made(loop.time())
        self.timer = loop.call_later(self.timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data, asyncio.get_running_loop().time())
        while (ev := self.conn.next_event()) is not NEED_DATA:
            if isinstance(ev, AssociateIndication) and not self.answered:
                self.answered = True
                calling, called = str(ev.request.calling_ae), str(ev.request.called_ae)
                rj = self.rj
                names = reject_names(rj.result, rj.source, rj.reason)
                log_fields(
                    log,
                    logging.WARNING,
                    "association-rejected",
                    {
                        "peer": self.peer,
                        "calling_ae": calling,
                        "called_ae": called,
                        **names,
                        "why": self.why,
                    },
                    f"rejecting association from {calling!r} to {called!r} (peer {self.peer}): "
                    f"{self.why} ({', '.join(names.values())})",
                )
                self.conn.reject(self.rj, asyncio.get_running_loop().time())
                if self.telemetry is not None:
                    rj = self.rj
                    self.telemetry.association_rejected(
                        calling, called, int(rj.result), int(rj.source), int(rj.reason)
                    )
        out = self.conn.data_to_send()
        if self.transport is not None:
            if out:
                self.transport.writelines(out)
            if self.conn.wants_close or self.conn.state.value == 13:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        if not self.answered:
            log.warning(
                "refused connection from %s (%s): no A-ASSOCIATE-RQ came", self.peer, self.why
            )


def _peer_closed(fd: int) -> bool:
    """The peer of the TCP socket ``fd`` shut its side down (or it failed)."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    return any(events & gone for _fd, events in poller.poll(0))


class Supervisor:
    """Acceptor and supervisor of the worker pool and the metrics aggregator."""

    def __init__(
        self,
        cfg: ReceiverConfig,
        reload_config: Callable[[], ReceiverConfig] | None = None,
        on_ready: Callable[[tuple[str, int]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.access = cfg.access_policy()
        self.proxy_gate = self._proxy_gate(cfg)
        self.reload_config = reload_config
        self.on_ready = on_ready
        self.slots: list[WorkerSlot] = []
        self.old: list[WorkerSlot] = []  # draining after a reload
        self.generation = 0
        self.ids = itertools.count(1)
        self.per_ae: Counter[str] = Counter()
        self.listener: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        #: SIGTERM came: readiness says 503; stopping follows after --drain-delay
        self.draining = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self.reload_requested = False
        #: made by run(), once the ports are bound (a failed start leaves none)
        self.runtime_dir = ""
        #: the metrics HTTP port, bound here and inherited by every aggregator started
        self.metrics_listener: socket.socket | None = None
        self.metrics_proc: subprocess.Popen[bytes] | None = None
        self.metrics_started = 0.0
        self.metrics_failures = 0
        self.metrics_restart_at = 0.0
        self.rejected = 0
        #: Rejectors in flight, and refused peers closed unanswered beyond MAX_REFUSING
        self.refusing = 0
        self.unanswered = 0
        self._unanswered_unlogged = 0
        self._unanswered_logged_at = 0.0
        #: accepting paused (EMFILE ...): the current pause, and how many in a row
        self._accept_backoff = 0.0
        self._accept_pauses = 0
        self._last_sweep = 0.0
        self._done: asyncio.Future[int] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self.telemetry: Any = None  # workers.telemetry.Telemetry once metrics are on
        self.audit: Any = None  # workers.audit.AuditTrail with --audit-syslog
        self._rotation = 0

    # --------------------------------------------------------------- start

    @property
    def metrics_on(self) -> bool:
        """Metrics were asked for and their port is bound."""
        return self.metrics_listener is not None

    @property
    def metrics_socket(self) -> str:
        return os.path.join(self.runtime_dir, "metrics.sock")

    def worker_json(self) -> str:
        cfg = self.cfg
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
                "ask_admission": bool(
                    cfg.tls_cert and (cfg.max_associations_per_ae or cfg.ae_sources)
                ),
                "graceful_timeout": cfg.graceful_timeout,
                "metrics_socket": self.metrics_socket if self.metrics_on else None,
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

    def _start_up(self) -> str:
        """Everything that can fail because of the machine rather than the peers:
        the store, the DICOM port, the metrics port, the runtime directory. Raises
        StartError (one line) having undone what it did; returns the store's path."""
        cfg = self.cfg
        made = Leftovers()
        try:
            storage = prepare_storage(cfg.local_storage(), made)
            self.listener = bind_tcp(cfg.host, cfg.port, cfg.backlog, "cannot listen on")
            made.sockets.append(self.listener)
            if cfg.metrics_port:
                try:
                    self.metrics_listener = bind_tcp(
                        cfg.metrics_host, cfg.metrics_port, 128, "cannot serve metrics on"
                    )
                    made.sockets.append(self.metrics_listener)
                except StartError as exc:
                    if not cfg.metrics_optional:
                        raise
                    log.warning("%s: running WITHOUT metrics (--metrics-optional)", exc)
            try:
                self.runtime_dir = tempfile.mkdtemp(prefix="pacsrx-")
            except OSError as exc:
                raise StartError(
                    f"cannot make a runtime directory in {tempfile.gettempdir()}: "
                    f"{exc.strerror or exc}"
                ) from None
        except StartError:
            made.undo()
            self.listener = self.metrics_listener = None
            raise
        try:
            removed = sweep_incoming(storage, 0)
        except OSError as exc:
            log.warning("could not sweep %s/.incoming: %s", storage, exc)
            removed = 0
        if removed:
            log.warning(
                "removed %d incomplete file(s) left in %s/.incoming by an earlier run",
                removed,
                storage,
            )
        return storage

    async def run(self) -> int:
        """Serve until stopped; returns the exit status (StartError if it cannot
        start: nothing is left behind then)."""
        self.loop = loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        storage = self._start_up()
        self._last_sweep = time.monotonic()
        assert self.listener is not None
        try:
            self._reconcile_index(storage)
        except IndexUnavailable:
            # The caller reports it in one line: leave nothing behind.
            self.listener.close()
            if self.metrics_listener is not None:
                self.metrics_listener.close()
            self.listener = self.metrics_listener = None
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            raise
        address = self.listener.getsockname()[:2]
        metrics_address = (
            self.metrics_listener.getsockname()[:2] if self.metrics_listener is not None else None
        )
        if self.metrics_on:
            self._start_metrics()
            await self._start_telemetry()
        self._start_audit()
        for index in range(self.cfg.workers):
            self.slots.append(self._spawn(WorkerSlot(index, self.generation)))
        loop.add_reader(self.listener.fileno(), self._on_accept)
        loop.add_signal_handler(signal.SIGTERM, self._request_stop, False)
        loop.add_signal_handler(signal.SIGINT, self._request_stop, True)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        if self.telemetry is not None:
            self.telemetry.readiness = 0  # accepting: GET /readyz answers 200
        log.info(
            "pacs-receiver listening on %s:%d as %s with %d worker(s), storing in %s (fsync %s)%s",
            address[0],
            address[1],
            self.cfg.ae_title,
            self.cfg.workers,
            storage,
            self.cfg.fsync,
            f", metrics on http://{metrics_address[0]}:{metrics_address[1]}/metrics"
            if metrics_address is not None
            else "",
        )
        if self.on_ready is not None:
            self.on_ready((str(address[0]), int(address[1])))
        ticker = loop.call_later(TICK, self._tick)
        try:
            return await self._done
        finally:
            ticker.cancel()
            if self.audit is not None:
                self.audit.application(started=False)
                # Up to 2 s for the queued messages, off the loop; then the telemetry
                # reports the last counts.
                await loop.run_in_executor(None, self.audit.close)
            if self.telemetry is not None:
                await self.telemetry.close()
            if self.metrics_listener is not None:
                self.metrics_listener.close()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _reconcile_index(self, storage: str) -> None:
        """Open the index (creating/migrating it) and repair it against the store,
        once, before any worker writes (workers/index/reconcile.py). Raises
        IndexUnavailable (one line on stderr, exit status 2)."""
        target = self.cfg.index_target()
        if target is None:
            return
        index = open_index(target, storage, node=self.cfg.index_node_name())
        try:
            if self.cfg.storage.startswith("s3://"):  # the bucket and the spool
                report = reconcile_object_store(index, self.cfg.s3_settings(), storage)
            else:
                report = reconcile(index, storage, replace=self.cfg.duplicates == "overwrite")
        finally:
            index.close()
        log.log(
            logging.WARNING if report.changed else logging.INFO,
            "index %s: %d file(s); indexed %d, re-indexed %d, marked missing %d, "
            "restored %d, unreadable %d (%.2f s)",
            index.backend,
            report.files,
            report.indexed,
            report.reindexed,
            report.missing,
            report.restored,
            report.unreadable,
            report.seconds,
        )

    # ------------------------------------------------------------ children

    def _spawn(self, slot: WorkerSlot) -> WorkerSlot:
        parent, child = control.socketpair()
        env = dict(os.environ)
        env[CONFIG_ENV] = self.worker_json()
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
            slot.restart_at = time.monotonic() + self._backoff(slot.failures)
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
        assert self.loop is not None
        self.loop.add_reader(parent.fileno(), self._on_worker_message, slot)
        log.info("worker %d started (pid %d)", slot.index, proc.pid)
        return slot

    @staticmethod
    def _backoff(failures: int) -> float:
        return min(MAX_BACKOFF, 0.1 * 2 ** max(0, failures - 1)) if failures else 0.0

    def _release_slot(self, slot: WorkerSlot) -> None:
        """Forget a dead worker's connections and channel."""
        for ae in slot.assigned.values():
            self._ae_closed(ae)
        slot.assigned.clear()
        slot.sent_seq.clear()
        if slot.ctrl is not None:
            assert self.loop is not None
            try:
                self.loop.remove_reader(slot.ctrl.fileno())
            except (ValueError, OSError):
                pass
            slot.ctrl.close()
            slot.ctrl = None

    def _reap(self, slot: WorkerSlot, now: float) -> bool:
        """True when the slot's process has exited (and was accounted for)."""
        if slot.proc is None:
            return True
        code = slot.proc.poll()
        if code is None:
            return False
        lost = len(slot.assigned)
        self._release_slot(slot)
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
        slot.restart_at = now + self._backoff(slot.failures)
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

    def _on_worker_message(self, slot: WorkerSlot) -> None:
        ctrl = slot.ctrl
        if ctrl is None:
            return
        for _ in range(64):
            try:
                kind, message, _fds, _ids = control.receive(ctrl)
            except BlockingIOError:
                return
            except OSError:
                kind, message = None, None
            if kind is None:
                # The worker is gone (or closed its channel); _tick reaps it.
                self._channel_lost(slot)
                return
            if message is None:
                continue
            op = message.get("op")
            if op == "hb":
                slot.last_heartbeat = time.monotonic()
                slot.buffered = int(message.get("buffered", 0))
                slot.stored = int(message.get("stored", 0))
                ids, received = message.get("ids"), message.get("received")
                if isinstance(ids, list) and isinstance(received, int):
                    self._reconcile(slot, ids, received)
            elif op == "admit":
                self._answer_admission(slot, message)
            elif op == "closed":
                for connection_id in message.get("ids", ()):
                    self._connection_closed(slot, connection_id)

    def _connection_closed(self, slot: WorkerSlot, connection_id: int) -> bool:
        slot.sent_seq.pop(connection_id, None)
        ae = slot.assigned.pop(connection_id, None)
        if ae is None:
            return False
        self._ae_closed(ae)
        return True

    def _reconcile(self, slot: WorkerSlot, open_ids: list[int], received: int) -> None:
        """A heartbeat lists the connections open in the worker when it had read
        ``received`` of those handed to it. The control channel keeps order both
        ways, so a connection among those ``received`` that is neither listed nor
        already reported closed (a report before the heartbeat arrives before it)
        was closed and its report lost (a full channel): free its slot now instead
        of never (--max-associations, --max-associations-per-ae)."""
        still_open = set(open_ids)
        lost = [
            connection_id
            for connection_id, seq in slot.sent_seq.items()
            if seq <= received and connection_id not in still_open
        ]
        freed = sum(self._connection_closed(slot, connection_id) for connection_id in lost)
        if freed:
            log.warning(
                "worker %d: %d closed connection(s) were never reported closed; "
                "their slots are free again (found by its heartbeat)",
                slot.index,
                freed,
            )

    def _channel_lost(self, slot: WorkerSlot) -> None:
        """The worker's end of its control channel closed: it died or is exiting.
        Stop handing it connections at once (in the up to TICK seconds before _tick
        reaps it, every connection would otherwise go to it and be refused); its
        assigned connections stay counted until it is reaped."""
        ctrl, slot.ctrl = slot.ctrl, None
        if ctrl is None:
            return
        assert self.loop is not None
        try:
            self.loop.remove_reader(ctrl.fileno())
        except (ValueError, OSError):
            pass
        ctrl.close()

    def _ae_closed(self, ae: str) -> None:
        if ae:
            self.per_ae[ae] -= 1
            if self.per_ae[ae] <= 0:
                del self.per_ae[ae]

    def _tick(self) -> None:
        assert self.loop is not None
        now = time.monotonic()
        try:
            for slot in self.slots:
                if self._reap(slot, now):
                    if not self.stopping and now >= slot.restart_at:
                        slot.restarts += 1
                        self._spawn(slot)
                elif not self.stopping and now - slot.last_heartbeat > HEARTBEAT_TIMEOUT:
                    log.error(
                        "worker %d (pid %d) sent no heartbeat for %.0f s: killing it",
                        slot.index,
                        slot.proc.pid if slot.proc else -1,
                        now - slot.last_heartbeat,
                    )
                    if slot.proc is not None:
                        slot.proc.kill()
            for slot in list(self.old):
                if self._reap(slot, now):
                    self.old.remove(slot)
            self._check_metrics(now)
            self._log_unanswered(now)
            if not self.stopping and now - self._last_sweep > SWEEP_INTERVAL:
                self._last_sweep = now
                sweep_incoming(self.cfg.local_storage(), 3600)
            if self.reload_requested and not self.stopping:
                self.reload_requested = False
                self._reload()
            if self.stopping and not any(s.proc for s in self.slots) and not self.old:
                self._finish()
                return
        except Exception:
            log.exception("supervisor tick failed")
        self.loop.call_later(TICK, self._tick)

    # ------------------------------------------------------------- metrics

    def _start_metrics(self) -> None:
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

    async def _start_telemetry(self) -> None:
        """Report restarts (and our own CPU and memory) to the aggregator."""
        from workers.telemetry import Telemetry

        self.telemetry = Telemetry(self.metrics_socket, "supervisor", role="supervisor")
        await self.telemetry.start()

    def _start_audit(self) -> None:
        """Application Activity (start) and, from now on, Security Alerts for the
        connections refused here (see workers/audit)."""
        settings = self.cfg.audit_settings()
        if settings is None:
            return
        from workers.audit import AuditTrail

        self.audit = AuditTrail(settings, self.cfg.ae_title)
        if self.telemetry is not None:
            self.telemetry.watch_audit(self.audit.sender)
        self.audit.application(started=True)

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
            self.metrics_restart_at = now + self._backoff(self.metrics_failures)
            self.metrics_proc = None
        if not self.stopping and now >= self.metrics_restart_at:
            self._start_metrics()

    # -------------------------------------------------------------- accept

    def _pick(self, pending: dict[int, int] | None = None) -> WorkerSlot | None:
        """The least-loaded live worker; ``pending``: slot index -> connections picked
        for it in this accept batch and not handed over (not in ``assigned``) yet."""
        best: WorkerSlot | None = None
        best_load = (0, 0)
        # Start after the last pick so that equally loaded workers take turns.
        count = len(self.slots)
        self._rotation = (self._rotation + 1) % max(count, 1)
        for i in range(count):
            slot = self.slots[(self._rotation + i) % count]
            if slot.ctrl is None or slot.draining:
                continue
            load = (len(slot.assigned) + (pending or {}).get(slot.index, 0), slot.buffered)
            if best is None or load < best_load:
                best, best_load = slot, load
        return best

    def _open_total(self) -> int:
        return sum(len(s.assigned) for s in self.slots) + sum(len(s.assigned) for s in self.old)

    def _on_accept(self) -> None:
        listener = self.listener
        if listener is None:
            return
        # socket._accept() is accept4(2) without the socket object socket.accept()
        # builds (its family and type looked up as enums, every time): a connection
        # handed to a worker is only an fd to send here. TCP_NODELAY is not set here
        # either: the transport that serves the connection sets it (uvloop's TCP
        # transports do on every socket: the workers' and our Rejector's).
        accept = listener._accept  # type: ignore[attr-defined]
        access = self.access
        screen = access.filters_addresses
        limit = self.cfg.max_associations
        # With TLS the workers ask the supervisor instead (_answer_admission).
        by_ae = not self.cfg.tls_cert and bool(
            self.cfg.max_associations_per_ae or access.ae_sources
        )
        batches: dict[int, tuple[WorkerSlot, list[int], list[int]]] = {}
        #: slot index -> connections picked for it in this batch, not handed over yet
        pending: dict[int, int] = {}
        picked = 0
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in ACCEPT_RESOURCE_ERRORS:
                    self._pause_accepting(exc)
                    break
                # ECONNABORTED, EPROTO ...: that one connection is gone; go on.
                log.warning("accept failed: %s", exc)
                continue
            if self._accept_pauses:
                self._accepting_again()
            if self.proxy_gate is not None:
                # Behind a balancer: the header's address is the peer's (proxy_gate.py).
                admit = self._admit_proxied(self._socket(fd), addr, self.proxy_gate)
                self._track(asyncio.ensure_future(admit))
                continue
            if screen and not access.address_allowed(addr[0]):
                # Before any limit: a refused peer takes no one's place.
                self._refuse(
                    self._socket(fd),
                    p.RejectReason.NO_REASON,
                    "address refused by --deny-ip/--allow-ip",
                )
                continue
            if limit and self._open_total() + picked >= limit:
                self._reject(self._socket(fd))
                continue
            if by_ae:
                self._track(asyncio.ensure_future(self._admit_by_ae(self._socket(fd), addr[0])))
                continue
            # Count this batch's picks too: a burst accepted in one go is spread.
            slot = self._pick(pending)
            if slot is None:
                self._reject(self._socket(fd))
                continue
            batch = batches.get(slot.index)
            if batch is None:
                batch = batches[slot.index] = (slot, [], [])
            batch[1].append(fd)
            batch[2].append(next(self.ids))
            pending[slot.index] = pending.get(slot.index, 0) + 1
            picked += 1
        for slot, fds, ids in batches.values():
            self._hand_off(slot, fds, ids, [""] * len(ids))

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors or memory: the connection that could not be accepted
        stays queued and the level-triggered listener would fire again at once, for
        ever. Stop watching the listener for a while (doubling up to
        ACCEPT_BACKOFF_MAX while it lasts); the queued peers wait in the backlog."""
        assert self.loop is not None
        listener = self.listener
        if listener is None:
            return
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._accept_backoff = min(
            ACCEPT_BACKOFF_MAX, max(ACCEPT_BACKOFF_MIN, self._accept_backoff * 2)
        )
        if not self._accept_pauses:
            log.error(
                "cannot accept connections: %s (%s); pausing accepting, retrying "
                "every %g s at most",
                exc.strerror,
                name,
                ACCEPT_BACKOFF_MAX,
            )
        self._accept_pauses += 1
        if self.telemetry is not None:
            self.telemetry.acceptor_event(f"backoff_{name}")
        self.loop.remove_reader(listener.fileno())
        self.loop.call_later(self._accept_backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.stopping or self.listener is None or self.loop is None:
            return
        self.loop.add_reader(self.listener.fileno(), self._on_accept)

    def _accepting_again(self) -> None:
        log.warning("accepting connections again after %d pause(s)", self._accept_pauses)
        self._accept_pauses = 0
        self._accept_backoff = 0.0

    @staticmethod
    def _socket(fd: int) -> socket.socket:
        """A socket object for an accepted fd, for the connections answered here (the
        listener may be closed by now: the family is the fd's own)."""
        return socket.socket(fileno=fd)

    def _hand_off(
        self,
        slot: WorkerSlot,
        fds: list[int],
        ids: list[int],
        aes: list[str],
        peers: list[Peer] | None = None,
    ) -> None:
        """Send the accepted ``fds`` to ``slot``'s worker; ours are closed once sent.
        ``peers``: the clients' addresses from PROXY headers (the workers' peers)."""
        for start in range(0, len(fds), control.MAX_FDS_PER_MESSAGE):
            part = fds[start : start + control.MAX_FDS_PER_MESSAGE]
            part_ids = ids[start : start + control.MAX_FDS_PER_MESSAGE]
            part_aes = aes[start : start + control.MAX_FDS_PER_MESSAGE]
            part_peers = peers[start : start + control.MAX_FDS_PER_MESSAGE] if peers else None
            try:
                ctrl = slot.ctrl
                if ctrl is None:
                    raise ConnectionResetError("worker channel closed")
                control.send_connections(ctrl, part, part_ids, part_peers)
            except OSError as exc:
                if not isinstance(exc, BlockingIOError):
                    # EPIPE ...: the worker died and is not reaped yet. Another one
                    # serves these (each failure closes a channel: this ends).
                    self._channel_lost(slot)
                    other = self._pick()
                    if other is not None:
                        self._hand_off(other, part, part_ids, part_aes, part_peers)
                        continue
                # The channel is full, or no worker is left: answer these ourselves.
                log.warning(
                    "cannot hand %d connection(s) to worker %d: %s", len(part), slot.index, exc
                )
                for i, (fd, ae) in enumerate(zip(part, part_aes, strict=False)):
                    self._ae_closed(ae)  # counted by _admit_by_ae, never assigned
                    self._reject(
                        self._socket(fd),
                        transient_reason=p.RejectReason.TEMPORARY_CONGESTION,
                        peer=part_peers[i] if part_peers else None,
                    )
                continue
            assigned, sent_seq = slot.assigned, slot.sent_seq
            for fd, connection_id, ae in zip(part, part_ids, part_aes, strict=False):
                assigned[connection_id] = ae
                slot.sent += 1
                sent_seq[connection_id] = slot.sent
                os.close(fd)

    def _ae_refusal(self, ae: str | None, host: str) -> tuple[str, str] | None:
        """[ae-sources] and the per-AE limit for ``ae`` connecting from ``host``:
        None, or (answer, why) with answer "ae" (not from there) or "limit"."""
        # Fail closed: an AE title that could not be read might be a restricted one.
        if self.access.ae_sources and (ae is None or not self.access.ae_source_allowed(ae, host)):
            why = (
                "calling AE title could not be read"
                if ae is None
                else f"calling AE {ae!r} not allowed from {host} by [ae-sources]"
            )
            return "ae", why
        limit_per_ae = self.cfg.max_associations_per_ae
        if limit_per_ae and ae is not None and self.per_ae[ae] >= limit_per_ae:
            return "limit", f"{limit_per_ae} association(s) of {ae!r} already open"
        return None

    def _answer_admission(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        """With TLS the acceptor cannot peek the calling AE title: the worker that
        read the A-ASSOCIATE-RQ asks here, where the associations of every worker are
        counted. The answer is "ok" (counted from now until the connection closes),
        "ae" or "limit"; the worker rejects accordingly."""
        connection_id = message.get("id")
        ae = str(message.get("ae", "")).strip()
        host = str(message.get("host", ""))
        refusal = self._ae_refusal(ae, host)
        if refusal is None:
            answer = "ok"
            if connection_id in slot.assigned and not slot.assigned[connection_id]:
                slot.assigned[connection_id] = ae
                if ae:
                    self.per_ae[ae] += 1
        else:
            answer, why = refusal
            self.rejected += 1
            log.info("refusing %r from %s (over TLS, in worker %d): %s", ae, host, slot.index, why)
            if answer == "ae" and self.audit is not None:
                self.audit.refused(host, why, ae)
        ctrl = slot.ctrl
        if ctrl is None:
            return
        try:
            control.send(ctrl, {"op": "admit", "id": connection_id, "answer": answer})
        except OSError as exc:  # its ACSE timeout answers the peer
            log.warning("could not answer worker %d's admission question: %s", slot.index, exc)

    async def _admit_by_ae(self, sock: socket.socket, host: str, peer: Peer | None = None) -> None:
        """Peek the calling AE title of the A-ASSOCIATE-RQ; apply [ae-sources] and the
        per-AE limit, then (again: others were admitted during the peek) the total."""
        assert self.loop is not None
        try:
            ae = await self._peek_calling_ae(sock)
        except EOFError:
            sock.close()  # gone in the middle of its request: nobody to answer
            return
        except TimeoutError:
            # PS3.8 ARTIM in Sta2: no A-ASSOCIATE-RQ in time, close the connection.
            log.warning(
                "closing connection from %s: no A-ASSOCIATE-RQ within --acse-timeout (%g s)",
                host,
                self.cfg.acse_timeout,
            )
            sock.close()
            return
        refusal = self._ae_refusal(ae, host)
        if refusal is not None:
            if refusal[0] == "ae":
                self._refuse(sock, p.RejectReason.CALLING_AE_NOT_RECOGNIZED, refusal[1], peer)
            else:
                self._reject(sock, peer=peer)
            return
        limit = self.cfg.max_associations
        if limit and self._open_total() >= limit:
            self._reject(sock, peer=peer)
            return
        slot = self._pick()
        if slot is None:
            self._reject(sock, peer=peer)
            return
        if ae:
            self.per_ae[ae] += 1
        peers = [peer] if peer is not None else None
        self._hand_off(slot, [sock.detach()], [next(self.ids)], [ae or ""], peers)

    def _proxy_gate(self, cfg: ReceiverConfig) -> ProxyGate | None:
        """--proxy-protocol-from: the gate every connection passes first, or None."""
        if not cfg.proxy_protocol_from:
            return None

        def count(reason: str) -> None:
            if self.telemetry is not None:
                self.telemetry.acceptor_event(f"proxy_{reason}")

        return ProxyGate(cfg.proxy_protocol_from, cfg.network_timeout, cfg.acse_timeout, count)

    async def _admit_proxied(
        self, sock: socket.socket, addr: tuple[Any, ...], gate: ProxyGate
    ) -> None:
        """Behind a balancer: the PROXY header first (its client address is the
        peer's from here on: --allow-ip, the limits, [ae-sources], the worker),
        then what _on_accept does for one connection."""
        try:
            peer = await gate.admit(sock, (str(addr[0]), int(addr[1])))
        except OSError as exc:  # the connection failed under the gate
            log.info("connection from %s:%s lost before its header was read: %s", *addr[:2], exc)
            sock.close()
            return
        if peer is None:
            return  # closed, logged, counted
        host = peer[0]
        if self.access.filters_addresses and not self.access.address_allowed(host):
            self._refuse(
                sock, p.RejectReason.NO_REASON, "address refused by --deny-ip/--allow-ip", peer
            )
            return
        limit = self.cfg.max_associations
        if limit and self._open_total() >= limit:
            self._reject(sock, peer=peer)
            return
        if not self.cfg.tls_cert and (self.cfg.max_associations_per_ae or self.access.ae_sources):
            await self._admit_by_ae(sock, host, peer)
            return
        slot = self._pick()
        if slot is None:
            self._reject(sock, peer=peer)
            return
        self._hand_off(slot, [sock.detach()], [next(self.ids)], [""], [peer])

    async def _peek_calling_ae(self, sock: socket.socket) -> str | None:
        """The Calling AE Title (bytes 26..42 of an A-ASSOCIATE-RQ), read with MSG_PEEK
        so the worker still receives the whole PDU. None when what came is no
        A-ASSOCIATE-RQ (the worker answers it) or the peer is gone; TimeoutError when
        the 42 bytes do not come within --acse-timeout; EOFError when the peer closes
        before they came.

        Peeked bytes stay in the receive queue, so once some have come the socket
        stays readable: waiting for readability would wake at once, again and again,
        until the rest came. SO_RCVLOWAT makes the socket readable only once
        PEEK_BYTES are queued (or the peer closes); it is put back to 1 before the
        socket goes to a worker, whose event loop must see every byte."""
        assert self.loop is not None
        if self.cfg.tls_cert:
            return None  # a TLS ClientHello: the AE title is the workers' to see
        loop = self.loop
        deadline = loop.time() + self.cfg.acse_timeout
        sock.setblocking(False)
        fd = sock.fileno()
        low_water = False
        try:
            while True:
                try:
                    head: bytes | None = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
                except BlockingIOError:
                    head = None
                except OSError:
                    return None
                if head is not None:
                    if not head or head[0] != p.PDUType.ASSOCIATE_RQ:
                        return None
                    if len(head) >= PEEK_BYTES:
                        return head[26:42].decode("latin-1").strip(" \0")
                    if not low_water:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, PEEK_BYTES)
                        low_water = True
                    elif _peer_closed(fd):
                        # Readable with fewer bytes than the low-water mark: the peer
                        # closed (peeked bytes are still queued, so recv never says so).
                        raise EOFError
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                waiter: asyncio.Future[None] = loop.create_future()

                def wake(w: asyncio.Future[None] = waiter) -> None:
                    if not w.done():
                        w.set_result(None)

                loop.add_reader(fd, wake)
                try:
                    await asyncio.wait_for(waiter, remaining)
                finally:
                    loop.remove_reader(fd)
        finally:
            if low_water:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                except OSError:
                    pass  # closed meanwhile: nobody reads it any more

    def _reject(
        self,
        sock: socket.socket,
        transient_reason: int = p.RejectReason.LOCAL_LIMIT_EXCEEDED,
        *,
        rj: p.AssociateRJ | None = None,
        why: str | None = None,
        peer: Peer | None = None,
    ) -> None:
        """Answer ``sock``'s A-ASSOCIATE-RQ with ``rj`` (default: rejected-transient,
        service-provider presentation, ``transient_reason``) instead of a worker.
        ``peer``: the client's address from a PROXY header, for the log line."""
        self.rejected += 1
        if self.cfg.tls_cert:
            # The acceptor does not speak TLS (the handshake is the workers'): an
            # A-ASSOCIATE-RJ in clear text would be garbage to the client. Close.
            try:
                host, port = peer or sock.getpeername()[:2]
                shown = f"{host}:{port}"
            except OSError:
                shown = "?"
            log.info("refusing a TLS connection from %s by closing it (%s)", shown, why or "limit")
            sock.close()
            return
        if rj is None:
            rj = p.AssociateRJ(
                p.RejectResult.TRANSIENT,
                p.RejectSource.SERVICE_PROVIDER_PRESENTATION,
                transient_reason,
            )
        if self.refusing >= MAX_REFUSING:
            self._close_unanswered(sock)
            return
        answer = rj
        assert self.loop is not None
        sock.setblocking(False)
        timeout = self.cfg.artim_timeout
        telemetry = self.telemetry
        self.refusing += 1
        settled = False

        def done() -> None:  # once per Rejector: when it closes, or cannot start
            nonlocal settled
            if not settled:
                settled = True
                self.refusing -= 1

        def started(task: asyncio.Future[Any]) -> None:
            if task.cancelled() or task.exception() is not None:
                done()
                sock.close()

        task = asyncio.ensure_future(
            self.loop.connect_accepted_socket(
                lambda: Rejector(answer, timeout, why, telemetry, on_close=done, peer=peer), sock
            )
        )
        task.add_done_callback(started)
        self._track(task)

    def _close_unanswered(self, sock: socket.socket) -> None:
        """MAX_REFUSING refusals are in flight already: close this one without its
        A-ASSOCIATE-RJ (the peer sees the connection closed), count it, and say so at
        most once a second."""
        sock.close()
        self.unanswered += 1
        self._unanswered_unlogged += 1
        if self.telemetry is not None:
            self.telemetry.acceptor_event("unanswered")
        self._log_unanswered(time.monotonic())

    def _log_unanswered(self, now: float) -> None:
        if self._unanswered_unlogged and now - self._unanswered_logged_at >= 1.0:
            log.warning(
                "closed %d refused connection(s) without A-ASSOCIATE-RJ: %d refusals "
                "already in flight",
                self._unanswered_unlogged,
                MAX_REFUSING,
            )
            self._unanswered_unlogged = 0
            self._unanswered_logged_at = now

    def _refuse(self, sock: socket.socket, reason: int, why: str, peer: Peer | None = None) -> None:
        """Who may connect: PS3.8 Table 9-21 rejected-permanent (1), source
        service-user (1), ``reason`` 1 no-reason-given or 3 calling-AE-not-recognized."""
        rj = p.AssociateRJ(p.RejectResult.PERMANENT, p.RejectSource.SERVICE_USER, reason)
        if self.audit is not None:
            try:
                host = str(peer[0] if peer else sock.getpeername()[0])
            except OSError:
                host = "unknown"
            self.audit.refused(host, why)
        self._reject(sock, rj=rj, why=why, peer=peer)

    def _track(self, task: asyncio.Future[Any]) -> None:
        # Keep a reference until done: the loop only holds weak references to tasks.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------- stop and reload

    def _request_stop(self, interactive: bool = False) -> None:
        if not self.draining:
            # Readiness goes 503 at once; during --drain-delay the listener still
            # accepts while a balancer's health check takes this node out.
            self.draining = True
            if self.telemetry is not None:
                self.telemetry.readiness = 1
                self.telemetry.flush()
            delay = self.cfg.drain_delay
            if delay > 0 and not interactive:
                log.info("draining: not ready; accepting for %g s more, then stopping", delay)
                assert self.loop is not None
                self._drain_timer = self.loop.call_later(delay, self._drained)
                return
        elif self._drain_timer is not None:
            if not interactive:
                return  # SIGTERM again while draining: the delay runs its course
            self._drain_timer.cancel()  # an interrupt: stop now
            self._drain_timer = None
        self._stop(interactive)

    def _drained(self) -> None:
        self._drain_timer = None
        self._stop(False)

    def _stop(self, interactive: bool) -> None:
        if self.stopping:
            if not interactive:
                return  # SIGTERM again: still graceful
            log.warning("second interrupt: aborting open associations now")
            for slot in [*self.slots, *self.old]:
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.kill()
            return
        self.stopping = True
        log.info(
            "stopping: no new connections; open associations get %.0f s", self.cfg.graceful_timeout
        )
        assert self.loop is not None
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        for slot in [*self.slots, *self.old]:
            self._stop_worker(slot)
        self.loop.call_later(self.cfg.graceful_timeout + 5.0, self._kill_stragglers)

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
        for slot in [*self.slots, *self.old]:
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
        if self._done is not None and not self._done.done():
            self._done.set_result(0)

    def _request_reload(self) -> None:
        self.reload_requested = True

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
        self.access = new.access_policy()
        self.proxy_gate = self._proxy_gate(new)
        self.generation += 1
        log.info("SIGHUP: configuration reloaded; replacing %d worker(s)", len(self.slots))
        old, self.slots = self.slots, []
        for slot in old:
            self._stop_worker(slot)
            self.old.append(slot)
        for index in range(new.workers):
            self.slots.append(self._spawn(WorkerSlot(index, self.generation)))
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

    # ------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """What the supervisor knows, for tests and logs."""
        return {
            "workers": [
                {
                    "index": s.index,
                    "pid": s.proc.pid if s.proc else None,
                    "open": len(s.assigned),
                    "stored": s.stored,
                    "restarts": s.restarts,
                }
                for s in self.slots
            ],
            "rejected": self.rejected,
            "unanswered": self.unanswered,
        }


def run(cfg: ReceiverConfig, reload_config: Callable[[], ReceiverConfig] | None = None) -> int:
    import uvloop

    return uvloop.run(Supervisor(cfg, reload_config).run())


__all__ = ["Supervisor", "WorkerSlot", "describe_exit", "run"]
