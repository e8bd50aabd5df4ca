"""Start-up repair of the index when the store is an S3 bucket (``--storage s3://``).

An instance is acknowledged once its object is in the bucket (``direct``) or its file
is fsynced in the spool (``spool``); its index record follows a batch later from the
worker's writer thread. A node killed in between leaves instances without records,
and the local reconcile (:mod:`.reconcile`) cannot see them: the store is the bucket,
and in ``spool`` mode a file may already be uploaded and gone. So, once before the
workers start, :func:`reconcile_object_store`:

1. lists the objects under the prefix (one LIST per 1000 keys) and walks the spool
   (files not uploaded yet; their object URL is the one they will have);
2. then reads the index paths under ``s3://bucket/prefix`` of *every* node: the bucket
   is shared, and a record another node wrote is a record. Reading after listing
   means an instance a live node acknowledged while we listed is already known
   (its writer commits within milliseconds), not taken over;
3. indexes each object or spooled file that has no record (from the spooled file, or
   a download into a temporary file beside the spool), under this node, never
   replacing a record that appeared meanwhile.

Nothing is marked missing here: objects are not deleted by the receiver, and a LIST
that failed half-way must not turn into "missing" marks. When the bucket does not
answer (``spool`` mode starts with the store down) the spool is still reconciled and
the bucket is left for the next start. Cost when nothing was lost: the LIST and one
query, no object read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any

from .base import Index
from .reconcile import ReconcileReport, _walk, record_from_file
from .record import IndexRecord

__all__ = ["reconcile_object_store"]

log = logging.getLogger("workers.index")

_BATCH = 500


def reconcile_object_store(
    index: Index, settings: Any, spool_root: str, *, client: Any = None
) -> ReconcileReport:
    """Index the instances under ``settings`` (an S3Settings: bucket and prefix) and
    in ``spool_root`` that no node's record names; see the module docstring."""
    started = time.monotonic()
    report = ReconcileReport()
    base_url = f"s3://{settings.bucket}/{settings.prefix}"
    spooled = {base_url + rel: rel for rel, _ in _walk(spool_root)}
    objects: dict[str, tuple[str, float]] = {}
    try:
        if client is None:
            from workers.storage.objectstore import make_client

            client = make_client(settings)
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=settings.bucket, Prefix=settings.prefix
        ):
            for item in page.get("Contents", []):
                key = str(item["Key"])
                objects[f"s3://{settings.bucket}/{key}"] = (key, item["LastModified"].timestamp())
    except Exception as exc:  # botocore's errors: the bucket is checked next start
        log.warning("reconcile: cannot list %s (the spool only): %s", base_url, exc)
    known = index.paths_under(base_url)
    report.files = len(objects) + len(spooled)
    batch: list[IndexRecord] = []

    def add(record: IndexRecord | None) -> None:
        nonlocal batch
        if record is None:
            report.unreadable += 1
            return
        batch.append(record)
        if len(batch) >= _BATCH:
            report.indexed += index.add_many(batch, replace=False)
            batch = []

    for url, rel in spooled.items():
        if url not in known:
            add(_at(record_from_file(spool_root, rel, node=index.node), url))
    lost = [url for url in objects if url not in known and url not in spooled]
    if lost:
        # A dot directory: the spool walks (uploader, reconcile, sweep) skip it.
        with tempfile.TemporaryDirectory(prefix=".reconcile-", dir=spool_root) as tmp:
            for url in lost:
                key, modified = objects[url]
                try:
                    client.download_file(settings.bucket, key, os.path.join(tmp, "object"))
                except Exception as exc:
                    log.warning("reconcile: cannot read %s: %s", url, exc)
                    report.unreadable += 1
                    continue
                record = record_from_file(tmp, "object", node=index.node)
                add(_at(record, url, modified))
    if batch:
        report.indexed += index.add_many(batch, replace=False)
    report.seconds = time.monotonic() - started
    return report


def _at(record: IndexRecord | None, url: str, modified: float | None = None) -> IndexRecord | None:
    """``record`` under its object URL (and the object's time, when known)."""
    if record is None:
        return None
    if modified is None:
        return dataclasses.replace(record, path=url)
    return dataclasses.replace(record, path=url, received_at=modified)
