"""loadtest.netns: the calling thread, and only it, enters a namespace with only lo."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading

import pytest

from loadtest import netns

from .conftest import REPO

needs_netns = pytest.mark.skipif(netns.unavailable() is not None, reason=f"{netns.unavailable()}")


@needs_netns
def test_inside_there_is_only_lo_and_afterwards_the_thread_is_back() -> None:
    before = netns.namespace_id()
    outside = netns.interfaces()
    with netns.loopback_namespace():
        assert netns.namespace_id() != before
        assert netns.interfaces() == ["lo"]
        # a process started here is in it too, and sees lo up with 127.0.0.1
        child = subprocess.run(
            ["cat", "/proc/self/net/dev"], capture_output=True, text=True, check=True
        ).stdout
        assert [ln.split(":")[0].strip() for ln in child.splitlines()[2:]] == ["lo"]
        if shutil.which("ip"):
            addrs = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
            assert [ln.split()[0] for ln in addrs.splitlines()] == ["lo"], addrs
            assert "127.0.0.1/8" in addrs.split()  # lo is up: it has its address
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname(), timeout=5):
                pass
    assert netns.namespace_id() == before
    assert netns.interfaces() == outside


@needs_netns
def test_other_threads_stay_outside_and_cannot_reach_its_servers() -> None:
    before = netns.namespace_id()
    seen: dict[str, object] = {}
    port: list[int] = []
    go, done = threading.Event(), threading.Event()

    def other() -> None:  # started before the namespace: stays outside
        go.wait(10)
        seen["ns"] = netns.namespace_id()
        try:
            socket.create_connection(("127.0.0.1", port[0]), timeout=5).close()
            seen["connect"] = "connected"
        except OSError as exc:
            seen["connect"] = type(exc).__name__
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with netns.loopback_namespace(), socket.create_server(("127.0.0.1", 0)) as server:
        port.append(server.getsockname()[1])
        go.set()
        assert done.wait(10)
    t.join(10)
    assert seen == {"ns": before, "connect": "ConnectionRefusedError"}


@needs_netns
def test_threads_started_inside_are_inside() -> None:
    ids: list[int] = []
    with netns.loopback_namespace():
        inside = netns.namespace_id()
        t = threading.Thread(target=lambda: ids.append(netns.namespace_id()))
        t.start()
        t.join(10)
    assert ids == [inside]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv is not installed")
@needs_netns
def test_without_cap_sys_admin_it_says_why_and_changes_nothing() -> None:
    code = (
        "from loadtest import netns\n"
        "before = netns.namespace_id()\n"
        "print(netns.unavailable())\n"
        "try:\n"
        "    with netns.loopback_namespace():\n"
        "        print('entered')\n"
        "except netns.NamespaceError as exc:\n"
        "    print('refused', exc.errno)\n"
        "print(netns.namespace_id() == before)\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout + out.stderr
    assert "CAP_SYS_ADMIN" in lines[0]
    assert lines[1].startswith("refused")
    assert lines[2] == "True"
