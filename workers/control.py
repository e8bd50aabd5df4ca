"""The control channel between the acceptor/supervisor and one worker process.

One ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair per worker: message boundaries are kept
by the kernel, and accepted connections travel as ``SCM_RIGHTS`` file descriptors.

Supervisor -> worker:

* ``b"C"`` with one or more descriptors attached: connections to serve; the
  message body after ``C`` is the msgpack list of the connections' ids, one per
  descriptor, so that the worker can report each one back when it closes. Behind a
  load balancer (``--proxy-protocol-from``) the body is instead the msgpack map
  ``{"ids": [...], "peers": [[host, port], ...]}``: each connection's client address
  from its PROXY header, which the worker uses instead of the socket's peer.
* msgpack ``{"op": "stop", "graceful": seconds}``: stop; finish open associations
  for at most ``graceful`` seconds, abort the rest, exit 0.

Worker -> supervisor (all msgpack maps):

* ``{"op": "hb", "open": n, "buffered": bytes, "stored": n, "ids": [...],
  "received": n}``: heartbeat and load, sent from the worker's own event loop, so a
  worker whose loop is stuck stops sending them and is replaced. ``ids`` are the
  connections not yet reported closed (None when too many to list), ``received``
  how many connections the worker had read from the channel: together they let the
  supervisor free the slots of connections whose ``closed`` report was lost.
* ``{"op": "closed", "ids": [...]}``: these connections are closed (their slots,
  and their calling AE titles' slots, are free again).
"""

from __future__ import annotations

import array
import socket
from typing import Any

import msgpack

CONNECTIONS = b"C"
MAX_FDS_PER_MESSAGE = 64
_MAX_MESSAGE = 65536


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_connections(
    sock: socket.socket,
    fds: list[int],
    ids: list[int],
    peers: list[tuple[str, int]] | None = None,
) -> None:
    """Hand connections over; raises BlockingIOError when the channel is full.
    ``peers``: the client address of each connection (PROXY protocol), if known."""
    body = CONNECTIONS + msgpack.packb(ids if peers is None else {"ids": ids, "peers": peers})
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(msgpack.packb(message))


def receive(
    sock: socket.socket,
) -> tuple[bytes | None, dict[str, Any] | None, list[int], list[int]]:
    """Read one message: (kind, map, fds, ids). kind None means the peer is gone. For
    connections the map is None, or ``{"peers": [...]}`` when their addresses came."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        _MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS_PER_MESSAGE * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:  # nothing should come with an empty message; do not leak it
            socket.close(fd)
        return None, None, [], []
    if data[:1] == CONNECTIONS:
        body = msgpack.unpackb(data[1:]) if len(data) > 1 else []
        if isinstance(body, dict):
            peers = [tuple(peer) if peer else None for peer in body.get("peers", ())]
            return CONNECTIONS, {"peers": peers}, list(fds), list(body.get("ids", ()))
        return CONNECTIONS, None, list(fds), list(body)
    for fd in fds:
        socket.close(fd)
    message = msgpack.unpackb(data)
    return b"M", message if isinstance(message, dict) else {}, [], []
