"""The built-in user identity policy (workers/identity.py): password file, JWT,
per-AE presence, the CLI, and the policy bound as EVT_USER_ID in a real worker."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from workers import identity as ident
from workers.engine import acse
from workers.engine import pdu as p
from workers.identity import (
    IdentityConfigError,
    IdentityPolicy,
    IdentitySettings,
    JWTSettings,
    PasswordHash,
    hash_password,
)

from .conftest import VERIFICATION, WorkerFactory

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"0123456789abcdef0123456789abcdef"  # 32 bytes: the HS256 minimum
NOW = 1_700_000_000.0


def fast_hash(password: str) -> str:
    """A scrypt hash cheap enough for tests (N = 1024)."""
    return hash_password(password, "scrypt", n=1 << 10)


def clock() -> float:
    return NOW


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def make_token(
    claims: dict[str, Any],
    secret: bytes = SECRET,
    alg: str = "HS256",
    header: dict[str, Any] | None = None,
) -> bytes:
    head = b64url(json.dumps({"alg": alg, "typ": "JWT", **(header or {})}).encode())
    body = b64url(json.dumps(claims).encode())
    signing_input = f"{head}.{body}".encode()
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    sig = hmac.new(secret, signing_input, digest[alg]).digest() if alg in digest else b""
    return f"{head}.{body}.{b64url(sig)}".encode()


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": NOW + 300, "iat": NOW, **extra}


def jwt_policy(**settings: Any) -> IdentityPolicy:
    return IdentityPolicy.load(jwt=JWTSettings(secret=SECRET, **settings), clock=clock)


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(
        "# pacs-receiver users\n"
        "\n"
        f"alice:{fast_hash('secret')}\n"
        f"bob:{hash_password('hunter2', 'pbkdf2-sha256', iterations=1000)}\n"
    )
    path.chmod(0o600)
    return path


class FakeEvent:
    def __init__(self, kind: int, primary: bytes, secondary: bytes = b"", ae: str = "SCU") -> None:
        self.user_id_type = kind
        self.primary_field = primary
        self.secondary_field = secondary
        self.assoc = type("A", (), {"requestor": type("R", (), {"ae_title": ae})()})()


# ------------------------------------------------------------------ password hashes


def test_scrypt_default_parameters_round_trip() -> None:
    line = hash_password("correct horse", "scrypt")
    assert line.startswith("scrypt$n=16384,r=8,p=1$")
    h = PasswordHash.parse(line)
    assert h.verify(b"correct horse")
    assert not h.verify(b"correct horse ")
    assert h.encode() == line


def test_pbkdf2_round_trip() -> None:
    line = hash_password(b"hunter2", "pbkdf2-sha256", iterations=2000)
    assert line.startswith("pbkdf2-sha256$i=2000$")
    h = PasswordHash.parse(line)
    assert h.verify(b"hunter2")
    assert not h.verify(b"hunter3")


def test_salts_differ() -> None:
    assert fast_hash("x") != fast_hash("x")


def test_password_file_users(password_file: Path) -> None:
    policy = IdentityPolicy.load(password_file)
    assert policy.users == {"alice", "bob"}
    assert policy.verify(2, b"alice", b"secret").verified
    assert policy.verify(2, b"bob", b"hunter2") == ident.Verdict(True, "bob", b"")
    for user, password in [(b"alice", b"Secret"), (b"bob", b"secret"), (b"alice", b"")]:
        verdict = policy.verify(2, user, password)
        assert not verdict.verified
        assert verdict.reason == "wrong passcode"
    assert policy.verify(2, b"carol", b"secret").reason == "unknown user"
    assert policy.verify(2, b"\xff", b"secret").reason == "the user name is not UTF-8"
    assert not policy.verify(2, b"alice", b"x" * 5000).verified


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice", "no ':' found"),
        (":scrypt$n=1024,r=8,p=1$AAAAAAAAAAA$" + "A" * 43, "user name is empty"),
        ("alice:md5$x$y$z", "unknown hash scheme 'md5'"),
        ("alice:scrypt$n=1024,r=8,p=1$AAAAAAAAAAA", "not 'scheme$params$salt$hash'"),
        ("alice:scrypt$n=1000,r=8,p=1$AAAAAAAAAAA$" + "A" * 43, "not a power of two"),
        ("alice:scrypt$n=1024,r=8$AAAAAAAAAAA$" + "A" * 43, "n=...,r=...,p=..."),
        ("alice:scrypt$n=1048576,r=8,p=1$AAAAAAAAAAA$" + "A" * 43, "MiB per check"),
        ("alice:scrypt$n=1024,r=x,p=1$AAAAAAAAAAA$" + "A" * 43, "bad hash parameters"),
        ("alice:pbkdf2-sha256$i=0$AAAAAAAAAAA$" + "A" * 43, "i=0 is not"),
        ("alice:pbkdf2-sha256$n=5$AAAAAAAAAAA$" + "A" * 43, "i=<iterations>"),
        ("alice:pbkdf2-sha256$i=1000$!!!$" + "A" * 43, "salt is not base64"),
        ("alice:pbkdf2-sha256$i=1000$AAAA$" + "A" * 43, "salt is shorter"),
        ("alice:pbkdf2-sha256$i=1000$AAAAAAAAAAA$AAAA", "hash is shorter"),
    ],
)
def test_malformed_line_names_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "users"
    path.write_text(f"# comment\nbob:{fast_hash('pw')}\n\n{line}\n")
    with pytest.raises(IdentityConfigError) as info:
        IdentityPolicy.load(path)
    assert f"{path}:4:" in str(info.value)
    assert message in str(info.value)


def test_duplicate_user_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "users"
    h = fast_hash("pw")
    path.write_text(f"alice:{h}\nbob:{h}\nalice:{h}\n")
    with pytest.raises(IdentityConfigError, match=r":3: user 'alice' is already defined on line 1"):
        IdentityPolicy.load(path)


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(IdentityConfigError, match="cannot read password file"):
        IdentityPolicy.load(tmp_path / "missing")
    path = tmp_path / "users"
    path.write_bytes(b"# ok\n\xff\xfe:x\n")
    with pytest.raises(IdentityConfigError, match=r"users:2: not valid UTF-8"):
        IdentityPolicy.load(path)


def test_world_readable_file_warns(password_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    password_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="workers.identity"):
        IdentityPolicy.load(password_file)
    assert "readable by every local user" in caplog.text


def test_reload_picks_up_changes(password_file: Path) -> None:
    before = IdentityPolicy.load(password_file)
    with password_file.open("a") as fh:
        fh.write(f"carol:{fast_hash('pw')}\n")
    after = IdentityPolicy.load(password_file)
    assert not before.verify(2, b"carol", b"pw").verified
    assert after.verify(2, b"carol", b"pw").verified


# ------------------------------------------------------------ identity types 1, 3, 4


def test_username_only(password_file: Path) -> None:
    strict = IdentityPolicy.load(password_file)
    assert strict.verify(1, b"alice").reason == "username-only identity is not allowed"
    lenient = IdentityPolicy.load(password_file, allow_username_only=True)
    assert lenient.verify(1, b"alice") == ident.Verdict(True, "alice", b"")
    assert lenient.verify(1, b"mallory").reason == "unknown user"


def test_username_only_needs_a_password_file() -> None:
    with pytest.raises(IdentityConfigError, match="allow_username_only needs a password_file"):
        IdentityPolicy.load(allow_username_only=True)


@pytest.mark.parametrize("kind", [3, 4, 0, 6, 255])
def test_other_types_are_not_verified(password_file: Path, kind: int) -> None:
    policy = IdentityPolicy.load(password_file, jwt=JWTSettings(secret=SECRET))
    assert not policy.verify(kind, b"alice", b"secret").verified


def test_types_without_configuration() -> None:
    policy = IdentityPolicy.load()
    assert not policy.verify(2, b"alice", b"secret").verified
    assert policy.verify(5, make_token(claims())).reason == "JWT is not configured"


# ---------------------------------------------------------------------------- JWT


def test_jwt_valid() -> None:
    policy = jwt_policy()
    assert policy.verify(5, make_token(claims(jti="abc-1"))) == ident.Verdict(
        True, "alice", b"abc-1"
    )
    assert policy.verify(5, make_token(claims())).response == b""


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_jwt_longer_hashes(alg: str) -> None:
    secret = SECRET * 2
    policy = IdentityPolicy.load(jwt=JWTSettings(algorithms=(alg,), secret=secret), clock=clock)
    assert policy.verify(5, make_token(claims(), secret, alg)).verified


@pytest.mark.parametrize(
    ("token_claims", "reason"),
    [
        (claims(exp=NOW - 31), "the token has expired"),
        (claims(nbf=NOW + 31), "not valid yet"),
        (claims(exp=None), "exp claim is not a number"),
        (claims(exp="soon"), "exp claim is not a number"),
        (claims(exp=True), "exp claim is not a number"),
        (claims(nbf="x"), "nbf claim is not a number"),
        ({"sub": "alice"}, "has no exp claim"),
        (claims(sub=""), "sub claim is missing"),
        (claims(sub=42), "sub claim is missing"),
        (claims(aud="someone"), "has an audience and none is configured"),
    ],
)
def test_jwt_claims_rejected(token_claims: dict[str, Any], reason: str) -> None:
    verdict = jwt_policy().verify(5, make_token(token_claims))
    assert not verdict.verified
    assert reason in verdict.reason


def test_jwt_leeway() -> None:
    policy = jwt_policy(leeway=30)
    assert policy.verify(5, make_token(claims(exp=NOW - 29))).verified
    assert policy.verify(5, make_token(claims(nbf=NOW + 29))).verified
    assert not jwt_policy(leeway=0).verify(5, make_token(claims(exp=NOW))).verified


def test_jwt_without_exp_when_allowed() -> None:
    policy = jwt_policy(require_exp=False)
    assert policy.verify(5, make_token({"sub": "alice"})).verified


def test_jwt_bad_signature() -> None:
    policy = jwt_policy()
    other = make_token(claims(), b"x" * 32)
    assert policy.verify(5, other).reason == "bad signature"
    good = make_token(claims()).decode()
    head, body, sig = good.split(".")
    forged_body = b64url(json.dumps(claims(sub="root")).encode())
    assert policy.verify(5, f"{head}.{forged_body}.{sig}".encode()).reason == "bad signature"
    assert policy.verify(5, f"{head}.{body}.".encode()).reason == "bad signature"
    assert policy.verify(5, f"{head}.{body}.{sig[:-3]}".encode()).reason == "bad signature"


def test_jwt_alg_none_refused() -> None:
    policy = jwt_policy()
    for alg in ("none", "None", "NONE"):
        token = make_token(claims(), alg=alg)
        assert token.endswith(b".")
        verdict = policy.verify(5, token)
        assert not verdict.verified
        assert "is not allowed" in verdict.reason
    with pytest.raises(IdentityConfigError, match="'none' is not supported"):
        IdentityPolicy.load(jwt=JWTSettings(algorithms=("HS256", "none"), secret=SECRET))


def test_jwt_wrong_alg() -> None:
    policy = jwt_policy()  # HS256 only
    verdict = policy.verify(5, make_token(claims(), SECRET * 2, "HS512"))
    assert verdict.reason == "algorithm 'HS512' is not allowed"
    verdict = policy.verify(5, make_token(claims(), header={"alg": 5}))
    assert verdict.reason == "algorithm 5 is not allowed"
    # an RS256 header with an HMAC over the (public) key: never tried with the secret
    verdict = policy.verify(5, make_token(claims(), alg="RS256"))
    assert verdict.reason == "algorithm 'RS256' is not allowed"


def test_jwt_issuer_and_audience() -> None:
    policy = jwt_policy(issuer=("https://idp.example",), audience=("pacsrx", "pacs"))
    ok = claims(iss="https://idp.example", aud="pacsrx")
    assert policy.verify(5, make_token(ok)).verified
    assert policy.verify(5, make_token({**ok, "aud": ["other", "pacs"]})).verified
    assert policy.verify(5, make_token({**ok, "iss": "https://evil"})).reason == "wrong issuer"
    no_iss = {k: v for k, v in ok.items() if k != "iss"}
    assert policy.verify(5, make_token(no_iss)).reason == "wrong issuer"
    assert policy.verify(5, make_token({**ok, "aud": "other"})).reason == "wrong audience"
    assert policy.verify(5, make_token({**ok, "aud": ["a", "b"]})).reason == "wrong audience"
    assert "not a string" in policy.verify(5, make_token({**ok, "aud": 7})).reason
    no_aud = {k: v for k, v in ok.items() if k != "aud"}
    assert policy.verify(5, make_token(no_aud)).reason == "the token has no aud claim"


def test_jwt_subject_claim() -> None:
    policy = jwt_policy(subject_claim="preferred_username")
    verdict = policy.verify(5, make_token(claims(preferred_username="dr.who")))
    assert verdict == ident.Verdict(True, "dr.who", b"")
    assert not policy.verify(5, make_token(claims())).verified


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (b"abc", "not header.payload.signature"),
        (b"a.b.c.d.e", "JWE"),
        (b"\xff.a.b", "not ASCII"),
        (b"!!.e30.", "header is not base64url"),
        (b64url(b"[1]").encode() + b".e30.", "header is not a JSON object"),
        (b64url(b"{nope").encode() + b".e30.", "header is not JSON"),
        (b64url(b'{"alg": NaN}').encode() + b".e30.", "header is not JSON"),
        (b64url(b"[" * 100_000).encode() + b".e30.", "header is not JSON"),
    ],
)
def test_jwt_malformed(token: bytes, reason: str) -> None:
    verdict = jwt_policy().verify(5, token)
    assert not verdict.verified
    assert reason in verdict.reason


def test_jwt_payload_must_be_an_object() -> None:
    head = b64url(b'{"alg":"HS256"}')
    body = b64url(b'"alice"')
    sig = hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    token = f"{head}.{body}.{b64url(sig)}".encode()
    assert jwt_policy().verify(5, token).reason == "the payload is not a JSON object"


def test_jwt_crit_header_refused() -> None:
    token = make_token(claims(), header={"crit": ["exp"]})
    assert "critical" in jwt_policy().verify(5, token).reason


def test_jwt_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(IdentityConfigError, match="requires at least 32"):
        IdentityPolicy.load(jwt=JWTSettings(secret=b"short"))
    with pytest.raises(IdentityConfigError, match="HS512 secret has 32 bytes"):
        IdentityPolicy.load(jwt=JWTSettings(algorithms=("HS256", "HS512"), secret=SECRET))
    with pytest.raises(IdentityConfigError, match="one of secret or secret_file"):
        IdentityPolicy.load(jwt=JWTSettings())
    with pytest.raises(IdentityConfigError, match="cannot read secret_file"):
        IdentityPolicy.load(jwt=JWTSettings(secret_file=tmp_path / "none"))
    with pytest.raises(IdentityConfigError, match="no algorithm"):
        IdentityPolicy.load(jwt=JWTSettings(algorithms=(), secret=SECRET))
    with pytest.raises(IdentityConfigError, match="need a public_key_file"):
        IdentityPolicy.load(jwt=JWTSettings(algorithms=("RS256",)))


def test_jwt_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    policy = IdentityPolicy.load(jwt=JWTSettings(secret_file=path), clock=clock)
    assert policy.verify(5, make_token(claims())).verified


def test_public_key_algorithm_without_cryptography(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing() -> Any:
        raise ImportError("No module named 'cryptography'")

    monkeypatch.setattr(ident.tokens, "_import_cryptography", missing)
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n")
    for alg in ("RS256", "ES256"):
        with pytest.raises(IdentityConfigError, match=f"{alg} needs the 'cryptography' package"):
            IdentityPolicy.load(jwt=JWTSettings(algorithms=(alg,), public_key_file=pem))


# RS256 and ES256 with cryptography, when it is installed


def _sign_asymmetric(private_key: Any, alg: str, token_claims: dict[str, Any]) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    head = b64url(json.dumps({"alg": alg}).encode())
    body = b64url(json.dumps(token_claims).encode())
    data = f"{head}.{body}".encode()
    if alg == "RS256":
        sig = private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(private_key.sign(data, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{head}.{body}.{b64url(sig)}".encode()


def _write_public(private_key: Any, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_jwt_public_key_algorithms(tmp_path: Path, alg: str) -> None:
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    def new_key() -> Any:
        if alg == "RS256":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return ec.generate_private_key(ec.SECP256R1())

    key, other = new_key(), new_key()
    pem = _write_public(key, tmp_path / "key.pem")
    policy = IdentityPolicy.load(
        jwt=JWTSettings(algorithms=(alg,), public_key_file=pem), clock=clock
    )
    assert policy.verify(5, _sign_asymmetric(key, alg, claims(jti="j"))) == ident.Verdict(
        True, "alice", b"j"
    )
    assert policy.verify(5, _sign_asymmetric(other, alg, claims())).reason == "bad signature"
    assert not policy.verify(5, _sign_asymmetric(key, alg, claims(exp=NOW - 100))).verified
    # the public key used as an HMAC secret (algorithm confusion) is refused
    confused = make_token(claims(), pem.read_bytes(), "HS256")
    assert policy.verify(5, confused).reason == "algorithm 'HS256' is not allowed"
    # the wrong kind of key for the algorithm
    wrong = "ES256" if alg == "RS256" else "RS256"
    with pytest.raises(IdentityConfigError, match=f"{wrong} needs"):
        IdentityPolicy.load(jwt=JWTSettings(algorithms=(wrong,), public_key_file=pem))


def test_jwt_public_key_errors(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives.asymmetric import rsa

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = _write_public(small, tmp_path / "small.pem")
    with pytest.raises(IdentityConfigError, match="1024 bits"):
        IdentityPolicy.load(jwt=JWTSettings(algorithms=("RS256",), public_key_file=pem))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(IdentityConfigError, match="is not a PEM public key"):
        IdentityPolicy.load(jwt=JWTSettings(algorithms=("RS256",), public_key_file=junk))
    with pytest.raises(IdentityConfigError, match="not both"):
        IdentityPolicy.load(jwt=JWTSettings(algorithms=("RS256", "ES256"), public_key_file=pem))


# ----------------------------------------------------------- presence, per Calling AE


def _request(calling_ae: str, identity: p.UserIdentityRQ | None) -> p.AssociateRQ:
    rq = acse.build_request("PACSRX", calling_ae, [acse.Requested(VERIFICATION)])
    user_info = p.UserInformation(
        max_length=rq.user_info.max_length,
        implementation_class_uid=rq.user_info.implementation_class_uid,
        user_identity_rq=identity,
    )
    return p.AssociateRQ(
        called_ae=rq.called_ae,
        calling_ae=rq.calling_ae,
        contexts=rq.contexts,
        user_info=user_info,
        application_context=rq.application_context,
    )


def test_identity_required_per_ae() -> None:
    some = IdentityPolicy(require_for={"CT01", "MR01"})
    assert some.identity_required("CT01")
    assert some.identity_required("CT01  ")
    assert not some.identity_required("US01")
    everyone = IdentityPolicy(require_for="*")
    assert everyone.identity_required("ANYONE")
    assert not IdentityPolicy().identity_required("CT01")


def test_missing_identity_rejection() -> None:
    policy = IdentityPolicy(require_for={"CT01"})
    rj = policy.missing_identity(_request("CT01", None))
    assert rj == p.AssociateRJ(
        p.RejectResult.PERMANENT, p.RejectSource.SERVICE_USER, p.RejectReason.NO_REASON
    )
    identity = p.UserIdentityRQ(2, False, b"alice", b"secret")
    assert policy.missing_identity(_request("CT01", identity)) is None
    assert policy.missing_identity(_request("US01", None)) is None


# ---------------------------------------------------------------- the handler, logs


def test_handler_logs_user_and_outcome_never_secrets(
    password_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = IdentityPolicy.load(password_file, jwt=JWTSettings(secret=SECRET), clock=clock)
    token = make_token(claims(jti="t-1"))
    with caplog.at_level(logging.DEBUG, logger="workers.identity"):
        assert policy.handler(FakeEvent(2, b"alice", b"secret", "CT01")) == (True, b"")
        assert policy.handler(FakeEvent(2, b"alice", b"letmein", "CT01")) == (False, None)
        assert policy.handler(FakeEvent(5, token, ae="MR01")) == (True, b"t-1")
        expired = make_token(claims(exp=NOW - 3600))
        assert policy.handler(FakeEvent(5, expired, ae="MR01")) == (False, None)
        assert policy.handler(FakeEvent(3, b"kerberos-ticket")) == (False, None)
    text = caplog.text
    assert "'alice'" in text and "'CT01'" in text and "accepted" in text
    assert "wrong passcode" in text and "has expired" in text and "Kerberos" in text
    for secret in ("secret", "letmein", token.decode(), expired.decode(), "kerberos-ticket"):
        assert secret not in text
    assert SECRET.decode() not in text


# --------------------------------------------------------------------------- settings


def test_settings_from_mapping_and_back(tmp_path: Path, password_file: Path) -> None:
    (tmp_path / "jwt.key").write_bytes(SECRET)
    settings = IdentitySettings.from_mapping(
        {
            "password-file": "users",
            "allow-username-only": True,
            "require-for": ["CT01", "MR01"],
            "jwt": {
                "algorithms": ["HS256"],
                "secret-file": "jwt.key",
                "issuer": "https://idp.example",
                "audience": ["pacsrx"],
                "leeway": 5,
            },
        },
        base_dir=tmp_path,
    )
    assert settings.password_file == password_file
    assert settings.require_for == {"CT01", "MR01"}
    assert settings.jwt is not None and settings.jwt.issuer == ("https://idp.example",)
    again = IdentitySettings.from_mapping(json.loads(json.dumps(settings.to_dict())))
    assert again == settings
    policy = IdentityPolicy.from_settings(settings, clock=clock)
    assert policy.identity_required("CT01") and not policy.identity_required("US01")
    token = make_token(claims(iss="https://idp.example", aud="pacsrx"))
    assert policy.verify(5, token).verified
    assert policy.verify(1, b"bob").verified
    assert IdentitySettings.from_mapping({"require_for": "*"}).require_for == "*"
    with pytest.raises(IdentityConfigError, match="unknown setting"):
        IdentitySettings.from_mapping({"pasword_file": "x"})
    with pytest.raises(IdentityConfigError, match="unknown setting"):
        IdentitySettings.from_mapping({"jwt": {"secrt": "x"}})


# -------------------------------------------------------------------------------- CLI


def run_cli(*args: str, password: str = "s3cret pass") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.identity", *args],
        input=f"{password}\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )


def test_cli_hash_password_round_trip(tmp_path: Path) -> None:
    done = run_cli("hash-password", "alice", "--scrypt-n", "1024")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith("alice:scrypt$n=1024,r=8,p=1$")
    path = tmp_path / "users"
    path.write_text(line + "\n")
    policy = IdentityPolicy.load(path)
    assert policy.verify(2, b"alice", b"s3cret pass").verified
    assert not policy.verify(2, b"alice", b"s3cret pass\n").verified
    assert "s3cret" not in done.stdout + done.stderr


def test_cli_hash_password_pbkdf2_without_user() -> None:
    out = io.StringIO()
    code = ident.main(
        ["hash-password", "--scheme", "pbkdf2-sha256", "--iterations", "1000"],
        stdin=io.StringIO("pw\n"),
        stdout=out,
    )
    assert code == 0
    assert PasswordHash.parse(out.getvalue().strip()).verify(b"pw")


def test_cli_rejects_bad_input() -> None:
    err = io.StringIO()
    assert ident.main(["hash-password", "a:b"], stdin=io.StringIO("pw\n"), stderr=err) == 2
    assert "user name" in err.getvalue()
    err = io.StringIO()
    assert ident.main(["hash-password"], stdin=io.StringIO("\n"), stderr=err) == 2
    assert "empty password" in err.getvalue()
    err = io.StringIO()
    code = ident.main(
        ["hash-password", "--scrypt-n", "1000"], stdin=io.StringIO("pw\n"), stderr=err
    )
    assert code == 2 and "power of two" in err.getvalue()


def test_cli_add_user(tmp_path: Path) -> None:
    path = tmp_path / "users"
    fast = ["--scrypt-n", "1024"]

    def add(user: str, password: str) -> int:
        err = io.StringIO()
        code = ident.main(
            ["add-user", str(path), user, *fast], stdin=io.StringIO(password + "\n"), stderr=err
        )
        assert password not in err.getvalue()
        return code

    assert add("alice", "one") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("# staff\n" + path.read_text())
    assert add("bob", "two") == 0
    assert add("alice", "three") == 0  # changes alice's password, keeps the rest
    text = path.read_text()
    assert text.startswith("# staff\nalice:")
    assert text.count("alice:") == 1
    policy = IdentityPolicy.load(path)
    assert policy.users == {"alice", "bob"}
    assert policy.verify(2, b"alice", b"three").verified
    assert not policy.verify(2, b"alice", b"one").verified
    assert policy.verify(2, b"bob", b"two").verified
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".users.")]


def test_cli_add_user_refuses_a_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice:nonsense\n")
    done = run_cli("add-user", str(path), "bob", "--scrypt-n", "1024")
    assert done.returncode == 2
    assert f"{path}:1:" in done.stderr
    assert path.read_text() == "alice:nonsense\n"


# -------------------------------------------------- end to end: a worker, pynetdicom


def _user_identity(
    kind: int, primary: bytes, secondary: bytes = b"", response: bool = False
) -> Any:
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.primary_field = primary
    if kind == 2:
        item.secondary_field = secondary
    item.positive_response_requested = response
    return item


def _ae(ae_title: str = "PYNETSCU") -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    return ae


@pytest.mark.interop
def test_worker_with_the_policy(
    worker_factory: WorkerFactory, password_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("pynetdicom")
    from workers.engine import events as wevt

    policy = IdentityPolicy.load(
        password_file, jwt=JWTSettings(secret=SECRET, leeway=0), require_for={"SECURE"}
    )
    w = worker_factory(evt_handlers=[(wevt.EVT_USER_ID, policy.handler)])
    # The wiring the worker is to get (AssociationServer.admission or _negotiate):
    # a request without the required identity item is rejected before any handler.
    admission = w.server.admission

    def admission_with_identity(proto: Any, rq: p.AssociateRQ) -> p.AssociateRJ | None:
        return policy.missing_identity(rq) or admission(proto, rq)

    w.server.admission = admission_with_identity  # type: ignore[method-assign]

    def associate(*ext_neg: Any, ae_title: str = "PYNETSCU") -> Any:
        return _ae(ae_title).associate(w.host, w.port, ae_title="PACSRX", ext_neg=list(ext_neg))

    # username and passcode: right -> accepted with an empty server response
    good = associate(_user_identity(2, b"alice", b"secret", response=True))
    try:
        assert good.is_established
        assert good.acceptor.user_identity is not None
        assert good.acceptor.user_identity.server_response == b""
        assert good.send_c_echo().Status == 0
    finally:
        good.release()
    # no positive response asked for: none sent
    quiet = associate(_user_identity(2, b"bob", b"hunter2"))
    assert quiet.is_established
    assert quiet.acceptor.user_identity is None
    quiet.release()
    # wrong passcode, unknown user, username only (not allowed), Kerberos: rejected
    for item in (
        _user_identity(2, b"alice", b"wrong", response=True),
        _user_identity(2, b"carol", b"secret"),
        _user_identity(1, b"alice"),
        _user_identity(3, b"ticket"),
    ):
        bad = associate(item)
        assert bad.is_rejected
        assert (bad.acceptor.primitive.result, bad.acceptor.primitive.result_source) == (1, 1)
    # JWT: the jti comes back as the server response
    token = make_token({"sub": "alice", "exp": time.time() + 60, "jti": "req-42"})
    jwt_assoc = associate(_user_identity(5, token, response=True))
    try:
        assert jwt_assoc.is_established
        assert jwt_assoc.acceptor.user_identity.server_response == b"req-42"
    finally:
        jwt_assoc.release()
    expired = make_token({"sub": "alice", "exp": time.time() - 60})
    assert associate(_user_identity(5, expired, response=True)).is_rejected
    # presence: required for SECURE, optional for everyone else
    assert associate(ae_title="SECURE").is_rejected
    secure = associate(_user_identity(2, b"alice", b"secret"), ae_title="SECURE")
    assert secure.is_established
    secure.release()
    plain = associate()
    assert plain.is_established
    plain.release()
    w.wait_idle()
    assert "secret" not in caplog.text and token.decode() not in caplog.text
