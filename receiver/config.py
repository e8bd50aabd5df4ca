"""Configuration of ``pacs-receiver``: defaults, a TOML file, command-line flags.

Precedence: embedded defaults < the ``--config`` TOML file < flags. The TOML file
uses the long flag names with dashes or underscores (``ae-title = "PACSRX"``), in the
top-level table or in ``[receiver]``. Every value is checked at start-up; a bad one
stops the program with one clear line and exit status 2 (:class:`ConfigError`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, cast

from workers.engine import acse

from .access import AccessPolicy, parse_networks


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says which and why."""


@dataclass(slots=True)
class ReceiverConfig:
    """Everything ``pacs-receiver`` can be told. Field names are the flag names."""

    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "PACSRX"
    storage: str = "./dicom-store"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"
    #: metrics port in use at start-up: run without metrics (saying so) instead of exit 2
    metrics_optional: bool = False
    fsync: str = "always"
    duplicates: str = "overwrite"
    layout: str = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    #: milliseconds a commit waits (with --fsync always) for others to share its flushes
    group_commit_wait: float = 1.0
    # timeouts, seconds
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    #: bytes/s a peer must keep up in the middle of a message (0: no minimum)
    min_receive_rate: int = 1024
    artim_timeout: float = 30.0
    graceful_timeout: float = 30.0
    # limits
    max_pdu: int = 1024 * 1024
    max_associations: int = 0
    max_associations_per_ae: int = 0
    max_async_ops: int = 1
    #: bytes of data sets held in memory by one worker, all associations together
    max_dataset_memory: int = 256 * 1024 * 1024
    # who may associate and what they may send
    require_called_ae: bool = False
    calling_aes: list[str] = field(default_factory=list)
    #: peer addresses or networks, checked by the acceptor; deny wins
    allow_ip: list[str] = field(default_factory=list)
    deny_ip: list[str] = field(default_factory=list)
    #: the [ae-sources] table: calling AE title -> addresses/networks it may use
    ae_sources: dict[str, list[str]] = field(default_factory=dict)
    sop_classes: list[str] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)
    # user handlers: "EVT_NAME=package.module:function"
    handlers: list[str] = field(default_factory=list)
    log_level: str = "INFO"
    log_format: str = "text"
    config: str | None = None
    backlog: int = 4096
    # DICOM TLS (workers/tls.py): on when tls_cert is set
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_verify_client: bool = False
    tls_profile: str = "bcp195"
    tls_handshake_timeout: float = 10.0
    #: one log line per stored instance: "info", "debug" or "off"
    log_instances: str = "off"
    #: DICOM audit messages (PS3.15 A.5) as syslog: udp://, tcp:// or tls://host:port
    audit_syslog: str | None = None
    #: tls://: CA bundle for the collector's certificate; our client certificate/key
    audit_tls_ca: str | None = None
    audit_tls_cert: str | None = None
    audit_tls_key: str | None = None
    #: AuditSourceID (default "<ae-title>@<host name>") and AuditEnterpriseSiteID
    audit_source_id: str | None = None
    audit_site_id: str | None = None
    #: audit messages waiting for the collector, per process; more are dropped
    audit_queue: int = 1000
    #: the [identity] table of the config file (user identity policy), as read
    identity: dict[str, Any] | None = None
    #: the instance index: "sqlite" (embedded, under --storage), "sqlite:///path",
    #: "postgresql://..." (shared by several receivers) or "off"
    index: str = "sqlite"
    #: this receiver's name in a shared index (default: the host name)
    index_node: str = ""
    #: directory relative paths in the config file are resolved against
    config_dir: str | None = None
    #: C-FIND / C-GET / C-MOVE SCP over the instance index (off: a receiver receives)
    query_retrieve: bool = False
    #: the [remote-aes] table: AE title -> { host, port } (commitment reports, C-MOVE)
    remote_aes: dict[str, Any] = field(default_factory=dict)
    #: most Referenced SOP Sequence items a storage commitment request may carry
    commitment_max_references: int = 10_000
    #: seconds before a storage commitment report is sent again (doubling, to 300 s)
    commitment_retry: float = 5.0
    # object storage (--storage s3://bucket/prefix; workers/storage/objectstore.py)
    #: endpoint URL; empty: AWS_ENDPOINT_URL or AWS itself
    s3_endpoint: str = ""
    #: region; empty: AWS_REGION / AWS_DEFAULT_REGION / the AWS config file
    s3_region: str = ""
    #: "direct": Success once the object store has the object; "spool": once the
    #: instance is fsynced in --s3-spool (uploaded in the background)
    s3_durability: str = "direct"
    s3_part_size: int = 8 * 1024 * 1024
    #: spool bytes beyond which new instances get 0xA700 (0: no limit)
    s3_spool_limit: int = 0
    #: local directory with S3: the spool, the embedded index, handler temp files
    s3_spool: str = "./dicom-spool"
    # behind a load balancer (receiver/proxy_gate.py)
    #: balancers' addresses/networks whose connections start with a PROXY header
    proxy_protocol_from: list[str] = field(default_factory=list)
    #: seconds between SIGTERM (readiness 503) and closing the listener
    drain_delay: float = 0.0

    def check(self) -> None:
        """Raise :class:`ConfigError` for the first value that cannot be used."""
        _check_ae("ae-title", self.ae_title)
        for ae in self.calling_aes:
            _check_ae("calling-aes", ae)
        self.access_policy()  # raises ConfigError on a bad address or network
        try:
            parse_networks(self.proxy_protocol_from)
        except ValueError as exc:
            raise ConfigError(f"--proxy-protocol-from: {exc}") from None
        if not 0 <= self.drain_delay <= 3600:
            raise ConfigError(f"--drain-delay: {self.drain_delay} is not 0..3600 seconds")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if not self.host or any(c.isspace() for c in self.host):
                raise ConfigError(f"--host: {self.host!r} is not an address or host name") from None
        _check_port("port", self.port, allow_zero=True)
        _check_port("metrics-port", self.metrics_port, allow_zero=True)
        if self.workers < 1 or self.workers > 256:
            raise ConfigError(f"--workers: {self.workers} is not between 1 and 256")
        if self.fsync not in ("always", "never"):
            raise ConfigError(f"--fsync: {self.fsync!r} is neither 'always' nor 'never'")
        if self.duplicates not in ("overwrite", "keep", "reject"):
            raise ConfigError(f"--duplicates: {self.duplicates!r} is not overwrite, keep or reject")
        for name in (
            "acse_timeout",
            "dimse_timeout",
            "network_timeout",
            "artim_timeout",
            "graceful_timeout",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: {value} is not a positive number of seconds"
                )
        if not 0 <= self.group_commit_wait <= 100:
            raise ConfigError(
                f"--group-commit-wait: {self.group_commit_wait} is not 0..100 milliseconds"
            )
        if self.max_pdu != 0 and not 4096 <= self.max_pdu <= 1 << 30:
            raise ConfigError(f"--max-pdu: {self.max_pdu} is not 0 (no limit) or 4096..{1 << 30}")
        for name in ("max_associations", "max_associations_per_ae", "min_receive_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be 0 (no limit) or more")
        if self.max_dataset_memory < 64 * 1024:
            raise ConfigError(
                f"--max-dataset-memory: {self.max_dataset_memory} is less than 65536 bytes"
            )
        if not 1 <= self.max_async_ops <= 65535:
            raise ConfigError(f"--max-async-ops: {self.max_async_ops} is not between 1 and 65535")
        from workers.storage.uids import is_valid_uid

        for uid in [*self.sop_classes, *self.transfer_syntaxes]:
            if not is_valid_uid(uid):
                raise ConfigError(f"--sop-classes/--transfer-syntaxes: {uid!r} is not a valid UID")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(
                f"--log-level: {self.log_level!r} is not DEBUG, INFO, WARNING or ERROR"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"--log-format: {self.log_format!r} is neither 'text' nor 'json'")
        if self.log_instances not in ("info", "debug", "off"):
            raise ConfigError(
                f"--log-instances: {self.log_instances!r} is not 'info', 'debug' or 'off'"
            )
        self._check_audit()
        self.s3_settings()  # ConfigError on a bad s3:// URL or S3 setting
        self._check_unused_s3_values()
        try:
            from workers.storage.config import DuplicatePolicy, FsyncPolicy, StorageConfig

            StorageConfig(
                root=self.local_storage(),
                layout=self.layout,
                # both checked against their Literal values above
                fsync=cast(FsyncPolicy, self.fsync),
                duplicates=cast(DuplicatePolicy, self.duplicates),
            )
        except ValueError as exc:
            raise ConfigError(f"--layout: {exc}") from None
        if self.identity is not None:
            from workers.identity import IdentityConfigError, IdentityPolicy

            try:
                IdentityPolicy.from_settings(self.identity_settings())
            except (IdentityConfigError, OSError) as exc:
                raise ConfigError(f"--config [identity]: {exc}") from None
        self._check_tls()
        from workers.remote_aes import parse_remote_aes

        try:
            parse_remote_aes(self.remote_aes)
        except ValueError as exc:
            raise ConfigError(f"--config [remote-aes]: {exc}") from None
        if not 1 <= self.commitment_max_references <= 1_000_000:
            raise ConfigError(
                f"--commitment-max-references: {self.commitment_max_references} is not "
                "between 1 and 1000000"
            )
        if self.query_retrieve and self.index == "off":
            raise ConfigError(
                "--query-retrieve: answers from the index, which --index off turns off"
            )
        if not self.commitment_retry > 0:
            raise ConfigError(
                f"--commitment-retry: {self.commitment_retry} is not a positive number of seconds"
            )
        if not (
            self.index in ("off", "sqlite")
            or self.index.startswith(("sqlite://", "postgresql://", "postgres://"))
        ):
            raise ConfigError(
                f"--index: {self.index!r} is not off, sqlite, sqlite:///PATH or postgresql://..."
            )
        if self.handlers:
            from workers.handlers import parse_bindings

            try:
                parse_bindings(self.handlers)
            except (ValueError, ImportError, AttributeError) as exc:
                # The usual cause: the module sits in a directory the command's
                # Python does not search (the current one is not on its path).
                hint = (
                    " (install it in the receiver's Python, or add its directory to PYTHONPATH)"
                    if isinstance(exc, ModuleNotFoundError)
                    else ""
                )
                raise ConfigError(f"--handler: {exc}{hint}") from None

    def access_policy(self) -> AccessPolicy:
        """--allow-ip, --deny-ip and [ae-sources], parsed; ConfigError if unusable."""
        for flag, values in (("allow-ip", self.allow_ip), ("deny-ip", self.deny_ip)):
            try:
                parse_networks(values)
            except ValueError as exc:
                raise ConfigError(f"--{flag}: {exc}") from None
        if not isinstance(self.ae_sources, dict):
            raise ConfigError("--config [ae-sources]: must be a table of AE title = [addresses]")
        for ae, nets in self.ae_sources.items():
            _check_ae("config [ae-sources]", str(ae))
            if isinstance(nets, str) or not isinstance(nets, list):
                raise ConfigError(
                    f"--config [ae-sources]: {ae}: {nets!r} is not a list of addresses"
                )
            try:
                parse_networks(nets)
            except ValueError as exc:
                raise ConfigError(f"--config [ae-sources]: {ae}: {exc}") from None
        return AccessPolicy.build(self.allow_ip, self.deny_ip, self.ae_sources)

    def _check_tls(self) -> None:
        from workers.tls import PROFILES

        if self.tls_profile not in PROFILES:
            raise ConfigError(
                f"--tls-profile: {self.tls_profile!r} is not one of {', '.join(PROFILES)}"
            )
        if not self.tls_handshake_timeout > 0:
            raise ConfigError(
                f"--tls-handshake-timeout: {self.tls_handshake_timeout} is not a positive "
                "number of seconds"
            )
        if not self.tls_cert:
            for flag, value in (
                ("tls-key", self.tls_key),
                ("tls-ca", self.tls_ca),
                ("tls-verify-client", self.tls_verify_client),
            ):
                if value:
                    raise ConfigError(f"--{flag}: needs --tls-cert (and --tls-key)")
            return
        if self.tls_verify_client and not self.tls_ca:
            raise ConfigError("--tls-verify-client: needs --tls-ca, the CA bundle to verify with")
        for flag, path in (
            ("tls-cert", self.tls_cert),
            ("tls-key", self.tls_key or self.tls_cert),
            ("tls-ca", self.tls_ca),
        ):
            if path and not os.path.isfile(path):
                raise ConfigError(f"--{flag}: {path}: no such file")
        from workers.tls import server_context

        try:
            server_context(self.tls_settings())
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise ConfigError(
                f"--tls-cert/--tls-key/--tls-ca: cannot load {self.tls_cert}: {reason}"
            ) from None

    def _check_audit(self) -> None:
        if not self.audit_syslog:
            for flag in ("audit_tls_ca", "audit_tls_cert", "audit_tls_key"):
                if getattr(self, flag):
                    raise ConfigError(f"--{flag.replace('_', '-')}: needs --audit-syslog")
            return
        from workers.audit import parse_url

        try:
            scheme, _host, _port = parse_url(self.audit_syslog)
        except ValueError as exc:
            raise ConfigError(f"--audit-syslog: {exc}") from None
        if scheme != "tls" and (self.audit_tls_ca or self.audit_tls_cert or self.audit_tls_key):
            raise ConfigError("--audit-tls-ca/--audit-tls-cert/--audit-tls-key: need tls://")
        for flag in ("audit_tls_ca", "audit_tls_cert", "audit_tls_key"):
            path = getattr(self, flag)
            if path and not os.path.isfile(path):
                raise ConfigError(f"--{flag.replace('_', '-')}: {path}: no such file")
        if self.audit_tls_key and not self.audit_tls_cert:
            raise ConfigError("--audit-tls-key: needs --audit-tls-cert")
        if not 1 <= self.audit_queue <= 1_000_000:
            raise ConfigError(f"--audit-queue: {self.audit_queue} is not between 1 and 1000000")

    def audit_settings(self) -> Any:
        """workers.audit.AuditSettings (absolute paths), or None without --audit-syslog."""
        if not self.audit_syslog:
            return None
        from workers.audit import AuditSettings

        def path(value: str | None) -> str | None:
            return os.path.abspath(value) if value else None

        return AuditSettings(
            url=self.audit_syslog,
            ca=path(self.audit_tls_ca),
            cert=path(self.audit_tls_cert),
            key=path(self.audit_tls_key),
            source_id=self.audit_source_id or "",
            site_id=self.audit_site_id or "",
            queue_size=self.audit_queue,
        )

    def tls_settings(self) -> Any:
        """workers.tls.TlsSettings (absolute paths), or None without --tls-cert."""
        if not self.tls_cert:
            return None
        from workers.tls import TlsSettings

        return TlsSettings(
            cert=os.path.abspath(self.tls_cert),
            key=os.path.abspath(self.tls_key or self.tls_cert),
            ca=os.path.abspath(self.tls_ca) if self.tls_ca else None,
            verify_client=self.tls_verify_client,
            profile=self.tls_profile,
            handshake_timeout=self.tls_handshake_timeout,
        )

    def identity_settings(self) -> Any:
        """The [identity] table as workers.identity.IdentitySettings (None if absent)."""
        if self.identity is None:
            return None
        from workers.identity import IdentitySettings

        return IdentitySettings.from_mapping(self.identity, base_dir=self.config_dir)

    def local_storage(self) -> str:
        """The local directory: --storage, or --s3-spool when --storage is s3://."""
        return os.path.abspath(self.s3_spool if self.storage.startswith("s3://") else self.storage)

    def s3_settings(self) -> Any:
        """workers.storage.objectstore.S3Settings, or None when storing locally."""
        if not self.storage.startswith("s3://"):
            return None
        from workers.storage.objectstore import S3Settings

        try:
            return S3Settings.from_url(
                self.storage,
                durability=self.s3_durability,  # checked by S3Settings
                endpoint=self.s3_endpoint or None,
                region=self.s3_region or None,
                part_size=self.s3_part_size,
                spool_limit=self.s3_spool_limit,
            )
        except ValueError as exc:
            raise ConfigError(f"--storage/--s3-*: {exc}") from None

    def _check_unused_s3_values(self) -> None:
        """With a local --storage the --s3-* values are not used, but one no S3 store
        could take (``--s3-durability fast``) is still a typo: refuse it now rather
        than on the day --storage becomes s3://."""
        if self.storage.startswith("s3://"):
            return  # s3_settings() checked them
        from workers.storage.objectstore import S3Settings

        try:
            S3Settings(
                bucket="unused",
                durability=self.s3_durability,  # type: ignore[arg-type]  # checked here
                part_size=self.s3_part_size,
                spool_limit=self.s3_spool_limit,
            )
        except ValueError as exc:
            raise ConfigError(f"--s3-*: {exc}") from None

    def index_target(self) -> str | None:
        """What ``workers.index.open_index`` takes; None with ``--index off``."""
        if self.index == "off":
            return None
        return "" if self.index == "sqlite" else self.index

    def index_node_name(self) -> str:
        """--index-node, or the host name for a shared (PostgreSQL) index; the
        embedded index has one store, and its rows no node name (so that renaming
        the host does not orphan them)."""
        if self.index_node:
            return self.index_node
        if self.index.startswith(("postgresql://", "postgres://")):
            import socket

            return socket.gethostname()
        return ""

    def syntaxes(self) -> dict[str, tuple[str, ...]]:
        """The acceptor's abstract -> transfer syntax policy."""
        transfer = tuple(self.transfer_syntaxes) or (acse.ANY,)
        if not self.sop_classes:
            return {acse.ANY: transfer}
        # Verification is always accepted so that echo works whatever the policy.
        return {uid: transfer for uid in [*self.sop_classes, "1.2.840.10008.1.1"]}


def _check_ae(flag: str, value: str) -> None:
    if not value or len(value) > 16 or value != value.strip() or "\\" in value:
        raise ConfigError(f"--{flag}: {value!r} is not an AE title (1-16 characters, no backslash)")
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ConfigError(f"--{flag}: {value!r} has characters outside printable ASCII")


def _check_port(flag: str, value: int, allow_zero: bool) -> None:
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise ConfigError(f"--{flag}: {value} is not a TCP port")


_FIELDS = {f.name: f for f in fields(ReceiverConfig)}


class FileSettings(dict[str, Any]):
    """Settings read from a config file: field name -> value, plus where they came
    from (``path``, and the key as written for each field) so that an error about
    one of them names the file and the key."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.key_names: dict[str, str] = {}


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    for kind, name in names.items():
        if type(value) is kind:
            return name
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _check_file_value(name: str, value: Any) -> str | None:
    """Why ``value`` (as TOML typed it) cannot be the setting ``name``, or None.

    The file is checked by type, not coerced: ``port = "11112"`` is a mistake the
    user should hear about (a quoted number hides a typo just as well as a flag
    value does), not something to guess around."""
    default = getattr(ReceiverConfig(), name) if name != "workers" else 1
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "a boolean (true or false)"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        expected = "a number"
    elif isinstance(default, list):
        # An array of strings; a string is the flag's comma-separated form.
        ok = isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        )
        expected = "an array of strings"
    else:  # str, or a str that may be absent (tls-cert ...)
        ok, expected = isinstance(value, str), "a string"
    if ok:
        return None
    return f"{value!r} is {_toml_type(value)}, not {expected}"


def load_toml(path: str) -> FileSettings:
    """Read a TOML config file into field-name -> value; every value is checked for
    its type here (ConfigError naming the file and the key)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    section = data.get("receiver", data)
    if not isinstance(section, dict):
        raise ConfigError(f"--config: {path}: receiver: must be a table")
    out = FileSettings(path)
    out["config_dir"] = os.path.dirname(os.path.abspath(path))
    ae_sources = data.get("ae-sources", section.get("ae-sources"))
    if ae_sources is not None:
        if not isinstance(ae_sources, dict):
            raise ConfigError(f"--config: {path}: [ae-sources] must be a table")
        out["ae_sources"] = ae_sources
    remote_aes = data.get("remote-aes", section.get("remote-aes"))
    if remote_aes is not None:
        if not isinstance(remote_aes, dict):
            raise ConfigError(f"--config: {path}: [remote-aes] must be a table")
        out["remote_aes"] = remote_aes
    identity = data.get("identity", section.get("identity"))
    if identity is not None:
        if not isinstance(identity, dict):
            raise ConfigError(f"--config: {path}: [identity] must be a table")
        out["identity"] = identity
    for key, value in section.items():
        if key in ("receiver", "identity", "ae-sources", "remote-aes") and isinstance(value, dict):
            continue
        name = key.replace("-", "_")
        if name not in _FIELDS or name in ("config", "config_dir"):
            raise ConfigError(f"--config: {path}: unknown setting {key!r}")
        if name in ("identity", "ae_sources", "remote_aes"):
            raise ConfigError(f"--config: {path}: {key}: must be a table")
        problem = _check_file_value(name, value)
        if problem is not None:
            raise ConfigError(f"--config: {path}: {key}: {problem}")
        if name in (
            "tls_cert",
            "tls_key",
            "tls_ca",
            "audit_tls_ca",
            "audit_tls_cert",
            "audit_tls_key",
        ) and isinstance(value, str):
            value = os.path.join(out["config_dir"], value)  # relative to the file
        out[name] = value
        out.key_names[name] = key
    return out


#: "--max-pdu: ..." -> "max-pdu": the setting a ConfigError message is about
_FLAG_OF_MESSAGE = re.compile(r"--([a-z][a-z-]*)(?=[:/ ])")


def _in_file_terms(exc: ConfigError, file_values: dict[str, Any], flags: dict[str, Any]) -> str:
    """Rephrase a check's error about a value that came from the config file (and
    not from a flag) so that it names the file and the key as written there."""
    message = str(exc)
    path = getattr(file_values, "path", None)
    keys: dict[str, str] = getattr(file_values, "key_names", {})
    match = _FLAG_OF_MESSAGE.match(message)
    if path is None or match is None:
        return message
    flag = match.group(1)
    rest = message[match.end() :].lstrip(":/ ")
    if flag == "config" and rest.startswith("["):  # "--config [identity]: ..."
        return f"--config: {path}: {rest}"
    name = flag.replace("-", "_")
    if name in keys and name not in flags:
        return f"--config: {path}: {keys[name]}: {message[match.end() :].lstrip(': ')}"
    return message


def build(file_values: dict[str, Any], flag_values: dict[str, Any]) -> ReceiverConfig:
    """Defaults, then the file, then the flags that were given; checked."""
    cfg = ReceiverConfig()
    for source in (file_values, flag_values):
        for name, value in source.items():
            if value is None:
                continue
            default = getattr(cfg, name)
            try:
                value = _coerce(default, value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"--{name.replace('_', '-')}: {value!r} is not a valid value"
                ) from None
            setattr(cfg, name, value)
    try:
        cfg.check()
    except ConfigError as exc:
        raise ConfigError(_in_file_terms(exc, file_values, flag_values)) from None
    return cfg


def _coerce(default: Any, value: Any) -> Any:
    if isinstance(value, dict):  # a table ([identity], [ae-sources]) is kept as it is
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise TypeError(value)
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool):
            raise TypeError(value)
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, list):
        if isinstance(value, str):
            return [v for v in (x.strip() for x in value.split(",")) if v]
        return [str(v) for v in value]
    return value if value is None else str(value)
