"""C-FIND attribute matching over index values (workers/qr/matching.py, PS3.4 C.2.2.2)."""

from __future__ import annotations

import pytest

from workers.qr.matching import compile_identifier, compile_value, condition_for


@pytest.mark.parametrize(
    ("vr", "query", "value", "expected"),
    [
        # universal matching
        ("LO", "", "anything", True),
        ("LO", "*", "anything", True),
        # single value: padding is not significant; case matters except for PN
        ("LO", "PID-1 ", "PID-1", True),
        ("LO", "pid-1", "PID-1", False),
        ("PN", "doe^jane", "Doe^Jane", True),
        # wildcards
        ("PN", "D*", "Doe^Jane", True),
        ("PN", "?oe^*", "Roe^Rick", True),
        ("PN", "?oe", "Roe^Rick", False),
        ("SH", "ACC*", "ACC42", True),
        ("SH", "A.C*", "ACC42", False),  # "." is no wildcard
        ("CS", "C?", "CT", True),
        ("CS", "C?", "MR", False),
        # list of UID matching; no wildcards in UIDs
        ("UI", "1.2.3\\1.2.4", "1.2.4", True),
        ("UI", "1.2.3\\1.2.4", "1.2.5", False),
        ("UI", "1.2.*", "1.2.3", False),
        # date ranges, inclusive, open on either side
        ("DA", "20240101-20241231", "20240115", True),
        ("DA", "20240101-20241231", "20250101", False),
        ("DA", "-20231231", "20230610", True),
        ("DA", "-20231231", "20240101", False),
        ("DA", "20240101-", "20240101", True),
        ("DA", "20240101-", "", False),  # no value is in no range
        ("DA", "20240115", "20240115", True),
        # time ranges and single values, with fractions and short forms
        ("TM", "1000-1100", "103000", True),
        ("TM", "1000-1100", "110059.5", True),  # "1100" covers the whole minute
        ("TM", "1000-1100", "110100", False),
        ("TM", "10", "100000", True),
        ("TM", "101500", "1015", True),
    ],
)
def test_compile_value(vr: str, query: str, value: str, expected: bool) -> None:
    matcher, _ = compile_value(vr, query)
    assert (matcher is None or matcher(value)) is expected


def test_identifier_splits_exact_prefilter_from_matchers() -> None:
    m = compile_identifier(
        {
            "PatientID": "PID-1",
            "PatientName": "D*",
            "StudyDate": "20240101-",
            "StudyInstanceUID": "1.2.3",
            "SeriesInstanceUID": "1.2.3\\1.2.4",
            "Modality": "",
            "InstanceNumber": "7",  # not indexed: no matcher
        }
    )
    # Only plain single values reach the index's exact WHERE; PN never does (case).
    assert m.equal == {"patient_id": "PID-1", "study_uid": "1.2.3"}
    assert set(m.match) == {
        "PatientID",
        "PatientName",
        "StudyDate",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    }


@pytest.mark.parametrize(
    ("vr", "query", "expected"),
    [
        ("LO", "", None),
        ("LO", "*", None),
        ("LO", " PID-1 ", ("eq", ("PID-1",))),
        ("SH", "ACC*", ("like", ("ACC%",))),
        ("SH", "A_C%?\\*", ("like", ("A\\_C\\%_\\\\%",))),  # SQL's own wildcards escaped
        ("UI", "1.2.3", ("eq", ("1.2.3",))),
        ("UI", "1.2.3\\1.2.4\\1.2.3", ("in", ("1.2.3", "1.2.4"))),
        ("DA", "20240101", ("eq", ("20240101",))),
        ("DA", "20240101-", ("range", ("20240101", ""))),
        ("DA", "-20231231", ("range", ("", "20231231"))),
        ("PN", "Doe^J*", None),  # case beyond ASCII: the matcher alone
        ("TM", "1000-1100", None),  # normalised comparison: the matcher alone
    ],
)
def test_condition_for(vr: str, query: str, expected: tuple[str, tuple[str, ...]] | None) -> None:
    cond = condition_for("col", vr, query)
    assert (None if cond is None else (cond.kind, cond.values)) == expected
