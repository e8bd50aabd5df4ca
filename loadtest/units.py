"""Human-friendly numbers on the command line: sizes (``8k``, ``64m``, ``1g``) and lists.

Sizes are binary: ``k`` is 1024 bytes, ``m`` 1024², ``g`` 1024³ (``KiB``, ``MB`` and the
like are accepted too, all binary, as DICOM tools and ``dd`` read them). Throughput is
reported in MB/s of 10⁶ bytes, like every network tool.
"""

from __future__ import annotations

import re

__all__ = ["MB", "format_bytes", "parse_size", "parse_size_list"]

MB = 1_000_000  # throughput unit: MB/s is 10**6 bytes per second

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"8k"`` -> 8192, ``"1.5m"`` -> 1572864, ``"4096"`` -> 4096."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 8192, 8k, 512k, 64m, 1g)")
    number, unit = match.groups()
    return int(float(number) * _FACTORS[unit.lower()])


def parse_size_list(text: str) -> list[int]:
    """``"8k,512k"`` -> [8192, 524288]."""
    return [parse_size(part) for part in text.split(",") if part.strip()]


def format_bytes(n: float) -> str:
    """8192 -> ``"8 KiB"``, 536870912 -> ``"512 MiB"``, 1000 -> ``"1000 B"``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"
