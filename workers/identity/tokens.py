"""JSON Web Tokens (user identity type 5): verified by PyJWT with pinned algorithms.

PyJWT verifies the compact JWS (RFC 7515): the header, the ``alg`` against the
configured list only, critical extensions, and the signature (HS256/384/512 with the
standard library; RS256 and ES256 with the optional ``cryptography`` package, which
``PyJWT[crypto]`` brings). Around it this module keeps two things of its own:

* a strict first look at the token, so that every refusal has a reason that can be
  logged (never the token): segments, base64url alphabet, a header that is a JSON
  object without NaN or runaway nesting, and the ``alg`` checked against the pinned
  list *before* any key is used;
* the claims (RFC 7519 4.1), checked against the clock the policy is given: PyJWT
  reads the system clock and is laxer than this receiver wants (it takes ``true`` for
  an ``exp`` of 1, truncates fractional times, reads an empty ``aud`` as none).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt as pyjwt

from .errors import IdentityConfigError

__all__ = ["JWTSettings", "JWTVerifier", "TokenRejected"]

#: digest sizes: RFC 7518 3.2 wants an HMAC key at least this long
HMAC_ALGORITHMS: dict[str, int] = {
    "HS256": hashlib.sha256().digest_size,
    "HS384": hashlib.sha384().digest_size,
    "HS512": hashlib.sha512().digest_size,
}
PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class JWTSettings:
    """How JWTs (user identity type 5) are verified."""

    #: accepted ``alg`` header values; "none" is never accepted
    algorithms: tuple[str, ...] = ("HS256",)
    #: the shared secret of HS* (or ``secret_file``: its bytes, one trailing newline
    #: stripped); at least as long as the hash output (RFC 7518 3.2)
    secret: bytes | None = field(default=None, repr=False)
    secret_file: Path | None = None
    #: PEM public key for RS256 (RSA, 2048 bits or more) or ES256 (EC P-256)
    public_key_file: Path | None = None
    #: accepted ``iss`` values; empty: any
    issuer: tuple[str, ...] = ()
    #: our names; a token's ``aud`` must name one. Empty: tokens with ``aud`` are
    #: refused (RFC 7519 4.1.3)
    audience: tuple[str, ...] = ()
    #: the claim that names the user
    subject_claim: str = "sub"
    #: clock skew tolerated on ``exp`` and ``nbf``, seconds
    leeway: float = 30.0
    #: refuse tokens without ``exp``
    require_exp: bool = True


class TokenRejected(Exception):
    """A JWT that does not verify; the message is the reason (never the token)."""


def _import_cryptography() -> Any:
    """The pieces of ``cryptography`` the key checks need (ImportError without it)."""
    from types import SimpleNamespace

    names = {
        "exceptions": "cryptography.exceptions",
        "ec": "cryptography.hazmat.primitives.asymmetric.ec",
        "rsa": "cryptography.hazmat.primitives.asymmetric.rsa",
        "serialization": "cryptography.hazmat.primitives.serialization",
    }
    return SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise TokenRejected(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenRejected(f"the {what} is not a JSON object")
    return value


def _b64url_decode(text: str, what: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenRejected(f"the {what} is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def is_number(value: Any) -> bool:
    """A JSON number (not a boolean, which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class JWTVerifier:
    """Verifies compact JWS tokens (RFC 7515, 7519) against configured keys."""

    def __init__(self, settings: JWTSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        algorithms = tuple(settings.algorithms)
        if not algorithms:
            raise IdentityConfigError("jwt: no algorithm configured")
        for alg in algorithms:
            if alg not in HMAC_ALGORITHMS and alg not in PUBLIC_KEY_ALGORITHMS:
                raise IdentityConfigError(
                    f"jwt: algorithm {alg!r} is not supported "
                    f"({', '.join([*HMAC_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS])})"
                )
        if not settings.subject_claim:
            raise IdentityConfigError("jwt: subject_claim is empty")
        if not settings.leeway >= 0:
            raise IdentityConfigError("jwt: leeway must be 0 or more seconds")
        #: the key each pinned algorithm verifies with
        self._keys: dict[str, Any] = {}
        hs = [a for a in algorithms if a in HMAC_ALGORITHMS]
        if hs:
            secret = self._load_secret(hs)
            self._keys.update(dict.fromkeys(hs, secret))
        pk = [a for a in algorithms if a in PUBLIC_KEY_ALGORITHMS]
        if pk:
            self._keys[pk[0]] = self._load_public_key(pk)
        self.algorithms = frozenset(algorithms)
        # Our own instance: the module-level PyJWT functions share global options.
        self._jws = pyjwt.PyJWS(options={"enforce_minimum_key_length": True})

    def _load_secret(self, algorithms: list[str]) -> bytes:
        s = self.settings
        if (s.secret is None) == (s.secret_file is None):
            raise IdentityConfigError(
                f"jwt: {', '.join(algorithms)} need one of secret or secret_file"
            )
        if s.secret_file is not None:
            try:
                secret = Path(s.secret_file).read_bytes()
            except OSError as exc:
                raise IdentityConfigError(
                    f"jwt: cannot read secret_file {s.secret_file}: {exc.strerror}"
                ) from None
            secret = secret.removesuffix(b"\n").removesuffix(b"\r")
        else:
            secret = bytes(s.secret or b"")
        for alg in algorithms:
            need = HMAC_ALGORITHMS[alg]
            if len(secret) < need:
                raise IdentityConfigError(
                    f"jwt: the {alg} secret has {len(secret)} bytes; RFC 7518 3.2 "
                    f"requires at least {need}"
                )
            try:  # PyJWT refuses secrets that look like public keys (algorithm confusion)
                pyjwt.get_algorithm_by_name(alg).prepare_key(secret)
            except pyjwt.exceptions.InvalidKeyError as exc:
                raise IdentityConfigError(f"jwt: the {alg} secret: {exc}") from None
        return secret

    def _load_public_key(self, algorithms: list[str]) -> Any:
        s = self.settings
        if s.public_key_file is None:
            raise IdentityConfigError(f"jwt: {', '.join(algorithms)} need a public_key_file")
        if len(algorithms) > 1:
            raise IdentityConfigError("jwt: one public key serves RS256 or ES256, not both")
        try:
            c = _import_cryptography()
        except ImportError:
            raise IdentityConfigError(
                f"jwt: {algorithms[0]} needs the 'cryptography' package, which is not "
                "installed (pip install 'PyJWT[crypto]'), or use HS256/HS384/HS512"
            ) from None
        try:
            pem = Path(s.public_key_file).read_bytes()
        except OSError as exc:
            raise IdentityConfigError(
                f"jwt: cannot read public_key_file {s.public_key_file}: {exc.strerror}"
            ) from None
        try:
            key = c.serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, c.exceptions.UnsupportedAlgorithm) as exc:
            raise IdentityConfigError(
                f"jwt: {s.public_key_file} is not a PEM public key: {exc}"
            ) from None
        if algorithms[0] == "RS256":
            if not isinstance(key, c.rsa.RSAPublicKey):
                raise IdentityConfigError(
                    f"jwt: RS256 needs an RSA key; {s.public_key_file} is not"
                )
            if key.key_size < 2048:
                raise IdentityConfigError(
                    f"jwt: the RSA key has {key.key_size} bits; RS256 needs 2048 or more"
                )
        elif not (
            isinstance(key, c.ec.EllipticCurvePublicKey) and isinstance(key.curve, c.ec.SECP256R1)
        ):
            raise IdentityConfigError(
                f"jwt: ES256 needs an EC P-256 key; {s.public_key_file} is not"
            )
        return key

    def verify(self, token: bytes) -> tuple[str, bytes]:
        """(user, server response) for a valid token; TokenRejected says why not."""
        alg = self._first_look(token)
        try:
            decoded = self._jws.decode_complete(token, self._keys[alg], algorithms=[alg])
        except pyjwt.exceptions.InvalidSignatureError:
            raise TokenRejected("bad signature") from None
        except pyjwt.exceptions.PyJWTError as exc:
            raise TokenRejected(f"the token is not valid: {exc}") from None
        return self._check_claims(_json_object(decoded["payload"], "payload"))

    def _first_look(self, token: bytes) -> str:
        """The pinned algorithm a well-formed token names; TokenRejected says why not."""
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            raise TokenRejected("the token is not ASCII") from None
        parts = text.split(".")
        if len(parts) == 5:
            raise TokenRejected("encrypted tokens (JWE) are not supported")
        if len(parts) != 3:
            raise TokenRejected("the token is not header.payload.signature")
        header = _json_object(_b64url_decode(parts[0], "header"), "header")
        for part, what in zip(parts[1:], ("payload", "signature"), strict=True):
            if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
                raise TokenRejected(f"the {what} is not base64url")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            shown = alg[:16] if isinstance(alg, str) else alg
            raise TokenRejected(f"algorithm {shown!r} is not allowed")
        if "crit" in header:
            raise TokenRejected("critical header extensions are not supported")
        return alg

    def _check_claims(self, claims: dict[str, Any]) -> tuple[str, bytes]:
        s = self.settings
        now = self._clock()
        # RFC 7519 4.1.4, 4.1.5: NumericDate, seconds since the epoch
        if "exp" not in claims:
            if s.require_exp:
                raise TokenRejected("the token has no exp claim")
        elif not is_number(claims["exp"]):
            raise TokenRejected("the exp claim is not a number")
        elif now >= claims["exp"] + s.leeway:
            raise TokenRejected("the token has expired")
        if "nbf" in claims:
            if not is_number(claims["nbf"]):
                raise TokenRejected("the nbf claim is not a number")
            if claims["nbf"] > now + s.leeway:
                raise TokenRejected("the token is not valid yet (nbf)")
        if s.issuer and claims.get("iss") not in s.issuer:
            raise TokenRejected("wrong issuer")
        if "aud" in claims:
            aud = claims["aud"]
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
                raise TokenRejected("the aud claim is not a string or a list of strings")
            if not s.audience:
                raise TokenRejected("the token has an audience and none is configured")
            if not set(audiences) & set(s.audience):
                raise TokenRejected("wrong audience")
        elif s.audience:
            raise TokenRejected("the token has no aud claim")
        user = claims.get(s.subject_claim)
        if not isinstance(user, str) or not user:
            raise TokenRejected(f"the {s.subject_claim} claim is missing or not a string")
        jti = claims.get("jti")
        response = jti.encode("utf-8") if isinstance(jti, str) else b""
        if len(response) > 0xFFFF:  # it must fit the sub-item's 2-byte length
            response = b""
        return user, response
