"""C-STORE of a data set given as several buffers, without joining them.

:meth:`workers.scu.Requestor.send_c_store_nowait` takes one buffer (or a file, or a
Dataset). A synthetic instance is a 1 KiB head plus views of one shared, immutable
pixel block (:mod:`loadtest.payload`); joining them would copy the whole instance per
send (and hold 2 GiB for a 2 GiB instance). :func:`send_c_store_parts` sends them as
consecutive data-set fragments of one message instead: the engine's
``Connection.send_dataset(..., last=False)`` exists for exactly that, and it queues
large fragments by reference.

The requestor has no public call for it yet, so this module is the one place that
reaches into its internals, mirroring what ``Requestor._stream`` does for files: take
a window slot, register the operation, queue the command, queue each part, and while
waiting for the transport to drain mid-message hold ``_stream_done`` so that nothing
else can be interleaved into the message (PS3.8 9.3.5). A single part goes through
the public API. When the requestor grows a public multi-buffer call, only this module
changes (see loadtest/README-section.md, "What the SCU API should offer").
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from workers.engine import dimse
from workers.engine.connection import PresentationContext
from workers.scu import AssociationAborted, Requestor
from workers.scu import requestor as _requestor_module

__all__ = ["Buffer", "send_c_store_parts"]

Buffer = bytes | bytearray | memoryview

_orphan = _requestor_module._orphan


async def send_c_store_parts(
    req: Requestor,
    context: PresentationContext,
    sop_class_uid: str,
    sop_instance_uid: str,
    parts: Sequence[Buffer],
    priority: int = dimse.Priority.MEDIUM,
) -> asyncio.Future[dimse.Command]:
    """Send a C-STORE-RQ whose data set is ``parts`` concatenated; return the future of
    its response once the whole request is queued (like ``send_c_store_nowait``).

    Every part must stay unchanged until sent (immutable ``bytes`` and views of them
    are), and have even length (DCMTK refuses odd fragments).
    """
    if len(parts) == 1:
        return await req.send_c_store_nowait(
            parts[0],
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=context.transfer_syntax,
            priority=priority,
        )
    r: Any = req  # the internals below are not part of the typed public API
    if r._stream_done is not None or len(r._pending) >= r._window or r._error or r._releasing:
        await r._ready_to_send()
    loop: asyncio.AbstractEventLoop = r._loop
    conn = r._conn
    protocol = r._protocol
    message_id = r._next_message_id()
    raw = dimse.encode_command(
        dimse.c_store_rq(message_id, sop_class_uid, sop_instance_uid, priority)
    )
    op = r._new_single(context, with_data=False)
    r._register(message_id, op)
    done: asyncio.Future[None] | None = None
    last = len(parts) - 1
    try:
        conn.send_command(context.id, raw)
        for i, part in enumerate(parts):
            conn.send_dataset(context.id, part, last=i == last)
            protocol.flush()
            if protocol.paused:
                if i < last and done is None:
                    # Mid-message: nobody else may queue PDUs until the last part is in.
                    done = loop.create_future()
                    r._stream_done = done
                await r._drain()
        if done is not None:
            r._progress_at = loop.time()  # the DIMSE timeout counts from the end of sending
    except BaseException as exc:
        _orphan(op)
        if done is not None and r._error is None:
            r._abort(AssociationAborted(f"aborted: C-STORE failed while sending: {exc!r}"))
        raise
    finally:
        if done is not None:
            r._stream_done = None
            done.set_result(None)
            r._flush_deferred()
    future: asyncio.Future[dimse.Command] = op.future
    return future
