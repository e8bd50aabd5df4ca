"""A requestor engine and an acceptor engine wired together, with no socket."""

from __future__ import annotations

from collections.abc import Callable

from workers.engine import acse
from workers.engine import pdu as p
from workers.engine.connection import Connection, EngineConfig, Role
from workers.engine.primitives import NEED_DATA, AssociateIndication, Indication

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def drain(conn: Connection) -> list[Indication]:
    """Every indication the connection has now."""
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)  # type: ignore[arg-type]


def wire_bytes(conn: Connection) -> bytes:
    return b"".join(bytes(chunk) for chunk in conn.data_to_send())


class Pair:
    """Moves bytes between two connections; ``split`` feeds them in pieces."""

    def __init__(
        self,
        requestor_config: EngineConfig | None = None,
        acceptor_config: EngineConfig | None = None,
        split: int = 0,
    ) -> None:
        self.requestor = Connection(Role.REQUESTOR, requestor_config)
        self.acceptor = Connection(Role.ACCEPTOR, acceptor_config)
        self.split = split
        self.requestor_events: list[Indication] = []
        self.acceptor_events: list[Indication] = []
        self.wire: list[tuple[str, bytes]] = []  # (direction, bytes) as sent

    def _feed(self, conn: Connection, data: bytes) -> None:
        if not data:
            return
        if self.split:
            for i in range(0, len(data), self.split):
                conn.receive_data(data[i : i + self.split], 0.0)
        else:
            conn.receive_data(data, 0.0)

    def pump(self, on_acceptor: Callable[[Indication], None] | None = None) -> None:
        """Exchange bytes until both sides are quiet."""
        for _ in range(10_000):
            a_out = wire_bytes(self.requestor)
            if a_out:
                self.wire.append(("rq->ac", a_out))
            self._feed(self.acceptor, a_out)
            new = drain_with(self.acceptor, on_acceptor)
            self.acceptor_events += new
            b_out = wire_bytes(self.acceptor)
            if b_out:
                self.wire.append(("ac->rq", b_out))
            self._feed(self.requestor, b_out)
            self.requestor_events += drain(self.requestor)
            if not a_out and not b_out and not new:
                return
        raise AssertionError("pump did not settle")

    def associate(
        self,
        contexts: list[acse.Requested] | None = None,
        policy: acse.AcceptorPolicy | None = None,
        **request_kwargs: object,
    ) -> p.AssociateAC | p.AssociateRJ:
        """Run association establishment; the acceptor answers with acse.negotiate."""
        contexts = contexts or [acse.Requested(VERIFICATION), acse.Requested(CT_IMAGE_STORAGE)]
        rq = acse.build_request("ACCEPTOR", "REQUESTOR", contexts, **request_kwargs)  # type: ignore[arg-type]
        policy = policy or acse.AcceptorPolicy()
        answer: list[p.AssociateAC | p.AssociateRJ] = []

        def on_acceptor(ev: Indication) -> None:
            if isinstance(ev, AssociateIndication):
                result = acse.negotiate(ev.request, policy)
                answer.append(result)
                if isinstance(result, p.AssociateAC):
                    self.acceptor.accept(result, 0.0)
                else:
                    self.acceptor.reject(result, 0.0)

        self.requestor.request_association(rq, now=0.0)
        self.requestor.connection_made(0.0)
        self.acceptor.connection_made(0.0)
        self.pump(on_acceptor)
        return answer[0]


def drain_with(conn: Connection, callback: Callable[[Indication], None] | None) -> list[Indication]:
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)  # type: ignore[arg-type]
        if callback is not None:
            callback(ev)  # type: ignore[arg-type]
