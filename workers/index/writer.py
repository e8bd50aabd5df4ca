"""The worker's index writer: records queued by the event loop, written in batches
by one thread.

The event loop must never wait for the database, so :meth:`IndexWriter.submit` only
appends to a bounded deque (no lock: ``deque.append`` and ``len`` are atomic under the
GIL) and wakes the thread when it sleeps. The thread takes whatever has queued (up
to ``batch_size``), lingering a moment first when there is less than a batch so that
a steady stream makes few large transactions, and writes it with one
:meth:`~.base.Index.add_many`. A failed batch is retried with back-off, kept in hand
meanwhile; if the queue is full, new records are dropped and counted, never waited
for. A dropped or unwritten record is not lost for good: the instance is on disk,
and the start-up reconcile indexes files without records.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from .base import Index
from .record import IndexRecord, Row

__all__ = ["IndexWriter"]

log = logging.getLogger("workers.index")


class IndexWriter:
    """Batches :class:`IndexRecord` s into ``index`` from a daemon thread.

    Counters (read by telemetry; plain ints written by one thread):
    :attr:`written`, :attr:`errors` (failed batch attempts), :attr:`dropped`
    (queue full, or given up at close); :attr:`lag` is records accepted and not yet
    written.
    """

    def __init__(
        self,
        index: Index,
        *,
        max_queue: int = 50_000,
        batch_size: int = 1_000,
        linger: float = 0.05,
        replace: bool = True,
        retry_max: float = 5.0,
    ) -> None:
        self.index = index
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.linger = linger
        self.replace = replace
        self.retry_max = retry_max
        self.written = 0
        self.errors = 0
        self.dropped = 0
        self.batches = 0
        self._queue: collections.deque[IndexRecord | Row] = collections.deque()
        self._in_flight = 0
        self._wake = threading.Event()
        self._closing = False
        self._stop = threading.Event()  # set by close(): ends a linger at once
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    @property
    def lag(self) -> int:
        """Records accepted and not yet written."""
        return len(self._queue) + self._in_flight

    def submit(self, record: IndexRecord | Row) -> bool:
        """Queue a record (or its :data:`~.record.Row`); never blocks. False if it
        was dropped (queue full/closed)."""
        queue = self._queue
        if self._closing or len(queue) >= self.max_queue:
            self.dropped += 1
            return False
        queue.append(record)
        if not self._wake.is_set():
            self._wake.set()
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.lag:
            self._wake.set()
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), then stop."""
        self._closing = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("index writer: %d records not written at close", self.lag)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait()
            self._wake.clear()
            if not queue:
                if self._closing:
                    return
                continue
            if len(queue) < self.batch_size and not self._closing:
                self._stop.wait(self.linger)
            while queue:
                batch: list[IndexRecord | Row] = []
                take = min(len(queue), self.batch_size)
                self._in_flight = take
                for _ in range(take):
                    batch.append(queue.popleft())
                self._write(batch)
                self._in_flight = 0
            if self._closing and not queue:
                return

    def _write(self, batch: list[IndexRecord | Row]) -> None:
        delay = 0.05
        # While closing, one more attempt at most: shutdown must not hang on a dead
        # database (reconcile catches up at the next start).
        while True:
            try:
                self.index.add_many(batch, replace=self.replace)
            except Exception as exc:
                self.errors += 1
                log.warning("index writer: batch of %d failed: %s", len(batch), exc)
                if self._closing and delay > 0.05:
                    self.dropped += len(batch)
                    return
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            self.written += len(batch)
            self.batches += 1
            return
