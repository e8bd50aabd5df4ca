"""Start-up of the main process, before the first worker runs: the store, the ports
and the runtime directory (:func:`start_up`, on top of :mod:`receiver.preflight`), the
index repaired against the store (:func:`reconcile_index`), and the main process's
own telemetry and audit trail.

Everything that can fail here fails as a :class:`~receiver.preflight.StartError` or
:class:`~workers.index.IndexUnavailable` (one line on stderr, exit status 2) having
left nothing behind.
"""

from __future__ import annotations

import logging
import socket
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.index import open_index
from workers.index.reconcile import reconcile
from workers.storage.sweep import sweep_incoming

from .config import ReceiverConfig
from .preflight import Leftovers, StartError, bind_tcp, prepare_storage

if TYPE_CHECKING:
    from workers.audit import AuditTrail
    from workers.telemetry import Telemetry

# One logger for the main process (see receiver.pool).
log = logging.getLogger("receiver.supervisor")


@dataclass(slots=True)
class Started:
    """What :func:`start_up` made: the store's absolute path, the bound ports and
    the runtime directory (the metrics socket lives there)."""

    storage: str
    listener: socket.socket
    #: None when metrics are off (or --metrics-optional and the port was taken)
    metrics_listener: socket.socket | None
    runtime_dir: str


def start_up(cfg: ReceiverConfig) -> Started:
    """Everything that can fail because of the machine rather than the peers:
    the store, the DICOM port, the metrics port, the runtime directory. Raises
    StartError (one line) having undone what it did. Then removes the temp files an
    earlier run left in the store."""
    made = Leftovers()
    metrics_listener: socket.socket | None = None
    try:
        storage = prepare_storage(cfg.local_storage(), made)
        listener = bind_tcp(cfg.host, cfg.port, cfg.backlog, "cannot listen on")
        made.sockets.append(listener)
        if cfg.metrics_port:
            try:
                metrics_listener = bind_tcp(
                    cfg.metrics_host, cfg.metrics_port, 128, "cannot serve metrics on"
                )
                made.sockets.append(metrics_listener)
            except StartError as exc:
                if not cfg.metrics_optional:
                    raise
                log.warning("%s: running WITHOUT metrics (--metrics-optional)", exc)
        try:
            runtime_dir = tempfile.mkdtemp(prefix="pacsrx-")
        except OSError as exc:
            raise StartError(
                f"cannot make a runtime directory in {tempfile.gettempdir()}: {exc.strerror or exc}"
            ) from None
    except StartError:
        made.undo()
        raise
    try:
        removed = sweep_incoming(storage, 0)
    except OSError as exc:
        log.warning("could not sweep %s/.incoming: %s", storage, exc)
        removed = 0
    if removed:
        log.warning(
            "removed %d incomplete file(s) left in %s/.incoming by an earlier run",
            removed,
            storage,
        )
    return Started(storage, listener, metrics_listener, runtime_dir)


def reconcile_index(cfg: ReceiverConfig, storage: str) -> None:
    """Open the index (creating/migrating it) and repair it against the store,
    once, before any worker writes (workers/index/reconcile.py). Raises
    IndexUnavailable (one line on stderr, exit status 2)."""
    target = cfg.index_target()
    if target is None:
        return
    index = open_index(target, storage, node=cfg.index_node_name())
    if cfg.storage.startswith("s3://"):
        # The store is the bucket, not this directory: no walk here would find
        # its objects (every record would be marked missing). Spooled instances
        # were indexed under their object URL when they were acknowledged.
        index.close()
        return
    try:
        report = reconcile(index, storage, replace=cfg.duplicates == "overwrite")
    finally:
        index.close()
    log.log(
        logging.WARNING if report.changed else logging.INFO,
        "index %s: %d file(s); indexed %d, re-indexed %d, marked missing %d, "
        "restored %d, unreadable %d (%.2f s)",
        index.backend,
        report.files,
        report.indexed,
        report.reindexed,
        report.missing,
        report.restored,
        report.unreadable,
        report.seconds,
    )


async def start_telemetry(metrics_socket: str) -> Telemetry:
    """Report restarts (and our own CPU and memory) to the aggregator."""
    from workers.telemetry import Telemetry

    telemetry = Telemetry(metrics_socket, "supervisor", role="supervisor")
    await telemetry.start()
    return telemetry


def start_audit(cfg: ReceiverConfig, telemetry: Telemetry | None) -> AuditTrail | None:
    """Application Activity (start) and, from now on, Security Alerts for the
    connections refused by the acceptor (see workers/audit); None without
    --audit-syslog."""
    settings = cfg.audit_settings()
    if settings is None:
        return None
    from workers.audit import AuditTrail

    audit = AuditTrail(settings, cfg.ae_title)
    if telemetry is not None:
        telemetry.watch_audit(audit.sender)
    audit.application(started=True)
    return audit


__all__ = ["Started", "reconcile_index", "start_audit", "start_telemetry", "start_up"]
