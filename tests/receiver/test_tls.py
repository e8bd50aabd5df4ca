"""DICOM TLS (PS3.15 secure transport connection profiles).

A CA, a server certificate for 127.0.0.1 and client certificates (one from the CA,
one from a CA the receiver does not trust) are made here with ``cryptography``.
Worker level: :class:`~workers.server.AssociationServer` adopting a socket accepted
elsewhere, as the acceptor hands it over, under asyncio and under uvloop (the
protocol is a BufferedProtocol: both loops' SSL transports must feed it). Tree level:
the real ``pacs-receiver`` with ``--tls-*`` flags, pynetdicom, our SCU and DCMTK.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from receiver.__main__ import main as receiver_main
from workers.config import WorkerConfig
from workers.engine import acse
from workers.scu import Requested
from workers.scu import associate as scu_associate
from workers.server import AssociationServer
from workers.storage import StorageConfig
from workers.tls import PROFILES, TlsSettings, client_context, server_context

from .conftest import (
    CT_IMAGE,
    EXPLICIT_LE,
    STORESCU,
    VERIFICATION,
    Receiver,
    ReceiverFactory,
    associate,
    make_files,
    make_image,
    rejection,
    scu_ae,
    sop_uid,
    stored_files,
    wait_for,
)

# ------------------------------------------------------------------- certificates


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # issued by a CA the receiver does not trust
    rogue_key: Path


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _issue(
    cn: str,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: rsa.RSAPrivateKey,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:  # a CA
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    ca_key, rogue_ca_key = key(), key()
    ca = _issue("Test DICOM CA", ca_key, None, ca_key)
    rogue_ca = _issue("Rogue CA", rogue_ca_key, None, rogue_ca_key)
    server_key, client_key, rogue_key = key(), key(), key()
    return Pki(
        ca=_pem(ca, d / "ca.pem"),
        server_cert=_pem(_issue("127.0.0.1", server_key, ca, ca_key, server=True), d / "srv.pem"),
        server_key=_write_key(server_key, d / "srv.key"),
        client_cert=_pem(_issue("MODALITY", client_key, ca, ca_key), d / "cli.pem"),
        client_key=_write_key(client_key, d / "cli.key"),
        rogue_cert=_pem(_issue("INTRUDER", rogue_key, rogue_ca, rogue_ca_key), d / "rogue.pem"),
        rogue_key=_write_key(rogue_key, d / "rogue.key"),
    )


def tls_settings(pki: Pki, **kw: Any) -> TlsSettings:
    return TlsSettings(cert=str(pki.server_cert), key=str(pki.server_key), ca=str(pki.ca), **kw)


def tls_flags(pki: Pki, *extra: str) -> list[str]:
    return [
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-ca",
        str(pki.ca),
        *extra,
    ]


def client(pki: Pki, *, cert: bool = True, rogue: bool = False, **kw: Any) -> ssl.SSLContext:
    if rogue:
        return client_context(ca=str(pki.ca), cert=str(pki.rogue_cert), key=str(pki.rogue_key))
    if cert:
        return client_context(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
    return client_context(ca=str(pki.ca))


# ----------------------------------------------------------------- profiles


def test_profiles_map_to_context_settings(pki: Pki) -> None:
    expected = {
        "bcp195": ssl.TLSVersion.TLSv1_2,
        "bcp195-nd": ssl.TLSVersion.TLSv1_2,
        "bcp195-extended": ssl.TLSVersion.TLSv1_2,
    }
    assert set(PROFILES) == set(expected)
    for profile, minimum in expected.items():
        ctx = server_context(tls_settings(pki, profile=profile))
        assert ctx.minimum_version == minimum
        assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
        names = {c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"}
        if profile == "bcp195":
            assert "ECDHE-RSA-AES128-GCM-SHA256" in names and "AES128-SHA" in names
        if profile == "bcp195-nd":
            assert names and all(n.startswith("ECDHE-") for n in names)
            assert all("GCM" in n or "CHACHA20" in n for n in names)
        if profile == "bcp195-extended":  # PS3.15 B.11, DCMTK's +pz: AES-GCM suites only
            assert names and all("GCM" in n and n.startswith(("ECDHE-", "DHE-")) for n in names)
            assert ctx.maximum_version == ssl.TLSVersion.TLSv1_2  # no TLS 1.3 suite allowed
        else:
            assert ctx.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    assert server_context(tls_settings(pki)).verify_mode == ssl.CERT_OPTIONAL
    assert server_context(tls_settings(pki, verify_client=True)).verify_mode == ssl.CERT_REQUIRED


# ------------------------------------------------------------ worker level

LoopRunner = Callable[[Any], Any]
LOOPS: dict[str, LoopRunner] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def _worker_config(root: Path, tls: TlsSettings) -> WorkerConfig:
    return WorkerConfig(
        storage=StorageConfig(root=str(root), fsync="never"),
        syntaxes={acse.ANY: (acse.ANY,)},
        artim_timeout=5.0,
        tls=tls,
    )


async def _accept_and_adopt(server: AssociationServer, listener: socket.socket) -> Any:
    """What the acceptor and a worker do: accept a plain socket, hand it over."""
    loop = asyncio.get_running_loop()
    sock, _ = await loop.sock_accept(listener)
    return await server.adopt(sock)


async def _store_over_tls(
    root: Path, pki: Pki, *, profile: str = "bcp195", use_listen: bool = False
) -> dict[str, Any]:
    server = AssociationServer(_worker_config(root, tls_settings(pki, profile=profile)))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        if use_listen:
            host, port = await server.listen("127.0.0.1", 0)
            adopted = None
        else:
            host, port = listener.getsockname()[:2]
            adopted = asyncio.ensure_future(_accept_and_adopt(server, listener))
        assoc = await asyncio.wait_for(
            scu_associate(
                host,
                port,
                called_ae="PACSRX",
                contexts=[Requested(VERIFICATION), Requested(CT_IMAGE, (EXPLICIT_LE,))],
                ssl=client(pki, cert=True),
            ),
            10,
        )
        proto = await adopted if adopted is not None else next(iter(server.protocols))
        echo = await assoc.send_c_echo()
        rsp = await assoc.send_c_store(make_image(1))
        # TCP_NODELAY (set in connection_made) reached the real socket under TLS.
        nodelay = proto._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert proto.transport is not None
        ssl_object = proto.transport.get_extra_info("ssl_object")
        await assoc.release()
        return {
            "echo": echo,
            "store": rsp.Status,
            "nodelay": nodelay,
            "version": ssl_object.version(),
            "peer_cn": dict(x[0] for x in ssl_object.getpeercert()["subject"])["commonName"],
        }
    finally:
        listener.close()
        await server.close(graceful_timeout=2.0)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize("use_listen", [False, True], ids=["adopt", "listen"])
def test_worker_stores_over_tls(tmp_path: Path, pki: Pki, loop_name: str, use_listen: bool) -> None:
    out = LOOPS[loop_name](_store_over_tls(tmp_path, pki, use_listen=use_listen))
    assert out["echo"] == 0 and out["store"] == 0
    assert out["nodelay"] != 0
    assert out["version"] == "TLSv1.3"
    assert out["peer_cn"] == "MODALITY"
    assert len(stored_files(tmp_path)) == 1


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_worker_extended_profile_negotiates_tls12(tmp_path: Path, pki: Pki, loop_name: str) -> None:
    """PS3.15 B.11 allows none of TLS 1.3's suites: a client that offers TLS 1.3 gets
    TLS 1.2 with one of the profile's AES-GCM suites."""
    out = LOOPS[loop_name](_store_over_tls(tmp_path, pki, profile="bcp195-extended"))
    assert out["store"] == 0 and out["version"] == "TLSv1.2"


def test_help_describes_the_extended_profile_as_the_code_applies_it(pki: Pki) -> None:
    from receiver.__main__ import make_parser

    help_text = " ".join(make_parser().format_help().split())
    assert "'bcp195-extended': TLS 1.2 only" in help_text
    ctx = server_context(tls_settings(pki, profile="bcp195-extended"))
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_2


async def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    """Connect with ``ctx``; the TLS version, or the failure's class name."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5
        )
    except (TimeoutError, OSError) as exc:
        return type(exc).__name__
    version = writer.get_extra_info("ssl_object").version()
    # TLS 1.3: a refused client certificate shows on the first read, not in connect.
    try:
        data = await asyncio.wait_for(reader.read(1), 2)
    except (TimeoutError, OSError) as exc:
        data = type(exc).__name__.encode()
    writer.close()
    return f"{version}:{data!r}"


def test_profiles_refuse_what_they_exclude(tmp_path: Path, pki: Pki) -> None:
    async def run() -> dict[str, str]:
        out: dict[str, str] = {}
        for profile in PROFILES:
            server = AssociationServer(_worker_config(tmp_path, tls_settings(pki, profile=profile)))
            _, port = await server.listen("127.0.0.1", 0)
            tls12 = client(pki)
            tls12.maximum_version = ssl.TLSVersion.TLSv1_2
            cbc = client(pki)
            cbc.maximum_version = ssl.TLSVersion.TLSv1_2
            cbc.set_ciphers("AES128-SHA")
            out[f"{profile}/tls1.2"] = await _handshake(port, tls12)
            out[f"{profile}/cbc"] = await _handshake(port, cbc)
            await server.close(graceful_timeout=1.0)
        return out

    out = uvloop.run(run())
    assert out["bcp195/tls1.2"].startswith("TLSv1.2")
    assert out["bcp195/cbc"].startswith("TLSv1.2")  # the profile's fallback suite
    assert out["bcp195-nd/tls1.2"].startswith("TLSv1.2")
    # refused: an alert (SSLError) or the connection closed in the handshake
    assert not out["bcp195-nd/cbc"].startswith("TLS"), out  # non-downgrading
    assert out["bcp195-extended/tls1.2"].startswith("TLSv1.2")  # AEAD suites, as DCMTK +pz
    assert not out["bcp195-extended/cbc"].startswith("TLS"), out


# --------------------------------------------------------------- the tree


def _pyn_store(rx: Receiver, ctx: ssl.SSLContext, path: Path) -> int | None:
    ae = scu_ae(storage=True)
    assoc = ae.associate(rx.host, rx.port, ae_title="PACSRX", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(str(path))
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def test_tree_stores_over_tls_pynetdicom_and_our_scu(
    receiver_factory: ReceiverFactory, pki: Pki, tmp_path: Path
) -> None:
    rx = receiver_factory(*tls_flags(pki))
    files = make_files(tmp_path / "src", 2)
    # No client certificate: fine without --tls-verify-client.
    assert _pyn_store(rx, client(pki, cert=False), files[0]) == 0

    async def ours() -> int:
        assoc = await scu_associate(
            rx.host,
            rx.port,
            called_ae="PACSRX",
            contexts=[Requested(CT_IMAGE, (EXPLICIT_LE,))],
            ssl=client(pki),
        )
        rsp = await assoc.send_c_store(files[1])
        await assoc.release()
        assert rsp.Status is not None
        return int(rsp.Status)

    assert uvloop.run(ours()) == 0
    assert len(stored_files(rx.storage)) == 2
    assert "Traceback" not in rx.log()


def test_tree_mutual_tls(receiver_factory: ReceiverFactory, pki: Pki, tmp_path: Path) -> None:
    rx = receiver_factory(*tls_flags(pki, "--tls-verify-client", "--tls-profile", "bcp195-nd"))
    files = make_files(tmp_path / "src", 3)
    assert _pyn_store(rx, client(pki, cert=False), files[0]) is None
    assert _pyn_store(rx, client(pki, rogue=True), files[1]) is None
    assert _pyn_store(rx, client(pki), files[2]) == 0
    assert list(stored_files(rx.storage)) == [sop_uid(files[2])]
    rx.wait_log(r"TLS handshake with 127\.0\.0\.1:\d+ failed")


def test_tree_idle_handshake_is_dropped_while_others_are_served(
    receiver_factory: ReceiverFactory, pki: Pki, tmp_path: Path
) -> None:
    rx = receiver_factory(*tls_flags(pki, "--tls-handshake-timeout", "1.5"), "--workers", "1")
    files = make_files(tmp_path / "src", 1)
    idle = socket.create_connection((rx.host, rx.port))  # never sends a ClientHello
    try:
        started = time.monotonic()
        # The one worker serves another client meanwhile.
        assert _pyn_store(rx, client(pki), files[0]) == 0
        # ... while the idle handshake is still pending: not closed yet.
        idle.setblocking(False)
        with pytest.raises(BlockingIOError):
            idle.recv(1)
        idle.setblocking(True)
        idle.settimeout(10)
        assert idle.recv(1) == b""  # closed by the receiver
        elapsed = time.monotonic() - started
        assert 1.0 < elapsed < 8.0
    finally:
        idle.close()
    rx.wait_log(r"TLS handshake with .* failed")


def test_tree_per_ae_limit_holds_across_workers_under_tls(
    receiver_factory: ReceiverFactory, pki: Pki
) -> None:
    """The acceptor cannot read the calling AE title inside TLS; the workers ask the
    supervisor, so the limit holds for the whole receiver: with two workers the
    second association of an AE goes to the other (least-loaded) worker and is still
    refused, with an A-ASSOCIATE-RJ the client reads over TLS. Another AE is served,
    and once the first is released the AE may associate again."""
    rx = receiver_factory(*tls_flags(pki), "--workers", "2", "--max-associations-per-ae", "1")
    tls = (client(pki), "127.0.0.1")
    first = scu_ae().associate(rx.host, rx.port, ae_title="PACSRX", tls_args=tls)
    try:
        assert first.is_established
        second = associate(rx, scu_ae(), tls_args=(client(pki), "127.0.0.1"))
        # transient, service-provider (presentation), local limit exceeded
        assert rejection(second) == (2, 3, 2)
        other = scu_ae("OTHERSCU").associate(
            rx.host, rx.port, ae_title="PACSRX", tls_args=(client(pki), "127.0.0.1")
        )
        assert other.is_established
        other.release()
    finally:
        first.release()
    rx.wait_log(r"refusing 'PYNETSCU' from 127\.0\.0\.1 \(over TLS, in worker \d\)")

    def again() -> bool:
        assoc = scu_ae().associate(
            rx.host, rx.port, ae_title="PACSRX", tls_args=(client(pki), "127.0.0.1")
        )
        if assoc.is_established:
            assoc.release()
            return True
        return False

    assert wait_for(again, 10.0)


def test_tree_ae_sources_under_tls(
    receiver_factory: ReceiverFactory, pki: Pki, tmp_path: Path
) -> None:
    """[ae-sources] with TLS: an AE tied to other addresses is refused (permanent,
    calling AE title not recognized) over TLS; an AE tied to loopback and one not in
    the table are served."""
    toml = tmp_path / "rx.toml"
    toml.write_text('[ae-sources]\nMODALITY = ["10.0.0.1"]\nLOCALSCU = ["127.0.0.0/8"]\n')
    rx = receiver_factory(*tls_flags(pki), "--workers", "2", "--config", str(toml))
    refused = associate(rx, scu_ae("MODALITY"), tls_args=(client(pki), "127.0.0.1"))
    # permanent, service-user, calling AE title not recognized
    assert rejection(refused) == (1, 1, 3)
    for title in ("LOCALSCU", "ANYONE"):
        assoc = scu_ae(title).associate(
            rx.host, rx.port, ae_title="PACSRX", tls_args=(client(pki), "127.0.0.1")
        )
        assert assoc.is_established, title
        assoc.release()
    rx.wait_log(r"refusing 'MODALITY' from 127\.0\.0\.1 .*\[ae-sources\]")


@pytest.mark.skipif(STORESCU is None, reason="DCMTK storescu not installed")
@pytest.mark.parametrize(
    ("profile", "dcmtk_flag"), [("bcp195", "+px"), ("bcp195-nd", "+py"), ("bcp195-extended", "+pz")]
)
def test_tree_dcmtk_storescu_tls(
    receiver_factory: ReceiverFactory, pki: Pki, tmp_path: Path, profile: str, dcmtk_flag: str
) -> None:
    rx = receiver_factory(*tls_flags(pki, "--tls-verify-client", "--tls-profile", profile))
    files = make_files(tmp_path / "src", 2)
    assert STORESCU is not None
    proc = subprocess.run(
        [
            STORESCU,
            "+tls",
            str(pki.client_key),
            str(pki.client_cert),
            "+cf",
            str(pki.ca),
            dcmtk_flag,
            "-aec",
            "PACSRX",
            rx.host,
            str(rx.port),
            *map(str, files),
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert wait_for(lambda: len(stored_files(rx.storage)) == 2, 10)


# ------------------------------------------------------------ configuration


def test_bad_tls_files_stop_start_up(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        ["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki.server_key)],
        ["--tls-cert", str(junk), "--tls-key", str(pki.server_key)],
        ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)],  # mismatch
        [
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--tls-ca",
            str(junk),
        ],
        [
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--tls-verify-client",
        ],
        ["--tls-ca", str(pki.ca)],
        ["--tls-cert", str(pki.server_cert), "--tls-handshake-timeout", "0"],
    ]
    for flags in cases:
        assert receiver_main([*flags, "--storage", str(tmp_path / "s")]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith(("pacs-receiver: error: --tls", "pacs-receiver: error: --config")), (
            err
        )
        assert "\n" not in err


def test_bad_tls_profile_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        receiver_main(["--tls-profile", "tls1.0"])
    assert info.value.code == 2
