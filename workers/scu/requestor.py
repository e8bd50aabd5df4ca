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

The class is built in layers, dependencies pointing one way: :mod:`.base`
(:class:`~workers.scu.base.RequestorBase`: the state, the send path, the window, the
watchdog, incoming events, failure) under :mod:`.cstore` (C-STORE sending and file
streaming) under :class:`Requestor` here (the other DIMSE services and
:func:`associate`). :mod:`.operations` knows none of them: an operation in flight gets
an :class:`~workers.scu.operations.OperationLink` to send through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING

from workers.engine import acse, dimse
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, PresentationContext, Role

from . import codec
from .base import EventReportHandler, MiB, StoreHandler
from .cstore import CStoreRequestor, _encode
from .operations import DIMSEOperation, _status

if TYPE_CHECKING:
    import ssl as _ssl

    from pydicom.dataset import Dataset

__all__ = [
    "EventReportHandler",
    "Requestor",
    "StoreHandler",
    "associate",
]


class Requestor(CStoreRequestor):
    """An established association, requestor side. Made by :func:`associate`.

    Use it as an async context manager: a normal exit releases the association
    (after outstanding operations complete), an exception aborts it.
    """

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

        return DIMSEOperation(self._link, context, build, _encode(identifier, context))

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

        return DIMSEOperation(self._link, context, build, _encode(identifier, context))

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

        return DIMSEOperation(self._link, context, build, _encode(identifier, context))

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
