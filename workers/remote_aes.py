"""The ``[remote-aes]`` table: where to reach an AE title we open associations to.

Storage commitment reports that cannot go back on the requestor's association, and
C-MOVE destinations, are looked up here by AE title::

    [remote-aes]
    MODALITY1 = { host = "10.0.0.7", port = 104 }
    VIEWER = { host = "viewer.example", port = 11112 }
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RemoteAE", "parse_remote_aes"]


@dataclass(slots=True, frozen=True)
class RemoteAE:
    """One entry of the table."""

    ae_title: str
    host: str
    port: int

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port}


def parse_remote_aes(table: Mapping[str, Any] | None) -> dict[str, RemoteAE]:
    """The table as read from TOML (or JSON): AE title -> {host, port}.

    Raises ValueError naming the first entry that cannot be used.
    """
    out: dict[str, RemoteAE] = {}
    if not table:
        return out
    if not isinstance(table, Mapping):
        raise ValueError("must be a table of AE title = { host, port }")
    for ae, entry in table.items():
        title = str(ae)
        if not title or len(title) > 16 or title != title.strip() or "\\" in title:
            raise ValueError(f"{title!r} is not an AE title (1-16 characters, no backslash)")
        if not isinstance(entry, Mapping):
            raise ValueError(f"{title}: {entry!r} is not a table {{ host, port }}")
        unknown = set(entry) - {"host", "port"}
        if unknown:
            raise ValueError(f"{title}: unknown key(s) {', '.join(sorted(unknown))}")
        host = entry.get("host")
        port = entry.get("port")
        if not isinstance(host, str) or not host or any(c.isspace() for c in host):
            raise ValueError(f"{title}: host {host!r} is not an address or host name")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{title}: port {port!r} is not a TCP port")
        out[title] = RemoteAE(title, host, port)
    return out
