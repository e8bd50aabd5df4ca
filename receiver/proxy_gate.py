"""The acceptor's side of the PROXY protocol (``--proxy-protocol-from``).

With the option, every accepted connection passes this gate before anything else
looks at it (``--allow-ip``, the limits, the calling-AE peek, the hand-off):

* from a **trusted** address (in ``--proxy-protocol-from``) the stream MUST start with
  a v1 or v2 header (:mod:`receiver.proxy`). The gate peeks until the header is
  complete, then consumes exactly its bytes: what stays queued is the client's own
  stream (the A-ASSOCIATE-RQ, or a TLS ClientHello), untouched. The header's source
  address becomes the connection's peer address for everything downstream; a LOCAL
  (health check) or UNKNOWN header keeps the socket's own.
* from any **other** address the stream must NOT start with one: a client that sends a
  PROXY header straight to us would otherwise choose its own address. The gate peeks
  the first bytes (a DICOM or TLS peer's first byte decides at once) and hands the
  connection on untouched.

A refused connection is closed without an A-ASSOCIATE-RJ (the peer is a balancer or
something pretending to be one, not a DICOM requestor), logged in one line and counted
by reason (``pacs_proxy_protocol_rejected_total``). Waits are bounded: the header must
be complete within the network timeout; a peer that closes before is "truncated".

Peeked bytes stay in the receive queue, so a socket with part of a header queued is
readable again at once: SO_RCVLOWAT is raised to the bytes still needed while
waiting (as in the calling-AE peek), and put back to 1 before the socket moves on.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import Callable, Iterable

from .access import Network, parse_networks, peer_address
from .proxy import (
    V2_MAX_BYTES,
    Command,
    ProxyError,
    ProxyHeader,
    Reason,
    looks_like_header,
    parse,
)

log = logging.getLogger("receiver.proxy")

Peer = tuple[str, int]


def _peer_closed(fd: int) -> bool:
    """The peer of the TCP socket ``fd`` shut its side down (or it failed)."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    return any(events & gone for _fd, events in poller.poll(0))


async def _readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    """Wait until ``fd`` is readable; TimeoutError after ``timeout`` seconds."""
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(waiter, max(timeout, 0.0))
    finally:
        loop.remove_reader(fd)


async def read_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float
) -> ProxyHeader:
    """Read the PROXY header at the start of ``sock`` (non-blocking), consuming
    exactly its bytes. Raises ProxyError (reason "truncated" when the peer closes
    first, "timeout" when it is not complete within ``timeout`` seconds)."""
    deadline = loop.time() + timeout
    sock.setblocking(False)
    fd = sock.fileno()
    low_water = 1
    try:
        while True:
            try:
                data: bytes | None = sock.recv(V2_MAX_BYTES, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            except OSError as exc:
                raise ProxyError(Reason.TRUNCATED, f"connection failed: {exc}") from None
            if data is not None:
                if not data:
                    raise ProxyError(Reason.TRUNCATED, "closed before sending a header")
                result = parse(data)
                if isinstance(result, ProxyHeader):
                    try:
                        _consume(sock, result.length)
                    except OSError as exc:
                        raise ProxyError(Reason.TRUNCATED, f"connection failed: {exc}") from None
                    return result
                if _peer_closed(fd):
                    raise ProxyError(
                        Reason.TRUNCATED, f"closed after {len(data)} byte(s) of a header"
                    )
                if result != low_water:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, result)
                    low_water = result
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await _readable(loop, fd, remaining)
            except TimeoutError:
                got = len(data) if data else 0
                raise ProxyError(
                    Reason.TIMEOUT, f"header not complete within {timeout:g} s ({got} byte(s))"
                ) from None
    finally:
        if low_water != 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass  # closed meanwhile


def _consume(sock: socket.socket, length: int) -> None:
    """Take exactly ``length`` bytes, already queued (they were peeked)."""
    view = memoryview(bytearray(length))
    got = 0
    while got < length:
        n = sock.recv_into(view[got:], length - got)
        if n == 0:
            raise ProxyError(Reason.TRUNCATED, "closed while the header was read")
        got += n


async def sniff_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float
) -> bool | None:
    """Does the stream of ``sock`` start with a PROXY signature? Peeks only. None when
    the peer closed, or sent too little to say within ``timeout`` seconds."""
    deadline = loop.time() + timeout
    sock.setblocking(False)
    fd = sock.fileno()
    low_water = 1
    try:
        while True:
            try:
                data: bytes | None = sock.recv(16, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            except OSError:
                return None
            if data is not None:
                if not data:
                    return None
                verdict = looks_like_header(data)
                if verdict is not None:
                    return verdict
                if _peer_closed(fd):
                    return None
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(data) + 1)
                low_water = len(data) + 1
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await _readable(loop, fd, remaining)
            except TimeoutError:
                return None
    finally:
        if low_water != 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass


def _closed_empty(sock: socket.socket) -> bool:
    """The peer closed and nothing of its stream is left to read."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ProxyGate:
    """``--proxy-protocol-from``: who must send a header, and the gate itself.

    ``count(reason)`` is called once per refused connection (the metrics counter)."""

    def __init__(
        self,
        trusted: Iterable[str],
        header_timeout: float,
        sniff_timeout: float,
        count: Callable[[str], None] | None = None,
    ) -> None:
        self.trusted: tuple[Network, ...] = parse_networks(trusted)
        self.header_timeout = header_timeout
        self.sniff_timeout = sniff_timeout
        self.count = count
        #: refused connections, by reason (also for tests and status)
        self.refused: dict[str, int] = {}

    def trusts(self, host: str) -> bool:
        """Is ``host`` (as accept() gave it) one that must send a header?"""
        addr = peer_address(host)
        return addr is not None and any(
            addr.version == net.version and addr in net for net in self.trusted
        )

    async def admit(self, sock: socket.socket, addr: Peer) -> Peer | None:
        """The peer address to use for ``sock`` accepted from ``addr``, or None when
        the connection was refused (then it is closed, logged and counted)."""
        loop = asyncio.get_running_loop()
        host, port = str(addr[0]), int(addr[1])
        if self.trusts(host):
            try:
                header = await read_header(loop, sock, self.header_timeout)
            except ProxyError as exc:
                self._refuse(sock, host, port, exc.reason, exc.detail)
                return None
            if header.command == Command.LOCAL and _closed_empty(sock):
                # The balancer's health check (connect, LOCAL, close): nothing to serve.
                log.debug("PROXY v2 LOCAL from %s: health check", _show(host, port))
                sock.close()
                return None
            if header.source is None:
                return host, port  # LOCAL / UNKNOWN: the balancer's own connection
            log.debug(
                "PROXY v%d from %s: client %s",
                header.version,
                _show(host, port),
                _show(*header.source),
            )
            return header.source
        verdict = await sniff_header(loop, sock, self.sniff_timeout)
        if verdict is None:
            log.info("closing connection from %s: nothing to serve came", _show(host, port))
            sock.close()
            return None
        if verdict:
            self._refuse(
                sock,
                host,
                port,
                Reason.UNTRUSTED,
                "PROXY protocol header from an address not in --proxy-protocol-from",
            )
            return None
        return host, port

    def _refuse(self, sock: socket.socket, host: str, port: int, reason: str, why: str) -> None:
        sock.close()
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.warning(
            "closing connection from %s: PROXY protocol: %s (%s)", _show(host, port), why, reason
        )
        if self.count is not None:
            self.count(reason)


__all__ = ["ProxyGate", "read_header", "sniff_header"]
