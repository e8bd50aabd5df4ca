"""The association server of one worker process: it listens (or adopts sockets
accepted elsewhere) and runs one :class:`~workers.association.AssociationProtocol`
per connection.

It owns what the associations of a worker share: the configuration, the handlers
bound at server level, the store, the thread pools (user handlers; fsync commits),
the association limits and the counts the supervisor asks for (:attr:`load`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import activity
from . import events as evt
from .association import AssociationProtocol, Operation, Telemetry
from .config import WorkerConfig
from .engine import acse
from .engine import pdu as p
from .engine.connection import MemoryBudget, ReadBufferPool
from .handlers import HandlerCaller, HandlerRegistry
from .identity import IdentityPolicy
from .index.record import IndexRecord
from .storage.group import Delivery, GroupCommitter
from .storage.store import InstanceWriter, Store, StoreResult
from .tls import server_context

if TYPE_CHECKING:
    from .index.writer import IndexWriter
    from .indexed import IndexedServices
    from .storage.config import FileOps

log = logging.getLogger("workers.server")

#: an association that had an instance to commit this recently counts as storing:
#: a commit with fsync waits (--group-commit-wait at most) for its next instance
STORING_RECENTLY = 0.05


class AssociationServer:
    """Serves DICOM associations as acceptor on one event loop."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        evt_handlers: Iterable[Sequence[Any]] | None = None,
        store_ops: FileOps | None = None,
        telemetry: Telemetry[AssociationProtocol] | None = None,
        io_threads: int = 8,
    ) -> None:
        self.config = config
        self.policy = config.acceptor_policy()
        self.memory_budget = MemoryBudget(config.max_dataset_memory)
        # read buffers of ended connections, for new ones (see ReadBufferPool)
        self.buffer_pool = ReadBufferPool()
        #: admission by someone else (the supervisor: workers/main.py), asked once the
        #: A-ASSOCIATE-RQ is read: a future of None (admitted) or the RJ to answer
        self.ask_admission: (
            Callable[[AssociationProtocol, p.AssociateRQ], asyncio.Future[Any] | None] | None
        ) = None
        #: answers to the A-ASSOCIATE-RQs seen last (the same request, the same answer)
        self.negotiations = acse.NegotiationCache()
        #: running average of a built-in C-STORE commit (fsync included), seconds;
        #: it starts above the inline bound, so the first commits go to the pool
        self.commit_seconds = 2 * config.inline_commit_below
        self.registry = HandlerRegistry()
        self.identity: IdentityPolicy | None = None
        if config.identity is not None:
            # Bound first, so that a user's own EVT_USER_ID handler replaces it. Not
            # inline: each check derives a key on purpose (~50 ms), in the pool.
            self.identity = IdentityPolicy.from_settings(config.identity)
            self.registry.bind(evt.EVT_USER_ID, self.identity.handler)
        self.registry.bind_all(evt_handlers)
        self.caller = HandlerCaller(config.handler_timeout, config.handler_threads)
        self.store = Store(config.storage, ops=store_ops)
        #: DICOM TLS: every connection is wrapped; None: plain TCP
        self.ssl_context: ssl.SSLContext | None = (
            server_context(config.tls) if config.tls is not None else None
        )
        self.io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="store")
        #: with fsync, commits that wait at the same time share their flushes
        self.committer: GroupCommitter | None = (
            GroupCommitter(
                self.store,
                _deliver_commits,
                max_wait=config.group_commit_wait,
                observe=self._group_committed,
            )
            if config.storage.fsync == "always"
            else None
        )
        self.telemetry = telemetry
        self.protocols: set[AssociationProtocol] = set()
        #: association -> loop time of its last C-STORE data set (group commit company)
        self._storing: dict[AssociationProtocol, float] = {}
        self.established: set[AssociationProtocol] = set()
        self._per_ae: collections.Counter[str] = collections.Counter()
        #: futures that operations of any association are waiting on (handlers,
        #: commits, sub-operations), cancelled by close() if they outlive it
        self.tasks: set[asyncio.Future[Any]] = set()
        self._servers: list[asyncio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.accepting = True
        #: instances stored since start (for logs and tests)
        self.instances_stored = 0
        self.on_stored: Callable[[AssociationProtocol, Operation, StoreResult], None] | None = None
        #: level of the per-instance log line, decided once: None writes none
        self.instance_level = activity.instance_level(config.log_instances)
        #: DICOM audit messages (workers/audit), or None
        self.audit: Any = None
        if config.audit is not None:
            from .audit import AuditTrail

            self.audit = AuditTrail(config.audit, config.ae_title)
        #: the instance index's writer (workers/index): every stored instance is
        #: queued to it; None: no index (--index off)
        self.index_writer: IndexWriter | None = None
        #: this receiver's name in a shared index (IndexRecord.node)
        self.index_node = ""
        #: services answered from the instance index (storage commitment,
        #: query/retrieve: workers/indexed.py); None when not installed
        self.indexed: IndexedServices | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def engine_config(self) -> Any:
        # One per connection: tracing switches are per association. The memory
        # budget is the server's, shared by all of them.
        engine = self.config.engine_config()
        engine.memory_budget = self.memory_budget
        engine.buffer_pool = self.buffer_pool
        return engine

    # ------------------------------------------------------------ handlers

    def bind(
        self, event: evt.EventType, handler: Callable[..., Any], args: Sequence[Any] | None = None
    ) -> None:
        """Bind a handler for every association of this server."""
        self.registry.bind(event, handler, args)
        for proto in list(self.protocols):
            proto.refresh_tracing()

    def unbind(self, event: evt.EventType, handler: Callable[..., Any]) -> None:
        self.registry.unbind(event, handler)
        for proto in list(self.protocols):
            proto.refresh_tracing()

    def get_handlers(self, event: evt.EventType) -> Any:
        return self.registry.get_handlers(event)

    # ---------------------------------------------------------- transports

    def _factory(self) -> AssociationProtocol:
        return AssociationProtocol(self)

    async def listen(
        self, host: str = "127.0.0.1", port: int = 0, backlog: int = 1024
    ) -> tuple[str, int]:
        """Listen on ``host:port``; returns the address bound (port 0 picks one)."""
        self._loop = asyncio.get_running_loop()
        server = await self._loop.create_server(
            self._factory, host, port, backlog=backlog, reuse_address=True, **self._tls_kwargs()
        )
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        log.info("listening on %s:%d as %s", sockname[0], sockname[1], self.config.ae_title)
        return str(sockname[0]), int(sockname[1])

    async def adopt(
        self, sock: socket.socket, connection_id: int | None = None
    ) -> AssociationProtocol:
        """Serve a connection accepted elsewhere (the acceptor's fd hand-off), known
        to the acceptor as ``connection_id``.

        With TLS this returns once the handshake is done, and raises if it fails or
        does not finish within the handshake timeout (the socket is then closed)."""
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        made: list[AssociationProtocol] = []

        def factory() -> AssociationProtocol:
            proto = self._factory()
            proto.connection_id = connection_id
            made.append(proto)
            return proto

        # Not the protocol connect_accepted_socket returns: with ssl=, uvloop returns
        # its SSLProtocol wrapper there, asyncio the application protocol.
        await self._loop.connect_accepted_socket(factory, sock, **self._tls_kwargs())
        return made[0]

    def _tls_kwargs(self) -> dict[str, Any]:
        """With TLS, the handshake runs on this loop with its own timeout; the
        protocol only sees the connection (connection_made, ARTIM) once it is done."""
        if self.ssl_context is None or self.config.tls is None:
            return {}
        return {
            "ssl": self.ssl_context,
            "ssl_handshake_timeout": self.config.tls.handshake_timeout,
        }

    # ------------------------------------------------------------ admission

    def admission(self, proto: AssociationProtocol, rq: p.AssociateRQ) -> p.AssociateRJ | None:
        """Refuse an association over the configured limits (A-ASSOCIATE-RJ transient,
        service-provider presentation, local limit exceeded)."""
        cfg = self.config
        if not self.accepting:
            return acse.reject_local_limit()
        if self.identity is not None:
            # Checked here, whoever handles EVT_USER_ID: a calling AE that must
            # identify itself and sends no user identity item is refused outright.
            refusal = self.identity.missing_identity(rq)
            if refusal is not None:
                return refusal
        if cfg.max_associations and len(self.established) >= cfg.max_associations:
            log.warning(
                "association limit %d reached: rejecting %r", cfg.max_associations, rq.calling_ae
            )
            return acse.reject_local_limit()
        if (
            cfg.max_associations_per_ae
            and self._per_ae[rq.calling_ae] >= cfg.max_associations_per_ae
        ):
            log.warning(
                "per-AE association limit %d reached for %r: rejecting",
                cfg.max_associations_per_ae,
                rq.calling_ae,
            )
            return acse.reject_local_limit()
        return None

    def timed_commit(self, writer: InstanceWriter) -> StoreResult:
        """``writer.commit()``, its duration folded into :attr:`commit_seconds` (on
        the loop or in a pool thread: a lost update of this average is harmless)."""
        started = time.perf_counter()
        result = writer.commit()
        self.commit_seconds += (time.perf_counter() - started - self.commit_seconds) * 0.1
        return result

    def _group_committed(self, size: int, seconds: float) -> None:
        # A group counts as one commit for the inline decision: what a lone
        # instance would have waited for.
        self.commit_seconds += (seconds - self.commit_seconds) * 0.1

    def store_company(self, proto: AssociationProtocol, now: float) -> int:
        """Note that ``proto`` has an instance to commit; return how many other
        associations of this worker did within the last :data:`STORING_RECENTLY`
        seconds: the instances a group commit may expect to be joined by soon."""
        storing = self._storing
        storing[proto] = now
        if len(storing) == 1:
            return 0
        since = now - STORING_RECENTLY
        return sum(1 for when in storing.values() if when >= since) - 1

    def connection_opened(self, proto: AssociationProtocol) -> None:
        self.protocols.add(proto)

    def association_established(self, proto: AssociationProtocol) -> None:
        self.established.add(proto)
        self._per_ae[proto.assoc.requestor.ae_title] += 1

    def association_ended(self, proto: AssociationProtocol) -> None:
        """Released or aborted: the association no longer counts against the limits,
        even if its connection lingers until the peer closes it. Idempotent."""
        if proto in self.established:
            self.established.discard(proto)
            ae = proto.assoc.requestor.ae_title
            self._per_ae[ae] -= 1
            if self._per_ae[ae] <= 0:
                del self._per_ae[ae]

    def connection_closed(self, proto: AssociationProtocol) -> None:
        self.protocols.discard(proto)
        self._storing.pop(proto, None)
        self.association_ended(proto)

    def track(self, future: asyncio.Future[Any]) -> None:
        """Remember a future an operation waits on until it is done (see close())."""
        self.tasks.add(future)
        future.add_done_callback(self.tasks.discard)

    def instance_stored(
        self, proto: AssociationProtocol, op: Operation, result: StoreResult
    ) -> None:
        if result.ok:
            self.instances_stored += 1
            if self.index_writer is not None:
                self._index(proto, op, result)
        else:
            log.warning(
                "%s: C-STORE %s answered 0x%04x: %s",
                proto.assoc.name,
                op.command.AffectedSOPInstanceUID,
                result.status,
                result.comment,
            )
        if self.on_stored is not None:
            self.on_stored(proto, op, result)

    def _index(self, proto: AssociationProtocol, op: Operation, result: StoreResult) -> None:
        """Queue the index record of an instance just stored (never blocks)."""
        writer = op.writer
        path = result.path
        assert self.index_writer is not None
        if writer is None or path is None:
            return
        if result.duplicate and self.store.config.duplicates != "overwrite":
            return  # the existing copy was kept: so is its record
        scan = result.scan
        self.index_writer.submit(
            IndexRecord(
                sop_instance_uid=writer.sop_instance_uid,
                sop_class_uid=writer.sop_class_uid,
                study_uid=scan.study_instance_uid or "",
                series_uid=scan.series_instance_uid or "",
                patient_id=scan.patient_id or "",
                patient_name=scan.patient_name or "",
                study_date=scan.study_date or "",
                modality=scan.modality or "",
                accession_number=scan.accession_number or "",
                calling_ae=writer.calling_ae or "",
                source_address=proto.assoc.name,
                transfer_syntax=writer.transfer_syntax,
                size=result.bytes_written,
                digest=result.digest or "",
                path=self.store.index_path(path),
                received_at=time.time(),
                study_time=scan.study_time or "",
                node=self.index_node,
            )
        )

    @property
    def load(self) -> tuple[int, int]:
        """(open connections, received bytes not yet parsed), for fair hand-off."""
        return len(self.protocols), sum(proto.conn.buffered for proto in self.protocols)

    # ------------------------------------------------------------ shutdown

    def stop_accepting(self) -> None:
        """Stop listening; new associations are refused, open ones go on."""
        self.accepting = False
        for server in self._servers:
            server.close()

    async def close(self, graceful_timeout: float = 10.0) -> None:
        """Stop accepting, let open associations finish for up to ``graceful_timeout``
        seconds, then abort what remains."""
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + graceful_timeout
        while self.protocols and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for proto in list(self.protocols):
            proto.abort_association(
                p.AbortSource.SERVICE_PROVIDER, 0, "shutting down", hard_close=True
            )
        while self.protocols and loop.time() < deadline + 2.0:
            await asyncio.sleep(0.05)
        # Operations whose association is gone may still run (a slow handler, a
        # commit): give them what is left of the grace period, then cancel them.
        while self.tasks and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        for server in self._servers:
            await server.wait_closed()
        if self.indexed is not None:
            await self.indexed.close()
        self.caller.shutdown()
        if self.committer is not None:
            self.committer.close()
            if self.committer.groups:
                log.info(
                    "group commit: %d instances in %d groups, %.3f ms per group",
                    self.committer.instances,
                    self.committer.groups,
                    1000 * self.committer.seconds / self.committer.groups,
                )
        self.io_pool.shutdown(wait=True)
        close_store = getattr(self.store, "close", None)
        if close_store is not None:  # the object store's upload threads
            await loop.run_in_executor(None, close_store)
        if self.audit is not None:
            # What is queued gets up to 2 s to reach the collector, off the loop.
            await loop.run_in_executor(None, self.audit.close)
        self.store.close()


def _deliver_commits(delivery: Delivery) -> None:
    """On the group commit thread: pass a group's results to the loop of the futures
    waiting for them, in one hand-off."""
    if delivery:
        delivery[0][0].get_loop().call_soon_threadsafe(_resolve_commits, delivery)


def _resolve_commits(delivery: Delivery) -> None:
    for future, result in delivery:
        if future.done():  # cancelled: the association (or the worker) is gone
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
