"""The asyncio side of one association: socket bytes <-> engine <-> services and handlers.

Theory of operation
-------------------
:class:`AssociationProtocol` is a thin ``asyncio.BufferedProtocol`` over a
:class:`~workers.engine.connection.Connection` (the uvicorn pattern): the event loop
receives straight into the engine's buffer, :meth:`_run` pulls indications out of the
engine and dispatches them, and whatever the engine queued is written at once, one
buffer per PDU.

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
reading pauses until it drains. TCP_QUICKACK is re-armed after each read so that a
sender that left Nagle's algorithm on is not held back by our delayed ACKs
(DESIGN principle 5).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import events as evt
from . import services
from .activity import Activity, abort_names, context_result_name, log_fields, reject_names
from .bridge import EngineBridge
from .engine import acse, dimse
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
from .handlers import Step, drive, notify, resolve
from .session import (
    AcceptorServer,
    Association,
    ContextInfo,
    Operation,
    ServiceUser,
    Spool,
    Telemetry,
)
from .session import discard as _discard
from .storage.store import StoreResult
from .storage.uids import UnsafeUID

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

_STATUS_PROCESSING_FAILURE = 0x0110
_STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
_STATUS_INVALID_OBJECT_INSTANCE = 0x0117
_STATUS_CANNOT_UNDERSTAND = 0xC000
_STATUS_OUT_OF_RESOURCES = 0xA700


class AssociationProtocol(EngineBridge):
    """One transport connection served as a DICOM association acceptor."""

    quickack = True

    def __init__(self, server: AcceptorServer[AssociationProtocol]) -> None:
        super().__init__(Connection(Role.ACCEPTOR, server.engine_config), server.loop)
        self.server = server
        self.config = server.config
        self.registry = server.registry  # Association.bind() gives it one of its own
        self.assoc = Association(self, self.registry)
        #: the acceptor's name for this connection (handed over by the supervisor)
        self.connection_id: int | None = None
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
        peer = transport.get_extra_info("peername") or ("", 0)
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

    def _start_idle_timer(self) -> None:
        timeout = self.config.network_timeout
        if timeout:
            # Established now: time spent deciding (user identity handlers ...) was
            # ours, not the peer's silence.
            self._last_rx = self.loop.time()
            self._idle = self.loop.call_at(self._last_rx + timeout, self._on_idle)

    def _on_idle(self) -> None:
        """The network timer: no byte at all for ``network_timeout`` aborts, and so
        does a peer that, in the middle of a PDU or a message, sends fewer than
        ``min_receive_rate`` bytes a second over a ``network_timeout`` window (one
        byte a second would otherwise hold the association open for ever)."""
        self._idle = None
        timeout = self.config.network_timeout
        if not timeout or self._lost or not self.conn.is_established:
            return
        now = self.loop.time()
        # We are the slow side when a handler or an fsync is running, or when we paused
        # reading. A request whose data set is still arriving is not ours to wait for:
        # a peer that stalls halfway through an instance must time out too.
        busy = self._reading_paused or any(
            op is not self._receiving for op in self._outstanding.values()
        )
        if busy:
            self._rate_mark = None
            self._idle_grace_rx = None
            self._idle = self.loop.call_at(max(self._last_rx + timeout, now + 1.0), self._on_idle)
            return
        if now >= self._last_rx + timeout:
            if self._idle_grace_rx != self._last_rx:
                # One short grace before blaming the peer: after our own loop stalled,
                # the timer can run before the reads that were waiting meanwhile.
                self._idle_grace_rx = self._last_rx
                self._idle = self.loop.call_at(now + 0.25, self._on_idle)
                return
            log.warning(
                "%s: no data from the peer for %.0f s; aborting",
                self.assoc.name,
                now - self._last_rx,
            )
            self.abort_association(
                p.AbortSource.SERVICE_PROVIDER,
                0,
                f"network timeout ({timeout:g} s)",
                hard_close=True,
            )
            return
        self._idle_grace_rx = None
        next_check = self._last_rx + timeout
        rate = self.config.min_receive_rate
        conn = self.conn
        if rate and conn.mid_message:
            received = conn.bytes_received
            mark = self._rate_mark
            if mark is None or mark[2] != conn.messages_received:
                # Judged only over a window inside one message: one that saw a message
                # complete may hold an idle gap between two.
                self._rate_mark = mark = (now, received, conn.messages_received)
            elif now - mark[0] >= timeout:
                got = (received - mark[1]) / (now - mark[0])
                if got < rate:
                    log.warning(
                        "%s: the peer sends %.1f bytes/s in the middle of a message "
                        "(minimum %d); aborting",
                        self.assoc.name,
                        got,
                        rate,
                    )
                    self.abort_association(
                        p.AbortSource.SERVICE_PROVIDER,
                        0,
                        f"receive rate {got:.1f} bytes/s below {rate}",
                        hard_close=True,
                    )
                    return
                self._rate_mark = mark = (now, received, mark[2])
            next_check = min(next_check, mark[0] + timeout)
        else:
            self._rate_mark = None
        self._idle = self.loop.call_at(max(next_check, now + 0.5), self._on_idle)

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
        telemetry = self.server.telemetry
        if telemetry is not None:
            telemetry.record(event, self, attrs)

    # ----------------------------------------------------------- indications

    def _on_associate(self, ev: AssociateIndication) -> None:
        rq = ev.request
        assoc = self.assoc
        assoc.requestor.ae_title = rq.calling_ae
        ui = rq.user_info
        assoc.requestor.implementation_class_uid = ui.implementation_class_uid
        assoc.requestor.implementation_version_name = ui.implementation_version_name
        assoc.requestor.maximum_length = ui.max_length
        assoc.requestor.user_identity = ui.user_identity_rq
        self._emit(evt.EVT_REQUESTED, {})
        self._emit(evt.EVT_ACSE_RECV, {"primitive": rq})
        refusal = self.server.admission(self, rq)
        if refusal is not None:
            self._answer_association(refusal)
            return
        if (
            ui.user_identity_rq is None
            and self.server.ask_admission is None
            and ui.async_ops is None
            and not ui.sop_class_extended
            and not ui.sop_class_common_extended
        ):
            # No item a handler answers, nobody else to ask: what _negotiate would do,
            # without a step.
            try:
                answer = self.server.negotiations.negotiate(
                    rq, self.server.policy, acse.NO_EXTENDED
                )
            except Exception as exc:
                self._negotiated(None, exc)
            else:
                self._answer_association(answer)
            return
        self._start(self._negotiate(rq), self._negotiated)
        timeout = self.config.acse_timeout
        if self.conn.state is State.STA3 and timeout:
            # Extended negotiation handlers are still deciding: bound the whole answer
            # by acse_timeout (a late answer is ignored by _answer_association).
            self._acse_timer = self.loop.call_later(timeout, self._acse_expired)

    def _acse_expired(self) -> None:
        self._acse_timer = None
        if self.conn.state is not State.STA3 or self._lost:
            return
        log.warning(
            "%s: no answer to the association request within %g s: rejecting",
            self.assoc.name,
            self.config.acse_timeout,
        )
        self._answer_association(
            p.AssociateRJ(
                p.RejectResult.TRANSIENT, p.RejectSource.SERVICE_USER, p.RejectReason.NO_REASON
            )
        )
        self._run()

    def _negotiate(self, rq: p.AssociateRQ) -> Step[p.AssociateAC | p.AssociateRJ]:
        ask = self.server.ask_admission
        if ask is not None:
            refusal = yield from resolve(ask(self, rq))
            if refusal is not None:
                log.warning("%s: refused by the supervisor", self.assoc.name)
                return refusal
        ui = rq.user_info
        caller = self.server.caller
        verified: bool | None = None
        response: bytes | None = None
        if ui.user_identity_rq is not None:
            binding = self.registry.intervention_handler(evt.EVT_USER_ID)
            if binding is not None:
                identity = ui.user_identity_rq
                event = evt.Event(
                    self.assoc,
                    evt.EVT_USER_ID,
                    {
                        "user_id_type": identity.type,
                        "primary_field": identity.primary,
                        "secondary_field": identity.secondary,
                    },
                )
                try:
                    result = yield from resolve(caller.call(binding, event, self.inline(binding)))
                    verified, response = bool(result[0]), result[1]
                except Exception:
                    log.exception("%s: EVT_USER_ID handler failed: rejecting", self.assoc.name)
                    verified, response = False, None
                if not verified and self.server.audit is not None:
                    self._audit_user_refused(identity)
        async_ops = None
        if ui.async_ops is not None:
            async_ops = yield from self._negotiate_async_ops(ui.async_ops)
        sop_extended: tuple[p.SOPClassExtended, ...] = ()
        if ui.sop_class_extended:
            binding = self.registry.intervention_handler(evt.EVT_SOP_EXTENDED)
            if binding is not None:
                app_info = {item.sop_class_uid: item.info for item in ui.sop_class_extended}
                event = evt.Event(self.assoc, evt.EVT_SOP_EXTENDED, {"app_info": app_info})
                try:
                    answer = yield from resolve(caller.call(binding, event, self.inline(binding)))
                    sop_extended = tuple(
                        p.SOPClassExtended(uid, bytes(info))
                        for uid, info in (answer or {}).items()
                        if uid in app_info and info is not None
                    )
                except Exception:
                    log.exception("%s: EVT_SOP_EXTENDED handler failed", self.assoc.name)
        if ui.sop_class_common_extended:
            binding = self.registry.intervention_handler(evt.EVT_SOP_COMMON)
            if binding is not None:
                items = {item.sop_class_uid: item for item in ui.sop_class_common_extended}
                event = evt.Event(self.assoc, evt.EVT_SOP_COMMON, {"items": items})
                try:
                    yield from resolve(caller.call(binding, event, self.inline(binding)))
                except Exception:
                    log.exception("%s: EVT_SOP_COMMON handler failed", self.assoc.name)
        extended = acse.Extended(
            user_identity_verified=verified,
            user_identity_response=response,
            async_ops=async_ops,
            sop_class_extended=sop_extended,
        )
        return self.server.negotiations.negotiate(rq, self.server.policy, extended)

    def _audit_user_refused(self, identity: p.UserIdentityRQ) -> None:
        # Only a user name is worth naming: Kerberos, SAML and JWT primary fields
        # are credentials, and the passcode never goes into an audit message.
        if identity.type in (1, 2):
            user = bytes(identity.primary).decode("utf-8", "replace")
        else:
            user = f"(user identity type {identity.type})"
        calling = str(self.assoc.requestor.ae_title)
        self.server.audit.user_refused(
            self.assoc.requestor.address, user, calling, "user identity not accepted"
        )

    def _negotiate_async_ops(self, proposed: p.AsyncOpsWindow) -> Step[p.AsyncOpsWindow | None]:
        """The asynchronous operations window to answer with (PS3.7 D.3.3.3).

        With a bound EVT_ASYNC_OPS handler its (invoked, performed) is used, bounded by
        configuration; without one, and with ``max_async_ops`` 1, no item is answered
        (the contract's default), which means (1, 1).
        """
        limit = max(1, self.config.max_async_ops)
        binding = self.registry.intervention_handler(evt.EVT_ASYNC_OPS)
        if binding is None:
            if limit == 1:
                return None
            wanted = (proposed.invoked, proposed.performed)
        else:
            event = evt.Event(
                self.assoc,
                evt.EVT_ASYNC_OPS,
                {"invoked": proposed.invoked, "performed": proposed.performed},
            )
            try:
                answer = yield from resolve(
                    self.server.caller.call(binding, event, self.inline(binding))
                )
                wanted = (int(answer[0]), int(answer[1]))
            except Exception:
                log.exception("%s: EVT_ASYNC_OPS handler failed", self.assoc.name)
                return None

        def bound(value: int, asked: int) -> int:
            value = limit if value == 0 else min(value, limit)  # 0 is "unlimited"
            return value if asked == 0 else min(value, asked)

        # PS3.7 D.3.3.3: the AC carries the negotiated values, each no larger than the
        # proposed one (as dcm4che reads it too): invoked is how many requests the
        # requestor may have outstanding with us, performed how many we may invoke.
        return p.AsyncOpsWindow(
            bound(wanted[0], proposed.invoked), bound(wanted[1], proposed.performed)
        )

    def _negotiated(
        self, result: p.AssociateAC | p.AssociateRJ | None, error: BaseException | None
    ) -> None:
        if error is not None or result is None:
            log.error("%s: negotiation failed: %r", self.assoc.name, error)
            result = p.AssociateRJ(
                p.RejectResult.TRANSIENT, p.RejectSource.SERVICE_USER, p.RejectReason.NO_REASON
            )
        self._answer_association(result)

    def _answer_association(self, answer: p.AssociateAC | p.AssociateRJ) -> None:
        if self._acse_timer is not None:
            self._acse_timer.cancel()
            self._acse_timer = None
        if self.conn.state is not State.STA3:
            return  # the peer aborted or left while we were deciding
        assoc = self.assoc
        if isinstance(answer, p.AssociateRJ):
            self.conn.reject(answer, self.loop.time())
            assoc.is_rejected = True
            self._rejected(answer)
            self._emit(evt.EVT_ACSE_SENT, {"primitive": answer})
            self._emit(evt.EVT_REJECTED, {"response": answer})
            return
        self.conn.accept(answer, self.loop.time())
        assoc.is_established = True
        ui = answer.user_info
        if ui.async_ops is not None:
            assoc.async_ops = (ui.async_ops.invoked or 65535, ui.async_ops.performed or 65535)
        # The window we enforce is what the requestor may have outstanding with us: the
        # negotiated Maximum Number Operations Invoked.
        self._window = assoc.async_ops[0]
        roles = {r.sop_class_uid: r for r in ui.roles}
        assoc.accepted_contexts = []
        for ctx in self.conn.contexts.values():
            role = roles.get(ctx.abstract_syntax)
            # Default roles: requestor SCU, acceptor SCP; a granted selection adds ours
            # as SCU when the requestor takes the SCP role (C-GET sub-operations).
            as_scu = bool(role and role.scp_role)
            as_scp = bool(role.scu_role) if role else True
            assoc.accepted_contexts.append(ContextInfo(ctx, as_scu=as_scu, as_scp=as_scp))
        accepted_ids = set(self.conn.contexts)
        if self.conn.request is not None:
            assoc.rejected_contexts = [
                c for c in self.conn.request.contexts if c.id not in accepted_ids
            ]
        self._contexts_answered(answer)
        self._emit(evt.EVT_ACSE_SENT, {"primitive": answer})
        self._emit(evt.EVT_ACCEPTED, {})
        self._emit(evt.EVT_ESTABLISHED, {})
        self._start_idle_timer()
        self.server.association_established(self)

    def _on_command(self, ev: CommandReceived) -> None:
        cmd = ev.command
        telemetry = self.server.telemetry
        if telemetry is not None:
            telemetry.dimse(0, cmd.CommandField, None if cmd.is_request else cmd.Status)
        if self.registry.has_notification(evt.EVT_DIMSE_RECV):
            self._emit(evt.EVT_DIMSE_RECV, {"message": cmd})
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
            op.status = _STATUS_OUT_OF_RESOURCES
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

    def _dispatch_operation(self, op: Operation) -> None:
        writer = op.writer
        server = self.server
        company = 0
        if writer is not None and server.committer is not None:
            company = server.store_company(self, self._last_rx)
            op.company = company
        if (
            writer is not None
            and not server.store.remote
            and (
                server.store.config.fsync == "never"
                or (self._window == 1 and server.commit_seconds < self.config.inline_commit_below)
            )
        ):
            # The built-in C-STORE with a synchronous commit: what services.serve ->
            # builtin_store would do through drive(), without a generator, closures
            # and a list per instance (same order: commit, answer, then done).
            # With fsync too, one operation at a time, while the worker's commits have
            # been quick: handing a commit to the I/O pool costs more than the loop
            # loses while a short fsync blocks it (the loop thread and the pool thread
            # pass the GIL back and forth several times per instance). Measured, 8 KiB,
            # 2 workers, same run: 1 association 251-267 -> 447-577 instances/s; 4
            # associations 856 -> 1656/s, at half the CPU. A worker starts out
            # committing in the pool (AssociationServer.commit_seconds); where fsync is
            # slow the average stays above the bound, so the loop (heartbeats, timers,
            # other associations) is never held up by it, and concurrent instances
            # share their flushes in the group committer (workers/storage/group.py),
            # as do the instances of an asynchronous operations window, always. With
            # quick flushes, grouping the instances of window-1 associations means
            # waiting for each other's next instance, which cost more than the
            # flushes it saved (measured, 8 KiB, 4 senders, 2 workers).
            error: BaseException | None = None
            try:
                result = (
                    writer.commit() if server.committer is None else server.timed_commit(writer)
                )
                services.answer_store(self, op, result)
            except Exception as exc:
                error = exc
            try:
                self._operation_done(op, error)
            except Exception:
                log.exception("%s: internal error after an operation", self.assoc.name)
                self.abort_association(p.AbortSource.SERVICE_PROVIDER, 0, "internal error")
            return
        if op.command.CommandField == dimse.CommandField.C_ECHO_RQ and services.answer_echo(
            self, op
        ):
            self._operation_done(op, None)
            return
        self._start(services.serve(self, op), lambda result, error: self._operation_done(op, error))

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
        telemetry = self.server.telemetry
        if telemetry is not None:
            telemetry.dimse(1, command.CommandField, None if command.is_request else command.Status)
        if self.registry.has_notification(evt.EVT_DIMSE_SENT):
            self._emit(evt.EVT_DIMSE_SENT, {"message": command})
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
        raw = dimse.encode_c_store_rsp(cmd.MessageID or 0, cls, inst, status)
        self.conn.send_command(op.context_id, raw)
        telemetry = self.server.telemetry
        if telemetry is not None:
            telemetry.dimse(1, dimse.CommandField.C_STORE_RSP, status)
        if self.registry.has_notification(evt.EVT_DIMSE_SENT):
            self._emit(evt.EVT_DIMSE_SENT, {"message": dimse.response_for(cmd, status)})
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

    # ---------------------------------------------------------- C-STORE

    def _begin_store(self, op: Operation) -> None:
        """Prepare where the C-STORE data set goes as it arrives (before it does)."""
        cmd = op.command
        ctx = self.conn.contexts[op.context_id]
        problem = dimse.validate_command(cmd)
        if problem is not None:
            log.warning("%s: invalid C-STORE-RQ: %s", self.assoc.name, problem)
            op.status = _STATUS_CANNOT_UNDERSTAND
        elif cmd.AffectedSOPClassUID != ctx.abstract_syntax:
            op.status = _STATUS_SOP_CLASS_NOT_SUPPORTED
        if not cmd.has_dataset:
            return
        if op.status is not None:
            self.conn.set_dataset_sink(_discard)
            return
        if self.registry.intervention_handler(evt.EVT_C_STORE) is None:
            try:
                op.writer = self.server.store.begin(
                    cmd.AffectedSOPClassUID or "",
                    cmd.AffectedSOPInstanceUID or "",
                    ctx.transfer_syntax,
                    self.assoc.requestor.ae_title,
                )
            except UnsafeUID as exc:
                log.warning("%s: refusing C-STORE: %s", self.assoc.name, exc)
                op.status = _STATUS_INVALID_OBJECT_INSTANCE
                self.conn.set_dataset_sink(_discard)
                return
            if hasattr(op.writer, "on_drain"):  # object store: flow control, no direct fd
                op.writer.on_drain = self._on_sink_drained
                self.conn.set_dataset_sink(op.writer.write)
            else:
                self.conn.set_dataset_sink(op.writer.write, op.writer)
        else:
            try:
                op.spool = Spool(self.server.store.incoming_dir)
            except OSError as exc:
                log.error("%s: cannot spool C-STORE data set: %s", self.assoc.name, exc)
                op.status = _STATUS_OUT_OF_RESOURCES
                self.conn.set_dataset_sink(_discard)
                return
            self.conn.set_dataset_sink(op.spool.write)

    def commit_store(self, op: Operation) -> Step[StoreResult]:
        """Commit a built-in store in the I/O pool (it fsyncs); without fsync, or
        when a short fsync costs less than the hand-off (see :meth:`_dispatch_operation`),
        the commit runs inline and never comes here."""
        writer = op.writer
        assert writer is not None
        server = self.server
        committer = server.committer
        if committer is None:
            result = yield self.loop.run_in_executor(server.io_pool, server.timed_commit, writer)
            return result
        # With fsync: in a group with whatever else waits for durability now
        # (workers/storage/group.py); answered once this instance is covered.
        future: asyncio.Future[StoreResult] = self.loop.create_future()
        committer.submit(writer, future, op.company)
        result = yield future
        return result

    def store_done(self, op: Operation, result: Any) -> None:
        """A C-STORE was answered: ``result`` has ``status`` and ``bytes_written``."""
        activity = self.activity
        status = result.status
        # Success (0x0000) and warnings (0x0001, 0xB...) are stored; the rest failed.
        if status == 0 or status == 1 or status & 0xF000 == 0xB000:
            activity.instances += 1
            activity.bytes += result.bytes_written
            if self.server.audit is not None:
                activity.note_instance(
                    op.command.AffectedSOPClassUID or "", getattr(result, "scan", None)
                )
        else:
            activity.failed += 1
        level = self.server.instance_level
        if level is not None:
            self._log_instance(level, op, result)
        telemetry = self.server.telemetry
        if telemetry is not None:
            telemetry.stored(self, op, result, time.perf_counter() - op.started)
        if isinstance(result, StoreResult):
            self.server.instance_stored(self, op, result)

    def handler_failed(self, event: evt.InterventionEvent) -> None:
        """A user handler raised, timed out or answered something unusable."""
        telemetry = self.server.telemetry
        if telemetry is not None:
            telemetry.handler_error(event.name)

    # ------------------------------------------------- logs and audit trail

    def _called_ae(self) -> str:
        request = self.conn.request
        return str(request.called_ae) if request is not None else ""

    def _rejected(self, answer: p.AssociateRJ) -> None:
        """Log an A-ASSOCIATE-RJ we send with its PS3.8 names; a permanent one by
        the service user (who the peer is, not how busy we are) is a Security Alert."""
        assoc = self.assoc
        names = reject_names(answer.result, answer.source, answer.reason)
        activity = self.activity
        activity.outcome = "rejected"
        activity.aborted = names
        calling, called = str(assoc.requestor.ae_title), self._called_ae()
        log_fields(
            log,
            logging.INFO,
            "association-rejected",
            {"peer": assoc.name, "calling_ae": calling, "called_ae": called, **names},
        )
        audit = self.server.audit
        if (
            audit is not None
            and answer.result == p.RejectResult.PERMANENT
            and answer.source == p.RejectSource.SERVICE_USER
        ):
            why = f"association {calling!r} -> {called!r} rejected: {names['reject_reason']}"
            audit.refused(assoc.requestor.address, why, calling)

    def _contexts_answered(self, answer: p.AssociateAC) -> None:
        """Count the contexts of an A-ASSOCIATE-AC; log and count each refused one."""
        activity = self.activity
        activity.outcome = "established"
        proposed = (
            {c.id: c for c in self.conn.request.contexts} if self.conn.request is not None else {}
        )
        telemetry = self.server.telemetry
        for item in answer.contexts:
            if item.result == p.ContextResult.ACCEPTANCE:
                activity.contexts_accepted += 1
                continue
            activity.contexts_rejected += 1
            reason = context_result_name(item.result)
            if telemetry is not None:
                telemetry.context_rejected(reason)
            ctx = proposed.get(item.id)
            log_fields(
                log,
                logging.INFO,
                "context-rejected",
                {
                    "peer": self.assoc.name,
                    "calling_ae": str(self.assoc.requestor.ae_title),
                    "context_id": item.id,
                    "abstract_syntax": ctx.abstract_syntax if ctx else "",
                    "transfer_syntaxes": ",".join(ctx.transfer_syntaxes) if ctx else "",
                    "reason": reason,
                },
            )

    def _log_instance(self, level: int, op: Operation, result: Any) -> None:
        cmd = op.command
        log_fields(
            log,
            level,
            "instance",
            {
                "peer": self.assoc.name,
                "calling_ae": str(self.assoc.requestor.ae_title),
                "sop_class": cmd.AffectedSOPClassUID or "",
                "sop_instance": cmd.AffectedSOPInstanceUID or "",
                "status": f"0x{result.status:04x}",
                "bytes": result.bytes_written,
                "path": getattr(result, "path", None) or "",
            },
        )

    def _log_activity(self) -> None:
        """The association's one line, and its DICOM Instances Transferred message."""
        activity = self.activity
        assoc = self.assoc
        calling, called = str(assoc.requestor.ae_title or ""), self._called_ae()
        fields = activity.fields(assoc.name, calling, called, self.loop.time())
        # A connection that never asked for an association (a port probe, a health
        # check) is worth a line only when debugging.
        level = logging.INFO if activity.outcome != "closed" else logging.DEBUG
        log_fields(log, level, "association", fields)
        audit = self.server.audit
        if audit is not None and activity.studies:
            audit.instances_transferred(
                activity.studies, activity.failed, assoc.requestor.address, calling, called
            )


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
