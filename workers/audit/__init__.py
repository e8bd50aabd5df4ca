"""The audit trail: DICOM audit messages (PS3.15 A.5, IHE ATNA) to a syslog collector.

Who sends what:

* the supervisor: Application Activity (start, stop) and a Security Alert for every
  connection it refuses by who the peer is (``--allow-ip``/``--deny-ip``,
  ``[ae-sources]``);
* each worker: DICOM Instances Transferred once per association that stored
  something (one message per patient, as A.5.3.4 asks), a Security Alert for an
  association it rejects permanently (calling or called AE title not recognized,
  no user identity where one is required), and User Authentication (failure) when
  a user identity is refused.

Everything goes through :class:`AuditTrail`, whose methods only queue (see
:mod:`workers.audit.syslog`): reception never waits for the collector.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from . import messages as m
from .syslog import SEVERITY_WARNING, SyslogSender, parse_url

__all__ = ["AuditSettings", "AuditTrail", "parse_url"]


@dataclass(slots=True)
class AuditSettings:
    """Where audit messages go and how this node names itself in them."""

    #: udp://host:port, tcp://host:port or tls://host:port
    url: str
    #: CA bundle the collector's certificate is checked with (tls://)
    ca: str | None = None
    #: our client certificate and key (tls://, mutual authentication)
    cert: str | None = None
    key: str | None = None
    #: AuditSourceID; default "<AE title>@<host name>"
    source_id: str = ""
    #: AuditEnterpriseSiteID; default none
    site_id: str = ""
    #: messages waiting for the collector at most; more are dropped and counted
    queue_size: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AuditSettings:
        return cls(**dict(data))


class AuditTrail:
    """Builds and queues the audit messages of one process."""

    def __init__(
        self, settings: AuditSettings, ae_title: str, sender: SyslogSender | None = None
    ) -> None:
        self.settings = settings
        self.ae_title = ae_title
        self.hostname = socket.gethostname()
        self.sender = sender or SyslogSender(
            settings.url,
            ca=settings.ca,
            cert=settings.cert,
            key=settings.key,
            queue_size=settings.queue_size,
            hostname=self.hostname,
        )
        self.source = m.Source(
            settings.source_id or f"{ae_title}@{self.hostname}", settings.site_id
        )
        self.node = m.Node(ae_title, (ae_title,), self.hostname)

    @property
    def sent(self) -> int:
        return self.sender.sent

    @property
    def dropped(self) -> int:
        return self.sender.dropped

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what is queued (for up to ``timeout`` s) and stop the sender."""
        self.sender.close(timeout)

    # ----------------------------------------------------------- messages

    def application(self, started: bool) -> None:
        """Application Activity: this receiver started or stops."""
        try:
            launcher = getpass.getuser()
        except (KeyError, OSError):
            launcher = str(os.getuid())
        source, node = self.source, m.Node(f"pacs-receiver:{os.getpid()}", (self.ae_title,))
        self.sender.submit(lambda: m.application_activity(source, node, started, launcher))

    def instances_transferred(
        self,
        studies: Mapping[tuple[str, str], Mapping[str, int]],
        failed: int,
        peer_host: str,
        calling_ae: str,
        called_ae: str,
    ) -> None:
        """DICOM Instances Transferred for one association: ``studies`` maps
        (Patient ID, Study Instance UID) -> SOP Class UID -> instances stored;
        ``failed``: C-STOREs answered with a failure. One message per patient."""
        per_patient: dict[str, dict[str, dict[str, int]]] = {}
        for (patient, study), classes in studies.items():
            per_patient.setdefault(patient, {})[study] = dict(classes)
        outcome = m.MINOR_FAILURE if failed else m.SUCCESS
        why = f"{failed} instance(s) not stored" if failed else ""
        source = self.source
        sender = m.Node(calling_ae, (calling_ae,), peer_host)
        receiver = m.Node(called_ae or self.ae_title, (self.ae_title,), self.hostname)
        for patient, by_study in per_patient.items():
            self.sender.submit(
                lambda p=patient, s=by_study: m.instances_transferred(  # type: ignore[misc]
                    source, sender, receiver, p, s, outcome, description=why
                )
            )

    def refused(self, peer_host: str, why: str, calling_ae: str = "") -> None:
        """Security Alert (Node Authentication failed): a peer refused by address,
        AE title or policy."""
        source, node = self.source, self.node
        peer = m.Node(calling_ae or peer_host, (calling_ae,) if calling_ae else (), peer_host)
        self.sender.submit(
            lambda: m.security_alert(source, node, peer, peer_host, why), SEVERITY_WARNING
        )

    def user_refused(self, peer_host: str, user: str, calling_ae: str, why: str) -> None:
        """User Authentication (Login, failed): a user identity was refused."""
        source, node = self.source, self.node
        person = m.Node(user or "unknown", (calling_ae,) if calling_ae else (), peer_host)
        self.sender.submit(
            lambda: m.user_authentication(source, person, node, why), SEVERITY_WARNING
        )
