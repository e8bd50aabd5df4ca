"""Storing instances in an S3-compatible object store (``--storage s3://bucket/prefix``).

Theory of operation
-------------------
:class:`ObjectStore` has the interface the worker uses of :class:`~.store.Store`
(``begin`` -> writer with ``write`` / ``commit`` / ``discard``), so the association
code is the same for both; it keeps a local :class:`~.store.Store` beside it for what
stays local: the temp directory for handler data sets, the embedded index, and (in
``spool`` mode) the spool itself. Objects are keyed ``prefix + rendered layout``, and
hold the Part 10 file (file meta + data set), byte for byte what the local store writes.

``direct`` (:class:`ObjectWriter`)
    ``write`` (on the loop) appends each fragment to a part buffer; a full buffer
    (``part_size``) becomes one UploadPart in the upload thread pool, the multipart
    upload being created with the first one (by then the tag scanner, whose budget is
    far below the 5 MiB part minimum, has found the UIDs the key is made of). With
    more than one part in flight the writer says ``lagging`` and the association
    pauses reading until a part is done: memory per instance is bounded by about two
    part sizes, whatever the instance's size. ``commit`` (in a pool thread) sends the
    last part and CompleteMultipartUpload, or one PutObject for an instance smaller
    than a part, and answers Success only on the store's 200. Any failure aborts the
    multipart upload (no partial object, no orphan parts) and answers 0xA700.
``spool`` (:class:`SpoolStore`)
    The local :class:`~.store.Store` under the spool directory does the writing (temp
    file, fsync, atomic rename), Success follows that, and the path goes to the
    :class:`~.spool.SpoolUploader`, which uploads in the background with retries.

Duplicates (``keep`` / ``reject``) in ``direct`` mode are decided by the object store
itself: PutObject / CompleteMultipartUpload carry ``If-None-Match: *`` and a 412 means
the key exists (race-free across nodes). A store that does not implement conditional
writes (501) is asked with HEAD instead, from then on (not race-free; rare).
In ``spool`` mode they are decided by the spool (this node's instances not uploaded
yet) and then by the bucket, asked with HEAD at commit (another node's, or an earlier
upload). Not race-free: while the bucket does not answer, or when two nodes spool the
same instance before either uploaded it, both are accepted and the later upload wins.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .config import StorageConfig
from .instance import InstanceHead, checked_uids
from .s3client import (
    S3Settings,
    _describe,
    _error_code,
    _status,
    check_bucket,
    make_client,
)
from .scanner import ScanResult
from .store import Store, StoreResult, StoreStatus

if TYPE_CHECKING:
    from .spool import SpoolUploader
    from .store import InstanceWriter

__all__ = [
    "ObjectStore",
    "ObjectWriter",
    "S3Settings",
    "SpoolStore",
    "check_bucket",
    "make_client",
    "open_object_store",
]

log = logging.getLogger(__name__)

#: parts of one instance uploading at once before the association pauses reading
_MAX_IN_FLIGHT = 2


class _BesideLocal:
    """The set-up both S3 stores share: a local :class:`~.store.Store` on
    ``config.root`` for what stays local (see the module doc), and the index
    recording each instance's ``s3://`` URL as its path."""

    #: True when commits wait on the network (``direct``)
    remote: bool = False

    def __init__(self, config: StorageConfig, settings: S3Settings) -> None:
        self.config = config
        self.settings = settings
        self.local = Store(config)

    @property
    def root(self) -> str:
        return self.local.root

    @property
    def incoming_dir(self) -> str:
        return self.local.incoming_dir

    @property
    def _root_slash(self) -> str:
        return self.local._root_slash

    def index_path(self, path: str) -> str:
        """What the index records as the instance's path: its ``s3://`` URL."""
        return path

    def _reader(self) -> Any:
        raise NotImplementedError

    def object_digest(self, url: str) -> tuple[int, str]:
        """(data-set size, digest) of the instance the index records at ``url``, for
        storage commitment (blocking: a pool thread). In ``spool`` mode a file not
        uploaded yet is read from this node's spool; otherwise the object is streamed
        from the bucket (GetObject, hashed chunk by chunk). Raises
        ``FileNotFoundError`` when neither exists, ``ValueError`` when ``url`` is not
        in this bucket and prefix or the bytes are not Part 10, other errors when the
        store does not answer."""
        from workers.index.digest import dataset_digest, stream_digest

        bucket_url = f"s3://{self.settings.bucket}/"
        if not url.startswith(bucket_url + self.settings.prefix):
            raise ValueError(f"{url} is not under {bucket_url}{self.settings.prefix}")
        key = url[len(bucket_url) :]
        spooled = os.path.join(self.local.root, key[len(self.settings.prefix) :])
        if isinstance(self, SpoolStore):
            try:
                return dataset_digest(spooled)
            except FileNotFoundError:
                pass  # uploaded (or spooled on another node): the bucket has the say
        try:
            answer = self._reader().get_object(Bucket=self.settings.bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404 or _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(errno.ENOENT, "no such object", url) from exc
            raise
        body = answer["Body"]
        try:
            return stream_digest(body)
        finally:
            body.close()


class ObjectStore(_BesideLocal):
    """Stores instances straight into the object store (``direct``); see the module doc.

    ``config.root`` is a local directory (temp files of handler data sets, the
    embedded index). Thread-safe like :class:`~.store.Store`.
    """

    #: commits wait on the network: never inline on the event loop
    remote = True

    def _reader(self) -> Any:
        return self.client

    def __init__(self, config: StorageConfig, settings: S3Settings, client: Any = None) -> None:
        super().__init__(config, settings)
        self.client = client if client is not None else make_client(settings)
        self.pool = ThreadPoolExecutor(settings.upload_threads, thread_name_prefix="s3")
        #: False once the store answered a conditional write with 501
        self.conditional = True

    def key_url(self, key: str) -> str:
        return f"s3://{self.settings.bucket}/{key}"

    def begin(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str | None = None,
    ) -> ObjectWriter:
        """Start one instance (raises :class:`~.uids.UnsafeUID` like Store.begin)."""
        return ObjectWriter(
            self, *checked_uids(sop_class_uid, sop_instance_uid, transfer_syntax), calling_ae
        )

    def key_for(self, writer: Any, scan: ScanResult) -> str:
        return self.settings.prefix + self.local._relative_path(writer, scan)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.settings.bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404 or _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Duplicate(Exception):
    """Internal: the key exists and the policy keeps the existing object."""


_OPEN, _FAILED, _DONE = range(3)


class ObjectWriter(InstanceHead):
    """One instance streaming to the object store; made by :meth:`ObjectStore.begin`.

    ``write`` runs on the loop and never blocks on the network; ``commit`` blocks (a
    pool thread). ``lagging`` asks the association to pause reading; ``on_drain`` (set
    by it) is called on the loop once a part is done.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_in_flight",
        "_key",
        "_lock",
        "_loop",
        "_parts",
        "_state",
        "_store",
        "_upload_id",
        "on_drain",
    )

    def __init__(
        self,
        store: ObjectStore,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str | None,
    ) -> None:
        super().__init__(store.config, sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
        self._store = store
        self.on_drain: Callable[[], None] | None = None
        self._loop: Any = None
        self._state = _OPEN
        self._error: str | None = None
        self._upload_id: str | None = None
        self._key: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._in_flight = 0
        self._lock = threading.Lock()
        self._buf = bytearray(self._file_meta())

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def lagging(self) -> bool:
        """True while more parts are uploading than the association may get ahead by."""
        return self._in_flight >= _MAX_IN_FLIGHT

    @property
    def temp_path(self) -> str | None:
        return None

    def write(self, fragment: memoryview | bytes | bytearray) -> None:
        """Append a data-set fragment (copied into the part buffer)."""
        if self._state != _OPEN:
            if self._state == _DONE:
                raise RuntimeError("write() after commit()")
            self._nbytes += memoryview(fragment).nbytes
            return
        view = fragment if type(fragment) is memoryview else memoryview(fragment)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        self._take(view)
        self._buf += view
        if len(self._buf) >= self._store.settings.part_size:
            self._ship_part()

    def _ship_part(self) -> None:
        part, self._buf = self._buf, bytearray()
        if self._key is None:
            self._key = self._store.key_for(self, self._scan_result())
        if self._loop is None and self.on_drain is not None:
            import asyncio

            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
        number = len(self._parts) + 1
        with self._lock:
            self._in_flight += 1
        future = self._store.pool.submit(self._upload_part, number, part)
        future.add_done_callback(self._part_done)
        self._parts.append(future)

    def _part_done(self, _future: Future[dict[str, Any]]) -> None:
        with self._lock:
            self._in_flight -= 1
            resume = self._in_flight == _MAX_IN_FLIGHT - 1
        callback, loop = self.on_drain, self._loop
        if resume and callback is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:
                pass  # the loop is closed: nobody to resume

    def _ensure_upload(self) -> str:
        with self._lock:
            if self._upload_id is None:
                assert self._key is not None
                answer = self._store.client.create_multipart_upload(
                    Bucket=self._store.settings.bucket,
                    Key=self._key,
                    ContentType="application/dicom",
                )
                self._upload_id = str(answer["UploadId"])
            return self._upload_id

    def _upload_part(self, number: int, data: bytearray) -> dict[str, Any]:
        upload_id = self._ensure_upload()
        answer = self._store.client.upload_part(
            Bucket=self._store.settings.bucket,
            Key=self._key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def commit(self) -> StoreResult:
        """Finish the upload; Success only once the object store confirmed it."""
        if self._state == _DONE:
            raise RuntimeError("commit() after commit() or discard()")
        scan = self._scan_result()
        if self._error is not None:
            self._state = _DONE
            return self._failure("receive", self._error, scan)
        self._state = _DONE
        store = self._store
        settings = store.settings
        if self._key is None:
            self._key = store.key_for(self, scan)
        key = self._key
        policy = store.config.duplicates
        conditional: dict[str, str] = {}
        stage = "upload"
        try:
            if policy != "overwrite":
                if store.conditional:
                    conditional = {"IfNoneMatch": "*"}
                elif store.exists(key):
                    raise _Duplicate
            if not self._parts:
                body = self._buf
                self._buf = bytearray()
                stage = "put"
                self._conditional_call(
                    lambda extra: store.client.put_object(
                        Bucket=settings.bucket,
                        Key=key,
                        Body=body,
                        ContentType="application/dicom",
                        **extra,
                    ),
                    conditional,
                    key,
                )
            else:
                if self._buf:
                    self._ship_part()
                stage = "upload part"
                parts = [future.result() for future in self._parts]
                stage = "complete"
                upload_id = self._upload_id
                self._conditional_call(
                    lambda extra: store.client.complete_multipart_upload(
                        Bucket=settings.bucket,
                        Key=key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        **extra,
                    ),
                    conditional,
                    key,
                )
                self._upload_id = None  # completed: nothing to abort
        except _Duplicate:
            self._abort()
            duplicate = True
        except Exception as exc:
            self._abort()
            return self._failure(stage, _describe(exc), scan)
        else:
            duplicate = False
        status = StoreStatus.SUCCESS
        comment = None
        if duplicate:
            if policy == "reject":
                status = StoreStatus.DUPLICATE_REJECTED
                comment = "Duplicate SOP Instance UID rejected"
            else:
                comment = "Duplicate SOP Instance UID: existing copy kept"
        return StoreResult(
            status=status,
            path=store.key_url(key),
            bytes_written=self._nbytes,
            comment=comment,
            duplicate=duplicate,
            scan=scan,
            digest=self._hash.hexdigest() if self._hash is not None and not duplicate else None,
        )

    def _conditional_call(
        self, call: Callable[[dict[str, str]], Any], conditional: dict[str, str], key: str
    ) -> None:
        try:
            call(conditional)
        except Exception as exc:
            if conditional and (_status(exc) == 412 or _error_code(exc) == "PreconditionFailed"):
                raise _Duplicate from exc
            if conditional and _status(exc) == 501:
                # No conditional writes here: HEAD from now on (see the module doc).
                log.warning("object store ignores If-None-Match; checking with HEAD")
                self._store.conditional = False
                if self._store.exists(key):
                    raise _Duplicate from exc
                call({})
                return
            raise

    def discard(self) -> None:
        """Abandon the instance: cancel queued parts, abort the multipart upload."""
        if self._state == _DONE:
            return
        self._state = _DONE
        self._buf = bytearray()
        self._scan_result()
        if self._parts:
            # Abort off the loop: it is a network call, after the parts in flight.
            self._store.pool.submit(self._abort)

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def _abort(self) -> None:
        for future in self._parts:
            future.cancel()
        for future in self._parts:
            if not future.cancelled():
                try:
                    future.result()
                except Exception:
                    pass
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        try:
            self._store.client.abort_multipart_upload(
                Bucket=self._store.settings.bucket, Key=self._key, UploadId=upload_id
            )
        except Exception as exc:
            # The parts stay billed until a lifecycle rule removes them: say so.
            log.warning("could not abort multipart upload of %s: %s", self._key, _describe(exc))

    def _failure(self, stage: str, reason: str, scan: ScanResult) -> StoreResult:
        log.warning(
            "storing %s in the object store failed at %s: %s", self.sop_instance_uid, stage, reason
        )
        return self._out_of_resources(f"Object store failure at {stage}", errno.EIO, scan)


class SpoolStore(_BesideLocal):
    """``spool`` mode: the local store under the spool directory, then the uploader."""

    remote = False

    def _reader(self) -> Any:
        return self.uploader.client

    def __init__(
        self,
        config: StorageConfig,
        settings: S3Settings,
        uploader: SpoolUploader,
        *,
        limit: int = 0,
    ) -> None:
        super().__init__(config, settings)
        self.uploader = uploader
        #: this worker's share of the spool limit (bytes; 0: none)
        self.limit = limit
        # keep / reject ask the bucket at commit (see _SpoolWriter.commit): a network
        # call, so commits go to the I/O pool, never inline on the event loop.
        self.remote = config.duplicates != "overwrite"

    def in_bucket(self, key: str) -> bool:
        """Whether ``key`` is in the bucket; False when the bucket does not answer
        (``spool`` accepts while the store is away: see the module doc)."""
        try:
            self.uploader.client.head_object(Bucket=self.settings.bucket, Key=key)
        except Exception as exc:
            if _status(exc) != 404 and _error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
                log.warning("spool: cannot ask the bucket about %s: %s", key, _describe(exc))
            return False
        return True

    def close(self) -> None:
        """Stop uploading (what is left stays in the spool for the next start)."""
        self.uploader.close()

    def begin(
        self,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str | None = None,
    ) -> _SpoolWriter:
        inner = self.local.begin(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
        if self.limit and self.uploader.backlog_bytes >= self.limit:
            inner._fail("spool", OSError(errno.ENOSPC, "spool limit reached"))
        return _SpoolWriter(self, inner)


class _SpoolWriter:
    """The local writer, plus the hand-over to the uploader after a Success."""

    __slots__ = ("_inner", "_store", "write")

    def __init__(self, store: SpoolStore, inner: InstanceWriter) -> None:
        self._store = store
        self._inner = inner
        self.write = inner.write  # the fragment path is the local store's, unwrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def commit(self) -> StoreResult:
        result = self._inner.commit()
        if result.path is None:
            return result
        store = self._store
        rel = result.path[len(store.local._root_slash) :]
        key = store.settings.prefix + rel
        policy = store.config.duplicates
        if result.ok and not result.duplicate and policy != "overwrite" and store.in_bucket(key):
            # The spool only knows this node's instances not uploaded yet: an instance
            # another node (or this one, earlier) uploaded is in the bucket. The copy
            # just renamed into the spool is ours alone (the local store refused a
            # second one): remove it, and answer as the policy says.
            try:
                os.unlink(result.path)
            except OSError as exc:
                log.warning("spool: cannot remove duplicate %s: %s", result.path, exc)
            rejected = policy == "reject"
            return StoreResult(
                status=StoreStatus.DUPLICATE_REJECTED if rejected else StoreStatus.SUCCESS,
                path=f"s3://{store.settings.bucket}/{key}",
                bytes_written=result.bytes_written,
                comment="Duplicate SOP Instance UID rejected"
                if rejected
                else "Duplicate SOP Instance UID: existing copy kept",
                duplicate=True,
                scan=result.scan,
            )
        if result.ok and not result.duplicate:
            store.uploader.submit(result.path, key)
        return StoreResult(
            status=result.status,
            path=f"s3://{store.settings.bucket}/{key}",
            bytes_written=result.bytes_written,
            comment=result.comment,
            duplicate=result.duplicate,
            error=result.error,
            scan=result.scan,
            digest=result.digest,
        )

    def discard(self) -> None:
        self._inner.discard()

    def __enter__(self) -> _SpoolWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._inner.discard()


def open_object_store(
    config: StorageConfig, settings: S3Settings, *, drain: bool = False, workers: int = 1
) -> ObjectStore | SpoolStore:
    """The store a worker uses for ``settings``; ``drain``: this worker also uploads
    what an earlier run left in the spool."""
    if settings.durability == "direct":
        return ObjectStore(config, settings)
    from .spool import SpoolUploader

    uploader = SpoolUploader(os.fspath(config.root), settings, make_client(settings))
    store = SpoolStore(config, settings, uploader, limit=settings.spool_limit // max(1, workers))
    uploader.start(drain=drain)
    return store
