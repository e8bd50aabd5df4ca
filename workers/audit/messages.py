"""DICOM audit messages (PS3.15 Annex A.5) as XML, built with the standard library.

Each function returns one ``<AuditMessage>`` document (UTF-8 bytes) with the parts
PS3.15 A.5.1 prescribes, in its order: EventIdentification, ActiveParticipant(s),
AuditSourceIdentification, ParticipantObjectIdentification(s). Coded values carry
``csd-code``, ``codeSystemName`` and ``originalText`` (A.5.1, the "CodedValueType").

Values that come from peers (AE titles, UIDs, Patient IDs) are attribute values:
ElementTree escapes them, and characters XML 1.0 cannot carry are replaced.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "Code",
    "Node",
    "Source",
    "application_activity",
    "instances_transferred",
    "security_alert",
    "user_authentication",
]


@dataclass(slots=True, frozen=True)
class Code:
    """A coded value: code, coding scheme, meaning."""

    code: str
    system: str
    text: str


# -- PS3.16 / PS3.15 A.5 codes -----------------------------------------------------------
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_LAUNCHER = Code("110151", "DCM", "Application Launcher")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
NODE_ID = Code("110182", "DCM", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
#: AuditSourceTypeCode 4: application server process (RFC 3881 5.4.3)
SOURCE_APPLICATION_SERVER = Code("4", "DCM", "Application Server Process")

#: EventOutcomeIndicator (A.5.1): success, minor failure, serious failure, major failure
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

#: ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole (RFC 3881)
_PERSON, _SYSTEM_OBJECT = "1", "2"
_ROLE_PATIENT, _ROLE_REPORT, _ROLE_SECURITY_RESOURCE = "1", "3", "13"

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(slots=True, frozen=True)
class Source:
    """Who reports: AuditSourceIdentification."""

    source_id: str
    enterprise_site_id: str = ""


@dataclass(slots=True, frozen=True)
class Node:
    """An ActiveParticipant: a process (by its AE titles) or a person, where it is."""

    user_id: str
    ae_titles: tuple[str, ...] = ()
    address: str = ""
    user_name: str = ""


def _clean(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.text},
    )


def _event(
    root: ET.Element,
    event_id: Code,
    action: str,
    outcome: int,
    types: Iterable[Code] = (),
    description: str = "",
    when: datetime | None = None,
) -> None:
    moment = (when or datetime.now(UTC)).isoformat(timespec="milliseconds")
    ev = ET.SubElement(
        root,
        "EventIdentification",
        {"EventActionCode": action, "EventDateTime": moment, "EventOutcomeIndicator": str(outcome)},
    )
    _code(ev, "EventID", event_id)
    for t in types:
        _code(ev, "EventTypeCode", t)
    if description:
        ET.SubElement(ev, "EventOutcomeDescription").text = _clean(description)


def _participant(root: ET.Element, node: Node, requestor: bool, role: Code | None) -> None:
    attrs = {"UserID": _clean(node.user_id or "unknown")}
    if node.ae_titles:
        # A.5.2.2: a DICOM application's AE titles, "AETITLES=" then ";"-separated.
        attrs["AlternativeUserID"] = _clean("AETITLES=" + ";".join(node.ae_titles))
    if node.user_name:
        attrs["UserName"] = _clean(node.user_name)
    attrs["UserIsRequestor"] = "true" if requestor else "false"
    if node.address:
        attrs["NetworkAccessPointID"] = _clean(node.address)
        # 2: an IP address; 1: a machine name
        attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(node.address) else "1"
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:
        _code(element, "RoleIDCode", role)


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _source(root: ET.Element, source: Source) -> None:
    attrs = {}
    if source.enterprise_site_id:
        attrs["AuditEnterpriseSiteID"] = _clean(source.enterprise_site_id)
    attrs["AuditSourceID"] = _clean(source.source_id)
    element = ET.SubElement(root, "AuditSourceIdentification", attrs)
    _code(element, "AuditSourceTypeCode", SOURCE_APPLICATION_SERVER)


def _object(
    root: ET.Element, object_id: str, type_code: str, role: str, id_type: Code
) -> ET.Element:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": _clean(object_id or "unknown"),
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    return element


def _document(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="utf-8")


def application_activity(
    source: Source, application: Node, started: bool, launcher: str = "", outcome: int = SUCCESS
) -> bytes:
    """A.5.3.1 Application Activity: the application started or stopped."""
    root = ET.Element("AuditMessage")
    _event(
        root,
        APPLICATION_ACTIVITY,
        "E",
        outcome,
        [APPLICATION_START if started else APPLICATION_STOP],
    )
    _participant(root, application, False, ROLE_APPLICATION)
    if launcher:
        _participant(root, Node(launcher), True, ROLE_LAUNCHER)
    _source(root, source)
    return _document(root)


def instances_transferred(
    source: Source,
    sender: Node,
    receiver: Node,
    patient_id: str,
    studies: dict[str, dict[str, int]],
    outcome: int = SUCCESS,
    action: str = "C",
    description: str = "",
) -> bytes:
    """A.5.3.4 DICOM Instances Transferred, seen from the receiving end: ``studies``
    maps Study Instance UID -> SOP Class UID -> instances, all of one patient."""
    root = ET.Element("AuditMessage")
    _event(root, INSTANCES_TRANSFERRED, action, outcome, description=description)
    _participant(root, sender, True, ROLE_SOURCE)
    _participant(root, receiver, False, ROLE_DESTINATION)
    _source(root, source)
    for study, classes in studies.items():
        element = _object(root, study, _SYSTEM_OBJECT, _ROLE_REPORT, STUDY_INSTANCE_UID)
        for sop_class, count in classes.items():
            ET.SubElement(
                element, "SOPClass", {"UID": _clean(sop_class), "NumberOfInstances": str(count)}
            )
    _object(root, patient_id, _PERSON, _ROLE_PATIENT, PATIENT_NUMBER)
    return _document(root)


def security_alert(
    source: Source,
    reporter: Node,
    performer: Node,
    subject: str,
    why: str,
    event_type: Code = NODE_AUTHENTICATION,
    outcome: int = MINOR_FAILURE,
) -> bytes:
    """A.5.3.11 Security Alert: ``performer`` (the peer) tried something the
    ``reporter`` (this application) refused; ``subject`` is the node it concerns."""
    root = ET.Element("AuditMessage")
    _event(root, SECURITY_ALERT, "E", outcome, [event_type], description=why)
    _participant(root, reporter, False, None)
    _participant(root, performer, True, None)
    _source(root, source)
    element = _object(root, subject, _SYSTEM_OBJECT, _ROLE_SECURITY_RESOURCE, NODE_ID)
    ET.SubElement(
        element,
        "ParticipantObjectDetail",
        {"type": "Alert Description", "value": base64.b64encode(why.encode()).decode("ascii")},
    )
    return _document(root)


def user_authentication(
    source: Source, user: Node, authenticator: Node, why: str, outcome: int = MINOR_FAILURE
) -> bytes:
    """A.5.3.12 User Authentication: a login (the DICOM user identity negotiation,
    PS3.7 D.3.3.7) of ``user`` checked by ``authenticator``; failed by default."""
    root = ET.Element("AuditMessage")
    _event(root, USER_AUTHENTICATION, "E", outcome, [LOGIN], description=why)
    _participant(root, user, True, None)
    _participant(root, authenticator, False, ROLE_APPLICATION)
    _source(root, source)
    return _document(root)
