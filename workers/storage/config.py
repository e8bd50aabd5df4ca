"""Storage configuration: root, layout template, fsync and duplicate policies.

Also :class:`FileOps`, the seam through which tests inject I/O faults. The layout
template is validated once here, so the per-instance path rendering in
:mod:`.store` only substitutes values that are already known to be safe.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .scanner import DEFAULT_SCAN_BUDGET
from .uids import safe_path_component

__all__ = [
    "DEFAULT_LAYOUT",
    "LAYOUT_PLACEHOLDERS",
    "TEMP_SUFFIX",
    "UNKNOWN",
    "DuplicatePolicy",
    "FileOps",
    "FsyncPolicy",
    "StorageConfig",
    "syncfs",
]

FsyncPolicy = Literal["always", "never"]
DuplicatePolicy = Literal["overwrite", "keep", "reject"]

DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
_UID_PLACEHOLDERS = frozenset(
    {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
)
#: Every name a layout template may use.
LAYOUT_PLACEHOLDERS = _UID_PLACEHOLDERS | {"CallingAE", "PatientID", "Modality"}
#: Directory name used when the data set's study/series UID was not found or is invalid.
UNKNOWN = "unknown"
#: Suffix of temp files in the temp directory (``<pid>-<n>.part``).
TEMP_SUFFIX = ".part"


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        fn: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    return fn


def syncfs(fd: int) -> None:
    """syncfs(2): write back every dirty file of the filesystem holding ``fd`` and
    commit its journal. Since Linux 5.8 it reports writeback errors that happened on
    that filesystem since ``fd`` last saw them (which is why the store keeps one fd
    open for it rather than opening a fresh one per call). Python has no os.syncfs:
    libc is called through ctypes. Where there is none, ``sync()`` (which reports no
    error) would weaken the contract, so this raises ENOSYS and the caller falls back
    to per-file fsync."""
    fn = _libc_syncfs()
    if fn is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if fn(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(slots=True, frozen=True)
class FileOps:
    """The system calls the store makes, replaceable for fault injection in tests.

    Defaults are the :mod:`os` functions. ``write`` always receives a memoryview.
    """

    open: Callable[[str, int, int], int] = os.open
    write: Callable[[int, memoryview], int] = os.write
    fsync: Callable[[int], None] = os.fsync
    close: Callable[[int], None] = os.close
    mkdir: Callable[[str, int], None] = os.mkdir
    link: Callable[[str, str], None] = os.link
    replace: Callable[[str, str], None] = os.replace
    unlink: Callable[[str], None] = os.unlink
    #: flushes the whole filesystem holding ``fd`` (syncfs(2)); group commits use it
    syncfs: Callable[[int], None] = syncfs


@dataclass(slots=True, frozen=True)
class StorageConfig:
    """Where and how instances are stored.

    ``layout`` is a ``str.format`` template relative to ``root``, ``/``-separated,
    using only :data:`LAYOUT_PLACEHOLDERS` (no format specs or conversions) and
    containing ``{SOPInstanceUID}`` (otherwise distinct instances would collide).
    UID placeholders are validated UIDs; a study/series UID that the data set does not
    carry in its first ``scan_budget`` bytes (or carries malformed) becomes
    ``"unknown"``; CallingAE, PatientID and Modality are sanitised to
    ``[A-Za-z0-9._^=+-]`` (see :func:`~.uids.sanitize_component`).
    """

    root: str | os.PathLike[str]
    layout: str = DEFAULT_LAYOUT
    #: "always": success means file and directory entries are fsynced.
    fsync: FsyncPolicy = "always"
    duplicates: DuplicatePolicy = "overwrite"
    #: Temp directory under ``root`` (same filesystem, so the final rename is atomic).
    temp_dir_name: str = ".incoming"
    #: Data-set bytes the tag scanner may walk looking for the study/series UIDs.
    scan_budget: int = DEFAULT_SCAN_BUDGET
    #: SHA-256 of each data set while it streams (StoreResult.digest), for the index.
    digest: bool = False
    file_mode: int = 0o644
    dir_mode: int = 0o755
    #: Directories remembered as existing; the cache is simply cleared when full.
    dir_cache_size: int = 100_000
    #: Placeholders the layout uses (derived; filled in by __post_init__).
    placeholders: frozenset[str] = field(default=frozenset(), init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", os.path.abspath(os.fspath(self.root)))
        if self.fsync not in ("always", "never"):
            raise ValueError(f"fsync policy must be 'always' or 'never', not {self.fsync!r}")
        if self.duplicates not in ("overwrite", "keep", "reject"):
            raise ValueError(f"unknown duplicate policy {self.duplicates!r}")
        safe_path_component(self.temp_dir_name)
        if not self.temp_dir_name.startswith("."):
            # Sanitised values never start with "." and UIDs start with a digit, so a
            # dot name can never be produced by the layout.
            raise ValueError("temp_dir_name must start with '.'")
        if self.scan_budget < 0 or self.dir_cache_size < 1:
            raise ValueError("scan_budget and dir_cache_size must be positive")
        object.__setattr__(self, "placeholders", _check_layout(self.layout, self.temp_dir_name))


def _check_layout(layout: str, temp_dir_name: str) -> frozenset[str]:
    used: set[str] = set()
    for literal, name, spec, conversion in string.Formatter().parse(layout):
        del literal
        if name is None:
            continue
        if name not in LAYOUT_PLACEHOLDERS:
            raise ValueError(f"unknown layout placeholder {{{name}}}")
        if spec or conversion:
            raise ValueError(f"layout placeholder {{{name}}} takes no format spec/conversion")
        used.add(name)
    if "SOPInstanceUID" not in used:
        raise ValueError("layout must contain {SOPInstanceUID}")
    # Render with a sample that shares the shape of real values; every literal
    # component must be a plain name.
    sample = layout.format_map(dict.fromkeys(LAYOUT_PLACEHOLDERS, "1.2"))
    parts = sample.split("/")
    for part in parts:
        safe_path_component(part)  # rejects "", ".", "..", "\\", NUL
    if parts[0] == temp_dir_name:
        raise ValueError("layout must not write into the temp directory")
    return frozenset(used)
