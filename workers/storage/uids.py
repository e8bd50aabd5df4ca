"""UID validation and path-safety checks for the storage layer.

Every string that ends up in a file name comes from the network (the C-STORE command
set or the data set itself), so it is hostile until proven otherwise. UIDs are checked
against PS3.5 9.1; anything else used as a path component goes through
:func:`safe_path_component` (refuse) or :func:`sanitize_component` (rewrite).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .. import dataplane

__all__ = [
    "MAX_UID_LENGTH",
    "UnsafeUID",
    "is_valid_uid",
    "is_valid_uid_reference",
    "safe_path_component",
    "sanitize_component",
]

#: PS3.5 9.1: "the total length of a UID shall not exceed 64 characters".
MAX_UID_LENGTH = 64

# PS3.5 9.1: components of digits separated by ".", each either "0" or a number
# without a leading zero. fullmatch() so that a trailing "\n" cannot sneak past "$".
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*", re.ASCII)

# What sanitize_component() keeps; everything else becomes "_". Deliberately narrow:
# the result must be a safe file name on every filesystem a PACS might write to.
_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._^=+-]", re.ASCII)


class UnsafeUID(ValueError):
    """A UID or path component that is malformed or could escape its directory."""


def is_valid_uid_reference(s: str) -> bool:
    """True when ``s`` is a well-formed UID per PS3.5 9.1 (see :func:`is_valid_uid`):
    the plain Python statement of the rule, which the data plane's twins are tested
    against (tests/engine/test_dataplane_store.py)."""
    return 0 < len(s) <= MAX_UID_LENGTH and _UID_RE.fullmatch(s) is not None


#: ``is_valid_uid(s)``: True when ``s`` is a well-formed UID per PS3.5 9.1. Only digits
#: and dots, no empty component, no leading zero in a multi-digit component, at most
#: 64 characters. Trailing NUL padding must already be stripped. The data plane's
#: ``uid_valid`` (compiled, or its pure twin), called directly: it runs per instance.
is_valid_uid: Callable[[str], bool] = dataplane.uid_valid


def safe_path_component(s: str) -> str:
    """Return ``s`` unchanged if it is safe as one path component, else raise.

    Refuses the empty string, ``.`` and ``..``, and anything containing a path
    separator (``/`` or ``\\``) or NUL, any of which could name a different directory
    than the one intended. Raises :class:`UnsafeUID`.
    """
    if not s or s in (".", "..") or "/" in s or "\\" in s or "\0" in s:
        raise UnsafeUID(f"unsafe path component: {s!r}")
    return s


def sanitize_component(s: str | None, *, max_length: int = 64, default: str = "unknown") -> str:
    """Rewrite an arbitrary value (AE title, Patient ID...) into a safe path component.

    Characters outside ``[A-Za-z0-9._^=+-]`` become ``_``; a leading ``.`` becomes
    ``_`` (no hidden files, no ``..``, never the temp directory's name); the result is
    truncated to ``max_length``. An empty or blank value gives ``default``.
    """
    if s is None:
        return default
    s = s.strip(" \0")
    if not s:
        return default
    s = _UNSAFE_CHARS_RE.sub("_", s[:max_length])
    if s.startswith("."):
        s = "_" + s[1:]
    return s
