"""Binding and calling event handlers (pynetdicom's event handler contract).

Handlers are bound with ``bind(event, handler, args=None)`` or
``evt_handlers=[(event, handler), (event, handler, args), ...]``; a notification event
takes any number of handlers, an intervention event exactly one (binding another
replaces it). Handlers may be plain functions, generator functions (C-FIND/GET/MOVE),
coroutine functions or async generator functions.

Calling them must never cost the worker: a notification handler that raises is
logged; an intervention handler that raises, returns garbage or runs past its
timeout yields the contract's failure status. Plain functions bound by users run in
a small thread pool by default, so a handler that blocks (or hangs) stalls only the
association that called it, not the other associations of the worker. Built-in
handlers run inline on the event loop.

:func:`drive` runs a step written as a generator that yields awaitables: when nothing
is awaited it completes synchronously (no task, no loop round-trip: the hot path),
otherwise it continues in a task.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .events import (
    BY_NAME,
    Event,
    EventType,
    InterventionEvent,
    NotificationEvent,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[..., Any]
Binding = tuple[Handler, tuple[Any, ...]]
Step = Generator[Awaitable[Any], Any, T]


class HandlerRegistry:
    """Handlers bound to events; one per server and one per association (which
    falls back to its server's)."""

    def __init__(self, parent: HandlerRegistry | None = None) -> None:
        self.parent = parent
        self._notification: dict[NotificationEvent, list[Binding]] = {}
        self._intervention: dict[InterventionEvent, Binding] = {}
        #: handlers that run inline even though they are plain functions
        self.inline: set[Handler] = set()

    def bind(self, event: EventType, handler: Handler, args: Sequence[Any] | None = None) -> None:
        """Bind ``handler`` to ``event``, with extra positional ``args`` after the event."""
        binding = (handler, tuple(args or ()))
        if isinstance(event, InterventionEvent):
            self._intervention[event] = binding
        elif isinstance(event, NotificationEvent):
            bound = self._notification.setdefault(event, [])
            bound[:] = [b for b in bound if b[0] is not handler]
            bound.append(binding)
        else:
            raise TypeError(f"{event!r} is not an event")

    def unbind(self, event: EventType, handler: Handler) -> None:
        """Unbind ``handler`` from ``event``; an intervention event reverts to its default."""
        if isinstance(event, InterventionEvent):
            bound = self._intervention.get(event)
            if bound is not None and bound[0] is handler:
                del self._intervention[event]
        else:
            remaining = [b for b in self._notification.get(event, []) if b[0] is not handler]
            if remaining:
                self._notification[event] = remaining
            else:
                self._notification.pop(event, None)

    def bind_all(self, evt_handlers: Iterable[Sequence[Any]] | None) -> None:
        """Bind ``[(event, handler), (event, handler, args), ...]``."""
        for item in evt_handlers or ():
            if len(item) not in (2, 3):
                raise ValueError(f"evt_handlers items are (event, handler[, args]), not {item!r}")
            self.bind(item[0], item[1], item[2] if len(item) == 3 else None)

    def notification_handlers(self, event: NotificationEvent) -> list[Binding]:
        own = self._notification.get(event)
        inherited = self.parent.notification_handlers(event) if self.parent else []
        if not own:
            return inherited
        return inherited + own if inherited else own

    def has_notification(self, event: NotificationEvent) -> bool:
        return bool(self._notification.get(event)) or bool(
            self.parent and self.parent.has_notification(event)
        )

    def intervention_handler(self, event: InterventionEvent) -> Binding | None:
        bound = self._intervention.get(event)
        if bound is None and self.parent is not None:
            return self.parent.intervention_handler(event)
        return bound

    def get_handlers(self, event: EventType) -> Any:
        """pynetdicom's shape: a list of (handler, args) or one (handler, args)/None."""
        if isinstance(event, InterventionEvent):
            return self.intervention_handler(event)
        return self.notification_handlers(event)


def notify(registry: HandlerRegistry, event: Event) -> None:
    """Call every handler of a notification event; failures are logged, never raised."""
    for handler, args in registry.notification_handlers(event.event):  # type: ignore[arg-type]
        try:
            result = handler(event, *args)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                task.add_done_callback(_log_task_failure)
        except Exception:
            log.exception("notification handler %r for %s failed", handler, event.event.name)


def _log_task_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("handler task failed", exc_info=task.exception())


class _ThreadPool:
    """A handler thread pool that accounts for threads lost to timed-out handlers.

    A thread cannot be stopped: a plain-function handler that hangs past its timeout
    keeps its thread until it returns. Such threads are counted (``stuck``); once as
    many are stuck as the pool has threads, new calls go to a fresh executor (the old
    one keeps its stuck threads until they return), so a few hung handlers never
    leave the worker with no thread to run handlers in. Stuck threads are bounded
    too: past ``max_stuck``, calls fail at once (the caller answers its failure
    status) instead of starting ever more threads.
    """

    def __init__(self, name: str, threads: int, max_stuck: int) -> None:
        self.name = name
        self.threads = threads
        self.max_stuck = max_stuck
        #: threads still running a handler whose caller gave up on it
        self.stuck = 0
        self._stuck_here = 0  # of them, in the current executor
        self._executor: ThreadPoolExecutor | None = None
        self._retired: list[ThreadPoolExecutor] = []
        self._lock = threading.Lock()

    def executor(self) -> ThreadPoolExecutor:
        if self.stuck >= self.max_stuck:
            raise RuntimeError(
                f"{self.stuck} {self.name} handler threads are still running handlers "
                "that timed out: refusing to start more"
            )
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.threads, thread_name_prefix=f"handler-{self.name}"
            )
        return self._executor

    async def run(self, fn: Callable[[], T], timeout: float | None) -> T:
        """Run ``fn`` in a thread of this pool, waiting at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        executor = self.executor()
        state = [False, False, False]  # started, abandoned, finished

        def thread() -> T:
            with self._lock:
                state[0] = True
            try:
                return fn()
            finally:
                with self._lock:
                    state[2] = True
                    if state[1]:
                        self.stuck -= 1
                        if executor is self._executor:
                            self._stuck_here -= 1

        future = loop.run_in_executor(executor, thread)
        if timeout is None:
            return await future
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            with self._lock:
                # Not started: wait_for's cancel took it off the queue. Started: its
                # thread is lost until the handler returns.
                if state[0] and not state[2]:
                    state[1] = True
                    self.stuck += 1
                    if executor is self._executor:
                        self._stuck_here += 1
                        if self._stuck_here >= self.threads:
                            self._retire()
            raise

    def _retire(self) -> None:
        assert self._executor is not None
        log.warning(
            "all %d %s handler threads are running handlers that timed out: "
            "starting new ones (%d stuck in all)",
            self.threads,
            self.name,
            self.stuck,
        )
        self._executor.shutdown(wait=False)
        self._retired.append(self._executor)
        self._executor = None
        self._stuck_here = 0

    def shutdown(self) -> None:
        for executor in [*self._retired, self._executor]:
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        self._retired.clear()


#: Intervention events of association negotiation (user identity key derivation,
#: extended negotiation): their handlers get threads of their own, so that DIMSE
#: handlers that block cannot hold up new associations, nor the other way round.
_ASSOCIATION_EVENTS = frozenset(
    {"EVT_USER_ID", "EVT_ASYNC_OPS", "EVT_SOP_COMMON", "EVT_SOP_EXTENDED"}
)


class HandlerCaller:
    """Calls intervention handlers the way the worker wants: user plain functions in
    a thread pool, every user handler under a timeout.

    Two pools: one for association negotiation (EVT_USER_ID ...) and one for DIMSE
    handlers, each ``threads`` threads, each accounting for the threads that
    timed-out handlers still hold (:class:`_ThreadPool`).
    """

    def __init__(self, timeout: float | None = 60.0, threads: int = 8) -> None:
        self.timeout = timeout
        threads = max(1, threads)
        self.association_pool = _ThreadPool("association", threads, 4 * threads)
        self.dimse_pool = _ThreadPool("dimse", threads, 4 * threads)

    def call(self, binding: Binding, event: Event, inline: bool = False) -> Any:
        """Call the handler. Returns its result, or an awaitable of it when it has to
        be awaited (coroutine, thread pool, timeout)."""
        handler, args = binding
        if inline:
            return handler(event, *args)
        if inspect.iscoroutinefunction(handler):
            return self._timed(handler(event, *args))
        pool = self.association_pool if event.event.name in _ASSOCIATION_EVENTS else self.dimse_pool
        return pool.run(lambda: handler(event, *args), self.timeout)

    async def _timed(self, awaitable: Awaitable[T]) -> T:
        if self.timeout is None:
            return await awaitable
        return await asyncio.wait_for(awaitable, self.timeout)

    def next_item(self, iterator: Any, inline: bool = False) -> Any:
        """The next item of a handler's (async) generator, or StopIteration's sentinel
        :data:`DONE`; may be an awaitable like :meth:`call`."""
        if hasattr(iterator, "__anext__"):
            return self._timed(_anext_or_done(iterator))
        if inline:
            return next(iterator, DONE)
        return self.dimse_pool.run(lambda: next(iterator, DONE), self.timeout)

    def shutdown(self) -> None:
        self.association_pool.shutdown()
        self.dimse_pool.shutdown()


DONE = object()


async def _anext_or_done(iterator: Any) -> Any:
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return DONE


def drive(
    step: Step[T],
    done: Callable[[T | None, BaseException | None], None],
    track: Callable[[asyncio.Future[Any]], None] | None = None,
) -> bool:
    """Run ``step`` until it finishes, calling ``done(result, error)``.

    Returns True when it finished synchronously; otherwise it continues in a task as
    the awaitables it yields complete. ``track`` is given each future awaited (so
    that a server can cancel what is still running when it shuts down).
    """
    return _advance(step, done, None, None, track)


def _advance(
    step: Step[T],
    done: Callable[[T | None, BaseException | None], None],
    value: Any,
    error: BaseException | None,
    track: Callable[[asyncio.Future[Any]], None] | None,
) -> bool:
    while True:
        try:
            awaitable = step.throw(error) if error is not None else step.send(value)
        except StopIteration as stop:
            done(stop.value, None)
            return True
        except (Exception, asyncio.CancelledError) as exc:
            # CancelledError too (a BaseException): a step cancelled at shutdown must
            # still end through ``done``, or its operation would never be finished.
            done(None, exc)
            return True
        if not inspect.isawaitable(awaitable):
            value, error = awaitable, None  # a plain value: hand it straight back
            continue
        future = asyncio.ensure_future(awaitable)
        if track is not None:
            track(future)
        future.add_done_callback(lambda f: _resume(step, done, f, track))
        return False


def _resume(
    step: Step[T],
    done: Callable[[T | None, BaseException | None], None],
    future: Any,
    track: Callable[[asyncio.Future[Any]], None] | None,
) -> None:
    if future.cancelled():
        _advance(step, done, None, asyncio.CancelledError(), track)
        return
    error = future.exception()
    _advance(step, done, None if error else future.result(), error, track)


def resolve(value: Any) -> Step[Any]:
    """``result = yield from resolve(x)``: await x if it is awaitable, else use it."""
    if inspect.isawaitable(value):
        return (yield value)
    return value


def load_handler(path: str) -> Handler:
    """Import ``package.module:function`` (or ``package.module.function``)."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"handler {path!r} is not of the form package.module:function")
    module = importlib.import_module(module_name)
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"handler {path!r} is not callable")
    return target


def parse_bindings(spec: Iterable[str]) -> list[tuple[EventType, Handler]]:
    """Parse ``EVT_NAME=package.module:function`` strings into bindings."""
    out = []
    for item in spec:
        name, sep, path = item.partition("=")
        name = name.strip().upper()
        if not sep or name not in BY_NAME:
            known = ", ".join(sorted(BY_NAME))
            raise ValueError(
                f"handler binding {item!r}: expected EVT_NAME=module:function ({known})"
            )
        out.append((BY_NAME[name], load_handler(path.strip())))
    return out
