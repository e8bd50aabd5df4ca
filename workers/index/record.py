"""The row of the instance index: one received SOP Instance (:class:`IndexRecord`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Literal

__all__ = ["COLUMNS", "LEVEL_KEYS", "IndexRecord", "Level", "Row", "State"]

State = Literal["present", "missing"]
#: A record as its values in :data:`COLUMNS` order (``IndexRecord(*row)`` is the
#: record): what the receiver queues per instance, cheaper to build than a record.
Row = tuple[object, ...]
Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]


@dataclass(slots=True)
class IndexRecord:
    """What the index knows of one received instance.

    Text attributes are as the data set encodes them (padding removed); ``""`` when
    the data set did not carry the attribute within the scanner's budget. Attribute
    names are the column names of the ``instances`` table.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    modality: str
    accession_number: str
    calling_ae: str
    #: "host:port" of the peer that sent it ("" when unknown, e.g. found at reconcile)
    source_address: str
    transfer_syntax: str
    #: data-set bytes (the file minus its Part 10 header)
    size: int
    #: lowercase hex SHA-256 of the data set as stored (the file minus its Part 10
    #: header); "" when not computed
    digest: str
    #: path of the file relative to the storage root, "/"-separated
    path: str
    #: when it was committed (epoch seconds)
    received_at: float
    state: State = "present"
    study_time: str = ""
    #: which receiver's store holds the file: reconcile only touches its own rows
    #: (several receivers may share one PostgreSQL index)
    node: str = ""

    def as_row(self) -> tuple[object, ...]:
        """The values in :data:`COLUMNS` order."""
        return _as_row(self)


#: Column names, in field order.
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(IndexRecord))

_as_row = attrgetter(*COLUMNS)

#: Unique key of each query/retrieve level (PS3.4 C.6): ``select`` orders by it.
LEVEL_KEYS: dict[str, str] = {
    "PATIENT": "patient_id",
    "STUDY": "study_uid",
    "SERIES": "series_uid",
    "IMAGE": "sop_instance_uid",
}
