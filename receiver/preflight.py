"""What the supervisor makes sure of before it listens: the store can be written,
the ports can be bound; and, when one of them cannot, that nothing is left behind.

Every failure here is a :class:`StartError` whose message is the one line
``pacs-receiver`` prints (exit status 2). Finding these at start-up matters because
later they are much worse: a store that cannot be written makes every worker fail
its first instance (and be respawned, forever); a metrics port someone else holds
makes the aggregator die and be respawned, while the log announces the other
process's endpoint as ours.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field

#: The store's temp directory (workers.storage.config.StorageConfig.temp_dir_name).
TEMP_DIR_NAME = ".incoming"


class StartError(Exception):
    """The receiver cannot start; ``str()`` is the one line that says why."""


@dataclass(slots=True)
class Leftovers:
    """What a start made so far, to be undone if the start fails."""

    #: directories created by us, outermost first
    directories: list[str] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)

    def undo(self) -> None:
        """Close the sockets and remove the directories made for the store (only
        while empty: a store is never removed with content)."""
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        for directory in reversed(self.directories):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        self.directories.clear()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def prepare_storage(path: str, made: Leftovers) -> str:
    """Create the store (and its temp directory) if needed and prove it writable by
    writing, syncing and removing a file in the temp directory, where the workers
    write. Returns the absolute path; StartError names the path and the reason."""
    root = os.path.abspath(path)
    if os.path.exists(root) and not os.path.isdir(root):
        raise StartError(f"storage {path}: exists and is not a directory")
    missing: list[str] = []
    walk = root
    while not os.path.isdir(walk):
        if os.path.lexists(walk) and not os.path.isdir(walk):
            raise StartError(f"storage {path}: cannot create it: {walk} is not a directory")
        missing.append(walk)
        parent = os.path.dirname(walk)
        if parent == walk:
            break
        walk = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to remove
        except OSError as exc:
            raise StartError(f"storage {path}: cannot create {directory}: {_reason(exc)}") from None
        made.directories.append(directory)
    temp_dir = os.path.join(root, TEMP_DIR_NAME)
    try:
        os.mkdir(temp_dir)
        made.directories.append(temp_dir)
    except FileExistsError:
        if not os.path.isdir(temp_dir):
            raise StartError(f"storage {path}: {temp_dir} is not a directory") from None
    except OSError as exc:
        raise StartError(f"storage {path}: cannot be written: {_reason(exc)}") from None
    probe = os.path.join(temp_dir, f"startup-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    except OSError as exc:
        raise StartError(f"storage {path}: cannot be written: {_reason(exc)}") from None
    return root


def bind_tcp(host: str, port: int, backlog: int, what: str) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host``:``port``; StartError saying
    ``what`` could not be bound (e.g. "cannot listen on", "cannot serve metrics on")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise StartError(f"{what} {host}:{port}: {_reason(exc)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartError(f"{what} {host}:{port}: {_reason(exc)}") from None
    return sock


__all__ = ["Leftovers", "StartError", "bind_tcp", "prepare_storage"]
