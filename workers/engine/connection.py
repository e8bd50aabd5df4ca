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

Where things are: the receiving half (read buffer, PDU framing, reassembly, the
data plane's hand-over) is the base class :class:`workers.engine.receiving.Receiver`;
this module holds the local primitives, the table's actions (:data:`ACTIONS`) and
sending; configuration and the API's vocabulary are :mod:`workers.engine.config`; the
table and the shortcuts derived from it, :mod:`workers.engine.fsm`.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

from . import dimse
from . import pdu as p
from .config import (
    UNASSOCIATED_READ_SIZE,
    UNLIMITED_SEND_CAP,
    DataSetSink,
    DirectSink,
    EngineConfig,
    LocalProtocolError,
    MemoryBudget,
    PresentationContext,
    ReadBufferPool,
    Role,
)
from .fsm import (
    LOCAL_EVENTS,
    NEXT_STATE,
    NO_CONTEXT,
    SEND_FAST_PATH_STATES,
    TABLE,
    Action,
    Event,
    FireContext,
    State,
)
from .primitives import (
    NEED_DATA,
    Aborted,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    Indication,
    PDUSent,
    Released,
    ReleaseRequested,
    StateChanged,
    _NeedData,
)
from .receiving import FAST_PATH_PAIRS, FAST_PATH_STATES, Receiver

__all__ = [
    "FAST_PATH_PAIRS",
    "FAST_PATH_STATES",
    "UNASSOCIATED_READ_SIZE",
    "UNLIMITED_SEND_CAP",
    "Connection",
    "DataSetSink",
    "DirectSink",
    "EngineConfig",
    "FireContext",
    "LocalProtocolError",
    "MemoryBudget",
    "PresentationContext",
    "ReadBufferPool",
    "Role",
]

_P_DATA_TF = int(p.PDUType.P_DATA_TF)
_PDATA_SINGLE_HEADER = struct.Struct(">BxLLBB")  # PDU header + one PDV header

#: Payloads at least this large are queued as their own buffer rather than joined to
#: the PDU header, so that they are not copied on the way to the socket.
_JOIN_BELOW = 64 * 1024


class Connection(Receiver):
    """The DICOM UL service provider for one transport connection (see module doc)."""

    def __init__(self, role: Role, config: EngineConfig | None = None) -> None:
        super().__init__(config or EngineConfig())
        self.role = role
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
        # counters for telemetry: PDUs by type (index = PDU type) and bytes sent (the
        # received ones are the Receiver's)
        self.pdus_sent = [0] * 8
        self.bytes_sent = 0

        self._artim_deadline: float | None = None
        self._events: deque[Indication] = deque()
        self._out: list[bytes | memoryview] = []

    # ------------------------------------------------------- transport and timer

    def connection_made(self, now: float) -> None:
        """The transport is open: Evt5 for an acceptor, Evt2 for a requestor."""
        self._now = now
        self._fire(Event.EVT2 if self.role is Role.REQUESTOR else Event.EVT5)

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
        self._fire(Event.EVT1, FireContext(pdu=request))

    def accept(self, response: p.AssociateAC, now: float) -> None:
        """A-ASSOCIATE response, accept (Evt7)."""
        self._clock(now)
        self._fire(Event.EVT7, FireContext(pdu=response))

    def reject(self, response: p.AssociateRJ, now: float) -> None:
        """A-ASSOCIATE response, reject (Evt8)."""
        self._clock(now)
        self._fire(Event.EVT8, FireContext(pdu=response))

    def send_command(self, context_id: int, command: dimse.Command | bytes) -> None:
        """Send a command set on ``context_id`` (Evt9, fragmented to the peer's max)."""
        raw = command if isinstance(command, bytes) else dimse.encode_command(command)
        config = self.config
        if (
            self.state in SEND_FAST_PATH_STATES
            and not config.trace_transitions
            and not config.trace_pdus
            and context_id in self.contexts
        ):
            # Evt9 in Sta6 is DT-1 back to Sta6 (Table 9-10, fsm.SHORTCUTS). A command
            # set that fits one PDU (every response does) is queued here as _send_pdata
            # would.
            n = len(raw)
            limit = self.peer_max_pdu_length or UNLIMITED_SEND_CAP
            if config.max_send_pdu_length:
                limit = min(limit, config.max_send_pdu_length)
            if n <= max((limit - 6) & ~1, 2) and n < _JOIN_BELOW:
                self._out.append(
                    _PDATA_SINGLE_HEADER.pack(_P_DATA_TF, n + 6, n + 2, context_id, 3) + raw
                )
                self.pdus_sent[_P_DATA_TF] += 1
                self.bytes_sent += n + 12
                return
        self._fire(
            Event.EVT9, FireContext(context_id=context_id, data=raw, control=0x01, last=True)
        )

    def send_store_response(
        self,
        context_id: int,
        message_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        status: int,
    ) -> None:
        """Send the C-STORE-RSP (no ErrorComment) to a request with these values:
        ``send_command(context_id, dimse.encode_c_store_rsp(...))``, byte for byte,
        with the whole PDU made by the data plane in the usual case."""
        config = self.config
        if (
            self.state in SEND_FAST_PATH_STATES
            and not config.trace_transitions
            and not config.trace_pdus
            and context_id in self.contexts
        ):
            # DT-1 back to the same state, as in send_command
            limit = self.peer_max_pdu_length or UNLIMITED_SEND_CAP
            if config.max_send_pdu_length:
                limit = min(limit, config.max_send_pdu_length)
            pdu = self._dp_store_rsp(
                context_id,
                message_id,
                sop_class_uid,
                sop_instance_uid,
                status,
                max((limit - 6) & ~1, 2),
            )
            if pdu is not None:
                self._out.append(pdu)
                self.pdus_sent[_P_DATA_TF] += 1
                self.bytes_sent += len(pdu)
                return
        raw = dimse.encode_c_store_rsp(message_id, sop_class_uid, sop_instance_uid, status)
        self.send_command(context_id, raw)

    def send_dataset(
        self, context_id: int, data: bytes | bytearray | memoryview, last: bool = True
    ) -> None:
        """Send (part of) a data set on ``context_id`` (Evt9).

        A large data set may be sent in several calls, ``last`` only on the final one;
        ``data`` is not copied when it is large, so keep it unchanged until written.
        """
        self._fire(
            Event.EVT9, FireContext(context_id=context_id, data=data, control=0x00, last=last)
        )

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
        self._fire(Event.EVT15, FireContext(source=source, reason=reason))

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

    def _fire(self, event: Event, ctx: FireContext = NO_CONTEXT) -> None:
        previous = self.state
        action = TABLE.get((event, previous))
        if action is None:
            if event in LOCAL_EVENTS and not self._ended():
                raise LocalProtocolError(f"{event.name} is not allowed in {previous.name}")
            return  # a blank cell for a peer event, or a local answer come too late
        nxt = _ACTIONS[action](self, event, ctx)
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

    def _peer_fault(self, ctx: FireContext) -> tuple[int, int]:
        reason = ctx.reason if ctx.reason is not None else p.AbortReason.UNEXPECTED_PDU
        return p.AbortSource.SERVICE_PROVIDER, int(reason)

    # AE: association establishment (PS3.8 Table 9-6)

    def _ae_1(self, event: Event, ctx: FireContext) -> None:
        self.request = ctx.expect(p.AssociateRQ)

    def _ae_2(self, event: Event, ctx: FireContext) -> None:
        assert self.request is not None
        self._send_pdu(self.request)

    def _ae_3(self, event: Event, ctx: FireContext) -> None:
        ac = ctx.expect(p.AssociateAC)
        assert self.request is not None
        self._establish(self.request, ac, peer_max=ac.user_info.max_length)
        self._events.append(AssociateAccepted(ac))

    def _ae_4(self, event: Event, ctx: FireContext) -> None:
        self._events.append(AssociateRejected(ctx.expect(p.AssociateRJ)))
        self._close()

    def _ae_5(self, event: Event, ctx: FireContext) -> None:
        self._start_artim()

    def _ae_6(self, event: Event, ctx: FireContext) -> State:
        self._stop_artim()
        rq = ctx.expect(p.AssociateRQ)
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

    def _ae_7(self, event: Event, ctx: FireContext) -> None:
        ac = ctx.expect(p.AssociateAC)
        assert self.request is not None
        self._send_pdu(ac)
        self._establish(self.request, ac, peer_max=self.request.user_info.max_length)

    def _ae_8(self, event: Event, ctx: FireContext) -> None:
        self._send_pdu(ctx.expect(p.AssociateRJ))
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

    def _dt_1(self, event: Event, ctx: FireContext) -> None:
        self._send_pdata(ctx)

    def _dt_2(self, event: Event, ctx: FireContext) -> None:
        self._begin_pdata(ctx)

    # AR: association release (PS3.8 Table 9-8)

    def _ar_1(self, event: Event, ctx: FireContext) -> None:
        self._send_pdu(p.ReleaseRQ())

    def _ar_2(self, event: Event, ctx: FireContext) -> None:
        self._events.append(ReleaseRequested())

    def _ar_3(self, event: Event, ctx: FireContext) -> None:
        self._events.append(Released())
        self._close()

    def _ar_4(self, event: Event, ctx: FireContext) -> None:
        self._send_pdu(p.ReleaseRP())
        self._start_artim()

    def _ar_5(self, event: Event, ctx: FireContext) -> None:
        self._stop_artim()

    def _ar_6(self, event: Event, ctx: FireContext) -> None:
        self._begin_pdata(ctx)

    def _ar_7(self, event: Event, ctx: FireContext) -> None:
        self._send_pdata(ctx)

    def _ar_8(self, event: Event, ctx: FireContext) -> State:
        self._events.append(ReleaseRequested(collision=True))
        return State.STA9 if self.role is Role.REQUESTOR else State.STA10

    def _ar_9(self, event: Event, ctx: FireContext) -> None:
        self._send_pdu(p.ReleaseRP())

    def _ar_10(self, event: Event, ctx: FireContext) -> None:
        self._events.append(Released())

    # AA: association abort (PS3.8 Table 9-9)

    def _aa_1(self, event: Event, ctx: FireContext) -> None:
        if event is Event.EVT15:
            source, reason = ctx.source, int(ctx.reason or 0)
            detail = "aborted by the local service user"
        else:
            # A PDU in Sta2 other than A-ASSOCIATE-RQ. The table says AA-1; the abort
            # is the provider's answer to a peer fault, so it says so in its source.
            source, reason = self._peer_fault(ctx)
            detail = (
                ctx.detail
                if ctx.detail is not None
                else f"unexpected PDU ({event.name}) before A-ASSOCIATE-RQ"
            )
        self._send_abort(source, reason)
        self._events.append(Aborted(source, reason, by_peer=False, detail=detail))
        self._start_artim()
        self._discard_input = True

    def _aa_2(self, event: Event, ctx: FireContext) -> None:
        self._stop_artim()
        if self.state is State.STA2:
            detail = "peer aborted" if event is Event.EVT16 else "no A-ASSOCIATE-RQ in time"
            abort = ctx.pdu if isinstance(ctx.pdu, p.Abort) else None
            self._events.append(
                Aborted(
                    abort.source if abort else None,
                    abort.reason if abort else None,
                    by_peer=event is Event.EVT16,
                    detail=detail,
                )
            )
        self._close()

    def _aa_3(self, event: Event, ctx: FireContext) -> None:
        abort = ctx.expect(p.Abort)
        self._events.append(Aborted(abort.source, abort.reason, by_peer=True, detail="A-ABORT"))
        self._close()

    def _aa_4(self, event: Event, ctx: FireContext) -> None:
        self._stop_artim()
        self._events.append(
            Aborted(None, None, by_peer=True, detail="transport closed (A-P-ABORT)")
        )

    def _aa_5(self, event: Event, ctx: FireContext) -> None:
        self._stop_artim()

    def _aa_6(self, event: Event, ctx: FireContext) -> None:
        if event is Event.EVT10:
            self._ignore_pdata = True
            self._begin_pdata(ctx)

    def _aa_7(self, event: Event, ctx: FireContext) -> None:
        source, reason = self._peer_fault(ctx)
        self._send_abort(source, reason)

    def _aa_8(self, event: Event, ctx: FireContext) -> None:
        source, reason = self._peer_fault(ctx)
        self._send_abort(source, reason)
        detail = ctx.detail or f"unexpected {event.name} in {self.state.name}"
        self._events.append(Aborted(source, reason, by_peer=False, detail=detail))
        self._start_artim()
        self._discard_input = True

    # ---------------------------------------------------------- P-DATA sending

    def _send_pdata(self, ctx: FireContext) -> None:
        context_id = ctx.context_id
        if context_id not in self.contexts:
            raise LocalProtocolError(f"presentation context {context_id} is not accepted")
        data = memoryview(ctx.data).cast("B")
        control = ctx.control
        last = ctx.last
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


#: The actions of PS3.8 Tables 9-6 to 9-9, each a method of Connection. An action
#: returns its next state when that depends on context (AE-6, AR-8), else None and
#: the next state is NEXT_STATE's. tests/engine/test_fsm.py checks every Action is here.
ACTIONS: dict[Action, Callable[[Connection, Event, FireContext], State | None]] = {
    Action.AE_1: Connection._ae_1,
    Action.AE_2: Connection._ae_2,
    Action.AE_3: Connection._ae_3,
    Action.AE_4: Connection._ae_4,
    Action.AE_5: Connection._ae_5,
    Action.AE_6: Connection._ae_6,
    Action.AE_7: Connection._ae_7,
    Action.AE_8: Connection._ae_8,
    Action.DT_1: Connection._dt_1,
    Action.DT_2: Connection._dt_2,
    Action.AR_1: Connection._ar_1,
    Action.AR_2: Connection._ar_2,
    Action.AR_3: Connection._ar_3,
    Action.AR_4: Connection._ar_4,
    Action.AR_5: Connection._ar_5,
    Action.AR_6: Connection._ar_6,
    Action.AR_7: Connection._ar_7,
    Action.AR_8: Connection._ar_8,
    Action.AR_9: Connection._ar_9,
    Action.AR_10: Connection._ar_10,
    Action.AA_1: Connection._aa_1,
    Action.AA_2: Connection._aa_2,
    Action.AA_3: Connection._aa_3,
    Action.AA_4: Connection._aa_4,
    Action.AA_5: Connection._aa_5,
    Action.AA_6: Connection._aa_6,
    Action.AA_7: Connection._aa_7,
    Action.AA_8: Connection._aa_8,
}
_ACTIONS = ACTIONS
