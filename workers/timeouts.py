"""The acceptor's network timer: an established association whose peer sends
nothing for ``network_timeout`` seconds, or sends fewer than ``min_receive_rate``
bytes a second in the middle of a PDU or a message, is aborted. Time the acceptor
itself is busy (a handler, an fsync, reading paused) never counts against the peer.

It is one part of :class:`workers.association.AssociationProtocol` (a mixin: it
holds no state of its own; the attributes and methods it uses are declared below).
Its lines go to the association's logger, ``workers.association``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .engine import pdu as p

if TYPE_CHECKING:
    from .config import WorkerConfig
    from .engine.connection import Connection
    from .session import Association, Operation

__all__ = ["NetworkTimer"]

log = logging.getLogger("workers.association")


class NetworkTimer:
    """The network timer of :class:`~workers.association.AssociationProtocol`."""

    conn: Connection
    loop: asyncio.AbstractEventLoop
    config: WorkerConfig
    assoc: Association
    _idle: asyncio.TimerHandle | None
    _idle_grace_rx: float | None
    _last_rx: float
    _lost: bool
    _outstanding: dict[int, Operation]
    _rate_mark: tuple[float, int, int] | None
    _reading_paused: bool
    _receiving: Operation | None

    if TYPE_CHECKING:
        # provided by the other parts of AssociationProtocol
        def abort_association(
            self,
            source: int,
            reason: int,
            detail: str,
            flush: bool = True,
            hard_close: bool = False,
        ) -> None: ...

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
