"""The services a worker answers from the instance index: Storage Commitment (always,
when the index is there) and query/retrieve (``--query-retrieve``).

:class:`IndexedServices` is the worker's one object for them. It is installed on an
:class:`~workers.server.AssociationServer` (``server.indexed``) and plugs into
:mod:`workers.services` two ways, both only when the user bound no handler of their
own to the event:

* :meth:`builtin_binding` gives the C-FIND / C-GET / C-MOVE handlers of
  :mod:`workers.qr`, which the handler machinery runs like a user's (in the handler
  thread pool: they read the index and the files);
* :meth:`n_action_step` gives the Storage Commitment N-ACTION step
  (:mod:`workers.commitment`), which answers at once and then owes the requestor an
  N-EVENT-REPORT.

The index (:func:`workers.index.open_index`) is thread-safe; it is opened when the
services start, in a thread, so a slow database never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import events as evt
from .config import IndexedSettings

if TYPE_CHECKING:
    from .commitment import Commitment
    from .handlers import Binding, Step
    from .index import Index
    from .index.query import Condition
    from .session import AssociationPort, Operation, ServerPort

log = logging.getLogger("workers.indexed")

__all__ = ["IndexedServices", "IndexedSettings"]


class IndexedServices:
    """The index-backed services of one worker (see the module doc)."""

    def __init__(
        self,
        server: ServerPort,
        settings: IndexedSettings,
        *,
        index: Index | None = None,
    ) -> None:
        from .commitment import Commitment
        from .qr import QueryRetrieve

        self.server = server
        self.settings = settings
        self.index: Index | None = index
        self._own_index = index is None
        #: verification (file digests) and other blocking work of these services
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="indexed")
        self.qr = QueryRetrieve(self)
        self.commitment: Commitment = Commitment(self)
        self._bindings: dict[evt.InterventionEvent, Binding] = {}
        if settings.query_retrieve:
            self._bindings = {
                evt.EVT_C_FIND: (self.qr.find, ()),
                evt.EVT_C_GET: (self.qr.get, ()),
                evt.EVT_C_MOVE: (self.qr.move, ()),
            }
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ae_title(self) -> str:
        return self.server.config.ae_title

    @property
    def storage_root(self) -> str:
        return self.server.store.root

    @property
    def object_digest(self) -> Callable[[str], tuple[int, str]] | None:
        """How storage commitment checks an ``s3://`` record (``--storage s3://``:
        the object store's ``object_digest``); None with the local store."""
        return getattr(self.server.store, "object_digest", None)

    # ------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Open the index (in a thread) and resume the reports still owed."""
        self._loop = asyncio.get_running_loop()
        if self.index is None:
            from .index import open_index

            self.index = await self._loop.run_in_executor(
                self.pool,
                lambda: open_index(self.settings.index, self.storage_root, node=self.settings.node),
            )
        if self.settings.commitment:
            self.commitment.start()

    async def close(self) -> None:
        """Stop sending reports (those not delivered stay in the index) and close."""
        await self.commitment.close()
        if self._own_index and self.index is not None:
            index, self.index = self.index, None
            await asyncio.get_running_loop().run_in_executor(self.pool, index.close)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------ hooks for services

    def builtin_binding(self, event: evt.InterventionEvent) -> Binding | None:
        """The built-in handler for ``event`` (C-FIND/GET/MOVE), or None."""
        if self.index is None:
            return None
        return self._bindings.get(event)

    def n_action_step(self, proto: AssociationPort, op: Operation) -> Step[None] | None:
        """The Storage Commitment step for this N-ACTION-RQ, or None when it is not one."""
        if not self.settings.commitment or self.index is None:
            return None
        return self.commitment.n_action(proto, op)

    # ------------------------------------------------------------- for parts

    def select(
        self, level: str, equal: dict[str, str], conditions: Sequence[Condition] = ()
    ) -> list[Any]:
        """Index rows (present instances) for a query; any thread."""
        assert self.index is not None
        return self.index.select(level, equal, conditions)

    def count(self, service: str, label: str, n: int = 1) -> None:
        """Count for the metrics (any thread; the telemetry lives on the loop)."""
        telemetry = self.server.telemetry
        loop = self._loop
        if telemetry is None or loop is None or not hasattr(telemetry, "service"):
            return
        try:
            if _on_loop(loop):
                telemetry.service(service, label, n)
            else:
                loop.call_soon_threadsafe(telemetry.service, service, label, n)
        except RuntimeError:
            pass  # the loop is closing


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
