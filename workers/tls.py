"""DICOM TLS (PS3.15 Annex B, Secure Transport Connection Profiles) for the worker.

The acceptor never speaks TLS: it accepts and hands the raw socket to a worker,
which runs the handshake on its own loop with its own timeout
(:meth:`workers.server.AssociationServer.adopt`), so a slow or silent client never
holds up the acceptor or other associations.

Profiles and the :class:`ssl.SSLContext` settings they map to (TLS 1.3 suites are
all AEAD and are not restricted by ``set_ciphers``; renegotiation and compression are
off in every profile):

``bcp195`` (default)
    PS3.15 B.9 "BCP 195 TLS Secure Transport Connection Profile": TLS 1.2 or later
    (``minimum_version = TLSv1_2``), with the cipher suites RFC 7525 (BCP 195)
    section 4.2 recommends, TLS_{ECDHE,DHE}_RSA_WITH_AES_{128,256}_GCM_SHA{256,384}
    and their ECDHE_ECDSA forms, then the profile's fallback for older peers,
    TLS_RSA_WITH_AES_128_CBC_SHA (the server picks the strongest the client offers;
    DHE only if DH parameters were loaded, which Python leaves unset, so ECDHE is
    what is negotiated in practice).
``bcp195-nd``
    PS3.15 B.10 "Non-downgrading BCP 195 TLS Secure Transport Connection Profile":
    TLS 1.2 or later, forward secret ECDHE key exchange with AEAD ciphers only
    (AES-GCM, ChaCha20-Poly1305): no RSA key transport, no CBC, nothing weaker to
    fall back to.
``bcp195-extended``
    PS3.15 B.11 "Extended BCP 195 TLS Profile": never TLS 1.0 or 1.1, and "no other
    cipher suites shall be used" than its list: TLS_{DHE,ECDHE}_RSA_WITH_AES_{128,256}_GCM
    (required) and TLS_ECDHE_ECDSA_WITH_AES_{128,256}_GCM (optional; its Camellia-GCM
    suites are not in OpenSSL). TLS 1.3 has cipher suites of its own, none of them in
    that list, so this profile is TLS 1.2 only (``minimum_version`` and
    ``maximum_version`` TLSv1_2), as DCMTK's ``+pz`` reads it too.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: profile name -> (minimum TLS version, maximum TLS version or None, OpenSSL cipher
#: list for TLS 1.2)
PROFILES: dict[str, tuple[ssl.TLSVersion, ssl.TLSVersion | None, str | None]] = {
    "bcp195": (
        ssl.TLSVersion.TLSv1_2,
        None,
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:"
        # the profile's backward-compatible suite, TLS_RSA_WITH_AES_128_CBC_SHA, last
        "AES128-SHA",
    ),
    "bcp195-nd": (
        ssl.TLSVersion.TLSv1_2,
        None,
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
    ),
    # PS3.15 B.11: only the listed suites, none of which is a TLS 1.3 suite: TLS 1.2.
    "bcp195-extended": (
        ssl.TLSVersion.TLSv1_2,
        ssl.TLSVersion.TLSv1_2,
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384",
    ),
}
DEFAULT_PROFILE = "bcp195"


@dataclass(slots=True, frozen=True)
class TlsSettings:
    """What a worker needs to terminate TLS: plain data (paths), sent as JSON."""

    cert: str
    key: str
    #: CA bundle client certificates are verified against
    ca: str | None = None
    #: mutual TLS: a client without a certificate the CA vouches for is refused
    verify_client: bool = False
    profile: str = DEFAULT_PROFILE
    #: seconds a client gets to complete the handshake
    handshake_timeout: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TlsSettings:
        return cls(**data)


def _no_password() -> bytes:
    # Never let OpenSSL prompt on the terminal for an encrypted key.
    return b""


def apply_profile(ctx: ssl.SSLContext, profile: str) -> None:
    """Set the TLS versions and cipher suites of ``profile`` on ``ctx``."""
    try:
        minimum, maximum, ciphers = PROFILES[profile]
    except KeyError:
        raise ValueError(
            f"unknown TLS profile {profile!r} (one of {', '.join(PROFILES)})"
        ) from None
    ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The server-side context of ``settings``; raises OSError / ssl.SSLError /
    ValueError if a file is missing or does not load."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_profile(ctx, settings.profile)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(settings.cert, settings.key, password=_no_password)
    if settings.ca:
        ctx.load_verify_locations(cafile=settings.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if settings.verify_client else ssl.CERT_OPTIONAL
    elif settings.verify_client:
        raise ValueError("verifying client certificates needs a CA bundle (--tls-ca)")
    return ctx


def client_context(
    profile: str = DEFAULT_PROFILE,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> ssl.SSLContext:
    """A requestor-side context: verifies the server against ``ca`` (the system's
    CAs if None), presents ``cert``/``key`` if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    apply_profile(ctx, profile)
    if cert is not None:
        ctx.load_cert_chain(cert, key, password=_no_password)
    return ctx
