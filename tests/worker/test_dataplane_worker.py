"""The data plane inside a real worker, with DCMTK storescu as the peer: large
instances in small PDUs are written to the instance file by the data plane itself
(on the compiled core and on the pure twin alike, whichever this run selected), and
the stored files are those sent, byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from workers import dataplane
from workers.index.digest import dataset_digest
from workers.storage import FileOps, StorageConfig
from workers.storage.store import InstanceWriter, Store, StoreResult
from workers.telemetry import Telemetry

from .conftest import (
    CT_IMAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    WorkerFactory,
    assert_same_instance,
    encode_plain,
    make_files,
    make_image,
    needs_dcmtk,
    stored_files,
)
from .test_interop_dcmtk import storescu


@pytest.mark.interop
@needs_dcmtk
@pytest.mark.parametrize("transfer_syntax", [IMPLICIT_LE, EXPLICIT_LE])
def test_large_instances_in_small_pdus_go_straight_to_the_file(
    worker_factory: WorkerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    transfer_syntax: str,
) -> None:
    direct: list[int] = []
    original = InstanceWriter.direct_written

    def spy(self: InstanceWriter, n: int, ns: int) -> None:
        direct.append(n)
        original(self, n, ns)

    monkeypatch.setattr(InstanceWriter, "direct_written", spy)
    w = worker_factory(max_pdu_length=4096)  # DCMTK then sends P-DATA-TF of 4 KiB
    files = make_files(tmp_path / "src", 3, transfer_syntax, rows=128, columns=128)
    result = storescu(w, files, "-xe" if transfer_syntax == EXPLICIT_LE else "-xi")
    assert result.returncode == 0, result.stderr
    stored = stored_files(w.root)
    assert len(stored) == len(files)
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert_same_instance(f, stored[uid], same_bytes=True)
    assert sum(direct) > 0, f"no data-set bytes went through the data plane ({dataplane.CORE})"


@pytest.mark.interop
@needs_dcmtk
def test_the_index_digest_rides_the_data_plane(
    worker_factory: WorkerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the index digest on, the data plane still writes the data sets itself,
    and the digest of each instance is the SHA-256 of its data set as stored."""
    direct: list[int] = []
    original = InstanceWriter.direct_written

    def spy(self: InstanceWriter, n: int, ns: int) -> None:
        direct.append(n)
        original(self, n, ns)

    monkeypatch.setattr(InstanceWriter, "direct_written", spy)
    w = worker_factory(
        max_pdu_length=4096, storage=StorageConfig(root=tmp_path / "store", digest=True)
    )
    results: list[StoreResult] = []
    w.server.on_stored = lambda proto, op, result: results.append(result)
    files = make_files(tmp_path / "src", 3, EXPLICIT_LE, rows=128, columns=128)
    result = storescu(w, files, "-xe")
    assert result.returncode == 0, result.stderr
    assert sum(direct) > 0, f"no data-set bytes went through the data plane ({dataplane.CORE})"
    assert len(results) == len(files)
    for stored in results:
        assert stored.ok and stored.path is not None and stored.digest is not None
        assert (stored.bytes_written, stored.digest) == dataset_digest(stored.path)


def _writer_past_its_scan(store: Store) -> InstanceWriter:
    writer = store.begin(CT_IMAGE, "1.2.3.4.5", EXPLICIT_LE)
    writer.write(encode_plain(make_image()))  # the study and series UIDs: scan done
    return writer


def test_telemetry_timed_writes_let_the_data_plane_write(tmp_path: Path) -> None:
    """With metrics on, the store's write is telemetry's timed os.write: the data plane
    may still write directly, and its write time is observed, once per report."""
    telemetry = Telemetry("/nonexistent/metrics.sock", worker_id=0)
    store = Store(StorageConfig(root=tmp_path, fsync="never"), ops=telemetry.file_ops())
    writer = _writer_past_its_scan(store)
    assert writer.direct_fd() >= 0
    before = len(telemetry._writes)
    writer.direct_written(10, 5000)
    assert len(telemetry._writes) == before + 1
    assert telemetry._writes[-1] == pytest.approx(5e-6)
    writer.discard()


def test_injected_writes_keep_the_data_plane_out(tmp_path: Path) -> None:
    """Under fault injection (any write other than os.write), every fragment goes
    through InstanceWriter.write."""
    calls: list[int] = []

    def write(fd: int, data: memoryview) -> int:
        calls.append(len(data))
        return os.write(fd, data)

    store = Store(StorageConfig(root=tmp_path, fsync="never"), ops=FileOps(write=write))
    writer = _writer_past_its_scan(store)
    assert calls
    assert writer.direct_fd() == -1
    writer.discard()
