"""Who may connect, enforced by the acceptor before any hand-off: --allow-ip,
--deny-ip and the [ae-sources] table. A refused peer is answered A-ASSOCIATE-RJ
(PS3.8 Table 9-21: result 1 rejected-permanent, source 1 service-user, reason 1
no-reason-given for an address, 3 calling-AE-title-not-recognized for an AE from
the wrong address), logged and counted in pacs_associations_rejected_total.

The only peer address used is 127.0.0.1: the other networks in these tests are
configured, never connected to."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.access import AccessPolicy, peer_address
from receiver.config import ConfigError, ReceiverConfig, build, load_toml
from workers.engine import pdu

from .conftest import (
    PACS_RECEIVER,
    ReceiverFactory,
    associate,
    rejection,
    release,
    scu_ae,
    wait_for,
)

PERMANENT, SERVICE_USER = 1, 1
NO_REASON, CALLING_AE_NOT_RECOGNIZED = 1, 3


def assert_refused(assoc: Any, reason: int) -> None:
    assert not assoc.is_established
    assert rejection(assoc) == (PERMANENT, SERVICE_USER, reason)


def echo_ok(assoc: Any) -> None:
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        release(assoc)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "access.toml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------- the policy


def test_policy_deny_wins_and_allow_restricts() -> None:
    policy = AccessPolicy.build(["10.0.0.0/8", "::1"], ["10.9.0.0/16"], {})
    assert policy.address_allowed("10.1.2.3")
    assert not policy.address_allowed("10.9.1.1")  # deny wins
    assert not policy.address_allowed("192.168.1.1")  # not in the allow list
    assert policy.address_allowed("::1")
    assert not policy.address_allowed("::2")
    # A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6 addresses.
    assert policy.address_allowed("::ffff:10.1.2.3")
    assert not policy.address_allowed("::ffff:10.9.0.1")
    assert not policy.address_allowed("not an address")
    assert AccessPolicy.build([], ["127.0.0.1"], {}).address_allowed("127.0.0.2")
    assert AccessPolicy().address_allowed("203.0.113.7")  # nothing configured
    assert str(peer_address("fe80::1%eth0")) == "fe80::1"


def test_policy_ae_sources() -> None:
    policy = AccessPolicy.build([], [], {"MODALITY": ["10.1.2.3", "2001:db8::/32"]})
    assert policy.ae_source_allowed("MODALITY", "10.1.2.3")
    assert policy.ae_source_allowed("MODALITY ", "2001:db8::5")
    assert not policy.ae_source_allowed("MODALITY", "127.0.0.1")
    assert policy.ae_source_allowed("OTHER", "127.0.0.1")  # not in the table


def test_config_parses_flags_and_table(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        'allow-ip = ["10.0.0.0/8", "127.0.0.1"]\n\n[ae-sources]\nMODALITY = ["10.1.2.3"]\n',
    )
    cfg = build(load_toml(path), {"deny_ip": "10.9.0.0/16, 2001:db8::/32"})
    assert cfg.allow_ip == ["10.0.0.0/8", "127.0.0.1"]
    assert cfg.deny_ip == ["10.9.0.0/16", "2001:db8::/32"]
    assert cfg.ae_sources == {"MODALITY": ["10.1.2.3"]}
    policy = cfg.access_policy()
    assert policy.ae_sources and not policy.address_allowed("10.9.0.1")
    # [ae-sources] also works after a [receiver] table.
    path = write_config(tmp_path, '[receiver]\nport = 0\n\n[ae-sources]\nCT = ["10.0.0.1"]\n')
    assert build(load_toml(path), {}).ae_sources == {"CT": ["10.0.0.1"]}


@pytest.mark.parametrize(
    "fields",
    [
        {"allow_ip": ["10.0.0.0/33"]},
        {"deny_ip": ["localhost"]},
        {"ae_sources": {"MODALITY": ["10.1.2.300"]}},
        {"ae_sources": {"MODALITY": "10.1.2.3"}},
        {"ae_sources": {"WAY_TOO_LONG_AE_TITLE": ["10.1.2.3"]}},
    ],
)
def test_config_rejects_bad_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ReceiverConfig(**fields).check()


@pytest.mark.parametrize(
    ("args", "toml", "mentions"),
    [
        (["--allow-ip", "10.0.0.0/8,10.0.0.999"], None, "--allow-ip"),
        (["--deny-ip", "::1/129"], None, "--deny-ip"),
        ([], '[ae-sources]\nMODALITY = ["nowhere"]\n', "[ae-sources]"),
    ],
)
def test_bad_address_exits_2_with_one_line(
    args: list[str], toml: str | None, mentions: str, tmp_path: Path
) -> None:
    if toml is not None:
        args = [*args, "--config", write_config(tmp_path, toml)]
    result = subprocess.run(
        [PACS_RECEIVER, "--port", "0", "--metrics-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pacs-receiver: error:") and mentions in lines[0], lines[0]


# ---------------------------------------------------- the real process tree


def test_deny_ip_refuses(receiver_factory: ReceiverFactory) -> None:
    rx = receiver_factory("--deny-ip", "10.0.0.0/8,127.0.0.1", "--workers", "1")
    for title in ("FIRST", "SECOND"):
        assert_refused(associate(rx, scu_ae(title)), NO_REASON)
    log = rx.wait_log(r"rejecting association from 'SECOND' .*--deny-ip").group(0)
    assert "127.0.0.1:" in log
    # Deny wins over allow.
    rx2 = receiver_factory("--allow-ip", "127.0.0.1", "--deny-ip", "127.0.0.0/8", "--workers", "1")
    assert_refused(associate(rx2, scu_ae()), NO_REASON)
    assert rx.stop() == 0


def test_allow_ip(receiver_factory: ReceiverFactory) -> None:
    elsewhere = receiver_factory("--allow-ip", "10.0.0.0/8", "--workers", "1")
    assert_refused(associate(elsewhere, scu_ae()), NO_REASON)
    here = receiver_factory("--allow-ip", "10.0.0.0/8,127.0.0.0/8,::1", "--workers", "1")
    echo_ok(associate(here, scu_ae()))
    assert "rejecting" not in here.log()


def test_silent_peer_refused_with_a_log_line(receiver_factory: ReceiverFactory) -> None:
    rx = receiver_factory("--deny-ip", "127.0.0.1", "--workers", "1")
    with socket.create_connection((rx.host, rx.port), timeout=10):
        pass  # connects and closes without an A-ASSOCIATE-RQ
    rx.wait_log(r"refused connection from 127\.0\.0\.1:\d+ .*no A-ASSOCIATE-RQ")


def test_ae_sources(receiver_factory: ReceiverFactory, tmp_path: Path) -> None:
    config = write_config(tmp_path, '[ae-sources]\nMODALITY = ["10.1.2.3"]\n')
    rx = receiver_factory("--config", config, "--workers", "2")
    assert_refused(associate(rx, scu_ae("MODALITY")), CALLING_AE_NOT_RECOGNIZED)
    echo_ok(associate(rx, scu_ae("OTHER")))
    rx.wait_log(r"rejecting association from 'MODALITY' .*\[ae-sources\]")
    # Once 127.0.0.1 is among its sources, MODALITY gets in.
    config2 = write_config(tmp_path, '[ae-sources]\nMODALITY = ["10.1.2.3", "127.0.0.0/8"]\n')
    echo_ok(associate(receiver_factory("--config", config2), scu_ae("MODALITY")))


def raw_rq(calling: str) -> bytes:
    return pdu.encode(
        pdu.AssociateRQ(
            "PACSRX",
            calling,
            (pdu.PresentationContextRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),),
            pdu.UserInformation(max_length=16384, implementation_class_uid="1.2.3.4"),
        )
    )


def test_ae_sources_with_limits(receiver_factory: ReceiverFactory, tmp_path: Path) -> None:
    """[ae-sources] and both limits: every connection is peeked, and the total limit
    is checked again after the peek, so a burst does not overshoot it."""
    config = write_config(tmp_path, '[ae-sources]\nMODALITY = ["10.1.2.3"]\n')
    rx = receiver_factory(
        "--config", config, "--max-associations", "1", "--max-associations-per-ae", "5"
    )
    assert_refused(associate(rx, scu_ae("MODALITY")), CALLING_AE_NOT_RECOGNIZED)
    # A burst: all connected (and being peeked) before any A-ASSOCIATE-RQ is sent.
    socks = [socket.create_connection((rx.host, rx.port), timeout=10) for _ in range(8)]
    try:
        time.sleep(0.5)
        for i, sock in enumerate(socks):
            sock.sendall(raw_rq(f"BURST{i}"))
        answers = []
        for sock in socks:
            head = sock.recv(6, socket.MSG_WAITALL)
            body = sock.recv(int.from_bytes(head[2:6], "big"), socket.MSG_WAITALL)
            answers.append(pdu.decode(head[0], body))
    finally:
        for sock in socks:
            sock.close()
    accepted = [a for a in answers if isinstance(a, pdu.AssociateAC)]
    rejected = [a for a in answers if isinstance(a, pdu.AssociateRJ)]
    assert len(accepted) == 1, answers
    assert len(rejected) == 7, answers
    assert {(r.result, r.source, r.reason) for r in rejected} == {(2, 3, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rejected_samples(port: int) -> dict[tuple[str, ...], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pacs_associations_rejected_total":
                labels = s.labels
                key = tuple(
                    labels[k] for k in ("calling_ae", "called_ae", "result", "source", "reason")
                )
                out[key] = s.value
    return out


def test_refusals_are_counted(receiver_factory: ReceiverFactory, tmp_path: Path) -> None:
    config = write_config(tmp_path, '[ae-sources]\nMODALITY = ["10.1.2.3"]\n')
    port = free_port()
    rx = receiver_factory("--config", config, "--metrics-port", str(port), "--workers", "1")
    for _ in range(2):
        assert_refused(associate(rx, scu_ae("MODALITY")), CALLING_AE_NOT_RECOGNIZED)
    want = {
        (
            "MODALITY",
            "PACSRX",
            "permanent",
            "service_user",
            "calling_ae_title_not_recognized",
        ): 2.0
    }

    def counted() -> bool:
        try:
            return rejected_samples(port) == want
        except OSError:
            return False

    wait_for(counted, 20, what=f"{want} in pacs_associations_rejected_total")
    assert rx.stop() == 0

    port = free_port()
    rx = receiver_factory("--deny-ip", "127.0.0.1", "--metrics-port", str(port), "--workers", "1")
    assert_refused(associate(rx, scu_ae("DENIED")), NO_REASON)
    want = {("DENIED", "PACSRX", "permanent", "service_user", "no_reason_given"): 1.0}
    wait_for(counted, 20, what=f"{want} in pacs_associations_rejected_total")
