"""The built-in user identity policy: the default EVT_USER_ID handler (PS3.7 D.3.3.7).

Theory of operation
-------------------

A requestor may put a User Identity sub-item in its A-ASSOCIATE-RQ: a type
(PS3.7 Table D.3-14), a primary field, a secondary field and whether it wants a
positive response. The worker hands these to the EVT_USER_ID handler, which answers
``(is_verified, server_response)``; not verified means A-ASSOCIATE-RJ (permanent,
service-user, no-reason-given), verified means the association goes on, with a User
Identity AC sub-item carrying ``server_response`` when the requestor asked for one.

:class:`IdentityPolicy` is that handler, built from configuration:

==========================  ============================================================
type                        verified when
==========================  ============================================================
1 username                  ``allow_username_only`` is set and the user is in the
                            password file
2 username and passcode     the user is in the password file and the passcode matches
                            its salted hash (scrypt or PBKDF2-HMAC-SHA256)
3 Kerberos, 4 SAML          never (bind a custom handler to accept them)
5 JWT                       the signature verifies with the configured key (HS256,
                            HS384, HS512; RS256 and ES256 with the optional
                            ``cryptography`` package), ``exp``/``nbf`` hold within the
                            leeway, ``iss``/``aud`` match, and the subject claim names
                            the user
==========================  ============================================================

Server response when verified: ``b""`` for types 1 and 2 (PS3.7 D.3.3.7.2: the
response is zero length for them); for a JWT its ``jti`` claim (UTF-8), or ``b""``
when it has none.

Whether a Calling AE Title *must* send an identity at all is a separate question that
the worker asks before any handler runs: :meth:`IdentityPolicy.identity_required`
(``require_for`` is a set of AE titles or ``"*"``). An identity that is sent is
always checked, required or not: one that fails rejects the association.

The password file has one ``username:scheme$params$salt$hash`` line per user (blank
lines and ``#`` comments allowed), written by ``python -m workers.identity
hash-password USER`` or ``add-user FILE USER``. Salt and hash are base64 without
padding::

    alice:scrypt$n=16384,r=8,p=1$<salt>$<hash>
    bob:pbkdf2-sha256$i=600000$<salt>$<hash>

Passcodes and tokens are never logged: the user name, the Calling AE Title and the
outcome are. Every comparison of secrets is constant-time, and an unknown user costs
the same key derivation as a known one (no user enumeration by timing).

The policy is immutable and read once: the supervisor reloads configuration (SIGHUP)
by replacing workers, and each new worker calls :meth:`IdentityPolicy.load` again.
Its :meth:`~IdentityPolicy.handler` is a plain function meant to run in the worker's
handler thread pool, not inline on the event loop: key derivation takes tens of
milliseconds by design.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import importlib
import json
import logging
import os
import re
import secrets
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from .engine import acse
from .engine import pdu as p

log = logging.getLogger("workers.identity")

__all__ = [
    "IdentityConfigError",
    "IdentityPolicy",
    "IdentitySettings",
    "JWTSettings",
    "PasswordHash",
    "Verdict",
    "hash_password",
    "main",
    "read_password_file",
]


class IdentityConfigError(ValueError):
    """Identity configuration that cannot be used; the message names the file, line
    or setting and says why."""


# ------------------------------------------------------------------ password hashes

SCRYPT = "scrypt"
PBKDF2_SHA256 = "pbkdf2-sha256"
SCHEMES = (SCRYPT, PBKDF2_SHA256)

#: scrypt cost for new hashes: 16 MiB and some 50 ms per check
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
#: PBKDF2-HMAC-SHA256 iterations for new hashes (OWASP's 2023 figure)
PBKDF2_ITERATIONS = 600_000

# Bounds on what a password file may ask for: a typo must not make each check take
# a gigabyte or a minute.
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
MAX_PBKDF2_ITERATIONS = 10_000_000
MIN_SALT_BYTES = 8
MIN_HASH_BYTES = 16
SALT_BYTES = 16
HASH_BYTES = 32
#: longer passcodes are refused without deriving anything
MAX_PASSCODE_BYTES = 4096


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str, what: str) -> bytes:
    if len(text) % 4 == 1:
        raise ValueError(f"{what} is not base64")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"{what} is not base64") from None


def _scrypt_memory(n: int, r: int, p_: int) -> int:
    # What OpenSSL allocates: V (128 r (N + 2)) plus B (128 r p).
    return 128 * r * (n + 2) + 128 * r * p_


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One salted password hash: ``scheme$params$salt$hash``."""

    scheme: str
    #: scrypt: (n, r, p); pbkdf2-sha256: (iterations,)
    params: tuple[int, ...]
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse ``scheme$params$salt$hash``; ValueError says what is wrong."""
        parts = text.split("$")
        if len(parts) != 4:
            raise ValueError("the hash is not 'scheme$params$salt$hash'")
        scheme, params_text, salt_text, digest_text = parts
        if scheme not in SCHEMES:
            raise ValueError(f"unknown hash scheme {scheme[:32]!r} (scrypt or pbkdf2-sha256)")
        values = _check_params(scheme, _parse_params(params_text))
        salt = _b64decode(salt_text, "the salt")
        digest = _b64decode(digest_text, "the hash")
        if len(salt) < MIN_SALT_BYTES:
            raise ValueError(f"the salt is shorter than {MIN_SALT_BYTES} bytes")
        if len(digest) < MIN_HASH_BYTES:
            raise ValueError(f"the hash is shorter than {MIN_HASH_BYTES} bytes")
        return cls(scheme, values, salt, digest)

    def encode(self) -> str:
        if self.scheme == SCRYPT:
            n, r, p_ = self.params
            params = f"n={n},r={r},p={p_}"
        else:
            params = f"i={self.params[0]}"
        return f"{self.scheme}${params}${_b64encode(self.salt)}${_b64encode(self.digest)}"

    def derive(self, password: bytes, salt: bytes | None = None) -> bytes:
        """The key this hash's scheme and parameters derive from ``password``."""
        salt = self.salt if salt is None else salt
        if self.scheme == SCRYPT:
            n, r, p_ = self.params
            return hashlib.scrypt(
                password,
                salt=salt,
                n=n,
                r=r,
                p=p_,
                maxmem=_scrypt_memory(n, r, p_) + (1 << 20),
                dklen=len(self.digest),
            )
        return hashlib.pbkdf2_hmac("sha256", password, salt, self.params[0], len(self.digest))

    def verify(self, password: bytes) -> bool:
        """Whether ``password`` matches, compared in constant time."""
        return hmac.compare_digest(self.derive(password), self.digest)


def _check_params(scheme: str, params: Mapping[str, int]) -> tuple[int, ...]:
    """The parameters of ``scheme`` in order, within bounds; ValueError if not."""
    if scheme == SCRYPT:
        if set(params) != {"n", "r", "p"}:
            raise ValueError("scrypt parameters are 'n=...,r=...,p=...'")
        n, r, p_ = params["n"], params["r"], params["p"]
        if n < 2 or n & (n - 1):
            raise ValueError(f"scrypt n={n} is not a power of two above 1")
        if not 1 <= r <= 64 or not 1 <= p_ <= 64:
            raise ValueError(f"scrypt r={r}, p={p_}: each must be 1..64")
        if _scrypt_memory(n, r, p_) > MAX_SCRYPT_MEMORY:
            raise ValueError(
                f"scrypt n={n}, r={r}, p={p_} needs more than "
                f"{MAX_SCRYPT_MEMORY >> 20} MiB per check"
            )
        return (n, r, p_)
    if set(params) != {"i"}:
        raise ValueError("pbkdf2-sha256 parameters are 'i=<iterations>'")
    iterations = params["i"]
    if not 1 <= iterations <= MAX_PBKDF2_ITERATIONS:
        raise ValueError(f"pbkdf2-sha256 i={iterations} is not 1..{MAX_PBKDF2_ITERATIONS}")
    return (iterations,)


def _parse_params(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key or key in out or not value.isdigit() or not value.isascii():
            raise ValueError(f"bad hash parameters {text[:40]!r} (expected key=integer,...)")
        out[key] = int(value)
    return out


def hash_password(
    password: bytes | str,
    scheme: str = SCRYPT,
    *,
    n: int = SCRYPT_N,
    r: int = SCRYPT_R,
    p: int = SCRYPT_P,
    iterations: int = PBKDF2_ITERATIONS,
) -> str:
    """A new salted hash of ``password`` (a str is encoded as UTF-8), as the password
    file stores it after ``username:``."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown hash scheme {scheme!r} (scrypt or pbkdf2-sha256)")
    params = {"n": n, "r": r, "p": p} if scheme == SCRYPT else {"i": iterations}
    salt = secrets.token_bytes(SALT_BYTES)
    template = PasswordHash(scheme, _check_params(scheme, params), salt, bytes(HASH_BYTES))
    return PasswordHash(scheme, template.params, salt, template.derive(password)).encode()


# -------------------------------------------------------------------- password file


def parse_password_lines(lines: Iterable[str], source: str) -> dict[str, PasswordHash]:
    """user -> hash from ``username:hash`` lines; IdentityConfigError names the line."""
    users: dict[str, PasswordHash] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        where = f"{source}:{number}"
        if not sep:
            raise IdentityConfigError(
                f"{where}: expected 'username:scheme$params$salt$hash' (no ':' found)"
            )
        if not user or user != user.strip():
            raise IdentityConfigError(
                f"{where}: the user name is empty or has leading/trailing spaces"
            )
        if user in users:
            raise IdentityConfigError(
                f"{where}: user {user!r} is already defined on line {first_line[user]}"
            )
        try:
            users[user] = PasswordHash.parse(hashed.strip())
        except ValueError as exc:
            raise IdentityConfigError(f"{where}: user {user!r}: {exc}") from None
        first_line[user] = number
    return users


def read_password_file(path: str | os.PathLike[str]) -> dict[str, PasswordHash]:
    """Read and check a password file; IdentityConfigError names the bad line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise IdentityConfigError(f"cannot read password file {path}: {exc.strerror}") from None
    lines = []
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise IdentityConfigError(f"{path}:{number}: not valid UTF-8") from None
    try:
        if os.stat(path).st_mode & stat.S_IROTH:
            log.warning("password file %s is readable by every local user", path)
    except OSError:
        pass
    return parse_password_lines(lines, str(path))


# ---------------------------------------------------------------------------- JWT

HMAC_ALGORITHMS: dict[str, Callable[[], Any]] = {
    "HS256": hashlib.sha256,
    "HS384": hashlib.sha384,
    "HS512": hashlib.sha512,
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
    """The pieces of ``cryptography`` RS256/ES256 need (ImportError without it)."""
    from types import SimpleNamespace

    names = {
        "exceptions": "cryptography.exceptions",
        "hashes": "cryptography.hazmat.primitives.hashes",
        "padding": "cryptography.hazmat.primitives.asymmetric.padding",
        "ec": "cryptography.hazmat.primitives.asymmetric.ec",
        "rsa": "cryptography.hazmat.primitives.asymmetric.rsa",
        "utils": "cryptography.hazmat.primitives.asymmetric.utils",
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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class JWTVerifier:
    """Verifies compact JWS tokens (RFC 7515, 7519) against configured keys."""

    def __init__(self, settings: JWTSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._secret: bytes | None = None
        self._public_key: Any = None
        self._crypto: Any = None
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
        hs = [a for a in algorithms if a in HMAC_ALGORITHMS]
        if hs:
            self._secret = self._load_secret(hs)
        pk = [a for a in algorithms if a in PUBLIC_KEY_ALGORITHMS]
        if pk:
            self._public_key = self._load_public_key(pk)
        self.algorithms = frozenset(algorithms)

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
            need = HMAC_ALGORITHMS[alg]().digest_size
            if len(secret) < need:
                raise IdentityConfigError(
                    f"jwt: the {alg} secret has {len(secret)} bytes; RFC 7518 3.2 "
                    f"requires at least {need}"
                )
        return secret

    def _load_public_key(self, algorithms: list[str]) -> Any:
        s = self.settings
        if s.public_key_file is None:
            raise IdentityConfigError(f"jwt: {', '.join(algorithms)} need a public_key_file")
        if len(algorithms) > 1:
            raise IdentityConfigError("jwt: one public key serves RS256 or ES256, not both")
        try:
            self._crypto = c = _import_cryptography()
        except ImportError:
            raise IdentityConfigError(
                f"jwt: {algorithms[0]} needs the 'cryptography' package, which is not "
                "installed (pip install cryptography), or use HS256/HS384/HS512"
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
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            shown = alg[:16] if isinstance(alg, str) else alg
            raise TokenRejected(f"algorithm {shown!r} is not allowed")
        if "crit" in header:
            raise TokenRejected("critical header extensions are not supported")
        signature = _b64url_decode(parts[2], "signature")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        if not self._signature_ok(alg, signing_input, signature):
            raise TokenRejected("bad signature")
        claims = _json_object(_b64url_decode(parts[1], "payload"), "payload")
        return self._check_claims(claims)

    def _signature_ok(self, alg: str, signing_input: bytes, signature: bytes) -> bool:
        digest = HMAC_ALGORITHMS.get(alg)
        if digest is not None:
            assert self._secret is not None
            expected = hmac.new(self._secret, signing_input, digest).digest()
            return hmac.compare_digest(expected, signature)
        c, key = self._crypto, self._public_key
        try:
            if alg == "RS256":
                key.verify(signature, signing_input, c.padding.PKCS1v15(), c.hashes.SHA256())
            else:  # ES256: the JWS signature is r || s, 32 bytes each (RFC 7518 3.4)
                if len(signature) != 64:
                    return False
                der = c.utils.encode_dss_signature(
                    int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                )
                key.verify(der, signing_input, c.ec.ECDSA(c.hashes.SHA256()))
        except c.exceptions.InvalidSignature:
            return False
        return True

    def _check_claims(self, claims: dict[str, Any]) -> tuple[str, bytes]:
        s = self.settings
        now = self._clock()
        # RFC 7519 4.1.4, 4.1.5: NumericDate, seconds since the epoch
        if "exp" not in claims:
            if s.require_exp:
                raise TokenRejected("the token has no exp claim")
        elif not _is_number(claims["exp"]):
            raise TokenRejected("the exp claim is not a number")
        elif now >= claims["exp"] + s.leeway:
            raise TokenRejected("the token has expired")
        if "nbf" in claims:
            if not _is_number(claims["nbf"]):
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


# -------------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    """The identity section of the configuration: plain, picklable, JSON-friendly
    values (paths as strings in :meth:`to_dict`), read by every worker at start."""

    password_file: Path | None = None
    #: type 1 (username only) verifies a user listed in the password file
    allow_username_only: bool = False
    #: Calling AE Titles that must send a user identity, or "*" for all
    require_for: frozenset[str] | Literal["*"] = frozenset()
    jwt: JWTSettings | None = None

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None
    ) -> IdentitySettings:
        """From a TOML/JSON table (keys with dashes or underscores); relative paths
        are taken from ``base_dir``. The ``jwt`` sub-table holds JWTSettings' fields;
        ``issuer`` and ``audience`` may be a string or a list, ``secret`` a string."""

        def path(value: Any, name: str) -> Path | None:
            if value is None:
                return None
            if not isinstance(value, str | os.PathLike):
                raise IdentityConfigError(f"identity: {name} is not a path")
            out = Path(value)
            return out if base_dir is None or out.is_absolute() else Path(base_dir) / out

        def names(value: Any, name: str) -> tuple[str, ...]:
            if value is None:
                return ()
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
                raise IdentityConfigError(f"identity: {name} is not a string or list of strings")
            return tuple(items)

        top = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = set(top) - {"password_file", "allow_username_only", "require_for", "jwt"}
        if unknown:
            raise IdentityConfigError(f"identity: unknown setting(s) {', '.join(sorted(unknown))}")
        require = top.get("require_for", ())
        require_for: frozenset[str] | Literal["*"]
        if require == "*" or (isinstance(require, list | tuple) and "*" in require):
            require_for = "*"
        else:
            require_for = frozenset(names(require, "require_for"))
        jwt: JWTSettings | None = None
        raw_jwt = top.get("jwt")
        if raw_jwt is not None:
            if not isinstance(raw_jwt, Mapping):
                raise IdentityConfigError("identity: jwt is not a table")
            j = {k.replace("-", "_"): v for k, v in raw_jwt.items()}
            known = set(JWTSettings.__dataclass_fields__)
            if set(j) - known:
                raise IdentityConfigError(
                    f"identity.jwt: unknown setting(s) {', '.join(sorted(set(j) - known))}"
                )
            secret = j.get("secret")
            if isinstance(secret, str):
                secret = secret.encode("utf-8")
            defaults = JWTSettings()
            leeway = j.get("leeway", defaults.leeway)
            if not _is_number(leeway):
                raise IdentityConfigError("identity.jwt: leeway is not a number of seconds")
            jwt = JWTSettings(
                algorithms=names(j.get("algorithms", defaults.algorithms), "jwt.algorithms"),
                secret=secret,
                secret_file=path(j.get("secret_file"), "jwt.secret_file"),
                public_key_file=path(j.get("public_key_file"), "jwt.public_key_file"),
                issuer=names(j.get("issuer"), "jwt.issuer"),
                audience=names(j.get("audience"), "jwt.audience"),
                subject_claim=str(j.get("subject_claim", defaults.subject_claim)),
                leeway=float(leeway),
                require_exp=bool(j.get("require_exp", defaults.require_exp)),
            )
        return cls(
            password_file=path(top.get("password_file"), "password_file"),
            allow_username_only=bool(top.get("allow_username_only", False)),
            require_for=require_for,
            jwt=jwt,
        )

    def to_dict(self) -> dict[str, Any]:
        """The inverse of :meth:`from_mapping`, JSON-serialisable (for the worker's
        configuration message)."""
        out: dict[str, Any] = {
            "password_file": None if self.password_file is None else str(self.password_file),
            "allow_username_only": self.allow_username_only,
            "require_for": "*" if self.require_for == "*" else sorted(self.require_for),
        }
        if self.jwt is not None:
            j = self.jwt
            out["jwt"] = {
                "algorithms": list(j.algorithms),
                "secret": None if j.secret is None else j.secret.decode("utf-8"),
                "secret_file": None if j.secret_file is None else str(j.secret_file),
                "public_key_file": None if j.public_key_file is None else str(j.public_key_file),
                "issuer": list(j.issuer),
                "audience": list(j.audience),
                "subject_claim": j.subject_claim,
                "leeway": j.leeway,
                "require_exp": j.require_exp,
            }
        return out


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking one user identity."""

    verified: bool
    #: the user name (password file entry or JWT subject), when known
    user: str | None = None
    #: the server response when verified (None: none)
    response: bytes | None = None
    #: why not verified, for the log (never contains a secret)
    reason: str = ""


_TYPE_NAMES = {
    1: "username",
    2: "username and passcode",
    3: "Kerberos",
    4: "SAML",
    5: "JWT",
}


def _normalise_ae(ae: str) -> str:
    return ae.strip(" \x00")


class IdentityPolicy:
    """The built-in EVT_USER_ID handler: see the module documentation.

    Build it with :meth:`load` or :meth:`from_settings`; bind :meth:`handler`; ask
    :meth:`identity_required` (or :meth:`missing_identity`) for requests without a
    user identity item.
    """

    __slots__ = ("_dummy", "_jwt", "_require_for", "_users", "allow_username_only")

    def __init__(
        self,
        users: Mapping[str, PasswordHash] | None = None,
        *,
        jwt: JWTVerifier | None = None,
        allow_username_only: bool = False,
        require_for: Collection[str] | Literal["*"] = (),
    ) -> None:
        self._users: dict[str, PasswordHash] = dict(users or {})
        self._jwt = jwt
        self.allow_username_only = allow_username_only
        if require_for == "*":
            self._require_for: frozenset[str] | None = None
        else:
            if isinstance(require_for, str):
                raise TypeError("require_for is a collection of AE titles or '*'")
            self._require_for = frozenset(_normalise_ae(ae) for ae in require_for)
        # Unknown users cost a derivation like known ones, with the parameters of
        # the first entry (the typical cost of the file).
        first = next(iter(self._users.values()), None)
        self._dummy = (
            None
            if first is None
            else PasswordHash(
                first.scheme, first.params, secrets.token_bytes(16), secrets.token_bytes(32)
            )
        )

    @classmethod
    def load(
        cls,
        password_file: str | os.PathLike[str] | None = None,
        *,
        jwt: JWTSettings | None = None,
        allow_username_only: bool = False,
        require_for: Collection[str] | Literal["*"] = (),
        clock: Callable[[], float] = time.time,
    ) -> IdentityPolicy:
        """Read the password file and JWT keys now; IdentityConfigError if unusable.
        Call again to pick up changed files."""
        users = read_password_file(password_file) if password_file is not None else {}
        if allow_username_only and password_file is None:
            raise IdentityConfigError("allow_username_only needs a password_file")
        verifier = JWTVerifier(jwt, clock) if jwt is not None else None
        return cls(
            users,
            jwt=verifier,
            allow_username_only=allow_username_only,
            require_for=require_for,
        )

    @classmethod
    def from_settings(
        cls, settings: IdentitySettings, *, clock: Callable[[], float] = time.time
    ) -> IdentityPolicy:
        return cls.load(
            settings.password_file,
            jwt=settings.jwt,
            allow_username_only=settings.allow_username_only,
            require_for=settings.require_for,
            clock=clock,
        )

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self._users)

    # ---------------------------------------------------- presence, per Calling AE

    def identity_required(self, calling_ae: str) -> bool:
        """Whether an association request from ``calling_ae`` must carry a user
        identity item (without one it is rejected before any handler runs)."""
        if self._require_for is None:
            return True
        return _normalise_ae(calling_ae) in self._require_for

    def missing_identity(self, rq: p.AssociateRQ) -> p.AssociateRJ | None:
        """The A-ASSOCIATE-RJ for a request that must carry a user identity item and
        does not (permanent, service-user, no-reason-given: PS3.7 D.3.3.7, PS3.8
        Table 9-21); None when the request may go on."""
        if rq.user_info.user_identity_rq is not None or not self.identity_required(rq.calling_ae):
            return None
        log.warning("association from %r without the required user identity", rq.calling_ae)
        return acse.reject(
            p.RejectResult.PERMANENT, p.RejectSource.SERVICE_USER, p.RejectReason.NO_REASON
        )

    # ------------------------------------------------------------------- checking

    def verify(self, user_id_type: int, primary: bytes, secondary: bytes = b"") -> Verdict:
        """Check one user identity (the fields of the RQ sub-item)."""
        kind = int(user_id_type)
        if kind in (1, 2):
            return self._verify_user(kind, bytes(primary), bytes(secondary))
        if kind == 5:
            if self._jwt is None:
                return Verdict(False, reason="JWT is not configured")
            try:
                user, response = self._jwt.verify(bytes(primary))
            except TokenRejected as exc:
                return Verdict(False, reason=str(exc))
            return Verdict(True, user, response)
        if kind in (3, 4):
            return Verdict(False, reason=f"{_TYPE_NAMES[kind]} is not supported")
        return Verdict(False, reason=f"unknown user identity type {kind}")

    def _verify_user(self, kind: int, primary: bytes, secondary: bytes) -> Verdict:
        try:
            user = primary.decode("utf-8")
        except UnicodeDecodeError:
            return Verdict(False, reason="the user name is not UTF-8")
        entry = self._users.get(user)
        if kind == 1:
            if not self.allow_username_only:
                return Verdict(False, user, reason="username-only identity is not allowed")
            if entry is None:
                return Verdict(False, user, reason="unknown user")
            return Verdict(True, user, b"")
        if len(secondary) > MAX_PASSCODE_BYTES:
            return Verdict(False, user, reason="passcode too long")
        if entry is None:
            if self._dummy is not None:
                self._dummy.verify(secondary)  # same cost as a known user
            return Verdict(False, user, reason="unknown user")
        if not entry.verify(secondary):
            return Verdict(False, user, reason="wrong passcode")
        return Verdict(True, user, b"")

    def handler(self, event: Any) -> tuple[bool, bytes | None]:
        """The EVT_USER_ID handler: ``(is_verified, server_response)``."""
        try:
            calling_ae = str(event.assoc.requestor.ae_title)
        except AttributeError:
            calling_ae = "?"
        kind = event.user_id_type
        verdict = self.verify(kind, event.primary_field, event.secondary_field or b"")
        kind_name = _TYPE_NAMES.get(int(kind), f"type {int(kind)}")
        if verdict.verified:
            log.info(
                "user identity of %r (%s) from %r: accepted", verdict.user, kind_name, calling_ae
            )
        else:
            log.warning(
                "user identity%s (%s) from %r: rejected: %s",
                "" if verdict.user is None else f" of {verdict.user!r}",
                kind_name,
                calling_ae,
                verdict.reason,
            )
        return verdict.verified, verdict.response


# ---------------------------------------------------------------------------- CLI


def _read_password(stdin: TextIO) -> bytes:
    """From the terminal (asked twice) or the first line of standard input."""
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Repeat: ") != first:
            raise SystemExit("error: the passwords differ")
        password = first
    else:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise SystemExit("error: empty password")
    return password.encode("utf-8")


def _check_user(user: str) -> None:
    if not user or user != user.strip() or any(c in user for c in ":\r\n") or user[0] == "#":
        raise SystemExit(
            f"error: user name {user!r}: not empty, no ':' or line breaks, no leading '#' or spaces"
        )


def _hash_from_args(args: argparse.Namespace, password: bytes) -> str:
    try:
        return hash_password(
            password, args.scheme, n=args.n, r=args.r, p=args.p, iterations=args.iterations
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def _add_user(path: Path, user: str, hashed: str, out: TextIO) -> None:
    try:
        text = path.read_text("utf-8") if path.exists() else ""
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: cannot read {path}: {exc}") from None
    lines = text.splitlines()
    try:
        parse_password_lines(lines, str(path))
    except IdentityConfigError as exc:
        raise SystemExit(f"error: {exc} (fix the file first)") from None
    new_line = f"{user}:{hashed}"
    replaced = False
    for i, line in enumerate(lines):
        if line.partition(":")[0] == user and not line.lstrip().startswith("#"):
            lines[i] = new_line
            replaced = True
    if not replaced:
        lines.append(new_line)
    data = "".join(f"{line}\n" for line in lines)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    print(f"{'replaced' if replaced else 'added'} user {user!r} in {path}", file=out)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``python -m workers.identity hash-password [USER]`` or ``add-user FILE USER``.

    The password is read from the terminal (twice) or, when standard input is not a
    terminal, from its first line.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = argparse.ArgumentParser(
        prog="python -m workers.identity",
        description="Manage the user identity password file of pacs-receiver.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    hash_cmd = sub.add_parser(
        "hash-password", help="print 'USER:hash' (or the hash alone) for a password"
    )
    hash_cmd.add_argument("user", nargs="?", help="user name to prefix the line with")
    add_cmd = sub.add_parser("add-user", help="add a user to FILE, or change their password")
    add_cmd.add_argument("file", type=Path)
    add_cmd.add_argument("user")
    for cmd in (hash_cmd, add_cmd):
        cmd.add_argument("--scheme", choices=SCHEMES, default=SCRYPT)
        cmd.add_argument("--scrypt-n", dest="n", type=int, default=SCRYPT_N, help="scrypt N")
        cmd.add_argument("--scrypt-r", dest="r", type=int, default=SCRYPT_R, help="scrypt r")
        cmd.add_argument("--scrypt-p", dest="p", type=int, default=SCRYPT_P, help="scrypt p")
        cmd.add_argument(
            "--iterations", type=int, default=PBKDF2_ITERATIONS, help="PBKDF2 iterations"
        )
    args = parser.parse_args(argv)
    try:
        if args.user is not None:
            _check_user(args.user)
        hashed = _hash_from_args(args, _read_password(stdin))
        if args.command == "hash-password":
            print(hashed if args.user is None else f"{args.user}:{hashed}", file=stdout)
        else:
            _add_user(args.file, args.user, hashed, stderr)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
