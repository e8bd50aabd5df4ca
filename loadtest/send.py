"""C-STORE of a data set given as several buffers, without joining them.

A synthetic instance is a 1 KiB head plus views of one shared, immutable pixel block
(:mod:`loadtest.payload`); joining them would copy the whole instance per send (and
hold 2 GiB for a 2 GiB instance). :meth:`workers.scu.Requestor.send_c_store_nowait`
takes such a sequence of buffers as one data set and sends them by reference as
consecutive data-set fragments of one message; :func:`send_c_store_parts` is the load
generator's thin call of it, with the presentation context already chosen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from workers.engine import dimse
from workers.engine.connection import PresentationContext
from workers.scu import Requestor

__all__ = ["Buffer", "send_c_store_parts"]

Buffer = bytes | bytearray | memoryview


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
    are), and all but the last have even length (``ValueError`` otherwise).
    """
    return await req.send_c_store_nowait(
        parts,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=context.transfer_syntax,
        priority=priority,
    )
