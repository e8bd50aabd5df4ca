"""What an association did, for its log lines and its audit message.

Theory of operation
-------------------
Every connection gets one :class:`Activity` (a few integers) when it opens. The
association protocol tells it the outcome (released, rejected, aborted and by whom)
and every answered C-STORE; when the connection closes, :func:`log_association`
writes ONE INFO line with peer, AE titles, contexts, outcome, instances, bytes and
duration, and hands the activity to the audit trail (DICOM Instances Transferred).

Per-instance lines (``--log-instances info|debug|off``) are decided once, when the
server starts (:func:`instance_level`): with them off, a stored instance costs two
integer additions here and nothing else (no string formatting, no level check).

Codes are logged with their PS3.8 names (Table 9-21 for A-ASSOCIATE-RJ, 9-26 for
A-ABORT, 9-18 for presentation context results), so that a reader does not need
the standard at hand. Every line carries its fields as a ``fields`` attribute of
the log record: the JSON formatter (:mod:`workers.logs`) writes them as keys.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = [
    "Activity",
    "abort_names",
    "context_result_name",
    "instance_level",
    "log_fields",
    "reject_names",
]

#: PS3.8 Table 9-21, A-ASSOCIATE-RJ Result
REJECT_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
#: PS3.8 Table 9-21, A-ASSOCIATE-RJ Source
REJECT_SOURCES = {
    1: "service-user",
    2: "service-provider-acse",
    3: "service-provider-presentation",
}
#: PS3.8 Table 9-21, A-ASSOCIATE-RJ Reason/Diag., by source
REJECT_REASONS = {
    1: {
        1: "no-reason-given",
        2: "application-context-name-not-supported",
        3: "calling-ae-title-not-recognized",
        7: "called-ae-title-not-recognized",
    },
    2: {1: "no-reason-given", 2: "protocol-version-not-supported"},
    3: {1: "temporary-congestion", 2: "local-limit-exceeded"},
}
#: PS3.8 Table 9-26, A-ABORT Source
ABORT_SOURCES = {0: "service-user", 1: "reserved", 2: "service-provider"}
#: PS3.8 Table 9-26, A-ABORT Reason/Diag. (significant for the service provider only)
ABORT_REASONS = {
    0: "reason-not-specified",
    1: "unrecognized-pdu",
    2: "unexpected-pdu",
    4: "unrecognized-pdu-parameter",
    5: "unexpected-pdu-parameter",
    6: "invalid-pdu-parameter-value",
}
#: PS3.8 Table 9-18, presentation context Result/Reason
CONTEXT_RESULTS = {
    0: "acceptance",
    1: "user-rejection",
    2: "no-reason",
    3: "abstract-syntax-not-supported",
    4: "transfer-syntaxes-not-supported",
}

log = logging.getLogger("workers.activity")


def reject_names(result: int, source: int, reason: int) -> dict[str, str]:
    """The names of an A-ASSOCIATE-RJ's fields (unknown codes as ``"code-N"``)."""
    return {
        "reject_result": REJECT_RESULTS.get(result, f"code-{result}"),
        "reject_source": REJECT_SOURCES.get(source, f"code-{source}"),
        "reject_reason": REJECT_REASONS.get(source, {}).get(reason, f"code-{reason}"),
    }


def abort_names(source: int | None, reason: int | None) -> dict[str, str]:
    """The names of an A-ABORT's fields; None (the transport closed, A-P-ABORT):
    ``"transport"``. The reason is only meaningful from the service provider."""
    if source is None:
        return {"abort_source": "transport", "abort_reason": "connection-closed"}
    out = {"abort_source": ABORT_SOURCES.get(source, f"code-{source}")}
    if source == 2:
        out["abort_reason"] = ABORT_REASONS.get(reason or 0, f"code-{reason}")
    else:
        out["abort_reason"] = "not-significant"
    return out


def context_result_name(result: int) -> str:
    """The PS3.8 Table 9-18 name of a presentation context result."""
    return CONTEXT_RESULTS.get(result, f"code-{result}")


def instance_level(setting: str) -> int | None:
    """The level of per-instance lines for ``--log-instances``, or None when they
    would not be written at all (off, or below the logger's level)."""
    level = {"info": logging.INFO, "debug": logging.DEBUG}.get(setting.lower())
    # The lines are written by the association's logger: its level decides.
    if level is None or not logging.getLogger("workers.association").isEnabledFor(level):
        return None
    return level


#: What makes a value need quotes in a ``key=value`` line: white space (any, as
#: str.isspace sees it: re's \s matches the same characters for str), quotes, "=".
_NEEDS_QUOTES = re.compile(r"[\s\"'=]")


def _text(value: Any) -> str:
    # Every association's line goes through here about ten times: an int (counts,
    # bytes) never needs quotes, and one regex search replaces a per-character
    # generator (that generator was most of the line's cost, profiled per association).
    if type(value) is int:
        return str(value)
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text) is not None:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def log_fields(
    logger: logging.Logger,
    level: int,
    what: str,
    fields: dict[str, Any],
    text: str | None = None,
) -> None:
    """One line: ``what key=value ...`` as text (or ``text``, a sentence for people,
    where one was always written); in JSON the fields are keys, ``event`` is ``what``."""
    if not logger.isEnabledFor(level):
        return
    if text is None:
        text = what + " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
    logger.log(level, "%s", text, extra={"fields": {"event": what, **fields}})


class Activity:
    """Counters of one connection; the audit parts only when an audit trail is on."""

    __slots__ = (
        "aborted",
        "bytes",
        "contexts_accepted",
        "contexts_rejected",
        "failed",
        "initiator",
        "instances",
        "outcome",
        "started",
        "studies",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.outcome = "closed"  # no A-ASSOCIATE-RQ (yet)
        self.instances = 0
        self.failed = 0
        self.bytes = 0
        self.contexts_accepted = 0
        self.contexts_rejected = 0
        #: the rejection's or abort's names (reject_names / abort_names)
        self.aborted: dict[str, str] = {}
        self.initiator = ""
        #: (Patient ID, Study Instance UID) -> SOP Class UID -> instances stored
        #: (with an audit trail only; "" where the scanner found nothing)
        self.studies: dict[tuple[str, str], dict[str, int]] | None = None

    def note_instance(self, sop_class: str, scan: Any) -> None:
        """Remember what an instance was for the audit message (its study, patient
        and SOP class); ``scan`` is the tag scanner's ScanResult (or None)."""
        if self.studies is None:
            self.studies = {}
        study = getattr(scan, "study_instance_uid", None) or ""
        patient = getattr(scan, "patient_id", None) or ""
        per_class = self.studies.setdefault((patient, study), {})
        per_class[sop_class] = per_class.get(sop_class, 0) + 1

    def fields(self, peer: str, calling: str, called: str, now: float) -> dict[str, Any]:
        """The association line's fields."""
        out: dict[str, Any] = {
            "peer": peer,
            "calling_ae": calling,
            "called_ae": called,
            "outcome": self.outcome,
            "contexts_accepted": self.contexts_accepted,
            "contexts_rejected": self.contexts_rejected,
            "instances": self.instances,
            "failed": self.failed,
            "bytes": self.bytes,
            "duration": round(max(0.0, now - self.started), 3),
        }
        if self.initiator:
            out["abort_initiator"] = self.initiator
        out.update(self.aborted)
        return out
