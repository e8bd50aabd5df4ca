"""Storage faults at the worker level, as a sender sees them: a storage directory that
turns read-only, and fsync failing. Each gets 0xA700 Out of Resources, nothing
partial under a final name, and the worker goes on serving."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.worker.conftest import WorkerFactory
from workers.datasets import encode_dataset
from workers.engine import acse
from workers.scu import associate
from workers.storage.config import FileOps

CT = "1.2.840.10008.5.1.4.1.1.2"


def instance() -> tuple[str, bytes]:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1415.98.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1415.98.2"
    ds.add_new(0x00091010, "OB", os.urandom(4096))
    return str(ds.SOPInstanceUID), encode_dataset(ds, ExplicitVRLittleEndian)


def store_all(port: int, count: int) -> list[tuple[str, Any]]:
    async def run() -> list[tuple[str, Any]]:
        assoc = await associate(
            "127.0.0.1", port, contexts=[acse.Requested(CT, (ExplicitVRLittleEndian,))]
        )
        out = []
        try:
            for _ in range(count):
                uid, data = instance()
                rsp = await assoc.send_c_store(
                    data,
                    sop_class_uid=CT,
                    sop_instance_uid=uid,
                    transfer_syntax=ExplicitVRLittleEndian,
                )
                out.append((uid, rsp))
        finally:
            await assoc.release()
        return out

    return asyncio.run(run())


def final_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.dcm") if ".incoming" not in p.parts]


def incoming(root: Path) -> list[Path]:
    return [p for p in (root / ".incoming").iterdir()] if (root / ".incoming").exists() else []


def test_fsync_error_answers_out_of_resources(worker_factory: WorkerFactory) -> None:
    failing = {"on": True}

    def fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, "injected fsync failure")
        os.fsync(fd)

    w = worker_factory(fsync="always", store_ops=replace(FileOps(), fsync=fsync))
    results = store_all(w.port, 3)
    assert [rsp.Status for _, rsp in results] == [0xA700] * 3
    assert final_files(w.root) == [] and incoming(w.root) == []
    failing["on"] = False  # the disk is fixed: the same worker stores again
    results = store_all(w.port, 2)
    assert [rsp.Status for _, rsp in results] == [0x0000] * 2
    assert len(final_files(w.root)) == 2


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_storage_made_read_only_answers_out_of_resources(
    worker_factory: WorkerFactory, tmpfs: Path
) -> None:
    root = tmpfs / "store"
    w = worker_factory(root=root)
    assert [rsp.Status for _, rsp in store_all(w.port, 2)] == [0x0000] * 2
    before = sorted(final_files(root))
    # Root ignores file permissions: make the filesystem itself read-only.
    done = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only: {done.stderr.decode().strip()}")
    try:
        results = store_all(w.port, 3)
        assert [rsp.Status for _, rsp in results] == [0xA700] * 3
        assert sorted(final_files(root)) == before  # nothing new, nothing partial
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], capture_output=True)
    assert [rsp.Status for _, rsp in store_all(w.port, 1)] == [0x0000]
    assert len(final_files(root)) == len(before) + 1
    assert incoming(root) == []
