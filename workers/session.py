"""What an association is to the services and handlers that serve it.

The built-in services (:mod:`workers.services`), Storage Commitment
(:mod:`workers.commitment`), query/retrieve (:mod:`workers.qr`) and the index-backed
services (:mod:`workers.indexed`) program against the narrow interfaces here, not
against the asyncio protocol (:mod:`workers.association`) or the server
(:mod:`workers.server`) that implement them: dependencies point one way, from the
transport down to the services, never back.

* :class:`AssociationPort`: what a service needs of the association serving its
  request (send a message, look up a context, wait for the peer, hand a commit to
  the I/O pool, report a handler's failure);
* :class:`ServerPort`: the worker-wide facilities behind it (configuration, the
  handler caller, the store, the index-backed services);
* :class:`IndexedPort`: what the parts of the index-backed services need of their
  owner;
* :class:`Reporter`: the one path from an association to the metrics. The
  association (its storing and trail parts included) reports every count through
  its ``reporter``, never to :mod:`workers.telemetry` directly; the worker's
  ``Telemetry`` implements it, :data:`NULL_REPORTER` stands in when metrics are off
  (so no call site tests for it).

The plain data types handlers see (``event.assoc``, ``event.context``) and the
per-request :class:`Operation` live here too, since both sides name them.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import events as evt
from .engine import pdu as p
from .handlers import HandlerRegistry

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from .config import IndexedSettings, WorkerConfig
    from .engine import acse, dimse
    from .engine.connection import EngineConfig, MemoryBudget, PresentationContext
    from .handlers import Binding, HandlerCaller, Step
    from .index import Index
    from .index.query import Condition
    from .storage.group import GroupCommitter
    from .storage.store import InstanceWriter, Store, StoreResult

#: the acceptor's protocol class, as its server and telemetry see it
P_contra = TypeVar("P_contra", contravariant=True)

__all__ = [
    "NULL_REPORTER",
    "AcceptorServer",
    "Association",
    "AssociationPort",
    "ContextInfo",
    "IndexedPort",
    "NullReporter",
    "Operation",
    "Reporter",
    "ServerPort",
    "ServiceUser",
    "Spool",
    "Telemetry",
]


class ServerPort(Protocol):
    """The worker-wide facilities a service reaches through ``proto.server``
    (implemented by :class:`workers.server.AssociationServer`)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def config(self) -> WorkerConfig: ...

    @property
    def registry(self) -> HandlerRegistry: ...

    @property
    def caller(self) -> HandlerCaller: ...

    @property
    def store(self) -> Store: ...

    @property
    def telemetry(self) -> Any: ...

    @property
    def indexed(self) -> IndexedPort | None: ...


class Reporter(Protocol[P_contra]):
    """What an association reports to the metrics (implemented by
    :class:`workers.telemetry.Telemetry`): every notification event it emits
    (:meth:`record`), each DIMSE message, each C-STORE answered (one call per
    instance), a failed user handler, a refused presentation context."""

    def record(
        self, event: evt.NotificationEvent, protocol: P_contra, attrs: dict[str, Any]
    ) -> None: ...

    def dimse(self, direction: int, command_field: int, status: int | None = None) -> None: ...

    def stored(
        self, protocol: P_contra, op: Operation, result: Any, duration_seconds: float
    ) -> None: ...

    def handler_error(self, event_name: str) -> None: ...

    def context_rejected(self, reason: str) -> None: ...


#: the reporter's old name, for the server's ``telemetry`` attribute
Telemetry = Reporter


class NullReporter:
    """The :class:`Reporter` of a worker without metrics: counts nothing."""

    __slots__ = ()

    def record(self, event: evt.NotificationEvent, protocol: Any, attrs: dict[str, Any]) -> None:
        pass

    def dimse(self, direction: int, command_field: int, status: int | None = None) -> None:
        pass

    def stored(self, protocol: Any, op: Operation, result: Any, duration_seconds: float) -> None:
        pass

    def handler_error(self, event_name: str) -> None:
        pass

    def context_rejected(self, reason: str) -> None:
        pass


NULL_REPORTER = NullReporter()


class AcceptorServer(ServerPort, Protocol[P_contra]):
    """What the acceptor's protocol (``P_contra``, that is
    :class:`workers.association.AssociationProtocol`) needs of the server that made it
    (implemented by :class:`workers.server.AssociationServer`): the services' view
    (:class:`~workers.session.ServerPort`) plus admission, negotiation, the commit
    machinery, audit and the association bookkeeping."""

    @property
    def telemetry(self) -> Telemetry[P_contra] | None: ...

    @property
    def engine_config(self) -> EngineConfig: ...

    @property
    def policy(self) -> acse.AcceptorPolicy: ...

    @property
    def negotiations(self) -> acse.NegotiationCache: ...

    @property
    def ask_admission(
        self,
    ) -> Callable[[P_contra, p.AssociateRQ], asyncio.Future[Any] | None] | None: ...

    @property
    def memory_budget(self) -> MemoryBudget: ...

    @property
    def committer(self) -> GroupCommitter | None: ...

    @property
    def commit_seconds(self) -> float: ...

    @property
    def io_pool(self) -> ThreadPoolExecutor: ...

    @property
    def instance_level(self) -> int | None: ...

    @property
    def audit(self) -> Any: ...

    def admission(self, proto: P_contra, rq: p.AssociateRQ) -> p.AssociateRJ | None: ...

    def timed_commit(self, writer: InstanceWriter) -> StoreResult: ...

    def store_company(self, proto: P_contra, now: float) -> int: ...

    def track(self, future: asyncio.Future[Any]) -> None: ...

    def connection_opened(self, proto: P_contra) -> None: ...

    def association_established(self, proto: P_contra) -> None: ...

    def association_ended(self, proto: P_contra) -> None: ...

    def connection_closed(self, proto: P_contra) -> None: ...

    def instance_stored(self, proto: P_contra, op: Operation, result: StoreResult) -> None: ...


class IndexedPort(Protocol):
    """What :mod:`workers.services`, :mod:`workers.commitment` and :mod:`workers.qr`
    need of the index-backed services (implemented by
    :class:`workers.indexed.IndexedServices`)."""

    @property
    def server(self) -> ServerPort: ...

    @property
    def settings(self) -> IndexedSettings: ...

    @property
    def index(self) -> Index | None: ...

    @property
    def pool(self) -> ThreadPoolExecutor: ...

    @property
    def ae_title(self) -> str: ...

    @property
    def storage_root(self) -> str: ...

    def count(self, service: str, label: str, n: int = 1) -> None: ...

    def select(
        self, level: str, equal: dict[str, str], conditions: Sequence[Condition] = ()
    ) -> list[Any]: ...

    def builtin_binding(self, event: evt.InterventionEvent) -> Binding | None: ...

    def n_action_step(self, proto: AssociationPort, op: Operation) -> Step[None] | None: ...


class AssociationPort(Protocol):
    """What a service needs of the association serving its request (implemented by
    :class:`workers.association.AssociationProtocol`)."""

    #: the association's handler registry (its own once a handler is bound to it)
    registry: HandlerRegistry

    @property
    def assoc(self) -> Association: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def config(self) -> WorkerConfig: ...

    @property
    def server(self) -> ServerPort: ...

    @property
    def can_send(self) -> bool: ...

    def context_info(self, context_id: int) -> ContextInfo: ...

    def is_cancelled(self, message_id: int) -> bool: ...

    def drain(self) -> asyncio.Future[None] | None: ...

    def send(
        self, context_id: int, command: dimse.Command, dataset: bytes | None = None
    ) -> None: ...

    def send_store_response(self, op: Operation, status: int) -> None: ...

    def request(
        self, context_id: int, command: dimse.Command, dataset: bytes | None = None
    ) -> asyncio.Future[tuple[dimse.Command, bytes | None]]: ...

    def commit_store(self, op: Operation) -> Step[StoreResult]: ...

    def store_done(self, op: Operation, result: Any) -> None: ...

    def handler_failed(self, event: evt.InterventionEvent) -> None: ...

    def inline(self, binding: Binding) -> bool: ...

    def refresh_tracing(self) -> None: ...

    def abort_association(
        self,
        source: int,
        reason: int,
        detail: str,
        flush: bool = True,
        hard_close: bool = False,
    ) -> None: ...


class ServiceUser:
    """One end of the association, as handlers see it (``assoc.requestor``,
    ``assoc.acceptor``), with pynetdicom's attribute names."""

    __slots__ = (
        "address",
        "ae_title",
        "implementation_class_uid",
        "implementation_version_name",
        "maximum_length",
        "port",
        "user_identity",
    )

    def __init__(self) -> None:
        self.ae_title = ""
        self.address = ""
        self.port = 0
        self.implementation_class_uid: str | None = None
        self.implementation_version_name: str | None = None
        self.maximum_length: int | None = None
        self.user_identity: p.UserIdentityRQ | None = None


class ContextInfo:
    """An accepted presentation context, as handlers see it (``event.context``)."""

    __slots__ = ("abstract_syntax", "as_scp", "as_scu", "context_id", "transfer_syntax")

    def __init__(self, ctx: PresentationContext, as_scu: bool = False, as_scp: bool = True) -> None:
        self.context_id = ctx.id
        self.abstract_syntax = ctx.abstract_syntax
        self.transfer_syntax = ctx.transfer_syntax
        self.as_scu = as_scu
        self.as_scp = as_scp

    def __repr__(self) -> str:
        return f"<Context {self.context_id} {self.abstract_syntax} {self.transfer_syntax}>"


class Association:
    """What handlers get as ``event.assoc``: who is talking, what was agreed, and the
    per-association ``bind``/``unbind``/``abort``/``release``."""

    def __init__(self, protocol: AssociationPort, registry: HandlerRegistry) -> None:
        self._protocol = protocol
        #: the server's registry until a handler is bound to this association alone;
        #: then one of its own that falls back to the server's (see bind())
        self.registry = registry
        self.requestor = ServiceUser()
        self.acceptor = ServiceUser()
        self.is_established = False
        self.is_released = False
        self.is_aborted = False
        self.is_rejected = False
        self.accepted_contexts: list[ContextInfo] = []
        self.rejected_contexts: list[p.PresentationContextRQ] = []
        #: asynchronous operations window granted (invoked, performed)
        self.async_ops = (1, 1)
        self.name = ""

    @property
    def server(self) -> ServerPort:
        return self._protocol.server

    @property
    def mode(self) -> str:
        return "acceptor"

    def bind(self, event: evt.EventType, handler: Callable[..., Any], args: Any = None) -> None:
        proto = self._protocol
        if self.registry is proto.server.registry:
            # The first handler of this association's own: most never get one, so the
            # registry of their own is only made now.
            self.registry = proto.registry = HandlerRegistry(parent=proto.server.registry)
        self.registry.bind(event, handler, args)
        proto.refresh_tracing()

    def unbind(self, event: evt.EventType, handler: Callable[..., Any]) -> None:
        proto = self._protocol
        if self.registry is proto.server.registry:
            return  # nothing was bound to this association alone
        self.registry.unbind(event, handler)
        proto.refresh_tracing()

    def get_handlers(self, event: evt.EventType) -> Any:
        return self.registry.get_handlers(event)

    def abort(self) -> None:
        """Abort the association (A-ABORT, service-user source).

        Safe to call from a handler running in the handler thread pool: the abort is
        then handed to the event loop, which owns the transport.
        """
        proto = self._protocol
        try:
            on_loop = asyncio.get_running_loop() is proto.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            proto.abort_association(p.AbortSource.SERVICE_USER, 0, "aborted by a handler")
        else:
            proto.loop.call_soon_threadsafe(
                proto.abort_association, p.AbortSource.SERVICE_USER, 0, "aborted by a handler"
            )

    def release(self) -> None:
        """Not offered to an acceptor: PS3.8 lets only the requestor release."""
        raise RuntimeError("the association acceptor cannot request a release; use abort()")

    def context(self, context_id: int) -> ContextInfo | None:
        for ctx in self.accepted_contexts:
            if ctx.context_id == context_id:
                return ctx
        return None

    def __repr__(self) -> str:
        return f"<Association {self.name}>"


class Operation:
    """One DIMSE request being served."""

    __slots__ = (
        "command",
        "company",
        "context_id",
        "data",
        "held",
        "message_id",
        "spool",
        "started",
        "status",
        "writer",
    )

    def __init__(self, context_id: int, command: dimse.Command, started: float = 0.0) -> None:
        self.context_id = context_id
        #: time.perf_counter() when the command set arrived (C-STORE duration metrics)
        self.started = started
        self.command = command
        self.message_id = command.MessageID or 0
        self.data: bytes | None = None
        #: bytes of the worker's memory budget ``data`` holds until the operation ends
        self.held = 0
        self.writer: InstanceWriter | None = None
        #: other associations storing when this instance was ready (group commit)
        self.company = 0
        self.spool: Spool | None = None
        #: a status decided before the data set arrived (refused, bad UID ...)
        self.status: int | None = None


class Spool:
    """A C-STORE data set kept in a temp file for a user handler (never in memory)."""

    __slots__ = ("error", "fd", "path", "size")

    def __init__(self, directory: str) -> None:
        # "<pid>-..." like the store's temp files: the sweep of a dead worker's files
        # (workers/storage/sweep.py) must recognise a live worker's spool as owned.
        self.fd, self.path = tempfile.mkstemp(
            dir=directory, prefix=f"{os.getpid()}-", suffix=".spool"
        )
        self.size = 0
        #: the write error (ENOSPC ...) that made the spool give up, if any
        self.error: OSError | None = None

    def write(self, view: memoryview) -> None:
        # Called from inside the engine's parser: an exception here would abort the
        # association. A full disk is the request's failure (0xA700), not the
        # association's: remember it, free the space at once, drop the rest.
        if self.error is not None:
            return
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.size += n
        except OSError as exc:
            self.error = exc
            self.close()

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def discard(view: memoryview) -> None:
    """Sink for a data set that is refused before it arrives."""
