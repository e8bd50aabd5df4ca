"""Storage system-call timings for the telemetry: observed from any thread, bucketed
on the event loop.

The store's ``write(2)``, ``fsync(2)`` and ``syncfs(2)`` run on the loop and in the I/O
pool; each duration is appended to a deque (appends are atomic, no lock on the hot
path) and turned into histogram deltas over :data:`metrics.wire.STORAGE_BUCKETS` once
per telemetry tick (:meth:`StorageTimings._drain_timings`). :class:`StorageTimings` is
a part of :class:`workers.telemetry.Telemetry`, which provides ``_lost`` (count what
had to be thrown away) and sends the ``_storage`` table.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from bisect import bisect_right
from typing import TYPE_CHECKING, Any

from metrics import wire as w

if TYPE_CHECKING:
    from .storage.config import FileOps

__all__ = ["StorageTimings"]

_STORAGE_BOUNDS = w.STORAGE_BUCKETS
STORAGE_WIDTH = len(w.STORAGE_BUCKETS) + 1
#: Storage observations waiting for the next tick, at most (beyond: dropped, counted).
_MAX_OBSERVATIONS = 100_000


class StorageTimings:
    """The storage timings of one process: ``observe_*`` from any thread,
    :meth:`file_ops` to have the store call them, ``_storage`` filled on each tick."""

    def __init__(self) -> None:
        #: op -> [duration sum, bucket counts...]: deltas since the last batch
        self._storage: dict[int, list[Any]] = {}
        # Storage timings may come from pool threads: deque appends are atomic.
        self._writes: collections.deque[float] = collections.deque()
        self._fsyncs: collections.deque[float] = collections.deque()

    def _lost(self, n: int, where: str | None = None) -> None:
        """Count ``n`` observations thrown away (the telemetry reports them)."""
        raise NotImplementedError

    def observe_write(self, seconds: float) -> None:
        """One storage write(2) took ``seconds``. Thread-safe."""
        if len(self._writes) < _MAX_OBSERVATIONS:
            self._writes.append(seconds)
        else:
            self._lost(1)

    def observe_fsync(self, seconds: float) -> None:
        """One storage fsync(2) took ``seconds``. Thread-safe."""
        if len(self._fsyncs) < _MAX_OBSERVATIONS:
            self._fsyncs.append(seconds)
        else:
            self._lost(1)

    def file_ops(self, base: FileOps | None = None) -> FileOps:
        """``base`` (default: the os functions) with write, fsync and syncfs timed
        (a group commit's syncfs counts as one fsync observation)."""
        from .storage.config import FileOps

        ops = base if base is not None else FileOps()
        clock = time.perf_counter
        write, fsync, syncfs = ops.write, ops.fsync, ops.syncfs
        writes, fsyncs = self._writes, self._fsyncs
        note_write, note_fsync = writes.append, fsyncs.append
        lost = self._lost

        # observe_write/observe_fsync inlined: this runs once per data-set fragment.
        def timed_write(fd: int, data: memoryview) -> int:
            t = clock()
            n = write(fd, data)
            if len(writes) < _MAX_OBSERVATIONS:
                note_write(clock() - t)
            else:
                lost(1)
            return n

        def timed_fsync(fd: int) -> None:
            t = clock()
            fsync(fd)
            if len(fsyncs) < _MAX_OBSERVATIONS:
                note_fsync(clock() - t)
            else:
                lost(1)

        def timed_syncfs(fd: int) -> None:
            t = clock()
            syncfs(fd)
            if len(fsyncs) < _MAX_OBSERVATIONS:
                note_fsync(clock() - t)
            else:
                lost(1)

        if write is os.write:
            # The data plane (workers.dataplane) may bypass timed_write and call
            # write(2) itself; it reports the time of the writes it made for one read
            # of the socket, which is observed as one write.
            def observe_direct(seconds: float) -> None:
                if len(writes) < _MAX_OBSERVATIONS:
                    note_write(seconds)
                else:
                    lost(1)

            timed_write.observe_direct = observe_direct  # type: ignore[attr-defined]
        return dataclasses.replace(ops, write=timed_write, fsync=timed_fsync, syncfs=timed_syncfs)

    def _drain_timings(self) -> None:
        """Bucket the write and fsync observations queued since the last tick."""
        self._drain(self._writes, w.StorageOp.WRITE)
        self._drain(self._fsyncs, w.StorageOp.FSYNC)

    def _drain(self, source: collections.deque[float], op: w.StorageOp) -> None:
        """Bucket the observations queued since the last tick (sorted, then one bisect
        per bucket bound: cheaper than one per observation)."""
        n = len(source)
        if not n:
            return
        pop = source.popleft
        items = [pop() for _ in range(n)]  # others may append meanwhile: they wait
        items.sort()
        v = self._storage.get(op)
        if v is None:
            v = self._storage[op] = [0.0] + [0] * STORAGE_WIDTH
        prev = bisect_right(items, 0.0)  # negatives (a clock that stepped back) count as 0
        v[1] += prev
        for i, bound in enumerate(_STORAGE_BOUNDS):
            upto = bisect_right(items, bound)  # le: upper-inclusive
            v[1 + i] += upto - prev
            prev = upto
        v[STORAGE_WIDTH] += n - prev
        v[0] += sum(s for s in items if s > 0.0) if items[0] < 0.0 else sum(items)
