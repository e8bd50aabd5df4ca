"""A latency histogram with logarithmic buckets (HDR-like), mergeable across processes.

Bucket ``i`` holds durations in ``[LOWEST * GROWTH**(i-1), LOWEST * GROWTH**i)``:
every bucket is 1 % wide, so a percentile read from it is within 1 % of the true
value, from 100 ns to hours, in a few hundred buckets that are actually used.
Recording is one ``log`` and one list increment (about 0.5 µs): cheap enough for every
operation, which is the point (sampling would hide the tail). Each worker process
keeps its own histograms and ships them, sparse, to the parent at the end, where they
are added bucket by bucket.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Histogram"]

LOWEST = 1e-7  # seconds; anything faster lands in bucket 0
GROWTH = 1.01
_INV_LOG_GROWTH = 1.0 / math.log(GROWTH)
_BUCKETS = int(math.log(1e5 / LOWEST) * _INV_LOG_GROWTH) + 2  # up to ~28 hours


class Histogram:
    """Durations in seconds: count, sum, exact min and max, log buckets for the rest."""

    __slots__ = ("count", "counts", "maximum", "minimum", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.total = 0.0
        self.minimum = math.inf
        self.maximum = 0.0

    def record(self, seconds: float) -> None:
        if seconds > LOWEST:
            i = int(math.log(seconds / LOWEST) * _INV_LOG_GROWTH) + 1
            if i >= _BUCKETS:
                i = _BUCKETS - 1
        else:
            i = 0
        self.counts[i] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.maximum:
            self.maximum = seconds
        if seconds < self.minimum:
            self.minimum = seconds

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for i, n in enumerate(other.counts):
            if n:
                counts[i] += n
        self.count += other.count
        self.total += other.total
        self.maximum = max(self.maximum, other.maximum)
        self.minimum = min(self.minimum, other.minimum)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100): the upper edge of the bucket holding it,
        clamped to the observed range (so p100 is the exact maximum)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * q / 100.0))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                upper = LOWEST * GROWTH**i
                return min(max(upper, self.minimum), self.maximum)
        return self.maximum

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def summary(self) -> dict[str, float | int]:
        """count, mean, min, p50, p95, p99, max (seconds)."""
        return {
            "count": self.count,
            "mean": self.mean,
            "min": self.minimum if self.count else 0.0,
            "p50": self.percentile(50),
            "p95": self.percentile(95),
            "p99": self.percentile(99),
            "max": self.maximum,
        }

    # ------------------------------------------------------------ transport

    def to_wire(self) -> dict[str, Any]:
        """A small picklable/JSON-able form: only the buckets in use."""
        return {
            "buckets": {i: n for i, n in enumerate(self.counts) if n},
            "count": self.count,
            "total": self.total,
            "min": self.minimum if self.count else None,
            "max": self.maximum,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        for i, n in data["buckets"].items():
            h.counts[int(i)] += int(n)
        h.count = int(data["count"])
        h.total = float(data["total"])
        h.minimum = math.inf if data["min"] is None else float(data["min"])
        h.maximum = float(data["max"])
        return h
