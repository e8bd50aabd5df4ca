"""``pacs-receiver`` (and ``python -m receiver``): the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from . import package_version
from .config import ConfigError, ReceiverConfig, build, load_toml

DESCRIPTION = """\
A multiprocess, high-throughput DICOM receiver (Storage SCP, Verification SCP, and
the services your handlers add). It accepts associations on --host:--port, hands each
connection to one of --workers worker processes, stores every instance under
--storage (answering Success only once the instance is on disk, fsynced when
--fsync is 'always'), and serves Prometheus metrics on --metrics-port.
"""

EPILOG = """\
Settings may also come from a TOML file (--config); flags override it. The file uses
the flag names, e.g.:

  port = 11112
  ae-title = "PACSRX"
  storage = "/var/lib/dicom"
  workers = 4
  handlers = ["EVT_C_ECHO=mypackage.hooks:on_echo"]
  allow-ip = ["10.0.0.0/8", "192.168.1.20"]

  [ae-sources]          # calling AE title -> addresses/networks it may connect from
  MODALITY = ["10.1.2.3", "10.1.3.0/24"]

Signals: SIGTERM/SIGINT stop gracefully (open associations get --graceful-timeout
seconds); SIGHUP re-reads --config and replaces the workers without dropping open
associations.

Example: storescu 127.0.0.1 11112 image.dcm
  -> STORAGE/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _version() -> str:
    """``pacs-receiver X.Y.Z (data plane: compiled|pure)``: which core runs."""
    from workers import dataplane

    return f"pacs-receiver {package_version()} (data plane: {dataplane.CORE})"


def make_parser() -> argparse.ArgumentParser:
    d = ReceiverConfig()
    ap = _Parser(
        prog="pacs-receiver",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    ap.add_argument(
        "--version", action="version", version=_version(), help="print the version and exit"
    )
    g = ap.add_argument_group("network")
    g.add_argument("--host", help=f"address to listen on (default {d.host})")
    g.add_argument("--port", type=int, help=f"TCP port to listen on (default {d.port})")
    g.add_argument("--ae-title", help=f"our AE title (default {d.ae_title})")
    g.add_argument(
        "--max-pdu",
        type=int,
        help=f"Maximum PDU length we receive, bytes; 0 = no limit (default {d.max_pdu})",
    )
    g.add_argument("--backlog", type=int, help=f"listen backlog (default {d.backlog})")

    g = ap.add_argument_group("storage")
    g.add_argument("--storage", help=f"directory to store instances in (default {d.storage})")
    g.add_argument(
        "--fsync",
        help="'always' (default): Success only once the instance is on stable storage; "
        "'never': once renamed into place",
    )
    g.add_argument(
        "--duplicates",
        help="same SOP Instance UID again: 'overwrite' (default), 'keep' the first "
        "(answering Success), or 'reject' (0x0111)",
    )
    g.add_argument("--layout", help=f"path template under --storage (default {d.layout})")
    g.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="with --storage s3://BUCKET/PREFIX: the S3 API endpoint (default: "
        "AWS_ENDPOINT_URL, else AWS); region and credentials come from the AWS "
        "environment and config files",
    )
    g.add_argument("--s3-region", help="S3 region (default: AWS_REGION / AWS config)")
    g.add_argument(
        "--s3-durability",
        metavar="direct|spool",
        help="'direct' (default): Success once the object store confirmed the upload; "
        "'spool': once fsynced in --s3-spool, uploaded in the background",
    )
    g.add_argument(
        "--s3-part-size", type=int, help="multipart upload part size, bytes (default 8 MiB)"
    )
    g.add_argument(
        "--s3-spool-limit",
        type=int,
        help="spooled bytes not yet uploaded beyond which new instances get 0xA700 "
        "(default 0: no limit)",
    )
    g.add_argument(
        "--s3-spool",
        metavar="DIR",
        help=f"local directory with S3 storage: spool, embedded index (default {d.s3_spool})",
    )
    g.add_argument(
        "--index",
        metavar="off|sqlite|sqlite:///PATH|postgresql://...",
        help="the index of received instances: 'sqlite' (default: STORAGE/.index/index.db), "
        "a PostgreSQL URL shared by several receivers, or 'off'",
    )
    g.add_argument(
        "--index-node",
        metavar="NAME",
        help="this receiver's name in a shared index (default: the host name)",
    )
    g.add_argument(
        "--group-commit-wait",
        type=float,
        metavar="MS",
        help="with --fsync always, the longest a commit waits for instances still "
        "arriving to share its flushes; never when it is alone; 0 = only those already "
        f"waiting (default {d.group_commit_wait:g})",
    )

    g = ap.add_argument_group("processes")
    g.add_argument("--workers", type=int, help="worker processes (default: number of CPUs)")
    g.add_argument(
        "--metrics-port",
        type=int,
        help=f"Prometheus /metrics port; 0 disables (default {d.metrics_port})",
    )
    g.add_argument(
        "--metrics-host", help=f"address of the metrics endpoint (default {d.metrics_host})"
    )
    g.add_argument(
        "--metrics-optional",
        action="store_true",
        default=None,
        help="if the metrics port cannot be bound at start-up, run without metrics "
        "(with a warning) instead of stopping with exit status 2",
    )
    g.add_argument(
        "--drain-delay",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, report not-ready on /readyz and keep accepting this long "
        "before the listener closes, so that a load balancer stops sending first "
        f"(default {d.drain_delay:g})",
    )
    g.add_argument(
        "--graceful-timeout",
        type=float,
        help=f"seconds open associations get on stop (default {d.graceful_timeout:g})",
    )

    g = ap.add_argument_group("timeouts (seconds)")
    g.add_argument(
        "--acse-timeout",
        type=float,
        help=f"answer to an association request (default {d.acse_timeout:g})",
    )
    g.add_argument(
        "--dimse-timeout",
        type=float,
        help=f"a handler answering a DIMSE request (default {d.dimse_timeout:g})",
    )
    g.add_argument(
        "--network-timeout",
        type=float,
        help=f"no data from an associated peer: abort (default {d.network_timeout:g})",
    )
    g.add_argument(
        "--min-receive-rate",
        type=int,
        metavar="BYTES",
        help="in the middle of a PDU or message, fewer bytes a second than this over "
        f"--network-timeout seconds: abort; 0 = no minimum (default {d.min_receive_rate})",
    )
    g.add_argument(
        "--artim-timeout",
        type=float,
        help="waiting for the A-ASSOCIATE-RQ, or for the peer to close "
        f"(default {d.artim_timeout:g})",
    )

    g = ap.add_argument_group("who may associate, and what they may send")
    g.add_argument(
        "--max-associations",
        type=int,
        help="associations open at once, all workers; 0 = no limit (default 0)",
    )
    g.add_argument(
        "--max-associations-per-ae",
        type=int,
        help="associations open at once per calling AE title; 0 = no limit (default 0)",
    )
    g.add_argument(
        "--max-async-ops",
        type=int,
        help="largest asynchronous operations window granted (default 1)",
    )
    g.add_argument(
        "--max-dataset-memory",
        type=int,
        metavar="BYTES",
        help="data sets held in memory by one worker, all associations together "
        "(C-FIND identifiers, N-* lists; C-STORE data sets go to files); the "
        f"association that would pass it is aborted (default {d.max_dataset_memory})",
    )
    g.add_argument(
        "--require-called-ae",
        action="store_true",
        default=None,
        help="reject associations not addressed to --ae-title",
    )
    g.add_argument("--calling-aes", help="comma-separated calling AE titles allowed (default: any)")
    g.add_argument(
        "--allow-ip",
        metavar="ADDRESSES",
        help="comma-separated addresses or CIDR networks (IPv4/IPv6) that may connect; "
        "any other peer is refused with A-ASSOCIATE-RJ (default: any)",
    )
    g.add_argument(
        "--deny-ip",
        metavar="ADDRESSES",
        help="comma-separated addresses or CIDR networks refused with A-ASSOCIATE-RJ; "
        "wins over --allow-ip. Per calling AE source addresses: [ae-sources] in --config",
    )
    g.add_argument(
        "--proxy-protocol-from",
        metavar="CIDR[,CIDR...]",
        help="load balancers (addresses or networks) whose connections MUST start with a "
        "PROXY protocol v1/v2 header; its client address is then the peer address. "
        "A header from any other address is refused (default: none)",
    )
    g.add_argument(
        "--sop-classes",
        help="comma-separated SOP Class UIDs accepted (default: any; Verification always)",
    )
    g.add_argument(
        "--transfer-syntaxes", help="comma-separated Transfer Syntax UIDs accepted (default: any)"
    )
    g.add_argument(
        "--handler",
        dest="handlers",
        action="append",
        metavar="EVT_NAME=MODULE:FUNCTION",
        help="bind a handler (repeatable), e.g. EVT_C_STORE=mypackage.hooks:on_store",
    )

    g = ap.add_argument_group(
        "DICOM TLS (PS3.15 secure transport; the handshake runs in the worker)"
    )
    g.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM); turns TLS on")
    g.add_argument(
        "--tls-key", metavar="FILE", help="private key of --tls-cert (PEM; default: --tls-cert)"
    )
    g.add_argument(
        "--tls-ca", metavar="FILE", help="CA bundle (PEM) client certificates are verified with"
    )
    g.add_argument(
        "--tls-verify-client",
        action="store_true",
        default=None,
        help="mutual TLS: refuse clients without a certificate --tls-ca vouches for",
    )
    g.add_argument(
        "--tls-profile",
        choices=("bcp195", "bcp195-nd", "bcp195-extended"),
        help="'bcp195' (default): TLS 1.2+, BCP 195 cipher suites; 'bcp195-nd': "
        "non-downgrading, TLS 1.2+ ECDHE/AEAD only; 'bcp195-extended': TLS 1.2 only, "
        "the ECDHE/DHE AES-GCM suites of PS3.15 B.11",
    )
    g.add_argument(
        "--tls-handshake-timeout",
        type=float,
        help=f"seconds a client gets to complete the handshake (default "
        f"{d.tls_handshake_timeout:g})",
    )

    g = ap.add_argument_group("storage commitment and query/retrieve (over the index)")
    g.add_argument(
        "--query-retrieve",
        action="store_const",
        const=True,
        help="answer C-FIND, C-GET and C-MOVE (Patient/Study Root) from the index "
        "(default off); C-MOVE destinations come from [remote-aes] in --config",
    )
    g.add_argument(
        "--commitment-max-references",
        type=int,
        metavar="N",
        help="most instances one storage commitment request may name "
        f"(default {d.commitment_max_references})",
    )
    g.add_argument(
        "--commitment-retry",
        type=float,
        metavar="SECONDS",
        help="first delay before an undelivered storage commitment report is sent "
        f"again, doubling up to 300 (default {d.commitment_retry:g})",
    )

    g = ap.add_argument_group("configuration and logs")
    g.add_argument("--config", help="TOML file with any of these settings; flags override it")
    g.add_argument("--log-level", help="DEBUG, INFO (default), WARNING or ERROR")
    g.add_argument("--log-format", help="'text' (default) or 'json' (one object per line)")
    g.add_argument(
        "--log-instances",
        help="one line per stored instance at level 'info', 'debug', or 'off' (default)",
    )

    g = ap.add_argument_group("audit trail (DICOM PS3.15 A.5 audit messages, IHE ATNA)")
    g.add_argument(
        "--audit-syslog",
        metavar="URL",
        help="send audit messages as RFC 5424 syslog to udp://HOST:PORT, tcp://HOST:PORT "
        "(RFC 6587 octet counting) or tls://HOST:PORT (RFC 5425); default: none",
    )
    g.add_argument(
        "--audit-tls-ca",
        metavar="FILE",
        help="CA bundle (PEM) the collector's certificate is checked with (default: the system's)",
    )
    g.add_argument(
        "--audit-tls-cert", metavar="FILE", help="client certificate (PEM) for the collector"
    )
    g.add_argument(
        "--audit-tls-key", metavar="FILE", help="key of --audit-tls-cert (default: in it)"
    )
    g.add_argument(
        "--audit-source-id", help="AuditSourceID of the messages (default AE-TITLE@HOSTNAME)"
    )
    g.add_argument("--audit-site-id", help="AuditEnterpriseSiteID (default: none)")
    g.add_argument(
        "--audit-queue",
        type=int,
        help="audit messages waiting for the collector, per process; more are dropped "
        "and counted (default 1000)",
    )
    return ap


def load(argv: list[str] | None) -> tuple[ReceiverConfig, Any]:
    """Parse flags and the config file; returns (config, reloader for SIGHUP)."""
    args = make_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None}

    def reload() -> ReceiverConfig:
        file_values = load_toml(flags["config"]) if flags.get("config") else {}
        return build(file_values, flags)

    return reload(), reload


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, reload = load(argv)
    except ConfigError as exc:
        print(f"pacs-receiver: error: {exc}", file=sys.stderr)
        return 2
    from workers.index import IndexUnavailable
    from workers.main import setup_logging

    from .supervisor import run

    setup_logging(cfg.log_level, cfg.log_format)
    from .preflight import StartError

    s3 = cfg.s3_settings()
    if s3 is not None:
        from workers.storage.objectstore import check_bucket

        problem = check_bucket(s3)
        if problem is not None and s3.durability == "direct":
            print(f"pacs-receiver: error: --storage {cfg.storage}: {problem}", file=sys.stderr)
            return 2
        if problem is not None:
            # spool: instances are accepted into the spool and uploaded once it answers
            logging.getLogger("receiver").warning(
                "%s; accepting into the spool %s until it answers", problem, cfg.local_storage()
            )
    try:
        return run(cfg, reload)
    except IndexUnavailable as exc:
        # One line: a driver's message may span several.
        print(f"pacs-receiver: error: --index: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"pacs-receiver: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
