"""What a connection is configured with, and the vocabulary of its API.

:class:`EngineConfig` (limits and switches, all with safe defaults),
:class:`MemoryBudget` and :class:`ReadBufferPool` (shared by the connections of one
process, each owned by whoever makes those connections), :class:`Role`,
:class:`PresentationContext`, :class:`LocalProtocolError`, and the data-set sinks the
user may attach. Import them from :mod:`workers.engine.connection` as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

#: A peer that announces no maximum still gets PDUs no larger than this from us.
UNLIMITED_SEND_CAP = 4 * 1024 * 1024

#: Read buffer of a connection that is not yet associated: an A-ASSOCIATE-RQ is a few
#: hundred bytes to a few KiB, and a peer that connects and sends nothing (or is
#: refused) must not hold the full read buffer (see Connection.get_buffer).
UNASSOCIATED_READ_SIZE = 4096

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
    #: read buffers recycled between the connections that share it; None: fresh ones
    buffer_pool: ReadBufferPool | None = None


@dataclass(slots=True, frozen=True)
class PresentationContext:
    """An accepted presentation context."""

    id: int
    abstract_syntax: str
    transfer_syntax: str


class ReadBufferPool:
    """Read buffers of connections that ended, by size, for new ones.

    A fresh buffer is zero-filled, and at hundreds of associations a second that memset
    (and the cache it evicts) is a good part of setting each up. A recycled one holds an
    earlier connection's bytes, which are never read: only ``[_start, _end)`` ever is,
    and every byte of it is received anew. One pool serves the connections of one
    process (or one server): whoever makes them owns it and passes it in
    :attr:`EngineConfig.buffer_pool`; without one, every connection gets fresh buffers.
    """

    __slots__ = ("_spare", "keep")

    def __init__(self, keep: int = 16) -> None:
        #: at most this many spare buffers of each size are kept
        self.keep = keep
        self._spare: dict[int, list[bytearray]] = {}

    def take(self, size: int) -> bytearray:
        """A read buffer of ``size`` bytes: a recycled one when there is one."""
        spare = self._spare.get(size)
        if spare:
            try:
                return spare.pop()
            except IndexError:  # another thread (an SCU in a handler) took the last one
                pass
        return bytearray(size)

    def give(self, buf: bytearray, sizes: tuple[int, ...]) -> None:
        """Keep ``buf`` for a later connection, when its size is one of ``sizes`` and
        nothing else holds it or a view of it (a memoryview keeps a reference to the
        bytearray, so the reference count tells: the caller must hold no other)."""
        # three references: the caller's, ``buf`` and getrefcount's argument
        if len(buf) not in sizes or sys.getrefcount(buf) != 3:
            return
        spare = self._spare.setdefault(len(buf), [])
        if len(spare) < self.keep:
            spare.append(buf)

    def spare(self, size: int) -> list[bytearray]:
        """The buffers of ``size`` kept now (a copy, for tests and statistics)."""
        return list(self._spare.get(size, ()))
