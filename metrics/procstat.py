"""This process's CPU time and resident memory, without psutil.

Used by the workers' telemetry emitter (reported in :class:`metrics.wire.Process`
records) and by the aggregator for itself. Linux reads ``/proc/self/statm``; elsewhere
the resident size falls back to the peak (``ru_maxrss``), the best a portable call
offers.
"""

from __future__ import annotations

import os
import resource
import sys

__all__ = ["cpu_seconds", "rss_bytes"]

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def cpu_seconds() -> float:
    """User + system CPU time this process has used, in seconds."""
    t = os.times()
    return t.user + t.system


def rss_bytes() -> int:
    """Resident set size of this process, in bytes (0 if it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        pass
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return 0
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
