"""The built-in EVT_USER_ID handler and the identity section of the configuration.

See :mod:`workers.identity` for what each user identity type needs to verify.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..engine import acse
from ..engine import pdu as p
from .errors import IdentityConfigError
from .passwords import MAX_PASSCODE_BYTES, PasswordHash, read_password_file
from .tokens import JWTSettings, JWTVerifier, TokenRejected, is_number

__all__ = ["IdentityPolicy", "IdentitySettings", "Verdict"]

log = logging.getLogger("workers.identity")


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
            if not is_number(leeway):
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
        self._dummy = None if first is None else first.same_cost_decoy()

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
