"""C-STORE from the requestor: bytes, buffers, a Part 10 file (streamed) or a data set.

Small messages are queued whole in one synchronous step; a Part 10 file larger than one
read is streamed with awaits between chunks while ``_stream_done`` holds other
requests back (see :mod:`workers.scu.requestor`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

from workers.engine import dimse
from workers.engine.connection import PresentationContext

from . import codec, store
from .base import MiB, RequestorBase, _orphan
from .operations import AssociationAborted, _Single

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["CStoreRequestor", "StoreSource"]

log = logging.getLogger("workers.scu.requestor")

#: How much of a streamed file is read (and queued for the socket) at a time.
STREAM_READ_SIZE = 1 * MiB

Buffer: TypeAlias = "bytes | bytearray | memoryview"
StoreSource: TypeAlias = (
    "bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]"
    " | str | os.PathLike[str] | Dataset"
)


class CStoreRequestor(RequestorBase):
    """The C-STORE methods of :class:`~workers.scu.requestor.Requestor`."""

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
