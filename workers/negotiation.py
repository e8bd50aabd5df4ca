"""A-ASSOCIATE on the acceptor's side: admission, the extended negotiation
handlers (user identity, asynchronous operations window, SOP class extended and
common extended negotiation), the answer, and the presentation contexts as handlers
see them.

Negotiation never blocks the event loop: when no item needs a handler and nobody
else is asked for admission, the request is answered at once; otherwise a step runs
(:mod:`workers.handlers`), bounded as a whole by ``acse_timeout`` (a transient
A-ASSOCIATE-RJ then), and an answer that comes later is ignored.

It is one part of :class:`workers.association.AssociationProtocol` (a mixin: it
holds no state of its own; the attributes and methods it uses are declared below).
Its lines go to the association's logger, ``workers.association``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from . import events as evt
from .engine import acse
from .engine import pdu as p
from .engine.fsm import State
from .handlers import Step, resolve
from .session import ContextInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import WorkerConfig
    from .engine.connection import Connection
    from .engine.primitives import AssociateIndication
    from .handlers import Binding, HandlerRegistry
    from .session import AcceptorServer, Association

__all__ = ["Negotiation"]

log = logging.getLogger("workers.association")


class Negotiation:
    """The A-ASSOCIATE-RQ handling of :class:`~workers.association.AssociationProtocol`."""

    conn: Connection
    loop: asyncio.AbstractEventLoop
    config: WorkerConfig
    server: AcceptorServer[Any]
    assoc: Association
    registry: HandlerRegistry
    _acse_timer: asyncio.TimerHandle | None
    _window: int
    _lost: bool

    if TYPE_CHECKING:
        # provided by the other parts of AssociationProtocol
        def _emit(self, event: evt.NotificationEvent, attrs: dict[str, Any]) -> None: ...

        def _start(
            self, step: Step[Any], done: Callable[[Any, BaseException | None], None]
        ) -> None: ...

        def _run(self) -> None: ...

        def inline(self, binding: Binding) -> bool: ...

        def _start_idle_timer(self) -> None: ...

        def _rejected(self, answer: p.AssociateRJ) -> None: ...

        def _contexts_answered(self, answer: p.AssociateAC) -> None: ...

        def _audit_user_refused(self, identity: p.UserIdentityRQ) -> None: ...

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
