"""The worker process: ``python -m workers.main`` as started by the supervisor.

It serves the connections the acceptor hands it over the control channel
(:mod:`workers.control`), sends heartbeats from its own event loop, reports closed
connections, and stops gracefully on the supervisor's "stop", on SIGTERM/SIGINT, or
when the control channel closes (the supervisor is gone: nobody would hand it work).

The worker's configuration arrives as JSON in the ``PACSRX_WORKER_CONFIG``
environment variable (see :func:`worker_config_from_json`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from . import control
from .association import AssociationProtocol
from .config import WorkerConfig
from .engine import acse
from .engine import pdu as p
from .handlers import parse_bindings
from .server import AssociationServer
from .storage.config import StorageConfig

log = logging.getLogger("workers.main")

HEARTBEAT_INTERVAL = 0.5
CONFIG_ENV = "PACSRX_WORKER_CONFIG"


def worker_config_from_json(text: str) -> tuple[WorkerConfig, list[str], dict[str, Any]]:
    """(WorkerConfig, handler bindings, extra settings) from the supervisor's JSON."""
    data = json.loads(text)
    storage = StorageConfig(**data.pop("storage"))
    handlers = data.pop("handlers", [])
    extra = data.pop("extra", {})
    syntaxes = {k: tuple(v) for k, v in data.pop("syntaxes").items()}
    allowed = data.pop("allowed_calling_aes", None)
    identity = data.pop("identity", None)
    tls = data.pop("tls", None)
    audit = data.pop("audit", None)
    cfg = WorkerConfig(storage=storage, syntaxes=syntaxes, **data)
    if identity is not None:
        from .identity import IdentitySettings

        cfg.identity = IdentitySettings.from_mapping(identity)
    if tls is not None:
        from .tls import TlsSettings

        cfg.tls = TlsSettings.from_mapping(tls)
    if allowed is not None:
        cfg.allowed_calling_aes = frozenset(allowed)
    if audit is not None:
        from .audit import AuditSettings

        cfg.audit = AuditSettings.from_mapping(audit)
    return cfg, handlers, extra


#: open connection ids a heartbeat lists at most (msgpack: < 5 bytes each, well
#: inside one control message)
HEARTBEAT_MAX_IDS = 8000


class WorkerServer(AssociationServer):
    """An association server that reports each closed connection to the supervisor."""

    def __init__(self, *args: Any, graceful_timeout: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graceful_timeout = graceful_timeout
        self.closed_ids: list[int] = []
        self.report_closed: Any = None

    def connection_closed(self, proto: AssociationProtocol) -> None:
        super().connection_closed(proto)
        connection_id = proto.connection_id
        if connection_id is not None:
            self.closed_ids.append(connection_id)
            if self.report_closed is not None and len(self.closed_ids) == 1:
                # One message per loop iteration, however many closed in it.
                self.loop.call_soon(self.report_closed)


class Worker:
    def __init__(
        self, worker_id: int, ctrl: socket.socket, server: WorkerServer, telemetry: Any = None
    ) -> None:
        self.id = worker_id
        self.ctrl = ctrl
        self.server = server
        self.telemetry = telemetry
        self.stopping: asyncio.Future[float] | None = None
        self._heartbeat_handle: asyncio.Handle | None = None
        self._admissions: dict[int, asyncio.Future[str]] = {}
        #: connections read from the control channel, and the ids of those not yet
        #: reported closed: every heartbeat carries both, so that the supervisor can
        #: free the slots of connections whose "closed" report was lost (_send)
        self.received = 0
        self.live: set[int] = set()
        server.report_closed = self._report_closed

    def ask_supervisor(self) -> None:
        """Let the supervisor admit each association by its calling AE title (with
        TLS, where the acceptor cannot read it: the per-AE limit, [ae-sources])."""
        self.server.ask_admission = self._ask_admission

    def _ask_admission(
        self, proto: AssociationProtocol, rq: p.AssociateRQ
    ) -> asyncio.Future[p.AssociateRJ | None] | None:
        connection_id = proto.connection_id
        if connection_id is None:
            return None  # not handed over by the supervisor: nothing to ask
        loop = asyncio.get_running_loop()
        answer = self._admissions.get(connection_id)
        if answer is None:
            answer = self._admissions[connection_id] = loop.create_future()
            # The requestor's address: the socket's peer, or the client's address
            # from a PROXY header (set before connection_made).
            host = proto.assoc.requestor.address
            self._send({"op": "admit", "id": connection_id, "ae": rq.calling_ae, "host": host})
        result: asyncio.Future[p.AssociateRJ | None] = loop.create_future()

        def done(f: asyncio.Future[str]) -> None:
            if result.done():
                return
            word = f.result()
            if word == "ok":
                result.set_result(None)
            elif word == "ae":
                result.set_result(
                    p.AssociateRJ(
                        p.RejectResult.PERMANENT,
                        p.RejectSource.SERVICE_USER,
                        p.RejectReason.CALLING_AE_NOT_RECOGNIZED,
                    )
                )
            else:
                result.set_result(acse.reject_local_limit())

        answer.add_done_callback(done)
        return result

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopping = loop.create_future()
        self.ctrl.setblocking(False)
        loop.add_reader(self.ctrl.fileno(), self._on_control)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop, None)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor reloads
        self._heartbeat_handle = loop.call_soon(self._heartbeat)
        graceful = await self.stopping
        if self._heartbeat_handle is not None:
            self._heartbeat_handle.cancel()
        log.info("worker %d stopping (graceful %.0f s)", self.id, graceful)
        try:
            loop.remove_reader(self.ctrl.fileno())
        except (ValueError, OSError):
            pass
        await self.server.close(graceful)
        await close_index(self.server)
        self._report_closed()
        if self.telemetry is not None:
            await self.telemetry.close()
        return 0

    def _stop(self, graceful: float | None) -> None:
        if self.stopping is not None and not self.stopping.done():
            self.stopping.set_result(
                graceful if graceful is not None else self.server.graceful_timeout
            )

    def _on_control(self) -> None:
        while True:
            try:
                kind, message, fds, ids = control.receive(self.ctrl)
            except BlockingIOError:
                return
            except OSError:
                kind, message, fds, ids = None, None, [], []
            if kind is None:
                log.warning("worker %d: control channel closed; stopping", self.id)
                try:
                    asyncio.get_running_loop().remove_reader(self.ctrl.fileno())
                except (ValueError, OSError):
                    pass
                self._stop(None)
                return
            if kind == control.CONNECTIONS:
                # Counted by ids, as the supervisor counts them: a descriptor lost
                # on the way (MSG_CTRUNC at our fd limit) is then freed by the
                # heartbeat (received, never open) instead of skewing the count.
                self.received += max(len(fds), len(ids))
                peers = list(message.get("peers", ())) if message else []
                peers += [None] * (len(fds) - len(peers))
                for fd, connection_id, peer in zip(
                    fds, ids + [None] * (len(fds) - len(ids)), peers, strict=False
                ):
                    self._adopt(fd, connection_id, peer)
            elif message is not None and message.get("op") == "admit":
                answer = self._admissions.pop(message.get("id"), None)  # type: ignore[arg-type]
                if answer is not None and not answer.done():
                    answer.set_result(str(message.get("answer", "limit")))
            elif message is not None and message.get("op") == "stop":
                self._stop(float(message.get("graceful", 30.0)))

    def _adopt(
        self, fd: int, connection_id: int | None, peer: tuple[str, int] | None = None
    ) -> None:
        """Serve ``fd``; ``peer``: the client's address from a PROXY header, which is
        then the requestor's address (logs, audit, index, [ae-sources] with TLS)."""
        sock = socket.socket(fileno=fd)
        if self.stopping is not None and self.stopping.done():
            sock.close()
            return
        if connection_id is not None:
            self.live.add(connection_id)
        server = self.server
        if server.ssl_context is None:
            # No handshake to wait for: the protocol is labelled as it is made (so its
            # close is reported like any other), and the task only matters when the
            # transport cannot be set up. Saves AssociationServer.adopt's coroutine,
            # closure and result handling on every connection.
            def labelled() -> AssociationProtocol:
                proto = server._factory()
                proto.connection_id = connection_id
                proto.peer_address = peer
                return proto

            sock.setblocking(False)
            # The loop's own create_task: ensure_future would look the loop up again
            # (get_event_loop, a getpid() system call each time on 3.11).
            plain = server.loop.create_task(server.loop.connect_accepted_socket(labelled, sock))
            plain.add_done_callback(functools.partial(self._plain_adopted, sock, connection_id))
            return
        # Only a failed TLS handshake names the peer, and by then the socket is closed.
        shown = f"{peer[0]}:{peer[1]}" if peer else _peername(sock)
        task = asyncio.ensure_future(server.adopt(sock, connection_id, peer))

        def adopted(t: asyncio.Future[AssociationProtocol]) -> None:
            exc = None if t.cancelled() else t.exception()
            if t.cancelled() or exc is not None:
                # A peer fault (wrong certificate, no TLS, too slow): one line.
                log.warning("worker %d: TLS handshake with %s failed: %s", self.id, shown, exc)
                sock.close()
                if connection_id is not None:
                    self.server.closed_ids.append(connection_id)
                    self._report_closed()
                return

        task.add_done_callback(adopted)

    def _plain_adopted(
        self, sock: socket.socket, connection_id: int | None, task: asyncio.Future[Any]
    ) -> None:
        if not task.cancelled() and task.exception() is None:
            return
        exc = None if task.cancelled() else task.exception()
        log.warning("worker %d: could not adopt a connection: %r", self.id, exc)
        sock.close()
        if connection_id is not None:
            self.server.closed_ids.append(connection_id)
            self._report_closed()

    def _send(self, message: dict[str, Any]) -> None:
        try:
            control.send(self.ctrl, message)
        except (BlockingIOError, OSError):
            pass  # the supervisor is busy or gone: the next heartbeat says it again

    def _report_closed(self) -> None:
        if self.server.closed_ids:
            ids, self.server.closed_ids = self.server.closed_ids, []
            for connection_id in ids:  # a question the supervisor never answered
                self._admissions.pop(connection_id, None)
            self.live.difference_update(ids)
            self._send({"op": "closed", "ids": ids})

    def _heartbeat(self) -> None:
        open_connections, buffered = self.server.load
        self._send(
            {
                "op": "hb",
                "open": open_connections,
                "buffered": buffered,
                "stored": self.server.instances_stored,
                # Too many to list in one control message: the supervisor then keeps
                # its own count (it only frees the slots of connections not listed).
                "ids": list(self.live) if len(self.live) <= HEARTBEAT_MAX_IDS else None,
                "received": self.received,
            }
        )
        # Directory fds kept open for fsyncs (Store._fsync_dir): none held by an
        # idle worker (an object store has none).
        close_idle = getattr(self.server.store, "close_idle_dirs", None)
        if close_idle is not None:
            close_idle()
        loop = asyncio.get_running_loop()
        self._heartbeat_handle = loop.call_later(HEARTBEAT_INTERVAL, self._heartbeat)


def _peername(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"


def setup_logging(level: str, fmt: str, worker_id: int | None = None) -> None:
    """Log lines on stderr: text (default) or one JSON object per line."""
    from .logs import setup_logging as setup

    setup(level, fmt, f"worker-{worker_id}" if worker_id is not None else "supervisor")


def open_index_writer(server: AssociationServer, target: str, node: str) -> None:
    """Give ``server`` an index writer on ``target`` (``open_index``'s argument).

    The supervisor opened (and reconciled) the index before starting workers, so a
    failure here is transient (a database restarting): the worker stores without
    indexing rather than exit (a restart loop), and says so; the next start's
    reconcile indexes what was stored meanwhile."""
    from .index import IndexUnavailable, open_index
    from .index.writer import IndexWriter

    try:
        index = open_index(target, str(server.store.root), node=node)
    except IndexUnavailable as exc:
        log.error("instance index unavailable, not indexing in this worker: %s", exc)
        return
    server.index_node = node
    server.index_writer = IndexWriter(index, replace=server.store.config.duplicates == "overwrite")


async def close_index(server: AssociationServer) -> None:
    """Write what the index writer holds (a few seconds at most), then close it."""
    writer, server.index_writer = server.index_writer, None
    if writer is not None:
        await asyncio.get_running_loop().run_in_executor(None, writer.close, 5.0)
        writer.index.close()


async def _amain(worker_id: int, ctrl_fd: int) -> int:
    cfg, handlers, extra = worker_config_from_json(os.environ[CONFIG_ENV])
    telemetry = None
    metrics_socket = extra.get("metrics_socket")
    if metrics_socket:
        try:
            from .telemetry import Telemetry

            telemetry = Telemetry(metrics_socket, worker_id=worker_id)
            await telemetry.start()
        except ImportError:
            telemetry = None
    server = WorkerServer(
        cfg,
        evt_handlers=parse_bindings(handlers),
        telemetry=telemetry,
        store_ops=telemetry.file_ops() if telemetry is not None else None,
        graceful_timeout=float(extra.get("graceful_timeout", 30.0)),
    )
    if telemetry is not None and server.audit is not None:
        telemetry.watch_audit(server.audit.sender)
    if extra.get("s3"):
        # --storage s3://...: the object store replaces the local store (whose root
        # stays the local directory: spool, index, handler temp files).
        from .storage.objectstore import S3Settings, open_object_store

        server.store = open_object_store(  # type: ignore[assignment]
            cfg.storage,
            S3Settings(**extra["s3"]),
            drain=worker_id == 0,
            workers=int(extra.get("workers") or 1),
        )
        if telemetry is not None:
            telemetry.object_store = server.store
        # The group committer flushes files of the local store; the object store's
        # writers commit themselves (upload, or the spool's own fsync) in the I/O pool.
        if server.committer is not None:
            server.committer.close()
            server.committer = None
    if extra.get("index") is not None:
        open_index_writer(server, extra["index"], str(extra.get("index_node") or ""))
        if telemetry is not None:
            telemetry.index_writer = server.index_writer
    indexed = extra.get("indexed")
    if indexed is not None and server.index_writer is not None:
        from .indexed import IndexedServices, IndexedSettings

        settings = IndexedSettings.from_mapping(indexed)
        # One worker takes over the pending reports of workers that died.
        settings.sweeper = worker_id == 0
        # The writer's Index is thread-safe: the services read through it too.
        server.indexed = IndexedServices(server, settings, index=server.index_writer.index)
        try:
            await server.indexed.start()
        except Exception as exc:
            log.error("worker %d: index unavailable, no storage commitment: %s", worker_id, exc)
            server.indexed = None
    ctrl = socket.socket(fileno=ctrl_fd)
    worker = Worker(worker_id, ctrl, server, telemetry)
    if extra.get("ask_admission"):
        worker.ask_supervisor()
    log.info("worker %d ready (pid %d)", worker_id, os.getpid())
    # What start-up made (modules, configuration, handlers) lives as long as the
    # worker: out of the collector's sight, the collections that the per-association
    # objects set off do not traverse it again and again.
    gc.freeze()
    return await worker.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="pacs-receiver worker process (started by the supervisor)"
    )
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format, args.id)
    import uvloop

    return uvloop.run(_amain(args.id, args.control_fd))


if __name__ == "__main__":
    sys.exit(main())
