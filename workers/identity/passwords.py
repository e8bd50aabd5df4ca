"""Password hashes and the password file.

New hashes are Argon2id PHC strings as argon2-cffi writes them
(``$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>``). Hashes in the project's earlier
format, ``scheme$params$salt$hash`` with scrypt or PBKDF2-HMAC-SHA256, keep verifying::

    carol:$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>
    alice:scrypt$n=16384,r=8,p=1$<salt>$<hash>
    bob:pbkdf2-sha256$i=600000$<salt>$<hash>

Every scheme's parameters are bounded when the file is read: a typo must not make each
check take a gigabyte or a minute. Salt and hash are base64 without padding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import argon2
from argon2.low_level import Type as _Argon2Type
from argon2.low_level import verify_secret as _argon2_verify

from .errors import IdentityConfigError

__all__ = [
    "ARGON2ID",
    "PBKDF2_SHA256",
    "SCHEMES",
    "SCRYPT",
    "PasswordHash",
    "hash_password",
    "parse_password_lines",
    "read_password_file",
]

log = logging.getLogger("workers.identity")

ARGON2ID = "argon2id"
SCRYPT = "scrypt"
PBKDF2_SHA256 = "pbkdf2-sha256"
SCHEMES = (ARGON2ID, SCRYPT, PBKDF2_SHA256)

#: Argon2id cost for new hashes: OWASP's 19 MiB, 2 passes, 1 lane. Measured on the
#: project's 2-core machine, ~22 ms per check against ~40 ms for the scrypt default
#: below, with a similar memory footprint (19 MiB against 16 MiB per check in flight).
#: argon2-cffi's own default (64 MiB, t=3, p=4) costs ~180 ms and 64 MiB per check,
#: too much for a check made per association on a shared thread pool.
ARGON2_MEMORY_KIB, ARGON2_TIME, ARGON2_LANES = 19 * 1024, 2, 1
ARGON2_VERSION = 0x13
#: scrypt cost for ``--scheme scrypt``: 16 MiB and some 40 ms per check
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
#: PBKDF2-HMAC-SHA256 iterations for ``--scheme pbkdf2-sha256`` (OWASP's 2023 figure)
PBKDF2_ITERATIONS = 600_000

# Bounds on what a password file may ask for.
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
MAX_ARGON2_MEMORY_KIB = 256 * 1024
MAX_ARGON2_TIME = 32
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
    """One salted password hash, as the password file stores it after ``username:``."""

    scheme: str
    #: argon2id: (m KiB, t, p); scrypt: (n, r, p); pbkdf2-sha256: (iterations,)
    params: tuple[int, ...]
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse an Argon2id PHC string or ``scheme$params$salt$hash``; ValueError says
        what is wrong."""
        if text.startswith("$"):
            return cls._parse_phc(text)
        parts = text.split("$")
        if len(parts) != 4:
            raise ValueError("the hash is not 'scheme$params$salt$hash' nor '$argon2id$...'")
        scheme, params_text, salt_text, digest_text = parts
        if scheme not in (SCRYPT, PBKDF2_SHA256):
            raise ValueError(
                f"unknown hash scheme {scheme[:32]!r} (argon2id, scrypt or pbkdf2-sha256)"
            )
        values = _check_params(scheme, _parse_params(params_text))
        return cls._checked(scheme, values, salt_text, digest_text)

    @classmethod
    def _parse_phc(cls, text: str) -> PasswordHash:
        # argon2-cffi reads the parameters; the salt and hash are kept to compare and
        # to re-encode, and bounded like the other schemes'.
        try:
            found = argon2.extract_parameters(text)
        except argon2.exceptions.InvalidHashError:
            raise ValueError("the hash is not an Argon2 PHC string") from None
        if found.type is not _Argon2Type.ID:
            raise ValueError("only argon2id hashes are accepted")
        if found.version != ARGON2_VERSION:
            raise ValueError(f"argon2 version {found.version} is not 19")
        m, t, p_ = found.memory_cost, found.time_cost, found.parallelism
        values = _check_params(ARGON2ID, {"m": m, "t": t, "p": p_})
        parts = text.split("$")  # "", "argon2id", "v=19", "m=..,t=..,p=..", salt, hash
        if len(parts) != 6:
            raise ValueError("the hash is not '$argon2id$v=19$m=..,t=..,p=..$salt$hash'")
        return cls._checked(ARGON2ID, values, parts[4], parts[5])

    @classmethod
    def _checked(
        cls, scheme: str, values: tuple[int, ...], salt_text: str, digest_text: str
    ) -> PasswordHash:
        salt = _b64decode(salt_text, "the salt")
        digest = _b64decode(digest_text, "the hash")
        if len(salt) < MIN_SALT_BYTES:
            raise ValueError(f"the salt is shorter than {MIN_SALT_BYTES} bytes")
        if len(digest) < MIN_HASH_BYTES:
            raise ValueError(f"the hash is shorter than {MIN_HASH_BYTES} bytes")
        return cls(scheme, values, salt, digest)

    def encode(self) -> str:
        salt, digest = _b64encode(self.salt), _b64encode(self.digest)
        if self.scheme == ARGON2ID:
            m, t, p_ = self.params
            return f"$argon2id$v={ARGON2_VERSION}$m={m},t={t},p={p_}${salt}${digest}"
        if self.scheme == SCRYPT:
            n, r, p_ = self.params
            params = f"n={n},r={r},p={p_}"
        else:
            params = f"i={self.params[0]}"
        return f"{self.scheme}${params}${salt}${digest}"

    def derive(self, password: bytes, salt: bytes | None = None) -> bytes:
        """The key this (legacy) hash's scheme and parameters derive from ``password``."""
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
        if self.scheme == PBKDF2_SHA256:
            return hashlib.pbkdf2_hmac("sha256", password, salt, self.params[0], len(self.digest))
        raise ValueError(f"{self.scheme} hashes are verified by argon2-cffi, not derived here")

    def verify(self, password: bytes) -> bool:
        """Whether ``password`` matches, compared in constant time."""
        if self.scheme == ARGON2ID:
            try:
                return _argon2_verify(self.encode().encode("ascii"), password, _Argon2Type.ID)
            except argon2.exceptions.VerificationError:
                return False
        return hmac.compare_digest(self.derive(password), self.digest)

    def same_cost_decoy(self) -> PasswordHash:
        """A hash of the same scheme and parameters that nothing matches: checking it
        costs what checking this one does (for unknown users)."""
        return PasswordHash(
            self.scheme,
            self.params,
            secrets.token_bytes(len(self.salt)),
            secrets.token_bytes(len(self.digest)),
        )


def _check_params(scheme: str, params: Mapping[str, int]) -> tuple[int, ...]:
    """The parameters of ``scheme`` in order, within bounds; ValueError if not."""
    if scheme == ARGON2ID:
        m, t, p_ = params["m"], params["t"], params["p"]
        if not 1 <= p_ <= 64:
            raise ValueError(f"argon2id p={p_} is not 1..64")
        if not 8 * p_ <= m <= MAX_ARGON2_MEMORY_KIB:
            raise ValueError(f"argon2id m={m} KiB is not {8 * p_}..{MAX_ARGON2_MEMORY_KIB}")
        if not 1 <= t <= MAX_ARGON2_TIME:
            raise ValueError(f"argon2id t={t} is not 1..{MAX_ARGON2_TIME}")
        return (m, t, p_)
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
    scheme: str = ARGON2ID,
    *,
    memory_kib: int = ARGON2_MEMORY_KIB,
    time_cost: int = ARGON2_TIME,
    lanes: int = ARGON2_LANES,
    n: int = SCRYPT_N,
    r: int = SCRYPT_R,
    p: int = SCRYPT_P,
    iterations: int = PBKDF2_ITERATIONS,
) -> str:
    """A new salted hash of ``password`` (a str is encoded as UTF-8), as the password
    file stores it after ``username:``: an Argon2id PHC string unless ``scheme`` names
    one of the earlier schemes."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if scheme == ARGON2ID:
        m, t, p_ = _check_params(ARGON2ID, {"m": memory_kib, "t": time_cost, "p": lanes})
        hasher = argon2.PasswordHasher(
            time_cost=t,
            memory_cost=m,
            parallelism=p_,
            hash_len=HASH_BYTES,
            salt_len=SALT_BYTES,
            type=_Argon2Type.ID,
        )
        return hasher.hash(password)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown hash scheme {scheme!r} (argon2id, scrypt or pbkdf2-sha256)")
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
            raise IdentityConfigError(f"{where}: expected 'username:hash' (no ':' found)")
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
