"""A syslog collector of the tests' own on 127.0.0.1: UDP, TCP (RFC 6587 octet
counting) and TLS (RFC 5425), and an RFC 5424 frame parser.

Each listener runs in a daemon thread and keeps every message it received, parsed,
in :attr:`Collector.messages`; :meth:`Collector.wait` polls with a bound.
"""

from __future__ import annotations

import datetime
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# RFC 5424 6: HEADER SP STRUCTURED-DATA [SP MSG]
_HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) (?P<timestamp>\S+) (?P<hostname>\S+) "
    rb"(?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-|\[.*?\])(?: (?P<msg>.*))?\Z",
    re.S,
)


@dataclass
class SyslogMessage:
    pri: int
    version: int
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    msg: bytes

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8


def parse_rfc5424(data: bytes) -> SyslogMessage:
    """One RFC 5424 message; AssertionError naming what does not conform."""
    m = _HEADER.match(data)
    assert m is not None, f"not an RFC 5424 message: {data[:200]!r}"
    pri = int(m["pri"])
    assert 0 <= pri <= 191, pri
    for name in ("hostname", "app", "procid", "msgid"):
        value = m[name]
        assert all(33 <= b <= 126 for b in value), (name, value)
    limits = {"hostname": 255, "app": 48, "procid": 128, "msgid": 32}
    for name, limit in limits.items():
        assert len(m[name]) <= limit, (name, m[name])
    stamp = m["timestamp"].decode()
    # RFC 5424 6.2.3: full-date "T" full-time, time-offset "Z" or +hh:mm; no leap second
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)", stamp)
    datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return SyslogMessage(
        pri,
        int(m["version"]),
        stamp,
        m["hostname"].decode(),
        m["app"].decode(),
        m["procid"].decode(),
        m["msgid"].decode(),
        m["msg"] or b"",
    )


class Collector:
    """A syslog listener on 127.0.0.1; ``scheme`` udp, tcp or tls."""

    def __init__(self, scheme: str, context: ssl.SSLContext | None = None) -> None:
        self.scheme = scheme
        self.context = context
        self.messages: list[SyslogMessage] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.sock.settimeout(0.2)
        if scheme != "udp":
            self.sock.listen(16)
        self._threads: list[threading.Thread] = []
        self._spawn(self._serve_udp if scheme == "udp" else self._accept)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _keep(self, data: bytes) -> None:
        try:
            msg = parse_rfc5424(data)
        except AssertionError as exc:
            self.errors.append(str(exc))
            return
        with self._lock:
            self.messages.append(msg)

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self._keep(data)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve_stream, conn)

    def _serve_stream(self, conn: socket.socket) -> None:
        if self.context is not None:
            conn.settimeout(10)
            try:
                conn = self.context.wrap_socket(conn, server_side=True)
            except OSError as exc:
                self.errors.append(f"TLS handshake: {exc}")
                conn.close()
                return
        conn.settimeout(0.2)
        buffer = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                # RFC 6587 3.4.1 octet counting: MSG-LEN SP SYSLOG-MSG
                while True:
                    space = buffer.find(b" ")
                    if space < 0:
                        break
                    length_text = buffer[:space]
                    if not length_text.isdigit() or length_text.startswith(b"0"):
                        self.errors.append(f"bad octet count {length_text[:20]!r}")
                        return
                    length = int(length_text)
                    if len(buffer) < space + 1 + length:
                        break
                    self._keep(buffer[space + 1 : space + 1 + length])
                    buffer = buffer[space + 1 + length :]

    def wait(
        self, predicate: Callable[[list[SyslogMessage]], object], timeout: float = 20.0
    ) -> object:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                snapshot = list(self.messages)
            value = predicate(snapshot)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out; {len(snapshot)} message(s) received, errors {self.errors}"
                )
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for t in self._threads:
            t.join(2)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it:
    (ca.pem, server.pem, server.key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "audit test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
