"""The built-in C-FIND, C-GET and C-MOVE SCP over the instance index and the store.

The three are handlers written to the contract :mod:`workers.services` drives for user
handlers (generators yielding ``(status, identifier)``; the number of sub-operations
then ``(status, dataset)``; for C-MOVE first the destination's ``(host, port)``), so
pending responses, C-CANCEL, sub-operation counting and the C-MOVE sub-associations
are the same code as for a user's handler. They are plain generators: the worker runs
them in its handler thread pool, where reading the index and the files does not hold
up the event loop. They are bound only when ``--query-retrieve`` is on and the user
bound no handler of their own to the event.

Models: Patient Root and Study Root (PS3.4 C.6.1, C.6.2), levels PATIENT (Patient
Root only), STUDY, SERIES, IMAGE. Keys are matched as :mod:`.matching` says; keys
below the query level are ignored, as a hierarchical query has none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .matching import KEYS, LEVELS, compile_identifier

if TYPE_CHECKING:
    from ..session import IndexedPort

log = logging.getLogger("workers.qr")

__all__ = ["QUERY_MODELS", "QueryRetrieve"]

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

#: abstract syntax -> the levels its information model has
QUERY_MODELS: dict[str, tuple[str, ...]] = {
    PATIENT_ROOT_FIND: LEVELS,
    PATIENT_ROOT_MOVE: LEVELS,
    PATIENT_ROOT_GET: LEVELS,
    STUDY_ROOT_FIND: LEVELS[1:],
    STUDY_ROOT_MOVE: LEVELS[1:],
    STUDY_ROOT_GET: LEVELS[1:],
}

#: the column that tells entities of a level apart
_LEVEL_COLUMN = {
    "PATIENT": "patient_id",
    "STUDY": "study_uid",
    "SERIES": "series_uid",
    "IMAGE": "sop_instance_uid",
}

PENDING = 0xFF00
#: Identifier does not match SOP Class (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
IDENTIFIER_DOES_NOT_MATCH = 0xA900
#: SOP Class not supported (PS3.7 C.5.13 / C.4.1.1.4)
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: Unable to process
UNABLE_TO_PROCESS = 0xC000


class QueryRetrieve:
    """The handlers, bound with ``args=()`` to EVT_C_FIND / EVT_C_GET / EVT_C_MOVE."""

    def __init__(self, services: IndexedPort) -> None:
        self.services = services

    # ------------------------------------------------------------------ handlers

    def find(self, event: Any) -> Iterator[tuple[int, Any]]:
        """EVT_C_FIND: one pending response per matching entity."""
        prepared = self._prepare(event, "C-FIND")
        if isinstance(prepared, int):
            yield prepared, None
            return
        level, identifier, groups = prepared
        self.services.count("query", level)
        for key, records in groups.items():
            if event.is_cancelled:
                return
            yield PENDING, self._answer(identifier, level, key, records)

    def get(self, event: Any) -> Iterator[Any]:
        """EVT_C_GET: the number of instances, then each instance's data set."""
        prepared = self._prepare(event, "C-GET")
        if isinstance(prepared, int):
            yield 0
            yield prepared, None
            return
        self.services.count("retrieve", "C-GET")
        yield from self._instances(event, prepared[2])

    def move(self, event: Any) -> Iterator[Any]:
        """EVT_C_MOVE: the destination from ``[remote-aes]`` (unknown: 0xA801), the
        number of instances, then each instance's data set."""
        destination = str(getattr(event.request, "MoveDestination", "") or "").strip()
        remote = self.services.settings.remote_aes.get(destination)
        if remote is None:
            log.warning("C-MOVE to %r: not in [remote-aes]", destination)
            yield None, None
            return
        yield remote.host, remote.port
        prepared = self._prepare(event, "C-MOVE")
        if isinstance(prepared, int):
            yield 0
            yield prepared, None
            return
        self.services.count("retrieve", "C-MOVE")
        yield from self._instances(event, prepared[2])

    # ------------------------------------------------------------------- parts

    def _prepare(self, event: Any, what: str) -> int | tuple[str, Any, dict[str, list[Any]]]:
        """(level, identifier, matching records grouped by entity) or a failure status."""
        levels = QUERY_MODELS.get(event.context.abstract_syntax)
        if levels is None:
            return SOP_CLASS_NOT_SUPPORTED
        try:
            identifier = event.identifier
        except Exception as exc:
            log.warning("%s: identifier cannot be decoded: %s", what, exc)
            return UNABLE_TO_PROCESS
        level = str(getattr(identifier, "QueryRetrieveLevel", "") or "").strip().upper()
        if level not in levels:
            log.info("%s: level %r not in the model %s", what, level, levels)
            return IDENTIFIER_DOES_NOT_MATCH
        depth = LEVELS.index(level)
        values: dict[str, str] = {}
        for elem in identifier:
            key = KEYS.get(elem.keyword)
            if key is None or LEVELS.index(key.level) > depth:
                continue  # not indexed, or below the level asked for
            values[elem.keyword] = _text(elem.value)
        matchers = compile_identifier(values)
        modalities = matchers.match.pop("ModalitiesInStudy", None)
        records = self.services.select(level, matchers.equal)
        column_matchers = [
            (KEYS[kw].column, m) for kw, m in matchers.match.items() if KEYS[kw].column
        ]
        groups: dict[str, list[Any]] = {}
        column = _LEVEL_COLUMN[level]
        for record in records:
            if record.state != "present":
                continue
            if all(m(getattr(record, col)) for col, m in column_matchers):
                groups.setdefault(getattr(record, column), []).append(record)
        if modalities is not None:
            wanted = values["ModalitiesInStudy"]
            groups = {
                k: rs
                for k, rs in groups.items()
                if _any_modality(wanted, self._study_modalities(rs))
            }
        return level, identifier, groups

    def _study_modalities(self, records: list[Any]) -> set[str]:
        return {r.modality for r in records if r.modality}

    def _answer(self, identifier: Any, level: str, key: str, records: list[Any]) -> Any:
        """The C-FIND response identifier for one entity."""
        from pydicom import Dataset
        from pydicom.dataelem import DataElement

        first = records[0]
        depth = LEVELS.index(level)
        ds = Dataset()
        non_ascii = False
        for elem in identifier:
            kw = elem.keyword
            if elem.tag.group == 0x0008 and elem.tag.element == 0x0005:
                continue  # SpecificCharacterSet: set below from what is answered
            value: Any = None
            known = KEYS.get(kw)
            if kw == "QueryRetrieveLevel":
                value = level
            elif known is not None and known.column and LEVELS.index(known.level) <= depth:
                value = getattr(first, known.column) or None
            elif kw == "ModalitiesInStudy" and depth >= 1:
                value = sorted(self._study_modalities(records)) or None
            elif kw == "RetrieveAETitle":
                value = self.services.ae_title
            elif kw == "InstanceAvailability":
                value = "ONLINE"
            elif kw in _COUNTS and _COUNTS[kw][0] == level:
                value = len({getattr(r, _COUNTS[kw][1]) for r in records})
            if elem.VR == "SQ":
                ds.add(DataElement(elem.tag, "SQ", []))
                continue
            if isinstance(value, str) and not value.isascii():
                non_ascii = True
            ds.add(DataElement(elem.tag, elem.VR, value))
        # The unique keys of the level and those above it are always returned
        # (PS3.4 C.4.1.2.3: and a hierarchical answer names its parents).
        for above in LEVELS[: depth + 1]:
            unique = _UNIQUE[above]
            if unique not in ds and (above != "PATIENT" or first.patient_id):
                ds.add_new(unique, KEYS[unique].vr, getattr(first, KEYS[unique].column))
        if "QueryRetrieveLevel" not in ds:
            ds.QueryRetrieveLevel = level
        if non_ascii:
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds

    def _instances(self, event: Any, groups: dict[str, list[Any]]) -> Iterator[Any]:
        """The retrieve's instances: the count of those whose file is there, then
        each data set, read from the store only when its turn comes."""
        import pydicom

        root = self.services.storage_root
        paths = []
        for records in groups.values():
            for record in records:
                path = os.path.join(root, record.path)
                if os.path.isfile(path):
                    paths.append(path)
                else:
                    log.warning("retrieve: %s is in the index but not on disk", path)
        yield len(paths)
        for path in paths:
            if event.is_cancelled:
                return
            try:
                ds = pydicom.dcmread(path)
            except Exception as exc:  # deleted or damaged since: skip it, keep going
                log.warning("retrieve: cannot read %s: %s", path, exc)
                continue
            yield PENDING, ds


_UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

#: computed return keys: keyword -> (level it is asked at, column whose distinct values count)
_COUNTS = {
    "NumberOfPatientRelatedStudies": ("PATIENT", "study_uid"),
    "NumberOfPatientRelatedSeries": ("PATIENT", "series_uid"),
    "NumberOfPatientRelatedInstances": ("PATIENT", "sop_instance_uid"),
    "NumberOfStudyRelatedSeries": ("STUDY", "series_uid"),
    "NumberOfStudyRelatedInstances": ("STUDY", "sop_instance_uid"),
    "NumberOfSeriesRelatedInstances": ("SERIES", "sop_instance_uid"),
}


def _text(value: Any) -> str:
    """An element's value as one string (multiple values joined with backslash)."""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _any_modality(wanted: str, present: set[str]) -> bool:
    """ModalitiesInStudy: a study matches when any of its modalities is one asked for
    (each asked value may use wildcards)."""
    from .matching import compile_value

    for value in wanted.split("\\"):
        matcher, _ = compile_value("CS", value)
        if matcher is None:
            return True
        if any(matcher(m) for m in present):
            return True
    return False
