"""The acceptor under abuse, on the real process tree: a peer that stalls in the
middle of its A-ASSOCIATE-RQ (the calling AE title peek), a flood of refused peers,
a supervisor out of file descriptors, and a worker whose "closed" reports are lost.
Each checks behaviour: the supervisor does not spin (its CPU time, read from /proc,
stays far below what a busy loop burns over the same stall: a generous bound, not a
timing), every peer is eventually answered or closed, slots are not leaked."""

from __future__ import annotations

import os
import resource
import socket
import struct
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver.acceptor import MAX_REFUSING

from .conftest import (
    Receiver,
    ReceiverFactory,
    associate,
    rejection,
    release,
    scu_ae,
    wait_for,
)

pytestmark = pytest.mark.interop

#: CPU seconds the supervisor may use while a peer stalls for STALL seconds: an idle
#: supervisor uses a few milliseconds; a busy loop uses all it can get (even with
#: 2 cores shared by a loaded machine, several times this).
STALL = 3.0
CPU_BOUND = 0.3
PERMANENT, SERVICE_USER, NO_REASON = 1, 1, 1


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (not its children), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def counter(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    value = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                value += sample.value
    return value


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the receiver closed ``sock`` (EOF or reset), without blocking."""
    try:
        data = sock.recv(4096, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return data == b""


def echo_ok(rx: Receiver, ae_title: str) -> None:
    assoc = associate(rx, scu_ae(ae_title))
    try:
        assert assoc.is_established, rejection(assoc)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        release(assoc)


# ------------------------------------------------------------ the peek


def test_peer_stalling_in_its_request_does_not_spin_the_supervisor(
    receiver_factory: ReceiverFactory,
) -> None:
    rx = receiver_factory("--workers", "1", "--max-associations-per-ae", "2", "--acse-timeout", "6")
    with socket.create_connection((rx.host, rx.port), timeout=10) as peer:
        # 10 of the 42 bytes the acceptor needs to read the calling AE title: an
        # A-ASSOCIATE-RQ header (type 1, length 68) and the start of its body.
        peer.sendall(struct.pack(">BBI", 1, 0, 68) + b"\x00\x01\x00\x00")
        peer.setblocking(False)  # closed_by_peer() polls, never waits
        time.sleep(0.3)  # the acceptor has accepted it and peeked the 10 bytes
        before = cpu_seconds(rx.pid)
        time.sleep(STALL)
        used = cpu_seconds(rx.pid) - before
        assert used < CPU_BOUND, f"supervisor used {used:.2f} s CPU over a {STALL:g} s stall"
        # Within the ACSE timeout the peer is closed, with one line saying why.
        wait_for(lambda: closed_by_peer(peer), 20, what="the stalled peer to be closed")
    rx.wait_log(r"no A-ASSOCIATE-RQ within --acse-timeout", 5)
    # The peeked-at socket did not take a per-AE slot; the receiver serves others.
    echo_ok(rx, "AFTERSTALL")


def test_peer_closing_in_the_middle_of_its_request_is_dropped(
    receiver_factory: ReceiverFactory,
) -> None:
    rx = receiver_factory(
        "--workers", "1", "--max-associations-per-ae", "2", "--acse-timeout", "60"
    )
    with socket.create_connection((rx.host, rx.port), timeout=10) as peer:
        peer.sendall(struct.pack(">BBI", 1, 0, 68) + b"\x00\x01\x00\x00")
        peer.shutdown(socket.SHUT_WR)  # ... and no more: the 10 bytes stay queued
        peer.setblocking(False)
        before = cpu_seconds(rx.pid)
        # Closed long before the ACSE timeout, without the supervisor spinning meanwhile.
        wait_for(lambda: closed_by_peer(peer), 20, what="the half-closed peer to be closed")
        time.sleep(STALL)
        used = cpu_seconds(rx.pid) - before
        assert used < CPU_BOUND, f"supervisor used {used:.2f} s CPU"
    echo_ok(rx, "AFTERCLOSE")


# ------------------------------------------------------------ refusals


def test_refused_peers_in_flight_are_capped(
    receiver_factory: ReceiverFactory,
) -> None:
    metrics = free_port()
    rx = receiver_factory(
        "--workers",
        "1",
        "--deny-ip",
        "127.0.0.1",
        "--artim-timeout",
        "60",
        "--metrics-port",
        str(metrics),
    )
    extra = 40
    peers: list[socket.socket] = []
    try:
        # Refused peers that send nothing: each would be held (with its receive
        # buffer) until its ARTIM timeout; beyond the cap they are closed at once.
        for _ in range(MAX_REFUSING + extra):
            peer = socket.create_connection((rx.host, rx.port), timeout=10)
            peer.setblocking(False)  # closed_by_peer() polls, never waits
            peers.append(peer)

        def closed() -> int:
            return sum(closed_by_peer(p) for p in peers)

        wait_for(lambda: closed() >= extra, 20, what=f"{extra} refused peers closed unanswered")
        # The first MAX_REFUSING are still waiting for their A-ASSOCIATE-RQ.
        assert closed() <= extra + 5
        rx.wait_log(r"closed \d+ refused connection\(s\) without A-ASSOCIATE-RJ", 5)
        wait_for(
            lambda: counter(metrics, "pacs_acceptor_unanswered_total") >= extra,
            15,
            what="pacs_acceptor_unanswered_total",
        )
    finally:
        for p in peers:
            p.close()

    # With the held ones gone, a refused peer gets its A-ASSOCIATE-RJ again.
    def answered() -> bool:
        assoc = associate(rx, scu_ae("REFUSED"))
        release(assoc)
        return rejection(assoc) == (PERMANENT, SERVICE_USER, NO_REASON)

    wait_for(answered, 20, interval=0.2, what="an A-ASSOCIATE-RJ for a refused peer")


def test_refused_silent_peer_is_closed_by_artim(
    receiver_factory: ReceiverFactory,
) -> None:
    """The rejecting acceptor's bridge runs the engine's ARTIM: a refused peer that
    never sends its A-ASSOCIATE-RQ is closed when it expires, and said so."""
    rx = receiver_factory("--workers", "1", "--deny-ip", "127.0.0.1", "--artim-timeout", "1")
    peer = socket.create_connection((rx.host, rx.port), timeout=10)
    try:
        peer.setblocking(False)  # closed_by_peer() polls, never waits
        # Held (not closed at once: the RJ would answer a request) ...
        assert not closed_by_peer(peer)
        # ... until ARTIM expires.
        wait_for(lambda: closed_by_peer(peer), 20, what="the silent refused peer closed")
    finally:
        peer.close()
    rx.wait_log(r"refused connection from 127\.0\.0\.1:\d+ .*: no A-ASSOCIATE-RQ came", 10)
    # A refused peer that sends its request still gets its A-ASSOCIATE-RJ.
    assoc = associate(rx, scu_ae("REFUSED"))
    release(assoc)
    assert rejection(assoc) == (PERMANENT, SERVICE_USER, NO_REASON)


def test_out_of_descriptors_backs_off_and_recovers(
    receiver_factory: ReceiverFactory,
) -> None:
    metrics = free_port()
    rx = receiver_factory("--workers", "1", "--metrics-port", str(metrics))
    echo_ok(rx, "BEFORE")
    pid = rx.pid
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    peers: list[socket.socket] = []
    try:
        # The lowest free descriptor number becomes the limit: accept(2) gets EMFILE.
        used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = next(n for n in range(len(used) + 1) if n not in used)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, original[1]))
        for _ in range(3):
            peers.append(socket.create_connection((rx.host, rx.port), timeout=10))
        rx.wait_log(r"cannot accept connections: .*\(EMFILE\)", 10)
        before = cpu_seconds(pid)
        time.sleep(STALL)
        spent = cpu_seconds(pid) - before
        assert spent < CPU_BOUND, f"supervisor used {spent:.2f} s CPU while out of descriptors"
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
        for p in peers:
            p.close()
    rx.wait_log(r"accepting connections again after \d+ pause\(s\)", 10)
    echo_ok(rx, "AFTER")
    wait_for(
        lambda: counter(metrics, "pacs_accept_backoffs_total", reason="EMFILE") >= 1,
        15,
        what="pacs_accept_backoffs_total{reason=EMFILE}",
    )


# ------------------------------------------------------------ lost reports


def test_lost_closed_report_does_not_leak_a_slot(
    receiver_factory: ReceiverFactory, tmp_path: Path
) -> None:
    rx = receiver_factory(
        "--workers",
        "1",
        "--max-associations",
        "1",
        "--handler",
        "EVT_C_ECHO=tests.receiver.lossy_hooks:on_echo",
    )
    for title in ("FIRST", "SECOND", "THIRD"):
        # The worker never reports the previous association closed; its heartbeat
        # (twice a second) tells the supervisor, which frees the slot.
        def served(title: str = title) -> Any:
            assoc = associate(rx, scu_ae(title))
            if not assoc.is_established:
                return None
            try:
                return assoc.send_c_echo().Status == 0x0000
            finally:
                release(assoc)

        assert wait_for(served, 15, interval=0.2, what=f"{title} served with a free slot")
    rx.wait_log(r"worker 0: \d+ closed connection\(s\) were never reported closed", 5)
