"""The tests' DCMTK lookup never returns pynetdicom's same-named scripts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.dcmtk import dcmtk


@pytest.mark.parametrize("name", ["storescu", "echoscu", "storescp", "findscu"])
def test_dcmtk_is_dcmtk_even_behind_the_venv(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A directory first on PATH with a script of the same name, as the venv's bin has
    # with pynetdicom installed.
    fake = tmp_path / name
    fake.write_text("#!/bin/sh\necho not dcmtk\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path), str(Path(sys.executable).parent)]))
    found = dcmtk(name)
    if found is None:
        pytest.skip(f"DCMTK {name} is not installed (make system-deps)")
    assert found != str(fake)
    assert not found.startswith(sys.prefix)
    assert Path(found).read_bytes()[:4] == b"\x7fELF"
