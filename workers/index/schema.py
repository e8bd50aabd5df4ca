"""The index schema, as numbered migration steps shared by both backends.

``schema_version`` holds one row, the number of steps applied. A step is a list of
statements written once for both SQLite and PostgreSQL: the types are the common
subset (TEXT, BIGINT, DOUBLE PRECISION; SQLite gives them INTEGER and REAL
affinity), and ``{blob}`` is BLOB or BYTEA. A new step is appended, never edited:
databases out there have run the old ones. A database whose version is newer than
this code knows is refused (an older receiver must not write to a newer schema).
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the instances, one row per SOP Instance UID (unique across every receiver
    # sharing the index), with the keys C-FIND prefilters on.
    (
        """CREATE TABLE instances (
            sop_instance_uid TEXT PRIMARY KEY,
            sop_class_uid TEXT NOT NULL,
            study_uid TEXT NOT NULL,
            series_uid TEXT NOT NULL,
            patient_id TEXT NOT NULL,
            patient_name TEXT NOT NULL,
            study_date TEXT NOT NULL,
            modality TEXT NOT NULL,
            accession_number TEXT NOT NULL,
            calling_ae TEXT NOT NULL,
            source_address TEXT NOT NULL,
            transfer_syntax TEXT NOT NULL,
            size BIGINT NOT NULL,
            digest TEXT NOT NULL,
            path TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            state TEXT NOT NULL,
            study_time TEXT NOT NULL,
            node TEXT NOT NULL
        )""",
        # Hierarchical queries (PS3.4 C.4.1.2.2) name the study of a series and the
        # series of an instance: one index serves both levels.
        "CREATE INDEX instances_study_series ON instances (study_uid, series_uid)",
        "CREATE INDEX instances_patient ON instances (patient_id)",
        # No index on (node, path): reconcile reads all of a node's rows once, at
        # start-up, and every index is one more B-tree insert per instance received.
    ),
    # 2: reports owed to someone (storage commitment N-EVENT-REPORTs), kept until
    # delivered so that they survive a restart.
    (
        """CREATE TABLE pending_reports (
            report_key TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            payload {blob} NOT NULL,
            due DOUBLE PRECISION NOT NULL,
            attempts BIGINT NOT NULL
        )""",
        "CREATE INDEX pending_reports_due ON pending_reports (owner, due)",
    ),
    # 3: a lease on each pending report (who sends it, until when: see
    # workers/index/pending.py), so that two claimants never send the same one.
    (
        "ALTER TABLE pending_reports ADD COLUMN lease_owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE pending_reports ADD COLUMN lease_until DOUBLE PRECISION NOT NULL DEFAULT 0",
    ),
)

#: The version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)
