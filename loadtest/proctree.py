"""CPU time and resident memory of a process tree, from /proc (Linux), without psutil.

Used by ``pacs-loadtest compare`` to charge each receiver with everything its process
tree did: pacs-receiver's supervisor, acceptor, workers and aggregator; storescp and
the children ``--fork`` makes; pynetdicom's threads (one process).

CPU: the sum over the live tree of utime + stime + cutime + cstime. cutime/cstime hold
the CPU time of children that exited and were waited for (storescp ``--fork`` reaps
its children), so a short-lived child's time is counted once, by its parent, after it
exits. Memory: the sum of VmRSS over the tree (shared pages of forked children count
once per process, so this is an upper bound), sampled by :class:`TreeSampler`, and the
peak of the samples.
"""

from __future__ import annotations

import os
import threading

__all__ = ["TreeSampler", "tree_cpu_seconds", "tree_pids", "tree_rss_bytes"]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's), from /proc."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    seen = [root]
    i = 0
    while i < len(seen):
        for child in children(seen[i]):
            if child not in seen:
                seen.append(child)
        i += 1
    return [pid for pid in seen if os.path.exists(f"/proc/{pid}")]


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    # after the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
    return sum(int(x) for x in fields[11:15])


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by the tree under ``root`` (see module doc)."""
    return sum(_cpu_ticks(pid) for pid in tree_pids(root)) / _CLK_TCK


def tree_rss_bytes(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


class TreeSampler:
    """Samples the tree's RSS every ``interval`` seconds in a thread; keeps the peak.

    ``start()`` also takes the CPU reading the run is measured from, ``stop()`` the
    one it ends at.
    """

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.peak_rss = 0
        self.cpu_start = 0.0
        self.cpu_end = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.cpu_start = tree_cpu_seconds(self.root)
        self.peak_rss = tree_rss_bytes(self.root)
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, tree_rss_bytes(self.root))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.peak_rss = max(self.peak_rss, tree_rss_bytes(self.root))
        self.cpu_end = tree_cpu_seconds(self.root)

    @property
    def cpu_seconds(self) -> float:
        return max(0.0, self.cpu_end - self.cpu_start)
