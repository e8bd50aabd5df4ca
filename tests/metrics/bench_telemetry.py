"""Cost of the telemetry emitter's calls, in microseconds (not a test: run it).

    .venv/bin/python -m tests.metrics.bench_telemetry

Prints the cost of each call the worker makes, then the telemetry cost of one C-STORE
(the calls a worker makes per instance, plus the periodic flush amortised) against the
budget: at 3000 instances/s per worker one instance has 333 us, and metrics may take
5% of that, 16.7 us.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from workers.engine import events as evt
from workers.storage.config import FileOps
from workers.telemetry import RECEIVED, SENT, Telemetry

from .helpers import FakeProtocol, Sink, short_tmpdir, store_op, store_result

RATE = 3000  # instances per second per worker
WRITES_PER_INSTANCE = 3  # Part 10 header + data-set fragments (256 KiB reads)


def per_call(fn: Callable[[], None], n: int = 200_000) -> float:
    """Best of 5 runs, microseconds per call."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    t = Telemetry("/nonexistent/metrics.sock", 0)
    p = FakeProtocol()
    t.record(evt.EVT_CONN_OPEN, p, {})
    t.record(evt.EVT_REQUESTED, p, {})
    t.record(evt.EVT_ACCEPTED, p, {})
    op, result = store_op(), store_result()
    empty: dict[str, object] = {}
    results = {
        "record(EVT_PDU_RECV) ignored": per_call(lambda: t.record(evt.EVT_PDU_RECV, p, empty)),
        "record(EVT_ESTABLISHED)": per_call(lambda: t.record(evt.EVT_ESTABLISHED, p, empty)),
        "record(EVT_REQUESTED)": per_call(lambda: t.record(evt.EVT_REQUESTED, p, empty)),
        "record(EVT_FSM_TRANSITION)": per_call(
            lambda: t.record(
                evt.EVT_FSM_TRANSITION,
                p,
                {"current_state": "Sta6", "fsm_event": "Evt10", "next_state": "Sta6"},
            )
        ),
        "dimse(RECEIVED, C-STORE-RQ)": per_call(lambda: t.dimse(RECEIVED, 1, None)),
        "dimse(SENT, C-STORE-RSP)": per_call(lambda: t.dimse(SENT, 0x8001, 0)),
        "stored()": per_call(lambda: t.stored(p, op, result, 0.003)),
        "observe_write()": per_call(lambda: t.observe_write(0.00002), n=50_000),
    }
    t._writes.clear()

    # file_ops: a timed write against a plain one, on /dev/null.
    fd = os.open(os.devnull, os.O_WRONLY)
    view = memoryview(b"x" * 4096)
    plain = FileOps()
    timed = t.file_ops(plain)
    raw = per_call(lambda: plain.write(fd, view), n=50_000)
    t._writes.clear()
    wrapped = per_call(lambda: timed.write(fd, view), n=50_000)
    os.close(fd)
    results["file_ops().write overhead"] = wrapped - raw
    # Draining a tick's worth of write observations (done in flush).
    for _ in range(50_000):
        t.observe_write(0.00002)
    start = time.perf_counter()
    t.flush()
    results["flush: per storage observation"] = (time.perf_counter() - start) / 50_000 * 1e6

    # A flush with 100 open connections, sent to a real socket.
    async def flush_cost() -> float:
        with short_tmpdir() as d:
            sink = Sink(os.path.join(d, "a.sock"))
            tel = Telemetry(sink.path, 0, interval=3600)
            await tel.start()
            conns = [FakeProtocol(f"AE{i % 20}") for i in range(100)]
            for c in conns:
                tel.record(evt.EVT_CONN_OPEN, c, {})
                tel.record(evt.EVT_REQUESTED, c, {})
                tel.record(evt.EVT_ACCEPTED, c, {})
            best = float("inf")
            for _ in range(50):
                for c in conns:
                    c.pdu(0, 4, 1000)
                    tel.dimse(RECEIVED, 1, None)
                    tel.stored(c, store_op(), store_result(), 0.002)
                start = time.perf_counter()
                tel.flush()
                best = min(best, time.perf_counter() - start)
                sink.read()
            await tel.close()
            sink.close()
            return best * 1e6

    flush_us = asyncio.run(flush_cost())
    results["flush() with 100 open associations"] = flush_us

    width = max(map(len, results))
    for name, us in results.items():
        print(f"{name:<{width}}  {us:8.3f} us")

    per_instance = (
        results["dimse(RECEIVED, C-STORE-RQ)"]
        + results["dimse(SENT, C-STORE-RSP)"]
        + results["stored()"]
        + WRITES_PER_INSTANCE
        * (results["file_ops().write overhead"] + results["flush: per storage observation"])
        + results["observe_write()"]  # the fsync observation (same code path)
        + results["flush: per storage observation"]
        + flush_us * 2 / RATE  # two flushes a second, shared by RATE instances
    )
    budget = 1e6 / RATE
    print(
        f"\nper C-STORE instance: {per_instance:.2f} us = {per_instance / budget * 100:.2f}% "
        f"of the {budget:.0f} us an instance has at {RATE}/s (limit 5%)"
    )


if __name__ == "__main__":
    main()
