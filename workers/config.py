"""What one worker needs to know: who it is, what it accepts, its limits and timeouts."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .engine import acse
from .engine.connection import EngineConfig
from .remote_aes import RemoteAE, parse_remote_aes
from .storage.config import StorageConfig

if TYPE_CHECKING:
    from .audit import AuditSettings
    from .identity import IdentitySettings
    from .tls import TlsSettings


@dataclass(slots=True)
class WorkerConfig:
    """Configuration of an association server (one worker process).

    Timeouts are in seconds; None disables one.
    """

    storage: StorageConfig
    ae_title: str = "PACSRX"
    #: refuse associations whose Called AE Title is not ``ae_title``
    require_called_ae: bool = False
    #: Calling AE Titles allowed to associate; None: any
    allowed_calling_aes: Collection[str] | None = None
    #: abstract syntax (or "*") -> accepted transfer syntaxes (or ("*",))
    syntaxes: Mapping[str, Sequence[str]] = field(default_factory=lambda: {acse.ANY: (acse.ANY,)})
    #: Maximum Length announced to the peer and enforced on P-DATA-TF
    max_pdu_length: int = 1024 * 1024
    #: largest association-control PDU (A-ASSOCIATE-RQ ...) accepted
    max_control_pdu_length: int = 1024 * 1024
    #: largest data set held in memory (C-FIND identifiers, N-* lists ...) per association
    max_dataset_in_memory: int = 64 * 1024 * 1024
    #: all data sets being received into memory by this worker together (C-STORE data
    #: sets stream to files and do not count); beyond it, the association is aborted
    max_dataset_memory: int = 256 * 1024 * 1024
    max_contexts: int = acse.MAX_CONTEXTS
    #: associations open at once in this worker; 0: unlimited
    max_associations: int = 0
    #: associations open at once per Calling AE Title; 0: unlimited
    max_associations_per_ae: int = 0
    #: ARTIM: waiting for the A-ASSOCIATE-RQ after connect, and for the peer to
    #: close after a release, reject or abort
    artim_timeout: float = 30.0
    #: the local answer to an association request (user identity handlers ...)
    acse_timeout: float | None = 30.0
    #: no byte from the peer for this long while the association is open: abort
    network_timeout: float | None = 60.0
    #: in the middle of a PDU or a message, fewer bytes a second than this, averaged
    #: over a ``network_timeout`` window, abort the association; 0: no minimum
    min_receive_rate: int = 1024
    #: a DIMSE handler that runs longer gets its failure status
    handler_timeout: float | None = 60.0
    #: threads for user handlers that are plain functions
    handler_threads: int = 8
    #: pause reading from a peer when this many received bytes are unparsed
    read_high_water: int = 8 * 1024 * 1024
    #: with fsync, C-STOREs are committed on the event loop while the running average
    #: of a commit stays under this many seconds, else in the I/O pool (see
    #: AssociationProtocol._dispatch_operation); 0: always in the pool
    inline_commit_below: float = 0.002
    #: with fsync, the longest a commit waits for others to share its flushes, in
    #: seconds (workers/storage/group.py); it never waits when it is alone
    group_commit_wait: float = 0.001
    #: largest asynchronous operations window granted (invoked, performed)
    max_async_ops: int = 1
    #: the built-in user identity policy (EVT_USER_ID); None: identity not checked
    identity: IdentitySettings | None = None
    #: DICOM TLS (workers/tls.py): the handshake runs here, not in the acceptor
    tls: TlsSettings | None = None
    #: one log line per instance: "info", "debug" or "off" (workers/activity.py)
    log_instances: str = "off"
    #: DICOM audit messages to a syslog collector (workers/audit); None: none
    audit: AuditSettings | None = None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_pdu_length=self.max_pdu_length,
            max_control_pdu_length=self.max_control_pdu_length,
            max_dataset_in_memory=self.max_dataset_in_memory,
            artim_timeout=self.artim_timeout,
        )

    def acceptor_policy(self) -> acse.AcceptorPolicy:
        return acse.AcceptorPolicy(
            ae_title=self.ae_title,
            require_called_ae=self.require_called_ae,
            allowed_calling_aes=(
                frozenset(self.allowed_calling_aes)
                if self.allowed_calling_aes is not None
                else None
            ),
            syntaxes=self.syntaxes,
            max_pdu_length=self.max_pdu_length,
            max_contexts=self.max_contexts,
        )


@dataclass(slots=True)
class IndexedSettings:
    """What the indexed services are told (``extra["indexed"]`` of the worker JSON)."""

    #: the index to open (``open_index``'s argument); None: the embedded default
    index: str | None = None
    #: this receiver's name in a shared index (owner of its pending reports)
    node: str = ""
    #: C-FIND / C-GET / C-MOVE SCP over the index (--query-retrieve)
    query_retrieve: bool = False
    #: Storage Commitment SCP (N-ACTION of the Push Model)
    commitment: bool = True
    #: AE title -> where to open associations (commitment reports, C-MOVE)
    remote_aes: dict[str, RemoteAE] = field(default_factory=dict)
    #: most Referenced SOP Sequence items one N-ACTION may carry
    commitment_max_references: int = 10_000
    #: first delay before a report is sent again; doubles up to ``commitment_retry_max``
    commitment_retry: float = 5.0
    commitment_retry_max: float = 300.0
    #: a report not delivered after this many seconds is given up (logged)
    commitment_give_up: float = 7 * 24 * 3600.0
    #: this worker also takes over reports whose worker died (one worker per node)
    sweeper: bool = True

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> IndexedSettings:
        values = dict(data)
        values["remote_aes"] = parse_remote_aes(values.get("remote_aes") or {})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__}
        out["remote_aes"] = {ae: r.to_dict() for ae, r in self.remote_aes.items()}
        return out
