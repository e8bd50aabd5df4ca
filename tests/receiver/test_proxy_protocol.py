"""The receiver behind a layer-4 load balancer: the PROXY protocol and readiness.

* the parser (receiver/proxy.py): v1 (TCP4, TCP6, UNKNOWN), v2 (IPv4, IPv6, LOCAL,
  UNSPEC, TLVs), every malformation, every truncation, byte-by-byte feeding, and
  Hypothesis round trips and fuzzing;
* the gate's socket side (receiver/proxy_gate.py) over real loopback TCP: exactly the
  header is consumed, a peer that closes or stalls mid-header is refused;
* a running receiver with ``--proxy-protocol-from 127.0.0.1/32``: a DICOM peer cannot
  add a header itself, so an in-test TCP relay (the stand-in for HAProxy's
  ``send-proxy-v2``; the HAProxy end-to-end test is in the deployment tests) prepends
  one claiming 192.0.2.10 (TEST-NET-1: never connected to) and pipes both ways. The
  log line, the index, the audit messages and [ae-sources] see 192.0.2.10; each abuse
  case is closed without an answer and counted on /metrics;
* ``GET /readyz``: 200, then 503 at once on SIGTERM while --drain-delay still
  accepts new associations, then the usual stop.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics import wire as w
from metrics.aggregator import Aggregator
from receiver.config import ConfigError, build
from receiver.proxy import (
    V1_MAX_BYTES,
    V2_MAX_BYTES,
    V2_SIGNATURE,
    Command,
    ProxyError,
    ProxyHeader,
    Reason,
    build_v1,
    build_v2,
    looks_like_header,
    parse,
)
from receiver.proxy_gate import ProxyGate, read_header
from tests.audit.collector import Collector
from tests.metrics.helpers import short_tmpdir, until
from workers.index import open_index
from workers.telemetry import Telemetry

from .conftest import (
    ReceiverFactory,
    associate,
    make_files,
    needs_dcmtk,
    rejection,
    release,
    scu_ae,
    sop_uid,
    stored_files,
    wait_for,
)
from .test_metrics import free_port, scrape, total
from .test_tls import Pki, client, pki, tls_flags  # noqa: F401  (pki: a fixture)

CLIENT = ("192.0.2.10", 40001)
BALANCER_FACING = ("198.51.100.1", 11112)
#: the first bytes of an A-ASSOCIATE-RQ: what follows a header on the wire
ASSOCIATE_RQ_START = b"\x01\x00\x00\x00\x00\xcd\x00\x01"


def refused(data: bytes) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        parse(data)
    return info.value


# ------------------------------------------------------------------ the parser


def test_v2_ipv4_header_and_what_follows() -> None:
    header = build_v2(CLIENT, BALANCER_FACING)
    assert len(header) == 16 + 12
    got = parse(header + ASSOCIATE_RQ_START)
    assert got == ProxyHeader(2, 28, Command.PROXY, CLIENT, BALANCER_FACING)


def test_ipv4_mapped_addresses_read_as_the_kernel_writes_them() -> None:
    src, dst = ("::ffff:192.0.2.10", 1), ("::ffff:198.51.100.1", 2)
    for header in (build_v2(src, dst), build_v1(src, dst)):
        got = parse(header)
        assert isinstance(got, ProxyHeader) and (got.source, got.destination) == (src, dst)


def test_v2_ipv6_header() -> None:
    src, dst = ("2001:db8::10", 50000), ("2001:db8::1", 104)
    header = build_v2(src, dst)
    assert len(header) == 16 + 36
    assert parse(header + ASSOCIATE_RQ_START) == ProxyHeader(2, 52, Command.PROXY, src, dst)


def test_v2_local_keeps_the_connections_address() -> None:
    """HAProxy's health checks send LOCAL: the connection is the balancer's own."""
    assert parse(build_v2(None)) == ProxyHeader(2, 16, Command.LOCAL)
    # LOCAL with an address block (allowed; ignored) and a TLV.
    block = bytes(12) + b"\x04\x00\x01\x00"
    raw = V2_SIGNATURE + b"\x20\x11" + struct.pack("!H", len(block)) + block
    assert parse(raw) == ProxyHeader(2, len(raw), Command.LOCAL)


def test_v2_tlvs_are_skipped() -> None:
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00" + b"\x05\x00\x05abcde"  # ALPN, NOOP, UNIQUE_ID
    header = build_v2(CLIENT, BALANCER_FACING, tlvs=tlvs)
    got = parse(header + ASSOCIATE_RQ_START)
    assert isinstance(got, ProxyHeader)
    assert got.length == 16 + 12 + len(tlvs) and got.source == CLIENT


def test_v2_unspec_and_unix_families_keep_the_connections_address() -> None:
    unspec = V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert parse(unspec) == ProxyHeader(2, 16, Command.PROXY)
    unix = V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + bytes(216)
    assert parse(unix) == ProxyHeader(2, 16 + 216, Command.PROXY)


def test_v1_tcp4_tcp6_unknown() -> None:
    line = b"PROXY TCP4 192.0.2.10 198.51.100.1 40001 11112\r\n"
    assert build_v1(CLIENT, BALANCER_FACING) == line
    assert parse(line + ASSOCIATE_RQ_START) == ProxyHeader(
        1, len(line), Command.PROXY, CLIENT, BALANCER_FACING
    )
    six = b"PROXY TCP6 2001:db8::10 2001:db8::1 50000 104\r\n"
    assert parse(six) == ProxyHeader(
        1, len(six), Command.PROXY, ("2001:db8::10", 50000), ("2001:db8::1", 104)
    )
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, 15, Command.PROXY)
    unknown = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert parse(unknown) == ProxyHeader(1, len(unknown), Command.PROXY)


def test_v1_longest_line_is_accepted_and_one_more_byte_is_not() -> None:
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 16) + b"\r\n"
    assert len(longest) == V1_MAX_BYTES
    assert parse(longest) == ProxyHeader(1, V1_MAX_BYTES, Command.PROXY)
    full_v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    widest = f"PROXY TCP6 {full_v6} {full_v6} 65535 65535\r\n".encode()
    assert isinstance(parse(widest), ProxyHeader)
    assert refused(longest[:-2] + b"x\r\n").reason == Reason.TOO_LONG
    assert refused(b"PROXY " + b"x" * 200).reason == Reason.TOO_LONG


MALFORMED = {
    # v1
    "v1 bare LF": b"PROXY TCP4 192.0.2.10 198.51.100.1 40001 11112\n",
    "v1 CR inside": b"PROXY TCP4 192.0.2.10\r198.51.100.1 40001 11112\r\n",
    "v1 unknown protocol": b"PROXY UDP4 192.0.2.10 198.51.100.1 40001 11112\r\n",
    "v1 lower case": b"PROXY tcp4 192.0.2.10 198.51.100.1 40001 11112\r\n",
    "v1 missing port": b"PROXY TCP4 192.0.2.10 198.51.100.1 40001\r\n",
    "v1 extra field": b"PROXY TCP4 192.0.2.10 198.51.100.1 40001 11112 9\r\n",
    "v1 double space": b"PROXY TCP4  192.0.2.10 198.51.100.1 40001 11112\r\n",
    "v1 bad address": b"PROXY TCP4 192.0.2.300 198.51.100.1 40001 11112\r\n",
    "v1 host name": b"PROXY TCP4 modality 198.51.100.1 40001 11112\r\n",
    "v1 v6 in TCP4": b"PROXY TCP4 2001:db8::1 198.51.100.1 40001 11112\r\n",
    "v1 v4 in TCP6": b"PROXY TCP6 192.0.2.10 2001:db8::1 40001 11112\r\n",
    "v1 port too big": b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 11112\r\n",
    "v1 signed port": b"PROXY TCP4 192.0.2.10 198.51.100.1 +4000 11112\r\n",
    "v1 not ASCII": b"PROXY TCP4 192.0.2.10 198.51.100.1 4000\xff 11112\r\n",
    # v2
    "v2 version 1": V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
    "v2 version 3": V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
    "v2 command 2": V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),
    "v2 family 4": V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),
    "v2 transport 3": V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),
    "v2 datagram": V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),
    "v2 short IPv4 block": V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),
    "v2 short IPv6 block": V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),
    "v2 TLV overruns": build_v2(CLIENT, tlvs=b"\x01\x00\x09ab"),
    "v2 TLV header cut": build_v2(CLIENT, tlvs=b"\x01\x00"),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_headers(data: bytes) -> None:
    assert refused(data + ASSOCIATE_RQ_START).reason == Reason.MALFORMED


def test_no_header_is_missing() -> None:
    for data in (ASSOCIATE_RQ_START, b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.0\r\n", b"\r\n\r\nX"):
        assert refused(data).reason == Reason.MISSING
    # A wrong v2 signature (its last byte) and a v1 prefix without its space.
    assert refused(V2_SIGNATURE[:-1] + b"X" + bytes(8)).reason == Reason.MISSING
    assert refused(b"PROXYTCP4 ...\r\n").reason == Reason.MISSING


def test_v2_beyond_the_bound_is_too_long() -> None:
    body = V2_MAX_BYTES - 16 + 1
    data = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", body)
    # Said as soon as the fixed part is there: its bytes are never waited for.
    assert refused(data).reason == Reason.TOO_LONG
    fits = build_v2(
        CLIENT, tlvs=b"\x04" + struct.pack("!H", V2_MAX_BYTES - 31) + bytes(V2_MAX_BYTES - 31)
    )
    assert len(fits) == V2_MAX_BYTES
    assert isinstance(parse(fits), ProxyHeader)


VALID = {
    "v2 ipv4": build_v2(CLIENT, BALANCER_FACING),
    "v2 ipv6": build_v2(("2001:db8::10", 1), ("2001:db8::1", 2)),
    "v2 local": build_v2(None),
    "v2 tlvs": build_v2(CLIENT, tlvs=b"\x01\x00\x02h2\x04\x00\x00"),
    "v1 tcp4": build_v1(CLIENT, BALANCER_FACING),
    "v1 tcp6": build_v1(("2001:db8::10", 1), ("2001:db8::1", 2)),
    "v1 unknown": build_v1(None),
}


@pytest.mark.parametrize("header", VALID.values(), ids=VALID.keys())
def test_every_truncation_asks_for_more_and_bytes_one_by_one_complete_it(header: bytes) -> None:
    for n in range(len(header)):
        need = parse(header[:n])
        assert isinstance(need, int) and n < need <= len(header), (n, need)
    # Fed as a peer would trickle it: the answer comes exactly at its last byte.
    seen = b""
    for byte in header + ASSOCIATE_RQ_START:
        seen += bytes([byte])
        got = parse(seen)
        if isinstance(got, ProxyHeader):
            assert len(seen) == len(header) == got.length
            break
    else:
        pytest.fail("never complete")


def test_looks_like_header() -> None:
    assert looks_like_header(b"") is None
    assert looks_like_header(b"\r\n\r\n") is None
    assert looks_like_header(b"PROX") is None
    assert looks_like_header(V2_SIGNATURE) is True
    assert looks_like_header(b"PROXY TCP4") is True
    assert looks_like_header(ASSOCIATE_RQ_START) is False
    assert looks_like_header(b"\x16\x03\x01") is False  # a TLS ClientHello
    assert looks_like_header(b"PROXX") is False


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=64),
)
def test_round_trip(address: object, sport: int, dport: int, tail: bytes) -> None:
    family = socket.AF_INET6 if ":" in str(address) else socket.AF_INET
    src = (socket.inet_ntop(family, address.packed), sport)  # type: ignore[attr-defined]
    dst = ("0.0.0.0" if family == socket.AF_INET else "::", dport)
    for header in (build_v2(src, dst), build_v1(src, dst)):
        got = parse(header + tail)
        assert isinstance(got, ProxyHeader)
        assert got.source == src and got.destination == dst and got.length == len(header)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([V2_SIGNATURE, b"PROXY "]), st.binary(max_size=300))
def test_fuzz_after_a_signature_never_fails_otherwise(signature: bytes, rest: bytes) -> None:
    try:
        got = parse(signature + rest)
    except ProxyError as exc:
        assert exc.reason in (Reason.MALFORMED, Reason.TOO_LONG, Reason.MISSING)
    else:
        assert isinstance(got, (ProxyHeader, int))
        if isinstance(got, int):
            assert len(signature + rest) < got <= max(V2_MAX_BYTES, V1_MAX_BYTES)


def test_config_checks(tmp_path: Path) -> None:
    cfg = build({}, {"proxy_protocol_from": "10.0.0.0/8, 192.168.1.5", "drain_delay": "5"})
    assert cfg.proxy_protocol_from == ["10.0.0.0/8", "192.168.1.5"] and cfg.drain_delay == 5
    with pytest.raises(ConfigError, match=re.escape("--proxy-protocol-from: '10.0.0.0/33'")):
        build({}, {"proxy_protocol_from": "10.0.0.0/33"})
    with pytest.raises(ConfigError, match="--drain-delay"):
        build({}, {"drain_delay": "-1"})


# ------------------------------------------------- readiness in the aggregator


def test_readyz_follows_what_the_supervisor_reports() -> None:
    """503 "starting" until the supervisor says it accepts, 200 then, 503 "draining"
    once it says it drains, for good: a second sender (the supervisor reconnecting)
    saying "accepting" does not undo it. The state arrives as wire record 41."""

    async def get(port: int, path: str) -> tuple[int | None, str]:
        def call() -> tuple[int | None, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return int(r.status), r.read().decode()
            except urllib.error.HTTPError as exc:
                return int(exc.code), exc.read().decode()

        return await asyncio.to_thread(call)

    async def scenario(sockdir: str) -> None:
        path = os.path.join(sockdir, "agg.sock")
        agg = Aggregator(path, port=0)
        await agg.start()
        supervisor = Telemetry(path, "supervisor", role="supervisor", interval=3600)
        worker = Telemetry(path, 0, interval=3600)
        try:
            await supervisor.start()
            await worker.start()
            port = agg.http_port
            assert await get(port, "/readyz") == (503, "starting\n")
            worker.flush()  # workers say nothing about readiness
            await asyncio.sleep(0.2)
            assert await get(port, "/readyz") == (503, "starting\n")
            supervisor.readiness = 0
            supervisor.flush()
            await until(lambda: agg.state.accepting)
            assert await get(port, "/readyz") == (200, "ready\n")
            assert (await get(port, "/healthz"))[0] == 200
            supervisor.readiness = 1
            supervisor.flush()
            await until(lambda: agg.state.draining)
            assert await get(port, "/readyz") == (503, "draining\n")
            again = Telemetry(path, "supervisor", role="supervisor", interval=3600)
            again.readiness = 0
            await again.start()
            again.flush()
            await until(lambda: again.backlog == 0)
            await asyncio.sleep(0.2)
            assert await get(port, "/readyz") == (503, "draining\n")
            assert (await get(port, "/healthz"))[0] == 200  # alive, not ready
            await again.close()
        finally:
            await worker.close()
            await supervisor.close()
            await agg.close()

    with short_tmpdir() as sockdir:
        asyncio.run(scenario(sockdir))


def test_readiness_is_wire_record_41() -> None:
    record = w.Readiness(1)
    assert int(record.KIND) == 41
    ((payload, _start, _stop),) = list(w.encode_frames([record]))
    decoded = w.FrameDecoder().feed(payload)
    assert [w.decode_payload(p) for p in decoded] == [[record]]


# ----------------------------------------------- the gate over real sockets


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=5)
        server, _ = listener.accept()
    return client, server


def _read(server: socket.socket, timeout: float) -> ProxyHeader:
    async def run() -> ProxyHeader:
        return await read_header(asyncio.get_running_loop(), server, timeout)

    return asyncio.run(run())


def test_gate_consumes_exactly_the_header_sent_in_pieces() -> None:
    client, server = _pair()
    with client, server:
        header = build_v2(CLIENT, tlvs=b"\x05\x00\x03abc")

        def trickle() -> None:
            for piece in (header[:5], header[5:17], header[17:], ASSOCIATE_RQ_START):
                client.sendall(piece)
                time.sleep(0.05)

        sender = threading.Thread(target=trickle)
        sender.start()
        got = _read(server, 10.0)
        sender.join()
        assert got.source == CLIENT
        server.setblocking(True)
        server.settimeout(5)
        assert server.recv(64) == ASSOCIATE_RQ_START  # the client's stream, untouched


@pytest.mark.parametrize("header", [VALID["v2 ipv4"], VALID["v1 tcp4"]], ids=["v2", "v1"])
def test_gate_peer_closing_mid_header_is_truncated(header: bytes) -> None:
    client, server = _pair()
    with client, server:
        client.sendall(header[:20])
        client.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyError) as info:
            _read(server, 10.0)
        assert info.value.reason == Reason.TRUNCATED
    client, server = _pair()
    with client, server:
        client.close()
        with pytest.raises(ProxyError) as info:
            _read(server, 10.0)
        assert info.value.reason == Reason.TRUNCATED


def test_gate_peer_stalling_mid_header_times_out() -> None:
    client, server = _pair()
    with client, server:
        client.sendall(VALID["v2 ipv4"][:20])
        with pytest.raises(ProxyError) as info:
            _read(server, 0.5)
        assert info.value.reason == Reason.TIMEOUT


def test_gate_local_health_check_is_closed_and_a_local_stream_is_served() -> None:
    gate = ProxyGate(["127.0.0.1/32"], 5.0, 5.0)

    async def admit(server: socket.socket) -> tuple[str, int] | None:
        return await gate.admit(server, server.getpeername()[:2])

    client, server = _pair()
    with client, server:
        client.sendall(build_v2(None))  # HAProxy's TCP check: connect, LOCAL, close
        client.shutdown(socket.SHUT_WR)
        time.sleep(0.1)
        assert asyncio.run(admit(server)) is None
        assert server.fileno() == -1  # closed: no worker bothered
    client, server = _pair()
    with client, server:
        client.sendall(build_v2(None) + ASSOCIATE_RQ_START)
        expected = client.getsockname()[:2]
        assert asyncio.run(admit(server)) == expected  # the balancer's own address
    assert gate.refused == {}


# ------------------------------------------------------- a running receiver


class Relay:
    """A stand-in for a layer-4 balancer on 127.0.0.1: each client connection gets
    a connection to ``target`` that starts with ``header(client address)``; then
    bytes are piped both ways until either side closes. Bounded: blocking sockets
    with timeouts, daemon threads, everything closed by :meth:`close`."""

    def __init__(self, target: tuple[str, int], header: Callable[[tuple[str, int]], bytes]) -> None:
        self.target = target
        self.header = header
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=30)
            client.settimeout(30)
            self._sockets += [client, upstream]
            upstream.sendall(self.header(addr[:2]))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for s in self._sockets:
            s.close()


@pytest.fixture
def relays() -> Iterator[Callable[..., Relay]]:
    made: list[Relay] = []

    def make(target: tuple[str, int], header: Callable[[tuple[str, int]], bytes]) -> Relay:
        relay = Relay(target, header)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


def claiming(host: str, version: int = 2) -> Callable[[tuple[str, int]], bytes]:
    """A header claiming the client is ``host`` (with the real client's port)."""

    def header(client: tuple[str, int]) -> bytes:
        source = (host, int(client[1]))
        return build_v2(source) if version == 2 else build_v1(source)

    return header


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector("udp")
    yield c
    c.close()


@needs_dcmtk
def test_through_a_balancer_the_client_address_is_the_peer(
    receiver_factory: ReceiverFactory,
    relays: Callable[..., Relay],
    collector: Collector,
    tmp_path: Path,
) -> None:
    config = tmp_path / "rx.toml"
    config.write_text('[ae-sources]\nMODALITY = ["192.0.2.10/32"]\n')
    rx = receiver_factory(
        "--proxy-protocol-from",
        "127.0.0.1/32",
        "--config",
        str(config),
        "--audit-syslog",
        collector.url,
    )
    v2 = relays((rx.host, rx.port), claiming("192.0.2.10"))
    v1 = relays((rx.host, rx.port), claiming("192.0.2.10", version=1))
    elsewhere = relays((rx.host, rx.port), claiming("192.0.2.99"))

    # C-STORE through the v2 relay, as MODALITY: [ae-sources] lets it in from .10.
    files = make_files(tmp_path / "src", 2)
    ae = scu_ae("MODALITY", storage=True)
    assoc = ae.associate("127.0.0.1", v2.port, ae_title="PACSRX")
    try:
        assert assoc.is_established
        for path in files:
            assert assoc.send_c_store(str(path)).Status == 0x0000
    finally:
        release(assoc)
    # Echo through the v1 relay.
    assoc = scu_ae("OTHERSCU").associate("127.0.0.1", v1.port, ae_title="PACSRX")
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        release(assoc)
    # A direct connection from the balancer's address without a header: closed, no RJ.
    direct = associate(rx, scu_ae("MODALITY"), called="PACSRX")
    assert not direct.is_established and rejection(direct) is None
    # MODALITY claiming another address: [ae-sources] refuses it (RJ reason 3).
    via = scu_ae("MODALITY").associate("127.0.0.1", elsewhere.port, ae_title="PACSRX")
    assert rejection(via) == (1, 1, 3)  # permanent, service-user, calling AE not recognized

    # The association log lines name the client, never the balancer (127.0.0.1).
    rx.wait_log(r"association peer=192\.0\.2\.10:\d+ calling_ae=MODALITY .*instances=2")
    rx.wait_log(r"association peer=192\.0\.2\.10:\d+ calling_ae=OTHERSCU")
    rx.wait_log(r"rejecting association from 'MODALITY' .*peer 192\.0\.2\.99:\d+")
    rx.wait_log(r"PROXY protocol: no PROXY protocol header \(missing\)")
    assert not re.search(r"association peer=127\.0\.0\.1", rx.log())

    # The index's source address.
    stored = stored_files(rx.storage)
    assert set(stored) == {sop_uid(p) for p in files}

    def indexed() -> list[Any] | None:
        index = open_index("", str(rx.storage))
        try:
            records = [index.get(uid) for uid in stored]
        finally:
            index.close()
        return records if all(records) else None

    records = wait_for(indexed, 20, what="both instances indexed")
    assert {r.source_address.rsplit(":", 1)[0] for r in records} == {"192.0.2.10"}

    # The audit trail: instances transferred from .10, the refusal of .99.
    def texts(messages: list[Any]) -> list[str]:
        return [m.msg.decode(errors="replace") for m in messages]

    collector.wait(
        lambda ms: (
            any('NetworkAccessPointID="192.0.2.10"' in t for t in texts(ms))
            and any("192.0.2.99" in t for t in texts(ms))
        )
    )
    assert not any('NetworkAccessPointID="127.0.0.1"' in t for t in texts(collector.messages))


def closed_unanswered(sock: socket.socket) -> bool:
    """The receiver closed ``sock`` without sending a byte (no A-ASSOCIATE-RJ)."""
    sock.settimeout(20)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True  # closed with our bytes unread: the kernel resets


def test_abuse_cases_are_closed_and_counted(
    receiver_factory: ReceiverFactory, relays: Callable[..., Relay]
) -> None:
    port = free_port()
    rx = receiver_factory(
        "--proxy-protocol-from",
        "127.0.0.1/32",
        "--metrics-port",
        str(port),
        "--network-timeout",
        "2",
    )
    wait_for(lambda: scrape(port, "/healthz"), 20, what="/healthz")
    cases = {
        Reason.MISSING: ASSOCIATE_RQ_START + bytes(60),
        Reason.MALFORMED: MALFORMED["v2 version 1"],
        Reason.TOO_LONG: b"PROXY " + b"x" * 120,
        Reason.TRUNCATED: VALID["v2 ipv4"][:20],
        Reason.TIMEOUT: VALID["v1 tcp4"][:20],
    }
    for reason, data in cases.items():
        with socket.create_connection((rx.host, rx.port), timeout=10) as sock:
            sock.sendall(data)
            if reason == Reason.TRUNCATED:
                sock.shutdown(socket.SHUT_WR)
            assert closed_unanswered(sock), reason
    # A header from an address not in --proxy-protocol-from (127.0.0.2 is loopback too).
    with socket.create_connection(
        (rx.host, rx.port), timeout=10, source_address=("127.0.0.2", 0)
    ) as sock:
        sock.sendall(build_v2(CLIENT) + ASSOCIATE_RQ_START)
        assert closed_unanswered(sock)
    # The balancer's health check (LOCAL, then close) is not an abuse.
    with socket.create_connection((rx.host, rx.port), timeout=10) as sock:
        sock.sendall(build_v2(None))
    # A DICOM peer on an untrusted address without a header is served as usual.
    assoc = scu_ae("DIRECTSCU").associate(
        rx.host, rx.port, ae_title="PACSRX", bind_address=("127.0.0.2", 0)
    )
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        release(assoc)
    rx.wait_log(r"association peer=127\.0\.0\.2:\d+ calling_ae=DIRECTSCU")
    # And one through the balancer, among all these (no [ae-sources]: straight to a worker).
    relay = relays((rx.host, rx.port), claiming("192.0.2.10"))
    assoc = scu_ae("RELAYEDSCU").associate("127.0.0.1", relay.port, ae_title="PACSRX")
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        release(assoc)
    rx.wait_log(r"association peer=192\.0\.2\.10:\d+ calling_ae=RELAYEDSCU")

    reasons = [*cases, Reason.UNTRUSTED]

    def counted() -> bool:
        text = scrape(port)
        return all(
            total(text, "pacs_proxy_protocol_rejected_total", reason=r) == 1 for r in reasons
        )

    wait_for(counted, 20, interval=0.2, what="each reason counted once on /metrics")
    text = scrape(port)
    assert total(text, "pacs_proxy_protocol_rejected_total") == len(reasons)  # LOCAL: not
    for reason in reasons:
        rx.wait_log(rf"closing connection from 127\.0\.0\.[12]:\d+: PROXY protocol: .*\({reason}\)")
    assert rx.proc is not None and rx.proc.poll() is None


def http_status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def test_readiness_goes_503_on_sigterm_while_drain_delay_still_accepts(
    receiver_factory: ReceiverFactory,
) -> None:
    port = free_port()
    rx = receiver_factory("--metrics-port", str(port), "--drain-delay", "10")
    wait_for(lambda: http_status(port, "/readyz") == 200, 20, what="/readyz 200")
    rx.signal(signal.SIGTERM)
    wait_for(lambda: http_status(port, "/readyz") == 503, 10, what="/readyz 503")
    rx.wait_log(r"draining: not ready; accepting for 10 s more")
    # Not ready, yet still accepting: an association made now is served.
    assoc = associate(rx, scu_ae("LATESCU"))
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        release(assoc)
    assert http_status(port, "/readyz") == 503  # and it stays so
    assert "stopping: no new connections" not in rx.log()
    assert rx.wait(40) == 0  # then the usual graceful stop
    rx.wait_log(r"stopping: no new connections")


def test_tls_behind_a_balancer(
    receiver_factory: ReceiverFactory,
    relays: Callable[..., Relay],
    pki: Pki,  # noqa: F811  (the fixture imported from test_tls)
    tmp_path: Path,
) -> None:
    """With DICOM TLS the balancer passes the TLS stream through, the header first in
    clear: the acceptor consumes it, the worker's handshake follows, and the
    admission the worker asks the supervisor for ([ae-sources] inside TLS) is about
    the client's address."""
    config = tmp_path / "rx.toml"
    config.write_text('[ae-sources]\nMODALITY = ["192.0.2.10"]\n')
    rx = receiver_factory(
        *tls_flags(pki), "--proxy-protocol-from", "127.0.0.1", "--config", str(config)
    )
    good = relays((rx.host, rx.port), claiming("192.0.2.10"))
    bad = relays((rx.host, rx.port), claiming("192.0.2.99", version=1))
    assoc = scu_ae("MODALITY").associate(
        "127.0.0.1", good.port, ae_title="PACSRX", tls_args=(client(pki), "127.0.0.1")
    )
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        release(assoc)
    rx.wait_log(r"association peer=192\.0\.2\.10:\d+ calling_ae=MODALITY")
    other = scu_ae("MODALITY").associate(
        "127.0.0.1", bad.port, ae_title="PACSRX", tls_args=(client(pki), "127.0.0.1")
    )
    assert rejection(other) == (1, 1, 3)  # read over TLS: permanent, service-user, AE
    rx.wait_log(r"refusing 'MODALITY' from 192\.0\.2\.99 \(over TLS, in worker \d\)")
