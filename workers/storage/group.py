"""Group commit: instances that wait for durability at the same time share flushes.

Theory of operation
-------------------
With ``fsync always`` every instance needs its data and its directory entry on
stable storage before its Success. Committed one by one, each pays a journal commit
for its data and another for its directory. A :class:`GroupCommitter` is one thread
per worker that takes every commit waiting at that moment and hands them to
:meth:`~.store.Store.commit_group` together: one ``syncfs`` for all their data, then
one ``fsync`` per directory touched (see there for the order and for which failure
fails which instance). Each caller gets its own result, so each Success is sent once
its own instance is covered, and not before.

Company: while a group is being flushed, new commits queue up and form the next
group by themselves. Beyond that, a commit waits at most ``max_wait`` seconds for
instances that are still arriving (other associations of the worker, or the next
operation of an asynchronous operations window), and only while the store has
writers open that are not yet waiting: a commit that is alone does not wait at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .store import InstanceWriter, Store, StoreResult

__all__ = ["GroupCommitter"]

log = logging.getLogger(__name__)

#: (token, result or the exception the commit raised), handed back per group
Delivery = list[tuple[Any, StoreResult | BaseException]]


class GroupCommitter:
    """Commits :class:`InstanceWriter`\\ s of one :class:`Store` in groups, on its
    own thread.

    ``deliver`` is called on that thread once per group with every (token, result)
    of the group: the caller passes it on to its event loop in one hand-off.
    ``observe`` (optional) gets each group's size and duration in seconds.
    """

    def __init__(
        self,
        store: Store,
        deliver: Callable[[Delivery], None],
        *,
        max_wait: float = 0.001,
        max_group: int = 64,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        self.store = store
        self.max_wait = max_wait
        self.max_group = max_group
        self._deliver = deliver
        self._observe = observe
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[tuple[InstanceWriter, Any]] = []
        #: instances the ones queued expect to be joined by (see submit)
        self._expect = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        #: groups committed and instances in them, since start (logs, tests)
        self.groups = 0
        self.instances = 0
        #: seconds spent committing groups (flushes included), since start
        self.seconds = 0.0
        #: True while a group is being flushed
        self.busy = False

    def submit(self, writer: InstanceWriter, token: Any, company: int = 0) -> None:
        """Queue ``writer`` for commit; its result comes back with ``token``.

        ``company``: how many other instances the caller expects soon (other
        associations that are storing right now); the group waits for them, at most
        ``max_wait``.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("group committer is closed")
            self._pending.append((writer, token))
            self._expect = max(self._expect, len(self._pending) + company)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float | None = 10.0) -> None:
        """Commit what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # ------------------------------------------------------------------ thread

    def _take(self) -> list[tuple[InstanceWriter, Any]] | None:
        """The next group, or None once closed and drained."""
        cond = self._cond
        with cond:
            while not self._pending:
                if self._closed:
                    return None
                cond.wait()
            if self.max_wait > 0 and not self._closed:
                # Others are still receiving (the store's count of open writers
                # includes the ones queued here), or other associations are storing
                # and about to send their next instance: give them a moment to join.
                deadline = time.monotonic() + self.max_wait
                while len(self._pending) < self.max_group and (
                    len(self._pending) < self._expect
                    or self.store.open_writers > len(self._pending)
                ):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
            group = self._pending[: self.max_group]
            del self._pending[: self.max_group]
            self._expect = 0
            self.busy = True
            return group

    def _run(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            started = time.perf_counter()
            try:
                delivery = self._commit(group)
            finally:
                with self._cond:
                    self.busy = False
            seconds = time.perf_counter() - started
            self.groups += 1
            self.instances += len(group)
            self.seconds += seconds
            if self._observe is not None:
                self._observe(len(group), seconds)
            try:
                self._deliver(delivery)
            except Exception:  # the loop is gone (shutdown): nobody to answer
                log.debug("group commit results not delivered", exc_info=True)

    def _commit(self, group: Sequence[tuple[InstanceWriter, Any]]) -> Delivery:
        writers = [writer for writer, _ in group]
        try:
            results: Sequence[StoreResult | BaseException] = self.store.commit_group(writers)
        except Exception as exc:
            # A bug, not an I/O error (those are results). Every instance of the group
            # is failed by its caller; their temp files were removed.
            log.exception("group commit failed")
            results = [exc] * len(group)
        return [(token, result) for (_, token), result in zip(group, results, strict=True)]
