"""Attribute matching of C-FIND (PS3.4 C.2.2.2) over the columns of the instance index.

Only the attributes the index holds can be matched; they are listed in :data:`KEYS`
with the level they belong to, their VR and the index column. A key for another
attribute is answered with an empty value (the SCP does not support matching on it),
which PS3.4 C.2.2.1.2 allows for optional keys.

The kinds of matching, by VR (PS3.4 C.2.2.2.1-C.2.2.2.5):

* universal: an empty value, or a value of ``*`` only, matches everything;
* single value: the value, without padding; comparison is case-sensitive, except for
  PN (names are matched case-insensitively, as most archives do: C.2.2.2.1 leaves it
  to the SCP);
* list of UID: a UI value with several UIDs separated by ``\\`` matches any of them;
* wildcard: ``*`` (any run of characters) and ``?`` (one character), for every VR
  except UI, DA, TM and DT (and not in a list of UIDs);
* range: DA and TM values ``a-b``, ``-b`` or ``a-`` (inclusive bounds).

:func:`compile_identifier` turns the request's keys into matchers and, where SQL can
say as much, into conditions the index evaluates first (:mod:`workers.index.query`):
single values, lists of UIDs, wildcards (``LIKE``) and DA ranges, so that the database
returns the rows that may match, not every row of the level. The matchers remain the
final filter. Left to them alone: person names (matched ignoring case beyond ASCII,
which SQL's ``LIKE`` and ``lower`` do not do alike on SQLite and PostgreSQL) and TM
values (compared after normalising, ``10`` being ``100000``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..index.query import Condition, like_pattern

__all__ = [
    "KEYS",
    "LEVELS",
    "Key",
    "Matchers",
    "compile_identifier",
    "compile_value",
    "condition_for",
]

#: Query/retrieve levels, top to bottom (PS3.4 C.6.1.1 and C.6.2.1).
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


@dataclass(slots=True, frozen=True)
class Key:
    """A matching key the index can answer."""

    keyword: str
    level: str
    vr: str
    #: IndexRecord attribute; "" for keys computed over several records
    column: str


KEYS: dict[str, Key] = {
    k.keyword: k
    for k in (
        Key("PatientID", "PATIENT", "LO", "patient_id"),
        Key("PatientName", "PATIENT", "PN", "patient_name"),
        Key("StudyInstanceUID", "STUDY", "UI", "study_uid"),
        Key("StudyDate", "STUDY", "DA", "study_date"),
        Key("StudyTime", "STUDY", "TM", "study_time"),
        Key("AccessionNumber", "STUDY", "SH", "accession_number"),
        Key("ModalitiesInStudy", "STUDY", "CS", ""),
        Key("SeriesInstanceUID", "SERIES", "UI", "series_uid"),
        Key("Modality", "SERIES", "CS", "modality"),
        Key("SOPInstanceUID", "IMAGE", "UI", "sop_instance_uid"),
        Key("SOPClassUID", "IMAGE", "UI", "sop_class_uid"),
    )
}

Matcher = Callable[[str], bool]


@dataclass(slots=True)
class Matchers:
    """What one Identifier asks for."""

    #: keyword -> matcher, for keys that are not universal
    match: dict[str, Matcher] = field(default_factory=dict)
    #: index column -> value, the exact single values the index can prefilter on
    equal: dict[str, str] = field(default_factory=dict)
    #: conditions the index can evaluate in SQL (``equal``'s among them)
    conditions: list[Condition] = field(default_factory=list)


def _strip(value: str) -> str:
    # Leading and trailing spaces are padding, not significant (PS3.4 C.2.2.2.1).
    return value.strip(" \x00")


def _wildcard(pattern: str, ignore_case: bool) -> Matcher:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    compiled = re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0))
    return lambda value: compiled.fullmatch(_strip(value)) is not None


def _time_key(value: str) -> str:
    """A TM value comparable as a string: HHMMSS.FFFFFF, missing parts as zeros
    (``10`` is 10:00:00; the old ``10:30`` form too)."""
    value = _strip(value).replace(":", "")
    whole, _, fraction = value.partition(".")
    return whole.ljust(6, "0") + "." + fraction.ljust(6, "0")


def _range(low: str, high: str, vr: str) -> Matcher:
    norm: Callable[[str], str] = _time_key if vr == "TM" else _strip
    lo = norm(low) if _strip(low) else None
    hi = norm(high) if _strip(high) else None
    if vr == "TM" and hi is not None and "." not in _strip(high):
        # "-1030" includes 10:30:59.999999: an upper bound without a fraction covers
        # the whole of its last unit.
        unit = len(_strip(high).replace(":", ""))
        hi = (_strip(high).replace(":", "") + "999999"[: max(0, 6 - unit)]) + ".999999"

    def match(value: str) -> bool:
        if not _strip(value):
            return False  # a value that is not there is not in any range
        v = norm(value)
        return (lo is None or v >= lo) and (hi is None or v <= hi)

    return match


def compile_value(vr: str, raw: str) -> tuple[Matcher | None, str | None]:
    """(matcher, exact value) for one key's value: matcher None for universal
    matching, exact value set when the index can prefilter on equality."""
    value = _strip(raw)
    if value == "" or value == "*":
        return None, None
    if vr == "UI":
        uids = [_strip(u) for u in value.split("\\") if _strip(u)]
        if len(uids) == 1:
            return (lambda v, u=uids[0]: _strip(v) == u), uids[0]
        wanted = frozenset(uids)
        return (lambda v: _strip(v) in wanted), None
    if vr in ("DA", "TM") and "-" in value:
        low, _, high = value.partition("-")
        return _range(low, high, vr), None
    if vr in ("DA", "TM"):
        if vr == "TM":
            key = _time_key(value)
            return (lambda v: _strip(v) != "" and _time_key(v) == key), None
        return (lambda v: _strip(v) == value), value
    if "*" in value or "?" in value:
        return _wildcard(value, ignore_case=vr == "PN"), None
    if vr == "PN":
        folded = value.casefold()
        return (lambda v: _strip(v).casefold() == folded), None
    return (lambda v: _strip(v) == value), value


def condition_for(column: str, vr: str, raw: str) -> Condition | None:
    """The SQL prefilter on ``column`` for one key's value, or None when there is
    none (universal matching, or left to the matcher; see the module doc). Every row
    the matcher of :func:`compile_value` takes meets the condition."""
    value = _strip(raw)
    if value == "" or value == "*" or vr in ("PN", "TM"):
        return None
    if vr == "UI":
        uids = tuple(dict.fromkeys(_strip(u) for u in value.split("\\") if _strip(u)))
        if len(uids) == 1:
            return Condition(column, "eq", uids)
        return Condition(column, "in", uids)
    if vr == "DA":
        if "-" in value:
            low, _, high = value.partition("-")
            return Condition(column, "range", (_strip(low), _strip(high)))
        return Condition(column, "eq", (value,))
    if "*" in value or "?" in value:
        return Condition(column, "like", (like_pattern(value),))
    return Condition(column, "eq", (value,))


def compile_identifier(values: dict[str, str]) -> Matchers:
    """Matchers for the identifier's keys that the index can answer (keyword ->
    string value, multi-valued elements joined with ``\\``)."""
    out = Matchers()
    for keyword, raw in values.items():
        key = KEYS.get(keyword)
        if key is None:
            continue
        matcher, exact = compile_value(key.vr, raw)
        if matcher is None:
            continue
        out.match[keyword] = matcher
        if exact is not None and key.column:
            out.equal[key.column] = exact
        condition = condition_for(key.column, key.vr, raw) if key.column else None
        if condition is not None:
            out.conditions.append(condition)
    return out
