"""The S3 side that needs no instance: settings from ``--storage s3://bucket/prefix``
and the ``--s3-*`` options, the boto3 client (endpoint, region and credentials as
boto3 finds them), the start-up check of the bucket, and reading boto3's errors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

log = logging.getLogger("workers.storage.objectstore")

MIN_PART_SIZE = 5 * 1024 * 1024  # S3: every part but the last is at least 5 MiB
DEFAULT_PART_SIZE = 8 * 1024 * 1024
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
Durability = Literal["direct", "spool"]


@dataclass(slots=True, frozen=True)
class S3Settings:
    """Where and how instances go to the object store (``--storage s3://...``)."""

    bucket: str
    #: key prefix: "" or ending with "/"
    prefix: str = ""
    durability: Durability = "direct"
    #: endpoint URL (``--s3-endpoint``); None: AWS_ENDPOINT_URL or AWS itself
    endpoint: str | None = None
    #: region; None: AWS_REGION / AWS_DEFAULT_REGION / ~/.aws/config
    region: str | None = None
    part_size: int = DEFAULT_PART_SIZE
    #: spool bytes (all workers together) beyond which new instances get 0xA700; 0: none
    spool_limit: int = 0
    #: upload threads per worker
    upload_threads: int = 4
    #: longest pause between two attempts of a spooled upload, seconds
    retry_max: float = 30.0

    def __post_init__(self) -> None:
        if not _BUCKET.match(self.bucket):
            raise ValueError(f"{self.bucket!r} is not an S3 bucket name")
        if self.durability not in ("direct", "spool"):
            raise ValueError(f"durability {self.durability!r} is neither direct nor spool")
        if not MIN_PART_SIZE <= self.part_size <= 5 * 1024**3:
            raise ValueError(f"part size {self.part_size} is not between 5 MiB and 5 GiB")
        if self.spool_limit < 0 or self.upload_threads < 1:
            raise ValueError("spool limit and upload threads must be positive")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Settings:
        """``s3://bucket/prefix`` plus the other settings."""
        if not url.startswith("s3://"):
            raise ValueError(f"{url!r} is not s3://bucket/prefix")
        bucket, _, prefix = url[5:].partition("/")
        prefix = prefix.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise ValueError(f"prefix {prefix!r} has an empty, '.' or '..' component")
        return cls(bucket=bucket, prefix=prefix + "/" if prefix else "", **kwargs)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_client(settings: S3Settings) -> Any:
    """A boto3 S3 client: endpoint, region and credentials as boto3 finds them (the
    usual AWS environment variables and files) unless given. Short timeouts and few
    retries: a failure is answered (direct) or retried later (spool), not waited on."""
    import boto3
    from botocore.config import Config

    # boto3's INFO lines ("Found credentials in ...") are noise in a receiver's log.
    for name in ("boto3", "botocore", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)

    config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=max(10, settings.upload_threads * 2 + 8),
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint or None, region_name=settings.region, config=config
    )


def check_bucket(settings: S3Settings, client: Any = None) -> str | None:
    """None when the bucket answers HEAD, else why not (one line)."""
    try:
        client = client or make_client(settings)
        client.head_bucket(Bucket=settings.bucket)
    except Exception as exc:  # botocore's errors, and no credentials, and bad URLs
        return f"bucket {settings.bucket!r} unusable: {_describe(exc)}"
    return None


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{code} {error.get('Message') or ''}".strip()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code") or "")
    return ""


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0
