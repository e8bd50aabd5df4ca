"""The one bridge from a transport's bytes to the sans-IO engine, for every role.

Theory of operation
-------------------
:class:`EngineBridge` is an ``asyncio.BufferedProtocol`` over a
:class:`~workers.engine.connection.Connection` (the uvicorn pattern). What every
role does the same way lives here, once:

* the event loop receives straight into the engine's buffer (``get_buffer`` /
  ``buffer_updated``: no copy on the way in), and the engine is fed with
  ``loop.time()`` as its clock;
* :meth:`pump` pulls every indication out of the engine and hands it to the role
  (:meth:`handle_indication`), with one boundary for the role's bugs
  (:meth:`indication_failed`: log and abort, never kill the loop's callback);
* :meth:`write_queued` writes whatever the engine queued, one ``write`` (or one
  ``writelines`` for several PDUs, so that a command PDU and a small data-set PDU
  leave in one system call);
* the engine's one timer (ARTIM) is re-armed whenever its deadline moves
  (:meth:`sync_timer`); ``call_at`` may fire a clock tick early, so the engine is
  told the deadline was reached (:meth:`_on_timer` clamps ``now``), not left to
  re-arm the same deadline until the clock catches up;
* TCP_NODELAY on every socket, and for the acceptor (``quickack = True``)
  TCP_QUICKACK re-armed on the first read after each write of ours, the only
  moment it is lost (docs/performance.md, Nagle);
* :meth:`engine_lost` tells the engine the connection is gone and stops the timer.

The roles: :class:`workers.association.AssociationProtocol` (the acceptor),
:class:`workers.scu.protocol.EngineProtocol` (the requestor) and
:class:`receiver.acceptor.Rejector` (the main process answering a refused peer). It
works under uvloop and the default loop alike; nothing here is DICOM-specific beyond the
engine's calls.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any, ClassVar, cast

from .engine.connection import Connection
from .engine.primitives import NEED_DATA, Indication

__all__ = ["EngineBridge"]

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _BorrowedSocket(socket.socket):
    """A socket object over the transport's fd that never closes it.

    uvloop's ``get_extra_info("socket")`` hands out a pseudo-socket whose every
    ``setsockopt`` builds a throwaway ``socket.socket`` (a ``getsockname`` syscall and
    an object per call); re-arming TCP_QUICKACK after each read through it cost more
    than the ``setsockopt`` itself. This one is made once per connection and detached
    (never closed: the fd is the transport's) when the connection ends or the object
    is collected.
    """

    def __del__(self) -> None:
        self.detach()


def _quickack_socket(sock: Any) -> Any:
    """What to re-arm TCP_QUICKACK on: ``sock`` itself when it is a real socket,
    else (uvloop's pseudo-socket, asyncio's TransportSocket) a
    :class:`_BorrowedSocket` over its fd."""
    if sock is None or isinstance(sock, socket.socket):
        return sock
    try:
        return _BorrowedSocket(sock.family, sock.type, sock.proto, sock.fileno())
    except (OSError, AttributeError, ValueError):
        return sock


class EngineBridge(asyncio.BufferedProtocol):
    """Feeds a :class:`Connection` from a transport and writes what it queues.

    Subclasses give the role: :meth:`handle_indication` for each indication,
    :meth:`bytes_fed` after each read, :meth:`timer_fired` after the engine's timer
    ran, :meth:`indication_failed` when a role's handler raised.
    """

    #: re-arm TCP_QUICKACK after every read (the receiving side)
    quickack: ClassVar[bool] = False

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._sock: Any = None
        self._quickack_sock: Any = None
        #: TCP_QUICKACK to re-arm on the next read: only a write of ours brings the
        #: kernel's delayed-ACK ("pingpong") mode back, so after the first read
        #: that follows one, further reads have nothing to re-arm
        self._quickack_due = True
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        #: the engine was told the connection is gone (no timer is armed after that)
        self._engine_gone = False

    # ---------------------------------------------------------- asyncio API

    def adopt_transport(self, transport: asyncio.BaseTransport) -> None:
        """Keep ``transport`` and set the socket options every connection gets (the
        first half of ``connection_made``: the role tells the engine when it is ready)."""
        # uvloop's transports implement the interface without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        self._sock = sock
        if sock is None:
            return
        # Through the socket made for TCP_QUICKACK when there is one: uvloop's
        # pseudo-socket would build (and getsockname) a throwaway socket object for
        # this setsockopt. uvloop's TCP transports set TCP_NODELAY already; asyncio's
        # do not always (not on a socket whose proto is 0, as accepted ones can be).
        target = _quickack_socket(sock) if self.quickack else sock
        try:
            target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.quickack and _QUICKACK is not None:
            self._quickack_sock = target

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        now = self.loop.time()
        self.conn.buffer_updated(nbytes, now)
        if self._quickack_due:
            qsock = self._quickack_sock
            if qsock is not None:
                # Our response makes Linux treat the connection as interactive
                # ("pingpong"): the ACK of the sender's next small segment (DCMTK's
                # 12-byte PDU header) then waits for our next write or the delayed-ACK
                # timer, and a Nagle-bound sender holds the rest of its message until
                # it comes. Setting TCP_QUICKACK leaves pingpong mode and sends the
                # pending ACK now; out of pingpong mode the kernel ACKs a pushed
                # segment as soon as we read it, by itself, until our next write
                # (tcp_event_data_sent) brings pingpong back: so once per write, on
                # the first read after it, not on every read.
                try:
                    qsock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except OSError:
                    pass
            self._quickack_due = False
        self.bytes_fed(nbytes, now)

    # ------------------------------------------------------- for the roles

    def bytes_fed(self, nbytes: int, now: float) -> None:
        """``nbytes`` were fed to the engine at ``now``: pull what they produced."""
        self.pump()

    def handle_indication(self, event: Indication) -> None:
        """One indication of the engine, for the role to act on."""
        raise NotImplementedError

    def indication_failed(self) -> None:
        """:meth:`handle_indication` raised (a bug of the role): log it and abort."""
        raise NotImplementedError

    def after_pump(self) -> None:
        """After :meth:`pump` delivered what the engine had: write and re-arm."""
        self.write_queued()
        self.sync_timer()

    def timer_fired(self) -> None:
        """The engine's timer ran: deliver what it produced."""
        self.pump()

    def pump(self) -> None:
        """Deliver every pending indication, then :meth:`after_pump`."""
        conn = self.conn
        handle = self.handle_indication
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                handle(cast(Indication, event))
        except Exception:
            # One boundary for the role's bugs: log, abort, keep the loop alive.
            self.indication_failed()
        self.after_pump()

    def write_queued(self) -> list[Any] | None:
        """Write what the engine queued (when the role may write: :meth:`writable`),
        in one call; returns what was written."""
        out = self.conn.data_to_send()
        transport = self.transport
        if not out or transport is None or not self.writable():
            return None
        self.sending(out)
        self._quickack_due = True
        if len(out) == 1:
            transport.write(out[0])
        else:
            transport.writelines(out)
        return out

    def writable(self) -> bool:
        """Whether queued bytes may still go to the transport."""
        return not self._engine_gone

    def sending(self, out: Sequence[Any]) -> None:
        """``out`` is about to be written (a hook for tracing)."""

    def sync_timer(self) -> None:
        """Re-arm the engine's timer when its deadline moved."""
        deadline = self.conn.get_timer()
        if deadline == self._timer_at:
            return
        self.cancel_timer()
        if deadline is not None and not self._engine_gone:
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _on_timer(self) -> None:
        deadline = self._timer_at
        self._timer = None
        self._timer_at = None
        now = self.loop.time()
        # call_at may fire a clock tick early (the loop considers the deadline
        # reached): the engine must see it reached too.
        self.conn.handle_timer(now if deadline is None else max(now, deadline))
        self.timer_fired()

    def engine_lost(self) -> None:
        """Tell the engine the connection is gone (its last indications follow)."""
        self._engine_gone = True
        self.cancel_timer()
        self.conn.connection_lost(self.loop.time())

    def release_socket(self) -> None:
        """Let go of the socket made for TCP_QUICKACK (the fd stays the transport's)."""
        qsock, self._quickack_sock = self._quickack_sock, None
        if isinstance(qsock, _BorrowedSocket):
            qsock.detach()
