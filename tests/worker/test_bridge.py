"""The one bridge from bytes to the engine (workers/bridge.py), as both roles use it.

A fake loop whose clock the test sets and a fake transport that records what it is
asked to do: the asyncio glue without a socket. Both the acceptor's protocol and the
requestor's are driven through the same scenarios.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from workers.association import AssociationProtocol
from workers.bridge import EngineBridge
from workers.engine import acse
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, Role
from workers.engine.fsm import State
from workers.scu.protocol import EngineProtocol
from workers.server import AssociationServer

from .conftest import VERIFICATION, make_config

ARTIM = 30.0
START = 100.0


class FakeTimer:
    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """What the bridges ask of a loop: its clock and timers (run by the test)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        self.timers.append(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        return self.call_at(self.now + delay, callback, *args)

    def pending(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]

    def fire(self, timer: FakeTimer, at: float) -> None:
        self.now = at
        timer.cancelled = True
        timer.callback(*timer.args)


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 11112) if name in ("peername", "sockname") else default

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.written.append(b"".join(bytes(c) for c in chunks))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _ServerOnFakeLoop(AssociationServer):
    fake_loop: Any = None

    @property
    def loop(self) -> Any:
        return self.fake_loop


@pytest.fixture(params=["acceptor", "requestor"])
def bridge(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[EngineBridge, Any]]:
    """An acceptor's engine behind each role's bridge, on a fake loop at START."""
    loop = FakeLoop(START)
    if request.param == "acceptor":
        server = _ServerOnFakeLoop(make_config(tmp_path, artim_timeout=ARTIM, network_timeout=None))
        server.fake_loop = loop
        yield AssociationProtocol(server), loop
        server.io_pool.shutdown()
        server.caller.shutdown()
        server.store.close()
    else:
        conn = Connection(Role.ACCEPTOR, EngineConfig(artim_timeout=ARTIM))
        events: list[Any] = []
        yield EngineProtocol(conn, loop, events.append, lambda exc: None), loop


def test_an_early_timer_tick_is_the_deadline(bridge: tuple[EngineBridge, Any]) -> None:
    """ARTIM armed when the connection opens (PS3.8 Sta2); ``call_at`` may run its
    callback a clock tick before the deadline: the engine is told the deadline was
    reached (the connection closes), not left waiting on a re-armed timer."""
    proto, loop = bridge
    transport = FakeTransport()
    proto.connection_made(transport)
    [timer] = loop.pending()
    assert timer.when == START + ARTIM
    loop.fire(timer, START + ARTIM - 0.001)
    assert transport.closed
    assert loop.pending() == []


def test_bytes_in_are_fed_with_the_loop_clock_and_answered_in_one_write(
    bridge: tuple[EngineBridge, Any],
) -> None:
    """An A-ASSOCIATE-RQ received straight into the engine's buffer in two reads is
    one indication; for the acceptor, the A-ASSOCIATE-AC leaves in one write and
    ARTIM stops."""
    proto, loop = bridge
    transport = FakeTransport()
    proto.connection_made(transport)
    rq = p.encode(acse.build_request("PACSRX", "PEER", [acse.Requested(VERIFICATION)]))
    for part in (rq[:7], rq[7:]):
        buf = proto.get_buffer(len(part))
        buf[: len(part)] = part
        loop.now += 0.5
        proto.buffer_updated(len(part))
    if isinstance(proto, AssociationProtocol):
        assert len(transport.written) == 1
        assert transport.written[0][0] == 0x02  # A-ASSOCIATE-AC
        assert proto.assoc.is_established
        assert loop.pending() == []  # ARTIM stopped (no network timer configured)
    else:
        # the whole request arrived; the owner of the requestor's bridge answers
        assert proto.conn.state is State.STA3
        assert transport.written == []


def test_connection_lost_stops_the_timer(bridge: tuple[EngineBridge, Any]) -> None:
    proto, loop = bridge
    proto.connection_made(FakeTransport())
    assert loop.pending()
    proto.connection_lost(None)
    assert loop.pending() == []


def test_the_asyncio_glue_is_one_class() -> None:
    assert issubclass(AssociationProtocol, EngineBridge)
    assert issubclass(EngineProtocol, EngineBridge)
    assert issubclass(EngineBridge, asyncio.BufferedProtocol)
