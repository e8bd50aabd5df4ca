"""The refusing acceptor: answers one A-ASSOCIATE-RQ with A-ASSOCIATE-RJ.

The main process refuses some peers itself (limits, ``[ae-sources]``; see
:mod:`receiver.acceptor`). It does so with the same engine and the same bytes-to-engine
bridge (:class:`workers.bridge.EngineBridge`) as the workers, so the peer gets a protocol
answer, logged in one line and counted, and a peer that never sends its request is closed
by the engine's ARTIM timer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from workers.activity import log_fields, reject_names
from workers.bridge import EngineBridge
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, Role
from workers.engine.fsm import State
from workers.engine.primitives import AssociateIndication, Indication

from .proxy_gate import Peer

# One logger for the main process (see receiver.pool).
log = logging.getLogger("receiver.supervisor")


class Rejector(EngineBridge):
    """Reads one A-ASSOCIATE-RQ and answers it with ``rj``; logs one line (peer,
    AE titles, ``why``) and counts the RJ in ``telemetry`` (when metrics are on).

    The rejecting acceptor's :class:`~workers.bridge.EngineBridge` (the one bridge from
    bytes to the engine, shared with the workers and the requestor): the engine decides
    what is sent and when; its ARTIM (``timeout``) closes a peer that sends no
    A-ASSOCIATE-RQ, or that does not close after the A-ASSOCIATE-RJ. The transport is
    closed as soon as the A-ASSOCIATE-RJ is written (Sta13): nothing more is awaited
    from a refused peer."""

    def __init__(
        self,
        rj: p.AssociateRJ,
        timeout: float,
        why: str | None = None,
        telemetry: Any = None,
        on_close: Callable[[], None] | None = None,
        peer: Peer | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        config = EngineConfig(max_control_pdu_length=256 * 1024, artim_timeout=timeout)
        super().__init__(Connection(Role.ACCEPTOR, config), loop or asyncio.get_running_loop())
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
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.adopt_transport(transport)
        peer = self.proxied or transport.get_extra_info("peername")
        if peer:
            self.peer = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        self.conn.connection_made(self.loop.time())
        self.pump()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.engine_lost()
        self.pump()
        self.release_socket()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        if not self.answered:
            log.warning(
                "refused connection from %s (%s): no A-ASSOCIATE-RQ came", self.peer, self.why
            )

    # ------------------------------------------------------- the bridge's hooks

    def handle_indication(self, event: Indication) -> None:
        if isinstance(event, AssociateIndication) and not self.answered:
            self._answer(str(event.request.calling_ae), str(event.request.called_ae))

    def indication_failed(self) -> None:
        log.exception("rejecting acceptor failed on %s; aborting", self.peer)
        try:
            self.conn.abort(now=self.loop.time())
        except Exception:  # the engine may have ended already: close regardless
            pass
        self._close()

    def after_pump(self) -> None:
        self.write_queued()
        # Sta13: the A-ASSOCIATE-RJ is queued in the transport, which flushes it
        # before it closes.
        if self.conn.wants_close or self.conn.state is State.STA13:
            self._close()
        self.sync_timer()

    def writable(self) -> bool:
        return not self.closed and not self._engine_gone

    # ------------------------------------------------------------- internal

    def _answer(self, calling: str, called: str) -> None:
        self.answered = True
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
        self.conn.reject(rj, self.loop.time())
        if self.telemetry is not None:
            self.telemetry.association_rejected(
                calling, called, int(rj.result), int(rj.source), int(rj.reason)
            )

    def _close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()
