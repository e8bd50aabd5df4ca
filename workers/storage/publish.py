"""File-system steps of publishing an instance: exclusive links, directory fsyncs.

:func:`temp_name` names a temp file (unique across processes and threads),
:func:`link_exclusive` gives it its final name only if the name is free.
Directory fds are kept open for directory fsyncs, a small LRU per store.

With ``--fsync always`` every instance needs an fsync of its directory after its
rename; a series directory receives about a hundred instances, so an fd kept open
spares each of them an ``openat`` and a ``close``. See :meth:`DirectoryFds.fsync`.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict

from .config import TEMP_SUFFIX, FileOps

log = logging.getLogger("workers.storage.store")


# One sequence for every Store in the process: temp names are <pid>-<n>.part, unique
# across processes (pid) and within one (n). next() on a count is atomic in CPython.
_temp_seq = itertools.count()
# The pid part, kept current across fork() (a getpid syscall per instance otherwise).
_temp_prefix = f"{os.getpid()}-"


def _reset_temp_prefix() -> None:
    global _temp_prefix
    _temp_prefix = f"{os.getpid()}-"


os.register_at_fork(after_in_child=_reset_temp_prefix)


def temp_name(incoming: str) -> str:
    """A new temp file name in the directory ``incoming``: ``<pid>-<n>.part``."""
    return f"{incoming}{os.sep}{_temp_prefix}{next(_temp_seq)}{TEMP_SUFFIX}"


def unlink_quietly(ops: FileOps, path: str) -> None:
    """Remove ``path`` if possible."""
    # Already gone, or the filesystem is failing: sweep_incoming catches leftovers.
    with contextlib.suppress(OSError):
        ops.unlink(path)


class DirectoryFds:
    """Open directory fds by path, least recently used first; thread-safe."""

    #: fds kept open at most
    SIZE = 16

    def __init__(self, ops: FileOps) -> None:
        self._ops = ops
        #: directory -> (fd, monotonic time of last use)
        self._fds: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()
        #: bumped when every fd is dropped: an fd taken out before then is closed,
        #: not put back
        self._epoch = 0

    def fsync(self, path: str) -> None:
        """fsync the directory ``path`` through an fd kept open for the next one.

        A series directory receives ~100 instances, each needing an fsync of it: a
        small LRU of open fds spares each one an ``openat`` and a ``close`` (and the
        path walk). An fd kept open also reports every writeback error since it was
        opened, where a fresh one would miss those of before its ``open``. A thread
        takes the fd out of the cache while it uses it, so no fd is ever closed
        (evicted, idle, forgotten) while another thread fsyncs it; two threads on
        the same directory at once simply open one more. Kept fds follow the same
        trust as the cache of known directories: a directory that vanishes is noticed
        at publish (ENOENT), and then both caches are dropped (``Store._forget_dirs``).
        """
        ops = self._ops
        with self._lock:
            entry = self._fds.pop(path, None)
            epoch = self._epoch
        fd = entry[0] if entry is not None else -1
        if fd < 0:
            fd = ops.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0)
        try:
            ops.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                ops.close(fd)
            raise
        evicted: list[int] = []
        with self._lock:
            fds = self._fds
            if epoch != self._epoch or path in fds:
                evicted.append(fd)
            else:
                fds[path] = (fd, time.monotonic())
                while len(fds) > self.SIZE:
                    evicted.append(fds.popitem(last=False)[1][0])
        for old in evicted:
            with contextlib.suppress(OSError):
                ops.close(old)

    def close_idle(self, idle: float = 1.0) -> int:
        """Close the directory fds kept open (:meth:`fsync`) that were not used
        for ``idle`` seconds (all of them with a negative ``idle``); returns how many.
        The worker calls it on its heartbeat, so an idle worker holds none open."""
        limit = time.monotonic() - idle
        closing: list[int] = []
        with self._lock:
            if idle < 0:
                self._epoch += 1
            fds = self._fds
            for path in [p for p, (_, used) in fds.items() if idle < 0 or used <= limit]:
                closing.append(fds.pop(path)[0])
        for fd in closing:
            with contextlib.suppress(OSError):
                self._ops.close(fd)
        return len(closing)


def link_exclusive(ops: FileOps, temp_path: str, final_path: str) -> bool:
    """Publish ``temp_path`` as ``final_path`` only if that name is free; False if it
    already exists (the duplicate policies ``keep`` and ``reject``)."""
    try:
        ops.link(temp_path, final_path)
    except FileExistsError:
        published = False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links here (some FUSE/SMB mounts): check-then-rename. Not atomic
        # against a concurrent writer of the same instance (see workers/storage/store.py).
        if os.path.lexists(final_path):
            published = False
        else:
            ops.replace(temp_path, final_path)
            return True
    else:
        published = True
    try:
        ops.unlink(temp_path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # The outcome is already decided. The temp name is a second link to the
        # published file, or the losing duplicate: never a stored instance, and
        # sweep_incoming drops it later.
        log.warning("could not remove temp file %s: %s", temp_path, exc)
    return published
