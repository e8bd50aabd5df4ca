"""Shared plumbing of the atheris entry points (``tests/fuzz/atheris_*.py``).

Each entry point is a script: ``.venv/bin/python tests/fuzz/atheris_engine.py
[libFuzzer flags] [corpus dir]``, e.g. ``-max_total_time=60 -max_len=8192``. The
harness properties (:mod:`tests.fuzz.harness`) are asserted on every input; a
failing assertion or an exception is a crash, saved by libFuzzer as ``crash-<sha1>``
for replay (``python tests/fuzz/atheris_engine.py crash-<sha1>``).

Without any corpus argument the script seeds a temporary corpus from the harness's
valid sessions, so that mutation starts from real DICOM.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

try:
    import atheris
except ImportError:  # pragma: no cover - opt-in tool
    sys.exit("atheris is not installed: .venv/bin/pip install atheris")


def main(target: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    """Run ``target`` under libFuzzer; seed a corpus unless one is given."""
    argv = list(sys.argv)
    if not any(not arg.startswith("-") for arg in argv[1:]):
        corpus = tempfile.mkdtemp(prefix="pacsrx-fuzz-")
        for n, seed in enumerate(seeds):
            with open(os.path.join(corpus, f"seed-{n:03d}"), "wb") as fh:
                fh.write(seed)
        argv.append(corpus)
        print(f"seed corpus: {corpus}", file=sys.stderr)
    atheris.Setup(argv, target)
    atheris.Fuzz()


def knobs(data: bytes) -> tuple[atheris.FuzzedDataProvider, list[int]]:
    """A data provider, and read splits drawn from its first bytes."""
    fdp = atheris.FuzzedDataProvider(data)
    count = fdp.ConsumeIntInRange(1, 6)
    splits = [fdp.ConsumeIntInRange(0, 300) for _ in range(count)]
    return fdp, splits


def instrumented() -> object:
    """``with instrumented():`` around the imports of the code under test."""
    return atheris.instrument_imports(include=["workers"])
