"""The sending end of the telemetry wire: batches of records to the aggregator.

Theory of operation
-------------------
:class:`FrameSender` owns one non-blocking connection to the aggregator's unix
stream socket. Every ``interval`` seconds a timer calls :meth:`FrameSender.flush`,
which asks the subclass for a batch (:meth:`~FrameSender._collect`: delta and snapshot
records, its tables emptied), encodes it into frames (:mod:`metrics.wire`) and writes
them; whatever the kernel does not take at once goes out when the socket is writable
again (``loop.add_writer``).

Nothing is queued per record. While a batch is still going out (the aggregator is
slow) or while there is no aggregator (it is being restarted), no new batch is
collected: the subclass's counts keep adding up. A batch that was not completely
written when the connection broke is handed back record by record
(:meth:`~FrameSender._merge`) and sent on the next connection. Reconnection is retried
on the timer with back-off (``interval`` doubling up to ``reconnect_max``); a
connection that takes no bytes for ``stall_timeout`` seconds is dropped and retried.
The first record on every new connection is the subclass's ``Hello`` (``_hello_due``).

Used by :class:`workers.telemetry.Telemetry` (the counting side, in workers and the
supervisor); this module has no dependency beyond :mod:`metrics.wire`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time

from . import wire as w

__all__ = ["FrameSender"]

_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


class FrameSender:
    """One connection to the aggregator and the batches written on it.

    Subclasses provide :meth:`_collect` (the next batch) and :meth:`_merge` (take back
    a record that was not delivered), and may override :meth:`_prepare` (read polled
    counters before each batch). ``log`` is where connection trouble is reported.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        interval: float,
        stall_timeout: float,
        reconnect_max: float,
        log: logging.Logger,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.interval = interval
        self.stall_timeout = stall_timeout
        self.reconnect_max = reconnect_max
        self._log = log
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sock: socket.socket | None = None
        self._writing = False  # add_writer armed
        self._hello_due = False
        self._out = b""  # the batch being written
        self._sent = 0  # bytes of _out written
        self._batch: list[w.Record] = []
        self._frames: list[tuple[int, int, int]] = []  # (end offset, start, stop) in _batch
        self._progress_at = 0.0
        self._retry_at = 0.0
        self._backoff = 0.0
        self._closed = False
        #: close() is under way: the aggregator may be gone on purpose (the supervisor
        #: stops it before its own last flush), so a lost connection is no news
        self._closing = False

        #: totals since start, for tests and logs
        self.dropped_total = 0
        self.frames_sent = 0
        self.records_sent = 0
        self.connects = 0
        self.disconnects = 0

    # ------------------------------------------------------------ the subclass

    def _prepare(self) -> None:
        """Before each batch: read what is polled rather than counted (default: none)."""

    def _collect(self) -> list[w.Record]:
        """The next batch: records of what was counted since the last one."""
        raise NotImplementedError

    def _merge(self, r: w.Record) -> None:
        """Take back the counts of a record that was not delivered."""
        raise NotImplementedError

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Connect (if the aggregator is there) and arm the periodic flush on the
        running loop. Never waits for the aggregator."""
        self.start_soon(asyncio.get_running_loop())

    def start_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """:meth:`start` for code that is not a coroutine."""
        self._loop = loop
        self._closed = self._closing = False
        self._connect()
        if self._timer is None:
            self._timer = loop.call_later(self.interval, self._tick)

    async def close(self, timeout: float = 1.0) -> None:
        """Send what is left, waiting up to ``timeout`` seconds for the socket to take
        it, then disconnect. What is still unsent then is counted as dropped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while self._out and loop.time() < deadline:  # the batch in flight
                await asyncio.sleep(0.01)
            if not self._out:
                self._retry_at = 0.0
                self.flush()  # the last counts
            while self._out and loop.time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            self._closed = True
            self._disconnect(requeue=False)

    @property
    def connected(self) -> bool:
        """True while a connection to the aggregator is open."""
        return self._sock is not None

    @property
    def backlog(self) -> int:
        """Bytes of the current batch not yet taken by the socket."""
        return len(self._out) - self._sent

    def _tick(self) -> None:
        try:
            self.flush()
        except Exception:  # telemetry must never take the worker down
            self._log.exception("telemetry flush failed")
        if not self._closed and self._loop is not None:
            self._timer = self._loop.call_later(self.interval, self._tick)

    def flush(self) -> None:
        """Prepare and collect a batch and send it, if the socket is free (otherwise
        the counts keep adding up in the subclass's tables).

        Called every ``interval`` by the timer; tests call it directly.
        """
        self._prepare()
        if self._sock is None:
            if time.monotonic() < self._retry_at:
                return
            self._connect()
            if self._sock is None:
                return
        if self._out:  # the previous batch is still going out: let the counts add up
            if time.monotonic() - self._progress_at > self.stall_timeout:
                self._log.warning("telemetry: aggregator took nothing for %gs", self.stall_timeout)
                self._disconnect(requeue=True)
            return
        batch = self._collect()
        frames: list[bytes] = []
        index: list[tuple[int, int, int]] = []
        end = 0
        for frame, start, stop in w.encode_frames(batch):
            frames.append(frame)
            end += len(frame)
            index.append((end, start, stop))
        self._batch = batch
        self._frames = index
        self._out = b"".join(frames)
        self._sent = 0
        self._progress_at = time.monotonic()
        self._send()

    # ------------------------------------------------------------ the socket

    def _connect(self) -> None:
        if self._sock is not None or self._closed:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            # Unix sockets connect at once or fail (EAGAIN: the backlog is full).
            sock.close()
            self._backoff = min(self.reconnect_max, max(self.interval, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                self._log.warning("telemetry: cannot connect to %s: %s", self.socket_path, exc)
            return
        self._sock = sock
        self._hello_due = True
        self.connects += 1
        self._log.debug("telemetry: connected to %s", self.socket_path)

    def _send(self) -> None:
        sock = self._sock
        if sock is None:
            return
        out = self._out
        while self._sent < len(out):
            try:
                n = sock.send(memoryview(out)[self._sent :], _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                if not self._writing and self._loop is not None and not self._closed:
                    self._loop.add_writer(sock.fileno(), self._send)
                    self._writing = True
                return
            except OSError as exc:
                log = self._log.debug if self._closing else self._log.info
                log("telemetry: aggregator connection lost: %s", exc)
                self._disconnect(requeue=True)
                return
            self._sent += n
            self._progress_at = time.monotonic()
        # The whole batch is with the kernel.
        self.frames_sent += len(self._frames)
        self.records_sent += len(self._batch)
        self._backoff = 0.0
        self._out = b""
        self._sent = 0
        self._batch = []
        self._frames = []
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing and self._sock is not None and self._loop is not None:
            try:
                self._loop.remove_writer(self._sock.fileno())
            except (ValueError, OSError):
                pass
        self._writing = False

    def _disconnect(self, requeue: bool) -> None:
        """Close the socket; put back the records of frames not completely written."""
        sock = self._sock
        if sock is None:
            return
        self._stop_writing()
        self._sock = None
        sock.close()
        self.disconnects += 1
        if self._out:
            for end, start, stop in self._frames:
                if end <= self._sent:
                    self.frames_sent += 1
                    self.records_sent += stop - start
                    continue
                for r in self._batch[start:stop]:
                    if requeue:
                        self._merge(r)
                    elif not isinstance(r, w.Dropped):
                        self.dropped_total += _weight(r)
        self._out = b""
        self._sent = 0
        self._batch = []
        self._frames = []
        if not self._closed:
            self._backoff = min(self.reconnect_max, max(self.interval, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff


def _weight(r: w.Record) -> int:
    """How many counted things a record stands for."""
    if isinstance(r, w.CStore | w.Storage):
        return sum(r.buckets)
    if isinstance(r, w.Connections):
        return r.opened
    count = getattr(r, "count", None)
    return count if isinstance(count, int) else 0
