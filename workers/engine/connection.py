"""One DICOM Upper Layer association, sans-IO: bytes in, indications and bytes out.

Theory of operation
-------------------
A :class:`Connection` is the DICOM UL service provider of PS3.8 for one transport
connection, in either role. It never touches a socket or a clock:

* bytes from the peer go in with :meth:`receive_data` (or, without a copy, into the
  buffer of :meth:`get_buffer` followed by :meth:`buffer_updated`);
* :meth:`next_event` parses lazily and returns one indication at a time
  (:mod:`workers.engine.primitives`) or :data:`NEED_DATA`. Parsing is pulled, not
  pushed, so that a user can stop pulling (and stop reading the socket) while its
  storage catches up, and can attach a data-set sink between the command set and the
  first data-set fragment;
* local primitives (:meth:`accept`, :meth:`send_command`, :meth:`release`, ...) queue
  PDUs, which the I/O layer collects with :meth:`data_to_send` and writes, one buffer
  per PDU, plus a separate buffer for a large payload so that it is never copied;
* :attr:`wants_close` turns true when the state machine closes the transport;
  :meth:`connection_lost` reports that the transport closed;
* the ARTIM timer is :meth:`get_timer` / :meth:`handle_timer`, with ``now`` given by
  the caller (any monotonic clock, in seconds); every input and local primitive that
  can start a timer (received bytes, accept, reject, release, abort ...) takes ``now``
  too, required, so that no timer counts from a stale time.

A local answer that arrives after the association already ended (the peer aborted
while the user was deciding, so the state is Sta13 or Sta1) is a race, not misuse:
it is ignored.

Every input goes through the PS3.8 state table (:mod:`workers.engine.fsm`): each PDU
header, as soon as its six bytes are in, becomes Evt3/4/6/10/12/13/16 or Evt19, and the
table's action runs. A peer fault never raises: it becomes the A-ABORT (or
A-ASSOCIATE-RJ) the table prescribes plus an :class:`Aborted` indication. Only local
misuse (a primitive in a state whose table cell is blank, an unknown context) raises
:class:`LocalProtocolError`.

P-DATA-TF PDUs are never buffered whole: the PDU header, then each PDV header, is
parsed as it arrives, and the fragment bytes are handed on in place (to the command
buffer, a data-set sink, or the data-set buffer), so that memory stays bounded by the
read size whatever the PDU size or the instance size.
"""

from __future__ import annotations

import struct
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from .. import dataplane
from . import dimse
from . import pdu as p
from .fsm import LOCAL_EVENTS, NEXT_STATE, TABLE, Action, Event, State
from .primitives import (
    NEED_DATA,
    Aborted,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    CommandReceived,
    DataSetReceived,
    Indication,
    PDUReceived,
    PDUSent,
    Released,
    ReleaseRequested,
    StateChanged,
    _NeedData,
)

__all__ = [
    "Connection",
    "EngineConfig",
    "LocalProtocolError",
    "MemoryBudget",
    "PresentationContext",
    "Role",
]

_STA6 = State.STA6
assert TABLE[(Event.EVT10, _STA6)] is Action.DT_2 and NEXT_STATE[Action.DT_2] is _STA6
assert TABLE[(Event.EVT9, _STA6)] is Action.DT_1 and NEXT_STATE[Action.DT_1] is _STA6
assert p.PDUType.P_DATA_TF == 4

#: The states in which the data plane (:mod:`workers.dataplane`) may consume P-DATA-TF
#: PDUs on its own: derived from the state table, those where Evt10 (P-DATA-TF
#: received) is DT-2 (pass the data on) and stays in the same state. The data plane
#: takes no other event: any other PDU goes back to the table. Checked pair by pair by
#: tests/engine/test_dataplane.py.
FAST_PATH_STATES: frozenset[State] = frozenset(
    s for s in State if TABLE.get((Event.EVT10, s)) is Action.DT_2 and NEXT_STATE[Action.DT_2] is s
)
#: the (state, event) pairs the data plane handles without the table
FAST_PATH_PAIRS: frozenset[tuple[State, Event]] = frozenset(
    (s, Event.EVT10) for s in FAST_PATH_STATES
)

_walk = dataplane.walk_pdata
_new_framing = dataplane.Framing
_NEED_DATA = dataplane.NEED_DATA
_MESSAGE_END = dataplane.MESSAGE_END
_DP_COMMAND = dataplane.core.COMMAND
_DP_LAST = dataplane.core.LAST
_DP_HAVE_COMMAND = dataplane.core.HAVE_COMMAND

_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_PDATA_SINGLE_HEADER = struct.Struct(">BxLLBB")  # PDU header + one PDV header

#: PDU types whose body is decoded whole (everything but P-DATA-TF).
_CONTROL_PDU_EVENTS = {
    p.PDUType.ASSOCIATE_RQ: Event.EVT6,
    p.PDUType.ASSOCIATE_AC: Event.EVT3,
    p.PDUType.ASSOCIATE_RJ: Event.EVT4,
    p.PDUType.RELEASE_RQ: Event.EVT12,
    p.PDUType.RELEASE_RP: Event.EVT13,
    p.PDUType.ABORT: Event.EVT16,
}

#: A peer that announces no maximum still gets PDUs no larger than this from us.
UNLIMITED_SEND_CAP = 4 * 1024 * 1024

#: Payloads at least this large are queued as their own buffer rather than joined to
#: the PDU header, so that they are not copied on the way to the socket.
_JOIN_BELOW = 64 * 1024

DataSetSink = Callable[[memoryview], None]


class DirectSink(Protocol):
    """A data-set sink's file, which the data plane may write to directly."""

    def direct_fd(self) -> int:
        """The descriptor to append fragments to now, or -1 (call the sink instead)."""
        ...

    def direct_written(self, n: int, ns: int) -> None:
        """``n`` more data-set bytes were written to :meth:`direct_fd`, in ``ns``
        nanoseconds of write(2) calls."""
        ...

    def direct_digest(self) -> Any:
        """A hashlib object the data plane updates with every byte it writes to
        :meth:`direct_fd` (the index digest), or None; fixed for the data set."""
        ...


_NO_CONTEXTS = bytes(256)


#: Read buffers of connections that ended (Connection.recycle), by size, for new ones.
_SPARE_BUFFERS: dict[int, list[bytearray]] = {}
_SPARE_BUFFERS_MAX = 16


#: Read buffer of a connection that is not yet associated: an A-ASSOCIATE-RQ is a few
#: hundred bytes to a few KiB, and a peer that connects and sends nothing (or is
#: refused) must not hold the full read buffer (see Connection.get_buffer).
UNASSOCIATED_READ_SIZE = 4096


def _read_buffer(size: int) -> bytearray:
    """A read buffer of ``size`` bytes: a recycled one when there is one. A fresh one is
    zero-filled, and at hundreds of associations a second that memset (and the cache
    it evicts) is a good part of setting each up. A recycled one holds an earlier
    connection's bytes, which are never read: only ``[_start, _end)`` ever is, and
    every byte of it is received anew."""
    spare = _SPARE_BUFFERS.get(size)
    if spare:
        try:
            return spare.pop()
        except IndexError:  # another thread (an SCU in a handler) took the last one
            pass
    return bytearray(size)


class Role(Enum):
    """Which side of the association this connection plays."""

    REQUESTOR = "requestor"
    ACCEPTOR = "acceptor"


class LocalProtocolError(RuntimeError):
    """The local user asked for something the state machine does not allow now."""


class MemoryBudget:
    """Bytes of received data sets held in memory, shared by the connections of one
    process: each connection's own ``max_dataset_in_memory`` bounds one association,
    this bounds all of them together. A data set that would pass it is a fault of the
    association receiving it (A-ABORT), not of the process."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give_back(self, n: int) -> None:
        self.used = max(0, self.used - n)

    def hold(self, n: int) -> None:
        """Count ``n`` bytes already in memory (a data set handed on), unconditionally."""
        self.used += n


@dataclass(slots=True)
class EngineConfig:
    """Limits and switches of one connection; all have safe defaults.

    ``max_pdu_length`` is the Maximum Length we announce and enforce on received
    P-DATA-TF PDUs (0 announces "no limit"; received PDUs are then bounded by
    ``max_control_pdu_length`` only for non-P-DATA PDUs, P-DATA is streamed anyway).
    """

    max_pdu_length: int = 1024 * 1024
    max_control_pdu_length: int = 1024 * 1024
    max_command_length: int = 64 * 1024
    max_dataset_in_memory: int = 64 * 1024 * 1024
    max_send_pdu_length: int = 0
    artim_timeout: float = 30.0
    trace_pdus: bool = False
    trace_transitions: bool = False
    #: read buffer once associated (bounded by ``max_pdu_length`` + header); before,
    #: :data:`UNASSOCIATED_READ_SIZE`
    read_buffer_size: int = 256 * 1024
    #: shared by every connection of the process; None: no process-wide bound
    memory_budget: MemoryBudget | None = None


@dataclass(slots=True, frozen=True)
class PresentationContext:
    """An accepted presentation context."""

    id: int
    abstract_syntax: str
    transfer_syntax: str


class Connection:
    """The DICOM UL service provider for one transport connection (see module doc)."""

    def __init__(self, role: Role, config: EngineConfig | None = None) -> None:
        self.role = role
        self.config = config or EngineConfig()
        self.state = State.STA1
        #: the A-ASSOCIATE-RQ sent or received, and the A-ASSOCIATE-AC, once known
        self.request: p.AssociateRQ | None = None
        self.response: p.AssociateAC | None = None
        #: accepted presentation contexts by id
        self.contexts: dict[int, PresentationContext] = {}
        #: the peer's Maximum Length (0: no limit announced)
        self.peer_max_pdu_length = 0
        self.wants_close = False
        self._used = False  # left Sta1 at least once
        # counters for telemetry: PDUs by type (index = PDU type) and bytes, each way
        self.pdus_received = [0] * 8
        self.pdus_sent = [0] * 8
        self.bytes_received = 0
        #: command sets and data sets received whole (the minimum receive rate is
        #: judged within one of them)
        self.messages_received = 0
        self.bytes_sent = 0

        self._now = 0.0
        self._artim_deadline: float | None = None
        self._events: deque[Indication] = deque()
        self._out: list[bytes | memoryview] = []

        # Small until associated (_establish sizes it): connections that never get
        # there cost a page, not a full read buffer.
        self._read_size = min(UNASSOCIATED_READ_SIZE, self.config.read_buffer_size)
        self._buf = _read_buffer(self._read_size)
        self._start = 0
        self._end = 0
        self._discard_input = False
        self._skip_left = 0  # bytes of an ignored PDU body still to skip

        self._pdata_left = 0  # bytes of the current P-DATA-TF body not yet parsed
        self._pdv_left = 0  # bytes of the current PDV's fragment not yet handed on
        self._pdv_command = False
        self._pdv_last = False
        self._ignore_pdata = False  # AA-6: a P-DATA-TF in Sta13 is skipped
        self._trace_body: bytearray | None = None  # P-DATA body copy, only when tracing
        self._trace_length = 0

        self._msg_context = 0  # context of the message being received, 0 if none
        self._command_buf = bytearray()
        self._command: dimse.Command | None = None  # complete command awaiting data
        self._dataset_buf: bytearray | None = None
        self._sink: DataSetSink | None = None
        #: the sink's file, when data-set fragments may be written to it directly
        self._direct: DirectSink | None = None
        self._direct_digest: Any = None
        self._budget_taken = 0  # bytes of self.config.memory_budget held by this one
        # the data plane's functions (tests run one connection on each core)
        self._framing = _new_framing()
        self._dp_walk = _walk
        self._context_table = _NO_CONTEXTS
        self._context_table_of: dict[int, PresentationContext] | None = None
        self._context_count = 0

    # ------------------------------------------------------------------ inputs

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Buffer bytes received from the peer at ``now``; :meth:`next_event` parses them."""
        self._now = now
        n = len(data)
        if n:
            view = self.get_buffer(n)
            view[:n] = data
            view.release()
            self.buffer_updated(n, now)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view where the next bytes from the peer can be received in place.

        For ``asyncio.BufferedProtocol.get_buffer``: its size is at least ``sizehint``
        (or the configured read size), and :meth:`buffer_updated` must follow.
        """
        size = self._read_size
        need = max(sizehint, size // 4, 1)
        if self._start == self._end:
            # Everything received is parsed: start again at the front, and after a
            # large control PDU grew the buffer, go back to the read size (or up to it,
            # once associated).
            self._start = self._end = 0
            n = len(self._buf)
            if n < size or (n > 2 * size and need <= size):
                self._buf = _read_buffer(size)
        if len(self._buf) - self._end < need:
            self._make_room(need)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int, now: float) -> None:
        """``nbytes`` were written into the view of :meth:`get_buffer` at ``now``.

        ``now`` is the clock the timers the parse may start (ARTIM after an A-ABORT
        for a bad PDU) count from.
        """
        self._now = now
        self._end += nbytes
        self.bytes_received += nbytes

    def _make_room(self, need: int) -> None:
        # Never resize self._buf in place: a view of it may still be held (by a sink or
        # by the event loop), and resizing an exported bytearray raises BufferError.
        # Same-size slice assignment and replacement are always allowed.
        pending = self._end - self._start
        if self._start and len(self._buf) - pending >= need:
            self._buf[:pending] = self._buf[self._start : self._end]
        else:
            size = max(len(self._buf) * 2, pending + need)
            new = bytearray(size)
            new[:pending] = memoryview(self._buf)[self._start : self._end]
            self._buf = new
        self._start = 0
        self._end = pending

    def last_received(self, nbytes: int) -> bytes:
        """A copy of the last ``nbytes`` received and not yet parsed (for tracing)."""
        nbytes = min(nbytes, self._end - self._start)
        return bytes(self._buf[self._end - nbytes : self._end])

    @property
    def buffered(self) -> int:
        """Received bytes not yet parsed; a reader pauses the socket when this grows."""
        return self._end - self._start

    @property
    def mid_message(self) -> bool:
        """True while a PDU or a DIMSE message (command set and data set) has begun
        to arrive and is not complete: the peer owes us bytes."""
        return bool(
            self._end > self._start or self._pdata_left or self._skip_left or self._msg_context
        )

    def connection_made(self, now: float) -> None:
        """The transport is open: Evt5 for an acceptor, Evt2 for a requestor."""
        self._now = now
        self._fire(Event.EVT2 if self.role is Role.REQUESTOR else Event.EVT5)

    def recycle(self) -> None:
        """The connection is over and its user reads nothing more from it: its read
        buffer may serve a later connection (see :func:`_read_buffer`). Kept only
        when nothing else holds it or a view of it (a memoryview keeps a reference to
        the bytearray, so the reference count tells)."""
        buf = self._buf
        self._buf = bytearray()
        self._start = self._end = 0
        size = len(buf)
        # two references: `buf` and getrefcount's argument
        if size not in (self._read_size, UNASSOCIATED_READ_SIZE) or sys.getrefcount(buf) != 2:
            return
        spare = _SPARE_BUFFERS.setdefault(size, [])
        if len(spare) < _SPARE_BUFFERS_MAX:
            spare.append(buf)

    def connection_lost(self, now: float) -> None:
        """The transport closed (Evt17)."""
        self._now = now
        self._give_back_memory()
        self._dataset_buf = None
        self.wants_close = False
        self._fire(Event.EVT17)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        return self._artim_deadline

    def handle_timer(self, now: float) -> None:
        """Run the timers due at ``now`` (Evt18 when ARTIM expired)."""
        self._now = now
        if self._artim_deadline is not None and now >= self._artim_deadline:
            self._artim_deadline = None
            self._fire(Event.EVT18)

    def set_dataset_sink(self, sink: DataSetSink | None, direct: DirectSink | None = None) -> None:
        """Stream the data set of the command just received to ``sink``.

        ``sink`` is called with a memoryview of each fragment as it arrives; the view
        is valid only during the call. Call it after a :class:`CommandReceived` whose
        command has a data set, before the next :meth:`next_event`.

        ``direct``, when given, is the file behind ``sink``: while its ``direct_fd()``
        is not -1, the data plane writes fragments to that descriptor itself instead
        of calling ``sink``, and reports them with ``direct_written(n, ns)``.
        """
        if self._command is None or self._dataset_buf is None or self._dataset_buf:
            raise LocalProtocolError("a data-set sink can only be set right after its command")
        self._sink = sink
        self._direct = direct if sink is not None else None
        self._direct_digest = self._direct.direct_digest() if self._direct is not None else None

    # ----------------------------------------------------------------- outputs

    def next_event(self) -> Indication | _NeedData:
        """The next indication, or NEED_DATA when more bytes are needed."""
        if not self._events:
            self._parse()
            if not self._events:
                return NEED_DATA
        return self._events.popleft()

    def data_to_send(self) -> list[bytes | memoryview]:
        """Everything queued for the peer, in order; the queue is emptied."""
        out = self._out
        self._out = []
        return out

    # --------------------------------------------------------- local primitives

    def request_association(self, request: p.AssociateRQ, now: float) -> None:
        """A-ASSOCIATE request (Evt1); then open the transport and call connection_made."""
        if self.role is not Role.REQUESTOR:
            raise LocalProtocolError("only a requestor requests an association")
        self._clock(now)
        self._fire(Event.EVT1, pdu=request)

    def accept(self, response: p.AssociateAC, now: float) -> None:
        """A-ASSOCIATE response, accept (Evt7)."""
        self._clock(now)
        self._fire(Event.EVT7, pdu=response)

    def reject(self, response: p.AssociateRJ, now: float) -> None:
        """A-ASSOCIATE response, reject (Evt8)."""
        self._clock(now)
        self._fire(Event.EVT8, pdu=response)

    def send_command(self, context_id: int, command: dimse.Command | bytes) -> None:
        """Send a command set on ``context_id`` (Evt9, fragmented to the peer's max)."""
        raw = command if isinstance(command, bytes) else dimse.encode_command(command)
        config = self.config
        if (
            self.state is _STA6
            and not config.trace_transitions
            and not config.trace_pdus
            and context_id in self.contexts
        ):
            # Evt9 in Sta6 is DT-1 back to Sta6 (Table 9-10). A command set that fits
            # one PDU (every response does) is queued here as _send_pdata would.
            n = len(raw)
            limit = self.peer_max_pdu_length or UNLIMITED_SEND_CAP
            if config.max_send_pdu_length:
                limit = min(limit, config.max_send_pdu_length)
            if n <= max((limit - 6) & ~1, 2) and n < _JOIN_BELOW:
                self._out.append(_PDATA_SINGLE_HEADER.pack(4, n + 6, n + 2, context_id, 3) + raw)
                self.pdus_sent[4] += 1
                self.bytes_sent += n + 12
                return
        self._fire(Event.EVT9, context_id=context_id, data=raw, control=0x01, last=True)

    def send_dataset(
        self, context_id: int, data: bytes | bytearray | memoryview, last: bool = True
    ) -> None:
        """Send (part of) a data set on ``context_id`` (Evt9).

        A large data set may be sent in several calls, ``last`` only on the final one;
        ``data`` is not copied when it is large, so keep it unchanged until written.
        """
        self._fire(Event.EVT9, context_id=context_id, data=data, control=0x00, last=last)

    def send_message(
        self,
        context_id: int,
        command: dimse.Command,
        dataset: bytes | bytearray | memoryview | None = None,
    ) -> None:
        """Send a whole DIMSE message: the command set, then the data set if any."""
        if dataset is not None and command.CommandDataSetType == dimse.NO_DATASET:
            command.CommandDataSetType = dimse.DATASET_PRESENT
        self.send_command(context_id, command)
        if dataset is not None:
            self.send_dataset(context_id, dataset)

    def release(self, now: float) -> None:
        """A-RELEASE request (Evt11)."""
        self._clock(now)
        self._fire(Event.EVT11)

    def release_response(self, now: float) -> None:
        """A-RELEASE response (Evt14), answering a :class:`ReleaseRequested`."""
        self._clock(now)
        self._fire(Event.EVT14)

    def abort(
        self,
        source: int = p.AbortSource.SERVICE_USER,
        reason: int = p.AbortReason.NOT_SPECIFIED,
        *,
        now: float,
    ) -> None:
        """A-ABORT request (Evt15). In Sta1 and Sta2 there is nothing to abort."""
        self._clock(now)
        if self.state in (State.STA1, State.STA2, State.STA13):
            if self.state is State.STA2:
                self._close()
                self.state = State.STA1
            return
        self._fire(Event.EVT15, source=source, reason=reason)

    @property
    def is_established(self) -> bool:
        """True in the data transfer states (Sta6, and Sta7/Sta8 while releasing)."""
        return self.state in (State.STA6, State.STA7, State.STA8)

    # ------------------------------------------------------------ state machine

    def _clock(self, now: float) -> None:
        # Every local primitive says when it happens: a timer it starts (ARTIM after
        # an A-RELEASE-RP, A-ASSOCIATE-RJ or A-ABORT) counts from then, never from an
        # older time the engine last saw (the connection's opening).
        self._now = now

    def _fire(self, event: Event, **ctx: object) -> None:
        previous = self.state
        action = TABLE.get((event, previous))
        if action is None:
            if event in LOCAL_EVENTS and not self._ended():
                raise LocalProtocolError(f"{event.name} is not allowed in {previous.name}")
            return  # a blank cell for a peer event, or a local answer come too late
        nxt = getattr(self, _ACTION_METHODS[action])(event, ctx)
        self.state = nxt if nxt is not None else NEXT_STATE[action]
        self._used = True
        if self.config.trace_transitions:
            self._events.append(StateChanged(event, action, previous, self.state))

    def _ended(self) -> bool:
        """The association existed or was tried, and is over (or closing)."""
        return self.state is State.STA13 or (self.state is State.STA1 and self._used)

    def _start_artim(self) -> None:
        self._artim_deadline = self._now + self.config.artim_timeout

    def _stop_artim(self) -> None:
        self._artim_deadline = None

    def _close(self) -> None:
        self.wants_close = True
        self._discard_input = True

    def _send_pdu(self, pdu: p.PDU) -> None:
        raw = p.encode(pdu)
        self._out.append(raw)
        self._count_sent(pdu.pdu_type, len(raw))
        if self.config.trace_pdus:
            self._events.append(PDUSent(pdu.pdu_type, len(raw) - 6, pdu))

    def _count_sent(self, pdu_type: int, nbytes: int) -> None:
        self.pdus_sent[pdu_type] += 1
        self.bytes_sent += nbytes

    def _send_abort(self, source: int, reason: int) -> None:
        # The reason field is only meaningful for a service-provider abort (Table 9-26).
        if source != p.AbortSource.SERVICE_PROVIDER:
            reason = 0
        self._send_pdu(p.Abort(source, reason))

    def _peer_fault(self, ctx: dict[str, object]) -> tuple[int, int]:
        reason = ctx.get("reason", p.AbortReason.UNEXPECTED_PDU)
        return p.AbortSource.SERVICE_PROVIDER, int(reason)  # type: ignore[call-overload]

    # AE: association establishment (PS3.8 Table 9-6)

    def _ae_1(self, event: Event, ctx: dict[str, object]) -> None:
        self.request = ctx["pdu"]  # type: ignore[assignment]

    def _ae_2(self, event: Event, ctx: dict[str, object]) -> None:
        assert self.request is not None
        self._send_pdu(self.request)

    def _ae_3(self, event: Event, ctx: dict[str, object]) -> None:
        ac: p.AssociateAC = ctx["pdu"]  # type: ignore[assignment]
        assert self.request is not None
        self._establish(self.request, ac, peer_max=ac.user_info.max_length)
        self._events.append(AssociateAccepted(ac))

    def _ae_4(self, event: Event, ctx: dict[str, object]) -> None:
        self._events.append(AssociateRejected(ctx["pdu"]))  # type: ignore[arg-type]
        self._close()

    def _ae_5(self, event: Event, ctx: dict[str, object]) -> None:
        self._start_artim()

    def _ae_6(self, event: Event, ctx: dict[str, object]) -> State:
        self._stop_artim()
        rq: p.AssociateRQ = ctx["pdu"]  # type: ignore[assignment]
        self.request = rq
        # The only check of the service provider itself: bit 0 of the protocol version
        # (PS3.8 9.3.2). AE titles, contexts and the rest are the service user's call.
        if not rq.protocol_version & 0x0001:
            rj = p.AssociateRJ(
                p.RejectResult.PERMANENT,
                p.RejectSource.SERVICE_PROVIDER_ACSE,
                p.RejectReason.PROTOCOL_VERSION_NOT_SUPPORTED,
            )
            self._send_pdu(rj)
            self._events.append(AssociateRejected(rj, local=True))
            self._start_artim()
            return State.STA13
        self._events.append(AssociateIndication(rq))
        return State.STA3

    def _ae_7(self, event: Event, ctx: dict[str, object]) -> None:
        ac: p.AssociateAC = ctx["pdu"]  # type: ignore[assignment]
        assert self.request is not None
        self._send_pdu(ac)
        self._establish(self.request, ac, peer_max=self.request.user_info.max_length)

    def _ae_8(self, event: Event, ctx: dict[str, object]) -> None:
        self._send_pdu(ctx["pdu"])  # type: ignore[arg-type]
        self._start_artim()

    def _establish(self, rq: p.AssociateRQ, ac: p.AssociateAC, peer_max: int | None) -> None:
        self.response = ac
        proposed = {c.id: c.abstract_syntax for c in rq.contexts}
        self.contexts = {
            c.id: PresentationContext(c.id, proposed[c.id], c.transfer_syntax)
            for c in ac.contexts
            if c.result == p.ContextResult.ACCEPTANCE and c.id in proposed
        }
        self.peer_max_pdu_length = peer_max or 0
        # Associated: the full read buffer, no larger than the biggest PDU we accept
        # (our Maximum Length plus the 6-byte PDU header) needs.
        size = self.config.read_buffer_size
        if self.config.max_pdu_length:
            size = min(size, max(self.config.max_pdu_length + 6, UNASSOCIATED_READ_SIZE))
        self._read_size = size

    # DT: data transfer (PS3.8 Table 9-7)

    def _dt_1(self, event: Event, ctx: dict[str, object]) -> None:
        self._send_pdata(ctx)

    def _dt_2(self, event: Event, ctx: dict[str, object]) -> None:
        self._begin_pdata(ctx)

    # AR: association release (PS3.8 Table 9-8)

    def _ar_1(self, event: Event, ctx: dict[str, object]) -> None:
        self._send_pdu(p.ReleaseRQ())

    def _ar_2(self, event: Event, ctx: dict[str, object]) -> None:
        self._events.append(ReleaseRequested())

    def _ar_3(self, event: Event, ctx: dict[str, object]) -> None:
        self._events.append(Released())
        self._close()

    def _ar_4(self, event: Event, ctx: dict[str, object]) -> None:
        self._send_pdu(p.ReleaseRP())
        self._start_artim()

    def _ar_5(self, event: Event, ctx: dict[str, object]) -> None:
        self._stop_artim()

    def _ar_6(self, event: Event, ctx: dict[str, object]) -> None:
        self._begin_pdata(ctx)

    def _ar_7(self, event: Event, ctx: dict[str, object]) -> None:
        self._send_pdata(ctx)

    def _ar_8(self, event: Event, ctx: dict[str, object]) -> State:
        self._events.append(ReleaseRequested(collision=True))
        return State.STA9 if self.role is Role.REQUESTOR else State.STA10

    def _ar_9(self, event: Event, ctx: dict[str, object]) -> None:
        self._send_pdu(p.ReleaseRP())

    def _ar_10(self, event: Event, ctx: dict[str, object]) -> None:
        self._events.append(Released())

    # AA: association abort (PS3.8 Table 9-9)

    def _aa_1(self, event: Event, ctx: dict[str, object]) -> None:
        if event is Event.EVT15:
            source, reason = int(ctx["source"]), int(ctx["reason"])  # type: ignore[call-overload]
            detail = "aborted by the local service user"
        else:
            # A PDU in Sta2 other than A-ASSOCIATE-RQ. The table says AA-1; the abort
            # is the provider's answer to a peer fault, so it says so in its source.
            source, reason = self._peer_fault(ctx)
            detail = str(ctx.get("detail", f"unexpected PDU ({event.name}) before A-ASSOCIATE-RQ"))
        self._send_abort(source, reason)
        self._events.append(Aborted(source, reason, by_peer=False, detail=detail))
        self._start_artim()
        self._discard_input = True

    def _aa_2(self, event: Event, ctx: dict[str, object]) -> None:
        self._stop_artim()
        if self.state is State.STA2:
            detail = "peer aborted" if event is Event.EVT16 else "no A-ASSOCIATE-RQ in time"
            abort: p.Abort | None = ctx.get("pdu")  # type: ignore[assignment]
            self._events.append(
                Aborted(
                    abort.source if abort else None,
                    abort.reason if abort else None,
                    by_peer=event is Event.EVT16,
                    detail=detail,
                )
            )
        self._close()

    def _aa_3(self, event: Event, ctx: dict[str, object]) -> None:
        abort: p.Abort = ctx["pdu"]  # type: ignore[assignment]
        self._events.append(Aborted(abort.source, abort.reason, by_peer=True, detail="A-ABORT"))
        self._close()

    def _aa_4(self, event: Event, ctx: dict[str, object]) -> None:
        self._stop_artim()
        self._events.append(
            Aborted(None, None, by_peer=True, detail="transport closed (A-P-ABORT)")
        )

    def _aa_5(self, event: Event, ctx: dict[str, object]) -> None:
        self._stop_artim()

    def _aa_6(self, event: Event, ctx: dict[str, object]) -> None:
        if event is Event.EVT10:
            self._ignore_pdata = True
            self._begin_pdata(ctx)

    def _aa_7(self, event: Event, ctx: dict[str, object]) -> None:
        source, reason = self._peer_fault(ctx)
        self._send_abort(source, reason)

    def _aa_8(self, event: Event, ctx: dict[str, object]) -> None:
        source, reason = self._peer_fault(ctx)
        self._send_abort(source, reason)
        detail = str(ctx.get("detail") or f"unexpected {event.name} in {self.state.name}")
        self._events.append(Aborted(source, reason, by_peer=False, detail=detail))
        self._start_artim()
        self._discard_input = True

    # ---------------------------------------------------------- P-DATA sending

    def _send_pdata(self, ctx: dict[str, object]) -> None:
        context_id: int = ctx["context_id"]  # type: ignore[assignment]
        if context_id not in self.contexts:
            raise LocalProtocolError(f"presentation context {context_id} is not accepted")
        data = memoryview(ctx["data"]).cast("B")  # type: ignore[arg-type]
        control: int = ctx["control"]  # type: ignore[assignment]
        last: bool = ctx["last"]  # type: ignore[assignment]
        limit = self.peer_max_pdu_length or UNLIMITED_SEND_CAP
        if self.config.max_send_pdu_length:
            limit = min(limit, self.config.max_send_pdu_length)
        # The PDV item header takes 6 bytes of the PDU body. Fragments are kept even:
        # data-set values have even lengths, and DCMTK aborts on an odd fragment when a
        # peer announces an odd Maximum Length.
        chunk = max((limit - 6) & ~1, 2)
        total = len(data)
        offset = 0
        while True:
            n = min(chunk, total - offset)
            end = offset + n
            mch = control | (0x02 if last and end == total else 0)
            header = _PDATA_SINGLE_HEADER.pack(p.PDUType.P_DATA_TF, n + 6, n + 2, context_id, mch)
            if n < _JOIN_BELOW:
                self._out.append(header + data[offset:end])
            else:
                self._out.append(header)
                self._out.append(data[offset:end])
            self._count_sent(p.PDUType.P_DATA_TF, n + 12)
            if self.config.trace_pdus:
                pdv = p.PDV(context_id, mch, bytes(data[offset:end]))
                self._events.append(PDUSent(p.PDUType.P_DATA_TF, n + 6, p.PDataTF((pdv,))))
            offset = end
            if offset >= total:
                break

    # -------------------------------------------------------------- parsing

    def _parse(self) -> None:
        """Parse buffered bytes until an indication is queued or more bytes are needed."""
        buf = self._buf
        events = self._events
        while not events:
            if self._discard_input:
                self._start = self._end = 0
                return
            if (
                self.state in FAST_PATH_STATES
                and not self._skip_left
                and not self._ignore_pdata
                and self._trace_body is None
                and not self.config.trace_transitions
                and not self.config.trace_pdus
            ):
                code = self._walk_pdata()
                if code == _MESSAGE_END:
                    self._end_of_fragment()
                    continue
                if code == _NEED_DATA:
                    return
                # SLOW: the code below takes the next step, as it always did
            avail = self._end - self._start
            if self._skip_left:
                n = min(avail, self._skip_left)
                self._start += n
                self._skip_left -= n
                if self._skip_left:
                    return
                continue
            if self._pdata_left:
                if self._pdv_left:
                    if not avail:
                        return
                    n = avail if avail < self._pdv_left else self._pdv_left
                    start = self._start
                    if not self._fragment(start, n):
                        continue
                    self._start = start + n
                    self._pdv_left -= n
                    self._pdata_left -= n
                    if not self._pdv_left:
                        self._end_of_fragment()
                    continue
                if avail < 6:
                    return
                self._pdv_header()
                continue
            if avail < 6:
                return
            pdu_type, length = _PDU_HEADER.unpack_from(buf, self._start)
            if pdu_type == p.PDUType.P_DATA_TF:
                if length < 6 or (
                    self.config.max_pdu_length and length > self.config.max_pdu_length
                ):
                    self._start += 6
                    self._invalid(
                        f"P-DATA-TF of {length} bytes (maximum {self.config.max_pdu_length})",
                        p.AbortReason.INVALID_PDU_PARAMETER,
                    )
                    continue
                self._start += 6
                self.pdus_received[pdu_type] += 1
                config = self.config
                if config.trace_pdus:
                    # Only while someone listens: keep a copy of the body so that the
                    # whole PDU can be reported once it has streamed through.
                    self._trace_body = bytearray()
                    self._trace_length = length
                if self.state is _STA6 and not config.trace_transitions:
                    # Evt10 in Sta6 is DT-2 back to Sta6 (Table 9-10), the case of
                    # every data PDU: done here without the table round trip.
                    self._pdata_left = length
                else:
                    self._fire(Event.EVT10, length=length)
                continue
            event = _CONTROL_PDU_EVENTS.get(pdu_type)
            if event is None:
                self._start += 6
                self._invalid(f"unknown PDU type 0x{pdu_type:02x}", p.AbortReason.UNRECOGNIZED_PDU)
                continue
            if length > self.config.max_control_pdu_length:
                self._start += 6
                self._invalid(
                    f"{p.PDUType(pdu_type).name} of {length} bytes "
                    f"(maximum {self.config.max_control_pdu_length})",
                    p.AbortReason.INVALID_PDU_PARAMETER,
                )
                continue
            if avail < 6 + length:
                if len(buf) - self._start < 6 + length:
                    self._make_room(6 + length - (self._end - self._start))
                    buf = self._buf
                return
            body = memoryview(buf)[self._start + 6 : self._start + 6 + length]
            self._start += 6 + length
            self.pdus_received[pdu_type] += 1
            try:
                decoded = p.decode(pdu_type, body)
            except Exception as exc:  # a peer fault must never escape: PDUError, or a bug
                body.release()
                reason = getattr(exc, "reason", p.AbortReason.INVALID_PDU_PARAMETER)
                self._invalid(f"invalid {p.PDUType(pdu_type).name}: {exc}", reason)
                continue
            body.release()
            if self.config.trace_pdus:
                events.append(PDUReceived(pdu_type, length, decoded))
            self._fire(event, pdu=decoded)

    def _walk_pdata(self) -> int:
        """Hand the steady state to the data plane (see :mod:`workers.dataplane`)."""
        contexts = self.contexts
        if contexts is not self._context_table_of or len(contexts) != self._context_count:
            table = bytearray(256)
            for context_id in contexts:
                if 0 <= context_id < 256:
                    table[context_id] = 1
            self._context_table = bytes(table)
            self._context_table_of = contexts
            self._context_count = len(contexts)
        fr = self._framing
        fr.start = self._start
        fr.pdata_left = self._pdata_left
        fr.pdv_left = self._pdv_left
        fr.flags = (
            (_DP_COMMAND if self._pdv_command else 0)
            | (_DP_LAST if self._pdv_last else 0)
            | (_DP_HAVE_COMMAND if self._command is not None else 0)
        )
        fr.msg_context = self._msg_context
        direct = self._direct
        fd = direct.direct_fd() if direct is not None else -1
        config = self.config
        code: int = self._dp_walk(
            fr,
            self._buf,
            self._end,
            self._context_table,
            config.max_pdu_length,
            self._command_buf,
            config.max_command_length,
            fd,
            self._direct_digest if fd >= 0 else None,
        )
        self._start = fr.start
        self._pdata_left = fr.pdata_left
        self._pdv_left = fr.pdv_left
        flags = fr.flags
        self._pdv_command = bool(flags & _DP_COMMAND)
        self._pdv_last = bool(flags & _DP_LAST)
        self._msg_context = fr.msg_context
        if fr.pdus:
            self.pdus_received[4] += fr.pdus
        if fr.written and direct is not None:
            direct.direct_written(fr.written, fr.write_ns)
        return code

    def _invalid(self, detail: str, reason: int) -> None:
        """Evt19: an unrecognised or invalid PDU. Framing is lost: input is discarded."""
        self._give_back_memory()
        self._dataset_buf = None
        self._fire(Event.EVT19, reason=reason, detail=detail)
        self._discard_input = True

    def _begin_pdata(self, ctx: dict[str, object]) -> None:
        self._pdata_left = ctx["length"]  # type: ignore[assignment]

    def _pdv_header(self) -> None:
        if self._pdata_left < 6:
            self._protocol_fault(
                f"{self._pdata_left} bytes left in a P-DATA-TF, too few for a PDV item",
                p.AbortReason.INVALID_PDU_PARAMETER,
            )
            return
        item_length, context_id, control = _PDV_HEADER.unpack_from(self._buf, self._start)
        if self._trace_body is not None:
            self._trace_body += self._buf[self._start : self._start + 6]
        self._start += 6
        self._pdata_left -= 6
        if item_length < 2 or item_length - 2 > self._pdata_left:
            self._protocol_fault(
                f"PDV item length {item_length} does not fit its P-DATA-TF",
                p.AbortReason.INVALID_PDU_PARAMETER,
            )
            return
        self._pdv_left = item_length - 2
        self._pdv_command = bool(control & 0x01)
        self._pdv_last = bool(control & 0x02)
        if self._ignore_pdata:
            pass
        elif context_id not in self.contexts:
            self._protocol_fault(
                f"PDV on presentation context {context_id}, which is not accepted",
                p.AbortReason.INVALID_PDU_PARAMETER,
            )
            return
        elif self._msg_context == 0:
            if not self._pdv_command:
                self._protocol_fault(
                    "data-set fragment without a command", p.AbortReason.UNEXPECTED_PDU_PARAMETER
                )
                return
            self._msg_context = context_id
        elif context_id != self._msg_context:
            self._protocol_fault(
                f"PDV on context {context_id} inside a message on context {self._msg_context}",
                p.AbortReason.UNEXPECTED_PDU_PARAMETER,
            )
            return
        elif self._pdv_command == (self._command is not None):
            what = (
                "command fragment after the command set"
                if self._pdv_command
                else ("data-set fragment before the command set was complete")
            )
            self._protocol_fault(what, p.AbortReason.UNEXPECTED_PDU_PARAMETER)
            return
        if not self._pdv_left:
            self._end_of_fragment()

    def _fragment(self, start: int, n: int) -> bool:
        """Hand on ``n`` fragment bytes at ``start`` of the buffer, without copying them
        when a sink takes them. False when that was a protocol fault."""
        if self._trace_body is not None:
            self._trace_body += self._buf[start : start + n]
        if self._ignore_pdata:
            return True
        view = memoryview(self._buf)[start : start + n]
        if self._pdv_command:
            if len(self._command_buf) + n > self.config.max_command_length:
                view.release()
                self._protocol_fault(
                    f"command set longer than {self.config.max_command_length} bytes",
                    p.AbortReason.INVALID_PDU_PARAMETER,
                )
                return False
            self._command_buf += view
        elif self._sink is not None:
            self._sink(view)
        else:
            assert self._dataset_buf is not None
            if len(self._dataset_buf) + n > self.config.max_dataset_in_memory:
                view.release()
                self._protocol_fault(
                    f"data set larger than {self.config.max_dataset_in_memory} bytes in memory",
                    p.AbortReason.NOT_SPECIFIED,
                )
                return False
            budget = self.config.memory_budget
            if budget is not None:
                if not budget.take(n):
                    view.release()
                    self._protocol_fault(
                        f"data sets being received in this process already hold "
                        f"{budget.used} of {budget.limit} bytes",
                        p.AbortReason.NOT_SPECIFIED,
                    )
                    return False
                self._budget_taken += n
            self._dataset_buf += view
        view.release()
        return True

    def _end_of_fragment(self) -> None:
        ignored = self._ignore_pdata
        if self._pdata_left == 0:
            self._ignore_pdata = False
            if self._trace_body is not None:
                body, self._trace_body = bytes(self._trace_body), None
                try:
                    traced: p.PDU | None = p.decode(p.PDUType.P_DATA_TF, body)
                except Exception:  # reported as it came; the PDVs were checked already
                    traced = None
                self._events.append(PDUReceived(p.PDUType.P_DATA_TF, self._trace_length, traced))
        if not self._pdv_last or ignored or self._msg_context == 0:
            return
        context_id = self._msg_context
        if self._pdv_command:
            raw = bytes(self._command_buf)
            self._command_buf.clear()
            try:
                command = dimse.decode_command(raw)
            except Exception as exc:  # DIMSEError, or a bug: never out of the engine
                self._protocol_fault(
                    f"undecodable command set: {exc}", p.AbortReason.INVALID_PDU_PARAMETER
                )
                return
            if command.has_dataset:
                self._command = command
                self._dataset_buf = bytearray()
                self._sink = None
                self._direct = None
            else:
                self._msg_context = 0
            self.messages_received += 1
            self._events.append(CommandReceived(context_id, command, raw))
        else:
            data = None if self._sink is not None else bytes(self._dataset_buf or b"")
            self._give_back_memory()
            self._command = None
            self._dataset_buf = None
            self._sink = None
            self._direct = None
            self._msg_context = 0
            self.messages_received += 1
            self._events.append(DataSetReceived(context_id, data))

    def _give_back_memory(self) -> None:
        if self._budget_taken:
            budget = self.config.memory_budget
            if budget is not None:
                budget.give_back(self._budget_taken)
            self._budget_taken = 0

    def _protocol_fault(self, detail: str, reason: int) -> None:
        """A well-framed PDU with invalid content: A-ABORT as for Evt19 (AA-8)."""
        self._give_back_memory()
        self._dataset_buf = None
        self._pdata_left = self._pdv_left = 0
        self._fire(Event.EVT19, reason=reason, detail=detail)
        self._discard_input = True


_ACTION_METHODS = {action: "_" + action.value.lower().replace("-", "_") for action in Action}
