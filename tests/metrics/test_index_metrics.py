"""Index metrics: a worker's real IndexWriter (SQLite) -> Telemetry -> a real
Aggregator over its unix socket -> the Prometheus exposition (checked by promtool)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from metrics import wire as w
from metrics.aggregator import Aggregator
from tests.index.test_index import record
from workers.index import open_index
from workers.index.writer import IndexWriter
from workers.telemetry import Telemetry

from .helpers import short_tmpdir, until


def samples(body: bytes) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, s.labels.get("worker", ""))] = s.value
    return out


def test_index_lag_written_errors_dropped_reach_metrics(sockdir: str, tmp_path: Path) -> None:
    index = open_index(None, str(tmp_path))
    gate = threading.Event()
    failures = [1]
    original = index.add_many

    def held(records: object, *, replace: bool = True) -> int:
        gate.wait(30)
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("database went away")
        return original(records, replace=replace)  # type: ignore[arg-type]

    index.add_many = held  # type: ignore[method-assign]
    writer = IndexWriter(index, max_queue=20, batch_size=10, linger=0)

    async def scenario() -> tuple[bytes, bytes]:
        path = os.path.join(sockdir, "agg.sock")
        agg = Aggregator(path, port=0)
        await agg.start()
        t = Telemetry(path, 3, interval=3600)
        t.index_writer = writer
        await t.start()
        for n in range(40):
            writer.submit(record(n))
        t.flush()
        await until(lambda: any(s.index_lag for s in agg.state.sources))
        before = agg.exposition()
        gate.set()
        while writer.lag:
            await asyncio.sleep(0.01)
        t.flush()
        await until(lambda: agg.state.workers.get("3") is not None
                    and agg.state.workers["3"].index[0] == writer.written)  # fmt: skip
        after = agg.exposition()
        await t.close()
        await agg.close()
        return before, after

    try:
        before, after = asyncio.run(scenario())
    finally:
        gate.set()
        writer.close()
        index.close()
    accepted = 40 - writer.dropped
    assert writer.dropped > 0 and writer.written == accepted
    first, last = samples(before), samples(after)
    assert first[("pacs_index_lag_records", "3")] == accepted
    assert last[("pacs_index_lag_records", "3")] == 0
    assert last[("pacs_index_records_written_total", "3")] == accepted
    assert last[("pacs_index_errors_total", "3")] == 1
    assert last[("pacs_index_records_dropped_total", "3")] == writer.dropped
    promtool = shutil.which("promtool")
    if promtool is not None:
        proc = subprocess.run(
            [promtool, "check", "metrics"], input=after, capture_output=True, timeout=30
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_undelivered_index_counts_are_sent_again(tmp_path: Path) -> None:
    index = open_index(None, str(tmp_path))
    writer = IndexWriter(index, linger=0)
    try:
        t = Telemetry("/nonexistent/metrics.sock", 0)
        t.index_writer = writer
        for n in range(5):
            writer.submit(record(n))
        assert writer.flush(30)
        (first,) = [r for r in t._collect() if isinstance(r, w.IndexWrites)]
        assert (first.written, first.errors, first.dropped) == (5, 0, 0)
        assert not [r for r in t._collect() if isinstance(r, w.IndexWrites)]
        t._merge(first)  # the batch holding it was not delivered
        for n in range(5, 7):
            writer.submit(record(n))
        assert writer.flush(30)
        deadline = time.monotonic() + 10
        while writer.written < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        (again,) = [r for r in t._collect() if isinstance(r, w.IndexWrites)]
        assert again.written == 7
    finally:
        writer.close()
        index.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    with short_tmpdir() as d:
        yield d
