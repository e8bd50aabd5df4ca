"""The association's log lines and audit trail: the A-ASSOCIATE-RJ we send (a
Security Alert when the service user refused who the peer is), each presentation
context refused, each instance (``--log-instances``), and the one line per
association with its DICOM Instances Transferred message
(:mod:`workers.activity` keeps the counts and names the codes).

It is one part of :class:`workers.association.AssociationProtocol` (a mixin: it
holds no state of its own; the attributes and methods it uses are declared below).
Its lines go to the association's logger, ``workers.association``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .activity import context_result_name, log_fields, reject_names
from .engine import pdu as p

if TYPE_CHECKING:
    from .activity import Activity
    from .engine.connection import Connection
    from .session import AcceptorServer, Association, Operation, Reporter

__all__ = ["AssociationTrail"]

log = logging.getLogger("workers.association")


class AssociationTrail:
    """The log lines and audit messages of
    :class:`~workers.association.AssociationProtocol`."""

    conn: Connection
    loop: asyncio.AbstractEventLoop
    server: AcceptorServer[Any]
    reporter: Reporter[Any]
    assoc: Association
    activity: Activity

    def _called_ae(self) -> str:
        request = self.conn.request
        return str(request.called_ae) if request is not None else ""

    def _rejected(self, answer: p.AssociateRJ) -> None:
        """Log an A-ASSOCIATE-RJ we send with its PS3.8 names; a permanent one by
        the service user (who the peer is, not how busy we are) is a Security Alert."""
        assoc = self.assoc
        names = reject_names(answer.result, answer.source, answer.reason)
        activity = self.activity
        activity.outcome = "rejected"
        activity.aborted = names
        calling, called = str(assoc.requestor.ae_title), self._called_ae()
        log_fields(
            log,
            logging.INFO,
            "association-rejected",
            {"peer": assoc.name, "calling_ae": calling, "called_ae": called, **names},
        )
        audit = self.server.audit
        if (
            audit is not None
            and answer.result == p.RejectResult.PERMANENT
            and answer.source == p.RejectSource.SERVICE_USER
        ):
            why = f"association {calling!r} -> {called!r} rejected: {names['reject_reason']}"
            audit.refused(assoc.requestor.address, why, calling)

    def _contexts_answered(self, answer: p.AssociateAC) -> None:
        """Count the contexts of an A-ASSOCIATE-AC; log and count each refused one."""
        activity = self.activity
        activity.outcome = "established"
        proposed = (
            {c.id: c for c in self.conn.request.contexts} if self.conn.request is not None else {}
        )
        reporter = self.reporter
        for item in answer.contexts:
            if item.result == p.ContextResult.ACCEPTANCE:
                activity.contexts_accepted += 1
                continue
            activity.contexts_rejected += 1
            reason = context_result_name(item.result)
            reporter.context_rejected(reason)
            ctx = proposed.get(item.id)
            log_fields(
                log,
                logging.INFO,
                "context-rejected",
                {
                    "peer": self.assoc.name,
                    "calling_ae": str(self.assoc.requestor.ae_title),
                    "context_id": item.id,
                    "abstract_syntax": ctx.abstract_syntax if ctx else "",
                    "transfer_syntaxes": ",".join(ctx.transfer_syntaxes) if ctx else "",
                    "reason": reason,
                },
            )

    def _log_instance(self, level: int, op: Operation, result: Any) -> None:
        cmd = op.command
        log_fields(
            log,
            level,
            "instance",
            {
                "peer": self.assoc.name,
                "calling_ae": str(self.assoc.requestor.ae_title),
                "sop_class": cmd.AffectedSOPClassUID or "",
                "sop_instance": cmd.AffectedSOPInstanceUID or "",
                "status": f"0x{result.status:04x}",
                "bytes": result.bytes_written,
                "path": getattr(result, "path", None) or "",
            },
        )

    def _log_activity(self) -> None:
        """The association's one line, and its DICOM Instances Transferred message."""
        activity = self.activity
        assoc = self.assoc
        calling, called = str(assoc.requestor.ae_title or ""), self._called_ae()
        fields = activity.fields(assoc.name, calling, called, self.loop.time())
        # A connection that never asked for an association (a port probe, a health
        # check) is worth a line only when debugging.
        level = logging.INFO if activity.outcome != "closed" else logging.DEBUG
        log_fields(log, level, "association", fields)
        audit = self.server.audit
        if audit is not None and activity.studies:
            audit.instances_transferred(
                activity.studies, activity.failed, assoc.requestor.address, calling, called
            )

    def _audit_user_refused(self, identity: p.UserIdentityRQ) -> None:
        # Only a user name is worth naming: Kerberos, SAML and JWT primary fields
        # are credentials, and the passcode never goes into an audit message.
        if identity.type in (1, 2):
            user = bytes(identity.primary).decode("utf-8", "replace")
        else:
            user = f"(user identity type {identity.type})"
        calling = str(self.assoc.requestor.ae_title)
        self.server.audit.user_refused(
            self.assoc.requestor.address, user, calling, "user identity not accepted"
        )
