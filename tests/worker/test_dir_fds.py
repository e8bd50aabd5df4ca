"""Directory fsyncs through fds kept open (Store._fsync_dir): a series directory
that receives many instances is opened once, each instance still gets its own
directory fsync after its entry is published, the fds are bounded, closed when idle
and at close, and never used for a directory that vanished under the store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.worker.test_group_commit import Recorder, begin, make_store
from workers.storage.store import Store


class InodeRecorder(Recorder):
    """Also notes which directory (by inode) each directory fsync reached, and
    counts directory opens per path."""

    def __init__(self) -> None:
        super().__init__()
        self.dir_opens: dict[str, int] = {}
        self.synced_inodes: list[tuple[str, int]] = []

    def open(self, path: str, flags: int, mode: int) -> int:
        if flags & os.O_DIRECTORY:
            self.dir_opens[path] = self.dir_opens.get(path, 0) + 1
        return super().open(path, flags, mode)

    def fsync(self, fd: int) -> None:
        path = self.dir_fds.get(fd)
        if path is not None:
            self.synced_inodes.append((path, os.fstat(fd).st_ino))
        super().fsync(fd)


def test_a_series_directory_is_opened_once_and_fsynced_per_instance(tmp_path: Path) -> None:
    rec = InodeRecorder()
    store = make_store(tmp_path, rec)
    directory = str(tmp_path / "store" / "A")
    results = [store.commit_group([begin(store)])[0] for _ in range(20)]
    assert all(r.ok for r in results)
    assert rec.dir_opens[directory] == 1
    # still one fsync of the directory per instance, after that instance's publish
    for result in results:
        published_at = rec.log.index(("publish", result.path))
        assert ("fsync dir", directory) in rec.log[published_at:]
    assert sum(1 for entry in rec.log if entry == ("fsync dir", directory)) == 20


def test_kept_directory_fds_are_bounded_and_closed_when_idle(tmp_path: Path) -> None:
    rec = InodeRecorder()
    store = make_store(tmp_path, rec)
    for n in range(Store.DIR_FDS + 8):
        assert store.commit_group([begin(store, f"AE{n}")])[0].ok
    assert 0 < len(rec.dir_fds) <= Store.DIR_FDS
    assert store.close_idle_dirs(3600.0) == 0  # all used just now
    kept = len(rec.dir_fds)
    assert store.close_idle_dirs(0.0) == kept
    assert rec.dir_fds == {}
    assert store.commit_group([begin(store, "AE0")])[0].ok  # reopened on demand
    assert len(rec.dir_fds) == 1
    store.close()
    assert rec.dir_fds == {}


def test_a_vanished_directory_is_not_fsynced_through_its_old_fd(tmp_path: Path) -> None:
    """An operator removes a series directory: the next instance recreates it, and
    its directory fsync reaches the new directory, not the removed one kept open."""
    rec = InodeRecorder()
    store = make_store(tmp_path, rec)
    directory = tmp_path / "store" / "A"
    assert store.commit_group([begin(store)])[0].ok
    shutil.rmtree(directory)
    result = store.commit_group([begin(store)])[0]
    assert result.ok
    assert Path(result.path or "").is_file()
    new_inode = directory.stat().st_ino
    last = [ino for path, ino in rec.synced_inodes if path == str(directory)][-1]
    assert last == new_inode
    assert rec.dir_opens[str(directory)] == 2
