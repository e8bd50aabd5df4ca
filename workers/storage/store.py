"""Streaming, atomic, crash-safe storage of received instances.

Theory of operation
-------------------
For each C-STORE the worker calls :meth:`Store.begin` with the command's UIDs, then
:meth:`InstanceWriter.write` once per data-set fragment (synchronously, from its event
loop), then :meth:`InstanceWriter.commit` (in a thread pool: it may block on fsync),
or :meth:`InstanceWriter.discard` if the association dies first.

1. ``begin`` validates the UIDs (:class:`~.uids.UnsafeUID` on failure: that is the one
   peer fault that raises, because no file should ever be named after a bad UID), then
   creates a temp file ``<root>/.incoming/<pid>-<n>.part`` with ``O_EXCL`` and writes
   the Part 10 header (:mod:`.filemeta`) into it.
2. ``write`` passes each fragment straight to ``os.write`` (looping on short writes;
   nothing is buffered in Python) and, until it is done, to a :class:`~.scanner.TagScanner`
   that picks the study/series UIDs out of the first bytes. An ``OSError`` is
   remembered, the temp file is removed at once (on ENOSPC that frees the space for
   the other associations) and later writes are no-ops.
3. ``commit`` fsyncs the file (policy), renders the layout into a relative path,
   creates missing directories (remembered in a cache so the hot path does not mkdir
   per instance), publishes the file atomically under its final name, fsyncs the
   directories whose entries changed (policy) and returns a :class:`StoreResult`.

The temp directory sits under the root so the final rename never crosses a
filesystem. A partial file therefore never appears under a final name: it is either
complete and renamed/linked there, or it stays in ``.incoming`` until removed (by the
failure path, or by :func:`sweep_incoming` after a worker was killed mid-write).

Duplicate policies (same final path already exists):

``overwrite``
    ``os.replace``: atomic, last writer wins. The default: a resend after a failure
    response must be able to replace whatever copy is there.
``keep`` / ``reject``
    ``os.link(temp, final)`` then unlink the temp: ``link`` fails with EEXIST if the
    name exists, so of two concurrent writers exactly one publishes. On filesystems
    without hard links (EPERM/ENOTSUP/EMLINK) it falls back to exists-then-rename,
    which is not race-free; documented, rare.

The C-STORE statuses a commit answers with are in :mod:`.instance` (:class:`StoreStatus`).

A failed commit leaves no temp file and no new final file, and the :class:`Store` keeps
working for the next instance. Two narrow exceptions, both complete files, never
partial ones: with ``overwrite``, a failed directory fsync leaves the (complete)
replacement in place for the SCU's retry to replace again; and if unlinking the temp
name fails after a successful ``link``, that second name stays in ``.incoming`` for
:func:`sweep_incoming`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from .config import UNKNOWN, FileOps, StorageConfig
from .instance import InstanceHead, StoreResult, StoreStatus, _is_valid_uid_cached, checked_uids
from .publish import DirectoryFds, link_exclusive, temp_name, unlink_quietly
from .scanner import ScanResult
from .uids import UnsafeUID, safe_path_component, sanitize_component

__all__ = [
    "InstanceWriter",
    "Store",
    "StoreResult",
    "StoreStatus",
]

log = logging.getLogger(__name__)


class _StageError(Exception):
    """Internal: an OSError tagged with the stage it happened in."""

    def __init__(self, stage: str, exc: OSError) -> None:
        super().__init__(stage, exc)
        self.stage = stage
        self.exc = exc


class Store:
    """Stores instances under ``config.root``; one per worker process, thread-safe.

    ``ops`` replaces the system calls (tests inject ENOSPC/EIO or count fsyncs). The
    constructor creates the root and temp directories and may raise ``OSError``: a
    worker that cannot create its storage root should fail at start, not per instance.
    """

    __slots__ = (
        "_count_lock",
        "_dir_fds",
        "_dir_fds_epoch",
        "_dir_fds_lock",
        "_direct_ok",
        "_fsync",
        "_incoming",
        "_known_dirs",
        "_observe_direct",
        "_open_writers",
        "_ops",
        "_root",
        "_root_slash",
        "_syncfs_fd",
        "_syncfs_works",
        "config",
    )

    def __init__(self, config: StorageConfig, *, ops: FileOps | None = None) -> None:
        self.config = config
        self._ops = ops if ops is not None else FileOps()
        # The data plane may write fragments to the file itself (write(2), as os.write
        # does) only when the write call is os.write, or a wrapper that says it only
        # times os.write (telemetry): then it gets the data plane's write time through
        # its ``observe_direct``. Not under fault injection (tests).
        write = self._ops.write
        self._observe_direct: Callable[[float], None] | None = getattr(
            write, "observe_direct", None
        )
        self._direct_ok = write is os.write or self._observe_direct is not None
        self._root = os.fspath(config.root)
        # root + "/" + relative path is os.path.join(root, rel): the root is absolute
        # and normalised (StorageConfig) and a rendered layout never starts with "/".
        self._root_slash = self._root if self._root.endswith("/") else self._root + "/"
        self._incoming = os.path.join(self._root, config.temp_dir_name)
        self._fsync = config.fsync == "always"
        os.makedirs(self._incoming, mode=config.dir_mode, exist_ok=True)
        self._known_dirs: set[str] = {self._root}
        self._syncfs_fd = -1
        self._syncfs_works = True
        self._open_writers = 0
        self._count_lock = threading.Lock()
        self._dir_fds = DirectoryFds(self._ops)

    @property
    def root(self) -> str:
        """Absolute storage root."""
        return self._root

    @property
    def incoming_dir(self) -> str:
        """Absolute path of the temp directory."""
        return self._incoming

    #: commits are local I/O (the object store's wait on the network: never inline)
    remote = False

    def index_path(self, path: str) -> str:
        """What the index records for a stored ``path``: relative to the root."""
        return path[len(self._root_slash) :]

    def begin(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str | None = None,
    ) -> InstanceWriter:
        """Start storing one instance; returns its writer.

        Raises :class:`~.uids.UnsafeUID` if a UID is malformed (answer 0x0117). I/O
        errors do not raise: the writer is returned failed and its ``commit`` answers
        0xA700, so the worker has one code path for storage faults.
        """
        return InstanceWriter(
            self, *checked_uids(sop_class_uid, sop_instance_uid, transfer_syntax), calling_ae
        )

    # -- used by InstanceWriter -------------------------------------------------------

    def _open_temp(self) -> tuple[int, str]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(8):
            path = temp_name(self._incoming)
            try:
                return self._ops.open(path, flags, self.config.file_mode), path
            except FileExistsError:
                continue  # left over by a dead process that had our pid; take the next
            except FileNotFoundError:
                # The temp directory was removed under us (an operator cleaning up):
                # recreate it once rather than fail every instance from now on.
                os.makedirs(self._incoming, mode=self.config.dir_mode, exist_ok=True)
        raise FileExistsError(errno.EEXIST, "no free temp file name", self._incoming)

    def _relative_path(self, writer: InstanceWriter, scan: ScanResult) -> str:
        used = self.config.placeholders
        values: dict[str, str] = {"SOPInstanceUID": writer.sop_instance_uid}
        if "StudyInstanceUID" in used:
            values["StudyInstanceUID"] = _uid_or_unknown(scan.study_instance_uid)
        if "SeriesInstanceUID" in used:
            values["SeriesInstanceUID"] = _uid_or_unknown(scan.series_instance_uid)
        if "SOPClassUID" in used:
            values["SOPClassUID"] = writer.sop_class_uid
        if "CallingAE" in used:
            values["CallingAE"] = sanitize_component(writer.calling_ae, max_length=16)
        if "PatientID" in used:
            values["PatientID"] = sanitize_component(scan.patient_id)
        if "Modality" in used:
            values["Modality"] = sanitize_component(scan.modality, max_length=16)
        rel = self.config.layout.format_map(values)
        # Belt and braces: the template was checked and every value is a safe
        # component, so this cannot fail; if it ever does, refuse rather than escape.
        parts = rel.split("/")
        for part in parts:
            safe_path_component(part)
        if parts[0] == self.config.temp_dir_name:
            raise UnsafeUID(f"layout rendered into the temp directory: {rel!r}")
        return rel

    def _ensure_dirs(self, directory: str) -> list[str]:
        """Create ``directory`` and its missing parents.

        Returns the directories this call did not find in the cache (top-down), whose
        entries in their parents must be made durable before they are remembered
        (:meth:`_remember`). One that already existed counts too: another thread or
        worker may have created it and not fsynced its parent yet, and answering
        success before that would break "success means durable".
        """
        known = self._known_dirs
        if directory in known:
            return []
        missing: list[str] = []
        path = directory
        while path not in known and len(path) > len(self._root):
            missing.append(path)
            path = os.path.dirname(path)
        missing.reverse()
        for path in missing:
            try:
                self._ops.mkdir(path, self.config.dir_mode)
            except FileExistsError as exc:
                if not os.path.isdir(path):
                    raise NotADirectoryError(
                        errno.ENOTDIR, os.strerror(errno.ENOTDIR), path
                    ) from exc
        return missing

    def _remember(self, directories: list[str]) -> None:
        known = self._known_dirs
        if len(known) + len(directories) > self.config.dir_cache_size:
            # Bounded memory for a receiver that runs for months: forgetting costs one
            # mkdir (EEXIST) per directory later, nothing more.
            self._forget_dirs()
        known.update(directories)

    def _forget_dirs(self) -> None:
        # A directory vanished under us (moved to an archive, deleted by an operator):
        # forget them all; the cache refills as instances arrive. The open directory
        # fds go too: one may be the vanished directory's, and an fsync of it would
        # not cover an entry made in a directory of the same name created since.
        self._known_dirs.clear()
        self._known_dirs.add(self._root)
        self.close_idle_dirs(-1.0)

    #: open directory fds kept per store for directory fsyncs (see _fsync_dir)
    DIR_FDS = DirectoryFds.SIZE

    def _fsync_dir(self, path: str) -> None:
        """fsync the directory ``path`` through an fd kept open for the next one
        (:class:`~workers.storage.publish.DirectoryFds`)."""
        self._dir_fds.fsync(path)

    def close_idle_dirs(self, idle: float = 1.0) -> int:
        """Close the directory fds kept open that were not used for ``idle`` seconds
        (all of them with a negative ``idle``); returns how many. The worker calls it
        on its heartbeat, so an idle worker holds none open."""
        return self._dir_fds.close_idle(idle)

    def _publish(self, temp_path: str, final_path: str) -> tuple[bool, list[str], str]:
        """Move the temp file to ``final_path``.

        Returns (duplicate, the directories this call created or did not know, the
        final directory). Nothing here is fsynced: the caller makes the entries
        durable (:meth:`_sync_dirs`) and only then remembers the new directories.
        """
        ops = self._ops
        # os.path.dirname for these paths (absolute, no empty or trailing component),
        # without its generality: this runs once per instance.
        directory = final_path[: final_path.rfind("/")] or "/"
        new_dirs: list[str] = []
        duplicate = False
        for attempt in range(2):
            try:
                new_dirs += self._ensure_dirs(directory)
            except OSError as exc:
                raise _StageError("mkdir", exc) from exc
            try:
                if self.config.duplicates == "overwrite":
                    ops.replace(temp_path, final_path)
                else:
                    duplicate = not self._link_exclusive(temp_path, final_path)
                break
            except FileNotFoundError as exc:
                # Either a directory of ours was removed since it was cached (retry
                # once with a fresh cache) or the temp file was swept (fails again).
                if attempt:
                    raise _StageError("publish", exc) from exc
                self._forget_dirs()
            except OSError as exc:
                raise _StageError("publish", exc) from exc
        return duplicate, new_dirs, directory

    def _root_fd(self) -> int:
        """The fd syncfs is called on: opened once and kept, so that a writeback
        error that happens between two group commits is still reported to the next
        (syncfs reports the errors an fd has not seen yet)."""
        fd = self._syncfs_fd
        if fd < 0:
            fd = self._syncfs_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return fd

    def close(self) -> None:
        """Release the fds kept for syncfs and directory fsyncs (the store stays
        usable: it reopens them)."""
        self.close_idle_dirs(-1.0)
        fd, self._syncfs_fd = self._syncfs_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def open_writers(self) -> int:
        """Writers begun and not yet committed or discarded: instances in flight
        (a group commit waits for company only while others are)."""
        return self._open_writers

    def _writer_opened(self) -> None:
        with self._count_lock:
            self._open_writers += 1

    def _writer_closed(self, count: int = 1) -> None:
        with self._count_lock:
            self._open_writers -= count

    def commit_group(self, writers: Sequence[InstanceWriter]) -> list[StoreResult]:
        """Commit several instances with shared flushes; one result per writer, in order.

        With ``fsync always`` the durability contract is per instance, as for
        :meth:`InstanceWriter.commit`: an instance is reported stored only once its
        data and its directory entry (and the entries of any directory created for
        it) are on stable storage. The order is what makes a crash safe:

        1. data: one ``syncfs`` of the store's filesystem for the whole group (one
           ``fsync`` of the file when it is alone). No final name exists yet, so a
           crash here leaves only temp files.
        2. publish every instance under its final name (rename or link).
        3. one ``fsync`` per directory touched, shared by every instance whose entry
           (or new directory) is in it.

        A failure fails exactly the instances the failed call covered: a syncfs error
        every instance of the group, a directory fsync error those whose entries are
        in that directory; an error at close, mkdir or publish only its own instance.
        """
        ops = self._ops
        results: list[StoreResult | None] = [None] * len(writers)
        scans: list[ScanResult] = []
        live: list[int] = []
        for i, writer in enumerate(writers):
            if writer._state in (_COMMITTED, _DISCARDED):
                raise RuntimeError("commit() after commit() or discard()")
            if writer._head is not None and writer._error is None:
                # an empty data set: no fragment carried the header out
                try:
                    writer._write_head(memoryview(b""))
                except OSError as exc:
                    writer._fail("write", exc)
            scans.append(writer._scan_result())
            if writer._error is not None:
                results[i] = writer._close_failed(writer._error, scans[i])
            else:
                live.append(i)
        try:
            if self._fsync and live:
                live = self._flush_data(writers, live, results, scans)
            # dir -> the instances whose entry (or new directory) lives in it
            waiting: dict[str, list[int]] = {}
            published: dict[int, tuple[str, bool, list[str]]] = {}
            for i in live:
                writer = writers[i]
                temp_path = writer._temp_path
                assert temp_path is not None
                try:
                    fd, writer._fd = writer._fd, -1
                    try:
                        ops.close(fd)  # close can report deferred write errors (NFS, quotas)
                    except OSError as exc:
                        raise _StageError("close", exc) from exc
                    final_path = self._root_slash + self._relative_path(writer, scans[i])
                    duplicate, new_dirs, directory = self._publish(temp_path, final_path)
                except _StageError as err:
                    results[i] = writer._close_failed(err, scans[i])
                    continue
                except BaseException:
                    # Not an I/O error (a bug, or a KeyboardInterrupt in the pool
                    # thread): still never leave the temp file behind.
                    writer._cleanup()
                    writer._state = _COMMITTED
                    raise
                writer._temp_path = None
                published[i] = (final_path, duplicate, new_dirs)
                if self._fsync:
                    # The new name lives in `directory`; each new directory's name
                    # lives in its parent. Top-down, as they were created.
                    for path in (*(os.path.dirname(d) for d in new_dirs), directory):
                        waiting.setdefault(path, []).append(i)
            for path, covered in waiting.items():
                try:
                    self._fsync_dir(path)
                except OSError as exc:
                    dir_error = _StageError("fsync dir", exc)
                    for i in covered:
                        if i in published:
                            self._unsure(published.pop(i))
                            results[i] = writers[i]._close_failed(dir_error, scans[i])
            for i, (final_path, duplicate, new_dirs) in published.items():
                # Only now are the new directories durable: other threads may skip them.
                if new_dirs:
                    self._remember(new_dirs)
                results[i] = writers[i]._succeeded(final_path, duplicate, scans[i])
        finally:
            for writer in writers:
                writer._state = _COMMITTED
            self._writer_closed(len(writers))
        return [r for r in results if r is not None]

    def _flush_data(
        self,
        writers: Sequence[InstanceWriter],
        live: list[int],
        results: list[StoreResult | None],
        scans: list[ScanResult],
    ) -> list[int]:
        """Step 1 of :meth:`commit_group`; returns the instances still alive."""
        ops = self._ops
        if len(live) > 1 and self._syncfs_works:
            try:
                ops.syncfs(self._root_fd())
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    err = _StageError("fsync", exc)
                    for i in live:
                        results[i] = writers[i]._close_failed(err, scans[i])
                    return []
                self._syncfs_works = False  # no syncfs here: fsync each file below
            else:
                return live
        alive: list[int] = []
        for i in live:
            try:
                ops.fsync(writers[i]._fd)
            except OSError as exc:
                results[i] = writers[i]._close_failed(_StageError("fsync", exc), scans[i])
            else:
                alive.append(i)
        return alive

    def _unsure(self, published: tuple[str, bool, list[str]]) -> None:
        """A published entry whose directory fsync failed: with keep/reject, unlink
        the name we created so that the SCU's retry is not refused as a duplicate of
        an uncertain copy (with overwrite the retry simply replaces it)."""
        final_path, duplicate, _new_dirs = published
        if not duplicate and self.config.duplicates != "overwrite":
            unlink_quietly(self._ops, final_path)

    def _link_exclusive(self, temp_path: str, final_path: str) -> bool:
        """Publish only if ``final_path`` is free; return False if it already exists."""
        return link_exclusive(self._ops, temp_path, final_path)


def _uid_or_unknown(uid: str | None) -> str:
    return uid if uid is not None and _is_valid_uid_cached(uid) else UNKNOWN


_OPEN, _FAILED, _COMMITTED, _DISCARDED = range(4)


class InstanceWriter(InstanceHead):
    """Streams one instance into a temp file; made by :meth:`Store.begin`.

    ``write`` is cheap and non-blocking in the sense of never waiting for the disk to
    flush (page cache writes); ``commit`` blocks. Not thread-safe: the worker calls
    ``write`` from its loop and then ``commit`` from one pool thread, never both.
    """

    __slots__ = ("_error", "_fd", "_head", "_state", "_store", "_temp_path")

    def __init__(
        self,
        store: Store,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str | None,
    ) -> None:
        super().__init__(store.config, sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
        self._store = store
        self._fd = -1
        self._head: bytes | None = None  # the Part 10 header, until it is written
        self._temp_path: str | None = None
        self._error: _StageError | None = None
        self._state = _OPEN
        store._writer_opened()
        header = self._file_meta()
        try:
            self._fd, self._temp_path = store._open_temp()
        except OSError as exc:
            self._fail("open", exc)
            return
        if store._direct_ok:
            # Written with the first data-set fragment, one writev(2) for both (at
            # commit for an empty data set). Not under injected system calls: those
            # see one write per buffer, as they always did.
            self._head = header
            return
        try:
            self._write_all(memoryview(header))
        except OSError as exc:
            self._fail("write", exc)

    @property
    def temp_path(self) -> str | None:
        """The temp file (None once removed or published)."""
        return self._temp_path

    @property
    def failed(self) -> bool:
        """True once an I/O error has doomed this instance (commit will answer 0xA700)."""
        return self._error is not None

    def write(self, fragment: memoryview | bytes | bytearray) -> None:
        """Append a data-set fragment. Never keeps a reference to ``fragment``.

        I/O errors are remembered, not raised (commit reports them). Writing after
        commit is a programming error and raises ``RuntimeError``.
        """
        if self._state != _OPEN:
            if self._state == _COMMITTED:
                raise RuntimeError("write() after commit()")
            if self._state == _FAILED:
                self._nbytes += memoryview(fragment).nbytes  # still received, for the record
            return  # failed or discarded: drop the data, the answer is already decided
        view = fragment if type(fragment) is memoryview else memoryview(fragment)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        self._take(view)
        try:
            if self._head is not None:
                self._write_head(view)
            else:
                self._write_all(view)
        except OSError as exc:
            self._fail("write", exc)

    def direct_fd(self) -> int:
        """The temp file's descriptor, for the data plane to append the next fragments
        to directly (:class:`workers.engine.connection.DirectSink`); -1 while the tag
        scanner still wants to see the bytes, after a failure, or under injected
        system calls, or while the Part 10 header still waits for the first fragment
        (one writev for both): then :meth:`write` must be called."""
        if (
            self._scanner is None
            and self._head is None
            and self._state == _OPEN
            and self._store._direct_ok
        ):
            return self._fd
        return -1

    def direct_digest(self) -> hashlib._Hash | None:
        """The index digest, which the data plane updates with the bytes it writes to
        :meth:`direct_fd` (so the digest does not keep it off the fast path)."""
        return self._hash

    def direct_written(self, n: int, ns: int) -> None:
        """``n`` data-set bytes were appended to :meth:`direct_fd` by the data plane,
        in ``ns`` nanoseconds of write(2) calls."""
        self._nbytes += n
        observe = self._store._observe_direct
        if observe is not None:
            observe(ns * 1e-9)

    def commit(self) -> StoreResult:
        """Make the instance durable (policy) under its final name. Blocking.

        Never raises for I/O errors (they become a 0xA700 result); raises
        ``RuntimeError`` if called twice or after ``discard``. The same as a group of
        one (:meth:`Store.commit_group`): fsync the file, publish, fsync directories.
        """
        return self._store.commit_group((self,))[0]

    def _close_failed(self, err: _StageError, scan: ScanResult) -> StoreResult:
        """Failed: remove the temp file (if any is left) and say why."""
        self._cleanup()
        return self._failure(err, scan)

    def _succeeded(self, final_path: str, duplicate: bool, scan: ScanResult) -> StoreResult:
        store = self._store
        comment = None
        status = StoreStatus.SUCCESS
        if duplicate:
            if store.config.duplicates == "reject":
                status = StoreStatus.DUPLICATE_REJECTED
                comment = "Duplicate SOP Instance UID rejected"
            else:
                comment = "Duplicate SOP Instance UID: existing copy kept"
        elif scan.sop_instance_uid is not None and scan.sop_instance_uid != self.sop_instance_uid:
            comment = "Data set SOP Instance UID differs from the command's"
        return StoreResult(
            status=status,
            path=final_path,
            bytes_written=self._nbytes,
            comment=comment,
            duplicate=duplicate,
            scan=scan,
            digest=self._hash.hexdigest() if self._hash is not None else None,
        )

    def discard(self) -> None:
        """Abandon the instance: close and remove the temp file. Idempotent."""
        if self._state in (_COMMITTED, _DISCARDED):
            return
        self._state = _DISCARDED
        self._store._writer_closed()
        self._cleanup()

    def __enter__(self) -> InstanceWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Leaving the block without a commit (exception, early return) discards.
        self.discard()

    # -- internals --------------------------------------------------------------------

    def _write_head(self, view: memoryview) -> None:
        """The Part 10 header and the first data-set fragment ``view``, in one
        writev(2) (timed for the storage write histogram, as the data plane's writes
        are); short writes go on with :meth:`_write_all`."""
        head = self._head
        assert head is not None
        self._head = None
        observe = self._store._observe_direct
        t0 = time.perf_counter() if observe is not None else 0.0
        n = os.writev(self._fd, (head, view))
        if observe is not None:
            observe(time.perf_counter() - t0)
        if n < len(head):
            self._write_all(memoryview(head)[n:])
            self._write_all(view)
        elif n - len(head) < len(view):
            self._write_all(view[n - len(head) :])

    def _write_all(self, view: memoryview) -> None:
        if not view:
            return
        write = self._store._ops.write
        fd = self._fd
        n = write(fd, view)
        # Short writes happen (signals, quotas, pipes); loop on the unwritten tail.
        while n < len(view):
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
            view = view[n:]
            n = write(fd, view)

    def _fail(self, stage: str, exc: OSError) -> None:
        self._error = _StageError(stage, exc)
        self._state = _FAILED
        # Free the space now, not at commit: on ENOSPC other associations need it.
        self._cleanup()

    def _cleanup(self) -> None:
        ops = self._store._ops
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):  # the file is being thrown away
                ops.close(fd)
        path, self._temp_path = self._temp_path, None
        if path is not None:
            unlink_quietly(ops, path)
        self._scan_result()  # keep what was found (for the failure result), drop the scanner

    def _failure(self, err: _StageError, scan: ScanResult) -> StoreResult:
        code = err.exc.errno
        name = errno.errorcode.get(code, "OSError") if code is not None else "OSError"
        log.warning(
            "storing %s failed at %s: %s (%s)",
            self.sop_instance_uid,
            err.stage,
            err.exc,
            getattr(err.exc, "filename", None),
        )
        return self._out_of_resources(f"Storage failure at {err.stage}: {name}", code, scan)
