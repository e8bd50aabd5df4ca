"""The requestor's machinery under :class:`~workers.scu.requestor.Requestor`.

The association state, MessageIDs and the outstanding operations, the send path that
keeps every message whole on the wire, the asynchronous operations window, the DIMSE
timeout watchdog, incoming events (responses, C-STORE and N-EVENT-REPORT requests from
the peer) and failure. The theory of operation is in :mod:`workers.scu.requestor`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from workers.engine import dimse
from workers.engine import pdu as p
from workers.engine.connection import Connection, PresentationContext
from workers.engine.primitives import (
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    CommandReceived,
    DataSetReceived,
    Indication,
    Released,
    ReleaseRequested,
)

from .operations import (
    AssociationAborted,
    AssociationRejected,
    OperationLink,
    _label,
    _Op,
    _Single,
)
from .protocol import ABORT_GRACE, EngineProtocol

if TYPE_CHECKING:
    pass

__all__ = ["EventReportHandler", "RequestorBase", "StoreHandler"]

log = logging.getLogger("workers.scu.requestor")

MiB = 1024 * 1024

#: The engine's PDU size when the peer announces no maximum (Connection's cap).
_UNLIMITED_PDU = 4 * MiB
#: An async ops window of 0 means "unlimited" (PS3.7 D.3.3.3); this is what we allow.
UNLIMITED_WINDOW = 65535

StatusResult: TypeAlias = "int | Awaitable[int]"
#: ``store_handler(command, dataset_bytes, context) -> status``, sync or async.
StoreHandler: TypeAlias = "Callable[[dimse.Command, bytes, PresentationContext], StatusResult]"
#: ``event_report_handler(command, dataset_bytes | None, context) -> status``.
EventReportHandler: TypeAlias = (
    "Callable[[dimse.Command, bytes | None, PresentationContext], StatusResult]"
)


class RequestorBase:
    """An association, requestor side, without its DIMSE service methods (those are
    :class:`~workers.scu.requestor.Requestor`'s)."""

    def __init__(
        self,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
        *,
        acse_timeout: float | None,
        dimse_timeout: float | None,
        network_timeout: float | None,
        store_handler: StoreHandler | None = None,
        event_report_handler: EventReportHandler | None = None,
    ) -> None:
        self._conn = conn
        self._loop = loop
        self._protocol = EngineProtocol(conn, loop, self._on_event, self._on_lost)
        self._acse_timeout = acse_timeout
        self._dimse_timeout = dimse_timeout
        self._network_timeout = network_timeout
        self._store_handler = store_handler
        self._event_report_handler = event_report_handler

        self._established: asyncio.Future[None] = loop.create_future()
        self._release_done: asyncio.Future[None] | None = None
        self._releasing = False
        self._error: BaseException | None = None

        self._pending: dict[int, _Op] = {}
        self._last_message_id = 0
        self._window = 1
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._stream_done: asyncio.Future[None] | None = None
        self._deferred: list[tuple[int, dimse.Command]] = []
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._contexts_by_class: dict[str, list[PresentationContext]] = {}
        self._context_cache: dict[tuple[str, str | None], PresentationContext] = {}

        # the message being received: (operation or None, command, context id)
        self._rx: tuple[_Op | None, dimse.Command, int] | None = None
        self._progress_at = loop.time()
        self._watchdog: asyncio.TimerHandle | None = None
        # what the operations in flight (C-FIND/GET/MOVE) may ask of this association
        self._link = OperationLink(
            loop, self._request, self._send_soon, self._conn.config.max_dataset_in_memory
        )

    # --------------------------------------------------------------- properties

    @property
    def is_established(self) -> bool:
        """True while the association can carry requests."""
        return self._error is None and not self._releasing and self._conn.is_established

    @property
    def request(self) -> p.AssociateRQ:
        """The A-ASSOCIATE-RQ we sent."""
        assert self._conn.request is not None
        return self._conn.request

    @property
    def response(self) -> p.AssociateAC:
        """The peer's A-ASSOCIATE-AC."""
        assert self._conn.response is not None
        return self._conn.response

    @property
    def user_info(self) -> p.UserInformation:
        """The user information of the A-ASSOCIATE-AC (async ops, roles, identity...)."""
        return self.response.user_info

    @property
    def accepted_contexts(self) -> list[PresentationContext]:
        """The accepted presentation contexts, by ID."""
        return [self._conn.contexts[i] for i in sorted(self._conn.contexts)]

    @property
    def rejected_contexts(self) -> list[tuple[p.PresentationContextRQ, int]]:
        """Proposed contexts the peer did not accept, with the result/reason code."""
        results = {c.id: c.result for c in self.response.contexts}
        return [
            (c, results.get(c.id, p.ContextResult.NO_REASON))
            for c in self.request.contexts
            if c.id not in self._conn.contexts
        ]

    @property
    def peer_max_pdu_length(self) -> int:
        """The peer's Maximum Length (0: no limit announced)."""
        return self._conn.peer_max_pdu_length

    @property
    def max_outstanding(self) -> int:
        """How many requests may be outstanding: the async ops window the peer granted
        (PS3.7 D.3.3.3, "maximum number operations invoked"), 1 when not negotiated.

        It may be raised by hand for a peer known to pipeline without negotiating it;
        that is outside the standard, so only do it knowingly.
        """
        return self._window

    @max_outstanding.setter
    def max_outstanding(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_outstanding must be at least 1")
        self._window = value
        self._wake_slots(all_waiters=True)

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet completely answered."""
        return len(self._pending)

    def context_for(
        self, sop_class_uid: str, transfer_syntax: str | None = None
    ) -> PresentationContext:
        """The accepted context for ``sop_class_uid`` (and ``transfer_syntax``, if given).

        Raises ``ValueError`` when no context was accepted for the SOP class, or none
        with that transfer syntax: data is never transcoded.
        """
        key = (sop_class_uid, transfer_syntax)
        found = self._context_cache.get(key)
        if found is not None:
            return found
        candidates = self._contexts_by_class.get(sop_class_uid)
        if not candidates:
            proposed = any(c.abstract_syntax == sop_class_uid for c in self.request.contexts)
            raise ValueError(
                f"no accepted presentation context for SOP class {sop_class_uid}"
                + (" (proposed, but the peer rejected it)" if proposed else " (not proposed)")
            )
        if transfer_syntax is None:
            found = candidates[0]
        else:
            found = next((c for c in candidates if c.transfer_syntax == transfer_syntax), None)
            if found is None:
                accepted = ", ".join(sorted({c.transfer_syntax for c in candidates}))
                raise ValueError(
                    f"the data is in transfer syntax {transfer_syntax} but the peer accepted "
                    f"SOP class {sop_class_uid} only with {accepted}; transcoding is not "
                    "supported, propose a context with the data's transfer syntax"
                )
        self._context_cache[key] = found
        return found

    # --------------------------------------------------------- release, abort

    async def release(self) -> None:
        """Wait for outstanding operations, then A-RELEASE (PS3.8 7.2).

        A no-op when the association was already over. Raises what ends it if that
        happens during the call (:class:`AssociationAborted` when the peer aborts,
        ``TimeoutError`` when an outstanding operation times out), and
        ``TimeoutError`` (after aborting) if no answer comes within the ACSE timeout.
        """
        if self._error is not None or self._releasing or not self._conn.is_established:
            return
        while self._pending or self._stream_done is not None:
            self._raise_if_failed()
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter
        self._raise_if_failed()
        if self._releasing:
            return  # another task released meanwhile
        self._releasing = True
        done: asyncio.Future[None] = self._loop.create_future()
        self._release_done = done
        self._conn.release(self._loop.time())
        self._protocol.flush()
        try:
            async with asyncio.timeout(self._acse_timeout):
                await asyncio.shield(done)
        except TimeoutError:
            exc = TimeoutError(f"no A-RELEASE-RP within {self._acse_timeout} s")
            self._abort(exc)
            raise exc from None

    def abort(self) -> None:
        """A-ABORT (PS3.8 7.3) now; everything outstanding fails with AssociationAborted."""
        if self._error is None:
            self._abort(AssociationAborted("aborted by the local service user", source=0, reason=0))
        else:
            self._protocol.close(grace=ABORT_GRACE)

    # ================================================================ internals

    def _new_single(self, context: PresentationContext, with_data: bool) -> _Single:
        return _Single(self._loop.create_future(), context, with_data)

    async def _request(
        self,
        context: PresentationContext,
        build: Callable[[int], dimse.Command],
        dataset: bytes | bytearray | memoryview | None,
        op: _Op,
    ) -> int:
        """Send one whole request message once allowed; returns its MessageID."""
        if (
            self._stream_done is not None
            or len(self._pending) >= self._window
            or self._error is not None
            or self._releasing
        ):
            await self._ready_to_send()
        # From here to the end of the queueing no await: the message goes out whole.
        message_id = self._next_message_id()
        command = build(message_id)
        if dataset is not None and command.CommandDataSetType == dimse.NO_DATASET:
            command.CommandDataSetType = dimse.DATASET_PRESENT
        raw = dimse.encode_command(command)  # may raise: nothing registered or sent yet
        self._register(message_id, op)
        conn = self._conn
        conn.send_command(context.id, raw)
        if dataset is not None:
            conn.send_dataset(context.id, dataset)
        protocol = self._protocol
        protocol.flush()
        if protocol.paused:
            try:
                await self._drain()
            except BaseException:
                _orphan(op)
                raise
        return message_id

    async def _ready_to_send(self) -> None:
        """Wait until no file is streaming and the window has a free slot."""
        while True:
            self._raise_if_failed()
            if self._releasing:
                raise RuntimeError("the association is being released")
            if self._stream_done is not None:
                await asyncio.shield(self._stream_done)
                continue
            if len(self._pending) >= self._window:
                waiter: asyncio.Future[None] = self._loop.create_future()
                self._slot_waiters.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    # A wake-up given to a cancelled waiter passes to the next one.
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                        self._wake_slots()
                    raise
                continue
            return

    def _next_message_id(self) -> int:
        """A MessageID not outstanding: 1..65535, wrapping (US, and 0 is not used)."""
        pending = self._pending
        message_id = self._last_message_id
        for _ in range(65535):
            message_id = message_id % 65535 + 1
            if message_id not in pending:
                self._last_message_id = message_id
                return message_id
        raise RuntimeError("all 65535 message IDs are outstanding")  # pragma: no cover

    def _register(self, message_id: int, op: _Op) -> None:
        pending = self._pending
        if not pending:
            self._progress_at = self._loop.time()
            if self._watchdog is None and self._dimse_timeout is not None:
                self._watchdog = self._loop.call_at(
                    self._progress_at + self._dimse_timeout, self._check_watchdog
                )
        pending[message_id] = op

    def _fragment_length(self) -> int:
        """The data-set bytes of one full P-DATA-TF the engine will send, made even:
        DCMTK aborts on odd fragments, and a peer may announce an odd maximum."""
        limit = self._conn.peer_max_pdu_length or _UNLIMITED_PDU
        cap = self._conn.config.max_send_pdu_length
        if cap:
            limit = min(limit, cap)
        return max((limit - 6) & ~1, 2)

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self._network_timeout):
                await self._protocol.drain()
        except TimeoutError:
            exc = TimeoutError(f"the peer took no data for {self._network_timeout} s")
            self._abort(exc)
            raise exc from None
        except ConnectionError:
            self._raise_if_failed()
            raise
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _send_soon(self, context_id: int, command: dimse.Command) -> None:
        """Send a data-set-less message now, or right after the file being streamed."""
        if self._error is not None or self._protocol.closed:
            return
        if self._stream_done is not None:
            self._deferred.append((context_id, command))
            return
        self._conn.send_command(context_id, command)
        self._protocol.flush()

    def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for context_id, command in deferred:
            self._send_soon(context_id, command)
        if not self._pending:
            self._wake_idle()

    # ---------------------------------------------------------- DIMSE timeout

    def _check_watchdog(self) -> None:
        self._watchdog = None
        if not self._pending or self._error is not None or self._dimse_timeout is None:
            return
        now = self._loop.time()
        if self._stream_done is not None:  # still sending: the clock starts after that
            deadline = now + self._dimse_timeout
        else:
            deadline = self._progress_at + self._dimse_timeout
        if now < deadline:  # the peer made progress since the timer was set
            self._watchdog = self._loop.call_at(deadline, self._check_watchdog)
            return
        self._abort(TimeoutError(f"no DIMSE response within {self._dimse_timeout} s"))

    # ------------------------------------------------------- incoming events

    def _on_event(self, event: Indication) -> None:
        kind = type(event)
        if kind is CommandReceived:
            assert isinstance(event, CommandReceived)
            self._progress_at = self._loop.time()
            command = event.command
            if command.CommandField & 0x8000:
                op = self._pending.get(command.MessageIDBeingRespondedTo)  # type: ignore[arg-type]
                if op is None:
                    log.warning(
                        "%s for unknown MessageID %s ignored",
                        _label(command),
                        command.MessageIDBeingRespondedTo,
                    )
                if command.has_dataset:
                    self._rx = (op, command, event.context_id)
                elif op is not None:
                    self._deliver(op, command, None)
            elif command.has_dataset:
                self._rx = (None, command, event.context_id)
            else:
                self._on_request(command, event.context_id, None)
        elif kind is DataSetReceived:
            assert isinstance(event, DataSetReceived)
            rx, self._rx = self._rx, None
            if rx is None:  # pragma: no cover - the engine pairs them
                return
            op, command, context_id = rx
            if command.CommandField & 0x8000:
                if op is not None:
                    self._deliver(op, command, event.data)
            else:
                self._on_request(command, context_id, event.data)
        elif kind is AssociateAccepted:
            self._on_accepted()
        elif kind is AssociateRejected:
            assert isinstance(event, AssociateRejected)
            self._fail_all(AssociationRejected(event.response))
        elif kind is Aborted:
            assert isinstance(event, Aborted)
            who = "peer" if event.by_peer else "service provider"
            self._fail_all(
                AssociationAborted(
                    f"association aborted ({who}): {event.detail}",
                    source=event.source,
                    reason=event.reason,
                    by_peer=event.by_peer,
                )
            )
        elif kind is ReleaseRequested:
            assert isinstance(event, ReleaseRequested)
            if not event.collision:
                # The peer ends the association (Sta8): nothing more can be asked.
                self._fail_all(ConnectionError("the peer released the association"))
            self._conn.release_response(self._loop.time())
        elif kind is Released:
            if self._release_done is not None and not self._release_done.done():
                self._release_done.set_result(None)
            self._fail_all(ConnectionError("the association is released"))

    def _deliver(self, op: _Op, command: dimse.Command, data: bytes | None) -> None:
        if op.deliver(command, data):
            del self._pending[command.MessageIDBeingRespondedTo]  # type: ignore[arg-type]
            if self._slot_waiters:
                self._wake_slots()
            if not self._pending:
                self._wake_idle()

    def _on_accepted(self) -> None:
        by_class: dict[str, list[PresentationContext]] = {}
        for context_id in sorted(self._conn.contexts):
            context = self._conn.contexts[context_id]
            by_class.setdefault(context.abstract_syntax, []).append(context)
        self._contexts_by_class = by_class
        window = 1  # PS3.7 D.3.3.3: no item in the AC means no asynchronous operations
        proposed = self.request.user_info.async_ops
        granted = self.user_info.async_ops
        if proposed is not None and granted is not None:
            # 0 is "unlimited"; a peer granting more than we proposed gets what we asked
            window = min(granted.invoked or UNLIMITED_WINDOW, proposed.invoked or UNLIMITED_WINDOW)
        self._window = window
        if not self._established.done():
            self._established.set_result(None)

    def _on_request(self, command: dimse.Command, context_id: int, data: bytes | None) -> None:
        """A request from the peer: C-STORE sub-operations of a C-GET, N-EVENT-REPORTs."""
        context = self._conn.contexts[context_id]
        field = command.CommandField
        handler: Any  # StoreHandler or EventReportHandler, both None-able
        if field == dimse.CommandField.C_STORE_RQ:
            # a C-STORE-RQ always has a data set, which the engine gives whole
            data = data or b""
            handler, failure = self._store_handler, dimse.Status.STORE_HANDLER_FAILED
            missing = dimse.Status.SOP_CLASS_NOT_SUPPORTED
        elif field == dimse.CommandField.N_EVENT_REPORT_RQ:
            handler, failure = self._event_report_handler, dimse.Status.PROCESSING_FAILURE
            missing = dimse.Status.NO_SUCH_EVENT_TYPE
        elif field == dimse.CommandField.C_ECHO_RQ:
            self._respond(command, context_id, dimse.Status.SUCCESS)
            return
        elif field == dimse.CommandField.C_CANCEL_RQ:
            return  # we perform nothing cancellable
        else:
            self._respond(command, context_id, dimse.Status.UNRECOGNIZED_OPERATION)
            return
        if handler is None:
            self._respond(command, context_id, missing)
            return
        try:
            result = handler(command, data, context)
        except Exception:
            log.exception("%s handler failed", _label(command))
            self._respond(command, context_id, failure)
            return
        if inspect.isawaitable(result):
            task = self._loop.create_task(self._finish(result, command, context_id, failure))
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_tasks.discard)
        else:
            self._respond(command, context_id, _handler_status(result))

    async def _finish(
        self, result: Awaitable[Any], command: dimse.Command, context_id: int, failure: int
    ) -> None:
        try:
            status = _handler_status(await result)
        except Exception:
            log.exception("%s handler failed", _label(command))
            status = failure
        self._respond(command, context_id, status)

    def _respond(self, command: dimse.Command, context_id: int, status: int) -> None:
        if command.MessageID is None:
            return  # nothing to respond to; the engine would have to invent an ID
        self._send_soon(context_id, dimse.response_for(command, status))

    # --------------------------------------------------------------- failure

    def _on_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for task in self._handler_tasks:
            task.cancel()
        detail = f": {exc}" if exc else ""
        self._fail_all(AssociationAborted(f"the connection closed{detail}"))

    def _abort(self, exc: BaseException) -> None:
        """Fail everything with ``exc``, send A-ABORT, close the transport."""
        self._fail_all(exc)
        self._conn.abort(now=self._loop.time())
        self._protocol.flush()
        self._protocol.close(grace=ABORT_GRACE)

    def _fail_all(self, exc: BaseException) -> None:
        """The association is over: remember why and fail every waiter with it."""
        if self._error is None:
            self._error = exc
        exc = self._error
        if not self._established.done():
            self._established.set_exception(exc)
            self._established.exception()  # retrieved: associate() re-raises it
        if self._release_done is not None and not self._release_done.done():
            self._release_done.set_exception(exc)
            self._release_done.exception()  # retrieved: release() re-raises it
        pending, self._pending = self._pending, {}
        for op in pending.values():
            op.fail(exc)
        self._wake_slots(all_waiters=True)
        self._wake_idle()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _wake_slots(self, all_waiters: bool = False) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not all_waiters:
                    return

    def _wake_idle(self) -> None:
        if self._stream_done is not None:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        # with nothing outstanding, every slot waiter may go (no lost wake-ups)
        self._wake_slots(all_waiters=True)


def _orphan(op: _Op) -> None:
    """The caller will never see this operation's future: consume its outcome, so
    that its failure is not also logged as "exception was never retrieved"."""
    if isinstance(op, _Single):
        op.future.add_done_callback(_consume)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _handler_status(result: object) -> int:
    """A handler's answer as a status: an int, or anything with a ``Status``."""
    status = getattr(result, "Status", result)
    if isinstance(status, int) and 0 <= status <= 0xFFFF:
        return status
    log.error("handler returned %r, not a status", result)
    return int(dimse.Status.HANDLER_STATUS_INVALID)
