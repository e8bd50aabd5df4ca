"""Benchmark the storage tag scanner (workers/storage/scanner.py): µs per instance.

The data set is pydicom's ``examples.ct`` (a GE CT slice: ~120 top-level elements,
a defined-length sequence and private groups before (0020,000D)) with a bigger pixel
array, encoded the way a C-STORE sender puts it on the wire (data set only) in each
transfer-syntax family the scanner distinguishes. Each instance is scanned the way
``InstanceWriter.write`` does it: a fresh ``TagScanner``, ``feed`` until done,
``result()``; once with the whole data set as one fragment and once in 16 KiB
fragments (memoryviews, like the engine's).

This is a performance guard, not a test: run it by hand or in CI with ``--max-us`` to
fail (exit status 1) when any case is slower than that::

    .venv/bin/python benchmarks/bench_scanner.py
    .venv/bin/python benchmarks/bench_scanner.py --max-us 60
    .venv/bin/python benchmarks/bench_scanner.py --scanner /tmp/old_scanner.py  # compare

pydicom is only used here to build the data sets, never while timing.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
import timeit
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from pydicom import examples
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
SYNTAXES = {
    "implicit LE": IMPLICIT_LE,
    "explicit LE": EXPLICIT_LE,
    "explicit BE": EXPLICIT_BE,
    "deflated": DEFLATED,
    "encapsulated": JPEG_BASELINE,
}
FRAGMENT = 16 * 1024


def build_ct(rows: int, columns: int, syntax: str) -> Dataset:
    """``examples.ct`` with a ``rows`` x ``columns`` 16-bit pixel array."""
    ds = copy.deepcopy(examples.ct)
    del ds.file_meta
    ds.Rows = rows
    ds.Columns = columns
    if syntax == JPEG_BASELINE:
        # Fake JPEG fragments: only the encapsulation structure matters to the scanner.
        frame = b"\xff\xd8" + bytes(range(251)) * (rows * columns // 251) + b"\xff\xd9"
        ds.PixelData = encapsulate([frame], fragments_per_frame=3)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = bytes(i % 251 for i in range(rows * columns * 2))
        ds["PixelData"].VR = "OW"
    return ds


def encode(ds: Dataset, syntax: str) -> bytes:
    """The data set as it travels in P-DATA: no preamble, no file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian = syntax != EXPLICIT_BE
    fp.is_implicit_VR = syntax == IMPLICIT_LE
    write_dataset(fp, ds)
    data = fp.getvalue()
    if syntax == DEFLATED:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


def load_scanner(path: str | None) -> ModuleType:
    if path is None:
        from workers.storage import scanner

        return scanner
    spec = importlib.util.spec_from_file_location("bench_scanner_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_case(scanner_cls: Any, syntax: str, pieces: list[memoryview]) -> Callable[[], Any]:
    def run() -> Any:
        scanner = scanner_cls(syntax)
        for piece in pieces:
            if scanner.feed(piece):
                break
        return scanner.result()

    return run


def per_call_us(func: Callable[[], Any], min_time: float, repeat: int) -> float:
    # CPU time of this process, not wall time: the figures stay comparable on a
    # machine that is busy with other work (best of `repeat` still filters the rest).
    timer = timeit.Timer(func, timer=time.process_time)
    number, _ = timer.autorange()
    number = max(number, int(number * min_time / 0.2))
    best = min(timer.repeat(repeat=repeat, number=number))
    return best / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--columns", type=int, default=256)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per repeat")
    parser.add_argument("--repeat", type=int, default=7, help="repeats; the best counts")
    parser.add_argument("--max-us", type=float, default=None, help="fail above this")
    parser.add_argument("--scanner", default=None, help="scanner module file to measure")
    args = parser.parse_args(argv)

    module = load_scanner(args.scanner)
    source = build_ct(args.rows, args.columns, EXPLICIT_LE)
    print(
        f"examples.ct {args.rows}x{args.columns}x16 bit; "
        f"fragments of {FRAGMENT // 1024} KiB; CPU µs per instance (best of {args.repeat})"
    )
    print(f"{'syntax':<14}{'bytes':>9}{'whole':>10}{'16 KiB':>10}")
    worst = 0.0
    for name, syntax in SYNTAXES.items():
        ds = build_ct(args.rows, args.columns, syntax)
        data = encode(ds, syntax)
        view = memoryview(data)
        cases = {
            "whole": [view],
            "16 KiB": [view[k : k + FRAGMENT] for k in range(0, len(data), FRAGMENT)],
        }
        timings = []
        for pieces in cases.values():
            run = make_case(module.TagScanner, syntax, pieces)
            result = run()
            if (
                result.stop_reason != "complete"
                or result.study_instance_uid != source.StudyInstanceUID
                or result.series_instance_uid != source.SeriesInstanceUID
            ):
                print(f"{name}: wrong result {result}", file=sys.stderr)
                return 1
            timings.append(per_call_us(run, args.min_time, args.repeat))
        worst = max(worst, *timings)
        print(f"{name:<14}{len(data):>9}" + "".join(f"{t:>10.1f}" for t in timings))
    if args.max_us is not None and worst > args.max_us:
        print(f"FAIL: {worst:.1f} µs per instance > {args.max_us} µs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
