"""The acceptor: the listening socket of ``pacs-receiver`` and who gets each connection.

Theory of operation
-------------------
* **accept**: the listening socket is read in batches; each connection goes (TCP_NODELAY
  is set by the transport that serves it), as a file descriptor over the worker's control
  channel (:mod:`workers.control`, SCM_RIGHTS), to the least-loaded worker; our copy is
  closed at once. Load is what the workers report back (:mod:`receiver.pool`):
  connections handed over and not yet reported closed, then bytes waiting to be parsed.
* **limit**: beyond ``--max-associations`` (or the per-calling-AE limit, for which
  the calling AE title is peeked from the A-ASSOCIATE-RQ without consuming it) the
  acceptor answers the association itself with A-ASSOCIATE-RJ (rejected-transient,
  service-provider presentation, local-limit-exceeded), using the same engine as
  the workers (:class:`Rejector`): the peer gets a protocol answer, never a silent
  close. At most :data:`MAX_REFUSING` such answers are in flight; beyond them a
  refused peer is closed unanswered and counted.
* **who may connect**: ``--deny-ip`` / ``--allow-ip`` are applied to the peer address
  at accept, ``[ae-sources]`` (calling AE -> source addresses) after the peek; a
  refused peer gets A-ASSOCIATE-RJ (rejected-permanent, service-user, reason 1
  no-reason-given or 3 calling-AE-title-not-recognized) the same way. With TLS the
  acceptor cannot peek: each worker asks here once it has read the A-ASSOCIATE-RQ
  (:meth:`Acceptor.answer_admission`), where the associations of all are counted.
* **out of descriptors**: EMFILE and its kin pause accepting with a doubling back-off
  instead of spinning on a listener that stays readable.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import select
import socket
import time
from typing import Any

from workers import control
from workers.engine import pdu as p

from .config import ReceiverConfig
from .pool import Pool, WorkerSlot
from .proxy_gate import Peer, ProxyGate
from .rejector import Rejector

# One logger for the main process (see receiver.pool).
log = logging.getLogger("receiver.supervisor")

ACCEPT_BATCH = 256
#: Refused connections answered (A-ASSOCIATE-RJ) at once; beyond it a refused peer is
#: closed without its answer and counted: a flood of refused peers that send nothing
#: must not pin a receive buffer each in the supervisor until their ARTIM expires.
MAX_REFUSING = 256
#: Bytes of an A-ASSOCIATE-RQ up to the end of the Calling AE Title (PS3.8 9.3.2).
PEEK_BYTES = 42
#: Accept errors that mean "out of descriptors or memory": the pending connection
#: stays queued, so the level-triggered listener would fire again at once.
ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0


def _peer_closed(fd: int) -> bool:
    """The peer of the TCP socket ``fd`` shut its side down (or it failed)."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    return any(events & gone for _fd, events in poller.poll(0))


class Acceptor:
    """Accepts connections on ``listener`` and hands them to the workers of ``pool``,
    or answers them itself (limits, who may connect)."""

    def __init__(self, cfg: ReceiverConfig, pool: Pool, listener: socket.socket) -> None:
        self.cfg = cfg
        self.access = cfg.access_policy()
        self.proxy_gate = self._proxy_gate(cfg)
        self.pool = pool
        self.loop = pool.loop
        self.listener: socket.socket | None = listener
        self.ids = itertools.count(1)
        self.rejected = 0
        #: Rejectors in flight, and refused peers closed unanswered beyond MAX_REFUSING
        self.refusing = 0
        self.unanswered = 0
        self._unanswered_unlogged = 0
        self._unanswered_logged_at = 0.0
        #: accepting paused (EMFILE ...): the current pause, and how many in a row
        self._accept_backoff = 0.0
        self._accept_pauses = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self.telemetry: Any = None  # workers.telemetry.Telemetry once metrics are on
        self.audit: Any = None  # workers.audit.AuditTrail with --audit-syslog
        self._rotation = 0
        pool.on_admit = self.answer_admission

    # ------------------------------------------------------ start and stop

    def start(self) -> None:
        """Start accepting."""
        if self.listener is not None:
            self.loop.add_reader(self.listener.fileno(), self._on_accept)

    def close(self) -> None:
        """Stop accepting for good and close the listening socket."""
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None

    def reconfigure(self, cfg: ReceiverConfig) -> None:
        """A reloaded configuration: its limits and who may connect apply from now."""
        self.cfg = cfg
        self.access = cfg.access_policy()
        self.proxy_gate = self._proxy_gate(cfg)

    def tick(self, now: float) -> None:
        """Periodic duties (the arbiter's tick): the unanswered refusals' log line."""
        self._log_unanswered(now)

    # -------------------------------------------------------------- accept

    def _pick(self, pending: dict[int, int] | None = None) -> WorkerSlot | None:
        """The least-loaded live worker; ``pending``: slot index -> connections picked
        for it in this accept batch and not handed over (not in ``assigned``) yet."""
        best: WorkerSlot | None = None
        best_load = (0, 0)
        slots = self.pool.slots
        # Start after the last pick so that equally loaded workers take turns.
        count = len(slots)
        self._rotation = (self._rotation + 1) % max(count, 1)
        for i in range(count):
            slot = slots[(self._rotation + i) % count]
            if slot.ctrl is None or slot.draining:
                continue
            load = (len(slot.assigned) + (pending or {}).get(slot.index, 0), slot.buffered)
            if best is None or load < best_load:
                best, best_load = slot, load
        return best

    def _on_accept(self) -> None:
        listener = self.listener
        if listener is None:
            return
        # socket._accept() is accept4(2) without the socket object socket.accept()
        # builds (its family and type looked up as enums, every time): a connection
        # handed to a worker is only an fd to send here. TCP_NODELAY is not set here
        # either: the transport that serves the connection sets it (uvloop's TCP
        # transports do on every socket: the workers' and our Rejector's).
        accept = listener._accept  # type: ignore[attr-defined]
        access = self.access
        screen = access.filters_addresses
        limit = self.cfg.max_associations
        # With TLS the workers ask the supervisor instead (answer_admission).
        by_ae = not self.cfg.tls_cert and bool(
            self.cfg.max_associations_per_ae or access.ae_sources
        )
        batches: dict[int, tuple[WorkerSlot, list[int], list[int]]] = {}
        #: slot index -> connections picked for it in this batch, not handed over yet
        pending: dict[int, int] = {}
        picked = 0
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in ACCEPT_RESOURCE_ERRORS:
                    self._pause_accepting(exc)
                    break
                # ECONNABORTED, EPROTO ...: that one connection is gone; go on.
                log.warning("accept failed: %s", exc)
                continue
            if self._accept_pauses:
                self._accepting_again()
            if self.proxy_gate is not None:
                # Behind a balancer: the header's address is the peer's (proxy_gate.py).
                admit = self._admit_proxied(self._socket(fd), addr, self.proxy_gate)
                self._track(asyncio.ensure_future(admit))
                continue
            if screen and not access.address_allowed(addr[0]):
                # Before any limit: a refused peer takes no one's place.
                self._refuse(
                    self._socket(fd),
                    p.RejectReason.NO_REASON,
                    "address refused by --deny-ip/--allow-ip",
                )
                continue
            if limit and self.pool.open_total() + picked >= limit:
                self._reject(self._socket(fd))
                continue
            if by_ae:
                self._track(asyncio.ensure_future(self._admit_by_ae(self._socket(fd), addr[0])))
                continue
            # Count this batch's picks too: a burst accepted in one go is spread.
            slot = self._pick(pending)
            if slot is None:
                self._reject(self._socket(fd))
                continue
            batch = batches.get(slot.index)
            if batch is None:
                batch = batches[slot.index] = (slot, [], [])
            batch[1].append(fd)
            batch[2].append(next(self.ids))
            pending[slot.index] = pending.get(slot.index, 0) + 1
            picked += 1
        for slot, fds, ids in batches.values():
            self._hand_off(slot, fds, ids, [""] * len(ids))

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors or memory: the connection that could not be accepted
        stays queued and the level-triggered listener would fire again at once, for
        ever. Stop watching the listener for a while (doubling up to
        ACCEPT_BACKOFF_MAX while it lasts); the queued peers wait in the backlog."""
        listener = self.listener
        if listener is None:
            return
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._accept_backoff = min(
            ACCEPT_BACKOFF_MAX, max(ACCEPT_BACKOFF_MIN, self._accept_backoff * 2)
        )
        if not self._accept_pauses:
            log.error(
                "cannot accept connections: %s (%s); pausing accepting, retrying "
                "every %g s at most",
                exc.strerror,
                name,
                ACCEPT_BACKOFF_MAX,
            )
        self._accept_pauses += 1
        if self.telemetry is not None:
            self.telemetry.acceptor_event(f"backoff_{name}")
        self.loop.remove_reader(listener.fileno())
        self.loop.call_later(self._accept_backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        # close() (the stop) sets the listener to None: then it stays closed.
        if self.listener is None:
            return
        self.loop.add_reader(self.listener.fileno(), self._on_accept)

    def _accepting_again(self) -> None:
        log.warning("accepting connections again after %d pause(s)", self._accept_pauses)
        self._accept_pauses = 0
        self._accept_backoff = 0.0

    @staticmethod
    def _socket(fd: int) -> socket.socket:
        """A socket object for an accepted fd, for the connections answered here (the
        listener may be closed by now: the family is the fd's own)."""
        return socket.socket(fileno=fd)

    def _hand_off(
        self,
        slot: WorkerSlot,
        fds: list[int],
        ids: list[int],
        aes: list[str],
        peers: list[Peer] | None = None,
    ) -> None:
        """Send the accepted ``fds`` to ``slot``'s worker; ours are closed once sent.
        ``peers``: the clients' addresses from PROXY headers (the workers' peers)."""
        for start in range(0, len(fds), control.MAX_FDS_PER_MESSAGE):
            part = fds[start : start + control.MAX_FDS_PER_MESSAGE]
            part_ids = ids[start : start + control.MAX_FDS_PER_MESSAGE]
            part_aes = aes[start : start + control.MAX_FDS_PER_MESSAGE]
            part_peers = peers[start : start + control.MAX_FDS_PER_MESSAGE] if peers else None
            try:
                ctrl = slot.ctrl
                if ctrl is None:
                    raise ConnectionResetError("worker channel closed")
                control.send_connections(ctrl, part, part_ids, part_peers)
            except OSError as exc:
                if not isinstance(exc, BlockingIOError):
                    # EPIPE ...: the worker died and is not reaped yet. Another one
                    # serves these (each failure closes a channel: this ends).
                    self.pool.channel_lost(slot)
                    other = self._pick()
                    if other is not None:
                        self._hand_off(other, part, part_ids, part_aes, part_peers)
                        continue
                # The channel is full, or no worker is left: answer these ourselves.
                log.warning(
                    "cannot hand %d connection(s) to worker %d: %s", len(part), slot.index, exc
                )
                for i, (fd, ae) in enumerate(zip(part, part_aes, strict=False)):
                    self.pool.ae_closed(ae)  # counted by _admit_by_ae, never assigned
                    self._reject(
                        self._socket(fd),
                        transient_reason=p.RejectReason.TEMPORARY_CONGESTION,
                        peer=part_peers[i] if part_peers else None,
                    )
                continue
            assigned, sent_seq = slot.assigned, slot.sent_seq
            for fd, connection_id, ae in zip(part, part_ids, part_aes, strict=False):
                assigned[connection_id] = ae
                slot.sent += 1
                sent_seq[connection_id] = slot.sent
                os.close(fd)

    # ----------------------------------------------------------- admission

    def _ae_refusal(self, ae: str | None, host: str) -> tuple[str, str] | None:
        """[ae-sources] and the per-AE limit for ``ae`` connecting from ``host``:
        None, or (answer, why) with answer "ae" (not from there) or "limit"."""
        # Fail closed: an AE title that could not be read might be a restricted one.
        if self.access.ae_sources and (ae is None or not self.access.ae_source_allowed(ae, host)):
            why = (
                "calling AE title could not be read"
                if ae is None
                else f"calling AE {ae!r} not allowed from {host} by [ae-sources]"
            )
            return "ae", why
        limit_per_ae = self.cfg.max_associations_per_ae
        if limit_per_ae and ae is not None and self.pool.per_ae[ae] >= limit_per_ae:
            return "limit", f"{limit_per_ae} association(s) of {ae!r} already open"
        return None

    def answer_admission(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        """With TLS the acceptor cannot peek the calling AE title: the worker that
        read the A-ASSOCIATE-RQ asks here, where the associations of every worker are
        counted. The answer is "ok" (counted from now until the connection closes),
        "ae" or "limit"; the worker rejects accordingly."""
        connection_id = message.get("id")
        ae = str(message.get("ae", "")).strip()
        host = str(message.get("host", ""))
        refusal = self._ae_refusal(ae, host)
        if refusal is None:
            answer = "ok"
            if connection_id in slot.assigned and not slot.assigned[connection_id]:
                slot.assigned[connection_id] = ae
                if ae:
                    self.pool.per_ae[ae] += 1
        else:
            answer, why = refusal
            self.rejected += 1
            log.info("refusing %r from %s (over TLS, in worker %d): %s", ae, host, slot.index, why)
            if answer == "ae" and self.audit is not None:
                self.audit.refused(host, why, ae)
        ctrl = slot.ctrl
        if ctrl is None:
            return
        try:
            control.send(ctrl, {"op": "admit", "id": connection_id, "answer": answer})
        except OSError as exc:  # its ACSE timeout answers the peer
            log.warning("could not answer worker %d's admission question: %s", slot.index, exc)

    async def _admit_by_ae(self, sock: socket.socket, host: str, peer: Peer | None = None) -> None:
        """Peek the calling AE title of the A-ASSOCIATE-RQ; apply [ae-sources] and the
        per-AE limit, then (again: others were admitted during the peek) the total."""
        try:
            ae = await self._peek_calling_ae(sock)
        except EOFError:
            sock.close()  # gone in the middle of its request: nobody to answer
            return
        except TimeoutError:
            # PS3.8 ARTIM in Sta2: no A-ASSOCIATE-RQ in time, close the connection.
            log.warning(
                "closing connection from %s: no A-ASSOCIATE-RQ within --acse-timeout (%g s)",
                host,
                self.cfg.acse_timeout,
            )
            sock.close()
            return
        refusal = self._ae_refusal(ae, host)
        if refusal is not None:
            if refusal[0] == "ae":
                self._refuse(sock, p.RejectReason.CALLING_AE_NOT_RECOGNIZED, refusal[1], peer)
            else:
                self._reject(sock, peer=peer)
            return
        limit = self.cfg.max_associations
        if limit and self.pool.open_total() >= limit:
            self._reject(sock, peer=peer)
            return
        slot = self._pick()
        if slot is None:
            self._reject(sock, peer=peer)
            return
        if ae:
            self.pool.per_ae[ae] += 1
        peers = [peer] if peer is not None else None
        self._hand_off(slot, [sock.detach()], [next(self.ids)], [ae or ""], peers)

    # ------------------------------------------------- behind a load balancer

    def _proxy_gate(self, cfg: ReceiverConfig) -> ProxyGate | None:
        """--proxy-protocol-from: the gate every connection passes first, or None."""
        if not cfg.proxy_protocol_from:
            return None

        def count(reason: str) -> None:
            if self.telemetry is not None:
                self.telemetry.acceptor_event(f"proxy_{reason}")

        return ProxyGate(cfg.proxy_protocol_from, cfg.network_timeout, cfg.acse_timeout, count)

    async def _admit_proxied(
        self, sock: socket.socket, addr: tuple[Any, ...], gate: ProxyGate
    ) -> None:
        """Behind a balancer: the PROXY header first (its client address is the
        peer's from here on: --allow-ip, the limits, [ae-sources], the worker),
        then what _on_accept does for one connection."""
        try:
            peer = await gate.admit(sock, (str(addr[0]), int(addr[1])))
        except OSError as exc:  # the connection failed under the gate
            log.info("connection from %s:%s lost before its header was read: %s", *addr[:2], exc)
            sock.close()
            return
        if peer is None:
            return  # closed, logged, counted
        host = peer[0]
        if self.access.filters_addresses and not self.access.address_allowed(host):
            why = "address refused by --deny-ip/--allow-ip"
            self._refuse(sock, p.RejectReason.NO_REASON, why, peer)
            return
        limit = self.cfg.max_associations
        if limit and self.pool.open_total() >= limit:
            self._reject(sock, peer=peer)
            return
        if not self.cfg.tls_cert and (self.cfg.max_associations_per_ae or self.access.ae_sources):
            await self._admit_by_ae(sock, host, peer)
            return
        slot = self._pick()
        if slot is None:
            self._reject(sock, peer=peer)
            return
        self._hand_off(slot, [sock.detach()], [next(self.ids)], [""], [peer])

    async def _peek_calling_ae(self, sock: socket.socket) -> str | None:
        """The Calling AE Title (bytes 26..42 of an A-ASSOCIATE-RQ), read with MSG_PEEK
        so the worker still receives the whole PDU. None when what came is no
        A-ASSOCIATE-RQ (the worker answers it) or the peer is gone; TimeoutError when
        the 42 bytes do not come within --acse-timeout; EOFError when the peer closes
        before they came.

        Peeked bytes stay in the receive queue, so once some have come the socket
        stays readable: waiting for readability would wake at once, again and again,
        until the rest came. SO_RCVLOWAT makes the socket readable only once
        PEEK_BYTES are queued (or the peer closes); it is put back to 1 before the
        socket goes to a worker, whose event loop must see every byte."""
        if self.cfg.tls_cert:
            return None  # a TLS ClientHello: the AE title is the workers' to see
        loop = self.loop
        deadline = loop.time() + self.cfg.acse_timeout
        sock.setblocking(False)
        fd = sock.fileno()
        low_water = False
        try:
            while True:
                try:
                    head: bytes | None = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
                except BlockingIOError:
                    head = None
                except OSError:
                    return None
                if head is not None:
                    if not head or head[0] != p.PDUType.ASSOCIATE_RQ:
                        return None
                    if len(head) >= PEEK_BYTES:
                        return head[26:42].decode("latin-1").strip(" \0")
                    if not low_water:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, PEEK_BYTES)
                        low_water = True
                    elif _peer_closed(fd):
                        # Readable with fewer bytes than the low-water mark: the peer
                        # closed (peeked bytes are still queued, so recv never says so).
                        raise EOFError
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                waiter: asyncio.Future[None] = loop.create_future()

                def wake(w: asyncio.Future[None] = waiter) -> None:
                    if not w.done():
                        w.set_result(None)

                loop.add_reader(fd, wake)
                try:
                    await asyncio.wait_for(waiter, remaining)
                finally:
                    loop.remove_reader(fd)
        finally:
            if low_water:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                except OSError:
                    pass  # closed meanwhile: nobody reads it any more

    # ------------------------------------------------------------ refusals

    def _reject(
        self,
        sock: socket.socket,
        transient_reason: int = p.RejectReason.LOCAL_LIMIT_EXCEEDED,
        *,
        rj: p.AssociateRJ | None = None,
        why: str | None = None,
        peer: Peer | None = None,
    ) -> None:
        """Answer ``sock``'s A-ASSOCIATE-RQ with ``rj`` (default: rejected-transient,
        service-provider presentation, ``transient_reason``) instead of a worker.
        ``peer``: the client's address from a PROXY header, for the log line."""
        self.rejected += 1
        if self.cfg.tls_cert:
            # The acceptor does not speak TLS (the handshake is the workers'): an
            # A-ASSOCIATE-RJ in clear text would be garbage to the client. Close.
            try:
                host, port = peer or sock.getpeername()[:2]
                shown = f"{host}:{port}"
            except OSError:
                shown = "?"
            log.info("refusing a TLS connection from %s by closing it (%s)", shown, why or "limit")
            sock.close()
            return
        if rj is None:
            rj = p.AssociateRJ(
                p.RejectResult.TRANSIENT,
                p.RejectSource.SERVICE_PROVIDER_PRESENTATION,
                transient_reason,
            )
        if self.refusing >= MAX_REFUSING:
            self._close_unanswered(sock)
            return
        answer = rj
        sock.setblocking(False)
        timeout = self.cfg.artim_timeout
        telemetry = self.telemetry
        self.refusing += 1
        settled = False

        def done() -> None:  # once per Rejector: when it closes, or cannot start
            nonlocal settled
            if not settled:
                settled = True
                self.refusing -= 1

        def started(task: asyncio.Future[Any]) -> None:
            if task.cancelled() or task.exception() is not None:
                done()
                sock.close()

        task = asyncio.ensure_future(
            self.loop.connect_accepted_socket(
                lambda: Rejector(
                    answer, timeout, why, telemetry, on_close=done, peer=peer, loop=self.loop
                ),
                sock,
            )
        )
        task.add_done_callback(started)
        self._track(task)

    def _close_unanswered(self, sock: socket.socket) -> None:
        """MAX_REFUSING refusals are in flight already: close this one without its
        A-ASSOCIATE-RJ (the peer sees the connection closed), count it, and say so at
        most once a second."""
        sock.close()
        self.unanswered += 1
        self._unanswered_unlogged += 1
        if self.telemetry is not None:
            self.telemetry.acceptor_event("unanswered")
        self._log_unanswered(time.monotonic())

    def _log_unanswered(self, now: float) -> None:
        if self._unanswered_unlogged and now - self._unanswered_logged_at >= 1.0:
            log.warning(
                "closed %d refused connection(s) without A-ASSOCIATE-RJ: %d refusals "
                "already in flight",
                self._unanswered_unlogged,
                MAX_REFUSING,
            )
            self._unanswered_unlogged = 0
            self._unanswered_logged_at = now

    def _refuse(self, sock: socket.socket, reason: int, why: str, peer: Peer | None = None) -> None:
        """Who may connect: PS3.8 Table 9-21 rejected-permanent (1), source
        service-user (1), ``reason`` 1 no-reason-given or 3 calling-AE-not-recognized."""
        rj = p.AssociateRJ(p.RejectResult.PERMANENT, p.RejectSource.SERVICE_USER, reason)
        if self.audit is not None:
            try:
                host = str(peer[0] if peer else sock.getpeername()[0])
            except OSError:
                host = "unknown"
            self.audit.refused(host, why)
        self._reject(sock, rj=rj, why=why, peer=peer)

    def _track(self, task: asyncio.Future[Any]) -> None:
        # Keep a reference until done: the loop only holds weak references to tasks.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


__all__ = ["MAX_REFUSING", "PEEK_BYTES", "Acceptor", "Rejector"]
