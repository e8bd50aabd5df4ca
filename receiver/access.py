"""Who may connect: the acceptor's address policy.

``--allow-ip`` / ``--deny-ip`` apply to the peer address of every connection before
it is handed to a worker: deny wins over allow, and with an allow list anything not
in it is refused. ``[ae-sources]`` ties calling AE titles to the addresses they may
connect from; AEs not in the table are not restricted by it. A refused peer is
answered with an A-ASSOCIATE-RJ by the acceptor (see receiver.acceptor).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or CIDR networks ('10.0.0.0/8', '::1') -> networks; ValueError
    naming the first value that is neither. Host bits in a network are ignored."""
    out: list[Network] = []
    for value in values:
        text = str(value).strip()
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network") from None
    return tuple(out)


def peer_address(host: str) -> Address | None:
    """The peer's address as accept() gave it; an IPv4-mapped IPv6 address (a
    dual-stack listener) is taken as the IPv4 address it maps. None if unparsable."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _within(addr: Address, networks: Iterable[Network]) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


@dataclass(slots=True, frozen=True)
class AccessPolicy:
    """The parsed ``--allow-ip``, ``--deny-ip`` and ``[ae-sources]``."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    #: calling AE title -> networks it may connect from
    ae_sources: Mapping[str, tuple[Network, ...]] = field(default_factory=dict)

    @classmethod
    def build(
        cls, allow: Iterable[str], deny: Iterable[str], ae_sources: Mapping[str, Iterable[str]]
    ) -> AccessPolicy:
        """Parse the settings; ValueError on a bad address or network."""
        return cls(
            parse_networks(allow),
            parse_networks(deny),
            {ae.strip(): parse_networks(nets) for ae, nets in ae_sources.items()},
        )

    @property
    def filters_addresses(self) -> bool:
        return bool(self.allow or self.deny)

    def address_allowed(self, host: str) -> bool:
        """``--deny-ip`` / ``--allow-ip`` for the peer ``host``."""
        if not self.filters_addresses:
            return True
        addr = peer_address(host)
        if addr is None:
            return False
        if _within(addr, self.deny):
            return False
        return not self.allow or _within(addr, self.allow)

    def ae_source_allowed(self, calling_ae: str, host: str) -> bool:
        """``[ae-sources]``: may ``calling_ae`` connect from ``host``?"""
        networks = self.ae_sources.get(calling_ae.strip())
        if networks is None:
            return True
        addr = peer_address(host)
        return addr is not None and _within(addr, networks)


__all__ = ["AccessPolicy", "parse_networks", "peer_address"]
