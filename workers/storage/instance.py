"""What the storage backends' instance writers share (:mod:`.store`'s local files and
:mod:`.objectstore`'s objects): the UID checks of ``begin``, the result and statuses
of a commit, and :class:`InstanceHead`, the front half of a writer (the instance's
identity, its Part 10 header, the tag scanner and the index digest fed with each
fragment).

Status mapping (the ``status`` of :class:`StoreResult`, see :class:`StoreStatus`):

``0x0000`` Success
    Stored (and durable under the fsync policy). Also for a ``keep`` duplicate: the
    SOP Instance is stored, which is what the SCU asked for; PS3.4 B.2.3 has no
    duplicate warning, and a warning status would make some SCUs log or retry for
    nothing. ``duplicate`` and ``comment`` say what happened, for logs and events.
``0x0111`` Duplicate SOP Instance (``reject`` policy)
    The PS3.7 Annex C failure status that names exactly this cause. PS3.7 lists it
    among N-CREATE's statuses, not C-STORE's (9.1.1.1.9), but PS3.4 B.2.3 has no
    storage code for it and the alternatives mislead: A7xx invites a retry that can
    never succeed, Cxxx means "cannot understand". SCUs treat any code outside the
    success, warning and pending ranges as a failure. One constant to change if a
    site's SCU insists on a C-STORE-listed code.
``0xA700`` Refused: Out of Resources (PS3.4 B.2.3)
    Any local I/O failure: ENOSPC, EDQUOT, EROFS, EACCES, EIO, EMFILE... at open,
    write, fsync, close, mkdir, publish (link/rename) or directory fsync. It is the
    storage class's own "try again later", and a retry may well succeed once the
    operator has fixed the disk. ``comment`` names the stage and errno (e.g.
    ``"Storage failure at write: ENOSPC"``) and fits ErrorComment's 64 characters;
    paths go to the log, never to the peer.
``0x0117`` Invalid Object Instance (suggested for the worker when ``begin`` raises
    :class:`~.uids.UnsafeUID`): listed for C-STORE in PS3.7 9.1.1.1.9, and PS3.7
    Annex C's status for a UID that violates the construction rules.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from enum import IntEnum

from .config import StorageConfig
from .filemeta import encode_file_meta_prechecked, is_valid_ae_title
from .scanner import ScanResult, TagScanner
from .uids import UnsafeUID, is_valid_uid

__all__ = ["InstanceHead", "StoreResult", "StoreStatus", "checked_uids"]

log = logging.getLogger("workers.storage.store")


class StoreStatus(IntEnum):
    """C-STORE response statuses this layer produces (see the module docstring)."""

    SUCCESS = 0x0000
    DUPLICATE_REJECTED = 0x0111
    INVALID_OBJECT_INSTANCE = 0x0117
    OUT_OF_RESOURCES = 0xA700


@dataclass(slots=True, frozen=True)
class StoreResult:
    """Outcome of :meth:`InstanceWriter.commit`."""

    #: C-STORE status to answer with (:class:`StoreStatus`)
    status: int
    #: final path of the stored (or, for a duplicate, the existing) instance
    path: str | None
    #: data-set bytes received (stored: the file is this plus the Part 10 header)
    bytes_written: int
    #: short human-readable note: failure reason, duplicate, UID mismatch
    comment: str | None = None
    #: True when an instance already existed under the final path
    duplicate: bool = False
    #: errno of the failure, if any
    error: int | None = None
    #: what the tag scanner found (study/series/patient/modality)
    scan: ScanResult = field(default_factory=ScanResult)
    #: hex SHA-256 of the data set as written (StorageConfig.digest), else None
    digest: str | None = None

    @property
    def ok(self) -> bool:
        """True when the SCU is told the instance is stored."""
        return self.status == StoreStatus.SUCCESS


# UIDs that repeat from instance to instance (SOP classes, transfer syntaxes, study and
# series UIDs) are checked once: validity is a property of the string. Only valid
# ones are remembered, and the set is emptied when full (bounded memory; a dict's
# get/set/clear are atomic under the GIL, so commit threads may share it).
_VALID_UIDS: dict[str, bool] = {}
_VALID_UIDS_MAX = 4096


def _is_valid_uid_cached(uid: str) -> bool:
    if uid in _VALID_UIDS:
        return True
    if not is_valid_uid(uid):
        return False
    if len(_VALID_UIDS) >= _VALID_UIDS_MAX:
        _VALID_UIDS.clear()
    _VALID_UIDS[uid] = True
    return True


def checked_uids(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> tuple[str, str, str]:
    """The command's UIDs as ``begin`` stores them, or :class:`~.uids.UnsafeUID`.

    A sender's (or decoder's) trailing UI padding is tolerated; everything else must
    be a PS3.5 9.1 UID, which also makes it a safe path component."""
    sop_class_uid = sop_class_uid.rstrip("\0 ")
    sop_instance_uid = sop_instance_uid.rstrip("\0 ")
    transfer_syntax = transfer_syntax.rstrip("\0 ")
    if not _is_valid_uid_cached(sop_class_uid):
        raise UnsafeUID(f"invalid SOP Class UID: {sop_class_uid!r}")
    if not is_valid_uid(sop_instance_uid):  # unique per instance: not worth caching
        raise UnsafeUID(f"invalid SOP Instance UID: {sop_instance_uid!r}")
    if not _is_valid_uid_cached(transfer_syntax):
        raise UnsafeUID(f"invalid Transfer Syntax UID: {transfer_syntax!r}")
    return sop_class_uid, sop_instance_uid, transfer_syntax


class InstanceHead:
    """The front half of an instance writer: who the instance is, and what is learnt
    from its data set as the fragments go by (scanner, digest, byte count)."""

    __slots__ = (
        "_hash",
        "_nbytes",
        "_scan",
        "_scanner",
        "calling_ae",
        "sop_class_uid",
        "sop_instance_uid",
        "transfer_syntax",
    )

    def __init__(
        self,
        config: StorageConfig,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str | None,
    ) -> None:
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.calling_ae = calling_ae
        self._nbytes = 0
        self._scanner: TagScanner | None = TagScanner(transfer_syntax, budget=config.scan_budget)
        self._scan: ScanResult | None = None
        # Index digest: hashed from the fragments as they go by, no second read.
        self._hash = hashlib.sha256() if config.digest else None

    @property
    def bytes_written(self) -> int:
        """Data-set bytes received so far."""
        return self._nbytes

    def _file_meta(self) -> bytes:
        """The Part 10 header (begin checked the UIDs). An AE title that cannot be
        written as AE is left out (0002,0016 is optional); the engine validated it
        during negotiation anyway."""
        ae = self.calling_ae
        return encode_file_meta_prechecked(
            self.sop_class_uid,
            self.sop_instance_uid,
            self.transfer_syntax,
            source_ae=ae if ae and is_valid_ae_title(ae) else None,
        )

    def _take(self, view: memoryview) -> None:
        """Count, scan and hash one data-set fragment (a 1-D byte view)."""
        self._nbytes += len(view)
        scanner = self._scanner
        if scanner is not None:
            try:
                done = scanner.feed(view)
            except Exception:  # the scanner promises not to raise; storage must not fail
                log.exception("tag scanner failed; filing under 'unknown'")
                done = True
            if done:
                self._scan = scanner.result()
                self._scanner = None
        if self._hash is not None:  # hashlib releases the GIL past 2 KiB
            self._hash.update(view)

    def _scan_result(self) -> ScanResult:
        if self._scan is None:
            self._scan = self._scanner.close() if self._scanner is not None else ScanResult()
            self._scanner = None
        return self._scan

    def _out_of_resources(self, comment: str, error: int | None, scan: ScanResult) -> StoreResult:
        """The 0xA700 result (``comment`` cut to ErrorComment's 64 characters)."""
        return StoreResult(
            status=StoreStatus.OUT_OF_RESOURCES,
            path=None,
            bytes_written=self._nbytes,
            comment=comment[:64],
            error=error,
            scan=scan,
        )
