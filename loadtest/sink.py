"""A DICOM sink: accepts every association and answers every C-STORE with Success
without keeping a byte. It shows what the load generator can drive when the receiving
side costs (almost) nothing, i.e. that the generator is not what a benchmark measures.

Built on the project's own sans-IO engine in the acceptor role and the requestor's
asyncio protocol (:class:`workers.scu.protocol.EngineProtocol`, which is role-agnostic):
every presentation context and transfer syntax is accepted, the asynchronous
operations window proposed is granted (up to ``--max-async-ops``), data-set fragments
go to a sink function that drops them (the engine never buffers them), C-ECHO and
C-STORE are answered Success, anything else "unrecognized operation".

``--processes N`` forks N-1 more processes after binding, all accepting on the same
listening socket, each with its own uvloop loop.

    pacs-loadtest sink --port 11112 [--processes 2]
    python -m loadtest.sink --port 0        # prints "listening on 127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

from workers.engine import acse, dimse
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, Role
from workers.engine.primitives import (
    AssociateIndication,
    CommandReceived,
    DataSetReceived,
    Indication,
    ReleaseRequested,
)
from workers.scu.protocol import EngineProtocol

__all__ = ["main", "serve"]


def _discard(view: memoryview) -> None:
    pass


class _SinkAssociation:
    """One connection: the engine, the protocol, and the command awaiting its data set."""

    __slots__ = ("conn", "loop", "max_async_ops", "pending", "policy", "protocol")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, policy: acse.AcceptorPolicy, max_async_ops: int
    ) -> None:
        config = EngineConfig(max_pdu_length=policy.max_pdu_length, read_buffer_size=1 << 20)
        self.conn = Connection(Role.ACCEPTOR, config)
        self.policy = policy
        self.max_async_ops = max_async_ops
        self.loop = loop
        self.pending: dimse.Command | None = None
        self.protocol = EngineProtocol(self.conn, loop, self.on_event, self.on_lost)

    def on_event(self, event: Indication) -> None:
        conn = self.conn
        kind = type(event)
        if kind is CommandReceived:
            assert isinstance(event, CommandReceived)
            command = event.command
            if command.has_dataset:
                conn.set_dataset_sink(_discard)
                self.pending = command
            else:
                self._answer(event.context_id, command)
        elif kind is DataSetReceived:
            assert isinstance(event, DataSetReceived)
            pending, self.pending = self.pending, None
            if pending is not None:
                self._answer(event.context_id, pending)
        elif kind is AssociateIndication:
            assert isinstance(event, AssociateIndication)
            rq = event.request
            window = None
            if rq.user_info.async_ops is not None:
                asked = rq.user_info.async_ops.invoked or self.max_async_ops
                granted = min(asked, self.max_async_ops)
                window = p.AsyncOpsWindow(granted, granted)
            answer = acse.negotiate(rq, self.policy, acse.Extended(async_ops=window))
            if isinstance(answer, p.AssociateAC):
                conn.accept(answer, self.loop.time())
            else:
                conn.reject(answer, self.loop.time())
        elif kind is ReleaseRequested:
            conn.release_response(self.loop.time())

    def _answer(self, context_id: int, command: dimse.Command) -> None:
        field = command.CommandField
        if field in (dimse.CommandField.C_STORE_RQ, dimse.CommandField.C_ECHO_RQ):
            status = dimse.Status.SUCCESS
        else:
            status = dimse.Status.UNRECOGNIZED_OPERATION
        if command.MessageID is not None:
            self.conn.send_command(context_id, dimse.response_for(command, status))

    def on_lost(self, exc: Exception | None) -> None:
        pass


async def serve(sock: socket.socket, max_pdu: int = 1 << 20, max_async_ops: int = 64) -> None:
    """Accept on ``sock`` until SIGTERM or SIGINT (or cancellation)."""
    loop = asyncio.get_running_loop()
    policy = acse.AcceptorPolicy(ae_title="SINK", max_pdu_length=max_pdu)
    server = await loop.create_server(
        lambda: _SinkAssociation(loop, policy, max_async_ops).protocol, sock=sock
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pacs-loadtest sink",
        description="Accept DICOM associations and discard everything (C-STORE -> Success).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=11112, help="port; 0 picks a free one")
    parser.add_argument("--processes", type=int, default=1, help="accepting processes")
    parser.add_argument("--max-pdu", type=int, default=1 << 20, help="Maximum Length announced")
    parser.add_argument("--max-async-ops", type=int, default=64, help="largest window granted")
    args = parser.parse_args(argv)

    import uvloop

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    sock.setblocking(False)
    host, port = sock.getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)

    children: list[int] = []
    for _ in range(max(1, args.processes) - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)

    try:
        uvloop.run(serve(sock, args.max_pdu, args.max_async_ops))
    except KeyboardInterrupt:
        pass
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
