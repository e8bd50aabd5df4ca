"""pacs-receiver."""

from __future__ import annotations


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from a bare tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pacs-receiver")
    except PackageNotFoundError:
        return "unknown"
