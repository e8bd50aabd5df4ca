"""The PROXY protocol (HAProxy's ``proxy-protocol.txt``), versions 1 and 2: a sans-IO parser.

Theory of operation
-------------------
A layer-4 load balancer (HAProxy ``send-proxy`` / ``send-proxy-v2``) connects to us
itself, so the socket's peer address is the balancer's. Before the first byte of the
client's own stream it writes one header naming the client's address:

* **v1**, text: ``PROXY TCP4|TCP6|UNKNOWN <src> <dst> <sport> <dport>\\r\\n``, the
  whole line at most 107 bytes. ``UNKNOWN`` (anything may follow, up to CRLF): the
  connection's own addresses stand.
* **v2**, binary: the 12-byte signature ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n``; a byte whose
  high nibble is the version (2) and low nibble the command (0 LOCAL, 1 PROXY); a byte
  whose high nibble is the address family (0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and low
  nibble the transport (0 UNSPEC, 1 STREAM, 2 DGRAM); a big-endian 16-bit length of
  what follows: the address block (12, 36 or 216 bytes by family) then TLVs (type,
  16-bit length, value). LOCAL is what the balancer's own health checks send: the
  connection is the balancer's, its own addresses stand. TLVs are skipped (their
  framing is checked: a TLV running past the header is a malformed header).

:func:`parse` looks at the bytes received so far (never consuming them: the caller
peeks) and answers with the header, or how many bytes it needs at least before it can
say more, or raises :class:`ProxyError` with a short ``reason`` (a metrics label) and
a human ``detail``. It is bounded: it never asks for more than :data:`V1_MAX_BYTES`
(the spec's maximum) for v1 or :data:`V2_MAX_BYTES` for v2. The socket side (peek,
wait, timeout, consume exactly the header) is :mod:`receiver.proxy_gate`.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum

#: The v2 signature: CRLF CRLF NUL CR LF "QUIT" LF.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Fixed part of a v2 header: signature, version/command, family/transport, length.
V2_FIXED = 16
#: The v1 prefix ("PROXY" and one space).
V1_PREFIX = b"PROXY "
#: The spec's maximum v1 line, CRLF included ("PROXY UNKNOWN" + two 39-character
#: IPv6 addresses + two ports, spaces, CRLF).
V1_MAX_BYTES = 107
#: The longest v2 header accepted. The format allows 16 + 65535 bytes; a balancer's
#: header with every TLV it may add (ALPN, authority, unique id, TLS details) is a few
#: hundred: beyond this it is refused rather than held in the acceptor's receive queue.
V2_MAX_BYTES = V2_FIXED + 4096

#: Bytes of the address block by v2 address family.
_V2_ADDRESS_BYTES = {1: 12, 2: 36, 3: 216}


class Command(IntEnum):
    """The v2 command (low nibble of byte 13)."""

    LOCAL = 0
    PROXY = 1


class Reason:
    """Why a connection was closed instead of served (the ``reason`` label of
    ``pacs_proxy_protocol_rejected_total``). The parser raises the first three; the
    socket side adds the others."""

    #: from a trusted address, the stream does not start with either signature
    MISSING = "missing"
    #: a signature, then something the spec does not allow
    MALFORMED = "malformed"
    #: longer than V1_MAX_BYTES / V2_MAX_BYTES
    TOO_LONG = "too_long"
    #: the peer closed before the header was complete
    TRUNCATED = "truncated"
    #: the header did not complete within the network timeout
    TIMEOUT = "timeout"
    #: a PROXY header from an address not in --proxy-protocol-from
    UNTRUSTED = "untrusted"


class ProxyError(ValueError):
    """A stream that does not start with a usable PROXY header."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{detail} ({reason})")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True, frozen=True)
class ProxyHeader:
    """A complete header: ``length`` bytes on the wire.

    ``source``/``destination`` are (address, port) of the client and of the address it
    connected to, or None when the header says to keep the connection's own
    (v2 LOCAL, v2 UNSPEC or UNIX family, v1 UNKNOWN)."""

    version: int
    length: int
    command: Command
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | int:
    """The header at the start of ``data``, or the number of bytes (more than
    ``len(data)``) needed before anything more can be said. Raises ProxyError."""
    buf = bytes(data[:V2_MAX_BYTES])
    if not buf:
        return 1
    if buf[0] == V2_SIGNATURE[0]:
        head = buf[: len(V2_SIGNATURE)]
        if V2_SIGNATURE.startswith(head):
            if len(buf) < V2_FIXED:
                return V2_FIXED
            return _parse_v2(buf)
    elif buf[0] == V1_PREFIX[0]:
        head = buf[: len(V1_PREFIX)]
        if V1_PREFIX.startswith(head):
            if len(head) < len(V1_PREFIX):
                return len(V1_PREFIX)
            return _parse_v1(buf)
    raise ProxyError(Reason.MISSING, "no PROXY protocol header")


def looks_like_header(data: bytes | bytearray | memoryview) -> bool | None:
    """True when ``data`` starts with a v1 or v2 signature, False when it cannot,
    None when too few bytes came to say (for peers that must NOT send one)."""
    buf = bytes(data[: len(V2_SIGNATURE)])
    if not buf:
        return None
    for signature in (V2_SIGNATURE, V1_PREFIX):
        common = min(len(buf), len(signature))
        if buf[:common] == signature[:common]:
            return True if common == len(signature) else None
    return False


# -- version 1 -------------------------------------------------------------------------


def _parse_v1(buf: bytes) -> ProxyHeader | int:
    end = buf.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if b"\n" in buf[:V1_MAX_BYTES]:
            raise ProxyError(Reason.MALFORMED, "v1 line not ended by CRLF")
        if len(buf) >= V1_MAX_BYTES:
            raise ProxyError(Reason.TOO_LONG, f"v1 line longer than {V1_MAX_BYTES} bytes")
        return len(buf) + 1
    line = buf[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError(Reason.MALFORMED, "v1 line is not ASCII") from None
    if "\n" in text or "\r" in text:
        raise ProxyError(Reason.MALFORMED, "v1 line not ended by CRLF")
    parts = text.split(" ")
    length = end + 2
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # The spec: whatever follows UNKNOWN is to be ignored.
        return ProxyHeader(1, length, Command.PROXY)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError(
            Reason.MALFORMED, "v1 line is not 'PROXY TCP4|TCP6|UNKNOWN src dst sport dport'"
        )
    version = 4 if parts[1] == "TCP4" else 6
    source = (_v1_address(parts[2], version), _v1_port(parts[4]))
    destination = (_v1_address(parts[3], version), _v1_port(parts[5]))
    return ProxyHeader(1, length, Command.PROXY, source, destination)


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(Reason.MALFORMED, f"v1 address {text[:48]!r} is not valid") from None
    if address.version != version:
        raise ProxyError(Reason.MALFORMED, f"v1 address {text!r} is not IPv{version}")
    # Written as the kernel's addresses are (getpeername: ::ffff:192.0.2.1, not
    # ipaddress's ::ffff:c000:201), whichever version of the header brought it.
    return socket.inet_ntop(socket.AF_INET if version == 4 else socket.AF_INET6, address.packed)


def _v1_port(text: str) -> int:
    # Decimal digits only (int() would take "+1", " 1", "1_0").
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or int(text) > 65535:
        raise ProxyError(Reason.MALFORMED, f"v1 port {text[:16]!r} is not 0..65535")
    return int(text)


# -- version 2 -------------------------------------------------------------------------


def _parse_v2(buf: bytes) -> ProxyHeader | int:
    if buf[: len(V2_SIGNATURE)] != V2_SIGNATURE:
        raise ProxyError(Reason.MISSING, "no PROXY protocol header")
    version, command = buf[12] >> 4, buf[12] & 0x0F
    if version != 2:
        raise ProxyError(Reason.MALFORMED, f"v2 header with version {version}")
    if command not in (Command.LOCAL, Command.PROXY):
        raise ProxyError(Reason.MALFORMED, f"v2 header with command {command}")
    family, transport = buf[13] >> 4, buf[13] & 0x0F
    (body,) = struct.unpack_from("!H", buf, 14)
    total = V2_FIXED + body
    if total > V2_MAX_BYTES:
        raise ProxyError(Reason.TOO_LONG, f"v2 header of {total} bytes (at most {V2_MAX_BYTES})")
    if family > 3 or transport > 2:
        raise ProxyError(Reason.MALFORMED, f"v2 family/transport byte 0x{buf[13]:02x}")
    if len(buf) < total:
        return total
    address_bytes = _V2_ADDRESS_BYTES.get(family, 0)
    if body < address_bytes:
        raise ProxyError(Reason.MALFORMED, f"v2 length {body} is shorter than its address block")
    _check_tlvs(buf, V2_FIXED + address_bytes, total)
    if command == Command.LOCAL:
        # The balancer speaking for itself (health checks): addresses, if any, ignored.
        return ProxyHeader(2, total, Command.LOCAL)
    if family in (1, 2) and transport != 1:
        raise ProxyError(Reason.MALFORMED, "v2 header for a non-stream transport")
    if family in (1, 2):
        # inet_ntop: the text getpeername gives for the same address.
        af, size = (socket.AF_INET, 4) if family == 1 else (socket.AF_INET6, 16)
        src_end = V2_FIXED + size
        dst_end = src_end + size
        sport, dport = struct.unpack_from("!HH", buf, dst_end)
        return ProxyHeader(
            2,
            total,
            Command.PROXY,
            (socket.inet_ntop(af, buf[V2_FIXED:src_end]), sport),
            (socket.inet_ntop(af, buf[src_end:dst_end]), dport),
        )
    # UNSPEC (the spec: use the connection's addresses) or UNIX (no IP address to
    # apply a policy to): the connection's own addresses stand.
    return ProxyHeader(2, total, Command.PROXY)


def _check_tlvs(buf: bytes, start: int, end: int) -> None:
    """Walk the TLVs in ``buf[start:end]``; their contents are not used, their
    framing must fit in the header."""
    offset = start
    while offset < end:
        if end - offset < 3:
            raise ProxyError(Reason.MALFORMED, "v2 TLV header runs past the header")
        (length,) = struct.unpack_from("!H", buf, offset + 1)
        offset += 3 + length
        if offset > end:
            raise ProxyError(Reason.MALFORMED, "v2 TLV runs past the header")


# -- building (tests, and tools that stand in for a balancer) --------------------------


def build_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None = None,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header: PROXY from ``source`` to ``destination`` (same family), or LOCAL
    when ``source`` is None."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(
        destination[0] if destination else ("0.0.0.0" if src.version == 4 else "::")
    )
    dport = destination[1] if destination else 0
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], dport)
    body = block + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None = None) -> bytes:
    """A v1 line: TCP4/TCP6 from ``source``, or UNKNOWN when ``source`` is None."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    src = ipaddress.ip_address(source[0])
    dst = destination or (("0.0.0.0" if src.version == 4 else "::"), 0)
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst[0]} {source[1]} {dst[1]}\r\n".encode("ascii")


__all__ = [
    "V1_MAX_BYTES",
    "V2_MAX_BYTES",
    "V2_SIGNATURE",
    "Command",
    "ProxyError",
    "ProxyHeader",
    "Reason",
    "build_v1",
    "build_v2",
    "looks_like_header",
    "parse",
]
