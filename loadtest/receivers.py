"""The receivers ``pacs-loadtest compare`` drives: how each is started, checked for
availability, waited for and stopped (:class:`Running`, :class:`ReceiverSpec`,
:data:`RECEIVERS`).

Each starts on 127.0.0.1 (or inside the loopback-only namespace, see
:mod:`loadtest.compare`) in its own session, storing into a directory of its own;
:meth:`Running.stop` sends SIGTERM, then SIGKILL to the whole process group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.engine import acse, dimse

from .runner import RunError

__all__ = [
    "DEFAULT_RECEIVERS",
    "RECEIVERS",
    "ReceiverSpec",
    "Running",
    "dcmtk_binary",
    "free_port",
    "orthanc_binary",
    "orthanc_config",
    "wait_ready",
]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
DCMTK_MAX_PDU = 131072


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_binary(name: str) -> str | None:
    """The DCMTK executable ``name`` (ELF only: pynetdicom installs Python scripts with
    the same names into the venv's bin)."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for d in dirs:
        candidate = os.path.join(d, name)
        try:
            with open(candidate, "rb") as f:
                if f.read(4) == b"\x7fELF" and os.access(candidate, os.X_OK):
                    return candidate
        except OSError:
            continue
    return None


def pacs_receiver_command() -> list[str]:
    script = Path(sys.executable).with_name("pacs-receiver")
    if script.exists():
        return [str(script)]
    found = shutil.which("pacs-receiver")
    return [found] if found else [sys.executable, "-m", "receiver"]


# -------------------------------------------------------------------- receivers


@dataclass
class Running:
    """A started receiver."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    storage: Path
    log_path: Path
    #: whether clear_storage may empty ``storage`` between cells (Orthanc's index
    #: refers to its files: they stay)
    clearable: bool = True

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole process group (we made it a session)."""
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers: workers, --fork children
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def clear_storage(self) -> None:
        if not self.clearable:
            return
        for child in self.storage.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()


@dataclass
class ReceiverSpec:
    name: str
    available: Callable[[], str | None]  # None when available, else why not
    start: Callable[[Path, argparse.Namespace], Running]
    #: formatted with ``workers`` and ``fsync`` (--receiver-workers, --receiver-fsync)
    notes: str = ""
    #: listens on every interface: runs only in a loopback-only network namespace
    all_interfaces: bool = False


def _spawn(
    name: str, cmd: list[str], base: Path, port: int, env: dict[str, str] | None = None
) -> Running:
    storage = base / "store"
    storage.mkdir(parents=True, exist_ok=True)
    log_path = base / "receiver.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [c.replace("{STORAGE}", str(storage)) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=base,
            env=full_env,
            start_new_session=True,  # own process group: Ctrl-C is ours to handle
        )
    return Running(name, proc, port, storage, log_path)


def _start_pacs_receiver(base: Path, args: argparse.Namespace) -> Running:
    cmd = [
        *pacs_receiver_command(),
        *("--host", "127.0.0.1", "--port", "0", "--workers", str(args.receiver_workers)),
        *("--fsync", args.receiver_fsync, "--metrics-port", "0", "--storage", "{STORAGE}"),
        *("--log-level", "DEBUG" if args.verbose else "INFO"),  # INFO: "listening on"
    ]
    if args.async_ops is not None:
        cmd += ["--max-async-ops", str(args.async_ops or 64)]
    running = _spawn("pacs-receiver", cmd, base, 0)
    # the port (the kernel's pick) and readiness come from the log
    deadline = time.monotonic() + START_TIMEOUT
    pattern = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
    while True:
        match = pattern.search(running.log())
        if match:
            running.port = int(match.group(1))
            break
        if not running.alive() or time.monotonic() > deadline:
            running.stop()
            raise RunError(f"pacs-receiver did not start; log:\n{running.log()[-2000:]}")
        time.sleep(0.05)
    return running


def _start_storescp(fork: bool) -> Callable[[Path, argparse.Namespace], Running]:
    def start(base: Path, args: argparse.Namespace) -> Running:
        binary = dcmtk_binary("storescp")
        assert binary is not None
        port = free_port()
        cmd = [binary, "--fork"] if fork else [binary, "+B"]
        cmd += ["-od", "{STORAGE}", "--max-pdu", str(DCMTK_MAX_PDU), "-dhl", str(port)]
        name = "dcmtk-storescp-fork" if fork else "dcmtk-storescp"
        return _spawn(name, cmd, base, port, env={"TCP_NODELAY": "1"})

    return start


def _start_pynetdicom(base: Path, args: argparse.Namespace) -> Running:
    port = free_port()
    cmd = [sys.executable, "-m", "loadtest.pynetdicom_scp", str(port)]
    cmd += ["-od", "{STORAGE}", "-ba", "127.0.0.1", "--max-pdu", str(1 << 20), "-q"]
    path = [_repo_root(), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {"PYTHONPATH": os.pathsep.join(path)}
    return _spawn("pynetdicom-storescp", cmd, base, port, env=env)


def _start_sink(base: Path, args: argparse.Namespace) -> Running:
    cmd = [sys.executable, "-m", "loadtest.sink", "--port", "0"]
    cmd += ["--processes", str(args.receiver_workers)]
    path = [_repo_root(), *filter(None, [os.environ.get("PYTHONPATH")])]
    running = _spawn("sink", cmd, base, 0, env={"PYTHONPATH": os.pathsep.join(path)})
    deadline = time.monotonic() + START_TIMEOUT
    pattern = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
    while True:
        match = pattern.search(running.log())
        if match:
            running.port = int(match.group(1))
            return running
        if not running.alive() or time.monotonic() > deadline:
            running.stop()
            raise RunError(f"the sink did not start; log:\n{running.log()[-2000:]}")
        time.sleep(0.05)


def orthanc_binary() -> str | None:
    """The Orthanc server executable (Debian installs it as /usr/sbin/Orthanc)."""
    for candidate in (shutil.which("Orthanc"), "/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def orthanc_config(storage: Path, index: Path, port: int, threads: int) -> dict[str, Any]:
    """Orthanc's configuration for a comparison: DICOM only, syncing, accepting all;
    ``threads``: associations it serves at once (at least 4, its default)."""
    return {
        "Name": "pacs-loadtest-compare",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(index),
        "StorageCompression": False,
        "SyncStorageArea": True,  # fsync each stored file, like --fsync always
        "Plugins": [],
        "LuaScripts": [],
        "HttpServerEnabled": False,
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "MaximumPduLength": DCMTK_MAX_PDU,
        "DicomThreadsCount": max(4, threads),
        "DicomScpTimeout": 30,
        "DicomModalities": {},
        "OrthancPeers": {},
        "SaveJobs": False,
        "MaximumStorageSize": 0,
        "MaximumPatientCount": 0,
    }


def _start_orthanc(base: Path, args: argparse.Namespace) -> Running:
    binary = orthanc_binary()
    assert binary is not None
    port = free_port()
    (base / "index").mkdir(parents=True, exist_ok=True)
    config = base / "orthanc.json"
    threads = max(args.associations)
    config.write_text(
        json.dumps(orthanc_config(base / "store", base / "index", port, threads), indent=2)
    )
    cmd = [binary, *(["--verbose"] if args.verbose else []), str(config)]
    running = _spawn("orthanc", cmd, base, port, env={"TCP_NODELAY": "1"})
    running.clearable = False
    return running


def _have_orthanc() -> str | None:
    if orthanc_binary():
        return None
    return "Orthanc not installed (Debian: apt-get install orthanc)"


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _have_dcmtk() -> str | None:
    return None if dcmtk_binary("storescp") else "DCMTK storescp not installed"


def _have_pynetdicom() -> str | None:
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        return "pynetdicom not installed"
    return None


RECEIVERS: dict[str, ReceiverSpec] = {
    spec.name: spec
    for spec in (
        ReceiverSpec(
            "pacs-receiver",
            lambda: None,
            _start_pacs_receiver,
            "--workers {workers} --fsync {fsync} --metrics-port 0; max PDU 1 MiB",
        ),
        ReceiverSpec(
            "dcmtk-storescp",
            _have_dcmtk,
            _start_storescp(fork=False),
            "+B -od DIR -pdu 131072 -dhl, TCP_NODELAY=1; one process",
            all_interfaces=True,
        ),
        ReceiverSpec(
            "dcmtk-storescp-fork",
            _have_dcmtk,
            _start_storescp(fork=True),
            "--fork -od DIR -pdu 131072 -dhl, TCP_NODELAY=1; a process per association",
            all_interfaces=True,
        ),
        ReceiverSpec(
            "pynetdicom-storescp",
            _have_pynetdicom,
            _start_pynetdicom,
            "pynetdicom apps storescp -od DIR -ba 127.0.0.1 -pdu 1048576, TCP_NODELAY "
            "patched in; decodes and re-encodes each data set with pydicom",
        ),
        ReceiverSpec(
            "orthanc",
            _have_orthanc,
            _start_orthanc,
            "Orthanc, generated config: SyncStorageArea true (fsyncs), SQLite index, HTTP "
            "off, max PDU 131072, TCP_NODELAY=1; storage kept across its cells",
            all_interfaces=True,
        ),
        ReceiverSpec(
            "sink",
            lambda: None,
            _start_sink,
            "loadtest.sink (--processes = --receiver-workers): accepts everything, discards "
            "data, answers Success; the generator's ceiling on this machine",
        ),
    )
}
#: what ``--receivers`` defaults to (the sink and Orthanc are extra: ``--receivers all``
#: or by name)
DEFAULT_RECEIVERS = (
    "pacs-receiver",
    "dcmtk-storescp",
    "dcmtk-storescp-fork",
    "pynetdicom-storescp",
)


async def _echo(port: int) -> None:
    from workers.scu import associate

    req = await associate(
        "127.0.0.1",
        port,
        contexts=[acse.Requested(dimse.VERIFICATION_SOP_CLASS)],
        acse_timeout=5,
        dimse_timeout=5,
        network_timeout=5,
    )
    try:
        await req.send_c_echo()
    finally:
        await req.release()


def wait_ready(running: Running, timeout: float = START_TIMEOUT) -> None:
    """Until a C-ECHO succeeds (the receiver accepts associations), bounded."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if not running.alive():
            break
        try:
            asyncio.run(_echo(running.port))
            return
        except Exception as exc:
            last = exc
            time.sleep(0.1)
    raise RunError(
        f"{running.name} did not answer a C-ECHO on 127.0.0.1:{running.port} within "
        f"{timeout:g} s ({last!r}); log:\n{running.log()[-2000:]}"
    )
