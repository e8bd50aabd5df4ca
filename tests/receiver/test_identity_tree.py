"""The built-in user identity policy, configured by an [identity] TOML table, in the
real process tree: no identity, wrong and right passcodes, from pynetdicom."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation

BIN = Path(sys.executable).parent
VERIFICATION = "1.2.840.10008.1.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def associate(port: int, passcode: bytes | None):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 10
    ext = []
    if passcode is not None:
        item = UserIdentityNegotiation()
        item.user_identity_type = 2
        item.primary_field = b"alice"
        item.secondary_field = passcode
        item.positive_response_requested = True
        ext.append(item)
    return ae.associate("127.0.0.1", port, ext_neg=ext)


@pytest.fixture
def receiver(tmp_path: Path):  # type: ignore[no-untyped-def]
    subprocess.run(
        [sys.executable, "-m", "workers.identity", "add-user", str(tmp_path / "users"), "alice"],
        input=b"s3cret\n",
        check=True,
        capture_output=True,
    )
    port = free_port()
    (tmp_path / "rx.toml").write_text(
        f'host = "127.0.0.1"\nport = {port}\nmetrics-port = 0\nworkers = 1\n'
        f'storage = "{tmp_path / "store"}"\n'
        '[identity]\npassword-file = "users"\nrequire-for = ["MODALITY"]\n'
    )
    proc = subprocess.Popen(
        [str(BIN / "pacs-receiver"), "--config", str(tmp_path / "rx.toml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_identity_required_checked_and_answered(receiver: int) -> None:
    missing = associate(receiver, None)
    assert missing.is_rejected
    wrong = associate(receiver, b"nope")
    assert wrong.is_rejected
    right = associate(receiver, b"s3cret")
    assert right.is_established
    right.release()


def test_bad_identity_table_stops_startup(tmp_path: Path) -> None:
    (tmp_path / "rx.toml").write_text('[identity]\npassword-file = "missing-file"\n')
    result = subprocess.run(
        [str(BIN / "pacs-receiver"), "--config", str(tmp_path / "rx.toml")],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "[identity]" in lines[0], lines
