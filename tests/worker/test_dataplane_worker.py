"""The data plane inside a real worker, with DCMTK storescu as the peer: large
instances in small PDUs are written to the instance file by the data plane itself
(on the compiled core and on the pure twin alike, whichever this run selected), and
the stored files are those sent, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from workers import dataplane
from workers.storage.store import InstanceWriter

from .conftest import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    WorkerFactory,
    assert_same_instance,
    make_files,
    needs_dcmtk,
    stored_files,
)
from .test_interop_dcmtk import storescu

pytestmark = [pytest.mark.interop, needs_dcmtk]


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT_LE, EXPLICIT_LE])
def test_large_instances_in_small_pdus_go_straight_to_the_file(
    worker_factory: WorkerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    transfer_syntax: str,
) -> None:
    direct: list[int] = []
    original = InstanceWriter.direct_written

    def spy(self: InstanceWriter, n: int) -> None:
        direct.append(n)
        original(self, n)

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
