"""The one exception identity configuration raises."""

from __future__ import annotations

__all__ = ["IdentityConfigError"]


class IdentityConfigError(ValueError):
    """Identity configuration that cannot be used; the message names the file, line
    or setting and says why."""
