"""The asyncio side of one requestor connection: the requestor's engine bridge.

:class:`EngineProtocol` is the requestor's :class:`~workers.bridge.EngineBridge`
(the one bridge from bytes to the engine, shared with the acceptor): the event loop
reads straight into the engine's buffer; after each input the protocol pulls every
indication with ``next_event`` and hands it to its owner, then writes whatever the
engine queued (one ``writelines`` for all queued PDUs, so that a command PDU and a
small data-set PDU leave in one system call), closes the transport when the engine
wants it closed, and re-arms the engine's one timer (ARTIM) with ``loop.time()`` as
the engine's clock. It works under uvloop and the default loop alike.

Writing is flow controlled: ``pause_writing`` / ``resume_writing`` drive :meth:`drain`,
so a sender awaiting it keeps at most the transport's high-water mark queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from workers.bridge import EngineBridge
from workers.engine.connection import Connection
from workers.engine.primitives import Indication

__all__ = ["WRITE_HIGH_WATER", "EngineProtocol"]

log = logging.getLogger(__name__)

#: Transport write buffer high-water mark. Large enough that a window of small C-STOREs
#: never pauses on it, small enough that a streamed file stays a few MiB in memory.
#: The low-water mark is the transport's default, a quarter of it.
WRITE_HIGH_WATER = 2 * 1024 * 1024

#: After a local abort, how long the transport may take to flush the A-ABORT PDU
#: before it is torn down without flushing (a peer that stopped reading).
ABORT_GRACE = 2.0


class EngineProtocol(EngineBridge):
    """Feeds a :class:`Connection` from a transport and writes what it queues.

    ``on_event`` receives every indication; ``on_lost`` is called once, after the
    transport closed and the engine's last indications were delivered. Exceptions
    raised by ``on_event`` are logged and abort the association: a bug in the owner
    must not kill the event loop's callback or leave the peer hanging.
    """

    def __init__(
        self,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[Indication], None],
        on_lost: Callable[[Exception | None], None],
    ) -> None:
        super().__init__(conn, loop)
        self.closed = False  # transport.close() called or connection lost
        self.lost = False
        self.paused = False
        self._on_event = on_event
        self._on_lost = on_lost
        self._drain_waiters: list[asyncio.Future[None]] = []

    # ------------------------------------------------------------- asyncio API

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.adopt_transport(transport)  # TCP_NODELAY (and no delayed-ACK waits)
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.conn.connection_made(self.loop.time())
        self.pump()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.lost = True
        self.engine_lost()
        self.pump()
        self._wake_drainers(ConnectionError("the connection is closed"))
        self._on_lost(exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_drainers(None)

    # ------------------------------------------------------- the bridge's hooks

    def handle_indication(self, event: Indication) -> None:
        self._on_event(event)

    def indication_failed(self) -> None:
        # One boundary for owner bugs: log, abort, keep the loop alive.
        log.exception("requestor failed handling an indication; aborting")
        with contextlib.suppress(Exception):
            self.conn.abort(now=self.loop.time())
        self.flush()
        self.close()

    def after_pump(self) -> None:
        self.flush()

    def writable(self) -> bool:
        return not self.closed

    # -------------------------------------------------------------- for owners

    def flush(self) -> None:
        """Write what the engine queued; honour wants_close and the engine's timer."""
        self.write_queued()
        if self.conn.wants_close and not self.closed:
            self.close()
        self.sync_timer()

    def close(self, grace: float | None = None) -> None:
        """Close the transport once written; with ``grace``, tear it down after that long
        if the peer does not take the last bytes."""
        if self.closed or self.transport is None:
            self.closed = True
            return
        self.closed = True
        self.transport.close()
        if grace is not None:
            self.loop.call_later(grace, self._force_close)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark."""
        if not self.paused:
            return
        if self.lost:
            raise ConnectionError("the connection is closed")
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._drain_waiters:
                self._drain_waiters.remove(waiter)

    # ---------------------------------------------------------------- internal

    def _force_close(self) -> None:
        if not self.lost and self.transport is not None:
            self.transport.abort()

    def _wake_drainers(self, exc: Exception | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
