"""The audit messages and their transport, without the receiver: each message
against the PS3.15 A.5.1 structure (tests/audit/schema.py) and its A.5.3 rules, RFC
5424 frames over UDP, TCP (octet counting) and TLS to a collector on 127.0.0.1, and
a collector that is gone or does not read: the caller never waits, drops counted."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import pytest

from tests.audit.collector import Collector, make_certificates, parse_rfc5424, server_context
from tests.audit.schema import coded, validate
from workers.audit import AuditSettings, AuditTrail
from workers.audit import messages as m
from workers.audit.syslog import SyslogSender, frame, parse_url

SOURCE = m.Source("PACSRX@testhost", "SITE")
US = m.Node("PACSRX", ("PACSRX",), "127.0.0.1")
PEER = m.Node("MODALITY", ("MODALITY",), "127.0.0.2")
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def participants(root):  # type: ignore[no-untyped-def]
    return root.findall("ActiveParticipant")


def test_schema_refuses_what_the_standard_does_not_allow() -> None:
    good = m.application_activity(SOURCE, US, True, "alice")
    validate(good)
    for broken in (
        good.replace(b"EventID ", b"EventId "),  # unknown element
        good.replace(b' EventOutcomeIndicator="0"', b' EventOutcomeIndicator="3"'),
        good.replace(b' UserIsRequestor="false"', b""),  # required attribute
        good.replace(b"<AuditSourceIdentification", b"<AuditSourceIdentification Foo='1'"),
    ):
        assert broken != good
        with pytest.raises(AssertionError):
            validate(broken)
    # order matters: the audit source after the participants, not before
    root = validate(good)
    source = root.find("AuditSourceIdentification")
    root.remove(source)
    root.insert(1, source)
    import xml.etree.ElementTree as ET

    with pytest.raises(AssertionError):
        validate(ET.tostring(root))


def test_application_activity() -> None:
    for started, type_code in ((True, "110120"), (False, "110121")):
        root = validate(m.application_activity(SOURCE, US, started, "alice"))
        event = root.find("EventIdentification")
        assert event.get("EventActionCode") == "E"
        assert event.get("EventOutcomeIndicator") == "0"
        assert coded(event.find("EventID"))[:2] == ("110100", "DCM")
        assert coded(event.find("EventTypeCode"))[:2] == (type_code, "DCM")
        app, launcher = participants(root)
        assert coded(app.find("RoleIDCode"))[0] == "110150"
        assert app.get("UserIsRequestor") == "false"
        assert app.get("AlternativeUserID") == "AETITLES=PACSRX"
        assert coded(launcher.find("RoleIDCode"))[0] == "110151"
        assert launcher.get("UserID") == "alice"
        src = root.find("AuditSourceIdentification")
        assert src.get("AuditSourceID") == "PACSRX@testhost"
        assert src.get("AuditEnterpriseSiteID") == "SITE"


def test_instances_transferred() -> None:
    studies = {"1.2.3.4": {CT: 3, MR: 1}, "1.2.3.5": {CT: 2}}
    root = validate(m.instances_transferred(SOURCE, PEER, US, "PID<&>1", studies, m.MINOR_FAILURE))
    event = root.find("EventIdentification")
    assert coded(event.find("EventID"))[:2] == ("110104", "DCM")
    assert event.get("EventActionCode") == "C"
    assert event.get("EventOutcomeIndicator") == "4"
    source, destination = participants(root)
    assert coded(source.find("RoleIDCode"))[0] == "110153"
    assert source.get("UserIsRequestor") == "true"
    assert source.get("NetworkAccessPointID") == "127.0.0.2"
    assert source.get("NetworkAccessPointTypeCode") == "2"
    assert coded(destination.find("RoleIDCode"))[0] == "110152"
    assert destination.get("UserIsRequestor") == "false"
    objects = root.findall("ParticipantObjectIdentification")
    found = {}
    for obj in objects[:-1]:
        assert coded(obj.find("ParticipantObjectIDTypeCode"))[:2] == ("110180", "DCM")
        assert (obj.get("ParticipantObjectTypeCode"), obj.get("ParticipantObjectTypeCodeRole")) == (
            "2",
            "3",
        )
        found[obj.get("ParticipantObjectID")] = {
            c.get("UID"): int(c.get("NumberOfInstances")) for c in obj.findall("SOPClass")
        }
    assert found == studies
    patient = objects[-1]
    assert patient.get("ParticipantObjectID") == "PID<&>1"  # escaped in XML, intact here
    assert (
        patient.get("ParticipantObjectTypeCode"),
        patient.get("ParticipantObjectTypeCodeRole"),
    ) == (
        "1",
        "1",
    )
    assert coded(patient.find("ParticipantObjectIDTypeCode"))[:2] == ("2", "RFC-3881")


def test_security_alert_and_user_authentication() -> None:
    root = validate(m.security_alert(SOURCE, US, PEER, "127.0.0.2", "address refused"))
    event = root.find("EventIdentification")
    assert coded(event.find("EventID"))[:2] == ("110113", "DCM")
    assert coded(event.find("EventTypeCode"))[:2] == ("110126", "DCM")
    assert event.get("EventOutcomeIndicator") == "4"
    assert event.findtext("EventOutcomeDescription") == "address refused"
    reporter, performer = participants(root)
    assert (reporter.get("UserIsRequestor"), performer.get("UserIsRequestor")) == ("false", "true")
    detail = root.find("ParticipantObjectIdentification/ParticipantObjectDetail")
    assert base64.b64decode(detail.get("value")) == b"address refused"

    root = validate(m.user_authentication(SOURCE, m.Node("bob", (), "127.0.0.2"), US, "wrong"))
    event = root.find("EventIdentification")
    assert coded(event.find("EventID"))[:2] == ("110114", "DCM")
    assert coded(event.find("EventTypeCode"))[:2] == ("110122", "DCM")
    user, authenticator = participants(root)
    assert user.get("UserID") == "bob" and user.get("UserIsRequestor") == "true"
    assert authenticator.get("UserIsRequestor") == "false"


def test_peer_values_that_xml_cannot_carry_are_replaced() -> None:
    root = validate(m.security_alert(SOURCE, US, m.Node("AE\x01\x02"), "h", "why\x00"))
    assert "\x01" not in root.findall("ActiveParticipant")[1].get("UserID")


def test_frame_is_rfc5424() -> None:
    msg = parse_rfc5424(frame(b"<AuditMessage/>", app_name="pacs receiver", hostname="h o"))
    assert msg.version == 1
    assert msg.facility == 10 and msg.severity == 5
    assert msg.app == "pacsreceiver" and msg.hostname == "ho"
    assert msg.msgid == "DICOM+RFC3881"
    assert msg.msg == b"<AuditMessage/>"


def test_parse_url() -> None:
    assert parse_url("udp://127.0.0.1:1514") == ("udp", "127.0.0.1", 1514)
    assert parse_url("tls://collector") == ("tls", "collector", 6514)
    for bad in ("http://x:1", "tcp://:514", "tcp://h:99999"):
        with pytest.raises(ValueError):
            parse_url(bad)


@pytest.mark.parametrize("scheme", ["udp", "tcp", "tls"])
def test_delivery(scheme: str, tmp_path: Path) -> None:
    settings_extra = {}
    context = None
    if scheme == "tls":
        ca, cert, key = make_certificates(tmp_path)
        context = server_context(cert, key)
        settings_extra = {"ca": str(ca)}
    collector = Collector(scheme, context)
    try:
        trail = AuditTrail(AuditSettings(url=collector.url, **settings_extra), "PACSRX")
        trail.application(started=True)
        trail.refused("127.0.0.9", "calling AE not allowed", "EVIL")
        trail.instances_transferred(
            {("P1", "1.2.3"): {CT: 2}, ("P2", "1.2.4"): {CT: 1}}, 0, "127.0.0.2", "MOD", "PACSRX"
        )
        msgs = collector.wait(lambda ms: ms if len(ms) >= 4 else None)
        trail.close()
        assert not collector.errors
        ids = sorted(coded(validate(x.msg).find("EventIdentification/EventID"))[0] for x in msgs)
        # one Instances Transferred per patient (A.5.3.4: a single patient per message)
        assert ids == ["110100", "110104", "110104", "110113"]
        assert all(x.msgid == "DICOM+RFC3881" and x.facility == 10 for x in msgs)
        assert trail.sent == 4 and trail.dropped == 0
    finally:
        collector.close()


def test_tls_collector_with_an_unknown_certificate_gets_nothing(tmp_path: Path) -> None:
    _ca, cert, key = make_certificates(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = make_certificates(other)
    collector = Collector("tls", server_context(cert, key))
    try:
        sender = SyslogSender(collector.url, ca=str(other_ca), timeout=2.0)
        sender.submit(lambda: b"<AuditMessage/>")
        deadline = time.monotonic() + 10
        while sender.dropped < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sender.dropped == 1 and sender.sent == 0
        assert collector.messages == []
        sender.close()
    finally:
        collector.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_collector_never_blocks_and_drops_are_counted() -> None:
    sender = SyslogSender(f"tcp://127.0.0.1:{_closed_port()}", queue_size=10, timeout=1.0)
    for _ in range(500):
        sender.submit(lambda: b"<AuditMessage/>")  # returns at once, queued or dropped
    deadline = time.monotonic() + 15
    while sender.dropped < 500 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sender.sent == 0
    assert sender.dropped == 500
    sender.close(0.5)


def test_collector_that_stops_reading_never_blocks_the_caller() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        sender = SyslogSender(f"tcp://127.0.0.1:{port}", queue_size=20, timeout=1.0)
        big = b"<AuditMessage>" + b"x" * 200_000 + b"</AuditMessage>"
        results = [sender.submit(lambda: big) for _ in range(200)]
        # It accepted the connection but never reads: the sender's writes stall, its
        # queue fills, and the caller's submits keep returning, dropped and counted.
        assert results.count(False) > 0
        deadline = time.monotonic() + 20
        while sender.dropped + sender.sent < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sender.dropped + sender.sent == 200
        assert sender.dropped >= results.count(False)
        sender.close(0.5)
    finally:
        server.close()
