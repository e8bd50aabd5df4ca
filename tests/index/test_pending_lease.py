"""The lease on pending reports: two claimants (two workers, or two receivers on one
PostgreSQL index) never both hold a report, on SQLite and on a real PostgreSQL
server alike; a lease that runs out passes to the next claimant, and the first one
learns it when it tries to renew."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from workers.index import Index, open_index


def _two(index_url: str | None, storage_root: Path) -> tuple[Index, Index]:
    """Two connections to one database, as two workers (or two nodes) have."""
    return (
        open_index(index_url, str(storage_root), node="node-a"),
        open_index(index_url, str(storage_root), node="node-a"),
    )


def test_racing_claimants_split_the_reports(index_url: str | None, storage_root: Path) -> None:
    a, b = _two(index_url, storage_root)
    try:
        keys = {f"report-{n:03d}" for n in range(60)}
        for key in keys:
            a.put_pending(key, key.encode(), due=100.0, owner="node-a")
        claimed: dict[str, list[str]] = {"A": [], "B": []}
        start = threading.Barrier(2)

        def claim(ix: Index, name: str) -> None:
            start.wait()
            # small bites, so that the two claimants interleave over the same rows
            for _ in range(40):
                got = ix.claim_due(1000.0, owner="node-a", claimant=name, lease=60.0, limit=5)
                claimed[name].extend(r.key for r in got)

        threads = [
            threading.Thread(target=claim, args=(a, "A")),
            threading.Thread(target=claim, args=(b, "B")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not set(claimed["A"]) & set(claimed["B"]), "a report was claimed twice"
        assert set(claimed["A"]) | set(claimed["B"]) == keys
        assert len(claimed["A"]) + len(claimed["B"]) == len(keys)
        holders = {r.key: r.lease_owner for r in a.due_pending(owner="node-a")}
        assert holders == {**dict.fromkeys(claimed["A"], "A"), **dict.fromkeys(claimed["B"], "B")}
    finally:
        a.close()
        b.close()


def test_a_held_lease_is_exclusive_until_it_runs_out(
    index_url: str | None, storage_root: Path
) -> None:
    a, b = _two(index_url, storage_root)
    try:
        a.put_pending("t1", b"x", due=0.0, owner="node-a", claimant="A", lease=1.0)
        assert not b.claim_pending("t1", "B", 60.0)
        assert b.claim_due(time.time(), owner="node-a", claimant="B", lease=60.0) == []
        assert a.claim_pending("t1", "A", 1.0)  # the holder renews
        deadline = time.monotonic() + 20
        while not b.claim_pending("t1", "B", 60.0):  # taken over once it has run out
            assert time.monotonic() < deadline, "the lease never ran out"
            time.sleep(0.2)
        assert not a.claim_pending("t1", "A", 1.0)  # ...and the first holder learns it
        assert [r.lease_owner for r in a.due_pending(owner="node-a")] == ["B"]
        assert not a.claim_pending("gone", "A", 1.0)
    finally:
        a.close()
        b.close()


def test_released_leases_are_claimed_at_once(index: Index) -> None:
    index.put_pending("t1", b"x", due=500.0, owner="node-a", claimant="A", lease=600.0)
    index.put_pending("t2", b"y", due=500.0, owner="node-a", claimant="A", lease=600.0)
    assert index.claim_due(1000.0, owner="node-a", claimant="B", lease=60.0) == []
    assert index.release_pending(["t1", "t2"], "B") == 0  # not B's to give back
    assert index.release_pending(["t1"], "A", due=10.0) == 1
    got = index.claim_due(100.0, owner="node-a", claimant="B", lease=60.0)
    assert [(r.key, r.due, r.payload) for r in got] == [("t1", 10.0, b"x")]
    # another owner's reports are not ours to claim
    index.put_pending("t3", b"z", due=1.0, owner="node-b")
    assert index.claim_due(1000.0, owner="node-a", claimant="C", lease=60.0) == []
