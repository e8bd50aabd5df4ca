"""The DICOM audit message structure (PS3.15 A.5.1), written down for the tests from
the standard's element and attribute definitions, and a validator for it.

Each element lists its attributes (required / optional, with a value check) and its
content model as an ordered sequence of (child, min, max); ``validate`` walks a
document and raises AssertionError with the path of the first violation. The
message-specific rules (A.5.3: which EventID, which participants ...) are checked by
the tests themselves.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

UNBOUNDED = 1 << 30
_UID = re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*")


def _token(v: str) -> bool:
    return bool(v) and v == v.strip()


def _datetime(v: str) -> bool:
    # xs:dateTime; the audit record repository needs the offset to order events
    if not re.fullmatch(r"-?\d{4,}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", v):
        return False
    datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
    return True


def _boolean(v: str) -> bool:
    return v in ("true", "false", "1", "0")


def _base64(v: str) -> bool:
    try:
        base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _uid(v: str) -> bool:
    return len(v) <= 64 and bool(_UID.fullmatch(v))


def _one_of(*values: str) -> Callable[[str], bool]:
    return lambda v: v in values


def _int_range(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda v: v.isdigit() and lo <= int(v) <= hi


@dataclass
class Element:
    required: dict[str, Callable[[str], bool]] = field(default_factory=dict)
    optional: dict[str, Callable[[str], bool]] = field(default_factory=dict)
    #: ordered content: (name, min, max); a tuple of names is a choice
    content: list[tuple[str | tuple[str, ...], int, int]] = field(default_factory=list)
    text: bool = False


# A.5.1 CodedValueType: csd-code, codeSystemName, displayName?, originalText
CODED = Element(
    required={"csd-code": _token, "codeSystemName": _token, "originalText": _token},
    optional={"displayName": _token},
)
TEXT = Element(text=True)

SCHEMA: dict[str, Element] = {
    "AuditMessage": Element(
        content=[
            ("EventIdentification", 1, 1),
            ("ActiveParticipant", 1, UNBOUNDED),
            ("AuditSourceIdentification", 1, 1),
            ("ParticipantObjectIdentification", 0, UNBOUNDED),
        ]
    ),
    "EventIdentification": Element(
        required={
            "EventDateTime": _datetime,
            "EventOutcomeIndicator": _one_of("0", "4", "8", "12"),
        },
        optional={"EventActionCode": _one_of("C", "R", "U", "D", "E")},
        content=[
            ("EventID", 1, 1),
            ("EventTypeCode", 0, UNBOUNDED),
            ("EventOutcomeDescription", 0, 1),
            ("PurposeOfUse", 0, UNBOUNDED),
        ],
    ),
    "EventID": CODED,
    "EventTypeCode": CODED,
    "EventOutcomeDescription": TEXT,
    "PurposeOfUse": CODED,
    "ActiveParticipant": Element(
        required={"UserID": _token, "UserIsRequestor": _boolean},
        optional={
            "AlternativeUserID": _token,
            "UserName": _token,
            "NetworkAccessPointID": _token,
            "NetworkAccessPointTypeCode": _one_of("1", "2", "3", "4", "5"),
        },
        content=[("RoleIDCode", 0, UNBOUNDED), ("MediaIdentifier", 0, 1)],
    ),
    "RoleIDCode": CODED,
    "MediaIdentifier": Element(content=[("MediaType", 1, 1)]),
    "MediaType": CODED,
    "AuditSourceIdentification": Element(
        required={"AuditSourceID": _token},
        optional={"AuditEnterpriseSiteID": _token},
        content=[("AuditSourceTypeCode", 0, UNBOUNDED)],
    ),
    "AuditSourceTypeCode": CODED,
    "ParticipantObjectIdentification": Element(
        required={"ParticipantObjectID": _token},
        optional={
            "ParticipantObjectTypeCode": _int_range(1, 4),
            "ParticipantObjectTypeCodeRole": _int_range(1, 24),
            "ParticipantObjectDataLifeCycle": _int_range(1, 15),
            "ParticipantObjectSensitivity": _token,
        },
        content=[
            ("ParticipantObjectIDTypeCode", 1, 1),
            (("ParticipantObjectName", "ParticipantObjectQuery"), 0, 1),
            ("ParticipantObjectDetail", 0, UNBOUNDED),
            ("ParticipantObjectDescription", 0, UNBOUNDED),
            ("SOPClass", 0, UNBOUNDED),
            ("Accession", 0, UNBOUNDED),
            ("MPPS", 0, UNBOUNDED),
            ("ParticipantObjectContainsStudy", 0, 1),
            ("Encrypted", 0, 1),
            ("Anonymized", 0, 1),
        ],
    ),
    "ParticipantObjectIDTypeCode": CODED,
    "ParticipantObjectName": TEXT,
    "ParticipantObjectQuery": Element(text=True),
    "ParticipantObjectDetail": Element(required={"type": _token, "value": _base64}),
    "ParticipantObjectDescription": TEXT,
    "SOPClass": Element(
        required={"UID": _uid},
        optional={"NumberOfInstances": _int_range(0, 1 << 31)},
        content=[("Instance", 0, UNBOUNDED)],
    ),
    "Instance": Element(required={"UID": _uid}),
    "Accession": Element(required={"Number": _token}),
    "MPPS": Element(required={"UID": _uid}),
    "ParticipantObjectContainsStudy": Element(content=[("StudyIDs", 1, UNBOUNDED)]),
    "StudyIDs": Element(required={"UID": _uid}),
    "Encrypted": Element(text=True),
    "Anonymized": Element(text=True),
}


def validate(document: bytes) -> ET.Element:
    """Parse and check an audit message; returns the root. AssertionError on a fault."""
    root = ET.fromstring(document)
    assert root.tag == "AuditMessage", f"root is {root.tag}"
    _check(root, "/AuditMessage")
    return root


def _check(element: ET.Element, path: str) -> None:
    spec = SCHEMA.get(element.tag)
    assert spec is not None, f"{path}: element not in the schema"
    for name, check in spec.required.items():
        value = element.get(name)
        assert value is not None, f"{path}: attribute {name} missing"
        assert check(value), f"{path}/@{name}: {value!r} is not valid"
    for name, value in element.attrib.items():
        if name in spec.required:
            continue
        check = spec.optional.get(name)
        assert check is not None, f"{path}/@{name}: attribute not allowed"
        assert check(value), f"{path}/@{name}: {value!r} is not valid"
    children = list(element)
    if spec.text or element.tag in ("Encrypted", "Anonymized"):
        assert not children, f"{path}: text element with children"
        if element.tag in ("Encrypted", "Anonymized"):
            assert _boolean(element.text or ""), f"{path}: not a boolean"
        return
    assert not (element.text or "").strip(), f"{path}: unexpected text"
    i = 0
    for names, lo, hi in spec.content:
        allowed = names if isinstance(names, tuple) else (names,)
        n = 0
        while i < len(children) and children[i].tag in allowed:
            _check(children[i], f"{path}/{children[i].tag}")
            i += 1
            n += 1
        assert lo <= n <= hi, f"{path}: {names} occurs {n} times, wanted {lo}..{hi}"
    assert i == len(children), f"{path}: unexpected or misplaced element {children[i].tag}"


def coded(element: ET.Element | None) -> tuple[str, str, str]:
    """(csd-code, codeSystemName, originalText) of a coded element."""
    assert element is not None
    return (
        element.get("csd-code", ""),
        element.get("codeSystemName", ""),
        element.get("originalText", ""),
    )
