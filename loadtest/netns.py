"""A network namespace that has only ``lo``, for peers that listen on every interface.

DCMTK's ``storescp`` has no bind option and Orthanc binds all interfaces: started as
servers in the host's namespace, anything that can reach the machine can reach them.
:func:`loopback_namespace` moves the *calling thread* into a fresh network namespace
(``unshare(CLONE_NEWNET)`` changes the namespace of the calling thread only), brings
``lo`` up there and, on exit, moves the thread back (``setns`` on its original
``/proc/thread-self/ns/net``). Every socket that thread creates and every process or
thread it starts in between (they inherit the namespace of the thread that made them)
live in that namespace, where 127.0.0.1 is the only address there is: the peers, the
receiver under test and the load generator all run in it together, and no other
thread of the process is affected.

Making a namespace needs CAP_SYS_ADMIN (root). :func:`unavailable` says why it cannot
be made, so that callers skip such peers instead of starting them outside. Python 3.11
has no ``os.unshare``/``os.setns``: libc is called through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import socket
import struct
import threading
from collections.abc import Iterator

__all__ = ["NamespaceError", "interfaces", "loopback_namespace", "namespace_id", "unavailable"]

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
#: the calling thread's own network namespace (``/proc/self`` is the thread group's)
THREAD_NS = "/proc/thread-self/ns/net"


class NamespaceError(OSError):
    """A loopback-only network namespace could not be entered (or left)."""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        hint = " (needs root or CAP_SYS_ADMIN)" if code in (errno.EPERM, errno.EACCES) else ""
        raise NamespaceError(code, f"{what}: {os.strerror(code)}{hint}")


def _bring_lo_up() -> None:
    """``ip link set lo up``, as an ioctl on a socket of the (new) namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


@contextlib.contextmanager
def loopback_namespace() -> Iterator[None]:
    """Run the body in a fresh network namespace with only ``lo`` (up); this thread only.

    Raises :class:`NamespaceError` when the namespace cannot be made (nothing changed
    then) or when the thread cannot be moved back (it is then unsafe to go on).
    Processes started inside keep the namespace after the body; stop them inside it.
    """
    try:
        original = os.open(THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespaceError(exc.errno, f"{THREAD_NS}: {exc.strerror}") from None
    try:
        _check(_libc().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            _bring_lo_up()
            yield
        finally:
            _check(_libc().setns(original, CLONE_NEWNET), "setns back to the original")
    finally:
        os.close(original)


@functools.cache
def unavailable() -> str | None:
    """None when :func:`loopback_namespace` works here, else why not (probed once, in a
    throwaway thread, so that a failure cannot leave the caller's thread anywhere)."""
    result: list[str | None] = ["probe did not finish"]

    def probe() -> None:
        try:
            with loopback_namespace():
                names = interfaces()
                if names != ["lo"]:
                    result[0] = f"the new namespace has interfaces {names}, not only lo"
                    return
            result[0] = None
        except OSError as exc:
            result[0] = f"cannot make a loopback-only network namespace: {exc.strerror or exc}"

    thread = threading.Thread(target=probe, name="netns-probe", daemon=True)
    thread.start()
    thread.join(10)
    return result[0]


def interfaces() -> list[str]:
    """Names of the network interfaces of the calling thread's namespace."""
    with open("/proc/thread-self/net/dev") as f:
        return [line.split(":", 1)[0].strip() for line in f.readlines()[2:]]


def namespace_id() -> int:
    """Inode of the calling thread's network namespace (equal: same namespace)."""
    return os.stat(THREAD_NS).st_ino
