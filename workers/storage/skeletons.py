"""Recently seen data-set layouts, learnt by the tag scanner (:mod:`.scanner`) and
matched in one regular-expression call instead of its per-element walk."""

from __future__ import annotations

import re
from typing import Any, Protocol

from .elements import (
    _CODECS,
    _ITEM_GROUP,
    _SERIES_INSTANCE_UID,
    _UNDEFINED,
    _WANTED,
    MAX_VALUE_LENGTH,
    _text,
)

__all__ = ["SKELETONS", "Skeletons"]


class _Scan(Protocol):
    """What a match fills in: the scanner's state (a :class:`~.scanner.TagScanner`)."""

    _budget: int
    _found: dict[int, str]
    _pos: int

    def _finish(self, reason: Any) -> None: ...


class Skeletons:
    """Recently seen data-set layouts, each as one anchored regular expression.

    Instances from one sender are usually laid out alike: the same elements before
    (0020,000E), with the same VRs and value lengths; only the values differ. After
    a walk that ended on (0020,000E) within the first fragment, the layout it walked
    (every element header byte for byte, every value as "that many bytes", the
    wanted values as groups) is compiled into a pattern. A later first fragment
    that matches one is exactly what the walk would have walked, header by header
    (the walk only ever looks at header bytes, and the pattern spells them out), so
    the groups are the values the walk would have taken, in the same order; one
    ``match`` in C replaces the per-element loop. No match: the walk runs as before.

    Learning costs a second walk and a compile (~100 µs), so it is rationed by
    credit: matches earn it, misses earn a little; a sender whose layouts never
    repeat costs at most one compile per 512 instances. Top-level elements of
    defined length only; a layout with an undefined-length element is not learnt.
    At most :attr:`SIZE` patterns per encoding, most recently matched first.
    """

    SIZE = 8
    _LEARN_COST = 16.0
    _CREDIT_MAX = 64.0

    def __init__(self) -> None:
        self._by_encoding: dict[int, list[tuple[Any, tuple[int, ...]]]] = {}
        self._credit = self._LEARN_COST

    def match(self, scanner: _Scan, encoding: int, view: memoryview) -> bool:
        patterns = self._by_encoding.get(encoding)
        if not patterns:
            return False
        for k, (pattern, tags) in enumerate(patterns):
            m = pattern.match(view)
            if m is None or m.end() > scanner._budget:
                continue
            if k:  # most recently matched first
                patterns.insert(0, patterns.pop(k))
            if self._credit < self._CREDIT_MAX:
                self._credit += 1.0
            found = scanner._found
            for tag, raw in zip(tags, m.groups(), strict=True):
                text = _text(tag, raw)
                if text:
                    found[tag] = text
            scanner._pos = m.end()
            scanner._finish("complete")
            return True
        return False

    def missed(self, encoding: int, view: memoryview, end: int, budget: int) -> None:
        """A walk of ``view`` ended on (0020,000E) at ``end``: maybe learn its layout."""
        self._credit += 1.0 / 32
        if self._credit < self._LEARN_COST or end > len(view) or end > budget:
            return
        self._credit -= self._LEARN_COST
        learnt = _learn(view, encoding, end)
        if learnt is not None:
            patterns = self._by_encoding.setdefault(encoding, [])
            patterns.insert(0, learnt)
            del patterns[self.SIZE :]


def _learn(buf: memoryview, encoding: int, end: int) -> tuple[Any, tuple[int, ...]] | None:
    """The layout of the top-level elements in ``buf[:end]`` as (pattern, wanted tags),
    mirroring what _walk_top_explicit/_walk_top_implicit take; None if not simple."""
    implicit, header, u32, vr_class = _CODECS[encoding]
    parts: list[bytes] = []
    tags: list[int] = []
    i = 0
    while i < end:
        if implicit:
            group, elem, length = header(buf, i)
            size = 8
        else:
            group, elem, vr, length = header(buf, i)
            cls = vr_class.get(vr)
            if cls is None:
                return None
            size = 8
            if cls:
                (length,) = u32(buf, i + 8)
                size = 12
        if length == _UNDEFINED or group == _ITEM_GROUP:
            return None
        tag = group << 16 | elem
        parts.append(re.escape(bytes(buf[i : i + size])))
        i += size
        if tag in _WANTED and length <= MAX_VALUE_LENGTH:
            parts.append(b"(.{%d})" % length)
            tags.append(tag)
        else:
            parts.append(b".{%d}" % length)
        i += length
        if tag == _SERIES_INSTANCE_UID:
            break
    if i != end or not tags or tags[-1] != _SERIES_INSTANCE_UID:
        return None
    return re.compile(b"".join(parts), re.DOTALL), tuple(tags)


#: the process-wide layouts (one scanner runs at a time per event loop)
SKELETONS = Skeletons()
