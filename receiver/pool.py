"""The worker pool as the main process sees it: one :class:`WorkerSlot` per worker
process, the control channel to it (:mod:`workers.control`) and the accounting of the
connections handed to it.

Both halves of the main process use it: the acceptor (:mod:`receiver.acceptor`) picks
a slot by its load and counts what it handed over; the arbiter
(:mod:`receiver.arbiter`) fills a slot with a process, reaps it and, through
:meth:`Pool.release`, frees what the dead process held. What a worker says over its
channel (heartbeats with its load, connections closed, admission questions) is read
here, so that the count of open associations has one home.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers import control

# One logger for the main process, whichever module speaks: operators (and the
# log tests) know its lines by this name.
log = logging.getLogger("receiver.supervisor")


@dataclass(slots=True)
class WorkerSlot:
    """One place in the pool; its process is replaced when it dies."""

    index: int
    generation: int
    proc: subprocess.Popen[bytes] | None = None
    ctrl: socket.socket | None = None
    started: float = 0.0
    last_heartbeat: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    draining: bool = False
    #: connection id -> calling AE title ("" when not peeked)
    assigned: dict[int, str] = field(default_factory=dict)
    buffered: int = 0
    stored: int = 0
    restarts: int = 0
    #: connections handed to this process so far, and each open one's number among
    #: them: a heartbeat that says the worker had read that many and lists which are
    #: still open frees those of the rest whose "closed" report was lost
    sent: int = 0
    sent_seq: dict[int, int] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def load(self) -> tuple[int, int]:
        return len(self.assigned), self.buffered


#: An admission question from a worker (TLS: it read the calling AE title, we count).
AdmitHandler = Callable[[WorkerSlot, dict[str, Any]], None]


class Pool:
    """The worker slots (the current generation and those draining after a reload),
    their control channels, and the open associations they hold (per calling AE)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: list[WorkerSlot] = []
        self.old: list[WorkerSlot] = []  # draining after a reload
        self.per_ae: Counter[str] = Counter()
        #: answers the "admit" questions (set by the acceptor)
        self.on_admit: AdmitHandler | None = None

    def all(self) -> list[WorkerSlot]:
        """Every slot, current and draining."""
        return [*self.slots, *self.old]

    def open_total(self) -> int:
        """Associations handed to workers and not reported closed yet."""
        return sum(len(s.assigned) for s in self.slots) + sum(len(s.assigned) for s in self.old)

    # ------------------------------------------------------------ channel

    def watch(self, slot: WorkerSlot) -> None:
        """Read what ``slot``'s (new) worker says on its control channel."""
        if slot.ctrl is not None:
            self.loop.add_reader(slot.ctrl.fileno(), self.on_worker_message, slot)

    def on_worker_message(self, slot: WorkerSlot) -> None:
        ctrl = slot.ctrl
        if ctrl is None:
            return
        for _ in range(64):
            try:
                kind, message, _fds, _ids = control.receive(ctrl)
            except BlockingIOError:
                return
            except OSError:
                kind, message = None, None
            if kind is None:
                # The worker is gone (or closed its channel); the arbiter reaps it.
                self.channel_lost(slot)
                return
            if message is None:
                continue
            op = message.get("op")
            if op == "hb":
                slot.last_heartbeat = time.monotonic()
                slot.buffered = int(message.get("buffered", 0))
                slot.stored = int(message.get("stored", 0))
                ids, received = message.get("ids"), message.get("received")
                if isinstance(ids, list) and isinstance(received, int):
                    self._reconcile(slot, ids, received)
            elif op == "admit":
                if self.on_admit is not None:
                    self.on_admit(slot, message)
            elif op == "closed":
                for connection_id in message.get("ids", ()):
                    self._connection_closed(slot, connection_id)

    def channel_lost(self, slot: WorkerSlot) -> None:
        """The worker's end of its control channel closed: it died or is exiting.
        Stop handing it connections at once (in the up to a tick before the arbiter
        reaps it, every connection would otherwise go to it and be refused); its
        assigned connections stay counted until it is reaped."""
        ctrl, slot.ctrl = slot.ctrl, None
        if ctrl is None:
            return
        try:
            self.loop.remove_reader(ctrl.fileno())
        except (ValueError, OSError):
            pass
        ctrl.close()

    def release(self, slot: WorkerSlot) -> None:
        """Forget a dead worker's connections and channel."""
        for ae in slot.assigned.values():
            self.ae_closed(ae)
        slot.assigned.clear()
        slot.sent_seq.clear()
        if slot.ctrl is not None:
            try:
                self.loop.remove_reader(slot.ctrl.fileno())
            except (ValueError, OSError):
                pass
            slot.ctrl.close()
            slot.ctrl = None

    # --------------------------------------------------------- accounting

    def ae_closed(self, ae: str) -> None:
        """One association of calling AE ``ae`` ("" when not counted) ended."""
        if ae:
            self.per_ae[ae] -= 1
            if self.per_ae[ae] <= 0:
                del self.per_ae[ae]

    def _connection_closed(self, slot: WorkerSlot, connection_id: int) -> bool:
        slot.sent_seq.pop(connection_id, None)
        ae = slot.assigned.pop(connection_id, None)
        if ae is None:
            return False
        self.ae_closed(ae)
        return True

    def _reconcile(self, slot: WorkerSlot, open_ids: list[int], received: int) -> None:
        """A heartbeat lists the connections open in the worker when it had read
        ``received`` of those handed to it. The control channel keeps order both
        ways, so a connection among those ``received`` that is neither listed nor
        already reported closed (a report before the heartbeat arrives before it)
        was closed and its report lost (a full channel): free its slot now instead
        of never (--max-associations, --max-associations-per-ae)."""
        still_open = set(open_ids)
        lost = [
            connection_id
            for connection_id, seq in slot.sent_seq.items()
            if seq <= received and connection_id not in still_open
        ]
        freed = sum(self._connection_closed(slot, connection_id) for connection_id in lost)
        if freed:
            log.warning(
                "worker %d: %d closed connection(s) were never reported closed; "
                "their slots are free again (found by its heartbeat)",
                slot.index,
                freed,
            )


__all__ = ["Pool", "WorkerSlot"]
