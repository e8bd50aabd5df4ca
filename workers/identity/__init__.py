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
                            its salted hash (Argon2id; scrypt or PBKDF2-HMAC-SHA256
                            in files written before)
3 Kerberos, 4 SAML          never (bind a custom handler to accept them)
5 JWT                       PyJWT verifies the signature with the configured key and
                            algorithms only (HS256, HS384, HS512; RS256 and ES256
                            with ``PyJWT[crypto]``), ``exp``/``nbf`` hold within the
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

The password file has one ``username:hash`` line per user (blank lines and ``#``
comments allowed), written by ``python -m workers.identity hash-password USER`` or
``add-user FILE USER``: an Argon2id PHC string as argon2-cffi writes it, or a hash in
the project's earlier ``scheme$params$salt$hash`` format, which keeps verifying::

    carol:$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>
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

Modules: :mod:`~workers.identity.passwords` (hashes, the password file),
:mod:`~workers.identity.tokens` (JWT), :mod:`~workers.identity.policy` (the handler,
the settings), :mod:`~workers.identity.cli` (the command).
"""

from __future__ import annotations

from .cli import main
from .errors import IdentityConfigError
from .passwords import PasswordHash, hash_password, read_password_file
from .policy import IdentityPolicy, IdentitySettings, Verdict
from .tokens import JWTSettings, JWTVerifier, TokenRejected

__all__ = [
    "IdentityConfigError",
    "IdentityPolicy",
    "IdentitySettings",
    "JWTSettings",
    "JWTVerifier",
    "PasswordHash",
    "TokenRejected",
    "Verdict",
    "hash_password",
    "main",
    "read_password_file",
]
