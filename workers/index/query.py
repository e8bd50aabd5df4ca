"""Conditions a query pushes into the index's SQL (:meth:`~.base.Index.select`).

A C-FIND's keys become, where SQL can say the same thing (or a little more), a
:class:`Condition` on an index column: the database then returns only the rows that
may match, through its indexes where there is one, rather than every row of the
level. The caller's own matcher stays the final filter, so a condition may let
through rows the matcher refuses (SQLite's ``LIKE`` ignores ASCII case), but it must
never hold back a row the matcher would take.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Condition", "like_pattern", "where_clauses"]

Kind = Literal["eq", "in", "like", "range"]


@dataclass(slots=True, frozen=True)
class Condition:
    """One column condition.

    ``eq``: the column equals ``values[0]``. ``in``: equals one of ``values``.
    ``like``: matches the SQL ``LIKE`` pattern ``values[0]`` (escape character ``\\``,
    see :func:`like_pattern`). ``range``: is not empty and lies between ``values[0]``
    and ``values[1]`` inclusive, in code point order ("" for an open end).
    """

    column: str
    kind: Kind
    values: tuple[str, ...]


def like_pattern(wildcard: str) -> str:
    """The ``LIKE`` pattern (escape ``\\``) of a DICOM wildcard value: ``*`` is any
    run of characters, ``?`` one character (PS3.4 C.2.2.2.4); SQL's own ``%``, ``_``
    and the escape character are literals there, so they are escaped."""
    out = []
    for c in wildcard:
        if c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        elif c in "%_\\":
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def where_clauses(
    conditions: Iterable[Condition], columns: frozenset[str], collate: str = ""
) -> tuple[list[str], list[object]]:
    """SQL clauses (``?`` placeholders) and their parameters; ``collate`` is what
    makes the backend compare text in code point order for ranges (PostgreSQL's
    database collation may be a locale's). Raises ``ValueError`` for a column not in
    ``columns`` (column names reach the SQL text; values never do)."""
    clauses: list[str] = []
    params: list[object] = []
    for cond in conditions:
        col = cond.column
        if col not in columns:
            raise ValueError(f"unknown index column {col!r}")
        if cond.kind == "eq":
            clauses.append(f"{col} = ?")
            params.append(cond.values[0])
        elif cond.kind == "in":
            if not cond.values:
                clauses.append("1 = 0")
                continue
            clauses.append(f"{col} IN ({', '.join('?' * len(cond.values))})")
            params.extend(cond.values)
        elif cond.kind == "like":
            clauses.append(f"{col} LIKE ? ESCAPE '\\'")
            params.append(cond.values[0])
        elif cond.kind == "range":
            low, high = cond.values
            clauses.append(f"{col} <> ''")
            if low:
                clauses.append(f"{col}{collate} >= ?{collate}")
                params.append(low)
            if high:
                clauses.append(f"{col}{collate} <= ?{collate}")
                params.append(high)
        else:
            raise ValueError(f"unknown condition kind {cond.kind!r}")
    return clauses, params
