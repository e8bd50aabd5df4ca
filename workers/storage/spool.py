"""The ``spool`` durability mode's background uploader (``--s3-durability spool``).

An instance answered Success in ``spool`` mode is a complete, fsynced file under the
spool directory (the local :class:`~.store.Store`'s work: temp file, fsync, atomic
rename), named by the layout. :class:`SpoolUploader` sends such files to the object
store under ``prefix + the same relative path`` and removes each one once the store
answered 200; a failed attempt is retried, the pauses doubling up to
``retry_max``. Nothing is lost by a crash: the file stays until it is uploaded, and
the worker that drains (worker 0) walks the spool at start-up and, while idle, every
minute (files of a worker that was killed before uploading them).

Two workers may upload the same file (the drainer's walk finds a file its owner is
still uploading): the object is the same bytes under the same key, so that is only
wasted work. A file is removed after its upload only if it is still the inode that
was uploaded: an ``overwrite`` that replaced it meanwhile is uploaded again, not lost.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any

__all__ = ["SpoolUploader"]

log = logging.getLogger(__name__)

_RESCAN_SECONDS = 60.0


class SpoolUploader:
    """Uploads spooled instances in background threads; counts the backlog."""

    def __init__(self, root: str, settings: Any, client: Any, *, threads: int = 2) -> None:
        self.root = os.fspath(root)
        self.settings = settings
        self.client = client
        self._threads = max(1, min(threads, settings.upload_threads))
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[str, str, int]] = collections.deque()
        self._queued: set[str] = set()
        self._stop = False
        self._drain = False
        self._pause_until = 0.0
        self._delay = 0.0
        self._workers: list[threading.Thread] = []
        #: instances and bytes spooled, not yet uploaded (this worker's queue)
        self.backlog_instances = 0
        self.backlog_bytes = 0
        #: totals since start
        self.uploaded = 0
        self.failures = 0

    def start(self, *, drain: bool = False) -> None:
        """Start the upload threads; ``drain``: also walk the spool for older files."""
        self._drain = drain
        for n in range(self._threads):
            thread = threading.Thread(target=self._run, name=f"spool-upload-{n}", daemon=True)
            thread.start()
            self._workers.append(thread)
        if drain:
            threading.Thread(target=self.rescan, name="spool-scan", daemon=True).start()

    def submit(self, path: str, key: str) -> None:
        """Queue a spooled file (any thread)."""
        try:
            size = os.stat(path).st_size
        except OSError:
            return
        with self._cond:
            if path in self._queued:
                return
            self._queued.add(path)
            self._queue.append((path, key, size))
            self.backlog_instances += 1
            self.backlog_bytes += size
            self._cond.notify()

    def rescan(self, min_age: float = 0.0) -> int:
        """Queue every instance file under the spool (dot entries skipped: the temp
        directory, the index); returns how many were queued."""
        found = 0
        now = time.time()
        prefix = self.settings.prefix
        stack = [self.root]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    if min_age and now - entry.stat(follow_symlinks=False).st_mtime < min_age:
                        continue
                except OSError:
                    continue
                rel = os.path.relpath(entry.path, self.root).replace(os.sep, "/")
                self.submit(entry.path, prefix + rel)
                found += 1
        if found:
            log.info("spool: %d instance(s) to upload from %s", found, self.root)
        return found

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads (what is not uploaded stays in the spool)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- threads -----------------------------------------------------------------------

    def _run(self) -> None:
        last_scan = time.monotonic()
        while True:
            with self._cond:
                while not self._stop:
                    wait = self._pause_until - time.monotonic()
                    if self._queue and wait <= 0:
                        break
                    if self._drain and not self._queue and wait <= 0:
                        idle = _RESCAN_SECONDS - (time.monotonic() - last_scan)
                        if idle <= 0:
                            break
                        wait = idle
                    self._cond.wait(wait if wait > 0 else None)
                if self._stop:
                    return
                item = self._queue.popleft() if self._queue else None
            if item is None:
                last_scan = time.monotonic()
                self.rescan(min_age=_RESCAN_SECONDS)
                continue
            ok = self._upload(*item)
            with self._cond:
                if ok:
                    self._queued.discard(item[0])
                    self.backlog_instances -= 1
                    self.backlog_bytes -= item[2]
                    self.uploaded += 1
                    self._delay = 0.0
                else:
                    self.failures += 1
                    self._queue.appendleft(item)
                    self._delay = min(self.settings.retry_max, max(0.25, self._delay * 2))
                    self._pause_until = time.monotonic() + self._delay
                    self._cond.notify_all()

    def _upload(self, path: str, key: str, size: int) -> bool:
        """One attempt; True when the file is uploaded (or gone: nothing to do)."""
        from boto3.s3.transfer import TransferConfig

        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below, after the stat check
        except FileNotFoundError:
            return True  # uploaded and removed by another worker's thread
        except OSError as exc:
            log.warning("spool: cannot read %s: %s", path, exc)
            return False
        try:
            before = os.fstat(fh.fileno())
            part = self.settings.part_size
            self.client.upload_fileobj(
                fh,
                self.settings.bucket,
                key,
                ExtraArgs={"ContentType": "application/dicom"},
                Config=TransferConfig(
                    multipart_threshold=part, multipart_chunksize=part, use_threads=False
                ),
            )
        except Exception as exc:
            log.warning("spool: upload of %s failed (will retry): %s", key, exc)
            return False
        finally:
            fh.close()
        try:
            now = os.stat(path)
            if (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("spool: could not remove uploaded %s: %s", path, exc)
        return True

    def snapshot(self) -> tuple[int, int, int, int]:
        """(backlog instances, backlog bytes, uploaded, failed attempts)."""
        with self._cond:
            return self.backlog_instances, self.backlog_bytes, self.uploaded, self.failures
