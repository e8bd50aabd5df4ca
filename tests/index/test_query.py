"""C-FIND's keys pushed into the index's SQL (workers/index/query.py and
workers/qr/matching.py), on SQLite and on a real PostgreSQL server: for every kind of
key, the rows the SQL returns include every row the Python matchers take (the SQL
narrows, it never decides), and they are fewer than all rows when the key selects."""

from __future__ import annotations

import pytest

from workers.index import Index
from workers.qr.matching import KEYS, compile_identifier

from .test_index import record

#: awkward values: SQL's own wildcards and escape character, case, empty values
_PATIENTS = ["PID-1", "pid-1", "P%D_2", "P\\D*3", "PIDX", ""]
_ACCESSIONS = ["ACC1", "acc1", "A_C", "A%C", "ABC", ""]
_DATES = ["20231231", "20240101", "20240115", "20241231", "2024.06.01", ""]
_MODALITIES = ["CT", "MR", "ct", "C_", ""]


@pytest.fixture
def filled(index: Index) -> Index:
    records = []
    for n in range(180):
        records.append(
            record(
                n,
                patient_id=_PATIENTS[n % len(_PATIENTS)],
                accession_number=_ACCESSIONS[n // 2 % len(_ACCESSIONS)],
                study_date=_DATES[n // 3 % len(_DATES)],
                modality=_MODALITIES[n // 5 % len(_MODALITIES)],
                sop_class_uid=f"1.2.840.10008.5.1.4.1.1.{n % 3}",
            )
        )
    index.add_many(records)
    return index


_QUERIES = [
    {"PatientID": "PID-1"},
    {"PatientID": "P%D_2"},
    {"PatientID": "P\\D*3"},  # a backslash is a literal in a LO value
    {"PatientID": "P?D*"},
    {"PatientID": "P%*"},
    {"PatientID": "*-1"},
    {"AccessionNumber": "A_C"},
    {"AccessionNumber": "A?C"},
    {"AccessionNumber": "acc*"},
    {"StudyDate": "20240101-20241231"},
    {"StudyDate": "-20240101"},
    {"StudyDate": "20240115-"},
    {"StudyDate": "20240115"},
    {"Modality": "C?"},
    {"Modality": "CT"},
    {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1\\1.2.840.10008.5.1.4.1.1.2"},
    {"SOPInstanceUID": record(7).sop_instance_uid},
    {"PatientID": "PID-1", "StudyDate": "20240101-", "Modality": "C*"},
]


@pytest.mark.parametrize(
    "query", _QUERIES, ids=lambda q: ",".join(f"{k}={v}" for k, v in q.items())
)
def test_sql_narrows_and_never_drops_a_match(filled: Index, query: dict[str, str]) -> None:
    matchers = compile_identifier(query)
    assert matchers.conditions, "this key should reach the SQL"
    checks = [(KEYS[kw].column, m) for kw, m in matchers.match.items()]

    def matching(rows: list) -> set[str]:  # type: ignore[type-arg]
        return {r.sop_instance_uid for r in rows if all(m(getattr(r, c)) for c, m in checks)}

    everything = filled.select("IMAGE")
    narrowed = filled.select("IMAGE", {}, matchers.conditions)
    expected = matching(everything)
    assert {r.sop_instance_uid for r in narrowed} >= expected
    assert matching(narrowed) == expected
    assert len(narrowed) < len(everything)
