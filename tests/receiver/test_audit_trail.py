"""The audit trail of the real process tree: DICOM audit messages (PS3.15 A.5) as
syslog to a collector of the test's own on 127.0.0.1, over UDP, TCP and TLS, sent by
the supervisor (Application Activity, refused connections) and the workers
(Instances Transferred, rejected associations, refused user identities); each
message checked against the A.5.1 structure and its A.5.3 rules. A collector that is
not there costs reception nothing: every instance is stored, the drops are counted."""

from __future__ import annotations

import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation

from tests.audit.collector import Collector, SyslogMessage, make_certificates, server_context
from tests.audit.schema import coded, validate
from tests.receiver.conftest import (
    CT_IMAGE,
    ECHOSCU,
    STORESCU,
    Receiver,
    make_image,
    needs_dcmtk,
    stored_files,
    wait_for,
    write_file,
)
from tests.receiver.test_metrics_tree import free_port, scrape, total

pytestmark = needs_dcmtk

APP_ACTIVITY, TRANSFERRED, SECURITY_ALERT, USER_AUTH = "110100", "110104", "110113", "110114"


def event_id(root: ET.Element) -> str:
    return coded(root.find("EventIdentification/EventID"))[0]


def roots(messages: list[SyslogMessage], wanted: str) -> list[ET.Element]:
    out = []
    for message in messages:
        root = validate(message.msg)
        if event_id(root) == wanted:
            out.append(root)
    return out


def wait_events(collector: Collector, wanted: str, count: int) -> list[ET.Element]:
    found = collector.wait(lambda ms: (r := roots(ms, wanted)) and len(r) >= count and r)
    assert isinstance(found, list)
    return found


def event_type(root: ET.Element) -> str:
    return coded(root.find("EventIdentification/EventTypeCode"))[0]


def storescu(rx: Receiver, files: list[Path], aet: str = "STORESCU") -> None:
    assert STORESCU is not None
    done = subprocess.run(
        [STORESCU, "-aet", aet, "-aec", "PACSRX", rx.host, str(rx.port), *map(str, files)],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def echoscu(rx: Receiver, aet: str) -> int:
    assert ECHOSCU is not None
    return subprocess.run(
        [ECHOSCU, "-aet", aet, "-aec", "PACSRX", rx.host, str(rx.port)],
        capture_output=True,
        timeout=30,
    ).returncode


def two_patients(directory: Path) -> tuple[list[Path], dict[str, dict[str, int]]]:
    """Three instances: two of patient P1 (study A), one of patient P2 (study B)."""
    directory.mkdir()
    study_a, study_b = "1.2.826.0.1.3680043.9.7.1", "1.2.826.0.1.3680043.9.7.2"
    files = []
    for i, (patient, study) in enumerate([("P1", study_a), ("P1", study_a), ("P2", study_b)]):
        ds = make_image(i, study=study)
        ds.PatientID = patient
        files.append(write_file(ds, directory / f"i{i}.dcm"))
    return files, {"P1": {study_a: 2}, "P2": {study_b: 1}}


def check_transferred(root: ET.Element, calling: str) -> tuple[str, dict[str, int]]:
    """The A.5.3.4 rules of a DICOM Instances Transferred seen by the receiver;
    returns (patient ID, study UID -> CT instances)."""
    event = root.find("EventIdentification")
    assert event.get("EventActionCode") == "C"
    assert event.get("EventOutcomeIndicator") == "0"
    source, destination = root.findall("ActiveParticipant")
    assert coded(source.find("RoleIDCode"))[0] == "110153"
    assert source.get("UserIsRequestor") == "true"
    assert source.get("AlternativeUserID") == f"AETITLES={calling}"
    assert source.get("NetworkAccessPointID") == "127.0.0.1"
    assert coded(destination.find("RoleIDCode"))[0] == "110152"
    assert destination.get("UserIsRequestor") == "false"
    assert destination.get("AlternativeUserID") == "AETITLES=PACSRX"
    studies: dict[str, int] = {}
    patient = ""
    for obj in root.findall("ParticipantObjectIdentification"):
        id_type = coded(obj.find("ParticipantObjectIDTypeCode"))[0]
        if id_type == "110180":
            assert obj.get("ParticipantObjectTypeCode") == "2"
            assert obj.get("ParticipantObjectTypeCodeRole") == "3"
            (sop,) = obj.findall("SOPClass")
            assert sop.get("UID") == CT_IMAGE
            studies[obj.get("ParticipantObjectID", "")] = int(sop.get("NumberOfInstances", "0"))
        else:
            assert id_type == "2"  # RFC-3881 Patient Number
            assert obj.get("ParticipantObjectTypeCode") == "1"
            assert obj.get("ParticipantObjectTypeCodeRole") == "1"
            assert not patient, "one patient per message"
            patient = obj.get("ParticipantObjectID", "")
    return patient, studies


@pytest.fixture
def udp_collector() -> Collector:
    collector = Collector("udp")
    yield collector  # type: ignore[misc]
    collector.close()


def test_udp_application_activity_and_instances_transferred(
    receiver_factory, udp_collector: Collector, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "rx.toml"  # the config file key, this time
    config.write_text(f'audit-syslog = "{udp_collector.url}"\naudit-source-id = "RX-NODE-1"\n')
    rx = receiver_factory("--workers", "1", "--config", str(config))
    (start,) = wait_events(udp_collector, APP_ACTIVITY, 1)
    assert event_type(start) == "110120"
    assert start.find("AuditSourceIdentification").get("AuditSourceID") == "RX-NODE-1"
    files, expected = two_patients(tmp_path / "in")
    storescu(rx, files)
    assert len(stored_files(rx.storage)) == 3
    found = wait_events(udp_collector, TRANSFERRED, 2)
    per_patient = dict(check_transferred(root, "STORESCU") for root in found)
    assert per_patient == expected
    rx.signal(signal.SIGTERM)
    assert rx.wait(30) == 0
    stops = [r for r in wait_events(udp_collector, APP_ACTIVITY, 2) if event_type(r) == "110121"]
    assert len(stops) == 1
    assert not udp_collector.errors


def test_tcp_security_alerts_from_supervisor_and_worker(receiver_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    collector = Collector("tcp")
    try:
        config = tmp_path / "rx.toml"
        config.write_text('[ae-sources]\nMOD = ["10.9.9.9"]\n')
        rx = receiver_factory(
            "--workers",
            "1",
            "--config",
            str(config),
            "--calling-aes",
            "MOD,GOOD",
            "--audit-syslog",
            collector.url,
        )
        wait_events(collector, APP_ACTIVITY, 1)
        assert echoscu(rx, "GOOD") == 0
        assert echoscu(rx, "MOD") != 0  # [ae-sources]: refused by the supervisor
        assert echoscu(rx, "STRANGER") != 0  # --calling-aes: rejected by the worker
        alerts = wait_events(collector, SECURITY_ALERT, 2)
        assert len(alerts) == 2
        for root in alerts:
            event = root.find("EventIdentification")
            assert event_type(root) == "110126"  # Node Authentication
            assert event.get("EventOutcomeIndicator") != "0"
            reporter, performer = root.findall("ActiveParticipant")
            assert reporter.get("UserIsRequestor") == "false"
            assert performer.get("UserIsRequestor") == "true"
            assert performer.get("NetworkAccessPointID") == "127.0.0.1"
            (subject,) = root.findall("ParticipantObjectIdentification")
            assert coded(subject.find("ParticipantObjectIDTypeCode"))[0] == "110182"
        texts = sorted(r.findtext("EventIdentification/EventOutcomeDescription") for r in alerts)
        assert "MOD" in texts[0] + texts[1] and "STRANGER" in texts[0] + texts[1]
        assert not collector.errors
    finally:
        collector.close()


def test_tls_collector_and_refused_user_identity(receiver_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, cert, key = make_certificates(tmp_path)
    collector = Collector("tls", server_context(cert, key))
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "workers.identity",
                "add-user",
                str(tmp_path / "users"),
                "alice",
            ],
            input=b"s3cret\n",
            check=True,
            capture_output=True,
        )
        config = tmp_path / "rx.toml"
        config.write_text(
            f'[identity]\npassword-file = "{tmp_path / "users"}"\nrequire-for = ["MODALITY"]\n'
        )
        rx = receiver_factory(
            "--workers",
            "1",
            "--config",
            str(config),
            "--audit-syslog",
            collector.url,
            "--audit-tls-ca",
            str(ca),
        )
        wait_events(collector, APP_ACTIVITY, 1)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = 20
        item = UserIdentityNegotiation()
        item.user_identity_type = 2
        item.primary_field = b"alice"
        item.secondary_field = b"wrong-passcode"
        item.positive_response_requested = True
        assoc = ae.associate(rx.host, rx.port, ae_title="PACSRX", ext_neg=[item])
        assert not assoc.is_established
        (auth,) = wait_events(collector, USER_AUTH, 1)
        event = auth.find("EventIdentification")
        assert event_type(auth) == "110122"  # Login
        assert event.get("EventOutcomeIndicator") == "4"
        user, _node = auth.findall("ActiveParticipant")
        assert user.get("UserID") == "alice" and user.get("UserIsRequestor") == "true"
        assert user.get("NetworkAccessPointID") == "127.0.0.1"
        assert b"wrong-passcode" not in b"".join(m.msg for m in collector.messages)
        assert not collector.errors
    finally:
        collector.close()


def test_unreachable_collector_costs_reception_nothing(receiver_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed again: nobody listens there
    metrics_port = free_port()
    rx = receiver_factory(
        "--workers",
        "2",
        "--metrics-port",
        str(metrics_port),
        "--audit-syslog",
        f"tcp://127.0.0.1:{dead}",
        "--sop-classes",
        CT_IMAGE,
    )
    # A refused presentation context is counted by its reason. (DCMTK's storescu
    # proposes every storage SOP class: with --sop-classes, most of them are refused;
    # so this one goes first.)
    ae = AE(ae_title="PYNET")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR: not in --sop-classes
    ae.add_requested_context(CT_IMAGE)
    ae.acse_timeout = ae.network_timeout = 20
    assoc = ae.associate(rx.host, rx.port, ae_title="PACSRX")
    assert assoc.is_established
    assoc.release()
    reason = {"reason": "abstract-syntax-not-supported"}
    wait_for(
        lambda: (
            total(scrape(metrics_port), "pacs_presentation_contexts_rejected_total", **reason) == 1
        ),
        30,
        what="one refused context counted",
    )

    files = []
    (tmp_path / "in").mkdir()
    for i in range(6):  # six patients
        files.append(write_file(make_image(i), tmp_path / "in" / f"i{i}.dcm"))
    for start in range(0, 6, 2):
        storescu(rx, files[start : start + 2])
    assert len(stored_files(rx.storage)) == 6

    def counted():  # type: ignore[no-untyped-def]
        samples = scrape(metrics_port)
        # Application start + one Instances Transferred per patient and association.
        return total(samples, "pacs_audit_messages_dropped_total") == 7 and samples

    try:
        samples = wait_for(counted, 30, what="the audit drops counted")
    except AssertionError:
        samples = scrape(metrics_port)
        raise AssertionError(
            {k: v for k, v in samples.items() if "audit" in k or "context" in k}
        ) from None
    assert total(samples, "pacs_audit_messages_sent_total") == 0
    assert "cannot reach" in rx.log()


@pytest.mark.parametrize(
    ("flags", "mentions"),
    [
        (["--audit-syslog", "http://127.0.0.1:514"], "--audit-syslog"),
        (["--audit-syslog", "tcp://127.0.0.1:99999"], "--audit-syslog"),
        (["--audit-tls-ca", "/nonexistent.pem"], "--audit-tls-ca"),
        (["--audit-syslog", "udp://127.0.0.1:514", "--audit-tls-ca", "x.pem"], "tls://"),
        (["--audit-syslog", "tls://127.0.0.1", "--audit-tls-ca", "/nonexistent.pem"], "no such"),
        (["--log-instances", "verbose"], "--log-instances"),
        (["--audit-queue", "0", "--audit-syslog", "udp://127.0.0.1:514"], "--audit-queue"),
    ],
)
def test_bad_audit_and_log_settings_refused(
    tmp_path: Path, flags: list[str], mentions: str
) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("pacs-receiver")), "--storage", str(tmp_path), *flags],
        capture_output=True,
        timeout=30,
    )
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and mentions in lines[0], lines
