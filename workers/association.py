"""The asyncio side of one association: socket bytes <-> engine <-> services and handlers.

Theory of operation
-------------------
:class:`AssociationProtocol` is the acceptor's :class:`~workers.bridge.EngineBridge`
over a :class:`~workers.engine.connection.Connection` (the uvicorn pattern): the
event loop receives straight into the engine's buffer, :meth:`_run` pulls
indications out of the engine and dispatches them, and whatever the engine queued is
written at once, one buffer per PDU.

This module holds the association's state, its indications and its operations; the
rest of the protocol is in parts, one responsibility each: the A-ASSOCIATE
negotiation (:mod:`workers.negotiation`), the C-STORE path (:mod:`workers.storing`),
the network timer (:mod:`workers.timeouts`), the log lines and audit trail
(:mod:`workers.trail`). Services see it only through
:class:`~workers.session.AssociationPort`.

Indications never wait for handlers: a DIMSE request starts an operation
(:class:`Operation`) that runs synchronously when it can (the built-in C-ECHO and
C-STORE with fsync off do) and in a task when a handler or an fsync has to be
awaited. Parsing goes on meanwhile, so the peer's responses to our sub-operations
(C-GET), a C-CANCEL, an A-ABORT or an A-RELEASE-RQ are seen while an operation runs.
At most ``window`` requests may be outstanding, the negotiated asynchronous
operations window (1 unless negotiated); a peer that sends more is aborted. A request
whose Message ID is that of one still outstanding is not served: it is answered with
the Duplicate Invocation status (PS3.7 C.5, 0210H).

The built-in C-STORE (no user handler bound to EVT_C_STORE) streams each data-set
fragment from the engine's receive buffer into a temp file
(:mod:`workers.storage.store`): no copy in Python, no pydicom. The response is sent
only after the instance is committed (fsynced when the policy says so, in the I/O
thread pool) and renamed into place.

Backpressure: when the engine holds more than ``read_high_water`` unparsed bytes,
reading pauses until it drains. TCP_QUICKACK is re-armed on the first read after
each of our writes (workers/bridge.py) so that a sender that left Nagle's algorithm
on is not held back by our delayed ACKs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import events as evt
from .activity import Activity, abort_names
from .bridge import EngineBridge
from .engine import dimse
from .engine import pdu as p
from .engine.connection import Connection, Role
from .engine.fsm import State
from .engine.primitives import (
    Aborted,
    AssociateIndication,
    AssociateRejected,
    CommandReceived,
    DataSetReceived,
    PDUReceived,
    PDUSent,
    Released,
    ReleaseRequested,
    StateChanged,
)
from .handlers import Step, drive, notify
from .negotiation import Negotiation
from .session import (
    NULL_REPORTER,
    AcceptorServer,
    Association,
    ContextInfo,
    Operation,
    Reporter,
    ServiceUser,
    Spool,
    Telemetry,
)
from .session import discard as _discard
from .storing import STATUS_OUT_OF_RESOURCES, StorePath
from .timeouts import NetworkTimer
from .trail import AssociationTrail

if TYPE_CHECKING:
    from .handlers import Binding

__all__ = [
    "AcceptorServer",
    "Association",
    "AssociationProtocol",
    "ContextInfo",
    "Operation",
    "ServiceUser",
    "Spool",
    "Telemetry",
]

log = logging.getLogger("workers.association")


class AssociationProtocol(Negotiation, StorePath, NetworkTimer, AssociationTrail, EngineBridge):
    """One transport connection served as a DICOM association acceptor."""

    quickack = True

    def __init__(self, server: AcceptorServer[AssociationProtocol]) -> None:
        super().__init__(Connection(Role.ACCEPTOR, server.engine_config), server.loop)
        self.server = server
        self.config = server.config
        self.registry = server.registry  # Association.bind() gives it one of its own
        telemetry = server.telemetry
        #: the one path to the metrics (workers.session.Reporter)
        self.reporter: Reporter[AssociationProtocol] = (
            NULL_REPORTER if telemetry is None else telemetry
        )
        self.assoc = Association(self, self.registry)
        #: the acceptor's name for this connection (handed over by the supervisor)
        self.connection_id: int | None = None
        #: the client's address from a PROXY header (given with the hand-off): it,
        #: not the socket's peer (the load balancer), is the requestor's address
        self.peer_address: tuple[str, int] | None = None
        self._reading_paused = False
        self._closing = False
        self._lost = False
        self._idle: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._receiving: Operation | None = None  # the request whose data set is arriving
        self._outstanding: dict[int, Operation] = {}
        self._window = 1
        self._release_pending = False
        self._idle_grace_rx: float | None = None
        #: (time, bytes received, messages received) where the rate window starts
        self._rate_mark: tuple[float, int, int] | None = None
        self._cancelled: set[int] = set()
        self._awaiting: dict[int, asyncio.Future[tuple[dimse.Command, bytes | None]]] = {}
        self._awaiting_data: tuple[int, dimse.Command] | None = None
        #: a duplicate invocation whose (discarded) data set is arriving
        self._duplicate: tuple[int, dimse.Command] | None = None
        self._next_message_id = 0
        self._acse_timer: asyncio.TimerHandle | None = None
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._trace_data = False
        #: what the association did, for its log line and audit message
        self.activity = Activity(0.0)
        self.refresh_tracing()

    # ------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.adopt_transport(transport)
        peer = self.peer_address or transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.assoc.requestor.address, self.assoc.requestor.port = str(peer[0]), int(peer[1])
        self.assoc.acceptor.address, self.assoc.acceptor.port = str(local[0]), int(local[1])
        self.assoc.acceptor.ae_title = self.config.ae_title
        self.assoc.name = f"{peer[0]}:{peer[1]}"
        now = self.loop.time()
        self._last_rx = now
        self.activity.started = now
        self.conn.connection_made(now)
        self.server.connection_opened(self)
        self._emit(
            evt.EVT_CONN_OPEN,
            {"address": (self.assoc.requestor.address, self.assoc.requestor.port)},
        )
        self.sync_timer()

    def bytes_fed(self, nbytes: int, now: float) -> None:
        self._last_rx = now
        if self._trace_data:
            self._emit(evt.EVT_DATA_RECV, {"data": self.conn.last_received(nbytes)})
        self._run()

    def eof_received(self) -> bool | None:
        return False  # close our side too: a half-closed DICOM association is over

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.release_socket()
        self.engine_lost()
        self._run()
        self._cleanup()
        self._log_activity()
        self._emit(evt.EVT_CONN_CLOSE, {})
        self.server.connection_closed(self)
        self.conn.recycle()

    def pause_writing(self) -> None:
        """The peer reads slower than we answer: operations that produce many
        messages (C-FIND pending responses, C-GET sub-operations) wait in
        :meth:`drain` instead of piling them up in the transport's buffer."""
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain_waiters()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def drain(self) -> asyncio.Future[None] | None:
        """None when the peer keeps up, else a future done when it caught up (or the
        connection is gone): ``yield from resolve(proto.drain())`` in a step."""
        if not self._writing_paused or self._lost:
            return None
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._drain_waiters.append(waiter)
        return waiter

    # ----------------------------------------------------------- the engine

    def refresh_tracing(self) -> None:
        """Ask the engine only for the indications someone listens to."""
        reg = self.registry
        cfg = self.conn.config
        cfg.trace_pdus = reg.has_notification(evt.EVT_PDU_RECV) or reg.has_notification(
            evt.EVT_PDU_SENT
        )
        cfg.trace_transitions = reg.has_notification(evt.EVT_FSM_TRANSITION)
        self._trace_data = reg.has_notification(evt.EVT_DATA_RECV)

    def _run(self) -> None:
        """Pull and dispatch indications until the engine needs more bytes."""
        self.pump()

    def handle_indication(self, event: Any) -> None:
        _DISPATCH[type(event)](self, event)

    def indication_failed(self) -> None:
        log.exception("%s: internal error; aborting the association", self.assoc.name)
        self.abort_association(p.AbortSource.SERVICE_PROVIDER, 0, "internal error", flush=False)

    def after_pump(self) -> None:
        self._flush()
        self._backpressure()
        self.sync_timer()

    def writable(self) -> bool:
        return not self._lost

    def sending(self, out: Sequence[Any]) -> None:
        if self.registry.has_notification(evt.EVT_DATA_SENT):
            self._emit(evt.EVT_DATA_SENT, {"data": b"".join(bytes(x) for x in out)})

    def _flush(self) -> None:
        self.write_queued()
        transport = self.transport
        if self.conn.wants_close and not self._closing and transport is not None:
            self._closing = True
            transport.close()

    def _backpressure(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        buffered = self.conn.buffered
        receiving = self._receiving
        if (
            receiving is not None
            and self.server.store.remote
            and getattr(receiving.writer, "lagging", False)
        ):
            # An object store upload lags behind the peer: hold reading until a part
            # is done (the writer calls _on_sink_drained then).
            buffered = self.config.read_high_water + 1
        if not self._reading_paused and buffered > self.config.read_high_water:
            self._reading_paused = True
            transport.pause_reading()
        elif self._reading_paused and buffered <= self.config.read_high_water // 2:
            self._reading_paused = False
            transport.resume_reading()

    def _on_sink_drained(self) -> None:
        """An object store part finished uploading: maybe resume reading."""
        if not self._lost:
            self._backpressure()

    def abort_association(
        self,
        source: int,
        reason: int,
        detail: str,
        flush: bool = True,
        hard_close: bool = False,
    ) -> None:
        """Send an A-ABORT, report EVT_ABORTED and close the transport."""
        if self._lost or self.conn.state in (State.STA1, State.STA13):
            return
        names = abort_names(source, reason)
        log.info(
            "%s: aborting (source %s, reason %s): %s",
            self.assoc.name,
            names["abort_source"],
            names["abort_reason"],
            detail,
        )
        self.conn.abort(source, reason, now=self.loop.time())
        self._association_ended(aborted=True, source=source, reason=reason, by_peer=False)
        if flush:
            self._flush()
        transport = self.transport
        if transport is not None and not self._closing:
            self._closing = True
            transport.close()
            if hard_close:
                # A stalled peer may not read the A-ABORT: do not wait for it forever.
                self.loop.call_later(1.0, transport.abort)

    # ------------------------------------------------------- emit events

    def _emit(self, event: evt.NotificationEvent, attrs: dict[str, Any]) -> None:
        if self.registry.has_notification(event):
            notify(self.registry, evt.Event(self.assoc, event, attrs))
        self.reporter.record(event, self, attrs)

    # ----------------------------------------------------------- indications

    def _on_command(self, ev: CommandReceived) -> None:
        cmd = ev.command
        self.reporter.dimse(0, cmd.CommandField, None if cmd.is_request else cmd.Status)
        if self.registry.has_notification(evt.EVT_DIMSE_RECV):
            self._emit(evt.EVT_DIMSE_RECV, {"message": evt.DimseMessage.of(cmd)})
        cf = cmd.CommandField
        if not cmd.is_request:
            self._on_response(ev)
            return
        if cf == dimse.CommandField.C_CANCEL_RQ:
            if cmd.MessageIDBeingRespondedTo is not None:
                self._cancelled.add(cmd.MessageIDBeingRespondedTo)
            return
        if len(self._outstanding) >= self._window:
            self.abort_association(
                p.AbortSource.SERVICE_PROVIDER,
                p.AbortReason.UNEXPECTED_PDU,
                f"request beyond the asynchronous operations window of {self._window}",
            )
            return
        if (cmd.MessageID or 0) in self._outstanding:
            self._duplicate_invocation(ev.context_id, cmd)
            return
        # perf_counter, not the loop's clock: uvloop's loop.time() counts whole
        # milliseconds, and a C-STORE answered within one would be recorded as 0 s.
        op = Operation(ev.context_id, cmd, time.perf_counter())
        self._outstanding[op.message_id] = op
        if cf == dimse.CommandField.C_STORE_RQ:
            self._begin_store(op)
        if cmd.has_dataset:
            self._receiving = op
            return
        self._dispatch_operation(op)

    def _duplicate_invocation(self, context_id: int, cmd: dimse.Command) -> None:
        """A request reusing the Message ID of an outstanding one (PS3.7 C.5: "the
        Message ID specified is allocated to another notification or operation").

        It is not served (serving it would lose track of the first one, and of the
        asynchronous operations window): its data set, if any, is discarded as it
        arrives, then it is answered with Duplicate Invocation (0210H). The first
        request goes on and gets its own response.
        """
        log.warning(
            "%s: %s reuses Message ID %d of an outstanding request: Duplicate Invocation",
            self.assoc.name,
            _label(cmd),
            cmd.MessageID or 0,
        )
        if cmd.has_dataset:
            self.conn.set_dataset_sink(_discard)
            self._duplicate = (context_id, cmd)
            return
        self._answer_duplicate(context_id, cmd)

    def _answer_duplicate(self, context_id: int, cmd: dimse.Command) -> None:
        try:
            self.send(context_id, dimse.response_for(cmd, dimse.Status.DUPLICATE_INVOCATION))
        except ConnectionError:
            pass  # the association is gone: nobody to answer
        except dimse.DIMSEError:
            pass  # not a request that has a response

    def _on_dataset(self, ev: DataSetReceived) -> None:
        if self._duplicate is not None:
            context_id, cmd = self._duplicate
            self._duplicate = None
            self._answer_duplicate(context_id, cmd)
            return
        if self._awaiting_data is not None:
            message_id, command = self._awaiting_data
            self._awaiting_data = None
            future = self._awaiting.pop(message_id, None)
            if future is not None and not future.done():
                future.set_result((command, ev.data))
            return
        op = self._receiving
        self._receiving = None
        if op is None:
            return
        op.data = ev.data
        if ev.data:
            # The engine counted the data set while it arrived; it stays counted while
            # a handler has it (given back in _operation_done).
            op.held = len(ev.data)
            self.server.memory_budget.hold(op.held)
        if op.spool is not None and op.spool.error is not None and op.status is None:
            log.error("%s: cannot spool C-STORE data set: %s", self.assoc.name, op.spool.error)
            op.status = STATUS_OUT_OF_RESOURCES
        self._dispatch_operation(op)

    def _on_release(self, ev: ReleaseRequested) -> None:
        self._duplicate = None  # its data set will never complete: nothing to answer
        receiving = self._receiving
        if receiving is not None:
            # A release in the middle of a data set: that request can never complete
            # (PS3.7 9.3.1.1), so it is abandoned, its partial data dropped.
            log.warning(
                "%s: A-RELEASE-RQ before the data set of message %d was complete",
                self.assoc.name,
                receiving.message_id,
            )
            self._receiving = None
            if receiving.writer is not None:
                receiving.writer.discard()
            if receiving.spool is not None:
                receiving.spool.close()
            self._outstanding.pop(receiving.message_id, None)
        if self._outstanding:
            self._release_pending = True  # answer once the outstanding requests are done
            return
        self._release()

    def _release(self) -> None:
        self._release_pending = False
        if self.conn.state in (State.STA8, State.STA9, State.STA12):
            self.conn.release_response(self.loop.time())
            self.assoc.is_released = True
            self._association_ended(aborted=False)
            self._emit(evt.EVT_RELEASED, {})

    def _on_released(self, ev: Released) -> None:
        self.assoc.is_released = True
        self._emit(evt.EVT_RELEASED, {})

    def _on_aborted(self, ev: Aborted) -> None:
        names = abort_names(ev.source, ev.reason)
        if ev.by_peer:
            log.info(
                "%s: aborted by the peer (source %s, reason %s): %s",
                self.assoc.name,
                names["abort_source"],
                names["abort_reason"],
                ev.detail,
            )
        else:
            log.warning(
                "%s: protocol error, A-ABORT sent (source %s, reason %s): %s",
                self.assoc.name,
                names["abort_source"],
                names["abort_reason"],
                ev.detail,
            )
        self._association_ended(
            aborted=True, source=ev.source, reason=ev.reason, by_peer=ev.by_peer
        )

    def _on_rejected(self, ev: AssociateRejected) -> None:
        self.assoc.is_rejected = True
        log.info("%s: rejected by the service provider: %r", self.assoc.name, ev.response)
        self._emit(evt.EVT_REJECTED, {"response": ev.response})

    def _on_pdu_received(self, ev: PDUReceived) -> None:
        self._emit(evt.EVT_PDU_RECV, {"pdu": ev.pdu, "pdu_type": ev.pdu_type, "length": ev.length})

    def _on_pdu_sent(self, ev: PDUSent) -> None:
        self._emit(evt.EVT_PDU_SENT, {"pdu": ev.pdu, "pdu_type": ev.pdu_type, "length": ev.length})

    def _on_state_changed(self, ev: StateChanged) -> None:
        self._emit(
            evt.EVT_FSM_TRANSITION,
            {
                "current_state": f"Sta{ev.previous.value}",
                "fsm_event": f"Evt{ev.event.value}",
                "action": ev.action.value,
                "next_state": f"Sta{ev.current.value}",
            },
        )

    def _association_ended(
        self,
        aborted: bool,
        source: int | None = None,
        reason: int | None = None,
        by_peer: bool = False,
    ) -> None:
        self.assoc.is_established = False  # as the contract's Association says after it
        activity = self.activity
        if activity.outcome in ("closed", "established"):
            if aborted:
                activity.outcome = "aborted"
                activity.initiator = (
                    "local" if not by_peer else "peer" if source is not None else "transport"
                )
                activity.aborted = abort_names(source, reason)
            else:
                activity.outcome = "released"
        if aborted and not self.assoc.is_aborted:
            self.assoc.is_aborted = True
            self._emit(evt.EVT_ABORTED, {"source": source, "reason": reason, "by_peer": by_peer})
        # Free the association's slot now: after an A-ABORT or A-RELEASE-RP the
        # connection may linger in Sta13 until the peer closes or ARTIM expires, and
        # must not count against max_associations meanwhile.
        self.server.association_ended(self)
        self._drop_operations()

    def _drop_operations(self) -> None:
        for op in self._outstanding.values():
            if op.writer is not None and op is self._receiving:
                op.writer.discard()  # half-received: never stored
            if op.spool is not None and op is self._receiving:
                op.spool.close()
        self._receiving = None
        for future in self._awaiting.values():
            if not future.done():
                future.set_exception(ConnectionError("association ended"))
        self._awaiting.clear()
        self._wake_drain_waiters()  # their next send fails with ConnectionError

    def _cleanup(self) -> None:
        # Running operations are not cancelled: a user handler that got a complete
        # data set finishes its work (its response then goes nowhere), bounded by
        # handler_timeout; AssociationServer.close() cancels what is left.
        self.cancel_timer()
        for handle in (self._idle, self._acse_timer):
            if handle is not None:
                handle.cancel()
        self._idle = self._acse_timer = None
        self._drop_operations()

    # ------------------------------------------------------- operations

    def inline(self, binding: Binding) -> bool:
        """Whether ``binding`` runs on the loop (bound inline) rather than in the pool."""
        return binding[0] in self.server.registry.inline

    def _start(
        self,
        step: Step[Any],
        done: Callable[[Any, BaseException | None], None],
    ) -> None:
        """Run ``step``; ``done`` is called when it ends, synchronously if it can."""
        synchronous = [True]

        def finish(result: Any, error: BaseException | None) -> None:
            try:
                done(result, error)
            except Exception:
                log.exception("%s: internal error after an operation", self.assoc.name)
                self.abort_association(p.AbortSource.SERVICE_PROVIDER, 0, "internal error")
            if not synchronous[0] and not self._lost:
                self._run()

        if not drive(step, finish, self.server.track):
            synchronous[0] = False

    def _operation_done(self, op: Operation, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, ConnectionError | asyncio.CancelledError):
            log.error("%s: %s failed: %r", self.assoc.name, _label(op.command), error)
        self._outstanding.pop(op.message_id, None)
        self._cancelled.discard(op.message_id)
        if op.held:
            self.server.memory_budget.give_back(op.held)
            op.held = 0
        if op.spool is not None:
            op.spool.close()
        if self._release_pending and not self._outstanding:
            self._release()

    def is_cancelled(self, message_id: int) -> bool:
        return message_id in self._cancelled

    def context_info(self, context_id: int) -> ContextInfo:
        found = self.assoc.context(context_id)
        if found is None:  # the engine only delivers messages on accepted contexts
            raise LookupError(context_id)
        return found

    @property
    def can_send(self) -> bool:
        """False once the association is over: long operations (C-FIND matches,
        C-GET/C-MOVE sub-operations) stop instead of producing answers for no one."""
        return not self._lost and self.conn.is_established

    def send(self, context_id: int, command: dimse.Command, dataset: bytes | None = None) -> None:
        """Send a DIMSE message now (responses, sub-operation requests)."""
        if self._lost or not self.conn.is_established:
            raise ConnectionError("association is no longer established")
        self.conn.send_message(context_id, command, dataset)
        self.reporter.dimse(1, command.CommandField, None if command.is_request else command.Status)
        if self.registry.has_notification(evt.EVT_DIMSE_SENT):
            self._emit(evt.EVT_DIMSE_SENT, {"message": evt.DimseMessage.of(command)})
        self._flush()

    def send_store_response(self, op: Operation, status: int) -> None:
        """Send the C-STORE-RSP to ``op`` with ``status`` and no ErrorComment: what
        ``send(op.context_id, dimse.response_for(op.command, status))`` sends, encoded
        straight from the request's values (the Command is only built for
        EVT_DIMSE_SENT handlers)."""
        cmd = op.command
        cls, inst = cmd.AffectedSOPClassUID, cmd.AffectedSOPInstanceUID
        if cls is None or inst is None:  # not a valid request: the general path
            self.send(op.context_id, dimse.response_for(cmd, status))
            return
        if self._lost or not self.conn.is_established:
            raise ConnectionError("association is no longer established")
        self.conn.send_store_response(op.context_id, cmd.MessageID or 0, cls, inst, status)
        self.reporter.dimse(1, dimse.CommandField.C_STORE_RSP, status)
        if self.registry.has_notification(evt.EVT_DIMSE_SENT):
            self._emit(
                evt.EVT_DIMSE_SENT,
                {"message": evt.DimseMessage.of(dimse.response_for(cmd, status))},
            )
        self._flush()

    def request(
        self, context_id: int, command: dimse.Command, dataset: bytes | None = None
    ) -> asyncio.Future[tuple[dimse.Command, bytes | None]]:
        """Send a request of our own (a C-GET sub-operation) and await its response."""
        self._next_message_id = self._next_message_id % 0xFFFF + 1
        command.MessageID = self._next_message_id
        future: asyncio.Future[tuple[dimse.Command, bytes | None]] = self.loop.create_future()
        self._awaiting[command.MessageID] = future
        self.send(context_id, command, dataset)
        return future

    def _on_response(self, ev: CommandReceived) -> None:
        cmd = ev.command
        message_id = cmd.MessageIDBeingRespondedTo or 0
        if cmd.has_dataset:
            self._awaiting_data = (message_id, cmd)
            return
        future = self._awaiting.pop(message_id, None)
        if future is None:
            log.warning("%s: unexpected response to message %d", self.assoc.name, message_id)
            return
        if not future.done():
            future.set_result((cmd, None))

    def handler_failed(self, event: evt.InterventionEvent) -> None:
        """A user handler raised, timed out or answered something unusable."""
        self.reporter.handler_error(event.name)


def _label(cmd: dimse.Command) -> str:
    try:
        return dimse.CommandField(cmd.CommandField).name
    except ValueError:
        return f"command 0x{cmd.CommandField:04x}"


_DISPATCH: dict[type, Callable[[AssociationProtocol, Any], None]] = {
    AssociateIndication: AssociationProtocol._on_associate,
    CommandReceived: AssociationProtocol._on_command,
    DataSetReceived: AssociationProtocol._on_dataset,
    ReleaseRequested: AssociationProtocol._on_release,
    Released: AssociationProtocol._on_released,
    Aborted: AssociationProtocol._on_aborted,
    AssociateRejected: AssociationProtocol._on_rejected,
    PDUReceived: AssociationProtocol._on_pdu_received,
    PDUSent: AssociationProtocol._on_pdu_sent,
    StateChanged: AssociationProtocol._on_state_changed,
}
