"""Unit tests of the load generator's pieces: sizes, histogram, payload templates."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from loadtest.config import RunConfig
from loadtest.histogram import Histogram
from loadtest.payload import (
    BLOCK,
    CT_IMAGE_STORAGE,
    JOIN_LIMIT,
    UidSource,
    build_template,
    new_run_id,
)
from loadtest.units import format_bytes, parse_size, parse_size_list
from workers.scu.codec import decode_dataset

from .conftest import EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE


def test_parse_size() -> None:
    assert parse_size("8192") == 8192
    assert parse_size("8k") == 8192
    assert parse_size("512K") == 512 * 1024
    assert parse_size("64m") == 64 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5m") == 3 << 19
    assert parse_size_list("8k, 512k") == [8192, 512 * 1024]
    with pytest.raises(ValueError):
        parse_size("lots")
    assert format_bytes(8192) == "8 KiB"
    assert format_bytes(3 << 19) == "1.5 MiB"


def test_histogram_percentiles_within_one_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-7, 1.2) for _ in range(20000)]
    h = Histogram()
    for v in values:
        h.record(v)
    exact = sorted(values)
    for q in (50, 95, 99):
        true = exact[int(len(exact) * q / 100) - 1]
        assert abs(h.percentile(q) - true) / true < 0.02
    assert h.percentile(100) == max(values)
    assert h.count == len(values)
    # merging two halves gives the same answer as one histogram of everything
    a, b = Histogram(), Histogram()
    for i, v in enumerate(values):
        (a if i % 2 else b).record(v)
    merged = Histogram.from_wire(a.to_wire())
    merged.merge(Histogram.from_wire(b.to_wire()))
    assert merged.counts == h.counts
    assert merged.maximum == h.maximum and merged.minimum == h.minimum
    assert Histogram().percentile(99) == 0.0


@pytest.mark.parametrize("ts", [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE])
@pytest.mark.parametrize("size", [8 * 1024, 512 * 1024, 9 * 1024 * 1024 + 6])
def test_template_decodes_with_new_uids(ts: str, size: int) -> None:
    uids = UidSource(new_run_id(), 3)
    template = build_template(size, CT_IMAGE_STORAGE, ts, uids)
    assert size - 8192 < template.size <= size
    seen = set()
    for _ in range(3):
        uid = uids.next()
        assert len(uid) == uids.length and uid not in seen
        seen.add(uid)
        parts = template.parts(uid)
        assert sum(len(p) for p in parts) == template.size
        assert all(len(p) % 2 == 0 for p in parts)  # DCMTK refuses odd fragments
        assert (len(parts) == 1) == (template.size <= JOIN_LIMIT)
        data = template.data(uid)
        assert hashlib.sha256(data).hexdigest() == template.sha256(uid)
        ds = decode_dataset(data, ts)
        assert ds.SOPInstanceUID == uid
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.StudyInstanceUID == uids.study_uid
        assert len(ds.PixelData) == template.pixel_length
        assert ds.Rows * ds.Columns * int(ds.NumberOfFrames) * 2 == template.pixel_length


def test_two_gib_template_is_views_of_one_block() -> None:
    uids = UidSource(new_run_id(), 0)
    template = build_template(2 << 30, CT_IMAGE_STORAGE, EXPLICIT_LE, uids)
    parts = template.parts(uids.next())
    assert sum(len(p) for p in parts) == template.size > (2 << 30) - (1 << 20)
    views = parts[1:]
    assert all(isinstance(v, memoryview) for v in views)
    assert len({id(v.obj) for v in views if isinstance(v, memoryview)}) == 1  # one block
    assert len(views[0]) == BLOCK


def test_uid_components_have_no_leading_zeros() -> None:
    uids = UidSource("1234567890", 0)
    for _ in range(5):
        uid = uids.next()
        assert all(c == "0" or not c.startswith("0") for c in uid.split("."))
        assert len(uid) <= 64


def test_bad_sizes_and_syntaxes() -> None:
    uids = UidSource(new_run_id(), 0)
    with pytest.raises(ValueError):
        build_template(4096, CT_IMAGE_STORAGE, EXPLICIT_LE, uids)
    with pytest.raises(ValueError):
        build_template(8192, CT_IMAGE_STORAGE, "1.2.840.10008.1.2.4.50", uids)


def test_shares_split_everything() -> None:
    cfg = RunConfig(processes=3, associations=7, count=100, rate=70.0)
    shares = cfg.shares()
    assert [s.associations for s in shares] == [3, 2, 2]
    assert sum(s.count or 0 for s in shares) == 100
    assert sum(s.rate or 0 for s in shares) == pytest.approx(70.0)
    # never more processes than associations
    assert len(RunConfig(processes=4, associations=2).shares()) == 2


def test_a_run_too_short_to_time_gives_no_rate() -> None:
    """Every operation failed at the same instant: the report says 0/s, not 3e9/s."""
    from loadtest.stats import Report, Stats

    stats = Stats(operations=3, failed=3, started=100.0, finished=100.0)
    report = Report(stats, "store", {}, 8192, 1)
    data = report.to_json()
    assert data["operations_per_second"] == 0.0
    assert data["instances_per_second"] == 0.0
    assert "(0.0/s)" in report.text()
    timed = Report(Stats(operations=3, started=100.0, finished=101.5), "store", {}, 8192, 1)
    assert timed.to_json()["operations_per_second"] == 2.0


def test_compare_refuses_a_missing_workdir_in_one_line(tmp_path: Path) -> None:
    from loadtest import compare

    missing = tmp_path / "nope"
    code, err = _run_compare(["--receivers", "pacs-receiver", "--workdir", str(missing)])
    assert code == 2
    assert err.strip().splitlines() == [f"compare: --workdir {missing}: no such directory"]
    assert compare.PNG_NEEDS.startswith("--png needs matplotlib")


def test_compare_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With matplotlib (the 'plot' extra) a PNG is drawn; without it, --png is refused
    before anything runs, in one line."""
    from loadtest import compare

    cells = [
        compare.Cell(receiver=name, size=8192, associations=1, instances_per_second=v)
        for name, v in (("pacs-receiver", 900.0), ("storescp", 300.0))
    ]
    out = tmp_path / "chart.png"
    assert compare.write_png(str(out), cells) is None
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(compare, "_matplotlib_missing", lambda: True)
    code, err = _run_compare(["--receivers", "pacs-receiver", "--png", str(tmp_path / "x.png")])
    assert code == 2
    assert err.strip().splitlines() == [f"compare: {compare.PNG_NEEDS}"]


def _run_compare(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from loadtest import compare

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = compare.main(argv)
    return code, err.getvalue()
