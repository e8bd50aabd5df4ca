"""The receiver's log lines, text and JSON, from the real process tree: one line per
association (peer, AE titles, contexts, outcome, instances, bytes, duration), one
per instance when asked for, rejections and aborts with their PS3.8 names, and
refused presentation contexts with theirs."""

from __future__ import annotations

import json
import re
import shlex
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from tests.receiver.conftest import (
    CT_IMAGE,
    ECHOSCU,
    STORESCU,
    Receiver,
    make_files,
    needs_dcmtk,
    sop_uid,
    wait_for,
)
from workers.engine import acse
from workers.engine import pdu as p

pytestmark = needs_dcmtk

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
_TEXT = re.compile(r"\S+: (?P<event>[a-z-]+) (?P<fields>\w+=.*)$")


def events(rx: Receiver, fmt: str, what: str) -> list[dict[str, Any]]:
    """The ``what`` lines of the log as dicts (JSON keys, or the text's key=value)."""
    out = []
    for line in rx.log().splitlines():
        if fmt == "json":
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("event") == what:
                out.append(record)
            continue
        m = _TEXT.search(line)
        if m is None or m["event"] != what:
            continue
        out.append(dict(pair.split("=", 1) for pair in shlex.split(m["fields"])))
    return out


def wait_events(rx: Receiver, fmt: str, what: str, count: int = 1) -> list[dict[str, Any]]:
    found = wait_for(
        lambda: (e := events(rx, fmt, what)) and len(e) >= count and e,
        20,
        what=f"{count} {what} line(s)",
    )
    assert isinstance(found, list)
    return found


def run(*cmd: str) -> int:
    return subprocess.run(list(cmd), capture_output=True, timeout=60).returncode


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_association_and_instance_lines(receiver_factory, tmp_path: Path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    rx = receiver_factory("--workers", "1", "--log-format", fmt, "--log-instances", "info")
    files = make_files(tmp_path / "in", 2)
    assert STORESCU is not None
    assert run(STORESCU, "-aet", "MODALITY", rx.host, str(rx.port), *map(str, files)) == 0
    (line,) = wait_events(rx, fmt, "association")
    assert line["outcome"] == "released"
    assert line["calling_ae"] == "MODALITY" and line["called_ae"] == "ANY-SCP"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", str(line["peer"]))
    assert int(line["instances"]) == 2 and int(line["failed"]) == 0
    assert int(line["bytes"]) > 2 * 2048
    assert int(line["contexts_accepted"]) >= 1
    assert float(line["duration"]) >= 0
    instances = wait_events(rx, fmt, "instance", 2)
    assert {i["sop_instance"] for i in instances} == {sop_uid(f) for f in files}
    for i in instances:
        assert i["sop_class"] == CT_IMAGE
        assert i["status"] == "0x0000"
        assert int(i["bytes"]) > 2048
        assert Path(str(i["path"])).is_file()
    if fmt == "json":  # the same values as JSON types
        assert isinstance(line["instances"], int) and isinstance(line["duration"], float)
        assert line["level"] == "INFO" and line["process"] == "worker-0"


def test_no_instance_lines_unless_asked(receiver_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rx = receiver_factory("--workers", "1", "--log-level", "DEBUG")
    files = make_files(tmp_path / "in", 1)
    assert STORESCU is not None
    assert run(STORESCU, rx.host, str(rx.port), *map(str, files)) == 0
    wait_events(rx, "text", "association")
    assert events(rx, "text", "instance") == []


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_rejections_named(receiver_factory, tmp_path: Path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "rx.toml"
    config.write_text('[ae-sources]\nMOD = ["10.9.9.9"]\n')
    rx = receiver_factory(
        "--workers",
        "1",
        "--log-format",
        fmt,
        "--config",
        str(config),
        "--calling-aes",
        "MOD,GOOD",
    )
    assert ECHOSCU is not None
    assert run(ECHOSCU, "-aet", "STRANGER", rx.host, str(rx.port)) != 0  # by the worker
    assert run(ECHOSCU, "-aet", "MOD", rx.host, str(rx.port)) != 0  # by the supervisor
    names = {
        "reject_result": "rejected-permanent",
        "reject_source": "service-user",
        "reject_reason": "calling-ae-title-not-recognized",
    }
    if fmt == "json":
        lines = wait_events(rx, fmt, "association-rejected", 2)
        by_ae = {line["calling_ae"]: line for line in lines}
        for ae in ("STRANGER", "MOD"):
            assert {k: by_ae[ae][k] for k in names} == names
        assert by_ae["MOD"]["logger"] == "receiver.supervisor"
        assert "[ae-sources]" in by_ae["MOD"]["why"]
    else:
        (line,) = wait_events(rx, fmt, "association-rejected", 1)
        assert line["calling_ae"] == "STRANGER"
        assert {k: line[k] for k in names} == names
        # the acceptor's sentence, as before, with the names
        rx.wait_log(
            r"rejecting association from 'MOD' .*\[ae-sources\] \(rejected-permanent, "
            r"service-user, calling-ae-title-not-recognized\)"
        )
    (assoc_line,) = [
        a for a in wait_events(rx, fmt, "association") if a["calling_ae"] == "STRANGER"
    ]
    assert assoc_line["outcome"] == "rejected"
    assert assoc_line["reject_reason"] == "calling-ae-title-not-recognized"


def _recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        assert chunk, "closed"
        head += chunk
    kind, length = struct.unpack(">BxL", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "closed"
        body += chunk
    return kind, body


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_aborts_named(receiver_factory, fmt: str) -> None:  # type: ignore[no-untyped-def]
    rx = receiver_factory("--workers", "1", "--log-format", fmt)
    # by the peer: an A-ABORT from pynetdicom (source service-user)
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 20
    assoc = ae.associate(rx.host, rx.port, ae_title="PACSRX")
    assert assoc.is_established
    assoc.abort()
    # by us: a PDU type that does not exist after the association is up
    rq = acse.build_request(
        "PACSRX", "GARBLER", [acse.Requested("1.2.840.10008.1.1", ("1.2.840.10008.1.2",))]
    )
    with socket.create_connection((rx.host, rx.port), timeout=20) as sock:
        sock.sendall(p.encode(rq))
        assert _recv_pdu(sock)[0] == p.PDUType.ASSOCIATE_AC
        sock.sendall(struct.pack(">BxL", 0x99, 0))
        kind, body = _recv_pdu(sock)
        assert kind == p.PDUType.ABORT and body[2:4] == bytes([2, 1])
    lines = {a["calling_ae"]: a for a in wait_events(rx, fmt, "association", 2)}
    peer = lines["ABORTER"]
    assert peer["outcome"] == "aborted" and peer["abort_initiator"] == "peer"
    assert peer["abort_source"] == "service-user"
    local = lines["GARBLER"]
    assert local["outcome"] == "aborted" and local["abort_initiator"] == "local"
    assert local["abort_source"] == "service-provider"
    assert local["abort_reason"] == "unrecognized-pdu"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_refused_presentation_contexts_named(receiver_factory, fmt: str) -> None:  # type: ignore[no-untyped-def]
    rx = receiver_factory(
        "--workers",
        "1",
        "--log-format",
        fmt,
        "--sop-classes",
        CT_IMAGE,
        "--transfer-syntaxes",
        "1.2.840.10008.1.2.1",
    )
    ae = AE(ae_title="PROPOSER")
    ae.add_requested_context(MR_IMAGE, ["1.2.840.10008.1.2.1"])  # SOP class refused
    ae.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2"])  # transfer syntax refused
    ae.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2.1"])  # accepted
    ae.acse_timeout = ae.network_timeout = 20
    assoc = ae.associate(rx.host, rx.port, ae_title="PACSRX")
    assert assoc.is_established
    assoc.release()
    refused = wait_events(rx, fmt, "context-rejected", 2)
    by_syntax = {(r["abstract_syntax"], r["reason"]) for r in refused}
    assert by_syntax == {
        (MR_IMAGE, "abstract-syntax-not-supported"),
        (CT_IMAGE, "transfer-syntaxes-not-supported"),
    }
    (line,) = wait_events(rx, fmt, "association")
    assert int(line["contexts_accepted"]) == 1 and int(line["contexts_rejected"]) == 2
