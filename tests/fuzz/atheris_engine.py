"""atheris entry point: the association engine as acceptor (and, with
``FUZZ_ROLE=requestor``, as requestor) fed the fuzzer's bytes in fuzzer-chosen read
splits. See atheris_common.py and README.md."""

from __future__ import annotations

import os
import sys

from atheris_common import instrumented, knobs, main

with instrumented():  # type: ignore[attr-defined]
    from tests.fuzz import harness as h

ROLE = os.environ.get("FUZZ_ROLE", "acceptor")


def target(data: bytes) -> None:
    fdp, splits = knobs(data)
    config = fdp.ConsumeIntInRange(0, 3)
    flag = fdp.ConsumeBool()
    tick = [0.0, 0.5, 40.0][fdp.ConsumeIntInRange(0, 2)]
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    if ROLE == "requestor":
        h.run_requestor(rest, splits, config_choice=config, send_echo=flag, tick=tick)
    else:
        h.run_acceptor(rest, splits, config_choice=config, use_sink=flag, tick=tick)


def seeds() -> list[bytes]:
    # 9 knob bytes: split count 0 -> 1 split, split 0 (whole), config 0, flag, tick 0
    prefix = bytes(9)
    sessions = h.requestor_seeds() if ROLE == "requestor" else h.acceptor_seeds()
    return [prefix + s for s in sessions]


if __name__ == "__main__":
    sys.exit(main(target, seeds()))
