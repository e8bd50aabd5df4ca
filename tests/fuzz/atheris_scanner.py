"""atheris entry point: the storage tag scanner for every transfer syntax (first
byte picks it), fed in fuzzer-chosen fragment splits, with a fuzzer-chosen budget.
See atheris_common.py and README.md."""

from __future__ import annotations

import sys

from atheris_common import instrumented, knobs, main

with instrumented():  # type: ignore[attr-defined]
    from tests.fuzz import harness as h
    from tests.fuzz.test_fuzz_scanner import SEEDS, scan

SYNTAXES = h.SCANNER_TRANSFER_SYNTAXES
BUDGETS = (64, 200, 4096, 64 * 1024)


def target(data: bytes) -> None:
    fdp, splits = knobs(data)
    ts = SYNTAXES[fdp.ConsumeIntInRange(0, len(SYNTAXES) - 1)]
    budget = BUDGETS[fdp.ConsumeIntInRange(0, len(BUDGETS) - 1)]
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    h.run_scanner(ts, rest, splits, budget=budget)
    # the result must not depend on the fragmentation
    whole, pieces = scan(ts, rest, [0], budget), scan(ts, rest, splits, budget)
    if whole.stop_reason != "malformed":  # type: ignore[attr-defined]
        assert whole == pieces, (whole, pieces)


def seeds() -> list[bytes]:
    out = []
    for ts, datasets in SEEDS.items():
        index = SYNTAXES.index(ts) if ts in SYNTAXES else 0
        for data in datasets:
            # knobs: 1 split of 0 bytes (whole), syntax, budget 64 KiB
            out.append(bytes([0, 0, index, 3]) + data)
    return out


if __name__ == "__main__":
    sys.exit(main(target, seeds()))
