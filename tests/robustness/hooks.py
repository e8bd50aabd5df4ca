"""Handlers the robustness tests bind in the real receiver (``--handler``)."""

from __future__ import annotations

import time
from typing import Any

#: Calling AE title whose association request stalls its worker's event loop.
LAGGER = "LAGGER"
LAG_SECONDS = 3.0


def stall_the_loop(event: Any) -> None:
    """EVT_REQUESTED (a notification handler, called inline on the worker's loop):
    block the loop for a while when the calling AE is :data:`LAGGER`, a stand-in for
    any loop lag (CPU saturation, a GC pause, a slow inline handler)."""
    if event.assoc.requestor.ae_title == LAGGER:
        time.sleep(LAG_SECONDS)


async def slow_user_identity(event: Any) -> tuple[bool, bytes | None]:
    """EVT_USER_ID: a check that takes :data:`LAG_SECONDS` (without blocking the loop)
    for the user ``b"slow"``, e.g. a directory lookup; accepts every user."""
    import asyncio

    if event.primary_field == b"slow":
        await asyncio.sleep(LAG_SECONDS)
    return True, None
