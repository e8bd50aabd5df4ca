"""The receiving half of a connection: the read buffer and the parse of PDUs.

:class:`Receiver` is the base of :class:`workers.engine.connection.Connection` that
owns the bytes from the peer (see that module for the theory of operation): the read
buffer the I/O layer receives into, the framing of PDUs and PDV items as they arrive,
the hand-over of the steady state to the data plane (:mod:`workers.dataplane`), and the
reassembly of command sets and in-memory data sets. Every PDU becomes an event of the
state table, fired with :meth:`Receiver._fire`, which the connection implements.

P-DATA-TF PDUs are never buffered whole: the PDU header, then each PDV header, is
parsed as it arrives, and the fragment bytes are handed on in place (to the command
buffer, a data-set sink, or the data-set buffer), so that memory stays bounded by the
read size whatever the PDU size or the instance size.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from .. import dataplane
from . import dimse
from . import pdu as p
from .config import (
    UNASSOCIATED_READ_SIZE,
    DataSetSink,
    DirectSink,
    EngineConfig,
    LocalProtocolError,
    PresentationContext,
)
from .fsm import NO_CONTEXT, RECEIVE_FAST_PATH_STATES, Event, FireContext, State
from .primitives import CommandReceived, DataSetReceived, Indication, PDUReceived

_P_DATA_TF = int(p.PDUType.P_DATA_TF)

#: The states in which the data plane (:mod:`workers.dataplane`) may consume P-DATA-TF
#: PDUs on its own: derived from the state table, those where Evt10 (P-DATA-TF
#: received) is DT-2 (pass the data on) and stays in the same state. The data plane
#: takes no other event: any other PDU goes back to the table. Checked pair by pair by
#: tests/engine/test_dataplane.py (and every shortcut by tests/engine/test_fsm.py).
FAST_PATH_STATES: frozenset[State] = RECEIVE_FAST_PATH_STATES
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
_C_STORE_RQ = dimse.CommandField.C_STORE_RQ


def _store_rq(fields: dataplane.StoreRQ) -> dimse.Command:
    """The Command ``dimse.decode_command`` gives for the C-STORE-RQ the data plane
    decoded (and checked) into ``fields``."""
    mid, priority, data_set_type, sop_class, sop_instance, move_ae, move_mid = fields
    return dimse.Command(
        _C_STORE_RQ,
        MessageID=mid,
        AffectedSOPClassUID=sop_class,
        AffectedSOPInstanceUID=sop_instance,
        Priority=priority,
        CommandDataSetType=data_set_type,
        MoveOriginatorApplicationEntityTitle=move_ae,
        MoveOriginatorMessageID=move_mid,
    )


_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")

#: PDU types whose body is decoded whole (everything but P-DATA-TF).
_CONTROL_PDU_EVENTS = {
    p.PDUType.ASSOCIATE_RQ: Event.EVT6,
    p.PDUType.ASSOCIATE_AC: Event.EVT3,
    p.PDUType.ASSOCIATE_RJ: Event.EVT4,
    p.PDUType.RELEASE_RQ: Event.EVT12,
    p.PDUType.RELEASE_RP: Event.EVT13,
    p.PDUType.ABORT: Event.EVT16,
}

_NO_CONTEXTS = bytes(256)


class Receiver:
    """The read buffer and the parse of one connection (see module doc)."""

    # Owned by the connection, read here.
    state: State
    contexts: dict[int, PresentationContext]
    _events: deque[Indication]

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._now = 0.0
        # counters for telemetry: PDUs by type (index = PDU type) and bytes received
        self.pdus_received = [0] * 8
        self.bytes_received = 0
        #: command sets and data sets received whole (the minimum receive rate is
        #: judged within one of them)
        self.messages_received = 0

        # Small until associated (_establish sizes it): connections that never get
        # there cost a page, not a full read buffer.
        self._read_size = min(UNASSOCIATED_READ_SIZE, self.config.read_buffer_size)
        self._buf = self._new_buffer(self._read_size)
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
        self._dp_decode_store = dataplane.decode_store_rq
        self._dp_store_rsp = dataplane.encode_store_rsp  # used by Connection
        #: the last command set the data plane decoded and checked as a valid
        #: C-STORE-RQ (dimse.validate_command has nothing to say about it)
        self.checked_command: dimse.Command | None = None
        self._context_table = _NO_CONTEXTS
        self._context_table_of: dict[int, PresentationContext] | None = None
        self._context_count = 0

    def _fire(self, event: Event, ctx: FireContext = NO_CONTEXT) -> None:
        """Run the state table for ``event``: the connection's, which owns the table."""
        raise NotImplementedError

    def _new_buffer(self, size: int) -> bytearray:
        pool = self.config.buffer_pool
        return pool.take(size) if pool is not None else bytearray(size)

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
                self._buf = self._new_buffer(size)
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

    def recycle(self) -> None:
        """The connection is over and its user reads nothing more from it: its read
        buffer may serve a later connection, through the configured
        :class:`ReadBufferPool` (kept only when nothing else holds it or a view of it)."""
        buf = self._buf
        self._buf = bytearray()
        self._start = self._end = 0
        pool = self.config.buffer_pool
        if pool is not None:
            pool.give(buf, (self._read_size, UNASSOCIATED_READ_SIZE))

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
                if self.state in RECEIVE_FAST_PATH_STATES and not config.trace_transitions:
                    # Evt10 in Sta6 is DT-2 back to Sta6 (Table 9-10, fsm.SHORTCUTS),
                    # the case of every data PDU: done here without the table round trip.
                    self._pdata_left = length
                else:
                    self._fire(Event.EVT10, FireContext(length=length))
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
            self._fire(event, FireContext(pdu=decoded))

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
            self.pdus_received[_P_DATA_TF] += fr.pdus
        if fr.written and direct is not None:
            direct.direct_written(fr.written, fr.write_ns)
        return code

    def _invalid(self, detail: str, reason: int) -> None:
        """Evt19: an unrecognised or invalid PDU. Framing is lost: input is discarded."""
        self._give_back_memory()
        self._dataset_buf = None
        self._fire(Event.EVT19, FireContext(reason=reason, detail=detail))
        self._discard_input = True

    def _begin_pdata(self, ctx: FireContext) -> None:
        self._pdata_left = ctx.length

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
            # The usual C-STORE-RQ is decoded and checked by the data plane; anything
            # else (None: SLOW) by decode_command, which answers as it always did.
            fields = self._dp_decode_store(self._command_buf)
            raw = bytes(self._command_buf)
            self._command_buf.clear()
            if fields is not None:
                command = self.checked_command = _store_rq(fields)
            else:
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
        self._fire(Event.EVT19, FireContext(reason=reason, detail=detail))
        self._discard_input = True
