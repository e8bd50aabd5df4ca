"""Group commit (workers/storage/group.py, Store.commit_group): instances that wait
for durability together share flushes, each is reported stored only once its data
and directory entry are flushed, and a failed flush fails exactly the instances it
covered. Every system call goes through FileOps, so the tests count and order them."""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from workers.storage.config import FileOps, StorageConfig, syncfs
from workers.storage.group import GroupCommitter
from workers.storage.store import InstanceWriter, Store, StoreStatus

CT = "1.2.840.10008.5.1.4.1.1.2"
EVLE = "1.2.840.10008.1.2.1"


class Recorder:
    """FileOps that logs every flush and publish in order, and can fail some."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, Any]] = []
        self.fail_syncfs = 0  # fail this many syncfs calls (EIO)
        self.fail_dir: str | None = None  # fail fsync of this directory (EIO)
        self.dir_fds: dict[int, str] = {}

    def ops(self) -> FileOps:
        return replace(
            FileOps(),
            open=self.open,
            fsync=self.fsync,
            syncfs=self.syncfs,
            replace=self.replace,
            close=self.close,
        )

    def open(self, path: str, flags: int, mode: int) -> int:
        fd = os.open(path, flags, mode)
        if flags & os.O_DIRECTORY:
            with self.lock:
                self.dir_fds[fd] = path
        return fd

    def close(self, fd: int) -> None:
        with self.lock:
            self.dir_fds.pop(fd, None)
        os.close(fd)

    def fsync(self, fd: int) -> None:
        with self.lock:
            path = self.dir_fds.get(fd)
        if path is not None and path == self.fail_dir:
            with self.lock:
                self.log.append(("fsync dir failed", path))
            raise OSError(errno.EIO, "injected")
        os.fsync(fd)
        with self.lock:
            self.log.append(("fsync dir", path) if path is not None else ("fsync file", fd))

    def syncfs(self, fd: int) -> None:
        if self.fail_syncfs:
            self.fail_syncfs -= 1
            with self.lock:
                self.log.append(("syncfs failed", None))
            raise OSError(errno.EIO, "injected")
        syncfs(fd)
        with self.lock:
            self.log.append(("syncfs", None))

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)
        with self.lock:
            self.log.append(("publish", dst))

    def flushes(self) -> int:
        return sum(1 for name, _ in self.log if name.startswith(("fsync", "syncfs")))


def begin(store: Store, ae: str = "A") -> InstanceWriter:
    writer = store.begin(CT, generate_uid(), EVLE, ae)
    writer.write(os.urandom(2048))
    return writer


def make_store(
    tmp_path: Path, rec: Recorder, layout: str = "{CallingAE}/{SOPInstanceUID}.dcm"
) -> Store:
    return Store(StorageConfig(root=tmp_path / "store", layout=layout), ops=rec.ops())


def test_a_group_shares_its_flushes(tmp_path: Path) -> None:
    rec = Recorder()
    store = make_store(tmp_path, rec)
    store.commit_group([begin(store)])  # creates the directory "A": not counted below
    rec.log.clear()
    writers = [begin(store) for _ in range(8)]
    results = store.commit_group(writers)
    assert all(r.status == StoreStatus.SUCCESS for r in results)
    assert all(Path(r.path or "").is_file() for r in results)
    # one syncfs for the data of all eight, one fsync of their directory
    assert rec.flushes() == 2 < len(writers)
    assert store.open_writers == 0


def test_success_only_after_data_and_entry_are_flushed(tmp_path: Path) -> None:
    """The order a crash needs: every file's data flushed before any final name
    exists, and each name's directory fsynced after it was published."""
    rec = Recorder()
    store = make_store(tmp_path, rec)
    writers = [begin(store, ae) for ae in ("A", "B", "A", "C")]
    results = store.commit_group(writers)
    assert all(r.ok for r in results)
    log = rec.log
    first_publish = next(i for i, (name, _) in enumerate(log) if name == "publish")
    assert [name for name, _ in log[:first_publish]] == ["syncfs"]
    for result in results:
        path = result.path or ""
        published_at = log.index(("publish", path))
        directory = os.path.dirname(path)
        assert ("fsync dir", directory) in log[published_at:], path
        # the new directory's own entry, in the root
        assert ("fsync dir", os.path.dirname(directory)) in log[published_at:], path


def test_a_failed_syncfs_fails_every_instance_of_its_group_and_no_other(tmp_path: Path) -> None:
    rec = Recorder()
    store = make_store(tmp_path, rec)
    rec.fail_syncfs = 1
    failed = store.commit_group([begin(store) for _ in range(3)])
    stored = store.commit_group([begin(store) for _ in range(3)])
    assert [r.status for r in failed] == [StoreStatus.OUT_OF_RESOURCES] * 3
    assert all(r.comment == "Storage failure at fsync: EIO" for r in failed)
    assert [r.status for r in stored] == [StoreStatus.SUCCESS] * 3
    # nothing of the failed group under a final name, nothing left in the temp dir
    files = sorted(p.name for p in (tmp_path / "store" / "A").iterdir())
    assert files == sorted(os.path.basename(r.path or "") for r in stored)
    assert os.listdir(store.incoming_dir) == []


def test_a_failed_directory_fsync_fails_the_instances_in_that_directory(tmp_path: Path) -> None:
    rec = Recorder()
    store = Store(
        StorageConfig(
            root=tmp_path / "store", layout="{CallingAE}/{SOPInstanceUID}.dcm", duplicates="keep"
        ),
        ops=rec.ops(),
    )
    rec.fail_dir = str(tmp_path / "store" / "BAD")
    writers = [begin(store, ae) for ae in ("GOOD", "BAD", "GOOD", "BAD")]
    results = store.commit_group(writers)
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[1].comment == "Storage failure at fsync dir: EIO"
    # keep policy: the uncertain names were taken back, so a retry is not a duplicate
    assert list((tmp_path / "store" / "BAD").iterdir()) == []
    assert os.listdir(store.incoming_dir) == []


def test_the_committer_groups_concurrent_instances(tmp_path: Path) -> None:
    """Six instances in flight at once: the first to arrive waits for the others
    (they are open writers of the store), and one flush covers all of them."""
    rec = Recorder()
    store = make_store(tmp_path, rec)
    store.commit_group([begin(store)])
    rec.log.clear()
    delivered: list[tuple[Any, Any]] = []
    done = threading.Event()

    def deliver(items: list[tuple[Any, Any]]) -> None:
        delivered.extend(items)
        if len(delivered) == 6:
            done.set()

    committer = GroupCommitter(store, deliver, max_wait=5.0)
    writers = [begin(store) for _ in range(6)]
    try:
        for n, writer in enumerate(writers):
            committer.submit(writer, n)
        assert done.wait(30)
    finally:
        committer.close()
    assert sorted(token for token, _ in delivered) == list(range(6))
    assert all(result.ok for _, result in delivered)
    assert committer.groups < len(writers)
    assert rec.flushes() < len(writers)


def test_a_lone_commit_does_not_wait(tmp_path: Path) -> None:
    """Nothing else in flight: the group of one is committed at once, whatever the
    wait allowed (an hour here; the test would time out if it waited)."""
    rec = Recorder()
    store = make_store(tmp_path, rec)
    got = threading.Event()
    committer = GroupCommitter(store, lambda items: got.set(), max_wait=3600.0)
    try:
        committer.submit(begin(store), 0)
        assert got.wait(30)
    finally:
        committer.close()
    # alone: the file's own fsync, not a syncfs
    assert [name for name, _ in rec.log if name != "fsync dir"] == ["fsync file", "publish"]
