"""The metrics aggregator: telemetry frames in, Prometheus exposition out.

Theory of operation
-------------------
One process, one event loop (uvloop when installed), two servers:

* a unix stream socket where every worker (and the supervisor) writes frames
  (:mod:`metrics.wire`). Each connection starts with a ``Hello`` naming the sender;
  its records are applied to :class:`State`, plain dicts and ints: deltas are added to
  cumulative totals, snapshots (CPU, memory, open connections and associations) are
  kept per connection and forgotten when it closes. Malformed input is skipped and
  counted, never fatal; a frame over the size limit closes that connection;
* prometheus-client's HTTP server (``GET /metrics``, plus ``GET /healthz``; see
  :mod:`metrics.http`) on 127.0.0.1 by default. The Prometheus ``Collector``
  (:class:`StateCollector`) reads :class:`State` at scrape time, and that collection
  runs on the telemetry's loop, so a scrape sees a consistent state without any lock.

Cardinality is bounded whatever the senders say: every label value coming from the
network goes through a :class:`~metrics.wire.LabelLimiter` (AE titles, SOP classes,
statuses, worker names, reasons ...); past its limit a value folds into ``"other"``.

Layout: :mod:`metrics.state` counts (``State``, no prometheus-client),
:mod:`metrics.exposition` turns the state into metric families at scrape time, this
module runs the two servers around them.

Restarts: the aggregator keeps totals only in memory. When it restarts every counter
starts again from zero, which Prometheus' ``rate()`` handles as a counter reset;
workers keep what they could not deliver and send it to the new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from typing import cast

from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from . import wire as w
from .exposition import StateCollector
from .http import MetricsHTTPServer
from .state import Limits, Source, State

__all__ = ["Aggregator", "Limits", "Source", "State", "StateCollector"]

log = logging.getLogger("metrics.aggregator")

# -- servers ---------------------------------------------------------------------------


class _TelemetryProtocol(asyncio.Protocol):
    """One sender's connection: frames in, applied to the state."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.state = aggregator.state
        self.decoder = w.FrameDecoder()
        self.source: Source | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream server's transports are full Transports (asyncio's and uvloop's)
        self.transport = cast(asyncio.Transport, transport)
        if len(self.state.sources) >= self.aggregator.max_senders:
            log.warning("too many telemetry connections; refusing one")
            transport.close()
            return
        self.source = self.state.open_source()

    def data_received(self, data: bytes) -> None:
        source = self.source
        if source is None:
            return
        try:
            payloads = self.decoder.feed(data)
        except w.FrameError as exc:
            log.warning("telemetry from %s: %s; closing", source.worker or "?", exc)
            self.state.oversized_frames += 1
            self.source = None
            self.state.close_source(source)
            if self.transport is not None:
                self.transport.close()
            return
        for payload in payloads:
            self.state.feed(source, payload)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.source is not None:
            self.state.close_source(self.source)
            self.source = None


class Aggregator:
    """The aggregator's servers around one :class:`State`.

    ``await start()`` binds the unix socket and the HTTP port (0 picks a free port:
    see :attr:`http_port`); ``await close()`` stops both and removes the socket file.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 9464,
        limits: Limits | None = None,
        max_senders: int = 1024,
        http_timeout: float = 10.0,
        http_sock: socket.socket | None = None,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        #: a listening socket to serve HTTP on instead of binding host:port (the
        #: supervisor binds the port before it starts anything, and keeps it across
        #: our restarts: a port in use is found once, at start-up)
        self.http_sock = http_sock
        self.host = host
        self.port = port
        self.max_senders = max_senders
        self.http_timeout = http_timeout
        self.state = State(limits)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(self.state))
        self.http_port = 0
        self._unix: asyncio.AbstractServer | None = None
        self._http: MetricsHTTPServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _remove_stale_socket(self.socket_path)
        old_umask = os.umask(0o177)  # the socket file: owner only
        try:
            self._unix = await loop.create_unix_server(
                lambda: _TelemetryProtocol(self), self.socket_path, backlog=256
            )
        finally:
            os.umask(old_umask)
        self._http = MetricsHTTPServer(
            self.registry, self.host, self.port, self.http_timeout, sock=self.http_sock
        )
        self._http.start(loop)
        self.http_port = self._http.port
        log.info(
            "metrics aggregator: telemetry on %s, http://%s:%d/metrics",
            self.socket_path,
            self.host,
            self.http_port,
        )

    async def close(self) -> None:
        if self._unix is not None:
            self._unix.close()
        if self._http is not None:
            await self._http.close()
        if self._unix is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._unix.wait_closed(), 2.0)
        self._unix = self._http = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def exposition(self) -> bytes:
        """The current metrics, in the Prometheus text format 0.0.4."""
        return generate_latest(self.registry)


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead aggregator; refuse to steal a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another aggregator listens on", path)
