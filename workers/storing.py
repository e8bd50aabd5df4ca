"""The C-STORE path of the acceptor: where a data set goes as it arrives (the
built-in store's temp file, a spool file for a user handler, or nowhere when the
request is refused first), the commit (inline, in the I/O pool, or in a group with
other instances waiting for fsync), and what an answered C-STORE is counted as.

It is one part of :class:`workers.association.AssociationProtocol` (a mixin: it
holds no state of its own; the attributes and methods it uses are declared below).
Its lines go to the association's logger, ``workers.association``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from . import events as evt
from . import services
from .engine import dimse
from .engine import pdu as p
from .handlers import Step
from .session import Spool
from .session import discard as _discard
from .storage.store import StoreResult
from .storage.uids import UnsafeUID

if TYPE_CHECKING:
    from collections.abc import Callable

    from .activity import Activity
    from .config import WorkerConfig
    from .engine.connection import Connection
    from .handlers import HandlerRegistry
    from .session import AcceptorServer, Association, Operation, Reporter
    from .session import AssociationPort as _Host
else:
    _Host = object

__all__ = ["StorePath"]

log = logging.getLogger("workers.association")

_STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
_STATUS_INVALID_OBJECT_INSTANCE = 0x0117
_STATUS_CANNOT_UNDERSTAND = 0xC000
#: Refused: Out of Resources (no spool file, a full disk: the data set cannot be kept)
STATUS_OUT_OF_RESOURCES = 0xA700


class StorePath(_Host):
    """The C-STORE handling of :class:`~workers.association.AssociationProtocol`.

    To the type checker it is an :class:`~workers.session.AssociationPort` (what
    :mod:`workers.services` is handed); at run time a plain mixin.
    """

    conn: Connection
    loop: asyncio.AbstractEventLoop
    config: WorkerConfig
    server: AcceptorServer[Any]
    reporter: Reporter[Any]
    assoc: Association
    registry: HandlerRegistry
    activity: Activity
    _last_rx: float
    _window: int

    if TYPE_CHECKING:
        # provided by the other parts of AssociationProtocol
        def _start(
            self, step: Step[Any], done: Callable[[Any, BaseException | None], None]
        ) -> None: ...

        def _operation_done(self, op: Operation, error: BaseException | None) -> None: ...

        def _on_sink_drained(self) -> None: ...

        def _log_instance(self, level: int, op: Operation, result: Any) -> None: ...

        def abort_association(
            self,
            source: int,
            reason: int,
            detail: str,
            flush: bool = True,
            hard_close: bool = False,
        ) -> None: ...

    def _dispatch_operation(self, op: Operation) -> None:
        writer = op.writer
        server = self.server
        company = 0
        if writer is not None and server.committer is not None:
            company = server.store_company(self, self._last_rx)
            op.company = company
        if (
            writer is not None
            and not server.store.remote
            and (
                server.store.config.fsync == "never"
                or (self._window == 1 and server.commit_seconds < self.config.inline_commit_below)
            )
        ):
            # The built-in C-STORE with a synchronous commit: what services.serve ->
            # builtin_store would do through drive(), without a generator, closures
            # and a list per instance (same order: commit, answer, then done).
            # With fsync too, one operation at a time, while the worker's commits have
            # been quick: handing a commit to the I/O pool costs more than the loop
            # loses while a short fsync blocks it (the loop thread and the pool thread
            # pass the GIL back and forth several times per instance). Measured, 8 KiB,
            # 2 workers, same run: 1 association 251-267 -> 447-577 instances/s; 4
            # associations 856 -> 1656/s, at half the CPU. A worker starts out
            # committing in the pool (AssociationServer.commit_seconds); where fsync is
            # slow the average stays above the bound, so the loop (heartbeats, timers,
            # other associations) is never held up by it, and concurrent instances
            # share their flushes in the group committer (workers/storage/group.py),
            # as do the instances of an asynchronous operations window, always. With
            # quick flushes, grouping the instances of window-1 associations means
            # waiting for each other's next instance, which cost more than the
            # flushes it saved (measured, 8 KiB, 4 senders, 2 workers).
            error: BaseException | None = None
            try:
                result = (
                    writer.commit() if server.committer is None else server.timed_commit(writer)
                )
                services.answer_store(self, op, result)
            except Exception as exc:
                error = exc
            try:
                self._operation_done(op, error)
            except Exception:
                log.exception("%s: internal error after an operation", self.assoc.name)
                self.abort_association(p.AbortSource.SERVICE_PROVIDER, 0, "internal error")
            return
        if op.command.CommandField == dimse.CommandField.C_ECHO_RQ and services.answer_echo(
            self, op
        ):
            self._operation_done(op, None)
            return
        self._start(services.serve(self, op), lambda result, error: self._operation_done(op, error))

    def _begin_store(self, op: Operation) -> None:
        """Prepare where the C-STORE data set goes as it arrives (before it does)."""
        cmd = op.command
        ctx = self.conn.contexts[op.context_id]
        # checked already when the data plane decoded it (workers.dataplane)
        problem = None if cmd is self.conn.checked_command else dimse.validate_command(cmd)
        if problem is not None:
            log.warning("%s: invalid C-STORE-RQ: %s", self.assoc.name, problem)
            op.status = _STATUS_CANNOT_UNDERSTAND
        elif cmd.AffectedSOPClassUID != ctx.abstract_syntax:
            op.status = _STATUS_SOP_CLASS_NOT_SUPPORTED
        if not cmd.has_dataset:
            return
        if op.status is not None:
            self.conn.set_dataset_sink(_discard)
            return
        if self.registry.intervention_handler(evt.EVT_C_STORE) is None:
            try:
                op.writer = self.server.store.begin(
                    cmd.AffectedSOPClassUID or "",
                    cmd.AffectedSOPInstanceUID or "",
                    ctx.transfer_syntax,
                    self.assoc.requestor.ae_title,
                )
            except UnsafeUID as exc:
                log.warning("%s: refusing C-STORE: %s", self.assoc.name, exc)
                op.status = _STATUS_INVALID_OBJECT_INSTANCE
                self.conn.set_dataset_sink(_discard)
                return
            if hasattr(op.writer, "on_drain"):  # object store: flow control, no direct fd
                op.writer.on_drain = self._on_sink_drained
                self.conn.set_dataset_sink(op.writer.write)
            else:
                self.conn.set_dataset_sink(op.writer.write, op.writer)
        else:
            try:
                op.spool = Spool(self.server.store.incoming_dir)
            except OSError as exc:
                log.error("%s: cannot spool C-STORE data set: %s", self.assoc.name, exc)
                op.status = STATUS_OUT_OF_RESOURCES
                self.conn.set_dataset_sink(_discard)
                return
            self.conn.set_dataset_sink(op.spool.write)

    def commit_store(self, op: Operation) -> Step[StoreResult]:
        """Commit a built-in store in the I/O pool (it fsyncs); without fsync, or
        when a short fsync costs less than the hand-off (see :meth:`_dispatch_operation`),
        the commit runs inline and never comes here."""
        writer = op.writer
        assert writer is not None
        server = self.server
        committer = server.committer
        if committer is None:
            result = yield self.loop.run_in_executor(server.io_pool, server.timed_commit, writer)
            return result
        # With fsync: in a group with whatever else waits for durability now
        # (workers/storage/group.py); answered once this instance is covered.
        future: asyncio.Future[StoreResult] = self.loop.create_future()
        committer.submit(writer, future, op.company)
        result = yield future
        return result

    def store_done(self, op: Operation, result: Any) -> None:
        """A C-STORE was answered: ``result`` has ``status`` and ``bytes_written``."""
        activity = self.activity
        status = result.status
        # Success (0x0000) and warnings (0x0001, 0xB...) are stored; the rest failed.
        if status == 0 or status == 1 or status & 0xF000 == 0xB000:
            activity.instances += 1
            activity.bytes += result.bytes_written
            if self.server.audit is not None:
                activity.note_instance(
                    op.command.AffectedSOPClassUID or "", getattr(result, "scan", None)
                )
        else:
            activity.failed += 1
        level = self.server.instance_level
        if level is not None:
            self._log_instance(level, op, result)
        self.reporter.stored(self, op, result, time.perf_counter() - op.started)
        if isinstance(result, StoreResult):
            self.server.instance_stored(self, op, result)
