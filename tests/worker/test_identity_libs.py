"""The identity policy on its libraries: Argon2id PHC hashes (argon2-cffi) beside the
earlier scrypt/PBKDF2 format, and JWTs as PyJWT issues them, verified with pinned
algorithms."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import argon2
import jwt as pyjwt
import pytest

from workers import identity as ident
from workers.identity import (
    IdentityConfigError,
    IdentityPolicy,
    JWTSettings,
    PasswordHash,
    hash_password,
)

SECRET = b"0123456789abcdef0123456789abcdef"
NOW = 1_700_000_000.0


def cheap_hash(password: str) -> str:
    """An argon2id hash cheap enough for tests (1 MiB, one pass)."""
    return hash_password(password, memory_kib=1024, time_cost=1)


def clock() -> float:
    return NOW


# ------------------------------------------------------------------ password hashes


def test_new_hashes_are_argon2id_phc_strings() -> None:
    line = hash_password("correct horse")
    assert line.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    h = PasswordHash.parse(line)
    assert (h.scheme, h.params) == ("argon2id", (19456, 2, 1))
    assert h.verify(b"correct horse")
    assert not h.verify(b"correct horse ")
    assert h.encode() == line
    # argon2-cffi reads what we write, and we read what it writes with other costs
    assert argon2.PasswordHasher().verify(line, "correct horse")
    theirs = argon2.PasswordHasher(time_cost=1, memory_cost=2048, parallelism=2).hash("pw")
    assert PasswordHash.parse(theirs).verify(b"pw")
    assert not PasswordHash.parse(theirs).verify(b"pW")


def test_one_file_with_every_scheme(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(
        f"carol:{cheap_hash('c-pass')}\n"
        f"alice:{hash_password('a-pass', 'scrypt', n=1 << 10)}\n"
        f"bob:{hash_password('b-pass', 'pbkdf2-sha256', iterations=1000)}\n"
    )
    path.chmod(0o600)
    policy = IdentityPolicy.load(path)
    for user, password in [(b"carol", b"c-pass"), (b"alice", b"a-pass"), (b"bob", b"b-pass")]:
        assert policy.verify(2, user, password) == ident.Verdict(True, user.decode(), b"")
        assert policy.verify(2, user, password + b"!").reason == "wrong passcode"
    # the first entry (argon2id) sets the cost of checking an unknown user
    assert policy.verify(2, b"dave", b"c-pass").reason == "unknown user"


def test_unknown_users_cost_a_check_like_known_ones() -> None:
    known = PasswordHash.parse(cheap_hash("pw"))
    decoy = known.same_cost_decoy()
    assert (decoy.scheme, decoy.params) == (known.scheme, known.params)
    assert (len(decoy.salt), len(decoy.digest)) == (len(known.salt), len(known.digest))
    assert decoy.salt != known.salt and not decoy.verify(b"pw")


_SALT, _HASH = "A" * 22, "A" * 43


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"$argon2i$v=19$m=1024,t=1,p=1${_SALT}${_HASH}", "only argon2id"),
        (f"$argon2d$v=19$m=1024,t=1,p=1${_SALT}${_HASH}", "only argon2id"),
        (f"$argon2id$v=16$m=1024,t=1,p=1${_SALT}${_HASH}", "version 16"),
        (f"$argon2id$v=19$m=4194304,t=1,p=1${_SALT}${_HASH}", "m=4194304 KiB is not"),
        (f"$argon2id$v=19$m=1024,t=1000,p=1${_SALT}${_HASH}", "t=1000 is not"),
        (f"$argon2id$v=19$m=1024,t=1,p=100${_SALT}${_HASH}", "p=100 is not"),
        (f"$argon2id$v=19$m=1024,t=1,p=1$AAAA${_HASH}", "salt is shorter"),
        (f"$argon2id$v=19$m=1024,t=1,p=1${_SALT}$AAAA", "hash is shorter"),
        ("$argon2id$nonsense", "not an Argon2 PHC string"),
    ],
)
def test_bad_argon2_hashes_are_refused_when_read(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PasswordHash.parse(text)


def test_cli_writes_argon2id_by_default(tmp_path: Path) -> None:
    out = io.StringIO()
    assert ident.main(["hash-password", "alice"], stdin=io.StringIO("pw\n"), stdout=out) == 0
    user, _, hashed = out.getvalue().strip().partition(":")
    assert user == "alice" and hashed.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PasswordHash.parse(hashed).verify(b"pw")
    path = tmp_path / "users"
    args = ["add-user", str(path), "bob", "--argon2-memory", "2048", "--argon2-time", "1"]
    assert ident.main(args, stdin=io.StringIO("two\n"), stderr=io.StringIO()) == 0
    assert "bob:$argon2id$v=19$m=2048,t=1,p=1$" in path.read_text()
    assert IdentityPolicy.load(path).verify(2, b"bob", b"two").verified
    err = io.StringIO()
    bad = ["hash-password", "--argon2-memory", "1"]
    assert ident.main(bad, stdin=io.StringIO("pw\n"), stderr=err) == 2
    assert "argon2id m=1 KiB" in err.getvalue()


# ---------------------------------------------------------------------------- JWT


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": NOW + 300, "iat": NOW, **extra}


def test_tokens_issued_by_pyjwt_verify() -> None:
    policy = IdentityPolicy.load(jwt=JWTSettings(secret=SECRET), clock=clock)
    token = pyjwt.encode(claims(jti="x-1"), SECRET, algorithm="HS256")
    assert policy.verify(5, token.encode()) == ident.Verdict(True, "alice", b"x-1")
    other = pyjwt.encode(claims(), b"y" * 32, algorithm="HS256")
    assert policy.verify(5, other.encode()).reason == "bad signature"
    hs512 = pyjwt.encode(claims(), SECRET * 2, algorithm="HS512")
    assert policy.verify(5, hs512.encode()).reason == "algorithm 'HS512' is not allowed"


def test_unencoded_payload_tokens_refused() -> None:
    """RFC 7797 (b64: false) is a critical extension this receiver does not take."""
    policy = IdentityPolicy.load(jwt=JWTSettings(secret=SECRET), clock=clock)
    token = pyjwt.api_jws.encode(
        b"{}", SECRET, algorithm="HS256", headers={"b64": False, "crit": ["b64"]}
    )
    verdict = policy.verify(5, token.encode())
    assert not verdict.verified and "critical" in verdict.reason


def test_a_public_key_is_refused_as_a_secret(tmp_path: Path) -> None:
    pem = b"-----BEGIN PUBLIC KEY-----\n" + b"A" * 64 + b"\n-----END PUBLIC KEY-----\n"
    with pytest.raises(IdentityConfigError, match="HS256 secret"):
        IdentityPolicy.load(jwt=JWTSettings(secret=pem))


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_public_key_tokens_issued_by_pyjwt(tmp_path: Path, alg: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    policy = IdentityPolicy.load(
        jwt=JWTSettings(algorithms=(alg,), public_key_file=pem, audience=("pacsrx",)),
        clock=clock,
    )
    good = pyjwt.encode(claims(aud="pacsrx"), key, algorithm=alg)
    assert policy.verify(5, good.encode()).verified
    late = pyjwt.encode(claims(aud="pacsrx", exp=NOW - 3600), key, algorithm=alg)
    assert policy.verify(5, late.encode()).reason == "the token has expired"
