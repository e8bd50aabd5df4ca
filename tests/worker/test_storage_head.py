"""The Part 10 header goes out with the first data-set fragment, in one writev(2).

The stored file is the same as ever (header, then the data set as received); an empty
data set still gets its header (at commit); a failure of that writev fails the
instance with 0xA700 and leaves no file; under injected system calls (fault tests)
the header is written alone at ``begin``, as before.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.fuzz import harness as h
from workers.storage import FileOps, StorageConfig, Store, StoreStatus
from workers.storage.filemeta import encode_file_meta_reference

CT = h.CT_IMAGE_STORAGE
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _store(tmp_path: Path, ops: FileOps | None = None) -> Store:
    return Store(StorageConfig(root=tmp_path / "store", fsync="never"), ops=ops)


def _header(uid: str) -> bytes:
    return encode_file_meta_reference(CT, uid, EXPLICIT_LE, source_ae="SCU")


def _writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (call, bytes) of the store's os.write / os.writev calls."""
    calls: list[tuple[str, int]] = []
    real_writev = os.writev

    def writev(fd: int, buffers: list[bytes]) -> int:
        calls.append(("writev", sum(len(b) for b in buffers)))
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    return calls


def test_header_and_first_fragment_in_one_writev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path)
    calls = _writes(monkeypatch)
    ds = h.minimal_dataset("77")
    writer = store.begin(CT, "1.2.3.4.77", EXPLICIT_LE, "SCU")
    assert writer.temp_path is not None and os.path.getsize(writer.temp_path) == 0
    writer.write(ds[:10])
    writer.write(ds[10:])
    result = writer.commit()
    assert result.status == StoreStatus.SUCCESS and result.path is not None
    assert Path(result.path).read_bytes() == _header("1.2.3.4.77") + ds
    assert calls == [("writev", len(_header("1.2.3.4.77")) + 10)]
    assert result.bytes_written == len(ds)


def test_an_empty_data_set_gets_its_header_at_commit(tmp_path: Path) -> None:
    writer = _store(tmp_path).begin(CT, "1.2.3.4.78", EXPLICIT_LE, "SCU")
    result = writer.commit()
    assert result.status == StoreStatus.SUCCESS and result.path is not None
    assert Path(result.path).read_bytes() == _header("1.2.3.4.78")


@pytest.mark.parametrize("fragments", [0, 1])
def test_a_failed_header_write_fails_the_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fragments: int
) -> None:
    store = _store(tmp_path)

    def writev(fd: int, buffers: list[bytes]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", writev)
    writer = store.begin(CT, "1.2.3.4.79", EXPLICIT_LE, "SCU")
    for _ in range(fragments):
        writer.write(h.minimal_dataset("79"))
    result = writer.commit()
    assert result.status == StoreStatus.OUT_OF_RESOURCES
    assert result.comment == "Storage failure at write: ENOSPC"
    assert not list((tmp_path / "store").rglob("*.dcm"))
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


def test_short_writev_goes_on_with_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writev that stops part way (in the header, or in the fragment) is finished
    by plain writes: the file is complete."""
    ds = h.minimal_dataset("80")
    for stop in (5, len(_header("1.2.3.4.80")) + 3):
        store = _store(tmp_path / str(stop))

        def writev(fd: int, buffers: list[bytes], stop: int = stop) -> int:
            return os.write(fd, b"".join(bytes(b) for b in buffers)[:stop])

        monkeypatch.setattr(os, "writev", writev)
        writer = store.begin(CT, "1.2.3.4.80", EXPLICIT_LE, "SCU")
        writer.write(ds)
        result = writer.commit()
        assert result.path is not None
        assert Path(result.path).read_bytes() == _header("1.2.3.4.80") + ds


def test_injected_writes_see_the_header_alone_at_begin(tmp_path: Path) -> None:
    seen: list[int] = []

    def write(fd: int, view: memoryview) -> int:
        seen.append(len(view))
        return os.write(fd, view)

    store = _store(tmp_path, FileOps(write=write))
    writer = store.begin(CT, "1.2.3.4.81", EXPLICIT_LE, "SCU")
    assert seen == [len(_header("1.2.3.4.81"))]
    writer.write(h.minimal_dataset("81"))
    assert seen[1:] == [len(h.minimal_dataset("81"))]
    assert writer.commit().status == StoreStatus.SUCCESS
