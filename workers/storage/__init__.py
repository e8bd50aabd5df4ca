"""Storage of received instances: streaming, atomic, no pydicom.

- :mod:`.store`: :class:`Store` / :class:`InstanceWriter` (temp file, fsync policy,
  atomic publish, duplicate policy).
- :mod:`.config`: :class:`StorageConfig` (layout template, policies), :class:`FileOps`.
- :mod:`.sweep`: :func:`sweep_incoming`, cleanup after killed workers.
- :mod:`.filemeta`: the Part 10 header, encoded by hand.
- :mod:`.scanner`: finds the study/series UIDs in a data set's first fragments
  (:mod:`.elements`: its encoding facts; :mod:`.skeletons`: learnt layouts).
- :mod:`.instance`: what every backend's writer shares (UID checks, results and the
  status mapping, the scanner and digest of each fragment).
- :mod:`.uids`: UID validation and path-component safety.
"""

from .config import DEFAULT_LAYOUT, FileOps, StorageConfig
from .filemeta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, encode_file_meta
from .scanner import ScanResult, TagScanner
from .store import InstanceWriter, Store, StoreResult, StoreStatus
from .sweep import sweep_incoming
from .uids import UnsafeUID, is_valid_uid, safe_path_component, sanitize_component

__all__ = [
    "DEFAULT_LAYOUT",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "FileOps",
    "InstanceWriter",
    "ScanResult",
    "StorageConfig",
    "Store",
    "StoreResult",
    "StoreStatus",
    "TagScanner",
    "UnsafeUID",
    "encode_file_meta",
    "is_valid_uid",
    "safe_path_component",
    "sanitize_component",
    "sweep_incoming",
]
