"""pynetdicom's own ``storescp`` application, with TCP_NODELAY on accepted sockets.

``python -m loadtest.pynetdicom_scp PORT -od DIR [storescp options]`` runs
``pynetdicom.apps.storescp`` unchanged (it decodes each data set with pydicom and
writes it with ``save_as``, as ``python -m pynetdicom storescp`` does), except that
every accepted connection gets TCP_NODELAY: pynetdicom has no option for it (its
``AssociationServer`` sets only SO_REUSEADDR), so ``AssociationServer.get_request``
is wrapped here. Without it each response could wait for a delayed ACK,
and the comparison would measure Nagle's algorithm, not pynetdicom.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

__all__ = ["main", "patch_nodelay"]


def patch_nodelay() -> None:
    from pynetdicom import transport

    original = transport.AssociationServer.get_request

    def get_request(self: Any) -> Any:
        client, address = original(self)
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return client, address

    transport.AssociationServer.get_request = get_request  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    patch_nodelay()
    from pynetdicom.apps.storescp import storescp

    storescp.main(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
