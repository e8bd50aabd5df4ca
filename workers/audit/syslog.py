"""RFC 5424 syslog to an audit record repository: UDP, TCP or TLS, never blocking.

Theory of operation
-------------------
:meth:`SyslogSender.submit` puts a message builder on a bounded queue and returns at
once; when the queue is full the message is dropped and counted (``dropped``). One
daemon thread takes builders off the queue, builds the XML (so the event loop never
spends time on it), frames it and sends it:

* ``udp://host:port``: one datagram a message (RFC 5426);
* ``tcp://host:port``: octet counting, ``LEN SP MESSAGE`` (RFC 6587 3.4.1);
* ``tls://host:port``: the same framing inside TLS (RFC 5425), the collector's
  certificate checked against ``ca`` (or the system store), a client certificate
  sent when ``cert`` is given (IHE ATNA's mutual node authentication).

A collector that is down or stops reading costs the thread, never the caller: a
connection attempt or a send that takes longer than ``timeout`` seconds fails, that
message is dropped and counted, and the next attempt waits a back-off (up to
``max_backoff`` s) during which further messages are dropped at once, not queued
behind a dead peer. ``sent`` and ``dropped`` are read by the telemetry.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

__all__ = ["SyslogSender", "frame", "parse_url"]

log = logging.getLogger("workers.audit")

#: facility 10 (security/authorization, "authpriv"), severity 5 (notice): IHE ATNA
PRI_FACILITY = 10
SEVERITY_NOTICE = 5
SEVERITY_WARNING = 4
#: the MSGID of audit messages in the DICOM/IHE format
MSGID = "DICOM+RFC3881"
SCHEMES = ("udp", "tcp", "tls")


def parse_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``udp://host:port`` / ``tcp://`` / ``tls://``;
    ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{url!r}: the scheme must be udp://, tcp:// or tls://")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    if port is None:
        port = 6514 if parts.scheme == "tls" else 514
    return parts.scheme, parts.hostname, port


def frame(
    payload: bytes,
    *,
    app_name: str,
    hostname: str,
    severity: int = SEVERITY_NOTICE,
    procid: str | None = None,
    when: datetime | None = None,
) -> bytes:
    """An RFC 5424 message: header, no structured data, ``payload`` as MSG."""
    moment = (when or datetime.now(UTC)).isoformat(timespec="milliseconds")
    if moment.endswith("+00:00"):
        moment = moment[:-6] + "Z"
    pri = PRI_FACILITY * 8 + severity
    host, app = _field(hostname, 255), _field(app_name, 48)
    proc = _field(procid or str(os.getpid()), 128)
    header = f"<{pri}>1 {moment} {host} {app} {proc} {MSGID} -"
    return header.encode("ascii") + b" " + payload


def _field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, or "-"."""
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


class SyslogSender:
    """Sends audit messages to one collector from a thread of its own."""

    def __init__(
        self,
        url: str,
        *,
        app_name: str = "pacs-receiver",
        hostname: str | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        queue_size: int = 1000,
        timeout: float = 5.0,
        max_backoff: float = 10.0,
    ) -> None:
        self.scheme, self.host, self.port = parse_url(url)
        self.url = url
        self.app_name = app_name
        self.hostname = hostname or socket.gethostname()
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.context: ssl.SSLContext | None = None
        if self.scheme == "tls":
            self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            self.context.minimum_version = ssl.TLSVersion.TLSv1_2
            if cert:
                self.context.load_cert_chain(cert, key or cert)
        self._queue: queue.Queue[tuple[Callable[[], bytes], int] | None] = queue.Queue(
            maxsize=max(1, queue_size)
        )
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._warned = False
        #: messages delivered to the socket
        self.sent = 0
        # Two counters, each written by one side only: no lock, no lost update.
        self._dropped_full = 0  # by submit (queue full)
        self._dropped_send = 0  # by the thread (collector down, bad message)
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def submit(self, build: Callable[[], bytes], severity: int = SEVERITY_NOTICE) -> bool:
        """Queue a message (``build()`` makes its XML, in the sender's thread);
        False when it was dropped. Never blocks; callable from any thread."""
        try:
            self._queue.put_nowait((build, severity))
        except queue.Full:
            self._dropped_full += 1
            return False
        return True

    @property
    def dropped(self) -> int:
        """Messages thrown away: queue full, collector unreachable or too slow."""
        return self._dropped_full + self._dropped_send

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))

    # ----------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:  # close()
                break
            build, severity = item
            try:
                payload = build()
                data = frame(
                    payload, app_name=self.app_name, hostname=self.hostname, severity=severity
                )
            except Exception:
                log.exception("audit: cannot build a message (dropped)")
                self._dropped_send += 1
                continue
            if self._deliver(data):
                self.sent += 1
            else:
                self._dropped_send += 1
        self._disconnect()

    def _deliver(self, data: bytes) -> bool:
        if self._sock is None:
            if time.monotonic() < self._retry_at:
                return False  # in back-off: a dead collector does not hold the queue
            try:
                self._sock = self._connect()
            except OSError as exc:
                self._failed(f"cannot reach {self.url}: {exc}")
                return False
        try:
            if self.scheme == "udp":
                self._sock.send(data)
            else:
                self._sock.sendall(b"%d " % len(data) + data)
        except OSError as exc:
            self._disconnect()
            self._failed(f"cannot send to {self.url}: {exc}")
            return False
        if self._warned:
            log.info("audit: %s reachable again", self.url)
        self._backoff = 0.0
        self._warned = False
        return True

    def _connect(self) -> socket.socket:
        if self.scheme == "udp":
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.settimeout(self.timeout)
        if self.context is not None:
            try:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
            except OSError:
                sock.close()
                raise
        return sock

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _failed(self, why: str) -> None:
        self._backoff = min(self.max_backoff, max(0.5, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff
        if not self._warned:
            self._warned = True  # one line per outage, not one per message
            log.warning("audit: %s; messages are dropped (and counted) until it is back", why)
