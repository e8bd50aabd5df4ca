"""The scanner's index attributes (patient name, study date/time, accession number),
on the walk and on the learnt-layout fast path, in every transfer syntax."""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid

from tests.worker.test_storage import ALL_SYNTAXES, encode, make_dataset, scan


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
def test_index_attributes_on_walk_and_fast_path(syntax: str) -> None:
    # Same layout every time (same value lengths), different values: after a few
    # one-fragment scans the layout is learnt and matched without the walk; the
    # results must not change.
    names = ["Doe^Jöhn", "Roe^Jäne", "Poe^Edgä"]
    for n in range(40):
        ds = make_dataset(syntax, patient_id=f"PAT-{n % 10}")
        ds.PatientName = names[n % 3]
        ds.AccessionNumber = f"A{n % 10}"
        ds.StudyDate = f"2024010{n % 10}"
        ds.StudyInstanceUID = generate_uid()
        result = scan(encode(ds, syntax), syntax, [1 << 20]).result()
        assert result.stop_reason == "complete"
        assert result.patient_id == f"PAT-{n % 10}"
        assert result.patient_name == names[n % 3]
        assert result.accession_number == f"A{n % 10}"
        assert result.study_date == f"2024010{n % 10}"
        assert result.study_time == "101500.25"
        assert result.study_instance_uid == ds.StudyInstanceUID


def test_utf8_patient_name() -> None:
    syntax = "1.2.840.10008.1.2.1"
    ds = make_dataset(syntax)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "山田^太郎"
    result = scan(encode(ds, syntax), syntax, [7]).result()
    assert result.patient_name == "山田^太郎"


def test_absent_index_attributes_are_none() -> None:
    syntax = "1.2.840.10008.1.2"
    ds = make_dataset(syntax)
    del ds.PatientName, ds.AccessionNumber, ds.StudyDate, ds.StudyTime
    result = scan(encode(ds, syntax), syntax, [100]).result()
    assert result.stop_reason == "complete"
    assert (result.patient_name, result.accession_number) == (None, None)
    assert (result.study_date, result.study_time) == (None, None)
