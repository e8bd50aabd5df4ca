"""Process-tree measurements shared by the benchmarks: CPU from /proc/<pid>/stat,
memory from /proc/<pid>/status, a sampler thread for peak memory, and where DCMTK is.

CPU is utime+stime+cutime+cstime, so children that exited and were reaped count;
memory is VmRSS (summed over the tree, sampled) and VmHWM (per process).
"""

from __future__ import annotations

import os
import socket
import threading

from loadtest.compare import dcmtk_binary
from loadtest.proctree import children

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.05


def dcmtk(name: str) -> str | None:
    """The DCMTK binary ``name``: ELF only (the venv's bin has pynetdicom namesakes)."""
    return dcmtk_binary(name)


def tree(root: int) -> list[int]:
    """``root`` and all its descendants (zombies included until reaped)."""
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo += children(pid)
    return seen


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime: the process and its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # after "comm)": state=0 ... utime=11 stime=12 cutime=13 cstime=14
    return sum(int(x) for x in fields[11:15])


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB; zeros for a zombie or a process that is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def tree_cpu_seconds(root: int) -> float:
    return sum(cpu_ticks(pid) for pid in tree(root)) / CLK_TCK


class Sampler(threading.Thread):
    """Samples the summed RSS of a process tree, and each process's VmHWM."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_rss_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.max_processes = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        total = 0
        pids = tree(self.root)
        self.max_processes = max(self.max_processes, len(pids))
        for pid in pids:
            rss, hwm = memory_kb(pid)
            total += rss
            if hwm:
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
        self.peak_rss_kb = max(self.peak_rss_kb, total)

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_INTERVAL):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.sample()


def free_port() -> int:
    # Any interface: storescp and Orthanc bind them all (in the namespace, lo only).
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
