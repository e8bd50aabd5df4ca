"""One load-generator process: a uvloop event loop driving its share of associations.

Theory of operation
-------------------
The parent (:mod:`loadtest.runner`) starts N of these with ``multiprocessing``
(spawn), each with a :class:`~loadtest.config.Share`: how many associations, how many
operations (``--count``), what rate. A process builds its payload template, reports
"ready" on the result queue and waits for the parent's "go" in the shared control
array, so that every process starts at the same moment and pydicom's import and the
template are not part of the measurement.

Each association is one task that opens the association, sends, and re-opens it when
``--per-association`` operations are done. Sending never waits for a response unless
the window is full: up to the granted asynchronous operations window
(``Requestor.max_outstanding``, 1 without ``--async-ops``) requests are outstanding;
the response is handled in a done-callback that records the latency, the status, the
bytes. Bookkeeping is plain attribute arithmetic and one histogram increment.

The process stops issuing operations when its ``--count`` share is used up, when the
``--duration`` deadline passes, or when the parent sets "stop" (first Ctrl-C); in-flight
operations then get ``--grace`` seconds to finish before every association is aborted,
which is also what "abort" (second Ctrl-C) does at once. Ctrl-C itself is ignored here:
the terminal sends it to the whole process group and only the parent decides.

Every operation consumes one unit of the count, including a failed association set-up
(otherwise a dead target would keep a ``--count`` run going forever), so every run ends.

Counters for the live progress line are copied into the shared progress array ten
times a second; the full :class:`~loadtest.stats.Stats` go back over the queue at the
end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import signal
import time
import traceback
from collections.abc import Sequence
from typing import Any

from workers.engine import acse, dimse
from workers.engine.connection import PresentationContext
from workers.scu import AsyncOpsWindow, Requestor, associate

from .config import RunConfig, Share
from .payload import FileEntry, Template, UidSource, build_template, file_sha256
from .send import send_c_store_parts
from .stats import Stats, classify, status_text

__all__ = [
    "ABORT",
    "GO",
    "PROGRESS_FIELDS",
    "STOP",
    "WAIT",
    "worker_main",
]

# control array: [state, start (monotonic), deadline (monotonic, 0 = none)]
WAIT, GO, STOP, ABORT = 0.0, 1.0, 2.0, 3.0
# progress array, per process: operations, instances, bytes, failed, associations
PROGRESS_FIELDS = 5

_TICK = 0.1
_OK = (dimse.SUCCESS, dimse.WARNING)


class _Slots:
    """Outstanding requests on one association, and the sender waiting for a free one."""

    __slots__ = ("busy", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.busy = 0
        self.waiter: asyncio.Future[None] | None = None

    def release(self) -> None:
        self.busy -= 1
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def below(self, n: int) -> None:
        """Wait until fewer than ``n`` requests are outstanding."""
        while self.busy >= n:
            self.waiter = self.loop.create_future()
            await self.waiter
        self.waiter = None


class Worker:
    def __init__(
        self,
        cfg: RunConfig,
        share: Share,
        ctl: Any,
        progress: Any,
        template: Template | None,
        uids: UidSource,
    ) -> None:
        self.cfg = cfg
        self.share = share
        self.ctl = ctl
        self.progress = progress
        self.template = template
        self.uids = uids
        self.stats = Stats()
        self.remaining = share.count
        self.stopping = False
        self.stopped_at: float | None = None
        self.aborting = False
        self.requestors: set[Requestor] = set()
        self.interval = 1.0 / share.rate if share.rate else 0.0
        self.next_at = 0.0
        self.op_number = 0
        self.files: list[FileEntry] = cfg.files[share.index :: max(1, len(cfg.shares()))]
        self.file_index = 0
        self.file_digests: dict[str, str] = {}
        self.record: io.TextIOWrapper | None = None
        if cfg.record_path:
            self.record = open(f"{cfg.record_path}.{share.index}", "w", encoding="ascii")  # noqa: SIM115
        self.contexts = self._contexts()
        self.async_ops = (
            AsyncOpsWindow(cfg.async_ops, cfg.async_ops) if cfg.async_ops is not None else None
        )

    def _contexts(self) -> list[acse.Requested]:
        cfg = self.cfg
        out: list[acse.Requested] = []
        if cfg.scenario in ("echo", "mixed"):
            out.append(acse.Requested(dimse.VERIFICATION_SOP_CLASS))
        if cfg.scenario == "echo":
            return out
        if cfg.files:
            pairs = sorted({(f.sop_class_uid, f.transfer_syntax) for f in cfg.files})
            out += [acse.Requested(sop, (ts,)) for sop, ts in pairs]
        else:
            out.append(acse.Requested(cfg.sop_class, (cfg.transfer_syntax,)))
        return out

    # ------------------------------------------------------------------- main

    async def run(self) -> Stats:
        loop = asyncio.get_running_loop()
        ctl = self.ctl
        while ctl[0] == WAIT:
            await asyncio.sleep(0.005)
        self.stats.started = ctl[1]
        cpu_at_start = _cpu_seconds()
        if ctl[0] >= STOP:
            self.stats.interrupted = True
            return self.stats
        ticker = loop.create_task(self._tick())
        body = self._echo_loop if self.cfg.scenario == "echo" else self._store_loop
        tasks = [loop.create_task(body()) for _ in range(self.share.associations)]
        try:
            await asyncio.gather(*tasks)
        finally:
            ticker.cancel()
            for req in list(self.requestors):
                req.abort()
            self._publish()
            if self.record is not None:
                self.record.close()
        if not self.stats.finished:
            self.stats.finished = self.stats.started
        self.stats.cpu_seconds = _cpu_seconds() - cpu_at_start
        return self.stats

    async def _tick(self) -> None:
        ctl = self.ctl
        deadline = ctl[2]
        while True:
            await asyncio.sleep(_TICK)
            self._publish()
            state = ctl[0]
            now = time.monotonic()
            if not self.stopping and (state >= STOP or (deadline and now >= deadline)):
                self.stopping = True
                self.stopped_at = now
                if state >= STOP:
                    self.stats.interrupted = True
            if self.stopping and not self.aborting:
                assert self.stopped_at is not None
                if state >= ABORT or now - self.stopped_at >= self.cfg.grace:
                    self.aborting = True
                    for req in list(self.requestors):
                        req.abort()

    def _publish(self) -> None:
        s = self.stats
        base = self.share.index * PROGRESS_FIELDS
        p = self.progress
        p[base] = s.operations
        p[base + 1] = s.instances
        p[base + 2] = s.bytes
        p[base + 3] = s.failed
        p[base + 4] = s.associations

    # --------------------------------------------------------------- budget

    def _take(self) -> bool:
        """One operation's worth of the budget, if it is not used up and not stopping."""
        if self.stopping:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True

    def _refund(self) -> None:
        if self.remaining is not None:
            self.remaining += 1

    def _more(self) -> bool:
        return not self.stopping and (self.remaining is None or self.remaining > 0)

    async def _pace(self) -> bool:
        """Wait for this operation's turn under ``--rate``; False when stopping meanwhile."""
        loop_time = time.monotonic
        now = loop_time()
        at = self.next_at if self.next_at > now else now
        self.next_at = at + self.interval
        while True:
            if self.stopping:
                return False
            wait = at - loop_time()
            if wait <= 0:
                return True
            await asyncio.sleep(min(wait, _TICK))

    async def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, _TICK))

    # ---------------------------------------------------------- association

    async def _open(self) -> Requestor:
        cfg = self.cfg
        return await associate(
            cfg.host,
            cfg.port,
            called_ae=cfg.called_ae,
            calling_ae=cfg.calling_ae,
            contexts=self.contexts,
            max_pdu_length=cfg.max_pdu,
            async_ops=self.async_ops,
            acse_timeout=cfg.acse_timeout,
            dimse_timeout=cfg.dimse_timeout,
            network_timeout=cfg.dimse_timeout,
        )

    async def _open_measured(self) -> Requestor | None:
        t0 = time.perf_counter()
        try:
            req = await self._open()
        except Exception as exc:
            self.stats.fail("A-ASSOCIATE", *classify(exc))
            self.stats.finished = time.monotonic()
            return None
        self.stats.hist("A-ASSOCIATE").record(time.perf_counter() - t0)
        self.stats.associations += 1
        self.requestors.add(req)
        if self.aborting:
            req.abort()
        return req

    async def _close(self, req: Requestor) -> bool:
        """Release (or, when aborting, abort) ``req``; True if released normally."""
        self.requestors.discard(req)
        if self.aborting:
            req.abort()
            return False
        if not req.is_established:
            return False  # the peer aborted; its operations' failures are counted
        t0 = time.perf_counter()
        try:
            await req.release()
        except Exception as exc:
            self.stats.fail("A-RELEASE", *classify(exc))
            req.abort()
            return False
        self.stats.hist("A-RELEASE").record(time.perf_counter() - t0)
        return True

    # ------------------------------------------------------- store / mixed

    async def _store_loop(self) -> None:
        backoff = 0.05
        while self._more():
            req = await self._open_measured()
            if req is None:
                if self.remaining is not None:
                    self.remaining -= 1  # a failed set-up is a failed operation
                await self._sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            try:
                healthy = await self._send_on(req)
            finally:
                released = await self._close(req)
            if not (healthy and released):
                await self._sleep(backoff)

    async def _send_on(self, req: Requestor) -> bool:
        """Send operations on ``req`` until its quota, the budget or a stop; False when
        the association failed under us."""
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        window = req.max_outstanding
        slots = _Slots(loop)
        limit = cfg.per_association
        mixed = cfg.scenario == "mixed"
        sent = 0
        ok = True
        try:
            context = self._store_context(req)
        except ValueError as exc:  # the peer did not accept our presentation context
            if not self._take():
                return True
            self.stats.fail("C-STORE", "error", str(exc))
            return False
        while limit is None or sent < limit:
            if slots.busy >= window:
                await slots.below(window)
            if not req.is_established:
                ok = False
                break
            if not self._take():
                break
            if self.interval and not await self._pace():
                self._refund()
                break
            sent += 1
            self.op_number += 1
            if mixed and self.op_number % cfg.echo_every == 0:
                self._echo_nowait(req, slots)
                continue
            if not await self._store_one(req, context, slots):
                ok = False
                break
        await slots.below(1)
        return ok and req.is_established

    def _store_context(self, req: Requestor) -> PresentationContext | None:
        if self.cfg.files:
            return None
        return req.context_for(self.cfg.sop_class, self.cfg.transfer_syntax)

    async def _store_one(
        self, req: Requestor, context: PresentationContext | None, slots: _Slots
    ) -> bool:
        template = self.template
        digest = ""
        if template is not None:
            assert context is not None
            uid = self.uids.next()
            parts: Sequence[bytes | memoryview] = template.parts(uid)
            nbytes = template.size
            if self.record is not None:
                digest = template.sha256(uid)
            t0 = time.perf_counter()
            try:
                future = await send_c_store_parts(req, context, template.sop_class_uid, uid, parts)
            except Exception as exc:
                self._store_failed(uid, exc)
                return False
        else:
            entry = self.files[self.file_index % len(self.files)]
            self.file_index += 1
            uid = entry.sop_instance_uid
            nbytes = entry.dataset_length
            if self.record is not None:
                digest = self.file_digests.get(entry.path) or file_sha256(entry)
                self.file_digests[entry.path] = digest
            t0 = time.perf_counter()
            try:
                future = await req.send_c_store_nowait(entry.path)
            except Exception as exc:
                self._store_failed(uid, exc)
                return False
        slots.busy += 1
        future.add_done_callback(
            functools.partial(self._store_done, slots, t0, nbytes, uid, digest)
        )
        return True

    def _store_failed(self, uid: str, exc: BaseException) -> None:
        kind, detail = classify(exc)
        self.stats.fail("C-STORE", kind, detail)
        self.stats.finished = time.monotonic()
        if self.record is not None:
            self.record.write(f"{uid}\t{kind}\t0\t-\n")

    def _store_done(
        self,
        slots: _Slots,
        t0: float,
        nbytes: int,
        uid: str,
        digest: str,
        future: asyncio.Future[dimse.Command],
    ) -> None:
        slots.release()
        stats = self.stats
        end = time.perf_counter()
        stats.finished = time.monotonic()
        if future.cancelled():
            stats.fail("C-STORE", "error", "cancelled")
            return
        exc = future.exception()
        if exc is not None:
            kind, detail = classify(exc)
            stats.fail("C-STORE", kind, detail)
            if self.record is not None:
                self.record.write(f"{uid}\t{kind}\t0\t-\n")
            return
        status = future.result().Status or 0
        stats.hist("C-STORE").record(end - t0)
        stats.status("C-STORE", status)
        if dimse.status_category(status) in _OK:
            stats.operations += 1
            stats.instances += 1
            stats.bytes += nbytes
        else:
            stats.fail("C-STORE", "status", status_text(status))
        if self.record is not None:
            self.record.write(f"{uid}\t0x{status:04X}\t{nbytes}\t{digest}\n")

    def _echo_nowait(self, req: Requestor, slots: _Slots) -> None:
        slots.busy += 1
        task = asyncio.get_running_loop().create_task(req.send_c_echo())
        task.add_done_callback(functools.partial(self._echo_done, slots, time.perf_counter()))

    def _echo_done(self, slots: _Slots, t0: float, task: asyncio.Future[int]) -> None:
        slots.release()
        stats = self.stats
        end = time.perf_counter()
        stats.finished = time.monotonic()
        if task.cancelled():
            stats.fail("C-ECHO", "error", "cancelled")
            return
        exc = task.exception()
        if exc is not None:
            stats.fail("C-ECHO", *classify(exc))
            return
        status = task.result()
        stats.hist("C-ECHO").record(end - t0)
        stats.status("C-ECHO", status)
        if dimse.status_category(status) in _OK:
            stats.operations += 1
        else:
            stats.fail("C-ECHO", "status", status_text(status))

    # ------------------------------------------------------------------ echo

    async def _echo_loop(self) -> None:
        """associate + C-ECHO + release, again and again: the set-up rate."""
        stats = self.stats
        while self._take():
            if self.interval and not await self._pace():
                self._refund()
                break
            t0 = time.perf_counter()
            req = await self._open_measured()
            if req is None:
                await self._sleep(0.05)
                continue
            ok = False
            try:
                t1 = time.perf_counter()
                status = await req.send_c_echo()
                t2 = time.perf_counter()
                stats.hist("C-ECHO").record(t2 - t1)
                stats.status("C-ECHO", status)
                if dimse.status_category(status) in _OK:
                    ok = True
                else:
                    stats.fail("C-ECHO", "status", status_text(status))
            except Exception as exc:
                stats.fail("C-ECHO", *classify(exc))
            finally:
                released = await self._close(req)
            stats.finished = time.monotonic()
            # a failed C-ECHO or release was counted as this cycle's failure already
            if ok and released:
                stats.operations += 1
                stats.hist("echo cycle").record(time.perf_counter() - t0)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _ignore_sigint() -> None:
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_main(cfg: RunConfig, share: Share, ctl: Any, progress: Any, queue: Any) -> None:
    """Entry point of a worker process (multiprocessing target)."""
    _ignore_sigint()
    try:
        import uvloop

        uids = UidSource(cfg.run_id, share.index)
        template = None
        if cfg.scenario != "echo" and not cfg.files:
            template = build_template(cfg.size, cfg.sop_class, cfg.transfer_syntax, uids)
        queue.put(("ready", share.index, template.size if template else None))
        worker = Worker(cfg, share, ctl, progress, template, uids)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            stats = runner.run(worker.run())
        queue.put(("result", share.index, stats.to_wire()))
    except BaseException:
        queue.put(("error", share.index, traceback.format_exc()))
