"""What the requestor hands out besides itself: errors and operations in flight.

An outstanding request is a :class:`_Single` (one response: C-ECHO, C-STORE, N-*) or
a :class:`_Multi` (C-FIND, C-GET, C-MOVE: Pending responses until a final one); the
requestor keeps them by MessageID and calls ``deliver`` with each matching response or
``fail`` when the association ends. :class:`DIMSEOperation` is the user's view of a
:class:`_Multi`: an async iterator with ``cancel()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

from workers.engine import dimse
from workers.engine import pdu as p
from workers.engine.connection import PresentationContext

from . import codec

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "AssociationAborted",
    "AssociationError",
    "AssociationRejected",
    "DIMSEOperation",
    "OperationLink",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- errors


class AssociationError(Exception):
    """Base of the association-level failures raised by this module."""


class AssociationRejected(AssociationError):
    """The peer answered the A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ (PS3.8 9.3.4)."""

    def __init__(self, rj: p.AssociateRJ) -> None:
        self.rj = rj
        self.result = rj.result
        self.source = rj.source
        self.reason = rj.reason
        super().__init__(
            f"association rejected: result {_name(p.RejectResult, rj.result)}, "
            f"source {_name(p.RejectSource, rj.source)}, reason {rj.reason}"
            + (
                f" ({_name(p.RejectReason, rj.reason)})"
                if rj.source == p.RejectSource.SERVICE_USER
                else ""
            )
        )


class AssociationAborted(AssociationError, ConnectionError):
    """The association ended abnormally: A-ABORT from either side, or the transport
    closed under it (A-P-ABORT; ``source`` and ``reason`` are None then)."""

    def __init__(
        self,
        detail: str,
        *,
        source: int | None = None,
        reason: int | None = None,
        by_peer: bool = False,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.source = source
        self.reason = reason
        self.by_peer = by_peer


def _name(enum: Any, value: int) -> str:
    try:
        return str(enum(value).name)
    except ValueError:
        return str(value)


# ------------------------------------------------------------------- operations


class _Single:
    """An outstanding request answered by exactly one response."""

    __slots__ = ("context", "future", "with_data")

    def __init__(
        self, future: asyncio.Future[Any], context: PresentationContext, with_data: bool
    ) -> None:
        self.future = future
        self.context = context
        self.with_data = with_data

    def deliver(self, command: dimse.Command, data: bytes | None) -> bool:
        if not self.future.done():
            self.future.set_result((command, data) if self.with_data else command)
        return True

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _Multi:
    """An outstanding C-FIND/GET/MOVE: responses queue up until a non-Pending one."""

    __slots__ = ("context", "error", "finished", "items", "keep", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, context: PresentationContext) -> None:
        self.loop = loop
        self.context = context
        self.items: deque[tuple[dimse.Command, bytes | None]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.finished = False
        self.keep = True  # False once the consumer closed: responses are dropped
        self.error: BaseException | None = None

    def deliver(self, command: dimse.Command, data: bytes | None) -> bool:
        final = dimse.status_category(_status(command)) != dimse.PENDING
        if self.keep:
            self.items.append((command, data))
        self.finished = final
        self._wake()
        return final

    def fail(self, exc: BaseException) -> None:
        if not self.finished:
            self.error = exc
        self._wake()

    async def next(self) -> tuple[dimse.Command, bytes | None] | None:
        """The next response, or None after the final one; raises the failure."""
        while not self.items:
            if self.error is not None:
                raise self.error
            if self.finished:
                return None
            self.waiter = self.loop.create_future()
            await self.waiter
        return self.items.popleft()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_Op: TypeAlias = "_Single | _Multi"


@dataclass(frozen=True, slots=True)
class OperationLink:
    """What an operation needs from the association that carries it, handed down by
    the requestor so that this module never reaches back into it: its loop, a way to
    send a request (``send_request(context, build, data, op)`` returns the MessageID)
    and a way to queue a command now (the C-CANCEL-RQ), and the largest data set it
    may inflate for a handler (the engine's ``max_dataset_in_memory``)."""

    loop: asyncio.AbstractEventLoop
    send_request: Callable[
        [PresentationContext, Callable[[int], dimse.Command], bytes | None, _Multi],
        Awaitable[int],
    ]
    send_soon: Callable[[int, dimse.Command], None]
    max_dataset: int


def _status(command: dimse.Command) -> int:
    # A response without (0000,0900) cannot be understood: not a success.
    return command.Status if command.Status is not None else int(dimse.Status.CANNOT_UNDERSTAND)


class DIMSEOperation:
    """A C-FIND, C-GET or C-MOVE in progress: an async iterator of (status, identifier).

    The request is sent when iteration starts. Each response yields its Status and
    its identifier decoded with pydicom (None when it has none). Iteration ends after
    the final (non-Pending) response. ``cancel()`` sends a C-CANCEL-RQ (PS3.7 9.3.2.3);
    the peer then ends the operation, typically with status 0xFE00. Leaving early is
    best done with ``async with``: closing an unfinished operation cancels it and drops
    the rest of its responses. ``response`` is the last response command (sub-operation
    counts of C-GET/C-MOVE live there).
    """

    def __init__(
        self,
        link: OperationLink,
        context: PresentationContext,
        build: Callable[[int], dimse.Command],
        identifier: bytes,
    ) -> None:
        self._link = link
        self._context = context
        self._build = build
        self._identifier = identifier
        self._op: _Multi | None = None
        self._cancelled = False
        self._closed = False
        self.message_id: int | None = None
        self.response: dimse.Command | None = None

    def __aiter__(self) -> DIMSEOperation:
        return self

    async def __anext__(self) -> tuple[int, Dataset | None]:
        if self._closed:
            raise StopAsyncIteration
        if self._op is None:
            await self.start()
        assert self._op is not None
        item = await self._op.next()
        if item is None:
            raise StopAsyncIteration
        command, data = item
        self.response = command
        identifier = None
        if data:
            try:
                identifier = codec.decode_dataset(
                    data,
                    self._context.transfer_syntax,
                    self._link.max_dataset,
                )
            except Exception:
                log.exception("undecodable identifier in %s", _label(command))
        return _status(command), identifier

    async def start(self) -> None:
        """Send the request now (iteration does it on first use)."""
        if self._op is not None:
            return
        op = _Multi(self._link.loop, self._context)
        self._op = op
        try:
            self.message_id = await self._link.send_request(
                self._context, self._build, self._identifier, op
            )
        except BaseException as exc:
            # never sent, or the association died: later iterations raise, not hang
            op.error = exc
            raise

    def cancel(self) -> None:
        """Ask the peer to cancel the operation with a C-CANCEL-RQ (once)."""
        op = self._op
        if op is None or op.finished or self._cancelled or self.message_id is None:
            return
        self._cancelled = True
        self._link.send_soon(self._context.id, dimse.c_cancel_rq(self.message_id))

    async def aclose(self) -> None:
        """Stop iterating; an unfinished operation is cancelled, its responses dropped."""
        self._closed = True
        op = self._op
        if op is not None and not op.finished:
            op.keep = False
            op.items.clear()
            self.cancel()

    async def __aenter__(self) -> DIMSEOperation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _label(command: dimse.Command) -> str:
    try:
        return dimse.CommandField(command.CommandField).label
    except ValueError:
        return f"command {command.CommandField:#06x}"
