"""The aggregator's HTTP side: prometheus-client's own exposition server, plus ``/healthz``.

prometheus-client's WSGI app does the exposition work (text format or OpenMetrics by the
``Accept`` header, gzip when the scraper sends ``Accept-Encoding: gzip``, ``name[]``
filters); it runs under the standard library's threading WSGI server as prometheus-client's
``start_wsgi_server`` does. Around it a small router adds what a receiver's operators
expect: ``/healthz``, ``/readyz`` (503 while the receiver drains), ``HEAD``, 404 for
other paths, 405 naming ``GET, HEAD``, 431 for oversized request headers and a
per-connection timeout so a request that never ends does not hold a thread forever.

Requests are served on threads, but the aggregator's state is plain dicts mutated by the
event loop. So that a scrape sees a consistent state without a lock, the collector that
the HTTP threads call (:class:`_OnLoop`) runs the real collection *on the loop* and waits
for the result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.core import Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["MetricsHTTPServer"]

log = logging.getLogger("metrics.http")

# A scrape carries a handful of short headers; anything near this is not a scraper.
MAX_HEADER_BYTES = 16 * 1024

_StartResponse = Callable[..., Any]
_App = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]


class _OnLoop(Collector):
    """Collects ``inner`` on ``loop``'s thread (the only thread that mutates the state)."""

    def __init__(self, inner: Collector, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.inner = inner
        self.loop = loop
        self.timeout = timeout

    def collect(self) -> Iterator[Metric]:
        result: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(list(self.inner.collect()))
            except BaseException as exc:
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return iter(result.result(self.timeout))


def _router(metrics_app: _App, readiness: Callable[[], tuple[bool, str]] | None = None) -> _App:
    """``/metrics`` to prometheus-client's app (HEAD as a bodiless GET), ``/healthz``,
    ``/readyz`` (``readiness()``: 200 when ready, else 503 with the reason), errors."""

    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed",
                [("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET, HEAD")],
            )
            return [b"method not allowed\n"]
        if path == "/healthz":
            status, body = "200 OK", b"ok\n"
            headers = [("Content-Type", "text/plain; charset=utf-8")]
        elif path == "/readyz":
            ready, why = readiness() if readiness is not None else (True, "ready")
            status = "200 OK" if ready else "503 Service Unavailable"
            body = f"{why}\n".encode()
            headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
        elif path == "/metrics":
            captured: list[Any] = []

            def capture(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
                captured[:] = [status, headers]

            # prometheus-client answers GET only; HEAD is the same answer without its body.
            body = b"".join(metrics_app({**environ, "REQUEST_METHOD": "GET"}, capture))
            status, headers = captured
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: try /metrics, /healthz or /readyz\n"]
        headers = [*headers, ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [b"" if method == "HEAD" else body]

    return app


class _Handler(WSGIRequestHandler):
    """One request per connection, bounded in time and header size, not logged per request."""

    protocol_version = "HTTP/1.1"  # for the errors this class answers itself (431 ...)
    timeout = 10.0

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        size = sum(len(k) + len(v) + 4 for k, v in self.headers.items())
        if size > MAX_HEADER_BYTES:
            self.send_error(431, "request header too large")
            return False
        return True

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: they come every few seconds."""

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("metrics HTTP: " + format, *args)


class MetricsHTTPServer:
    """``GET /metrics`` (from ``registry``) and ``GET /healthz`` on ``host``:``port``.

    :meth:`start` binds (0 picks a free port, see :attr:`port`) and serves on a daemon
    thread; :meth:`close` stops it. Collection runs on the event loop given to
    :meth:`start`, never on the HTTP threads.
    """

    def __init__(
        self,
        registry: Collector,
        host: str = "127.0.0.1",
        port: int = 9464,
        timeout: float = 10.0,
        sock: socket.socket | None = None,
        readiness: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        self.registry = registry
        #: GET /readyz: (ready, why); None: always ready
        self.readiness = readiness
        #: a listening socket bound by the supervisor (kept across restarts of the
        #: aggregator), served instead of binding host:port
        self.sock = sock
        self.host = host
        self.port = port
        self.timeout = timeout
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind and serve. Raises :class:`OSError` when the address cannot be bound."""
        on_loop = CollectorRegistry(auto_describe=False)
        on_loop.register(_OnLoop(self.registry, loop, self.timeout))
        handler_class = type("_BoundHandler", (_Handler,), {"timeout": self.timeout})
        app = _router(make_wsgi_app(on_loop), self.readiness)
        httpd: WSGIServer
        if self.sock is not None:
            server_class = type(
                "_Server", (ThreadingWSGIServer,), {"address_family": self.sock.family}
            )
            httpd = server_class(
                self.sock.getsockname()[:2], handler_class, bind_and_activate=False
            )
            httpd.socket.close()
            self.sock.setblocking(True)
            httpd.socket = self.sock
            httpd.server_address = self.sock.getsockname()
            # What HTTPServer.server_bind would have set, without binding.
            httpd.server_name = str(httpd.server_address[0])
            httpd.server_port = int(httpd.server_address[1])
            httpd.setup_environ()
            httpd.set_app(app)
        else:
            family = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
            server_class = type("_Server", (ThreadingWSGIServer,), {"address_family": family})
            httpd = make_server(
                self.host, self.port, app, server_class=server_class, handler_class=handler_class
            )
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        """Stop serving (in-flight requests end on their own daemon threads)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        # shutdown() waits for serve_forever's next poll: off the loop, which a scrape
        # in flight may be waiting on.
        await asyncio.to_thread(httpd.shutdown)
        httpd.server_close()
