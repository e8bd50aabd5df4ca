"""Cost of one user identity check (type 2) per password hash scheme: ms per verify.

The check runs in the worker's handler thread pool, once per association that carries
a username and passcode, so its cost bounds how fast such associations can open and
how much memory concurrent checks hold. This prints the median time of
``PasswordHash.verify`` for the default of each scheme (argon2id for new hashes; the
earlier scrypt and PBKDF2 defaults) and a few argon2id alternatives, one thread and
then two threads at once (the per-check time when two checks overlap), with the load
average before and after::

    .venv/bin/python benchmarks/bench_password_hashes.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from workers.identity.passwords import PasswordHash, hash_password

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("argon2id m=19 MiB t=2 p=1 (default)", "argon2id", {}),
    (
        "argon2id m=64 MiB t=3 p=4 (argon2-cffi's)",
        "argon2id",
        {"memory_kib": 65536, "time_cost": 3, "lanes": 4},
    ),
    ("argon2id m=46 MiB t=1 p=1", "argon2id", {"memory_kib": 47104, "time_cost": 1}),
    ("scrypt n=2^14 r=8 p=1 (earlier default)", "scrypt", {}),
    ("pbkdf2-sha256 i=600000", "pbkdf2-sha256", {}),
]


def median_ms(h: PasswordHash, rounds: int, threads: int) -> float:
    def one(_: int) -> float:
        start = time.perf_counter()
        assert h.verify(b"correct horse battery")
        return time.perf_counter() - start

    with ThreadPoolExecutor(threads) as pool:
        times = list(pool.map(one, range(rounds * threads)))
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="verifies per case (15)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for name, scheme, params in CASES:
        h = PasswordHash.parse(hash_password("correct horse battery", scheme, **params))
        one = median_ms(h, args.rounds, 1)
        two = median_ms(h, args.rounds, 2)
        print(f"{name:44s} {one:7.1f} ms   2 threads: {two:7.1f} ms per check")
    print(f"load average after:  {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
