"""The association requestor (SCU): asyncio API over the sans-IO engine.

Theory of operation
-------------------
:func:`associate` opens a TCP (or TLS) connection with an
:class:`~workers.scu.protocol.EngineProtocol` around a requestor-role
:class:`~workers.engine.connection.Connection`, sends the A-ASSOCIATE-RQ and returns a
:class:`Requestor` once the A-ASSOCIATE-AC is in.

Every DIMSE request gets a fresh MessageID (1..65535, wrapping, skipping IDs still
outstanding) and an entry in ``_pending``: MessageID -> operation. A response is
matched by its MessageIDBeingRespondedTo, so responses may come in any order and up to
the negotiated asynchronous operations window (PS3.7 D.3.3.3; 1 when not negotiated)
may be outstanding at once. A single-response operation (C-ECHO, C-STORE, N-*) is a
Future; a multi-response one (C-FIND, C-GET, C-MOVE) is a queue that ends with the
first response whose status is not Pending.

Messages are never interleaved on the wire (PS3.8 9.3.5: one message's fragments are
contiguous). Small messages are queued whole in one synchronous step, so they cannot
be split. A Part 10 file larger than one read is streamed with awaits between chunks;
while it is, ``_stream_done`` is set, new requests wait for it, and responses we owe
the peer (C-GET sub-operations) are held back in ``_deferred`` until it is sent. A
data set given as a sequence of buffers is queued by reference, one ``send_dataset``
call per buffer; it holds the message open the same way only if the transport pauses
before its last buffer is queued.

Failures end every waiter: a peer A-ABORT, a closed transport, an ARTIM expiry and
the DIMSE timeout all set ``_error`` and fail every pending future, slot waiter and
iterator with it, so nothing awaiting this association can hang. The DIMSE timeout is
one watchdog timer: when requests are outstanding and the peer sent no DIMSE message
for ``dimse_timeout`` seconds (counted from the later of the last message received and
the last request fully sent), the association is aborted and the waiters get
``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

from workers.engine import acse, dimse
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, PresentationContext, Role
from workers.engine.primitives import (
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    CommandReceived,
    DataSetReceived,
    Indication,
    Released,
    ReleaseRequested,
)

from . import codec, store
from .operations import (
    AssociationAborted,
    AssociationRejected,
    DIMSEOperation,
    _label,
    _Op,
    _Single,
    _status,
)
from .protocol import ABORT_GRACE, EngineProtocol

if TYPE_CHECKING:
    import ssl as _ssl

    from pydicom.dataset import Dataset

__all__ = [
    "EventReportHandler",
    "Requestor",
    "StoreHandler",
    "associate",
]

log = logging.getLogger(__name__)

MiB = 1024 * 1024

#: How much of a streamed file is read (and queued for the socket) at a time.
STREAM_READ_SIZE = 1 * MiB
#: The engine's PDU size when the peer announces no maximum (Connection's cap).
_UNLIMITED_PDU = 4 * MiB
#: An async ops window of 0 means "unlimited" (PS3.7 D.3.3.3); this is what we allow.
UNLIMITED_WINDOW = 65535

StatusResult: TypeAlias = "int | Awaitable[int]"
#: ``store_handler(command, dataset_bytes, context) -> status``, sync or async.
StoreHandler: TypeAlias = "Callable[[dimse.Command, bytes, PresentationContext], StatusResult]"
#: ``event_report_handler(command, dataset_bytes | None, context) -> status``.
EventReportHandler: TypeAlias = (
    "Callable[[dimse.Command, bytes | None, PresentationContext], StatusResult]"
)
Buffer: TypeAlias = "bytes | bytearray | memoryview"
StoreSource: TypeAlias = (
    "bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]"
    " | str | os.PathLike[str] | Dataset"
)


# -------------------------------------------------------------------- requestor


class Requestor:
    """An established association, requestor side. Made by :func:`associate`.

    Use it as an async context manager: a normal exit releases the association
    (after outstanding operations complete), an exception aborts it.
    """

    def __init__(
        self,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
        *,
        acse_timeout: float | None,
        dimse_timeout: float | None,
        network_timeout: float | None,
        store_handler: StoreHandler | None = None,
        event_report_handler: EventReportHandler | None = None,
    ) -> None:
        self._conn = conn
        self._loop = loop
        self._protocol = EngineProtocol(conn, loop, self._on_event, self._on_lost)
        self._acse_timeout = acse_timeout
        self._dimse_timeout = dimse_timeout
        self._network_timeout = network_timeout
        self._store_handler = store_handler
        self._event_report_handler = event_report_handler

        self._established: asyncio.Future[None] = loop.create_future()
        self._release_done: asyncio.Future[None] | None = None
        self._releasing = False
        self._error: BaseException | None = None

        self._pending: dict[int, _Op] = {}
        self._last_message_id = 0
        self._window = 1
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._stream_done: asyncio.Future[None] | None = None
        self._deferred: list[tuple[int, dimse.Command]] = []
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._contexts_by_class: dict[str, list[PresentationContext]] = {}
        self._context_cache: dict[tuple[str, str | None], PresentationContext] = {}

        # the message being received: (operation or None, command, context id)
        self._rx: tuple[_Op | None, dimse.Command, int] | None = None
        self._progress_at = loop.time()
        self._watchdog: asyncio.TimerHandle | None = None

    # --------------------------------------------------------------- properties

    @property
    def is_established(self) -> bool:
        """True while the association can carry requests."""
        return self._error is None and not self._releasing and self._conn.is_established

    @property
    def request(self) -> p.AssociateRQ:
        """The A-ASSOCIATE-RQ we sent."""
        assert self._conn.request is not None
        return self._conn.request

    @property
    def response(self) -> p.AssociateAC:
        """The peer's A-ASSOCIATE-AC."""
        assert self._conn.response is not None
        return self._conn.response

    @property
    def user_info(self) -> p.UserInformation:
        """The user information of the A-ASSOCIATE-AC (async ops, roles, identity...)."""
        return self.response.user_info

    @property
    def accepted_contexts(self) -> list[PresentationContext]:
        """The accepted presentation contexts, by ID."""
        return [self._conn.contexts[i] for i in sorted(self._conn.contexts)]

    @property
    def rejected_contexts(self) -> list[tuple[p.PresentationContextRQ, int]]:
        """Proposed contexts the peer did not accept, with the result/reason code."""
        results = {c.id: c.result for c in self.response.contexts}
        return [
            (c, results.get(c.id, p.ContextResult.NO_REASON))
            for c in self.request.contexts
            if c.id not in self._conn.contexts
        ]

    @property
    def peer_max_pdu_length(self) -> int:
        """The peer's Maximum Length (0: no limit announced)."""
        return self._conn.peer_max_pdu_length

    @property
    def max_outstanding(self) -> int:
        """How many requests may be outstanding: the async ops window the peer granted
        (PS3.7 D.3.3.3, "maximum number operations invoked"), 1 when not negotiated.

        It may be raised by hand for a peer known to pipeline without negotiating it;
        that is outside the standard, so only do it knowingly.
        """
        return self._window

    @max_outstanding.setter
    def max_outstanding(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_outstanding must be at least 1")
        self._window = value
        self._wake_slots(all_waiters=True)

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet completely answered."""
        return len(self._pending)

    def context_for(
        self, sop_class_uid: str, transfer_syntax: str | None = None
    ) -> PresentationContext:
        """The accepted context for ``sop_class_uid`` (and ``transfer_syntax``, if given).

        Raises ``ValueError`` when no context was accepted for the SOP class, or none
        with that transfer syntax: data is never transcoded.
        """
        key = (sop_class_uid, transfer_syntax)
        found = self._context_cache.get(key)
        if found is not None:
            return found
        candidates = self._contexts_by_class.get(sop_class_uid)
        if not candidates:
            proposed = any(c.abstract_syntax == sop_class_uid for c in self.request.contexts)
            raise ValueError(
                f"no accepted presentation context for SOP class {sop_class_uid}"
                + (" (proposed, but the peer rejected it)" if proposed else " (not proposed)")
            )
        if transfer_syntax is None:
            found = candidates[0]
        else:
            found = next((c for c in candidates if c.transfer_syntax == transfer_syntax), None)
            if found is None:
                accepted = ", ".join(sorted({c.transfer_syntax for c in candidates}))
                raise ValueError(
                    f"the data is in transfer syntax {transfer_syntax} but the peer accepted "
                    f"SOP class {sop_class_uid} only with {accepted}; transcoding is not "
                    "supported, propose a context with the data's transfer syntax"
                )
        self._context_cache[key] = found
        return found

    # ---------------------------------------------------------- context manager

    async def __aenter__(self) -> Requestor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.release()
        else:
            self.abort()

    # ------------------------------------------------------------------- C-ECHO

    async def send_c_echo(self) -> int:
        """C-ECHO (PS3.7 9.1.5); returns the response status."""
        context = self.context_for(dimse.VERIFICATION_SOP_CLASS)
        op = self._new_single(context, with_data=False)
        await self._request(context, dimse.c_echo_rq, None, op)
        response: dimse.Command = await op.future
        return _status(response)

    # ------------------------------------------------------------------ C-STORE

    async def send_c_store(
        self,
        data: StoreSource,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        transfer_syntax: str | None = None,
        priority: int = dimse.Priority.MEDIUM,
        move_originator_ae: str | None = None,
        move_originator_message_id: int | None = None,
    ) -> dimse.Command:
        """C-STORE one instance (PS3.7 9.1.1); returns the C-STORE-RSP command.

        ``data`` is one of:

        * bytes-like: an encoded data set, sent as is; ``sop_class_uid``,
          ``sop_instance_uid`` and ``transfer_syntax`` are required;
        * a sequence (list, tuple...) of bytes-like buffers: one encoded data set
          given in pieces (e.g. a patched header plus views of a shared pixel
          block), sent as consecutive P-DATA fragments of the one message *by
          reference*, without joining them; the UIDs and transfer syntax are required
          as for bytes. Every buffer but the last must have an even length
          (``ValueError`` otherwise, before anything is sent): fragments must be
          even (DCMTK aborts on an odd one), and the buffers are not coalesced, as
          that would copy. Empty buffers are skipped. The buffers must stay
          unchanged until sent (the transport may hold them until the kernel took
          them): immutable ``bytes`` and views of them are safe;
        * a path: a DICOM Part 10 file. Its meta information gives the UIDs and the
          transfer syntax (arguments given anyway must agree); the data set is sent
          as stored, streamed from the file when large so memory stays bounded;
        * a pydicom ``Dataset``: encoded here, in the transfer syntax given, else the
          one of its ``file_meta``, else any accepted uncompressed one.

        The presentation context is chosen by SOP class and transfer syntax; a
        ``ValueError`` says when none matches (nothing is transcoded).
        """
        future = await self.send_c_store_nowait(
            data,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            priority=priority,
            move_originator_ae=move_originator_ae,
            move_originator_message_id=move_originator_message_id,
        )
        return await future

    async def send_c_store_nowait(
        self,
        data: StoreSource,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        transfer_syntax: str | None = None,
        priority: int = dimse.Priority.MEDIUM,
        move_originator_ae: str | None = None,
        move_originator_message_id: int | None = None,
    ) -> asyncio.Future[dimse.Command]:
        """Send a C-STORE-RQ and return a Future of its response, without awaiting it.

        Returns once the request is written (after waiting for a free slot of the
        :attr:`max_outstanding` window and for the socket to drain): the pipelining
        primitive of the load generator. Arguments as for :meth:`send_c_store`.
        """
        options = (priority, move_originator_ae, move_originator_message_id)
        if isinstance(data, bytes | bytearray | memoryview):
            if sop_class_uid is None or sop_instance_uid is None or transfer_syntax is None:
                raise ValueError(
                    "sop_class_uid, sop_instance_uid and transfer_syntax are required "
                    "when the data set is given as bytes"
                )
            context = self.context_for(sop_class_uid, transfer_syntax)
            return await self._store(context, sop_class_uid, sop_instance_uid, data, *options)
        if isinstance(data, list | tuple) or (
            isinstance(data, Sequence) and not isinstance(data, str)
        ):
            if sop_class_uid is None or sop_instance_uid is None or transfer_syntax is None:
                raise ValueError(
                    "sop_class_uid, sop_instance_uid and transfer_syntax are required "
                    "when the data set is given as buffers"
                )
            parts = _even_parts(data)
            context = self.context_for(sop_class_uid, transfer_syntax)
            if len(parts) <= 1:  # one message queued whole: the plain path
                whole = parts[0] if parts else b""
                return await self._store(context, sop_class_uid, sop_instance_uid, whole, *options)
            command = dimse.c_store_rq(0, sop_class_uid, sop_instance_uid, *options)
            op = self._new_single(context, with_data=False)
            await self._send_parts(context, command, parts, op)
            return op.future
        if isinstance(data, str | os.PathLike):
            path = os.fspath(data)
            with store.open_part10(path, sop_class_uid, sop_instance_uid, transfer_syntax) as src:
                header = src.header
                context = self.context_for(header.sop_class_uid, header.transfer_syntax)
                class_uid, instance_uid = header.sop_class_uid, header.sop_instance_uid
                if src.data is not None:
                    return await self._store(context, class_uid, instance_uid, src.data, *options)
                op = self._new_single(context, with_data=False)
                command = dimse.c_store_rq(0, class_uid, instance_uid, *options)
                await self._stream(context, command, src, op)
                return op.future
        from pydicom.dataset import Dataset  # only on this convenience path

        if not isinstance(data, Dataset):
            raise TypeError(
                f"cannot C-STORE a {type(data).__name__}: bytes, buffers, path or Dataset"
            )
        sop_class_uid = sop_class_uid or str(data.SOPClassUID)
        sop_instance_uid = sop_instance_uid or str(data.SOPInstanceUID)
        context = store.dataset_context(
            data,
            sop_class_uid,
            transfer_syntax,
            self.context_for,
            self._contexts_by_class.get(sop_class_uid, []),
        )
        raw = codec.encode_dataset(data, context.transfer_syntax)
        return await self._store(context, sop_class_uid, sop_instance_uid, raw, *options)

    async def _store(
        self,
        context: PresentationContext,
        sop_class_uid: str,
        sop_instance_uid: str,
        data: bytes | bytearray | memoryview,
        priority: int,
        move_originator_ae: str | None,
        move_originator_message_id: int | None,
    ) -> asyncio.Future[dimse.Command]:
        def build(message_id: int) -> dimse.Command:
            return dimse.c_store_rq(
                message_id,
                sop_class_uid,
                sop_instance_uid,
                priority,
                move_originator_ae,
                move_originator_message_id,
            )

        op = self._new_single(context, with_data=False)
        await self._request(context, build, data, op)
        return op.future

    async def _send_parts(
        self,
        context: PresentationContext,
        command: dimse.Command,
        parts: Sequence[Buffer],
        op: _Single,
    ) -> None:
        """Send ``command``, then ``parts`` as the consecutive fragments of its data set.

        Each part goes to the engine by reference (``send_dataset(..., last=False)``
        but for the last part). While nothing pauses the transport the whole message
        is queued in one synchronous step, like :meth:`_request`. When it pauses
        between parts, the message is held open as in :meth:`_stream`:
        ``_stream_done`` is set so that no other request, and no response we owe the
        peer, is interleaved into it (PS3.8 9.3.5), until the last part is queued and
        drained; the DIMSE timeout counts from the end of sending. A failure in the
        middle of the message aborts the association (it is cut short on the wire).
        """
        if (
            self._stream_done is not None
            or len(self._pending) >= self._window
            or self._error is not None
            or self._releasing
        ):
            await self._ready_to_send()
        # No await from the readiness check to the first drain: nothing can slip in.
        loop = self._loop
        protocol = self._protocol
        conn = self._conn
        message_id = self._next_message_id()
        command.MessageID = message_id
        raw = dimse.encode_command(command)  # may raise: nothing registered or sent yet
        self._register(message_id, op)
        done: asyncio.Future[None] | None = None
        last = len(parts) - 1
        sent = -1  # index of the last part queued
        try:
            conn.send_command(context.id, raw)
            for i, part in enumerate(parts):
                conn.send_dataset(context.id, part, last=i == last)
                sent = i
                protocol.flush()
                if protocol.paused:
                    if done is None and i < last:
                        # Mid-message: nobody else may queue PDUs until the end is in.
                        done = loop.create_future()
                        self._stream_done = done
                    await self._drain()
            if done is not None:
                self._progress_at = loop.time()  # the DIMSE timeout starts now
        except BaseException as exc:
            _orphan(op)
            if sent < last and self._error is None:
                # The message is cut short on the wire: the association cannot go on.
                self._abort(AssociationAborted(f"aborted: C-STORE failed while sending: {exc!r}"))
            raise
        finally:
            if done is not None:
                self._stream_done = None
                done.set_result(None)
                self._flush_deferred()

    async def _stream(
        self,
        context: PresentationContext,
        command: dimse.Command,
        source: store.Part10Source,
        op: _Single,
    ) -> None:
        """Send ``command``, then the data set of ``source`` read in chunks.

        Each chunk is a fresh ``bytes`` (one copy from the kernel, no zero-fill)
        because the transport may keep a reference to what it was given until the
        kernel took it (uvloop does); reusing one buffer would need a proof that the
        previous chunk left, which the asyncio transport API cannot give. Awaiting
        drain after each chunk bounds memory to the write buffer's high-water mark
        plus a chunk or two, whatever the file size. Chunks are read in the default
        executor so that a cold disk does not stall other associations on the loop.
        """
        await self._ready_to_send()
        loop = self._loop
        protocol = self._protocol
        conn = self._conn
        # No await from the readiness check to here: nothing can slip in between.
        message_id = self._next_message_id()
        command.MessageID = message_id
        raw = dimse.encode_command(command)  # may raise: nothing registered or sent yet
        done: asyncio.Future[None] = loop.create_future()
        self._stream_done = done
        self._register(message_id, op)
        try:
            conn.send_command(context.id, raw)
            protocol.flush()
            # Whole PDUs per read when they are small; when the peer allows PDUs larger
            # than a read, each read is one PDU (smaller than allowed, which is fine).
            fragment = self._fragment_length()
            read_size = fragment * (STREAM_READ_SIZE // fragment) or STREAM_READ_SIZE
            f = source.file
            remaining = source.length
            while True:
                n = min(read_size, remaining)
                chunk = await loop.run_in_executor(None, store.read_exact, f, n) if n else b""
                if len(chunk) != n:
                    raise OSError(f"file shrank while being sent ({remaining - len(chunk)} left)")
                remaining -= n
                self._raise_if_failed()
                conn.send_dataset(context.id, chunk, last=not remaining)
                protocol.flush()
                del chunk
                if protocol.paused:
                    await self._drain()
                if not remaining:
                    break
            self._progress_at = loop.time()
        except BaseException as exc:
            # The message is cut short on the wire: the association cannot continue.
            _orphan(op)
            if self._error is None:
                self._abort(
                    AssociationAborted(f"aborted: C-STORE of a file failed while sending: {exc!r}")
                )
            raise
        finally:
            self._stream_done = None
            done.set_result(None)
            self._flush_deferred()

    # --------------------------------------------------------- C-FIND/GET/MOVE

    def send_c_find(
        self,
        identifier: Dataset | bytes,
        query_model: str,
        *,
        priority: int = dimse.Priority.MEDIUM,
    ) -> DIMSEOperation:
        """C-FIND (PS3.7 9.1.2): iterate ``(status, identifier)`` over the responses.

        ``query_model`` is a SOP class UID or one of the aliases "P", "S", "O", "W"
        (:data:`workers.scu.codec.QUERY_MODELS`). ``identifier`` is a pydicom Dataset
        (encoded in the context's transfer syntax) or already-encoded bytes.
        """
        context = self.context_for(codec.resolve_query_model("find", query_model))

        def build(message_id: int) -> dimse.Command:
            return dimse.c_find_rq(message_id, context.abstract_syntax, priority)

        return DIMSEOperation(self, context, build, _encode(identifier, context))

    def send_c_get(
        self,
        identifier: Dataset | bytes,
        query_model: str,
        *,
        priority: int = dimse.Priority.MEDIUM,
    ) -> DIMSEOperation:
        """C-GET (PS3.7 9.1.3): iterate ``(status, identifier)`` over the responses.

        The peer sends the instances as C-STORE-RQs on this association; they go to
        the ``store_handler`` given to :func:`associate` and are answered with its
        status. The storage SOP classes must have been proposed, with SCP role
        selection (``roles=[RoleSelection(uid, scu_role=False, scp_role=True)]``).
        """
        context = self.context_for(codec.resolve_query_model("get", query_model))

        def build(message_id: int) -> dimse.Command:
            return dimse.c_get_rq(message_id, context.abstract_syntax, priority)

        return DIMSEOperation(self, context, build, _encode(identifier, context))

    def send_c_move(
        self,
        identifier: Dataset | bytes,
        move_destination: str,
        query_model: str,
        *,
        priority: int = dimse.Priority.MEDIUM,
    ) -> DIMSEOperation:
        """C-MOVE (PS3.7 9.1.4) to the AE ``move_destination``; iterate its responses."""
        context = self.context_for(codec.resolve_query_model("move", query_model))

        def build(message_id: int) -> dimse.Command:
            return dimse.c_move_rq(message_id, context.abstract_syntax, move_destination, priority)

        return DIMSEOperation(self, context, build, _encode(identifier, context))

    # ------------------------------------------------------------------ N-*

    async def send_n_event_report(
        self,
        event_information: Dataset | bytes | None,
        event_type_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        *,
        meta_sop_class_uid: str | None = None,
    ) -> tuple[int, Dataset | None]:
        """N-EVENT-REPORT (PS3.7 10.1.1); returns (status, event reply or None)."""
        return await self._n_request(
            lambda mid: dimse.n_event_report_rq(
                mid, sop_class_uid, sop_instance_uid, event_type_id, event_information is not None
            ),
            event_information,
            meta_sop_class_uid or sop_class_uid,
        )

    async def send_n_get(
        self,
        attribute_identifier_list: Sequence[int] | None,
        sop_class_uid: str,
        sop_instance_uid: str,
        *,
        meta_sop_class_uid: str | None = None,
    ) -> tuple[int, Dataset | None]:
        """N-GET (PS3.7 10.1.2) of the listed tags (all when None or empty)."""
        tags = tuple(int(t) for t in attribute_identifier_list or ()) or None
        return await self._n_request(
            lambda mid: dimse.n_get_rq(mid, sop_class_uid, sop_instance_uid, tags),
            None,
            meta_sop_class_uid or sop_class_uid,
        )

    async def send_n_set(
        self,
        modification_list: Dataset | bytes,
        sop_class_uid: str,
        sop_instance_uid: str,
        *,
        meta_sop_class_uid: str | None = None,
    ) -> tuple[int, Dataset | None]:
        """N-SET (PS3.7 10.1.3); returns (status, attribute list or None)."""
        return await self._n_request(
            lambda mid: dimse.n_set_rq(mid, sop_class_uid, sop_instance_uid),
            modification_list,
            meta_sop_class_uid or sop_class_uid,
        )

    async def send_n_action(
        self,
        action_information: Dataset | bytes | None,
        action_type_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        *,
        meta_sop_class_uid: str | None = None,
    ) -> tuple[int, Dataset | None]:
        """N-ACTION (PS3.7 10.1.4); returns (status, action reply or None)."""
        return await self._n_request(
            lambda mid: dimse.n_action_rq(
                mid,
                sop_class_uid,
                sop_instance_uid,
                action_type_id,
                action_information is not None,
            ),
            action_information,
            meta_sop_class_uid or sop_class_uid,
        )

    async def send_n_create(
        self,
        attribute_list: Dataset | bytes | None,
        sop_class_uid: str,
        sop_instance_uid: str | None = None,
        *,
        meta_sop_class_uid: str | None = None,
    ) -> tuple[int, Dataset | None]:
        """N-CREATE (PS3.7 10.1.5); without ``sop_instance_uid`` the peer assigns one
        (use :meth:`send_dimse` to read it from the response command)."""
        return await self._n_request(
            lambda mid: dimse.n_create_rq(
                mid, sop_class_uid, sop_instance_uid, attribute_list is not None
            ),
            attribute_list,
            meta_sop_class_uid or sop_class_uid,
        )

    async def send_n_delete(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        *,
        meta_sop_class_uid: str | None = None,
    ) -> tuple[int, Dataset | None]:
        """N-DELETE (PS3.7 10.1.6); returns (status, None)."""
        return await self._n_request(
            lambda mid: dimse.n_delete_rq(mid, sop_class_uid, sop_instance_uid),
            None,
            meta_sop_class_uid or sop_class_uid,
        )

    async def _n_request(
        self,
        build: Callable[[int], dimse.Command],
        dataset: Dataset | bytes | None,
        abstract_syntax: str,
    ) -> tuple[int, Dataset | None]:
        context = self.context_for(abstract_syntax)
        raw = None if dataset is None else _encode(dataset, context)
        response, data = await self.send_dimse(context, build, raw)
        limit = self._conn.config.max_dataset_in_memory
        decoded = codec.decode_dataset(data, context.transfer_syntax, limit) if data else None
        return _status(response), decoded

    async def send_dimse(
        self,
        context: PresentationContext,
        build: Callable[[int], dimse.Command],
        dataset: bytes | bytearray | memoryview | None = None,
    ) -> tuple[dimse.Command, bytes | None]:
        """Send any single-response request and return (response command, data set).

        ``build(message_id)`` makes the request command; the data set is sent as is.
        The low-level path under the N-* helpers, for what they do not expose.
        """
        op = self._new_single(context, with_data=True)
        await self._request(context, build, dataset, op)
        result: tuple[dimse.Command, bytes | None] = await op.future
        return result

    # --------------------------------------------------------- release, abort

    async def release(self) -> None:
        """Wait for outstanding operations, then A-RELEASE (PS3.8 7.2).

        A no-op when the association was already over. Raises what ends it if that
        happens during the call (:class:`AssociationAborted` when the peer aborts,
        ``TimeoutError`` when an outstanding operation times out), and
        ``TimeoutError`` (after aborting) if no answer comes within the ACSE timeout.
        """
        if self._error is not None or self._releasing or not self._conn.is_established:
            return
        while self._pending or self._stream_done is not None:
            self._raise_if_failed()
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter
        self._raise_if_failed()
        if self._releasing:
            return  # another task released meanwhile
        self._releasing = True
        done: asyncio.Future[None] = self._loop.create_future()
        self._release_done = done
        self._conn.release(self._loop.time())
        self._protocol.flush()
        try:
            async with asyncio.timeout(self._acse_timeout):
                await asyncio.shield(done)
        except TimeoutError:
            exc = TimeoutError(f"no A-RELEASE-RP within {self._acse_timeout} s")
            self._abort(exc)
            raise exc from None

    def abort(self) -> None:
        """A-ABORT (PS3.8 7.3) now; everything outstanding fails with AssociationAborted."""
        if self._error is None:
            self._abort(AssociationAborted("aborted by the local service user", source=0, reason=0))
        else:
            self._protocol.close(grace=ABORT_GRACE)

    # ================================================================ internals

    def _new_single(self, context: PresentationContext, with_data: bool) -> _Single:
        return _Single(self._loop.create_future(), context, with_data)

    async def _request(
        self,
        context: PresentationContext,
        build: Callable[[int], dimse.Command],
        dataset: bytes | bytearray | memoryview | None,
        op: _Op,
    ) -> int:
        """Send one whole request message once allowed; returns its MessageID."""
        if (
            self._stream_done is not None
            or len(self._pending) >= self._window
            or self._error is not None
            or self._releasing
        ):
            await self._ready_to_send()
        # From here to the end of the queueing no await: the message goes out whole.
        message_id = self._next_message_id()
        command = build(message_id)
        if dataset is not None and command.CommandDataSetType == dimse.NO_DATASET:
            command.CommandDataSetType = dimse.DATASET_PRESENT
        raw = dimse.encode_command(command)  # may raise: nothing registered or sent yet
        self._register(message_id, op)
        conn = self._conn
        conn.send_command(context.id, raw)
        if dataset is not None:
            conn.send_dataset(context.id, dataset)
        protocol = self._protocol
        protocol.flush()
        if protocol.paused:
            try:
                await self._drain()
            except BaseException:
                _orphan(op)
                raise
        return message_id

    async def _ready_to_send(self) -> None:
        """Wait until no file is streaming and the window has a free slot."""
        while True:
            self._raise_if_failed()
            if self._releasing:
                raise RuntimeError("the association is being released")
            if self._stream_done is not None:
                await asyncio.shield(self._stream_done)
                continue
            if len(self._pending) >= self._window:
                waiter: asyncio.Future[None] = self._loop.create_future()
                self._slot_waiters.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    # A wake-up given to a cancelled waiter passes to the next one.
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                        self._wake_slots()
                    raise
                continue
            return

    def _next_message_id(self) -> int:
        """A MessageID not outstanding: 1..65535, wrapping (US, and 0 is not used)."""
        pending = self._pending
        message_id = self._last_message_id
        for _ in range(65535):
            message_id = message_id % 65535 + 1
            if message_id not in pending:
                self._last_message_id = message_id
                return message_id
        raise RuntimeError("all 65535 message IDs are outstanding")  # pragma: no cover

    def _register(self, message_id: int, op: _Op) -> None:
        pending = self._pending
        if not pending:
            self._progress_at = self._loop.time()
            if self._watchdog is None and self._dimse_timeout is not None:
                self._watchdog = self._loop.call_at(
                    self._progress_at + self._dimse_timeout, self._check_watchdog
                )
        pending[message_id] = op

    def _fragment_length(self) -> int:
        """The data-set bytes of one full P-DATA-TF the engine will send, made even:
        DCMTK aborts on odd fragments, and a peer may announce an odd maximum."""
        limit = self._conn.peer_max_pdu_length or _UNLIMITED_PDU
        cap = self._conn.config.max_send_pdu_length
        if cap:
            limit = min(limit, cap)
        return max((limit - 6) & ~1, 2)

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self._network_timeout):
                await self._protocol.drain()
        except TimeoutError:
            exc = TimeoutError(f"the peer took no data for {self._network_timeout} s")
            self._abort(exc)
            raise exc from None
        except ConnectionError:
            self._raise_if_failed()
            raise
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _send_soon(self, context_id: int, command: dimse.Command) -> None:
        """Send a data-set-less message now, or right after the file being streamed."""
        if self._error is not None or self._protocol.closed:
            return
        if self._stream_done is not None:
            self._deferred.append((context_id, command))
            return
        self._conn.send_command(context_id, command)
        self._protocol.flush()

    def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for context_id, command in deferred:
            self._send_soon(context_id, command)
        if not self._pending:
            self._wake_idle()

    # ---------------------------------------------------------- DIMSE timeout

    def _check_watchdog(self) -> None:
        self._watchdog = None
        if not self._pending or self._error is not None or self._dimse_timeout is None:
            return
        now = self._loop.time()
        if self._stream_done is not None:  # still sending: the clock starts after that
            deadline = now + self._dimse_timeout
        else:
            deadline = self._progress_at + self._dimse_timeout
        if now < deadline:  # the peer made progress since the timer was set
            self._watchdog = self._loop.call_at(deadline, self._check_watchdog)
            return
        self._abort(TimeoutError(f"no DIMSE response within {self._dimse_timeout} s"))

    # ------------------------------------------------------- incoming events

    def _on_event(self, event: Indication) -> None:
        kind = type(event)
        if kind is CommandReceived:
            assert isinstance(event, CommandReceived)
            self._progress_at = self._loop.time()
            command = event.command
            if command.CommandField & 0x8000:
                op = self._pending.get(command.MessageIDBeingRespondedTo)  # type: ignore[arg-type]
                if op is None:
                    log.warning(
                        "%s for unknown MessageID %s ignored",
                        _label(command),
                        command.MessageIDBeingRespondedTo,
                    )
                if command.has_dataset:
                    self._rx = (op, command, event.context_id)
                elif op is not None:
                    self._deliver(op, command, None)
            elif command.has_dataset:
                self._rx = (None, command, event.context_id)
            else:
                self._on_request(command, event.context_id, None)
        elif kind is DataSetReceived:
            assert isinstance(event, DataSetReceived)
            rx, self._rx = self._rx, None
            if rx is None:  # pragma: no cover - the engine pairs them
                return
            op, command, context_id = rx
            if command.CommandField & 0x8000:
                if op is not None:
                    self._deliver(op, command, event.data)
            else:
                self._on_request(command, context_id, event.data)
        elif kind is AssociateAccepted:
            self._on_accepted()
        elif kind is AssociateRejected:
            assert isinstance(event, AssociateRejected)
            self._fail_all(AssociationRejected(event.response))
        elif kind is Aborted:
            assert isinstance(event, Aborted)
            who = "peer" if event.by_peer else "service provider"
            self._fail_all(
                AssociationAborted(
                    f"association aborted ({who}): {event.detail}",
                    source=event.source,
                    reason=event.reason,
                    by_peer=event.by_peer,
                )
            )
        elif kind is ReleaseRequested:
            assert isinstance(event, ReleaseRequested)
            if not event.collision:
                # The peer ends the association (Sta8): nothing more can be asked.
                self._fail_all(ConnectionError("the peer released the association"))
            self._conn.release_response(self._loop.time())
        elif kind is Released:
            if self._release_done is not None and not self._release_done.done():
                self._release_done.set_result(None)
            self._fail_all(ConnectionError("the association is released"))

    def _deliver(self, op: _Op, command: dimse.Command, data: bytes | None) -> None:
        if op.deliver(command, data):
            del self._pending[command.MessageIDBeingRespondedTo]  # type: ignore[arg-type]
            if self._slot_waiters:
                self._wake_slots()
            if not self._pending:
                self._wake_idle()

    def _on_accepted(self) -> None:
        by_class: dict[str, list[PresentationContext]] = {}
        for context_id in sorted(self._conn.contexts):
            context = self._conn.contexts[context_id]
            by_class.setdefault(context.abstract_syntax, []).append(context)
        self._contexts_by_class = by_class
        window = 1  # PS3.7 D.3.3.3: no item in the AC means no asynchronous operations
        proposed = self.request.user_info.async_ops
        granted = self.user_info.async_ops
        if proposed is not None and granted is not None:
            # 0 is "unlimited"; a peer granting more than we proposed gets what we asked
            window = min(granted.invoked or UNLIMITED_WINDOW, proposed.invoked or UNLIMITED_WINDOW)
        self._window = window
        if not self._established.done():
            self._established.set_result(None)

    def _on_request(self, command: dimse.Command, context_id: int, data: bytes | None) -> None:
        """A request from the peer: C-STORE sub-operations of a C-GET, N-EVENT-REPORTs."""
        context = self._conn.contexts[context_id]
        field = command.CommandField
        handler: Any  # StoreHandler or EventReportHandler, both None-able
        if field == dimse.CommandField.C_STORE_RQ:
            # a C-STORE-RQ always has a data set, which the engine gives whole
            data = data or b""
            handler, failure = self._store_handler, dimse.Status.STORE_HANDLER_FAILED
            missing = dimse.Status.SOP_CLASS_NOT_SUPPORTED
        elif field == dimse.CommandField.N_EVENT_REPORT_RQ:
            handler, failure = self._event_report_handler, dimse.Status.PROCESSING_FAILURE
            missing = dimse.Status.NO_SUCH_EVENT_TYPE
        elif field == dimse.CommandField.C_ECHO_RQ:
            self._respond(command, context_id, dimse.Status.SUCCESS)
            return
        elif field == dimse.CommandField.C_CANCEL_RQ:
            return  # we perform nothing cancellable
        else:
            self._respond(command, context_id, dimse.Status.UNRECOGNIZED_OPERATION)
            return
        if handler is None:
            self._respond(command, context_id, missing)
            return
        try:
            result = handler(command, data, context)
        except Exception:
            log.exception("%s handler failed", _label(command))
            self._respond(command, context_id, failure)
            return
        if inspect.isawaitable(result):
            task = self._loop.create_task(self._finish(result, command, context_id, failure))
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_tasks.discard)
        else:
            self._respond(command, context_id, _handler_status(result))

    async def _finish(
        self, result: Awaitable[Any], command: dimse.Command, context_id: int, failure: int
    ) -> None:
        try:
            status = _handler_status(await result)
        except Exception:
            log.exception("%s handler failed", _label(command))
            status = failure
        self._respond(command, context_id, status)

    def _respond(self, command: dimse.Command, context_id: int, status: int) -> None:
        if command.MessageID is None:
            return  # nothing to respond to; the engine would have to invent an ID
        self._send_soon(context_id, dimse.response_for(command, status))

    # --------------------------------------------------------------- failure

    def _on_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for task in self._handler_tasks:
            task.cancel()
        detail = f": {exc}" if exc else ""
        self._fail_all(AssociationAborted(f"the connection closed{detail}"))

    def _abort(self, exc: BaseException) -> None:
        """Fail everything with ``exc``, send A-ABORT, close the transport."""
        self._fail_all(exc)
        self._conn.abort(now=self._loop.time())
        self._protocol.flush()
        self._protocol.close(grace=ABORT_GRACE)

    def _fail_all(self, exc: BaseException) -> None:
        """The association is over: remember why and fail every waiter with it."""
        if self._error is None:
            self._error = exc
        exc = self._error
        if not self._established.done():
            self._established.set_exception(exc)
            self._established.exception()  # retrieved: associate() re-raises it
        if self._release_done is not None and not self._release_done.done():
            self._release_done.set_exception(exc)
            self._release_done.exception()  # retrieved: release() re-raises it
        pending, self._pending = self._pending, {}
        for op in pending.values():
            op.fail(exc)
        self._wake_slots(all_waiters=True)
        self._wake_idle()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _wake_slots(self, all_waiters: bool = False) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not all_waiters:
                    return

    def _wake_idle(self) -> None:
        if self._stream_done is not None:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        # with nothing outstanding, every slot waiter may go (no lost wake-ups)
        self._wake_slots(all_waiters=True)


def _orphan(op: _Op) -> None:
    """The caller will never see this operation's future: consume its outcome, so
    that its failure is not also logged as "exception was never retrieved"."""
    if isinstance(op, _Single):
        op.future.add_done_callback(_consume)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _handler_status(result: object) -> int:
    """A handler's answer as a status: an int, or anything with a ``Status``."""
    status = getattr(result, "Status", result)
    if isinstance(status, int) and 0 <= status <= 0xFFFF:
        return status
    log.error("handler returned %r, not a status", result)
    return int(dimse.Status.HANDLER_STATUS_INVALID)


def _even_parts(data: Sequence[object]) -> list[Buffer]:
    """The non-empty buffers of ``data``, checked: each is bytes-like, and all but the
    last have an even length (the engine sends each as whole, even fragments)."""
    parts: list[Buffer] = []
    odd = -1  # index (in ``data``) of the last odd-length buffer seen
    for i, part in enumerate(data):
        if isinstance(part, bytes | bytearray):
            n = len(part)
        elif isinstance(part, memoryview):
            n = part.nbytes
        else:
            raise TypeError(
                f"data set buffer {i} is a {type(part).__name__}, not bytes-like "
                "(bytes, bytearray or memoryview)"
            )
        if n:
            if odd >= 0:  # an odd buffer followed by more data
                raise ValueError(
                    "every data set buffer but the last must have an even length (P-DATA "
                    f"fragments are kept even; join odd buffers first): buffer {odd} "
                    "has an odd length"
                )
            if n & 1:
                odd = i
            parts.append(part)
    return parts


def _encode(data: Dataset | bytes | bytearray | memoryview, context: PresentationContext) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    return codec.encode_dataset(data, context.transfer_syntax)


# ---------------------------------------------------------------- associate


async def associate(
    host: str,
    port: int,
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "PACSRX-SCU",
    contexts: Sequence[acse.Requested],
    max_pdu_length: int = MiB,
    async_ops: p.AsyncOpsWindow | None = None,
    roles: Sequence[p.RoleSelection] = (),
    sop_class_extended: Sequence[p.SOPClassExtended] = (),
    sop_class_common_extended: Sequence[p.SOPClassCommonExtended] = (),
    user_identity: p.UserIdentityRQ | None = None,
    acse_timeout: float | None = 30,
    dimse_timeout: float | None = 30,
    network_timeout: float | None = 60,
    ssl: _ssl.SSLContext | None = None,
    store_handler: StoreHandler | None = None,
    event_report_handler: EventReportHandler | None = None,
    engine_config: EngineConfig | None = None,
) -> Requestor:
    """Open an association with the SCP at ``host:port`` and return the :class:`Requestor`.

    ``contexts`` are proposed with IDs 1, 3, 5... ``async_ops`` proposes an
    asynchronous operations window; what the peer grants bounds the requests in
    flight. ``roles`` are SCP/SCU role selection items (C-GET needs scp_role for the
    storage classes); ``store_handler`` answers the C-STORE sub-operations and
    ``event_report_handler`` N-EVENT-REPORTs the peer sends on this association.
    Timeouts are seconds (None: wait forever): ``network_timeout`` bounds the TCP
    connect and any wait for the peer to take our data, ``acse_timeout`` the
    A-ASSOCIATE and A-RELEASE answers, ``dimse_timeout`` each wait for a DIMSE answer.
    ``engine_config`` tunes the engine (read buffer, in-memory data-set limit...).

    Raises :class:`AssociationRejected`, :class:`AssociationAborted`, ``OSError``
    (``ConnectionRefusedError``...) or ``TimeoutError``.
    """
    loop = asyncio.get_running_loop()
    config = replace(engine_config or EngineConfig(), max_pdu_length=max_pdu_length)
    if acse_timeout is not None:
        config.artim_timeout = acse_timeout
    conn = Connection(Role.REQUESTOR, config)
    request = acse.build_request(
        called_ae,
        calling_ae,
        contexts,
        max_pdu_length=max_pdu_length,
        async_ops=async_ops,
        roles=roles,
        sop_class_extended=sop_class_extended,
        sop_class_common_extended=sop_class_common_extended,
        user_identity=user_identity,
    )
    requestor = Requestor(
        conn,
        loop,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        network_timeout=network_timeout,
        store_handler=store_handler,
        event_report_handler=event_report_handler,
    )
    conn.request_association(request, loop.time())
    protocol = requestor._protocol
    try:
        async with asyncio.timeout(network_timeout):
            await loop.create_connection(lambda: protocol, host, port, ssl=ssl)
    except TimeoutError:
        raise TimeoutError(
            f"no TCP connection to {host}:{port} within {network_timeout} s"
        ) from None
    try:
        async with asyncio.timeout(acse_timeout):
            await asyncio.shield(requestor._established)
    except TimeoutError:
        exc = TimeoutError(f"no A-ASSOCIATE response from {host}:{port} within {acse_timeout} s")
        requestor._abort(exc)
        raise exc from None
    except BaseException:
        requestor.abort()
        raise
    return requestor
