"""Removal of temp files abandoned by killed workers.

A worker killed mid-write (OOM, SIGKILL, power loss) leaves its ``<pid>-<n>.part``
file in the temp directory. Such a file is never a stored instance: an instance only
gets a final name by an atomic rename or link of a complete file. So removing it is
always safe once nobody is writing to it, which is what :func:`sweep_incoming` decides.
"""

from __future__ import annotations

import os
import stat
import time

__all__ = ["sweep_incoming"]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # os.kill(0, ...) would address our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: exists but not ours; be conservative
    return True


def sweep_incoming(
    root: str | os.PathLike[str],
    older_than_seconds: float,
    *,
    temp_dir_name: str = ".incoming",
    live_owner_older_than_seconds: float | None = 86_400.0,
    now: float | None = None,
) -> int:
    """Remove stale temp files left in ``root/temp_dir_name``; return how many.

    A file is removed when its mtime is more than ``older_than_seconds`` old and the
    pid in its name (``<pid>-<n>.part``) is gone. If that process is alive (a worker
    still writing, or a reused pid) only when older than
    ``live_owner_older_than_seconds``: an in-progress write touches mtime with every
    fragment, so a day without one is a leak; ``None`` never removes those. Files
    without a pid in their name count as ownerless. Directories are left alone.

    The supervisor can call this with ``older_than_seconds=0`` before it starts the
    workers, and every few minutes afterwards (any worker may; concurrent sweeps are
    harmless).
    """
    directory = os.path.join(os.fspath(root), temp_dir_name)
    if now is None:
        now = time.time()
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            continue
        age = now - st.st_mtime
        if age < older_than_seconds:
            continue
        owner = entry.name.split("-", 1)[0]
        if (
            owner.isascii()
            and owner.isdigit()
            and _pid_alive(int(owner))
            and (live_owner_older_than_seconds is None or age < live_owner_older_than_seconds)
        ):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another worker's sweep got there first
        removed += 1
    return removed
